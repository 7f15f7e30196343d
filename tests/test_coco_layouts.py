"""COCO as it is downloaded — the 2017 layout (no test captions), the 2014 layout and Karpathy's splits —
through the entry points a user runs: src/train.py with the shipped data config (``test: true``), then
src/eval.py with the checkpoint alone, then src/caption.py on the images. The trees are shaped like the real
files (tests/cocofiles.py): COCO's fields, 5-7 captions as people typed them, greyscale and CMYK JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cocofiles import check_modes, write_coco
from entrypoints import run as run_entry_point

REPO = Path(__file__).resolve().parents[1]
# only what makes the run small: the data config's own values (splits, year, test: true, workers...) stay
SMALL = ["model.hidden_dim=32", "model.wordvec_dim=16", "encoder.channels=[8,16,32]", "encoder.out_dim=32",
         "data.image_size=32", "trainer.max_epochs=2", "logger=csv"]


def run(script: str, *overrides: str):
    return run_entry_point(script, list(overrides))


LAYOUTS = {
    # layout: (files, data group overrides, the split eval.py scores, is there a test split)
    "2017": ("2017", ["data=coco"], "val", False),
    "2014": ("2014", ["data=coco", "data.year=2014"], "val", False),
    "karpathy": ("2014", ["data=coco_karpathy"], "test", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_then_eval_then_caption_on_coco_as_downloaded(tmp_path, layout):
    files, data, split, has_test = LAYOUTS[layout]
    root = tmp_path / "coco"
    images = write_coco(root, files, karpathy=layout == "karpathy")
    assert {"L", "CMYK", "RGB"} <= check_modes(root)  # as in COCO

    train_dir = tmp_path / "train"
    proc = run("train.py", *data, f"data.root={root}", f"paths.log_dir={tmp_path / 'outputs'}",
               f"hydra.run.dir={train_dir}", *SMALL)
    out = proc.stdout + proc.stderr
    checkpoints = {p.name for p in (train_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("epoch") for name in checkpoints)
    report = json.loads((train_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [0, 1]
    if has_test:
        assert "test/bleu4" in report["test"]
    else:
        assert "test" not in report
        notices = [line for line in out.splitlines() if "no test split" in line]
        assert len(notices) == 1, out[-3000:]
    # the instance annotations beside the captions: CHAIR hallucination rates every validation
    assert 0.0 <= report["final"]["val/grounding/chair_i"] <= 1.0 and "val/grounding/mentions" in report["final"]

    # the checkpoint alone is enough: eval.py takes the data group (coco) and its values from it
    eval_dir = tmp_path / "eval"
    run("eval.py", f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}", f"split={split}",
        f"hydra.run.dir={eval_dir}", "meteor=false")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    wanted = [i for i in images if (i.karpathy_split if layout == "karpathy" else i.split) == split]
    assert metrics["num_images"] == len(wanted)
    assert set(metrics["fast"]) >= {"bleu4", "cider"} and set(metrics["official"]) >= {"bleu4", "cider"}
    assert set(metrics["grounding"]) >= {"chair_i", "chair_s", "recall"}
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == sorted(i.image_id for i in wanted)

    # caption.py on the image files, greyscale and CMYK ones among them
    folder = root / f"val{files}"
    caption_dir = tmp_path / "caption"
    run("caption.py", f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}", f"images={folder}",
        f"hydra.run.dir={caption_dir}")
    captions = json.loads((caption_dir / "captions.json").read_text())
    assert len(captions) == len(list(folder.glob("*.jpg"))) and all(c["caption"] for c in captions)


@pytest.mark.slow
def test_the_checkpoint_decides_the_data_but_the_command_line_wins(tmp_path):
    """eval.py ckpt_path=<a data=coco checkpoint> data.root=<the data elsewhere> (the tree moved)."""
    root = tmp_path / "coco"
    write_coco(root, "2017")
    train_dir = tmp_path / "train"
    run("train.py", "data=coco", f"data.root={root}", f"paths.log_dir={tmp_path / 'outputs'}",
        f"hydra.run.dir={train_dir}", *SMALL, "trainer.max_epochs=1")
    moved = tmp_path / "moved"
    root.rename(moved)
    eval_dir = tmp_path / "eval"
    run("eval.py", f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}", f"data.root={moved}",
        f"hydra.run.dir={eval_dir}", "official=false")
    saved = (eval_dir / "config.yaml").read_text()
    assert "CocoCaptionsDataModule" in saved and str(moved) in saved


def test_small_images_with_the_shipped_defaults_keep_their_size(tmp_path):
    """data=coco with no image size on a set of 64 px images (a user's own small set): trained at 64 px, not
    upscaled to 224 (which ran at 11-15 images/s on a 2-core CPU); the size is printed with the reason and
    recorded in the checkpoint, so eval.py and caption.py read images at 64 px too."""
    root = tmp_path / "coco"
    write_coco(root, "2017")
    train_dir = tmp_path / "train"
    proc = run("train.py", "data=coco", f"data.root={root}", f"paths.log_dir={tmp_path / 'outputs'}",
               f"hydra.run.dir={train_dir}", "model.hidden_dim=32", "model.wordvec_dim=16", "trainer.max_epochs=1",
               "logger=csv", "callbacks.progress_bar=null", "data.num_workers=0", "test=false")
    assert "data.image_size=auto: 64 px, the training images' own size" in proc.stdout + proc.stderr
    checkpoint = torch.load(train_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["image_size"] == 64
    assert "pin_memory" not in proc.stderr  # no pinned-memory warning on a CPU
    caption_dir = tmp_path / "caption"
    run("caption.py", f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}", f"images={root / 'val2017'}",
        f"hydra.run.dir={caption_dir}")
    assert json.loads((caption_dir / "captions.json").read_text())
