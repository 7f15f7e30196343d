"""Compositional splits of the built-in set (data.holdout): what training never shows, and validation scoring
held-out pairs and layouts apart from the seen ones."""

import json

import numpy as np
import pytest

from captioning.data.holdout import PRESETS, Holdout
from captioning.data.shapes import (
    COLORS,
    SHAPES,
    SIZES,
    ShapesDataModule,
    draw_scene,
    generate_shapes_dataset,
)
from captioning.grounding import GroundingScorer
from captioning.module import grounding_scorer

SIZE = {"num_train": 600, "num_val": 150, "num_test": 10, "image_size": 32, "seed": 3}


@pytest.fixture(scope="module")
def compositional(tmp_path_factory):
    """The compositional split (held-out pairs and same-colour triples), small, drawn once."""
    dm = ShapesDataModule(root=str(tmp_path_factory.mktemp("data") / "shapes"), holdout="compositional",
                          progress=False, num_workers=0, **SIZE)
    dm.prepare_data()
    return dm


def _pairs(scene):
    return [(o["color"], o["shape"]) for o in scene["objects"]]


def test_no_training_scene_shows_a_held_out_pair_or_layout(compositional):
    held_out = compositional.holdout.pairs
    assert held_out == {("red", "star"), ("blue", "circle"), ("green", "square"), ("yellow", "triangle")}
    train = compositional.scenes("train")
    assert len(train) == SIZE["num_train"]  # drawn again, not dropped: the split keeps its size
    assert not any(set(_pairs(s)) & held_out for s in train.values())
    triples = [s for s in train.values() if len(s["objects"]) == 3]
    assert triples and all(len({c for c, _ in _pairs(s)}) == 3 for s in triples)
    # ... while validation has them, and enough of them to measure
    val = compositional.scenes("val")
    assert sum(bool(set(_pairs(s)) & held_out) for s in val.values()) >= 0.2 * len(val)
    assert compositional.holdout.subsets(val)["novel_layout"]
    # every colour and every shape is still seen in training, with its other partners
    seen = {p for s in train.values() for p in _pairs(s)}
    assert seen == {(c, s) for c in COLORS for s in SHAPES} - held_out


def test_every_reference_of_the_held_out_validation_set_is_true(compositional):
    scorer = grounding_scorer(compositional, "val")
    assert scorer.novel_pairs == compositional.holdout.pairs and set(scorer.subsets) == {"novel_layout", "seen_layout"}
    references = compositional.references("val")
    for k in range(5):
        scores = scorer({i: refs[k] for i, refs in references.items()})
        for name in ("precision", "correct", "novel_precision", "seen_precision", "novel_layout_precision",
                     "novel_layout_correct", "seen_layout_correct", "color", "shape", "size", "count", "position"):
            assert scores[name] == 1.0, (k, name, scores[name])
        assert scores["novel_recall"] > 0.5 and scores["seen_recall"] > 0.5  # the references name them


def test_other_scenes_are_the_standard_sets_and_the_folder_is_its_own(compositional, tmp_path):
    assert compositional.root.name == "shapes-compositional"
    info = json.loads((compositional.root / "annotations" / "captions_train2017.json").read_text())["info"]
    assert info["holdout"]["pairs"] == sorted(PRESETS["pairs"]["pairs"])
    standard = {k: draw_scene("val", k, 32, 3)[0] for k in range(50)}
    held = {k: draw_scene("val", k, 32, 3, compositional.holdout)[0] for k in range(50)}
    assert standard == held  # validation scenes are untouched
    train = [draw_scene("train", k, 32, 3)[0] for k in range(200)]
    redrawn = [k for k in range(200) if draw_scene("train", k, 32, 3, compositional.holdout)[0] != train[k]]
    assert redrawn == [k for k, s in enumerate(train) if compositional.holdout.excludes(s.objects)]


def test_the_scale_split_draws_evaluation_objects_at_another_scale(tmp_path):
    generate_shapes_dataset(tmp_path / "plain", **SIZE, progress=False)
    dm = ShapesDataModule(root=str(tmp_path / "shapes"), holdout="scale", progress=False, **SIZE)
    dm.prepare_data()

    def radii(scenes, size):
        return np.array([o["radius"] / 32 for s in scenes.values() for o in s["objects"] if o["size"] == size])

    plain = ShapesDataModule(root=str(tmp_path / "plain"), progress=False, **SIZE)
    assert dm.scenes("train") == plain.scenes("train")
    for size, (low, high) in SIZES.items():
        scaled = radii(dm.scenes("val"), size)
        assert scaled.min() >= 0.8 * low - 0.01 and scaled.max() <= 0.8 * high + 0.01
        assert scaled.max() < low  # smaller than anything of that size training saw
    references = dm.references("val")
    scores = grounding_scorer(dm, "val")({i: refs[0] for i, refs in references.items()})
    assert scores["correct"] == 1.0


def test_novel_and_seen_rates_hand_computed():
    scenes = {1: {"objects": [{"shape": "star", "color": "red", "size": "large", "center": [10, 30]},
                              {"shape": "square", "color": "blue", "size": "small", "center": [50, 30]}],
                  "width": 64, "height": 64},
              2: {"objects": [{"shape": "star", "color": "red", "size": "small", "center": [32, 32]}],
                  "width": 64, "height": 64}}
    scorer = GroundingScorer(scenes, novel_pairs=[("red", "star")], subsets={"pair": [1]})
    # image 1: the red star named, the blue square called a blue circle; image 2: the red star called red square
    scores = scorer({1: "a red star to the left of a blue circle", 2: "a red square in the center"})
    assert scores["novel_recall"] == 0.5  # 1 of the 2 red stars shown was named
    assert scores["novel_precision"] == 1.0  # the one red star named is there
    assert scores["seen_recall"] == 0.0  # the blue square was not named
    assert scores["seen_precision"] == 0.0  # blue circle, red square: neither there
    assert scores["pair_precision"] == 0.5 and scores["pair_correct"] == 0.0


@pytest.mark.parametrize(("spec", "message"), [
    ("pair", "is not a preset"),
    ({"pairs": ["red stra"]}, "'red stra' is not '<colour> <shape>'"),
    ({"pairs": ["purple star"]}, "with a colour of red"),
    ({"eval_scale": 3}, "eval_scale must be a number in [0.3, 1.6]"),
    ({"colour_pairs": ["red star"]}, "is not a preset or one of the fields"),
])
def test_a_bad_holdout_names_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=None) as error:
        Holdout.parse(spec, COLORS, SHAPES)
    assert message in str(error.value)


def test_presets_combine_and_name_their_folder():
    both = Holdout.parse(["pairs", "scale"], COLORS, SHAPES)
    assert both.pairs == Holdout.parse("pairs").pairs and both.eval_scale == 0.8 and not both.same_color_triples
    assert Holdout.parse("compositional").tag == "compositional"
    assert both.tag.startswith("holdout-") and both.tag == Holdout.parse(["scale", "pairs"]).tag
    assert not Holdout.parse(None) and Holdout.parse(None).tag != "pairs"


@pytest.mark.slow
def test_the_learning_curve_script_writes_its_table_and_plot(tmp_path):
    import subprocess
    import sys

    from entrypoints import REPO, environment, tiny

    overrides = [o for o in tiny(tmp_path) if not o.startswith("data.num_train")]
    out = tmp_path / "curve"
    subprocess.run([sys.executable, str(REPO / "scripts" / "learning_curve.py"), "--sizes", "16", "32",
                    "--budget", "epochs", "--epochs", "1", "--out", str(out), *overrides], cwd=REPO, env=environment(),
                   check=True, capture_output=True, timeout=600)
    rows = json.loads((out / "curve.json").read_text())
    assert [r["images"] for r in rows] == [16, 32]
    assert all(0.0 <= r["object precision"] <= 1.0 and r["wall_s"] > 0 for r in rows)
    assert (out / "curve.md").read_text().startswith("| images | epochs | object precision")
    assert (out / "curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_default_names_pairs_training_never_showed(tmp_path):
    """python src/train.py data.holdout=pairs, shortened (4 of the 10 epochs, 200 validation images): the
    default recipe names held-out colour+shape pairs (no training image shows a red star, a blue circle, a
    green square or a yellow triangle) and what it names of them is there. Before the pathways and guidance the
    same run named none (recall 0.04 after the full 10 epochs)."""
    from entrypoints import run_dirs, train

    train([f"paths.root_dir={tmp_path}", "data.holdout=pairs", "data.num_val=200", "data.progress=false",
           "trainer.max_epochs=4", "logger=csv", "callbacks.progress_bar=null", "test=false"])
    (run,) = run_dirs(tmp_path)
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["val/grounding/novel_recall"] >= NOVEL_RECALL
    assert final["val/grounding/novel_precision"] >= 0.9
    assert final["val/grounding/novel_recall"] >= 0.5 * final["val/grounding/seen_recall"]
    assert final["val/grounding/seen_precision"] >= 0.85


# measured with these settings, with the deep output (model.context_output): novel recall 0.563 / 0.493 (seeds
# 12345 / 1; seen recall 0.679 / 0.620, seen precision 0.946 / 0.905, novel precision 0.98 / 1.00, 191-195 s here);
# without it 0.451 / 0.465 (seen precision 0.868 / 0.871); the recipe before the pathways: 0.04 after all 10 epochs
NOVEL_RECALL = 0.35
