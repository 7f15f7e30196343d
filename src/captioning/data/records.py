"""Caption sets read whole from one source — a folder's captions file, a Hugging Face dataset, Flickr's files — as
rows of (image file, captions, split), and the DataModule base they share.

Such a source yields every split in one read, so :class:`CaptionTableDataModule` reads it once (again only when the
source changed) and hands the COCO DataModule's machinery — loading, caches, augmentation, the vocabulary,
evaluation — the three :class:`~captioning.data.annotations.CaptionSplit` s. :func:`split_images` assigns splits:
the source's own (a split column, split sub-folders, a ``DatasetDict``'s splits), else a seeded split, or with
``eval_only`` every image in both ``val`` and ``test`` (a set that only evaluates, like nocaps: ``eval.py`` captions
it with the checkpoint's vocabulary, so it needs no training split).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning.data.annotations import CaptionSplit, clean_split, missing_images
from captioning.data.coco import CocoCaptionsDataModule
from captioning.data.split_cache import cached_splits

__all__ = ["CaptionTable", "CaptionTableDataModule", "ROLES", "role_of", "seeded_split", "split_count", "split_images"]

ROLES = ("train", "val", "test")
# what a split is called -> its role: the names Hugging Face's folder-based builders recognise
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
}


def role_of(name: str | None) -> str | None:
    """``train`` / ``val`` / ``test`` for a split's name (``validation``, ``dev``, ``testing``...), else None."""
    return SPLIT_NAMES.get(str(name).strip().lower()) if name is not None else None


@dataclass
class CaptionTable:
    """A caption source read: one entry per image, captions grouped, in the order first seen.

    ``names`` are the images' stable names (the file relative to the data root, or a dataset's row label); the
    image ids are their positions in sorted order, so the same files always get the same ids. ``splits`` holds each
    image's role where the source says (None where it does not); ``source`` is the file messages name.
    """

    source: Path
    names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    duplicates: int = 0  # exact (image, caption) repeats left out
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, name: str, file: str, captions: Sequence[str], split: str | None, where: str) -> None:
        """Add captions of image ``name`` (``where`` names the row in messages: ``file, line 7``). The same image
        in two splits is an error; repeated (image, caption) pairs are counted and left out."""
        k = self._index.get(name)
        if k is None:
            self._index[name] = k = len(self.names)
            self.names.append(name)
            self.files.append(file)
            self.captions.append([])
            self.splits.append(split)
        elif split != self.splits[k]:
            raise ValueError(f"{where}: image {name} is listed in the {self.splits[k] or 'unsplit'} split and again "
                             f"in the {split or 'unsplit'} one; an image belongs to one split — fix the row.")
        for caption in captions:
            if caption in self.captions[k]:
                self.duplicates += 1
            else:
                self.captions[k].append(caption)

    def has(self, name: str) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.names)

    def warn_duplicates(self) -> None:
        if self.duplicates:
            warnings.warn(f"{self.source}: {self.duplicates} rows repeat an (image, caption) pair already read and "
                          "are left out.", UserWarning, stacklevel=3)


def split_count(size: int | float, total: int, name: str) -> int:
    """``val_size`` / ``test_size`` as a number of images: an integer is a count, a float in [0, 1) a fraction."""
    if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
        raise ValueError(f"data.{name} must be a count (an integer >= 0) or a fraction in [0, 1), got {size!r}.")
    if isinstance(size, float):
        if size >= 1:
            raise ValueError(f"data.{name}={size} is a fraction >= 1; give a fraction below 1 or a count of images.")
        return math.ceil(size * total) if size > 0 else 0
    return size


def seeded_split(names: Sequence[str], seed: int, val_images: int, test_images: int) -> dict[str, str]:
    """name -> train / val / test: the sorted names shuffled by ``seed``, the last ``test_images`` test, the
    ``val_images`` before them validation."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    if val_images + test_images >= len(order):
        raise ValueError(f"{val_images} validation + {test_images} test images leave no training images of the "
                         f"{len(order)}: lower data.val_size / data.test_size (data.val_images / data.test_images).")
    cut_val, cut_test = len(order) - val_images - test_images, len(order) - test_images
    return {name: "train" if k < cut_val else "val" if k < cut_test else "test" for k, name in enumerate(order)}


def split_images(table: CaptionTable, split_seed: int = 0, val_size: int | float = 0.1,
                 test_size: int | float = 0.1, eval_only: bool = False) -> dict[str, CaptionSplit]:
    """The table's images as CaptionSplits by role — only the roles that have images.

    The source's splits where it gives one for every image; a seeded split where it gives none (``val_size`` /
    ``test_size``: counts or fractions); with ``eval_only`` every image in ``val`` and ``test``. Empty captions
    are dropped by :func:`~captioning.data.annotations.clean_split` (named and counted).
    """
    if not len(table):
        raise ValueError(f"{table.source} lists no images with captions.")
    given = [s is not None for s in table.splits]
    if eval_only:
        roles = {name: None for name in table.names}
    elif all(given):
        roles = dict(zip(table.names, table.splits, strict=True))
    elif any(given):
        unsplit = [n for n, g in zip(table.names, given, strict=True) if not g]
        raise ValueError(f"{table.source}: {len(unsplit)} of the {len(table)} images have no split (e.g. "
                         f"{', '.join(unsplit[:3])}) while the others have one; give every image a split, or none "
                         "(then data.split_seed, data.val_size and data.test_size split them).")
    else:
        roles = seeded_split(table.names, split_seed, split_count(val_size, len(table), "val_size"),
                             split_count(test_size, len(table), "test_size"))
    ids = {name: k for k, name in enumerate(sorted(table.names))}
    splits = {}
    for role in ROLES:
        members = [k for k, name in enumerate(table.names) if roles[name] == role or (eval_only and role != "train")]
        if members:
            splits[role] = clean_split(table.source, role, [ids[table.names[k]] for k in members],
                                       [table.files[k] for k in members], [table.captions[k] for k in members])
    return splits


def _images_present(splits: dict[str, CaptionSplit]) -> bool:
    return not any(missing_images(split.image_paths) for split in splits.values())


class CaptionTableDataModule(CocoCaptionsDataModule):
    """A caption set whose splits come from one read of its source (a subclass says how: :meth:`_source_key`,
    :meth:`_read_splits`, :meth:`_annotation_file`); everything else is the COCO DataModule's.

    The splits are the roles ``train`` / ``val`` / ``test``; one the source has no images for (an evaluation-only
    set's ``train``, a set without a test split) is named in the error of whatever asks for it.
    """

    def __init__(self, root: str, image_size: int | str = "auto", **options: Any) -> None:
        super().__init__(root=root, year="", image_size=image_size, test_split="test", **options)
        for key in ("year", "train_split", "val_split", "test_split", "split_source", "restval", "karpathy_file"):
            self.hparams.pop(key, None)  # COCO's, not this source's: eval.py rebuilds it from the rest
        self._layout: tuple[Any, dict[str, CaptionSplit]] | None = None

    def _source_key(self) -> Any:
        """What the splits depend on (file paths, sizes, mtimes, split arguments): a change reads them again."""
        raise NotImplementedError

    def _read_splits(self) -> dict[str, CaptionSplit]:
        raise NotImplementedError

    def _layout_splits(self) -> dict[str, CaptionSplit]:
        key = self._source_key()
        if self._layout is None or self._layout[0] != key:
            # read once, then read back by every later start while the source is unchanged and every image it
            # resolved is still there (a folder's images may move while its captions file stays)
            self._layout = (key, cached_splits(self._writable_home("captions"), "splits",
                                               (type(self).__name__, key, str(self.root.absolute())),
                                               self._read_splits, valid=_images_present))
        return self._layout[1]

    def _split_name(self, role: str) -> str:
        name = role_of(role)
        if name is None:
            raise ValueError(f"Unknown split {role!r}; use one of 'train', 'val', 'test'.")
        return name

    def _load_split(self, role: str) -> CaptionSplit:
        name = self._split_name(role)
        splits = self._layout_splits()
        if name not in splits:
            have = ", ".join(splits) or "none"
            hint = ("eval.py scores such a set with the checkpoint's vocabulary (data.eval_only=true puts every "
                    "image in val and test)" if name == "train" else
                    f"give it one (a split column or sub-folder; for a Hugging Face dataset data.{name}_split=<its "
                    "split>), or leave the splits out to have them drawn (data.val_size, data.test_size)")
            raise ValueError(f"{self._annotation_file(role)} has no {name} images (its splits: {have}); {hint}.")
        return splits[name]

    def has_split(self, role: str) -> bool:
        return self._split_name(role) in self._layout_splits()

    def _roles(self, stage: str | None) -> list[str]:
        if stage is None:
            return [role for role in ROLES if self.has_split(role)]
        return super()._roles(stage)

    def _size_split(self) -> str:
        return "train" if self.has_split("train") else "val"

    def _vocab_fingerprint(self) -> dict[str, Any]:
        meta = super()._vocab_fingerprint()
        meta["source"] = repr(self._source_key())
        return meta
