"""A Hugging Face ``datasets`` caption set (``data=hf data.path=...``): saved with ``save_to_disk``, parquet files, or
a hub name (offline: from the local Hugging Face cache). Needs the optional extra: ``pip install -e ".[hf]"``.

``data.path`` is read by the first that applies: a ``save_to_disk`` folder (``dataset_dict.json`` or ``state.json``)
with ``datasets.load_from_disk``; a ``.parquet`` file or glob with ``load_dataset("parquet", data_files=...)``; any
other folder (``data/train-00000-of-00001.parquet`` as the hub lays them out, csv/json files) or a hub name with
``load_dataset``. The dataset's splits are the roles by their names (``train``; ``validation`` / ``val`` / ``dev``;
``test``) unless ``data.train_split`` / ``val_split`` / ``test_split`` name them; a ``data.split_column`` inside the
rows, a seeded split of a dataset that has no split (``data.val_size``, ``data.test_size``), or ``data.eval_only``
as for ``data=folder``.

``data.image_column`` is an ``Image`` feature (bytes or a file path per row) or a string column of file paths
(relative to the dataset's folder); ``data.caption_column`` is a column of strings or of lists of strings, or a list
of columns (``[caption_0, caption_1, ...]``). Rows of the same image — one caption per row — are one image with
several captions: rows with the same ``data.id_column`` value, or without one, the same image bytes (or path).

The images stay where the dataset keeps them: each is named by its row in the dataset's own memory-mapped Arrow
files (``<file.arrow>#<column>=<row>``, :mod:`captioning.data.arrow_rows`: the ``save_to_disk`` folder's, or those of
the ``datasets`` cache that ``load_dataset`` converts parquet into), read as they are (not re-encoded) and decoded
by the same ``ImagePipeline``, with the feature cache, the in-memory cache and the bad-image log, like any data
set's files. Nothing is copied: at COCO size, writing 123k files out cost more than the rest of a first start.
A manifest of the rows read, keyed by the dataset's fingerprints and files, is kept in ``data.image_dir`` (default
``images/`` beside the dataset, or under ``~/.cache/captioning`` when that is read-only), so a second start reads
it instead of the dataset; a dataset whose rows are not simply its files' rows (held in memory) has its images
written there once instead. Rows without an image are named and counted, empty captions dropped with a warning,
unreadable images skipped at load time (``data.on_bad_image``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioning.data.annotations import CaptionSplit
from captioning.data.arrow_rows import arrow_row_name, image_rows
from captioning.data.locking import file_lock
from captioning.data.records import CaptionTable, CaptionTableDataModule, role_of, split_images
from captioning.io import read_json, write_json

__all__ = ["HuggingFaceDataModule", "load_hf_dataset", "read_hf_dataset"]

MANIFEST_FORMAT = 2
DATASET_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")
MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"),
         (b"MM\x00*", ".tif"))


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data=hf reads Hugging Face datasets with the `datasets` package, which is not installed: "
                          "pip install -e \".[hf]\" (or pip install datasets).") from err
    return datasets


def load_hf_dataset(path: str) -> dict[str | None, Any]:
    """split name -> ``datasets.Dataset`` (the key None: a dataset saved without splits)."""
    datasets = _datasets()
    local = Path(path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
        elif local.suffix == ".parquet" or (not local.exists() and any(c in path for c in "*?[")):
            loaded = datasets.load_dataset("parquet", data_files=str(local))
        else:
            loaded = datasets.load_dataset(str(local) if local.exists() else path)
    except Exception as err:  # noqa: BLE001 - the library's errors vary by layout; the path is what the user fixes
        raise ValueError(
            f"data.path={path!r} could not be read as a Hugging Face dataset ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). It takes a save_to_disk folder, parquet "
            "files (a file, a glob or a folder of them) or a hub name whose copy is in the local cache."
        ) from err
    if isinstance(loaded, datasets.Dataset):
        return {None: loaded}
    return dict(loaded.items())


def _extension(data: bytes, original: str | None) -> str:
    suffix = Path(original).suffix.lower() if original else ""
    if suffix in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"):
        return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), ".img")


def _roles(names: Sequence[str | None], given: dict[str, str | None], path: str) -> dict[str | None, str | None]:
    """The dataset's split names -> train / val / test (None: not used; for the key None, the rows decide)."""
    for role, name in given.items():
        if name is not None and name not in names:
            raise ValueError(f"data.{role}_split={name!r}: the dataset at {path} has the splits "
                             f"{', '.join(map(str, names))}.")
    named = {name: role for role, name in given.items() if name is not None}
    return {name: None if name is None else named.get(name) or (role_of(name) if role_of(name) not in named.values()
                                                                else None) for name in names}


def read_hf_dataset(path: str, image_dir: Path, image_column: str = "image",
                    caption_column: str | Sequence[str] = "caption", id_column: str | None = None,
                    split_column: str | None = None, splits: dict[str, str | None] | None = None,
                    progress: bool = True) -> CaptionTable:
    """The dataset's images grouped with their captions; the table is kept in ``image_dir`` (a manifest, keyed by the
    dataset's fingerprints and files) for the next start.

    An image is named by its row in the dataset's own Arrow files (:mod:`captioning.data.arrow_rows`), or, for a
    dataset whose rows are not simply its files' rows (held in memory, a selection), written once into
    ``image_dir``; an image column of file paths names those files.

    ``splits``: role -> the dataset's split name (None: found by name).
    """
    loaded = load_hf_dataset(path)
    roles = _roles(list(loaded), splits or {}, path)
    columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    key = {"format": MANIFEST_FORMAT, "path": str(path), "image_column": image_column, "caption_columns": columns,
           "id_column": id_column, "split_column": split_column, "roles": {str(k): v for k, v in roles.items()},
           "splits": {str(name): [len(ds), getattr(ds, "_fingerprint", None),
                                  [os.path.abspath(c["filename"]) for c in ds.cache_files]]
                      for name, ds in loaded.items()}}
    manifest = image_dir / "manifest.json"
    with file_lock(image_dir / ".lock"):  # DDP ranks and sweep jobs set up at once: one writes, the rest read
        saved = read_json(manifest, None) if manifest.is_file() else None
        if isinstance(saved, dict) and saved.get("key") == key:
            return _table_from(saved["table"], image_dir)
        table = _export(loaded, roles, image_dir, image_column, columns, id_column, split_column, path, progress)
        inside = str(image_dir) + os.sep
        write_json(manifest, {"key": key, "table": {
            "source": str(table.source), "names": table.names,
            "files": [f[len(inside):] if f.startswith(inside) else os.path.abspath(f) for f in table.files],
            "captions": table.captions,
            "splits": table.splits, "duplicates": table.duplicates}}, indent=None)
    table.warn_duplicates()
    return table


def _table_from(saved: dict[str, Any], image_dir: Path) -> CaptionTable:
    return CaptionTable(Path(saved["source"]), list(saved["names"]),
                        [str(image_dir / f) for f in saved["files"]], [list(c) for c in saved["captions"]],
                        list(saved["splits"]), int(saved["duplicates"]))


def _export(loaded: dict[str | None, Any], roles: dict[str | None, str | None], image_dir: Path, image_column: str,
            caption_columns: list[str], id_column: str | None, split_column: str | None, path: str,
            progress: bool) -> CaptionTable:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    datasets = _datasets()
    base = Path(path).expanduser()
    base = base if base.is_dir() else base.parent
    table = CaptionTable(Path(path))
    no_image: list[str] = []
    seen: dict[str, str | None] = {}
    across = 0
    used = {name: ds for name, ds in loaded.items() if name is None or roles[name] is not None}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        for name, ds in used.items():
            wanted = [image_column, *caption_columns, *(c for c in (id_column, split_column) if c)]
            missing = [c for c in wanted if c not in ds.column_names]
            if missing:
                raise ValueError(f"The dataset at {path} ({name or 'no split'}) has no column {missing[0]!r}; its "
                                 f"columns are {', '.join(ds.column_names)}. Set data.image_column / "
                                 "data.caption_column (/ id_column / split_column).")
            feature = ds.features[image_column]
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(image_column, datasets.Image(decode=False))
            elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
                raise ValueError(f"Column {image_column!r} of the dataset at {path} is {feature}, not an Image "
                                 "feature or a column of file paths; set data.image_column to the image column.")
            in_arrow = _arrow_shards(ds, image_column)
            folder = image_dir / (name or "all")
            folder_text = str(folder)
            if in_arrow is None:  # held in memory, or a selection of its files' rows: written out once
                folder.mkdir(parents=True, exist_ok=True)
                # what an earlier, interrupted export left: name -> entry (its size read only when the name comes up)
                present = {entry.name: entry for entry in os.scandir(folder)}
            task = bar.add_task(f"{'writing' if in_arrow is None else 'reading'} {name or 'the'} rows", total=len(ds))
            row = 0
            for batch in ds.select_columns(list(dict.fromkeys(wanted))).iter(batch_size=1000):
                for k in range(len(batch[image_column])):
                    label = f"{name or 'rows'}[{row}]"
                    data, file, content = _image_cell(batch[image_column][k], base)
                    row += 1
                    if not content:
                        no_image.append(label)
                        continue
                    captions: list[str] = []
                    for column in caption_columns:
                        value = batch[column][k]
                        captions += [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
                    split = batch[split_column][k] if split_column else None
                    role = role_of(split) if split_column else roles[name]
                    if split_column and role is None:
                        raise ValueError(f"{label} of the dataset at {path}: split {split!r} in column "
                                         f"{split_column!r} is not train, validation / val or test.")
                    if id_column:
                        group = f"id {batch[id_column][k]}"
                    else:  # the same picture in two splits (scraped sets have them) stays two images, counted
                        if seen.setdefault(content, role) != role:
                            across += 1
                        group = f"{role} {content}"
                    if data is not None and in_arrow is not None:  # the row's bytes where the dataset keeps them
                        shard = bisect_right(in_arrow[1], row - 1) - 1
                        file = arrow_row_name(in_arrow[0][shard], image_column, row - 1 - in_arrow[1][shard])
                    elif data is not None and not table.has(group):  # one file per image, not per caption row
                        base_name = f"{row - 1:09d}{_extension(data, file)}"
                        file = os.path.join(folder_text, base_name)
                        entry = present.get(base_name)
                        if entry is None or not entry.is_file() or entry.stat().st_size != len(data):
                            with open(file, "wb") as out:
                                out.write(data)
                    table.add(group, str(file), [c.strip() for c in captions], role, f"{path}, {label}")
                bar.advance(task, len(batch[image_column]))
    if no_image:
        warnings.warn(f"{path}: {len(no_image)} rows have no image and are left out (e.g. {', '.join(no_image[:5])}).",
                      UserWarning, stacklevel=3)
    if across:
        warnings.warn(f"{path}: {across} rows hold an image that another split holds too; each split keeps its copy "
                      "(an evaluation on such a split is not fully unseen).", UserWarning, stacklevel=3)
    # the names sort as the rows came (zero-padded), so the image ids follow the dataset's order
    table.names = [f"{k:09d}" for k in range(len(table.names))]
    return table


def _arrow_shards(ds: Any, image_column: str) -> tuple[list[str], list[int]] | None:
    """The Arrow files that hold ``ds``'s rows in order, and the first row of each; None when its rows are not
    simply those files' rows (a dataset in memory, a selection or shuffle of them) or the column is not an
    Image feature's struct of bytes."""
    files = [os.path.abspath(entry["filename"]) for entry in ds.cache_files]
    if not files or getattr(ds, "_indices", None) is not None:
        return None
    starts, total = [], 0
    for file in files:
        rows = image_rows(file, image_column)
        if rows is None:
            return None
        starts.append(total)
        total += rows
    return (files, starts) if total == len(ds) else None


def _image_cell(cell: Any, base: Path) -> tuple[bytes | None, str | None, str]:
    """(the image bytes, its file or original name, what identifies its content; "" when the row has no image)."""
    original = cell.get("path") if isinstance(cell, dict) else cell
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"], original, "sha1 " + hashlib.sha1(cell["bytes"]).hexdigest()
    if isinstance(original, str) and original:
        file = Path(original).expanduser()
        file = os.path.normpath(file if file.is_absolute() else base / file)
        return None, file, f"file {file}"
    return None, None, ""


class HuggingFaceDataModule(CaptionTableDataModule):
    """A Hugging Face dataset (``data=hf data.path=...``; module docstring for what is read and how).

    Args:
        path: a ``save_to_disk`` folder, parquet file(s) or folder, or a hub name (from the local cache offline).
        image_column, caption_column, id_column, split_column: the columns (``caption_column`` may be a list).
        train_split, val_split, test_split: the dataset's split for each role; None: found by name.
        image_dir: where the manifest of the rows read is kept (and the images of a dataset held in memory written
            once); default ``images/`` beside the dataset.
        image_size: as for COCO (``auto``: the encoder's or the images' own size).
        split_seed, val_size, test_size, eval_only: as for ``data=folder``, for a dataset without splits.
        **options: the shared options (:mod:`captioning.data.options`).
    """

    OPTION_DEFAULTS = {"min_word_count": 5}

    def __init__(self, path: str, image_column: str = "image", caption_column: str | list[str] = "caption",
                 id_column: str | None = None, split_column: str | None = None, train_split: str | None = None,
                 val_split: str | None = None, test_split: str | None = None, image_dir: str | None = None,
                 image_size: int | str = "auto", split_seed: int = 0, val_size: int | float = 0.1,
                 test_size: int | float = 0.1, eval_only: bool = False, **options: Any) -> None:
        path = str(path)
        local = Path(path).expanduser()
        if local.is_file() or any(c in path for c in "*?["):
            root = local.parent  # parquet file(s)
        elif local.exists() or local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
            root = local  # a dataset folder (one that is not there is named when it is read)
        else:  # a hub name, "user/name": its images beside the other caches
            root = Path("~/.cache/captioning/hf").expanduser() / path.replace("/", "--")
        super().__init__(root=str(root), image_size=image_size, **options)
        if not isinstance(caption_column, str):
            caption_column = [str(c) for c in caption_column]  # a ListConfig: plain, for the checkpoint
        self.path = path
        self.columns = {"image_column": image_column, "caption_column": caption_column, "id_column": id_column,
                        "split_column": split_column}
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.split_arguments = {"split_seed": split_seed, "val_size": val_size, "test_size": test_size,
                                "eval_only": bool(eval_only)}
        self.image_dir = Path(image_dir).expanduser() if image_dir else self._writable_home("images")
        self.hparams.pop("root", None)
        self.hparams.update(path=path, **self.columns, train_split=train_split, val_split=val_split,
                            test_split=test_split, image_dir=image_dir, **self.split_arguments)

    def _annotation_file(self, role: str) -> Path:
        return Path(self.path).expanduser()

    @property
    def vocab_path(self) -> Path:
        if self._custom_vocab_path is not None:
            return self._custom_vocab_path
        return self._writable_home(f"vocab_hf_min{self.vocab_options.min_word_count}.json")

    def _source_key(self) -> Any:
        local = Path(self.path).expanduser()
        # the dataset's own files (state.json, arrow and parquet files, two levels deep): a dataset saved again
        # over the old one reads again (its manifest is keyed by the fingerprints in them)
        files = [local] if local.is_file() else sorted(
            p for pattern in ("*", "*/*") for p in local.glob(pattern)
            if (p.suffix in (".arrow", ".parquet") or p.name in DATASET_FILES) and self.image_dir not in p.parents
        ) if local.is_dir() else []
        stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        return (self.path, stats, str(self.image_dir), repr(self.columns), repr(self.split_names),
                repr(sorted(self.split_arguments.items())))

    def _read_splits(self) -> dict[str, CaptionSplit]:
        table = read_hf_dataset(self.path, self.image_dir, **self.columns, splits=self.split_names,
                                progress=self.loader.progress)
        return split_images(table, **self.split_arguments)
