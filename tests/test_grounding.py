"""The grounded metric: captions checked against the scenes of the built-in set, on hand-made cases and on
the references themselves (every one is true)."""

from __future__ import annotations

import json

import pytest

from captioning.data import shapes
from captioning.grounding import SHAPES_LEXICON, GroundingScorer, ground_caption, parse_caption

S = 64  # image side


def obj(shape, color, size="small", x=32.0, y=32.0):
    return {"shape": shape, "color": color, "size": size, "center": [x, y], "radius": 6.0}


def scene(*objects):
    return {"objects": list(objects), "width": S, "height": S}


ONE_WHITE_TRIANGLE = scene(obj("triangle", "white", "small", 30, 50))  # at the bottom
TWO_SIDE_BY_SIDE = scene(obj("square", "blue", "large", 12, 40), obj("circle", "white", "large", 50, 42))
THREE = scene(obj("circle", "white", "small", 10, 36), obj("square", "red", "large", 26, 12),
              obj("star", "red", "small", 44, 30))


def test_parses_the_templates_and_what_models_say_instead():
    parsed = parse_caption("there are two red squares and a small triangle at the bottom")
    (squares, triangle) = parsed.mentions
    assert (squares.count, squares.color, squares.shape, squares.exact_count) == (2, "red", "square", True)
    assert (triangle.count, triangle.size, triangle.shape, triangle.position) == (1, "small", "triangle", "bottom")
    (total, *listed) = parse_caption("three shapes a white circle a red square and a red star").mentions
    assert total.total and total.count == 3 and len(listed) == 3 and not any(m.total for m in listed)
    (generic,) = parse_caption("three large shapes").mentions
    assert not generic.total and generic.size == "large" and generic.shape is None
    parsed = parse_caption("a blue triangle is above a yellow triangle")
    assert parsed.relations == [(0, "above", 1)]
    assert parse_caption("at the bottom there is a small white square").mentions[0].position == "bottom"
    assert parse_caption("circles").mentions[0].count is None  # a plural without a number
    assert parse_caption("the image shows nothing I know").mentions == []


def test_a_true_single_object_caption():
    result = ground_caption("a small white triangle at the bottom", ONE_WHITE_TRIANGLE)
    assert result.correct and result.exact and result.errors == []
    assert (result.named_pairs, result.correct_pairs, result.recalled) == (1, 1, 1)


def test_the_issue_example_hallucinates_colour_and_shape():
    # val image 4004 of the issue: one small white triangle, captioned "a small red square at the bottom"
    result = ground_caption("a small red square at the bottom", ONE_WHITE_TRIANGLE)
    assert not result.correct and not result.exact
    assert result.hallucinated == ["red square"]
    checks = {a: ok for a, ok, _ in result.checks}
    assert checks == {"color": False, "shape": False, "size": True, "position": True}


def test_hand_computed_rates_over_a_split():
    scorer = GroundingScorer({1: ONE_WHITE_TRIANGLE, 2: TWO_SIDE_BY_SIDE, 3: THREE})
    scores = scorer({
        1: "a small white triangle at the bottom",  # 1 pair, right
        2: "a blue square to the left of a red circle",  # 2 pairs: 1 right, 1 invented; relation true
        3: "a white circle a red square and a red star",  # 3 pairs, all right
    })
    assert scores["precision"] == pytest.approx(5 / 6)
    assert scores["chair_i"] == pytest.approx(1 / 6)
    assert scores["recall"] == pytest.approx(5 / 6)  # 5 of the 6 objects named right
    assert scores["chair_s"] == pytest.approx(1 / 3)
    # colours: white, blue, red(wrong), white, red, red -> 5/6; shapes all 6 right
    assert scores["color"] == pytest.approx(5 / 6) and scores["shape"] == 1.0
    assert scores["position"] == 1.0  # "at the bottom", "to the left of"
    assert scores["correct"] == pytest.approx(2 / 3) and scores["exact"] == pytest.approx(2 / 3)
    assert scores["single_exact"] == 1.0


def test_counts_positions_and_relations_can_be_false():
    assert not ground_caption("two shapes", ONE_WHITE_TRIANGLE).correct
    assert ground_caption("two shapes", TWO_SIDE_BY_SIDE).correct
    assert not ground_caption("a single large blue square", TWO_SIDE_BY_SIDE).correct  # there are two objects
    assert not ground_caption("a small white triangle at the top", ONE_WHITE_TRIANGLE).correct
    assert not ground_caption("a white circle to the left of a blue square", TWO_SIDE_BY_SIDE).correct
    assert ground_caption("a white circle to the right of a blue square", TWO_SIDE_BY_SIDE).correct
    assert not ground_caption("a blue square above a white circle", TWO_SIDE_BY_SIDE).correct  # side by side
    assert ground_caption("a blue square on the left and a white circle on the right", TWO_SIDE_BY_SIDE).correct
    assert not ground_caption("a white circle on the left and a blue square on the right", TWO_SIDE_BY_SIDE).correct
    assert ground_caption("a white shape and two red shapes", THREE).correct
    assert not ground_caption("two white shapes and a red shape", THREE).correct
    assert not ground_caption("three small shapes", THREE).correct  # the square is large


def test_naming_one_object_twice_invents_the_second():
    result = ground_caption("a small white triangle and a small white triangle", ONE_WHITE_TRIANGLE)
    assert (result.named_pairs, result.correct_pairs) == (2, 1) and not result.correct
    result = ground_caption("two white triangles", ONE_WHITE_TRIANGLE)
    assert (result.named_pairs, result.correct_pairs) == (2, 1) and not result.correct


def test_identical_objects_are_matched_the_way_round_that_makes_a_relation_true():
    twins = scene(obj("star", "red", "small", 30, 14), obj("star", "red", "small", 32, 50))
    assert ground_caption("a small red star below a small red star", twins).correct
    assert ground_caption("a small red star above a small red star", twins).correct


def test_missing_attributes_and_names_nothing():
    result = ground_caption("a circle and a square", TWO_SIDE_BY_SIDE)
    assert result.correct and result.named_pairs == 0 and not result.exact  # true, but names no colour
    empty = ground_caption("the image shows", TWO_SIDE_BY_SIDE)
    assert not empty.correct and empty.summary() == "names nothing"
    scores = GroundingScorer({1: TWO_SIDE_BY_SIDE})({1: "the image shows"})
    assert scores["precision"] == 0.0 and scores["correct"] == 0.0


def test_lexicon_is_the_generators():
    assert set(SHAPES_LEXICON.colors) == set(shapes.COLORS)
    assert set(SHAPES_LEXICON.sizes) == set(shapes.SIZES)
    assert {SHAPES_LEXICON.shapes[p] for p in shapes.PLURALS.values()} == set(shapes.SHAPES)
    assert {SHAPES_LEXICON.shapes[s] for s in shapes.SHAPES} == set(shapes.SHAPES)


def test_every_reference_of_a_drawn_set_is_true(tmp_path):
    root = shapes.generate_shapes_dataset(tmp_path / "shapes", num_train=300, num_val=100, num_test=10,
                                          image_size=64, seed=3, progress=False)
    data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    scenes = {i["id"]: {**i["scene"], "width": i["width"], "height": i["height"]} for i in data["images"]}
    by_image: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    scorer = GroundingScorer(scenes)
    for k in range(shapes.CAPTIONS_PER_IMAGE):
        details = scorer.details({i: captions[k] for i, captions in by_image.items()})
        false = {i: d.summary() for i, d in details.items() if not d.correct}
        assert not false, false
        scores = scorer.summarize(details)
        for key in ("precision", "color", "shape", "size", "count", "position", "correct", "single_exact"):
            assert scores[key] == 1.0, key
        assert scores["chair_i"] == 0.0 and scores["chair_s"] == 0.0


def test_unknown_image_is_a_clear_error():
    with pytest.raises(ValueError, match="no scene for image ids"):
        GroundingScorer({1: ONE_WHITE_TRIANGLE})({2: "a circle"})


def test_a_stage_result_scores_captions_and_grounds_only_the_images_it_knows():
    from captioning.chair import CocoChair
    from captioning.metrics import CaptionScorer, GroundedScorer, StageResult

    scenes = GroundingScorer({1: ONE_WHITE_TRIANGLE, 2: TWO_SIDE_BY_SIDE})
    assert isinstance(scenes, GroundedScorer) and isinstance(CocoChair({1: {"dog"}}), GroundedScorer)
    references = {1: ["a small white triangle at the bottom"], 2: ["a red circle and a blue square"],
                  3: ["an image nobody drew"]}
    result = StageResult("val", CaptionScorer(references), scenes)
    captions = {1: "a small white triangle at the bottom", 2: "a red star", 3: "an image nobody drew"}
    result.score(captions)
    assert result.predictions == captions and set(result.metrics) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider",
                                                                               "distinct"}
    assert result.metrics["distinct"] == pytest.approx(1.0)  # three different captions of three images
    # image 3 has no scene: the grounded numbers are those of images 1 and 2 alone
    assert result.grounding == scenes({1: captions[1], 2: captions[2]})
    assert result.grounding["precision"] == pytest.approx(1 / 2)
    assert result.logged["grounding/precision"] == result.grounding["precision"]
    assert result.logged["bleu4"] == result.metrics["bleu4"] and result.seconds > 0
    verdicts = result.verdicts(captions)
    assert set(verdicts) == {1, 2} and verdicts[1].correct and not verdicts[2].correct
    plain = StageResult("val", CaptionScorer(references))  # data without a grounded metric
    plain.score(captions)
    assert plain.grounding == {} and plain.verdicts(captions) == {} and "grounding/precision" not in plain.logged
