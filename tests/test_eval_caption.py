"""eval.py and caption.py end to end on tiny checkpoints of the built-in data set, plus their helpers.

A tiny checkpoint is trained once per session by running src/train.py in a subprocess (about 15 s).
Only the eval smoke test uses it by default; the rest of the end-to-end tests are marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from captioning.module import load_checkpoint
from captioning.visualize import attention_overlay, heat_colors

from entrypoints import run

HAS_JAVA = shutil.which("java") is not None
NUM_VAL, NUM_TEST = 16, 15  # an odd test split: two DDP processes get a padded, repeated image
TINY_TRAIN = [
    "data.num_train=64", f"data.num_val={NUM_VAL}", f"data.num_test={NUM_TEST}", "data.image_size=32",
    "data.num_workers=0", "data.persistent_workers=false", "data.progress=false", "model.hidden_dim=32",
    "model.wordvec_dim=16", "encoder.channels=[8,16,32]", "encoder.out_dim=32", "trainer.max_epochs=1",
    "trainer.accelerator=cpu", "logger=csv", "test=false",
]
# loader settings only: the data set's parameters come from the checkpoint
FAST_DATA = ["data.num_workers=0", "data.persistent_workers=false", "data.batch_size=6"]


def run_script(script: str, *overrides: str, check: bool = True):
    return run(script, list(overrides), check)


def train_tiny(root: Path, data_root: Path, model: str) -> Path:
    run_dir = root / f"train_{model}"
    run_script("train.py", f"model={model}", f"data.root={data_root}", f"paths.log_dir={root / 'outputs'}",
               f"hydra.run.dir={run_dir}", *TINY_TRAIN)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_caption")


@pytest.fixture(scope="session")
def lstm_ckpt(tiny_runs) -> Path:
    return train_tiny(tiny_runs, tiny_runs / "shapes", "lstm")


@pytest.fixture(scope="session")
def attention_ckpt(tiny_runs, lstm_ckpt) -> Path:  # after lstm_ckpt: the shapes set is drawn once
    return train_tiny(tiny_runs, tiny_runs / "shapes", "attention")


def split_ids(data_root: Path, split: str) -> list[int]:
    data = json.loads((data_root / "annotations" / f"captions_{split}2017.json").read_text())
    return sorted(image["id"] for image in data["images"])


def evaluate(run_dir: Path, ckpt: Path, *overrides: str) -> tuple[list[dict], dict]:
    run_script("eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", *FAST_DATA, *overrides)
    return (json.loads((run_dir / "predictions.json").read_text()),
            json.loads((run_dir / "metrics.json").read_text()))


def check_predictions(predictions: list[dict], image_ids: list[int]) -> None:
    """COCO results format, each image of the split exactly once."""
    assert isinstance(predictions, list)
    for entry in predictions:
        assert set(entry) == {"image_id", "caption"}
        assert isinstance(entry["image_id"], int) and isinstance(entry["caption"], str)
    assert sorted(e["image_id"] for e in predictions) == image_ids


# ------------------------------------------------------------------------------------------ eval.py
def test_eval_val_greedy_smoke(tiny_runs, lstm_ckpt):
    """The default run: greedy on val; fast metrics agree with the official evaluation on the same captions."""
    official = [] if HAS_JAVA else ["official=false"]
    predictions, metrics = evaluate(tiny_runs / "eval_val", lstm_ckpt, *official)
    check_predictions(predictions, split_ids(tiny_runs / "shapes", "val"))
    assert metrics["split"] == "val" and metrics["num_images"] == NUM_VAL
    assert metrics["decoding"]["strategy"] == "greedy"
    assert metrics["checkpoint"] == str(lstm_ckpt)
    assert set(metrics["fast"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "distinct"}
    assert metrics["seconds"]["decode_and_fast_metrics"] > 0
    if HAS_JAVA:
        assert set(metrics["official"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
        for k in range(1, 5):
            assert metrics["fast"][f"bleu{k}"] == pytest.approx(metrics["official"][f"bleu{k}"], abs=1e-4)
        assert metrics["fast"]["cider"] == pytest.approx(metrics["official"]["cider"], abs=1e-3)
        assert metrics["seconds"]["official_metrics"] > 0


@pytest.mark.slow
def test_eval_test_split_beam3(tiny_runs, lstm_ckpt):
    predictions, metrics = evaluate(tiny_runs / "eval_test_beam3", lstm_ckpt, "split=test",
                                    "decoding=beam", "meteor=false")
    check_predictions(predictions, split_ids(tiny_runs / "shapes", "test"))
    assert metrics["split"] == "test" and metrics["decoding"]["beam_size"] == 3
    if HAS_JAVA:
        assert metrics["fast"]["bleu4"] == pytest.approx(metrics["official"]["bleu4"], abs=1e-4)
        assert metrics["fast"]["cider"] == pytest.approx(metrics["official"]["cider"], abs=1e-3)


@pytest.mark.slow
def test_eval_ddp_equals_one_process(tiny_runs, lstm_ckpt):
    """Two DDP processes on the odd-sized test split: the sampler repeats an image, the results must not."""
    common = ("split=test", "meteor=false", "data.batch_size=4")
    one, one_metrics = evaluate(tiny_runs / "eval_1proc", lstm_ckpt, *common)
    two, two_metrics = evaluate(tiny_runs / "eval_ddp", lstm_ckpt, *common, "trainer.devices=2",
                                "trainer.accelerator=cpu", "trainer.strategy=ddp")
    assert two_metrics["devices"] == 2 and one_metrics["devices"] == 1
    assert two == one
    check_predictions(two, split_ids(tiny_runs / "shapes", "test"))
    assert two_metrics["fast"] == pytest.approx(one_metrics["fast"], abs=1e-12)
    assert two_metrics["official"] == one_metrics["official"]


@pytest.mark.slow
def test_eval_bad_ckpt_path_names_it(tiny_runs):
    missing = tiny_runs / "no_such.ckpt"
    result = run_script("eval.py", f"ckpt_path={missing}", f"hydra.run.dir={tiny_runs / 'bad'}", check=False)
    assert result.returncode != 0
    assert str(missing) in result.stderr + result.stdout
    assert "no such checkpoint" in (result.stderr + result.stdout).lower()


def test_an_ensemble_with_another_vocabulary_fails_naming_both_files(tiny_runs, lstm_ckpt):
    """Same model, two words of its vocabulary swapped: averaging by word id would mix them up."""
    from captioning.module import load_ensemble

    checkpoint = torch.load(lstm_ckpt, map_location="cpu", weights_only=False)
    words = checkpoint["hyper_parameters"]["vocab"]
    words[4], words[5] = words[5], words[4]
    other = tiny_runs / "swapped_vocab.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(ValueError) as error:
        load_ensemble([lstm_ckpt, other])
    message = str(error.value)
    assert str(lstm_ckpt) in message and str(other) in message and "vocabularies differ" in message
    assert f"id 4 is {words[4]!r}" in message
    alone, _ = load_ensemble([lstm_ckpt])  # an ensemble of one is the checkpoint itself
    assert len(alone.members) == 0


def test_averaged_checkpoint_holds_the_mean_weights_and_loads(tiny_runs, lstm_ckpt):
    from captioning.checkpointing import average_checkpoints

    checkpoint = torch.load(lstm_ckpt, map_location="cpu", weights_only=False)
    shifted = {k: v + 1.0 if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    other = tiny_runs / "shifted.ckpt"
    torch.save({**checkpoint, "state_dict": shifted}, other)
    target = average_checkpoints([lstm_ckpt, other], tiny_runs / "averaged" / "avg.ckpt")
    module, data = load_checkpoint(target)
    for name, value in module.state_dict().items():
        original = checkpoint["state_dict"][name]
        expected = original + 0.5 if original.is_floating_point() else original
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert data["image_size"] == 32 and "optimizer_states" not in torch.load(target, weights_only=True)
    words = checkpoint["hyper_parameters"]["vocab"]
    renamed = tiny_runs / "renamed.ckpt"
    torch.save({**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "vocab": words[::-1]}}, renamed)
    with pytest.raises(ValueError, match="vocabularies differ") as error:
        average_checkpoints([lstm_ckpt, renamed], tiny_runs / "bad.ckpt")
    assert str(lstm_ckpt) in str(error.value) and str(renamed) in str(error.value)


@pytest.mark.slow
def test_eval_ensemble_diverse_nbest_and_seeded_sampling_under_ddp_equal_one_process(tiny_runs, lstm_ckpt,
                                                                                       attention_ckpt):
    """An ensemble of the LSTM and the attention model, decoded with diverse beams, an n-best list and trigram
    blocking, and seeded nucleus sampling with n-best lists: 2 DDP processes give what one gives, and nbest.json
    is every image's list, best first, its first the prediction."""
    common = ("split=test", "official=false", "data.batch_size=4")
    pair = f"ckpt_path=[{lstm_ckpt},{attention_ckpt}]"
    ddp = ("trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp")
    for name, decoding in (("diverse", ("decoding=diverse_beam", "decoding.n_best=4", "decoding.block_ngrams=3",
                                        "decoding.length_penalty=0")),
                           ("nucleus", ("decoding=sample", "decoding.seed=0", "decoding.top_p=0.9",
                                        "decoding.n_best=3", "decoding.bad_endings=true"))):
        outputs = {}
        for procs, extra in ((1, ()), (2, ddp)):
            run_dir = tiny_runs / f"eval_{name}_{procs}"
            run_script("eval.py", pair, f"hydra.run.dir={run_dir}", *FAST_DATA, *common, *decoding, *extra)
            outputs[procs] = [json.loads((run_dir / f).read_text()) for f in ("predictions.json", "nbest.json",
                                                                               "metrics.json")]
        (one, one_nbest, one_metrics), (two, two_nbest, two_metrics) = outputs[1], outputs[2]
        assert two_metrics["devices"] == 2 and one_metrics["checkpoint"] == [str(lstm_ckpt), str(attention_ckpt)]
        assert two == one and two_nbest == one_nbest, name
        assert two_metrics["fast"] == pytest.approx(one_metrics["fast"], abs=1e-12)
        check_predictions(one, split_ids(tiny_runs / "shapes", "test"))
        assert [e["image_id"] for e in one_nbest] == [e["image_id"] for e in one]
        for entry, prediction in zip(one_nbest, one, strict=True):
            scores = [c["log_prob"] for c in entry["captions"]]
            assert scores == sorted(scores, reverse=True) and entry["captions"][0]["caption"] == prediction["caption"]
            assert len(entry["captions"]) <= (4 if name == "diverse" else 3)


# ------------------------------------------------------------------------------------------ caption.py
@pytest.fixture(scope="session")
def image_folder(tiny_runs, lstm_ckpt) -> Path:
    """Three images of the tiny set, one file with an image name but no image, one text file."""
    folder = tiny_runs / "photos"
    folder.mkdir()
    for path in sorted((tiny_runs / "shapes" / "val2017").glob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def caption(run_dir: Path, ckpt: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    result = run_script("caption.py", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", *overrides)
    return result, json.loads((run_dir / "captions.json").read_text())


@pytest.mark.slow
def test_caption_folder_skips_broken_file(tiny_runs, lstm_ckpt, image_folder):
    result, captions = caption(tiny_runs / "caption_lstm", lstm_ckpt, f"images={image_folder}",
                               "attention_maps=true")
    good = sorted(str(p) for p in image_folder.glob("0*.jpg"))
    assert [c["file"] for c in captions] == good
    for entry in captions:
        assert set(entry) == {"file", "caption", "log_prob"}
        assert entry["caption"] and entry["log_prob"] <= 0
    # stdout holds exactly the "<file>\t<caption>" lines; warnings go to stderr and name the files
    assert result.stdout.splitlines() == [f"{c['file']}\t{c['caption']}" for c in captions]
    assert "broken.jpg" in result.stderr and "notes.txt" in result.stderr
    assert "without attention" in result.stderr  # attention_maps on an LSTM: said, not silently ignored
    assert not (tiny_runs / "caption_lstm" / "attention").exists()


@pytest.mark.slow
def test_caption_beam_never_less_likely_than_greedy(tiny_runs, lstm_ckpt, image_folder):
    files = sorted(str(p) for p in image_folder.glob("0*.jpg"))
    listed = "images=[" + ",".join(files) + "]"
    _, greedy = caption(tiny_runs / "caption_greedy", lstm_ckpt, listed)
    _, beam = caption(tiny_runs / "caption_beam", lstm_ckpt, listed, "decoding=beam", "decoding.length_penalty=0")
    assert [c["file"] for c in greedy] == [c["file"] for c in beam] == files
    for g, b in zip(greedy, beam, strict=True):
        assert b["log_prob"] >= g["log_prob"] - 1e-4


@pytest.mark.slow
def test_caption_nbest_and_ensemble(tiny_runs, lstm_ckpt, attention_ckpt, image_folder):
    files = sorted(str(p) for p in image_folder.glob("0*.jpg"))
    listed = "images=[" + ",".join(files) + "]"
    result, captions = caption(tiny_runs / "caption_nbest", lstm_ckpt, listed, "decoding=beam",
                               "decoding.beam_size=4", "decoding.n_best=3", "decoding.length_penalty=0")
    for entry in captions:
        assert [c["caption"] for c in entry["nbest"]][0] == entry["caption"] and len(entry["nbest"]) == 3
        assert entry["nbest"][0]["log_prob"] == pytest.approx(entry["log_prob"])
    assert result.stdout.splitlines() == [f"{c['file']}\t{c['caption']}" for c in captions]  # the first only
    pair = f"[{lstm_ckpt},{attention_ckpt}]"
    result, together = caption(tiny_runs / "caption_ensemble", pair, listed, "attention_maps=true")
    assert [c["file"] for c in together] == files and all(c["caption"] for c in together)
    assert "an ensemble of 2" in result.stderr


@pytest.mark.slow
def test_caption_attention_maps(tiny_runs, attention_ckpt, image_folder):
    run_dir = tiny_runs / "caption_attention"
    _, captions = caption(run_dir, attention_ckpt, f"images={image_folder}", "attention_maps=true")
    assert len(captions) == 3
    pngs = sorted((run_dir / "attention").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(Path(c["file"]).stem for c in captions)
    for png, entry in zip(pngs, sorted(captions, key=lambda c: c["file"]), strict=True):
        with Image.open(png) as image:
            width, height = image.size
        tiles = len(entry["caption"].split()) + 2  # the image, the words, maybe <END>
        assert 160 <= width <= 5 * 170  # at most 5 tiles of 160 px (+ padding) per row
        assert 160 <= height <= (tiles // 5 + 1) * 200


@pytest.mark.slow
def test_caption_nothing_readable_fails(tiny_runs, lstm_ckpt, image_folder):
    result = run_script("caption.py", f"ckpt_path={lstm_ckpt}", f"images={image_folder / 'broken.jpg'}",
                        f"hydra.run.dir={tiny_runs / 'caption_none'}", check=False)
    assert result.returncode != 0
    assert "broken.jpg" in result.stderr and "None of the 1 file(s)" in result.stderr


# ------------------------------------------------------------------------------------------ helpers
def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt.*could not be read"):
        load_checkpoint(text)
    other = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="weights.ckpt is not a checkpoint of a trained CaptioningModule"):
        load_checkpoint(other)


def test_merge_data_config_takes_checkpoint_values_except_explicit_and_loader_keys():
    from captioning.evaluation import merge_data_config as merge
    data = OmegaConf.create({"_target_": "captioning.data.shapes.ShapesDataModule", "root": "data/shapes",
                             "num_train": 4000, "num_val": 500, "num_test": 500, "image_size": 64, "seed": 0,
                             "batch_size": 64, "num_workers": 2})
    OmegaConf.set_struct(data, True)
    saved = {"root": "/x/shapes", "num_train": 64, "num_val": 16, "num_test": 15, "image_size": 32, "seed": 3,
             "max_length": 12, "min_word_count": 1, "vocab_path": None, "batch_size": 8, "num_workers": 0,
             "pin_memory": False, "persistent_workers": False, "augment": False, "progress": False,
             "year": "2017", "train_split": "train"}
    taken = merge(data, saved, explicit={"seed"}, group="shapes")
    assert data.root == "/x/shapes" and data.num_val == 16 and data.image_size == 32 and data.max_length == 12
    assert data.seed == 0  # given on the command line: kept
    assert data.batch_size == 64 and data.num_workers == 2  # loader settings: the eval config's
    assert "seed" not in taken and "batch_size" not in taken and "year" not in taken  # not a ShapesDataModule arg

    coco_saved = {k: v for k, v in saved.items() if k not in ("num_train", "num_val", "num_test", "seed")}
    with pytest.raises(ValueError, match=r"data=shapes.*num_train"):
        merge(data, coco_saved, explicit=set(), group="shapes")


def test_collect_images(tmp_path, caplog):
    from captioning.inference import collect_images as collect
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "c.txt", ".hidden.png"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.jpg"
    single.write_bytes(b"x")
    assert collect(str(folder)) == [folder / "a.JPG", folder / "b.png"]  # sorted, by image suffix
    assert "c.txt" in caplog.text
    assert collect(f"{single},{folder / 'b.png'}") == [single, folder / "b.png"]
    assert collect(OmegaConf.create([str(single), str(folder), str(single)])) == [
        single, folder / "a.JPG", folder / "b.png"]  # duplicates once
    assert collect(str(tmp_path / "nope.jpg")) == []
    assert "nope.jpg" in caplog.text
    with pytest.raises(ValueError, match="images is empty"):
        collect(" , ")


def test_heat_colors_ends_of_the_ramp():
    colors = heat_colors(np.array([[0.0, 1.0, 0.5]]))
    assert colors.dtype == np.uint8 and colors.shape == (1, 3, 3)
    assert colors[0, 0].tolist() == [0, 0, 128]  # dark blue
    assert colors[0, 1].tolist() == [128, 0, 0]  # dark red
    assert colors[0, 2].tolist() == [128, 255, 128]  # between cyan and yellow


def test_attention_overlay_layout_and_where_it_looked():
    image = Image.new("RGB", (64, 32), (128, 128, 128))  # wide: tiles keep the aspect ratio
    weights = torch.zeros(4, 2, 2)
    weights[0, 0, 0] = 1.0  # word 0 looked top left
    weights[1, 1, 1] = 1.0  # word 1 bottom right
    overlay = attention_overlay(image, ["a", "b"], weights, tile_size=80, columns=2, alpha=1.0)
    tile_w, tile_h, pad = 80, 40, 4
    label_h = max(10, 80 // 10) + 8
    assert overlay.size == (2 * (tile_w + pad) + pad, 2 * (tile_h + label_h + pad) + pad)
    pixels = np.asarray(overlay)
    # tiles in rows of two: [image, "a"], ["b"]
    word0 = pixels[pad:pad + tile_h, 2 * pad + tile_w:2 * pad + 2 * tile_w]
    word1 = pixels[tile_h + label_h + 2 * pad:tile_h + label_h + 2 * pad + tile_h, pad:pad + tile_w]
    # with alpha 1 the tile is the heat map: hot (red) where the word looked, cold (blue) elsewhere
    assert word0[2, 2, 0] > 100 and word0[2, 2, 2] < 50
    assert word0[tile_h - 3, tile_w - 3, 2] > 100 and word0[tile_h - 3, tile_w - 3, 0] < 50
    assert word1[tile_h - 3, tile_w - 3, 0] > 100 and word1[2, 2, 2] > 100
    # the plain image tile is the image itself
    assert (pixels[pad:pad + tile_h, pad:pad + tile_w] == 128).all()


def test_attention_overlay_rejects_mismatched_input():
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match=r"3 words but attention weights for only 2 steps"):
        attention_overlay(image, ["a", "b", "c"], torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"weights must be a tensor \(L, h, w\)"):
        attention_overlay(image, ["a"], torch.rand(4, 4))


def test_one_image_pipeline_for_training_evaluation_and_captioning(tmp_path, lstm_ckpt):
    """The same file gives the same tensor in a training batch, in evaluation and in caption.py — odd files
    (transparency, 16-bit, CMYK, greyscale) included, where a plain convert("RGB") would differ."""
    from captioning.data import CocoCaptionsDataModule
    root = tmp_path / "coco"
    folder = root / "val2017"
    folder.mkdir(parents=True)
    rgba = Image.new("RGBA", (40, 30), (200, 30, 30, 0))  # fully transparent red: white in training
    rgba.paste((30, 200, 30, 255), (10, 5, 30, 25))
    rgba.save(folder / "000000000001.png")
    Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).save(folder / "000000000002.png")
    Image.new("CMYK", (36, 28), (10, 200, 30, 0)).save(folder / "000000000003.jpg")
    Image.new("L", (28, 36), 90).save(folder / "000000000004.jpg")
    names = sorted(p.name for p in folder.iterdir())
    (root / "annotations").mkdir()
    coco = {"images": [{"id": k + 1, "file_name": n} for k, n in enumerate(names)],
            "annotations": [{"id": k + 1, "image_id": k + 1, "caption": "a red square"} for k in range(len(names))]}
    for split in ("train", "val"):
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(coco))
    shutil.copytree(folder, root / "train2017")  # the train split: the same files
    dm = CocoCaptionsDataModule(root=str(root), test_split=None, image_size=24, min_word_count=1, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    from captioning.inference import Captioner

    captioner = Captioner.from_checkpoint(lstm_ckpt, device="cpu", image_size=24)  # what caption.py builds
    pipeline = captioner.pipeline
    plain = image_transform_plain(24)
    differs_from_plain = 0
    for k, name in enumerate(names):
        in_training = dm.datasets["train"][k]["image"]  # one caption per image: pair k is image k
        in_evaluation = dm.datasets["val"][k]["image"]  # what eval.py and validation decode
        in_captioning = pipeline(captioner.load(folder / name))  # what caption.py feeds the model
        assert captioner([captioner.load(folder / name)])[0].text  # and captions
        assert torch.equal(in_training, in_evaluation) and torch.equal(in_evaluation, in_captioning), name
        assert torch.equal(dm.image_pipeline()(folder / name), in_captioning)
        with Image.open(folder / name) as image:
            differs_from_plain += not torch.allclose(plain(image.convert("RGB")), in_captioning, atol=1e-3)
    assert differs_from_plain >= 2  # the transparent and the 16-bit file: what caption.py used to get wrong


def image_transform_plain(size):
    from captioning.data.transforms import image_transform

    return image_transform(size)
