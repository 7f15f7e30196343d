"""A user's own caption folder (data=folder) and Hugging Face datasets (data=hf), shaped as people have them
(tests/folderfiles.py): every layout read right, bad rows named and counted, evaluation-only sets; and through the
entry points a user runs — train.py with the shipped configs, eval.py with the checkpoint alone, caption.py, and
eval.py on a set with no training split."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from folderfiles import FOLDER_LAYOUTS, HF_LAYOUTS, write_folder, write_hf

from captioning.data.folder import FolderDataModule, read_caption_folder
from captioning.data.records import split_count

from cocofiles import make_images, write_coco
from entrypoints import run as run_entry_point

SMALL = ["model.hidden_dim=32", "model.wordvec_dim=16", "encoder.channels=[8,16,32]", "encoder.out_dim=32",
         "data.image_size=32", "trainer.max_epochs=2", "logger=csv", "data.min_word_count=1"]
ARGUMENTS = dict(image_size=32, num_workers=0, min_word_count=1, progress=False)


def folder(root, **extra):
    return FolderDataModule(str(root), **{**ARGUMENTS, **extra})


def hf(path, **extra):
    from captioning.data.hf import HuggingFaceDataModule

    return HuggingFaceDataModule(str(path), **{**ARGUMENTS, **extra})


def read_all(dm):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()
        dm.setup("fit")
    return {s: dm.references(s) for s in ("train", "val", "test")}, [str(w.message) for w in caught]


@pytest.mark.parametrize("layout", FOLDER_LAYOUTS)
def test_every_folder_layout_reads_as_people_make_them(tmp_path, layout):
    images = write_folder(tmp_path / layout, layout)
    splits, messages = read_all(folder(tmp_path / layout))
    # the split column / sub-folders decide (24 / 4 / 4), else the seeded split of 10% / 10% (ceil: 4 / 4)
    assert {s: len(refs) for s, refs in splits.items()} == {"train": 24, "val": 4, "test": 4}
    found = sorted(sorted(refs) for s in splits for refs in splits[s].values())
    assert found == sorted(sorted(image.captions) for image in images)  # every caption, grouped by image
    if layout != "jsonl_lists":  # the layout's own split, not a drawn one
        by_captions = {tuple(sorted(image.captions)): image.split for image in images}
        assert all(by_captions[tuple(sorted(refs))] == s for s in splits for refs in splits[s].values())
    if layout == "csv_rows":  # the repeated row and the empty caption are named and counted
        assert any("1 rows repeat an (image, caption) pair" in m for m in messages)
        assert any("dropped 1 empty or punctuation-only captions" in m for m in messages)
    dm = folder(tmp_path / layout)
    assert read_all(dm)[0] == splits  # the same files give the same ids and splits
    assert next(iter(dm.train_dataloader()))["images"].shape[1:] == (3, 32, 32)


def test_the_seeded_split_takes_counts_or_fractions(tmp_path):
    write_folder(tmp_path, "jsonl_lists")
    splits, _ = read_all(folder(tmp_path, val_size=6, test_size=0.25, split_seed=3))
    assert {s: len(r) for s, r in splits.items()} == {"train": 18, "val": 6, "test": 8}
    assert split_count(0.1, 32, "val_size") == 4 and split_count(0, 32, "val_size") == 0
    with pytest.raises(ValueError, match=r"data.val_size=1.5 is a fraction >= 1"):
        split_count(1.5, 32, "val_size")
    with pytest.raises(ValueError, match="leave no training images"):
        read_all(folder(tmp_path, val_size=20, test_size=12))


def test_bad_rows_are_named_with_their_file_and_line(tmp_path):
    images = write_folder(tmp_path, "jsonl_lists")
    path = tmp_path / "captions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], "{not json", *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl, line 4: not a JSON object"):
        read_caption_folder(tmp_path)
    path.write_text("\n".join([*lines[:3], json.dumps({"file_name": images[0].file, "captions": 7})]) + "\n")
    with pytest.raises(ValueError, match=r"line 4: the caption is 7, not a string or a list"):
        read_caption_folder(tmp_path)
    path.write_text(json.dumps({"picture": "a.jpg", "captions": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"no image column: expected one of file_name, .*its columns are picture, "
                                         r"captions\); name it with data.image_column"):
        read_caption_folder(tmp_path)
    assert len(read_caption_folder(tmp_path, image_column="picture")) == 1
    # the same image in two splits
    path.write_text("\n".join(json.dumps({"file_name": images[0].file, "text": "a", "split": s}) for s in ("train", "test")))
    with pytest.raises(ValueError, match=r"line 2: image photos/2020/img_000.jpg is listed in the train split and "
                                         r"again in the test one"):
        read_caption_folder(tmp_path)
    path.write_text(json.dumps({"file_name": images[0].file, "text": "a", "split": "holdout"}))
    with pytest.raises(ValueError, match=r"line 1: split 'holdout' is not one of train"):
        read_caption_folder(tmp_path)
    path.write_text("\n".join(lines) + "\n")
    # a file moved into another sub-folder is found by its unique name; a missing one is named at setup
    moved = tmp_path / "elsewhere" / "img_001.jpg"
    moved.parent.mkdir()
    os.replace(tmp_path / images[1].file, moved)
    (tmp_path / images[2].file).unlink()
    table = read_caption_folder(tmp_path)
    assert table.files[1] == str(moved)
    dm = folder(tmp_path)
    dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"1 of the \d+ images of the \w+ split listed in .*captions.jsonl are "
                                                r"missing, e\.g\.\n  .*img_002\.jpg"):
        dm.setup("fit") or dm.setup("test")
    (tmp_path / "photos" / "copy").mkdir()
    (tmp_path / "photos" / "copy" / "img_002.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere" / "img_002.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"'photos/2022/img_002.jpg' is not there and 2 files under .* have its name"):
        read_caption_folder(tmp_path)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"No captions file in .*nothing: expected one of captions.csv"):
        folder(empty).prepare_data()


def test_an_evaluation_only_folder_has_val_and_test_and_no_training_split(tmp_path):
    write_folder(tmp_path, "csv_rows", splits=("val",))
    with pytest.raises(ValueError, match=r"captions.csv has no train images \(its splits: val\); eval.py scores such "
                                         "a set with the checkpoint's vocabulary"):
        folder(tmp_path).prepare_data()
    with pytest.raises(ValueError, match=r"has no test images \(its splits: val\); give it one"):
        folder(tmp_path).references("test")
    write_folder(tmp_path / "all", "jsonl_lists")
    dm = folder(tmp_path / "all", eval_only=True)
    assert len(dm.references("val")) == len(dm.references("test")) == 32 and not dm.has_split("train")


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_every_hugging_face_layout_reads(tmp_path, layout):
    images = write_hf(tmp_path / layout, layout)
    extra = {"image_column": "img", "caption_column": [f"caption_{n}" for n in range(5)],
             "split_column": "split"} if layout == "split_column" else {"caption_column": "text"} \
        if layout == "parquet_hub" else {}
    path = tmp_path / layout
    splits, _ = read_all(hf(path, **extra))
    assert {s: len(refs) for s, refs in splits.items()} == {"train": 24, "val": 4, "test": 4}
    expected = {s: sorted(sorted(i.captions) for i in images if i.split == s) for s in splits}
    # one caption per row (parquet_hub): the rows of one image are one image with its five captions
    assert {s: sorted(sorted(r) for r in refs.values()) for s, refs in splits.items()} == expected
    manifest = path / "images" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    again = hf(path, **extra)
    assert read_all(again)[0] == splits and manifest.stat().st_mtime_ns == written  # the second start reads it
    assert next(iter(again.train_dataloader()))["images"].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet_hub"])
def test_hugging_face_images_are_read_where_the_dataset_keeps_them(tmp_path, layout):
    import datasets
    from PIL import Image

    from captioning.data.annotations import missing_images
    from captioning.data.arrow_rows import arrow_file
    from captioning.data.images import load_image

    write_hf(tmp_path / "d", layout)
    dm = hf(tmp_path / "d", **({"caption_column": "text"} if layout == "parquet_hub" else {}))
    read_all(dm)
    train = dm._load_split("train")
    assert sorted(p.name for p in (tmp_path / "d" / "images").iterdir()) == [".lock", "manifest.json"]  # nothing copied
    first = str(train.image_paths[0])
    assert first.endswith(".arrow#image=0") and os.path.isfile(arrow_file(first))
    # the pixels of a row are those of the dataset's own image in that row (rows of one caption each for parquet_hub)
    rows = datasets.Dataset.from_file(arrow_file(first)).cast_column("image", datasets.Image(decode=False))
    for path in train.image_paths[[0, 3, -1]]:
        row = int(str(path).rsplit("=", 1)[1])
        with Image.open(io.BytesIO(rows[row]["image"]["bytes"])) as expected:
            assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(expected.convert("RGB")))
    assert not missing_images(train.image_paths)
    assert next(iter(dm.train_dataloader()))["images"].shape[1:] == (3, 32, 32)
    # image_size=auto measures the rows' own images (their headers), as it does files
    from captioning.data.transforms import auto_image_size

    sides = sorted(max(load_image(str(p)).size) for p in train.image_paths)
    size, why = auto_image_size(train.image_paths, stride=8)
    assert f"median longer side {int(np.median(sides))} px of {len(sides)} sampled" in why and size % 8 == 0
    # the Arrow file gone: every row of it is missing, and a read names the file
    moved = arrow_file(first) + ".moved"
    os.replace(arrow_file(first), moved)
    assert missing_images(train.image_paths) == [str(p) for p in train.image_paths]
    with pytest.raises(FileNotFoundError, match=r"the Arrow file .*\.arrow is gone"):
        load_image(first)
    os.replace(moved, arrow_file(first))
    with pytest.raises(ValueError, match=r"row 100000 is past the end of"):
        load_image(first.replace("=0", "=100000"))


def test_a_hugging_face_dataset_in_several_arrow_shards_names_each_row_in_its_own(tmp_path):
    import datasets
    from PIL import Image

    from captioning.data.arrow_rows import arrow_file
    from captioning.data.images import load_image

    write_hf(tmp_path / "d", "save_to_disk")
    train = datasets.load_from_disk(str(tmp_path / "d"))["train"]
    train.save_to_disk(str(tmp_path / "sharded"), num_shards=3)  # a big set's layout: 24 rows in files of 8
    dm = hf(tmp_path / "sharded", val_size=4, test_size=4)
    read_all(dm)
    paths = [str(p) for role in ("train", "val", "test") for p in dm._load_split(role).image_paths]
    assert len({arrow_file(p) for p in paths}) == 3 and len(paths) == 24
    rows = train.cast_column("image", datasets.Image(decode=False))
    for path in paths:  # row r of shard k is row 8 k + r of the dataset
        shard = int(Path(arrow_file(path)).name.split("-")[1])
        row = 8 * shard + int(path.rsplit("=", 1)[1])
        with Image.open(io.BytesIO(rows[row]["image"]["bytes"])) as expected:
            assert np.array_equal(np.asarray(load_image(path)), np.asarray(expected.convert("RGB")))


def test_a_hugging_face_dataset_held_in_memory_has_its_images_written_once(tmp_path, monkeypatch):
    import datasets

    from captioning.data import hf as hf_module

    write_hf(tmp_path / "d", "save_to_disk")
    on_disk = datasets.load_from_disk(str(tmp_path / "d"))
    in_memory = {name: datasets.Dataset.from_dict(ds.to_dict(), features=ds.features) for name, ds in on_disk.items()}
    assert not in_memory["train"].cache_files
    monkeypatch.setattr(hf_module, "load_hf_dataset", lambda path: in_memory)
    dm = hf(tmp_path / "d")
    splits, _ = read_all(dm)
    written = sorted((tmp_path / "d" / "images" / "train").iterdir())
    assert len(written) == 24 and all(p.suffix == ".png" for p in written)
    assert sorted(map(str, dm._load_split("train").image_paths)) == sorted(map(str, written))
    assert next(iter(dm.train_dataloader()))["images"].shape[1:] == (3, 32, 32)


def test_a_file_name_that_looks_like_an_arrow_row_is_a_file(tmp_path):
    from captioning.data.arrow_rows import arrow_file, image_source

    plain = tmp_path / "photo#1.jpg"
    assert arrow_file(str(plain)) == str(plain) and image_source(str(plain)) == str(plain)
    assert arrow_file(f"{tmp_path}/x.arrow#image=7") == f"{tmp_path}/x.arrow"


def test_hugging_face_problems_are_named(tmp_path):
    import datasets

    write_hf(tmp_path / "d", "save_to_disk")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are image, caption"):
        read_all(hf(tmp_path / "d", caption_column="text"))
    with pytest.raises(ValueError, match=r"data.val_split='dev': the dataset at .* has the splits train, validation, "
                                         "test"):
        read_all(hf(tmp_path / "d", val_split="dev"))
    with pytest.raises(ValueError, match=r"data.path='.*nowhere' could not be read as a Hugging Face dataset"):
        read_all(hf(tmp_path / "nowhere"))
    rows = datasets.Dataset.from_dict({"image": [None, *datasets.load_from_disk(str(tmp_path / "d"))["train"]["image"]],
                                       "caption": [["lost"]] + [["a picture"]] * 24})
    rows.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "holes"))
    splits, messages = read_all(hf(tmp_path / "holes", val_size=4, test_size=4))
    assert any("1 rows have no image and are left out (e.g. rows[0])" in m for m in messages)
    assert sum(len(r) for r in splits.values()) == 24


@pytest.mark.slow
def test_train_eval_caption_on_a_folder_then_evaluate_sets_with_no_training_split(tmp_path):
    root = tmp_path / "mine"
    write_folder(root, "imagefolder_splits")
    train_dir = tmp_path / "train"
    run_entry_point("train.py", ["data=folder", f"data.root={root}", f"paths.log_dir={tmp_path / 'outputs'}",
                                 f"hydra.run.dir={train_dir}", *SMALL])
    report = json.loads((train_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [0, 1] and "test/bleu4" in report["test"]
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    eval_dir = tmp_path / "eval"  # the checkpoint alone rebuilds the folder data
    run_entry_point("eval.py", [f"ckpt_path={ckpt}", "split=test", f"hydra.run.dir={eval_dir}", "official=false"])
    assert json.loads((eval_dir / "metrics.json").read_text())["num_images"] == 4
    run_entry_point("caption.py", [f"ckpt_path={ckpt}", f"images={root / 'test' / 'shots'}", f"hydra.run.dir={tmp_path / 'c'}"])
    assert len(json.loads((tmp_path / "c" / "captions.json").read_text())) == 4
    # a set to evaluate on only, of another kind than the training data: images + references, no training split
    other = tmp_path / "nocaps-like"
    write_folder(other, "csv_rows", splits=("val",))
    only_dir = tmp_path / "eval-only"
    run_entry_point("eval.py", [f"ckpt_path={ckpt}", "data=folder", f"data.root={other}", "split=val",
                                f"hydra.run.dir={only_dir}", "official=false"])
    metrics = json.loads((only_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and set(metrics["fast"]) >= {"bleu4", "cider"}
    assert not list(other.glob("vocab*.json"))  # the checkpoint's vocabulary: none built from its captions
    # a COCO-format set with only validation captions (nocaps is shipped so), with its instances: CHAIR too
    coco = tmp_path / "coco-val-only"
    write_coco(coco, images=make_images(num_train=0, num_val=6))
    (coco / "annotations" / "captions_train2017.json").unlink()
    coco_dir = tmp_path / "eval-coco"
    run_entry_point("eval.py", [f"ckpt_path={ckpt}", "data=coco", f"data.root={coco}", "split=val",
                                f"hydra.run.dir={coco_dir}", "official=false"])
    metrics = json.loads((coco_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and "chair_i" in metrics["grounding"]


@pytest.mark.slow
def test_train_eval_caption_on_a_hugging_face_dataset(tmp_path):
    path = tmp_path / "hub"
    write_hf(path, "parquet_hub")
    train_dir = tmp_path / "train"
    run_entry_point("train.py", ["data=hf", f"data.path={path}", "data.caption_column=text",
                                 f"paths.log_dir={tmp_path / 'outputs'}", f"hydra.run.dir={train_dir}", *SMALL])
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    eval_dir = tmp_path / "eval"
    run_entry_point("eval.py", [f"ckpt_path={ckpt}", "split=test", f"hydra.run.dir={eval_dir}", "official=false"])
    assert json.loads((eval_dir / "metrics.json").read_text())["num_images"] == 4
    import datasets  # the images of the test split as a user's own photos: the set keeps them in its Arrow files

    photos = tmp_path / "photos"
    photos.mkdir()
    test = datasets.load_dataset(str(path), split="test").cast_column("image", datasets.Image(decode=False))
    for k, data in enumerate(dict.fromkeys(cell["bytes"] for cell in test["image"])):
        (photos / f"{k}.png").write_bytes(data)
    run_entry_point("caption.py", [f"ckpt_path={ckpt}", f"images={photos}", f"hydra.run.dir={tmp_path / 'c'}"])
    assert len(json.loads((tmp_path / "c" / "captions.json").read_text())) == 4
