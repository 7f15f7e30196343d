"""Flickr8k / Flickr30k as they are downloaded (tests/flickrfiles.py): every layout read right, its defects named,
and through the entry points a user runs — src/train.py with the shipped data=flickr8k / data=flickr30k, eval.py
with the checkpoint alone, caption.py on the image folder."""

from __future__ import annotations

import json
import warnings

import pytest
from flickrfiles import IMAGE_DIR, LAYOUTS, write_flickr

from captioning.data.flickr import FlickrDataModule, read_flickr

from entrypoints import run as run_entry_point

SMALL = ["model.hidden_dim=32", "model.wordvec_dim=16", "encoder.channels=[8,16,32]", "encoder.out_dim=32",
         "data.image_size=32", "trainer.max_epochs=2", "logger=csv", "data.val_images=8", "data.test_images=4",
         "data.min_word_count=1"]


def datamodule(root, **extra):
    arguments = dict(image_size=32, num_workers=0, val_images=8, test_images=4, min_word_count=1, progress=False)
    return FlickrDataModule(str(root), **{**arguments, **extra})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_as_downloaded(tmp_path, layout):
    images = write_flickr(tmp_path / layout, layout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = datamodule(tmp_path / layout)
        dm.prepare_data()
        dm.setup("fit")
    sizes = {s: len(dm.references(s)) for s in ("train", "val", "test")}
    # Karpathy's file decides the split where it is there (24 / 4 / 4 here), else the seeded one (20 / 8 / 4)
    assert sizes == ({"train": 24, "val": 4, "test": 4} if layout == "karpathy8k" else {"train": 20, "val": 8, "test": 4})
    everything = {**dm.references("train"), **dm.references("val"), **dm.references("test")}
    assert len(everything) == len(images) and all(len(c) == 5 for c in everything.values())
    if layout == "kaggle8k":  # the repeated row is named and counted, not kept
        assert any("1 rows repeat an (image, caption) pair" in str(w.message) for w in caught)
        assert any(", on a grey background" in c for refs in everything.values() for c in refs)  # quoted commas
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[1:] == (3, 32, 32)
    # the same files give the same ids and split, every time
    again = datamodule(tmp_path / layout)
    assert again.references("val") == dm.references("val")


def test_the_flickr30k_row_without_its_second_pipe_is_read(tmp_path):
    images = write_flickr(tmp_path, "csv30k")
    read = read_flickr(tmp_path / "results.csv")
    assert read.captions[images[1].name] == images[1].captions  # "<name>| 4 <caption>" keeps its caption
    assert all(len(c) == 5 for c in read.captions.values())


def test_bad_rows_and_missing_files_are_named(tmp_path):
    write_flickr(tmp_path, "token8k")
    token = tmp_path / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    token.write_text("\n".join(lines[:7] + ["1000268201_0000a3c1.jpg#5 no tab here"] + lines[7:]) + "\n")
    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt, line 8: no tab between the image and its caption"):
        read_flickr(token)
    token.write_text("\n".join(lines) + "\n")
    (tmp_path / IMAGE_DIR["token8k"] / sorted(read_flickr(token).captions)[0]).unlink()
    dm = datamodule(tmp_path)
    dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"1 of the \d+ images of the \w+ split .* are missing"):
        dm.setup("fit") or dm.setup("test")
    empty = tmp_path / "empty"
    (empty / "Images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No caption file in .*captions.txt"):
        datamodule(empty).prepare_data()
    with pytest.raises(ValueError, match="leave no training images"):
        datamodule(tmp_path, val_images=30).setup("fit")


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "group"), [("kaggle8k", "flickr8k"), ("csv30k", "flickr30k")])
def test_train_then_eval_then_caption_on_flickr_as_downloaded(tmp_path, layout, group):
    root = tmp_path / layout
    write_flickr(root, layout)
    train_dir = tmp_path / "train"
    run_entry_point("train.py", [f"data={group}", f"data.root={root}", f"paths.log_dir={tmp_path / 'outputs'}",
                                 f"hydra.run.dir={train_dir}", *SMALL])
    report = json.loads((train_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [0, 1] and "test/bleu4" in report["test"]
    # the checkpoint alone: eval.py rebuilds the Flickr data (its layout, its split) from it
    eval_dir = tmp_path / "eval"
    run_entry_point("eval.py", [f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}", "split=test",
                                f"hydra.run.dir={eval_dir}", "meteor=false", "official=false"])
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and set(metrics["fast"]) >= {"bleu4", "cider"}
    caption_dir = tmp_path / "caption"
    run_entry_point("caption.py", [f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
                                   f"images={root / IMAGE_DIR[layout]}", f"hydra.run.dir={caption_dir}"])
    captions = json.loads((caption_dir / "captions.json").read_text())
    assert len(captions) == 32 and all(c["caption"] for c in captions)
