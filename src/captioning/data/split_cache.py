"""The parsed splits of a caption source, kept beside the data so a second start skips the parsing.

Reading COCO's 591k training captions (JSON, the pycocotools index, cleaning) takes ~4 s; a folder's 591k-row
``captions.csv`` with its image lookups ~15 s. :func:`cached_splits` keeps what that produced — each split's image
ids, image paths, references, dropped-caption count and scenes — in ``<home>/<name>-<key>.npz``, where the key
hashes what the parse depends on (the source files' paths, sizes and mtimes and the reading options, as the feature
cache and the in-memory split cache key them): a changed file, option or :data:`SPLIT_CACHE_VERSION` is another
key, and the file of an older key is replaced. Warnings the parse gave (dropped captions, duplicates) are kept and
given again on every start that reads the cache. The file holds arrays and JSON only (no pickle), and a cache that
cannot be written (a read-only disk) or read (damaged) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from captioning.data.annotations import CaptionSplit

__all__ = ["SPLIT_CACHE_VERSION", "cached_splits", "load_splits", "save_splits", "write_keyed_npz"]

SPLIT_CACHE_VERSION = 1  # bump when a reader changes what it makes of the same files
_SEP = "\x00"  # between captions in the stored text: no caption or path may hold it (such splits are not cached)


def _key(parts: Any) -> str:
    return hashlib.sha1(repr((SPLIT_CACHE_VERSION, parts)).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _text(strings: list[str]) -> np.ndarray:
    return np.frombuffer(_SEP.join(strings).encode("utf-8", "surrogatepass"), dtype=np.uint8)


def _strings(stored: np.ndarray, count: int) -> list[str]:
    strings = stored.tobytes().decode("utf-8", "surrogatepass").split(_SEP) if count else []
    if len(strings) != count:
        raise ValueError(f"{len(strings)} strings stored, {count} expected")
    return strings


def write_keyed_npz(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``<dir>/<name>-<key>.npz`` atomically (DDP ranks or a second run may write the same key at once),
    replacing the files of older keys of the same name; False when the disk refuses (a read-only root)."""
    name = path.stem.rsplit("-", 1)[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{name}-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def save_splits(path: Path, splits: dict[str, CaptionSplit], messages: list[str]) -> bool:
    """Write ``splits`` (and the warning ``messages`` to give again) to ``path``; False when they cannot be."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"splits": list(splits), "warnings": messages, "meta": {}}
    for k, (name, split) in enumerate(splits.items()):
        captions = [c for refs in split.references for c in refs]
        paths = [str(p) for p in split.image_paths.tolist()]
        if any(_SEP in s for s in captions) or any(_SEP in p for p in paths):
            return False
        arrays[f"ids{k}"] = split.image_ids.astype(np.int64)
        arrays[f"paths{k}"] = _text(paths)
        arrays[f"captions{k}"] = _text(captions)
        arrays[f"counts{k}"] = np.fromiter((len(r) for r in split.references), dtype=np.int32, count=len(split))
        meta["meta"][name] = {"annotation_file": str(split.annotation_file), "dropped": int(split.dropped_captions),
                              "scenes": split.scenes}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    return write_keyed_npz(path, arrays)


def load_splits(path: Path) -> tuple[dict[str, CaptionSplit], list[str]] | None:
    """The splits and warning messages :func:`save_splits` wrote; None when the file is missing or damaged."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(stored["meta"].tobytes().decode("utf-8", "surrogatepass"))
            splits = {}
            for k, name in enumerate(meta["splits"]):
                info = meta["meta"][name]
                ids, counts = stored[f"ids{k}"].astype(np.int64), stored[f"counts{k}"].astype(np.int64)
                captions = _strings(stored[f"captions{k}"], int(counts.sum()))
                ends = np.cumsum(counts).tolist()
                starts = [0, *ends][:len(ends)]
                splits[name] = CaptionSplit(
                    Path(info["annotation_file"]), ids, np.asarray(_strings(stored[f"paths{k}"], len(ids)), dtype=str),
                    [captions[a:b] for a, b in zip(starts, ends, strict=True)], info["dropped"], info["scenes"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None  # rebuilt by the caller
    return splits, list(meta["warnings"])


def cached_splits(home: Path, name: str, key: Any, build: Callable[[], dict[str, CaptionSplit]],
                  valid: Callable[[dict[str, CaptionSplit]], bool] | None = None) -> dict[str, CaptionSplit]:
    """``build()``'s splits, read from ``<home>/<name>-<hash of key>.npz`` when a previous start wrote them.

    ``valid`` (optional) vets splits read back (e.g. that the image files they resolved are still there); splits
    that fail it are built again. The warnings ``build`` gives are passed on and kept for the next start.
    """
    path = Path(home) / f"{name}-{_key(key)}.npz"
    loaded = load_splits(path)
    if loaded is not None and (valid is None or valid(loaded[0])):
        splits, messages = loaded
        for message in messages:
            warnings.warn(message, UserWarning, stacklevel=3)
        return splits
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = build()
    finally:  # passed on as given (also when build fails); the UserWarnings, what the data holds, kept
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if not save_splits(path, splits, messages):
        path.unlink(missing_ok=True)  # not this key's splits (they could not be stored): never read back
    return splits
