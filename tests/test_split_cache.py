"""The parsed-splits cache (data/split_cache.py): what a start parsed is read back by the next one, exactly, with
its warnings; a changed source, option or moved image parses again; a damaged file is rebuilt."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from folderfiles import write_folder
from test_datamodule import TRAIN_CAPTIONS, VAL_CAPTIONS, make_dm, write_coco

from captioning.data.annotations import CaptionSplit
from captioning.data.folder import FolderDataModule
from captioning.data.split_cache import cached_splits, load_splits, save_splits


def _split(name: str, scenes: bool) -> CaptionSplit:
    refs = [["a red square, drawn", "ünïcödé — and\nnewline"], ["x"], ["", "tab\there", "\"quoted\" 'too'"]]
    return CaptionSplit(Path(f"/data/{name}.json"), np.array([7, 2**40, 0], dtype=np.int64),
                        np.array(["/im/ä b.jpg", "rel/x.png", "c,d.jpg"], dtype=str), refs, dropped_captions=3,
                        scenes=[{"objects": [{"color": "red", "shape": "square"}], "width": 64, "height": 64}] * 3
                        if scenes else None)


def _same(a: dict[str, CaptionSplit], b: dict[str, CaptionSplit]) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.annotation_file == y.annotation_file and x.dropped_captions == y.dropped_captions
        assert x.image_ids.dtype == y.image_ids.dtype == np.int64 and np.array_equal(x.image_ids, y.image_ids)
        assert x.image_paths.tolist() == y.image_paths.tolist()
        assert x.references == y.references and x.scenes == y.scenes


def test_splits_read_back_equal_what_was_written(tmp_path):
    empty = CaptionSplit(Path("e.json"), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=str), [])
    splits = {"train": _split("train", True), "val": _split("val", False), "test": empty}
    assert save_splits(tmp_path / "s.npz", splits, ["a warning"])
    loaded, messages = load_splits(tmp_path / "s.npz")
    _same(loaded, splits)
    assert messages == ["a warning"]
    with np.load(tmp_path / "s.npz", allow_pickle=False) as stored:  # arrays and JSON only
        assert all(stored[k].dtype != object for k in stored.files)


def test_a_split_holding_the_separator_is_not_cached(tmp_path):
    split = _split("train", False)
    split.references[1] = ["bad\x00caption"]
    assert not save_splits(tmp_path / "s.npz", {"train": split}, [])
    assert not (tmp_path / "s.npz").exists()
    built = cached_splits(tmp_path, "splits", "k", lambda: {"train": split})  # still given, just not kept
    assert built["train"].references[1] == ["bad\x00caption"] and not list(tmp_path.glob("*.npz"))


def test_cached_splits_builds_once_replays_warnings_and_rebuilds_a_damaged_file(tmp_path):
    calls = []

    def build():
        calls.append(1)
        warnings.warn("dropped 2 empty captions", UserWarning, stacklevel=2)
        return {"train": _split("train", True)}

    for _ in range(2):
        with pytest.warns(UserWarning, match="dropped 2 empty captions"):
            splits = cached_splits(tmp_path, "splits", ("a", 1), build)
        _same(splits, {"train": _split("train", True)})
    assert len(calls) == 1
    (cached,) = tmp_path.glob("splits-*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # damaged: parsed again, not a traceback
    with pytest.warns(UserWarning, match="dropped 2"):
        cached_splits(tmp_path, "splits", ("a", 1), build)
    assert len(calls) == 2
    with pytest.warns(UserWarning, match="dropped 2"):
        cached_splits(tmp_path, "splits", ("a", 2), build)  # another key replaces the older file
    assert len(calls) == 3 and len(list(tmp_path.glob("splits-*.npz"))) == 1
    with pytest.warns(UserWarning, match="dropped 2"):
        cached_splits(tmp_path, "splits", ("a", 2), build, valid=lambda s: False)  # vetoed: parsed again
    assert len(calls) == 4


def test_warnings_of_a_failing_parse_are_still_given(tmp_path):
    def build():
        warnings.warn("3 rows repeat", UserWarning, stacklevel=2)
        raise ValueError("no train images")

    with pytest.warns(UserWarning, match="3 rows repeat"), pytest.raises(ValueError, match="no train images"):
        cached_splits(tmp_path, "splits", "k", build)
    assert not list(tmp_path.glob("*.npz"))


def _refuse(*args, **kwargs):
    raise AssertionError("parsed again instead of read from the split cache")


def _coco(tmp_path, year="2017"):
    root = tmp_path / "coco"
    write_coco(root, year, "train", TRAIN_CAPTIONS | {4: ["...", "a bird"]})  # one caption to drop
    write_coco(root, year, "val", VAL_CAPTIONS)
    return root


def _start(dm, stage="fit"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()
        dm.setup(stage)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_a_second_coco_start_reads_the_parsed_splits_and_a_changed_file_is_parsed_again(tmp_path, monkeypatch):
    root = _coco(tmp_path)
    first = make_dm(root, "2017")
    messages = _start(first)
    assert any("dropped 1 empty or punctuation-only captions" in m for m in messages)
    assert sorted(p.name.split("-")[1] for p in (root / "captions").glob("split-*.npz")) == ["train", "val"]

    import captioning.data.coco as coco

    monkeypatch.setattr(coco, "load_caption_split", _refuse)
    second = make_dm(root, "2017")
    again = _start(second)
    assert any("dropped 1 empty or punctuation-only captions" in m for m in again)  # told on every start
    for stage in ("train", "val"):
        assert second.references(stage) == first.references(stage)
    batch, expected = next(iter(second.val_dataloader())), next(iter(first.val_dataloader()))
    assert list(batch["image_ids"]) == list(expected["image_ids"]) and batch["images"].equal(expected["images"])

    annotations = root / "annotations" / "captions_val2017.json"
    coco_file = json.loads(annotations.read_text())
    coco_file["annotations"][0]["caption"] = "a changed caption"
    annotations.write_text(json.dumps(coco_file))
    os.utime(annotations, ns=(annotations.stat().st_atime_ns, annotations.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="parsed again"):
        _start(make_dm(root, "2017"))
    monkeypatch.undo()
    third = make_dm(root, "2017")
    _start(third)
    assert "a changed caption" in [c for refs in third.references("val").values() for c in refs]
    assert len(list((root / "captions").glob("split-val-*.npz"))) == 1  # the older key's file replaced


def test_a_folder_start_reads_the_cache_until_an_image_moves(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    images = write_folder(root, "csv_rows")
    args = dict(image_size=32, num_workers=0, min_word_count=1, progress=False)
    first = FolderDataModule(str(root), **args)
    messages = _start(first)
    assert any("1 rows repeat an (image, caption) pair" in m for m in messages)

    import captioning.data.folder as folder

    reads = []
    real = folder.read_caption_folder
    monkeypatch.setattr(folder, "read_caption_folder", lambda *a, **k: reads.append(1) or real(*a, **k))
    second = FolderDataModule(str(root), **args)
    again = _start(second)
    assert not reads and any("1 rows repeat" in m for m in again)
    assert {s: second.references(s) for s in ("train", "val")} == {s: first.references(s) for s in ("train", "val")}

    moved = root / images[-1].file  # a test image: the folder is read again and says what is missing
    moved.rename(moved.with_name("elsewhere.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _start(FolderDataModule(str(root), **args), "test")
        except (FileNotFoundError, ValueError) as error:
            assert "img_" in str(error)
    assert reads == [1]
