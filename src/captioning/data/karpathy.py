"""Karpathy's COCO splits: ``dataset_coco.json`` (113,287 train incl. restval / 5,000 val / 5,000 test).

The file (from Karpathy's ``caption_datasets.zip``) lists every COCO 2014 image once, with its split::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"raw": "A man with a red helmet ...", "tokens": ["a", "man", ...]}, ...]},
                ...]}

Images live at ``<root>/<filepath>/<filename>``, i.e. in the official 2014 folders. ``restval`` is the
rest of COCO's val2014 that the Karpathy val and test splits leave over; papers train on train + restval.
The Flickr8k/30k files of the same zip work too (they have ``imgid`` and no ``filepath``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from captioning.data.annotations import INT64_MAX, CaptionSplit, clean_split
from captioning.io import read_json

__all__ = ["KARPATHY_SPLITS", "KarpathyImage", "karpathy_caption_split", "karpathy_split_names", "read_karpathy"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class KarpathyImage:
    """One entry of ``dataset_coco.json``; ``path`` is relative to the data root."""

    image_id: int
    path: str
    split: str
    captions: tuple[str, ...]


def _bad_file(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"Karpathy split file {path} is not in the dataset_coco.json format: {problem}. It needs a JSON "
        "object with 'images', each with 'filename', 'cocoid' (or 'imgid'), 'split' (one of "
        f"{', '.join(KARPATHY_SPLITS)}) and 'sentences' (each with 'raw' or 'tokens'), as in "
        "Karpathy's caption_datasets.zip; re-download it or point data.karpathy_file at the right file."
    )


def read_karpathy(path: str | os.PathLike) -> list[KarpathyImage]:
    """Parse and check a Karpathy split file; every problem is a ValueError naming the file and the entry.

    Raises FileNotFoundError when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Karpathy split file {path} not found. Download Karpathy's caption_datasets.zip (it holds "
            "dataset_coco.json), put dataset_coco.json in data.root beside the train2014/ and val2014/ "
            "folders, or set data.karpathy_file to where it is; or use the official splits with "
            "data.split_source=official."
        )
    data = read_json(path, lambda problem: _bad_file(path, problem))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        found = f"keys {sorted(data)[:10]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise _bad_file(path, f"the top level must be an object with an 'images' list; found {found}")

    images, seen = [], set()
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise _bad_file(path, f"{where} is a {type(entry).__name__}, not an object")
        image_id = entry.get("cocoid", entry.get("imgid"))
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id <= INT64_MAX:
            raise _bad_file(path, f"{where} has no integer 'cocoid' / 'imgid' (found {image_id!r})")
        if image_id in seen:
            raise _bad_file(path, f"{where} repeats image id {image_id}")
        seen.add(image_id)
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        for key, value in (("filename", filename), ("filepath", filepath)):
            if not isinstance(value, str) or "\x00" in value or (key == "filename" and not value):
                raise _bad_file(path, f"{where} (id {image_id}) has no usable string '{key}' (found {value!r})")
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            raise _bad_file(path, f"{where} (id {image_id}) has split {split!r}")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise _bad_file(path, f"{where} (id {image_id}) has no 'sentences' list")
        captions = []
        for k, sentence in enumerate(sentences):
            caption = _sentence_text(sentence)
            if caption is None:
                raise _bad_file(path, f"{where}.sentences[{k}] (id {image_id}) has neither a string 'raw' nor a "
                                      f"list of string 'tokens': {str(sentence)[:120]}")
            captions.append(caption)
        images.append(KarpathyImage(image_id, os.path.join(filepath, filename), split, tuple(captions)))
    return images


def _sentence_text(sentence: object) -> str | None:
    if not isinstance(sentence, dict):
        return None
    raw = sentence.get("raw")
    if isinstance(raw, str):
        return raw
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    return None


def karpathy_split_names(split: str, restval: bool) -> tuple[str, ...]:
    """The Karpathy split labels making up ``split``: train takes restval too when ``restval``."""
    if split not in KARPATHY_SPLITS:
        raise ValueError(
            f"Karpathy split {split!r} does not exist; dataset_coco.json labels images "
            f"{', '.join(KARPATHY_SPLITS)} (set data.train_split / val_split / test_split to those)."
        )
    return ("train", "restval") if split == "train" and restval else (split,)


def karpathy_caption_split(images: Sequence[KarpathyImage], split: str, restval: bool, root: str | os.PathLike,
                           path: str | os.PathLike) -> CaptionSplit:
    """The images of one Karpathy split (train with restval when ``restval``), their files under ``root``."""
    labels = karpathy_split_names(split, restval)
    entries = [e for e in images if e.split in labels]
    return clean_split(Path(path), "+".join(labels), [e.image_id for e in entries],
                       [str(Path(root) / e.path) for e in entries], [list(e.captions) for e in entries])
