"""Flickr8k and Flickr30k as they are downloaded: Kaggle's folders, the original token files, Karpathy's splits.

The layouts under ``data.root`` (the first found is read; ``data.captions_file`` / ``data.karpathy_file`` /
``data.image_dir`` choose):

- **Karpathy's splits** (``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` from ``caption_datasets.zip``):
  each image's ``filename``, ``imgid`` and ``split`` (train / val / test: 6,000 / 1,000 / 1,000 for 8k,
  29,000 / 1,014 / 1,000 for 30k) — the papers' splits, used whenever the file is there.
- **Kaggle's Flickr8k** ``captions.txt``: a CSV with the header ``image,caption`` (captions may hold commas, quoted).
- **The original Flickr8k** ``Flickr8k.token.txt``: ``<file>#<n>\\t<caption>``.
- **Flickr30k** ``results.csv``: ``image_name| comment_number| comment`` with the stray spaces it ships with.

Images are in ``Images/`` (Kaggle), ``Flicker8k_Dataset/`` (the original's spelling), ``flickr30k-images/`` or
``flickr30k_images/``. Without Karpathy's file the split is deterministic: the distinct file names, sorted,
shuffled by ``split_seed``; the last ``test_images`` are the test split, the ``val_images`` before them validation.
Image ids are Karpathy's ``imgid``, else the position in the sorted file names: the same file gives the same ids.

Rows that cannot be used are named and counted, never silently dropped: a malformed line stops with its file and
line number; exact duplicate (image, caption) rows and empty captions are left out with a warning; a missing
image file stops with the first few named (as for COCO).
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.data.annotations import CaptionSplit, check_root, clean_split
from captioning.data.karpathy import read_karpathy
from captioning.data.records import ROLES, CaptionTableDataModule, seeded_split

__all__ = ["FlickrDataModule", "FlickrCaptions", "read_flickr"]

IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
CAPTION_FILES = ("captions.txt", "Flickr8k.token.txt", "results.csv", "results_20130124.token")
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json")


@dataclass(frozen=True)
class FlickrCaptions:
    """A Flickr caption file read: file name -> its captions (in file order), and the file it came from."""

    path: Path
    captions: dict[str, list[str]]
    duplicates: int = 0


def _bad(path: Path, line: int, problem: str) -> ValueError:
    return ValueError(
        f"{path}, line {line}: {problem}. Flickr caption files are Kaggle's captions.txt (CSV, header "
        "'image,caption'), Flickr8k.token.txt ('<file>#<n><TAB><caption>') or Flickr30k's results.csv "
        "('image_name| comment_number| comment'); fix the line or point data.captions_file at the right file."
    )


def read_flickr(path: str | Path) -> FlickrCaptions:
    """Parse a Flickr caption file in any of the three layouts (told apart by their first line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Flickr caption file {path} not found: set data.captions_file, or data.root to the "
                                f"folder holding one of {', '.join(CAPTION_FILES)}.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"Flickr caption file {path} is not readable UTF-8 text ({err}).") from err
    lines = text.splitlines()
    first = lines[0].strip().lower() if lines else ""
    rows: list[tuple[int, str, str]] = []  # (line number, file name, caption)
    if first.replace(" ", "").startswith("image_name|"):  # Flickr30k's results.csv
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            parts = line.split("|", 2)
            if len(parts) == 2 and (joined := re.match(r"\s*\d+\s+(\S.*)", parts[1])):
                parts = [parts[0], "", joined.group(1)]  # a row the download ships without its second pipe
            if len(parts) != 3:
                raise _bad(path, number, f"expected 'image_name| comment_number| comment', found {line[:80]!r}")
            rows.append((number, parts[0].strip(), parts[2].strip()))
    elif first.startswith("image,caption"):  # Kaggle's captions.txt
        for number, record in enumerate(csv.reader(lines[1:]), start=2):
            if not record:
                continue
            if len(record) < 2:
                raise _bad(path, number, f"expected 'image,caption', found {','.join(record)[:80]!r}")
            rows.append((number, record[0].strip(), ",".join(record[1:]).strip()))
    else:  # Flickr8k.token.txt
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            name, tab, caption = line.partition("\t")
            if not tab:
                raise _bad(path, number, f"no tab between the image and its caption in {line[:80]!r}")
            rows.append((number, name.split("#", 1)[0].strip(), caption.strip()))
    captions: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    for number, name, caption in rows:
        if not name:
            raise _bad(path, number, "no image file name")
        if (name, caption) in seen:
            duplicates += 1
            continue
        seen.add((name, caption))
        captions.setdefault(name, []).append(caption)
    if not captions:
        raise ValueError(f"Flickr caption file {path} holds no captions.")
    if duplicates:
        warnings.warn(f"{path}: {duplicates} rows repeat an (image, caption) pair already read and are left out.",
                      UserWarning, stacklevel=2)
    return FlickrCaptions(path, captions, duplicates)


class FlickrDataModule(CaptionTableDataModule):
    """Flickr8k / Flickr30k (``data=flickr8k``, ``data=flickr30k``) in any of their download layouts (module
    docstring); everything else — loading, augmentation, the vocabulary, evaluation — is the COCO DataModule's.

    Args:
        root: the folder the download was unpacked into.
        image_dir, captions_file, karpathy_file: where the images, the caption file and Karpathy's split file are
            (relative to ``root`` or absolute); None: the first of the known names that exists.
        image_size: as for COCO (``auto``: the encoder's or the images' own size).
        split_seed, val_images, test_images: the deterministic split used when no Karpathy file is there.
        **options: the shared options (:mod:`captioning.data.options`).
    """

    OPTION_DEFAULTS = {"min_word_count": 5}

    def __init__(self, root: str, image_dir: str | None = None, captions_file: str | None = None,
                 karpathy_file: str | None = None, image_size: int | str = "auto", split_seed: int = 0,
                 val_images: int = 1000, test_images: int = 1000, **options: Any) -> None:
        super().__init__(root=root, image_size=image_size, **options)
        for name, value in (("split_seed", split_seed), ("val_images", val_images), ("test_images", test_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}.")
        self.image_dir_name, self.captions_file_name, self.karpathy_file_name = image_dir, captions_file, karpathy_file
        self.split_seed, self.val_images, self.test_images = split_seed, val_images, test_images
        self.hparams.update(image_dir=image_dir, captions_file=captions_file, karpathy_file=karpathy_file,
                            split_seed=split_seed, val_images=val_images, test_images=test_images)

    # ------------------------------------------------------------------ where things are
    def _find(self, given: str | None, names: tuple[str, ...], what: str, is_dir: bool) -> Path | None:
        if given:
            path = Path(given).expanduser()
            path = path if path.is_absolute() else self.root / path
            if not (path.is_dir() if is_dir else path.is_file()):
                raise FileNotFoundError(f"The {what} {path} does not exist (data.{'image_dir' if is_dir else what}).")
            return path
        for name in names:
            path = self.root / name
            if path.is_dir() if is_dir else path.is_file():
                return path
        return None

    def _sources(self) -> tuple[Path, Path | None, Path | None]:
        check_root(self.root, "For Flickr it holds the images folder and captions.txt, Flickr8k.token.txt, "
                              "results.csv or Karpathy's dataset_flickr*.json.")
        images = self._find(self.image_dir_name, IMAGE_DIRS, "image folder", True)
        if images is None:
            raise FileNotFoundError(f"No image folder in {self.root}: expected one of {', '.join(IMAGE_DIRS)}, or set "
                                    "data.image_dir.")
        karpathy = self._find(self.karpathy_file_name, KARPATHY_FILES, "karpathy_file", False)
        captions = self._find(self.captions_file_name, CAPTION_FILES, "captions_file", False)
        if karpathy is None and captions is None:
            raise FileNotFoundError(f"No caption file in {self.root}: expected one of "
                                    f"{', '.join(KARPATHY_FILES + CAPTION_FILES)}, or set data.captions_file.")
        return images, karpathy, captions

    def _annotation_file(self, role: str) -> Path:
        _, karpathy, captions = self._sources()
        return karpathy or captions  # type: ignore[return-value]

    @property
    def vocab_path(self) -> Path:
        if self._custom_vocab_path is not None:
            return self._custom_vocab_path
        return self._writable_home(f"vocab_{self._annotation_file('train').stem}_min{self.vocab_options.min_word_count}.json")

    # ------------------------------------------------------------------ splits
    def _source_key(self) -> Any:
        _, karpathy, captions = self._sources()
        source = karpathy or captions
        stat = source.stat()  # type: ignore[union-attr]
        return (str(source), stat.st_size, stat.st_mtime_ns, self.split_seed, self.val_images, self.test_images)

    def _read_splits(self) -> dict[str, CaptionSplit]:
        images, karpathy, captions = self._sources()
        if karpathy is not None:
            entries = read_karpathy(karpathy)
            rows = {s: [(e.image_id, images / Path(e.path).name, list(e.captions)) for e in entries
                        if (e.split if e.split != "restval" else "train") == s] for s in ROLES}
            source = karpathy
        else:
            read = read_flickr(captions)  # type: ignore[arg-type]
            names = sorted(read.captions)
            ids = {name: k for k, name in enumerate(names)}
            split_of = seeded_split(names, self.split_seed, self.val_images, self.test_images)
            rows = {s: [(ids[n], images / n, read.captions[n]) for n in names if split_of[n] == s] for s in ROLES}
            source = read.path
        return {s: clean_split(source, s, [r[0] for r in rows[s]], [str(r[1]) for r in rows[s]], [r[2] for r in rows[s]])
                for s in ROLES}
