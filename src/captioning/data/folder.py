"""A folder of images with a captions file, as people make them and as Hugging Face's ``imagefolder`` lays them out.

Under ``data.root`` (``data=folder``), the captions are in the first of these found (or ``data.captions_file``):

- ``captions.csv`` / ``metadata.csv``: a header naming an image column (``file_name``, ``image``, ``filename``,
  ``file``, ``image_path``, ``path``, ``image_name``) and a caption column (``caption``, ``captions``, ``text``,
  ``sentence``, ``sentences``); one row per caption or per image (a cell holding a JSON list is several captions);
- ``captions.jsonl`` / ``metadata.jsonl``: one JSON object per line with the same keys, the caption a string or a
  list of strings;
- or one such file in each split sub-folder (``train/metadata.jsonl``, ``validation/metadata.jsonl``, ...), as
  ``imagefolder`` writes them, its file names relative to that folder.

``data.image_column`` / ``data.caption_column`` / ``data.split_column`` name the columns when they are called
otherwise. File names are relative to the captions file's folder (a nested ``photos/2024/a.jpg`` is fine); one not
found there is looked up under ``root`` by its base name when that is unique. The split of an image is its
``split`` column, else the split sub-folder it is in (``train/``, ``val/`` or ``validation/``, ``test/`` — the names
``imagefolder`` recognises), else a seeded split (``data.split_seed``, ``data.val_size``, ``data.test_size``);
``data.eval_only=true`` puts every image in ``val`` and ``test``. Image ids are positions in the sorted file names,
so the same files always get the same ids.

Bad rows are named with their file and line: a row without an image or a caption column stops the read; empty
captions and repeated (image, caption) rows are left out with a warning that counts them; an image listed in two
splits, or a missing image file (the first few named), stops with what to fix; unreadable images are skipped at
load time like any data set's (``data.on_bad_image``).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from captioning.data.annotations import CaptionSplit, check_root
from captioning.data.records import SPLIT_NAMES, CaptionTable, CaptionTableDataModule, role_of, split_images

__all__ = ["CAPTION_FILES", "FolderDataModule", "read_caption_folder"]

CAPTION_FILES = ("captions.csv", "captions.jsonl", "metadata.jsonl", "metadata.csv")
IMAGE_COLUMNS = ("file_name", "image", "filename", "file", "image_path", "path", "image_name")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence", "sentences")
SPLIT_COLUMN = "split"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _bad(path: Path, line: int, problem: str) -> ValueError:
    return ValueError(
        f"{path}, line {line}: {problem}. A captions file names each image's file (relative to its folder) and its "
        "caption or captions; see data=folder in the README, or set data.image_column / data.caption_column."
    )


def _pick(columns: list[str], given: str | None, known: tuple[str, ...], what: str, path: Path) -> str:
    if given:
        if given not in columns:
            raise ValueError(f"{path} has no column {given!r} (data.{what}_column); its columns are "
                             f"{', '.join(columns)}.")
        return given
    for name in known:
        if name in columns:
            return name
    raise ValueError(f"{path} has no {what} column: expected one of {', '.join(known)} (its columns are "
                     f"{', '.join(columns) or 'none'}); name it with data.{what}_column=<column>.")


def _captions(value: Any, path: Path, line: int, csv_cell: bool) -> list[str]:
    """A caption cell -> its captions: a string (a CSV cell holding a JSON list is a list), or a list of strings."""
    if csv_cell and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a caption that merely starts with a bracket
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise _bad(path, line, f"the caption is {repr(value)[:60]}, not a string or a list of strings")


def _rows(path: Path, image_column: str | None, caption_column: str | None,
          split_column: str | None) -> list[tuple[int, str, list[str], str | None]]:
    """(line, file name, captions, split name or None) of a CSV or JSON-lines captions file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"Captions file {path} is not readable UTF-8 text ({err}).") from err
    records: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise _bad(path, number, f"not a JSON object ({err.msg})") from err
            if not isinstance(record, dict):
                raise _bad(path, number, f"a JSON {type(record).__name__}, not an object")
            records.append((number, record))
        columns = list(dict.fromkeys(key for _, record in records for key in record))
    else:  # rows as lists, read by column position: a dict per row costs seconds at COCO size (591k rows)
        reader = csv.reader(text.splitlines())
        columns = [c.strip() for c in next(reader, [])]
        table = [row for row in reader if row]
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image", path)
    caption = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    split = split_column or (SPLIT_COLUMN if SPLIT_COLUMN in columns else None)
    if split_column and split_column not in columns:
        raise ValueError(f"{path} has no column {split_column!r} (data.split_column); its columns are "
                         f"{', '.join(columns)}.")
    is_csv = path.suffix.lower() != ".jsonl"
    if is_csv:
        position = {name: k for k, name in enumerate(columns)}  # a repeated name: its last column, as csv's dicts
        at_image, at_caption = position.get(image), position.get(caption)
        at_split = position.get(split) if split else None
        cells_of = ((number, (row[at_image] if at_image is not None and at_image < len(row) else None,
                              row[at_caption] if at_caption is not None and at_caption < len(row) else None,
                              row[at_split] if at_split is not None and at_split < len(row) else None))
                    for number, row in enumerate(table, start=2))
    else:
        cells_of = ((number, (r.get(image), r.get(caption), r.get(split) if split else None)) for number, r in records)
    rows = []
    for number, (name, captions, split_name) in cells_of:
        name = name.strip() if isinstance(name, str) else ""
        if not name:
            raise _bad(path, number, f"no image file name in column {image!r}")
        if captions is None:
            raise _bad(path, number, f"no caption in column {caption!r}")
        # the common cell, a plain caption, without _captions' checks (a list or JSON text goes through them)
        plain = type(captions) is str and captions[:1] != "[" and not captions[:1].isspace()
        rows.append((number, name, [captions.strip()] if plain else _captions(captions, path, number, is_csv),
                     str(split_name).strip() if split_name not in (None, "") else None))
    return rows


def _image_index(root: Path) -> dict[str, list[Path]]:
    """Base name -> the image files of that name anywhere under ``root``."""
    index: dict[str, list[Path]] = defaultdict(list)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                index[name].append(Path(folder) / name)
    return index


def read_caption_folder(root: str | Path, captions_file: str | None = None, image_column: str | None = None,
                        caption_column: str | None = None, split_column: str | None = None) -> CaptionTable:
    """The folder's captions, grouped by image, with each image's split where the layout gives one."""
    root = Path(os.path.abspath(root))
    files = _caption_files(root, captions_file)
    table = CaptionTable(files[0][0] if len(files) == 1 else root)
    index: list[dict[str, list[Path]]] = []  # the image index, built the first time a name is not where it says
    roles: dict[str, str | None] = {}  # a split name's role, once per distinct name (a file has a few)
    for path, folder_split in files:
        # strings, not Paths, and one stat per image, not per caption row: a COCO-sized file has 591k rows
        resolved: dict[str, tuple[str, str, str | None]] = {}
        at_line = f"{path}, line "
        for number, name, captions, split in _rows(path, image_column, caption_column, split_column):
            role = None
            if split is not None:
                role = roles[split] if split in roles else roles.setdefault(split, role_of(split))
                if role is None:
                    raise _bad(path, number, f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
            entry = resolved.get(name)
            if entry is None:
                entry = resolved[name] = _resolve(root, path, number, name, index)
            file, relative, folder_role = entry
            if role is None and folder_split is None and split is None:
                role = folder_role
            table.add(relative, file, captions, role or folder_split, at_line + str(number))
    table.warn_duplicates()
    return table


def _resolve(root: Path, path: Path, number: int, name: str,
             index: list[dict[str, list[Path]]]) -> tuple[str, str, str | None]:
    """A row's image name -> (its file, that file relative to ``root``, the split its top folder names or None):
    the name relative to the captions file's folder, else to the root, else the one file of that name under the
    root (``index`` holds the root's image index once built)."""
    root_text = str(root)
    file = os.path.normpath(os.path.join(os.path.dirname(path), name))
    if not os.path.isfile(file):
        at_root = os.path.normpath(os.path.join(root_text, name))
        if os.path.isfile(at_root):
            file = at_root
        else:
            if not index:
                index.append(_image_index(root))
            found = index[0].get(os.path.basename(name), [])
            if len(found) > 1:
                raise _bad(path, number, f"{name!r} is not there and {len(found)} files under {root} have "
                                         f"its name ({', '.join(map(str, found[:3]))}): give its path")
            file = str(found[0]) if found else file  # a missing file is named when the split is set up
    inside = file.startswith(root_text + os.sep)
    relative = file[len(root_text) + 1:] if inside else os.path.relpath(file, root_text)
    parts = relative.split(os.sep)
    # an imagefolder-style root file naming train/x.png: the sub-folder is the split
    return file, relative, role_of(parts[0]) if len(parts) > 1 else None


def _caption_files(root: Path, given: str | None) -> list[tuple[Path, str | None]]:
    """The captions file(s) and the split each one's folder stands for (None: the rows say, or no split)."""
    if given:
        path = Path(given).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise FileNotFoundError(f"The captions file {path} does not exist (data.captions_file).")
        return [(path, None)]
    for name in CAPTION_FILES:
        if (root / name).is_file():
            return [(root / name, None)]
    per_split = []
    for folder in sorted(root.iterdir()):
        found = [folder / name for name in CAPTION_FILES if folder.is_dir() and role_of(folder.name)
                 and (folder / name).is_file()]
        if found:
            per_split.append((found[0], role_of(folder.name)))
    if per_split:
        return per_split
    raise FileNotFoundError(
        f"No captions file in {root}: expected one of {', '.join(CAPTION_FILES)} there or in its split sub-folders "
        "(train/, validation/, test/), or set data.captions_file=<file>."
    )


class FolderDataModule(CaptionTableDataModule):
    """Images and a captions file in a folder (``data=folder data.root=DIR``; module docstring for the layouts).

    Args:
        root: the folder.
        captions_file: the captions file (relative to ``root`` or absolute); None: the first known one found.
        image_column, caption_column, split_column: the columns, when not one of the known names.
        image_size: as for COCO (``auto``: the encoder's or the images' own size).
        split_seed, val_size, test_size: the seeded split when the folder gives none (sizes: counts, or fractions
            below 1).
        eval_only: every image in ``val`` and ``test``, no training split (a set to evaluate on).
        **options: the shared options (:mod:`captioning.data.options`).
    """

    OPTION_DEFAULTS = {"min_word_count": 5}

    def __init__(self, root: str, captions_file: str | None = None, image_column: str | None = None,
                 caption_column: str | None = None, split_column: str | None = None, image_size: int | str = "auto",
                 split_seed: int = 0, val_size: int | float = 0.1, test_size: int | float = 0.1,
                 eval_only: bool = False, **options: Any) -> None:
        super().__init__(root=root, image_size=image_size, **options)
        self.columns = {"captions_file": captions_file, "image_column": image_column,
                        "caption_column": caption_column, "split_column": split_column}
        self.split_arguments = {"split_seed": split_seed, "val_size": val_size, "test_size": test_size,
                                "eval_only": bool(eval_only)}
        self.hparams.update(**self.columns, **self.split_arguments)

    def _files(self) -> list[Path]:
        check_root(self.root, "For data=folder it holds the images and captions.csv, captions.jsonl or "
                              "metadata.jsonl (or one in each split sub-folder).")
        return [path for path, _ in _caption_files(self.root, self.columns["captions_file"])]

    def _annotation_file(self, role: str) -> Path:
        files = self._files()
        return files[0] if len(files) == 1 else self.root

    @property
    def vocab_path(self) -> Path:
        if self._custom_vocab_path is not None:
            return self._custom_vocab_path
        return self._writable_home(f"vocab_folder_min{self.vocab_options.min_word_count}.json")

    def _source_key(self) -> Any:
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self._files()]
        return (tuple(stats), tuple(sorted(self.columns.items())), tuple(sorted(self.split_arguments.items())))

    def _read_splits(self) -> dict[str, CaptionSplit]:
        table = read_caption_folder(self.root, **self.columns)
        return split_images(table, **self.split_arguments)
