"""Encoder feature cache: a frozen encoder's features of a split, computed once, memory-mapped for training.

:class:`FeatureCache` is the cache of one DataModule: for each split, its key (everything the features
depend on: the encoder's class, ``cache_key`` and a hash of its weights, the image pipeline, the storage
dtype, the split's image files) and its store. One directory per key; its name carries the key's hash, so a
changed key builds a new cache and never reads a stale one::

    <cache_dir>/<split>-<hash>/
        key.json        # the key, readable (its hash is in the directory name)
        index.json      # {"image_ids": [...]}: row r holds the features of image_ids[r]
        features.npy    # (R, D, h, w) float16/float32, a NumPy .npy file read with mmap
        progress.json   # {"rows_done", "feature_shape", "bad_rows", "complete"}, rewritten atomically

The build writes rows in order and records how many are on disk (after flushing them) every
``chunk_rows`` rows and when interrupted, so a restarted build continues from there. Readers
(:class:`FeatureStore`) open the memory map lazily, on first access, so every DataLoader worker maps
the file itself instead of receiving a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from captioning.data.arrow_rows import arrow_file
from captioning.data.images import BadImage
from captioning.data.locking import file_lock
from captioning.io import read_json, write_json

__all__ = [
    "FEATURE_DTYPES",
    "FEATURE_FORMAT",
    "FeatureCache",
    "FeatureStore",
    "build_feature_store",
    "cache_directory",
    "encoder_fingerprint",
    "encoder_is_frozen",
    "key_digest",
]

# Bump when the on-disk layout or what goes into the features changes: old caches are then not read.
# 2: the key holds the encoder's class, cache_key and weights hash, no longer its config.
FEATURE_FORMAT = 2
FEATURE_DTYPES = ("float16", "float32")
KEY_FILE, INDEX_FILE, FEATURES_FILE, PROGRESS_FILE, LOCK_FILE = (
    "key.json", "index.json", "features.npy", "progress.json", ".lock")


# ---------------------------------------------------------------------------------------------- keys
def encoder_fingerprint(encoder: nn.Module) -> str:
    """A hash of every parameter and buffer of ``encoder``: equal exactly when the weights are.

    Part of the cache key so that features of other weights (another seed of a random init, a fine-tuned
    file saved under the same name) are never read as these.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(encoder.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def key_digest(key: Mapping[str, Any]) -> str:
    """A stable hash of a plain (JSON-able) key: sorted keys, no whitespace."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_directory(cache_dir: str | os.PathLike, key: Mapping[str, Any], label: str) -> Path:
    """``<cache_dir>/<label>-<hash of key>``; ``label`` (the split) only makes listings readable."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "split"
    return Path(cache_dir) / f"{safe}-{key_digest(key)}"


# ---------------------------------------------------------------------------------------------- files
def _write_json(path: Path, value: Any) -> None:
    write_json(path, value, indent=None)


def _progress(directory: Path) -> dict[str, Any]:
    state = read_json(directory / PROGRESS_FILE, None)
    return state if isinstance(state, dict) else {}


# ---------------------------------------------------------------------------------------------- reading
class FeatureStore:
    """The features of one finished cache directory, read through a memory map opened on first use.

    Row ``r`` holds the features (D, h, w) of ``image_ids[r]``; rows of images that could not be read
    while building are listed in ``bad_rows`` (row -> message) and hold zeros.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        state = _progress(self.directory)
        index = read_json(self.directory / INDEX_FILE, None)
        if not state.get("complete") or not isinstance(index, dict):
            raise RuntimeError(
                f"The feature cache {self.directory} is not complete. It is built by the DataModule's "
                "prepare_data() (with the encoder given to use_encoder()); run that first. A build that was "
                "interrupted continues where it stopped."
            )
        self.image_ids = np.asarray(index["image_ids"], dtype=np.int64)
        self.bad_rows: dict[int, str] = {int(r): m for r, m in state.get("bad_rows", {}).items()}
        self.feature_shape = tuple(state.get("feature_shape") or ())
        self._row_of: dict[int, int] | None = None
        self._features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict[str, Any]:
        # Workers map the file themselves; never pickle the map (or a copy of the whole array).
        return {**self.__dict__, "_features": None}

    @property
    def features(self) -> np.ndarray:
        """(R, D, h, w) memory map, opened read-only on first access in each process."""
        if self._features is None:
            self._features = np.load(self.directory / FEATURES_FILE, mmap_mode="r")
        return self._features

    def row_of(self, image_id: int) -> int:
        if self._row_of is None:
            self._row_of = {int(i): r for r, i in enumerate(self.image_ids.tolist())}
        return self._row_of[int(image_id)]

    def row(self, row: int) -> np.ndarray:
        """Features (D, h, w) of row ``row``, copied out of the map as float32."""
        return np.array(self.features[row], dtype=np.float32)

    def get(self, image_id: int) -> np.ndarray | None:
        """Features (D, h, w) of ``image_id`` as float32, or None when that image could not be read."""
        row = self.row_of(image_id)
        return None if row in self.bad_rows else self.row(row)


# ---------------------------------------------------------------------------------------------- building
def _keep_bad(samples: Sequence[torch.Tensor | BadImage]) -> list[torch.Tensor | BadImage]:
    return list(samples)


def build_feature_store(
    directory: str | os.PathLike,
    key: Mapping[str, Any],
    image_ids: Sequence[int] | np.ndarray,
    images: Dataset,
    encoder: nn.Module,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    chunk_rows: int = 1024,
    progress: bool = True,
    description: str = "features",
) -> FeatureStore:
    """Compute ``encoder``'s features of every image into ``directory`` (resuming a partial build).

    Args:
        directory: the cache directory (normally :func:`cache_directory` of ``key``).
        key: what the features depend on, written to ``key.json``.
        image_ids: (R,) the image of each row.
        images: ``images[r]`` -> the transformed image (3, S, S) of row r, or a :class:`BadImage` for an
            unreadable one (its row is recorded as bad and left zero).
        encoder: images (N, 3, S, S) -> features (N, D, h, w); run in eval mode under ``no_grad`` on
            ``device`` and put back on its own device and mode afterwards.
        dtype: storage dtype, "float16" (half the disk) or "float32".
        chunk_rows: rows written between progress records (the work a hard kill can lose).
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"Feature cache dtype must be one of {FEATURE_DTYPES}, got {dtype!r}.")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"Cannot create the feature cache directory {directory} ({err}). Set data.cache_dir to a "
            "writable folder."
        ) from err
    image_ids = np.asarray(image_ids, dtype=np.int64)
    if len(image_ids) != len(images):
        raise ValueError(f"build_feature_store: {len(image_ids)} image ids for {len(images)} images.")
    # Serialise builders of one cache (several nodes' prepare_data on a shared file system).
    with file_lock(directory / LOCK_FILE):
        if _progress(directory).get("complete"):
            return FeatureStore(directory)  # another process finished it while we waited
        if read_json(directory / KEY_FILE, None) != json.loads(json.dumps(key, default=str)):
            _write_json(directory / KEY_FILE, dict(key))
        index = {"image_ids": image_ids.tolist()}
        if read_json(directory / INDEX_FILE, None) != index:
            _write_json(directory / INDEX_FILE, index)
            (directory / PROGRESS_FILE).unlink(missing_ok=True)  # rows of another image list: start over
        _build(directory, images, encoder, torch.device(device), batch_size, num_workers, dtype, chunk_rows,
               progress, description)
    return FeatureStore(directory)


def _open_partial(directory: Path, state: dict[str, Any], rows: int) -> np.ndarray | None:
    """The features file of an interrupted build, when it matches what the progress record says."""
    shape = state.get("feature_shape")
    path = directory / FEATURES_FILE
    if not shape or not path.is_file():
        return None
    try:
        features = np.load(path, mmap_mode="r+")
    except (OSError, ValueError):
        return None
    return features if features.shape == (rows, *shape) else None


def _build(directory: Path, images: Dataset, encoder: nn.Module, device: torch.device, batch_size: int,
           num_workers: int, dtype: str, chunk_rows: int, progress: bool, description: str) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rows = len(images)
    state = _progress(directory)
    features = _open_partial(directory, state, rows)
    done, bad_rows = 0, {}
    if features is not None or state.get("feature_shape") is None:  # else its features file is gone or wrong
        recorded_rows = state.get("rows_done", 0)
        if isinstance(recorded_rows, int) and 0 <= recorded_rows <= rows:
            done, bad_rows = recorded_rows, dict(state.get("bad_rows") or {})
    feature_shape = state.get("feature_shape") if features is not None else None

    def record(rows_done: int) -> None:
        if features is not None:
            features.flush()  # rows reach the disk before the record that counts them
        _write_json(directory / PROGRESS_FILE, {"rows_done": rows_done, "feature_shape": feature_shape,
                                                "bad_rows": bad_rows, "complete": False})

    loader = DataLoader(Subset(images, range(done, rows)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_keep_bad)
    parameter = next(encoder.parameters(), None)
    home = parameter.device if parameter is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval().to(device)
    recorded = done
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task(description, total=rows, completed=done)
            for batch in loader:
                good = [k for k, sample in enumerate(batch) if not isinstance(sample, BadImage)]
                for k, sample in enumerate(batch):
                    if isinstance(sample, BadImage):
                        bad_rows[str(done + k)] = sample.reason
                if good:
                    pixels = torch.stack([batch[k] for k in good]).to(device, non_blocking=True)
                    with torch.no_grad():
                        out = encoder(pixels).float().cpu().numpy()
                    if features is None:
                        feature_shape = list(out.shape[1:])
                        features = np.lib.format.open_memmap(directory / FEATURES_FILE, mode="w+", dtype=dtype,
                                                             shape=(rows, *feature_shape))
                    features[[done + k for k in good]] = out.astype(dtype)
                done += len(batch)
                bar.update(task, completed=done)
                if done - recorded >= chunk_rows:
                    record(done)
                    recorded = done
    except BaseException:
        record(done)  # keep every finished row: the next build starts from here
        raise
    finally:
        encoder.to(home).train(was_training)
    if features is None:
        examples = "; ".join(list(bad_rows.values())[:3])
        raise ValueError(
            f"None of the {rows} images of {description} could be read, so there are no features to cache "
            f"({examples}). Check the image files and data.root."
        )
    features.flush()
    _write_json(directory / PROGRESS_FILE, {"rows_done": rows, "feature_shape": feature_shape,
                                            "bad_rows": bad_rows, "complete": True})


# ---------------------------------------------------------------------------------------------- one cache
def encoder_is_frozen(encoder: nn.Module) -> bool:
    """Whether ``encoder``'s features are fixed: its ``frozen`` flag, else no parameter needing gradients."""
    frozen = getattr(encoder, "frozen", None)
    if isinstance(frozen, bool):
        return frozen
    return not any(p.requires_grad for p in encoder.parameters())


def _file_signature(path: str) -> str:
    try:
        stat = os.stat(arrow_file(path))  # a row of a dataset's Arrow file: that file's
    except OSError:
        return "-"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class FeatureCache:
    """A frozen encoder's cached features of a data set's splits: each split's key and its store.

    Args:
        directory: the folder holding one sub-folder per key.
        encoder: the frozen encoder; its class, ``cache_key`` and a hash of its weights go into every key,
            so features of other weights (another random init, a fine-tuned file under the same name) are
            never read as these.
        transform: a description of how images become its input (the image pipeline's ``repr``).
        dtype: storage dtype, "float16" or "float32".
        root: the data root; image paths enter the key relative to it, so a moved data set keeps its cache.
    """

    def __init__(self, directory: str | os.PathLike, encoder: nn.Module, transform: str, dtype: str = "float16",
                 root: str | os.PathLike = "") -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"FeatureCache needs the encoder nn.Module, got {type(encoder).__name__}.")
        if not encoder_is_frozen(encoder):
            raise ValueError(
                f"data.feature_cache=true needs a frozen encoder, but {type(encoder).__name__} is trainable: its "
                "features change as it learns, so they cannot be computed once. Set encoder.freeze=true (a "
                "torchvision encoder such as encoder=mobilenet_v2 encoder.freeze=true), or data.feature_cache=false."
            )
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"Feature cache dtype must be one of {FEATURE_DTYPES}, got {dtype!r}.")
        self.directory, self.encoder, self.transform, self.dtype = Path(directory), encoder, transform, dtype
        self.root = str(root)
        self._fingerprint: str | None = None

    def key(self, split: Mapping[str, Any], image_ids: Sequence[int], image_paths: Sequence[str]) -> dict[str, Any]:
        """Everything the features of a split depend on. ``split`` names it (source, name...); every image's
        id, path, size and modification time is hashed in, so images replaced in place make a new cache."""
        if self._fingerprint is None:
            self._fingerprint = encoder_fingerprint(self.encoder)
        prefix = self.root + os.sep if self.root else ""
        names = "\n".join(f"{i}\t{str(p).removeprefix(prefix)}\t{_file_signature(str(p))}"
                          for i, p in zip(image_ids, image_paths, strict=True))
        encoder = type(self.encoder)
        return {
            "format": FEATURE_FORMAT,
            "encoder_class": f"{encoder.__module__}.{encoder.__qualname__}",
            "encoder_cache_key": str(getattr(self.encoder, "cache_key", "")),
            "encoder_weights": self._fingerprint,
            "transform": self.transform,
            "dtype": self.dtype,
            "split": {**split, "images": len(image_ids),
                      "files": hashlib.sha256(names.encode("utf-8", "replace")).hexdigest()},
        }

    def path(self, key: Mapping[str, Any], label: str) -> Path:
        """The directory of ``key``'s features; ``label`` (the split's name) makes listings readable."""
        return cache_directory(self.directory, key, label)

    def open(self, key: Mapping[str, Any], label: str) -> FeatureStore:
        """The finished store of ``key``; RuntimeError when it is not built (or not finished)."""
        return FeatureStore(self.path(key, label))

    def build(self, key: Mapping[str, Any], label: str, image_ids: Sequence[int] | np.ndarray, images: Dataset,
              **options: Any) -> FeatureStore:
        """The store of ``key``, built (or a partial build resumed) when it is not finished yet.
        ``options`` go to :func:`build_feature_store` (device, batch_size, num_workers, progress...)."""
        try:
            return self.open(key, label)
        except RuntimeError:
            pass  # not built yet, or interrupted: build (or resume) below
        return build_feature_store(self.path(key, label), key, image_ids, images, self.encoder, dtype=self.dtype,
                                   description=f"encoder features {label}", **options)
