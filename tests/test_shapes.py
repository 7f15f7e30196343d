"""The built-in shapes data set: COCO layout, five true captions per image, determinism, regeneration."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from captioning.data import shapes
from captioning.data.shapes import (
    COLORS,
    PLURALS,
    SHAPES,
    STAMP_FILE,
    ensure_shapes_dataset,
    generate_shapes_dataset,
)
from captioning.data.vocab import Vocabulary

TINY = {"num_train": 20, "num_val": 5, "num_test": 5, "image_size": 32, "seed": 0}
SPLIT_SIZES = {"train": 20, "val": 5, "test": 5}


def _annotations(root, split):
    return json.loads((root / "annotations" / f"captions_{split}2017.json").read_text())


def _captions_by_image(coco):
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    return by_image


def test_files_follow_the_coco_2017_layout(tiny_shapes_root):
    root = tiny_shapes_root
    all_ids, all_ann_ids = [], []
    for split, count in SPLIT_SIZES.items():
        coco = _annotations(root, split)
        assert {"info", "licenses", "images", "annotations"} <= set(coco)
        assert len(coco["images"]) == count
        for img in coco["images"]:
            assert {"id", "file_name", "width", "height"} <= set(img)
            with Image.open(root / f"{split}2017" / img["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
            assert (img["width"], img["height"]) == (32, 32)
        for ann in coco["annotations"]:
            assert {"id", "image_id", "caption"} <= set(ann)
        all_ids += [img["id"] for img in coco["images"]]
        all_ann_ids += [ann["id"] for ann in coco["annotations"]]
    assert len(set(all_ids)) == len(all_ids) == 30  # ids unique across splits, as in COCO
    assert len(set(all_ann_ids)) == len(all_ann_ids) == 150
    assert json.loads((root / STAMP_FILE).read_text())["generator_version"] == shapes.GENERATOR_VERSION


def test_five_distinct_short_captions_per_image_and_a_small_vocabulary(tiny_shapes_root):
    captions = []
    for split in SPLIT_SIZES:
        coco = _annotations(tiny_shapes_root, split)
        by_image = _captions_by_image(coco)
        assert set(by_image) == {img["id"] for img in coco["images"]}
        for caps in by_image.values():
            assert len(caps) == 5 and len(set(caps)) == 5
        captions += [c for caps in by_image.values() for c in caps]
    assert max(len(Vocabulary.tokenize(c)) for c in captions) <= 14
    assert len(Vocabulary.build(captions)) < 60


def _words(caption):
    return set(Vocabulary.tokenize(caption))


def _key(obj):
    return obj["color"], obj["shape"]


def _first_object(caption):
    """(colour, shape) of the first 'colour shape' phrase in ``caption``."""
    words = Vocabulary.tokenize(caption)
    i = next(i for i, w in enumerate(words) if w in COLORS)
    return words[i], words[i + 1]


def test_captions_describe_what_is_drawn(tmp_path):
    # More images than the shared set, to meet every layout and template.
    root = generate_shapes_dataset(tmp_path / "s", num_train=150, num_val=1, num_test=1, image_size=48,
                                   progress=False)
    coco = _annotations(root, "train")
    by_image = _captions_by_image(coco)
    shape_words = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
    layouts = set()
    for img in coco["images"]:
        objects, layout = img["scene"]["objects"], img["scene"]["layout"]
        layouts.add(layout)
        drawn_colors = {o["color"] for o in objects}
        drawn_shapes = {o["shape"] for o in objects}
        caps = by_image[img["id"]]
        named_colors = set().union(*(_words(c) & set(COLORS) for c in caps))
        named_shapes = {shape_words[w] for c in caps for w in _words(c) & set(shape_words)}
        # Every drawn colour and shape is named somewhere, and nothing that is not drawn is named.
        assert named_colors == drawn_colors, (caps, objects)
        assert named_shapes == drawn_shapes, (caps, objects)
        if len(objects) < 3:  # no count larger than what is drawn
            assert not any({"three", "two" if len(objects) == 1 else "three"} & _words(c) for c in caps)
        # The pixel at each centre has the named colour (the drawing matches the metadata).
        with Image.open(root / "train2017" / img["file_name"]) as im:
            pixels = np.asarray(im, dtype=float)
        for o in objects:
            x, y = (int(round(v)) for v in o["center"])
            assert np.abs(pixels[y, x] - COLORS[o["color"]]).max() < 60, (o, pixels[y, x])
        # Positions and relations said in the captions hold.
        s = img["width"]
        if layout in ("left", "right", "top", "bottom", "center"):
            x, y = objects[0]["center"]
            inside = {"left": x < s / 3, "right": x > 2 * s / 3, "top": y < s / 3, "bottom": y > 2 * s / 3,
                      "center": abs(x - s / 2) < s / 6 and abs(y - s / 2) < s / 6}
            assert inside[layout], (layout, x, y)
            said = set().union(*(_words(c) & set(inside) | _words(c) & {"middle"} for c in caps))
            assert said and said <= {layout} | ({"center", "middle"} if layout == "center" else set())
        elif layout == "horizontal":
            assert objects[0]["center"][0] < s / 2 < objects[1]["center"][0]
            assert not any(w in _words(c) for c in caps for w in ("above", "below", "top", "bottom"))
            for c in caps:  # whichever object a relation starts with, the relation fits it
                if "to the right of" in c:
                    assert _first_object(c) == _key(objects[1]), c
                elif "to the left of" in c or "next to" in c or "on the left" in c:
                    assert _first_object(c) == _key(objects[0]), c
        elif layout == "vertical":
            assert objects[0]["center"][1] < s / 2 < objects[1]["center"][1]
            assert not any(w in _words(c) for c in caps for w in ("next", "left", "right"))
            for c in caps:
                if "below" in c:
                    assert _first_object(c) == _key(objects[1]), c
                elif "above" in c or "at the top" in c:
                    assert _first_object(c) == _key(objects[0]), c
        else:
            assert layout == "group" and len(objects) == 3
    assert layouts == {"left", "right", "top", "bottom", "center", "horizontal", "vertical", "group"}


def test_shapes_do_not_overlap(tiny_shapes_root):
    for split in SPLIT_SIZES:
        for img in _annotations(tiny_shapes_root, split)["images"]:
            objs = img["scene"]["objects"]
            for i, a in enumerate(objs):
                for b in objs[i + 1:]:
                    dist = np.hypot(a["center"][0] - b["center"][0], a["center"][1] - b["center"][1])
                    assert dist > a["radius"] + b["radius"]


def test_same_seed_same_set_other_seed_other_set(tiny_shapes_root, tmp_path):
    again = generate_shapes_dataset(tmp_path / "again", progress=False, **TINY)
    other = generate_shapes_dataset(tmp_path / "other", progress=False, **(TINY | {"seed": 1}))
    for split in SPLIT_SIZES:
        assert _annotations(again, split) == _annotations(tiny_shapes_root, split)
        assert _annotations(other, split)["annotations"] != _annotations(tiny_shapes_root, split)["annotations"]
        for img in _annotations(again, split)["images"]:
            name = f"{split}2017/{img['file_name']}"
            assert (again / name).read_bytes() == (tiny_shapes_root / name).read_bytes()


def _mtime_of_stamp(root):
    return (root / STAMP_FILE).stat().st_mtime_ns


def test_ensure_reuses_a_matching_set_and_regenerates_on_change(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    ensure_shapes_dataset(root, progress=False, **TINY)
    (root / "vocab_train2017_min1.json").write_text("{}")  # derived files go with a regenerated set
    stamp_time = _mtime_of_stamp(root)
    ensure_shapes_dataset(root, progress=False, **TINY)
    assert _mtime_of_stamp(root) == stamp_time

    ensure_shapes_dataset(root, progress=False, **(TINY | {"num_train": 7}))
    assert len(_annotations(root, "train")["images"]) == 7
    assert not (root / "vocab_train2017_min1.json").exists()

    monkeypatch.setattr(shapes, "GENERATOR_VERSION", shapes.GENERATOR_VERSION + 1)
    ensure_shapes_dataset(root, progress=False, **(TINY | {"num_train": 7}))
    assert json.loads((root / STAMP_FILE).read_text())["generator_version"] == shapes.GENERATOR_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary or old copies left


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_write = shapes._write_split

    def write_then_die(root, split, *args, **kwargs):
        if split == "val":
            raise KeyboardInterrupt
        return real_write(root, split, *args, **kwargs)

    monkeypatch.setattr(shapes, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(tmp_path / "shapes", progress=False, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_directory_that_is_not_a_shapes_set(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "precious.txt").write_text("real data")
    with pytest.raises(FileExistsError, match=re.escape(str(root))):
        ensure_shapes_dataset(root, progress=False, **TINY)
    assert (root / "precious.txt").read_text() == "real data"


def test_bad_parameters_are_rejected_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_shapes_dataset(tmp_path / "s", num_train=0, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_dataset(tmp_path / "s", image_size=4, progress=False)


def _prepare(root: str) -> None:
    shapes.ShapesDataModule(root=root, num_train=40, num_val=5, num_test=5, image_size=32, progress=False,
                            num_workers=0).prepare_data()


def test_nodes_preparing_the_same_folder_at_once_take_turns(tmp_path, monkeypatch):
    # Lightning runs prepare_data on one process per node; nodes often share the data folder. Unserialised,
    # a second node's freshly drawn set replaced the folder under the first one's vocabulary file, still
    # being written (slowed down here, so that the overlap is certain).
    import multiprocessing
    import tempfile
    import time

    mkstemp = tempfile.mkstemp

    def slow_mkstemp(*args, **kwargs):
        made = mkstemp(*args, **kwargs)
        time.sleep(1.0)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", slow_mkstemp)
    root = str(tmp_path / "shared" / "shapes")
    context = multiprocessing.get_context("fork")  # no re-import of torch: quick
    nodes = [context.Process(target=_prepare, args=(root,)) for _ in range(3)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.join(timeout=120)
    assert [node.exitcode for node in nodes] == [0, 0, 0]
    vocab = Vocabulary.load(tmp_path / "shared" / "shapes" / "vocab_train2017_min1.json")
    assert len(vocab) > 10
    assert not [p.name for p in (tmp_path / "shared").iterdir() if p.name.startswith(".shapes.tmp")]
