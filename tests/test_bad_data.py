"""Bad input to the data pipeline: broken and odd images, decompression bombs, bad annotations, fuzzing."""

import io
import json
import os
import re
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioning.data import CocoCaptionsDataModule
from captioning.data.images import BadImageError, BadImageWarning, load_image, to_rgb

S = 8  # image side after the transform


def jpeg_bytes(size=(12, 10), color=(200, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG that claims width x height pixels in 60 bytes: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_split(root, split, files, captions=None):
    """captions_<split>2017.json over ``files`` ({file name: bytes or PIL image}), ids 1.., two captions each."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id, (name, content) in enumerate(files.items(), start=1):
        if isinstance(content, Image.Image):
            content.save(folder / name)
        else:
            (folder / name).write_bytes(content)
        images.append({"id": image_id, "file_name": name})
        for caption in (captions or {}).get(image_id, ["a red square", "a square"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    path = root / "annotations" / f"captions_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def make_dm(root, **kwargs):
    args = {"root": str(root), "image_size": S, "max_length": 6, "min_word_count": 1, "batch_size": 4,
            "num_workers": 0} | kwargs
    return CocoCaptionsDataModule(**args)


def val_batches(dm):
    dm.prepare_data()
    dm.setup("validate")
    return list(dm.val_dataloader())


BROKEN = {
    "truncated.jpg": jpeg_bytes()[:60],
    "empty.jpg": b"",
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
    "text.jpg": b"this is not an image at all\n",
    "bomb.png": png_header_only(100_000, 100_000),
}


@pytest.fixture
def broken_root(tmp_path):
    root = tmp_path / "coco"
    files = {"good1.jpg": jpeg_bytes(), **BROKEN, "good2.jpg": jpeg_bytes(color=(0, 0, 255))}
    write_split(root, "train", {"good1.jpg": jpeg_bytes(), "good2.jpg": jpeg_bytes()})
    write_split(root, "val", files)
    return root, list(files)


def test_broken_images_are_skipped_counted_and_named(broken_root):
    root, names = broken_root
    dm = make_dm(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = val_batches(dm)
        batches += list(dm.val_dataloader())  # a second epoch warns no more
    assert [i for b in batches for i in b["image_ids"].tolist()] == [1, 7, 1, 7]  # good1, good2 twice
    assert all(b["images"].shape[1:] == (3, S, S) for b in batches)
    folder = root / "val2017"
    assert sorted(dm.bad_images["val"]) == sorted(str(folder / n) for n in BROKEN) and dm.bad_image_count == 5
    skipped = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(skipped) == 5  # once per file
    for name, reason in [("truncated.jpg", "could not be decoded"), ("empty.jpg", "empty (0 bytes)"),
                         ("corrupt.jpg", "could not be decoded"), ("text.jpg", "could not be decoded"),
                         ("bomb.png", "decompression bomb")]:
        (message,) = [m for m in skipped if str(folder / name) in m]
        assert reason in message and "data.on_bad_image=fail" in message
    with pytest.warns(UserWarning, match="Unreadable images were skipped — val: 5"):
        dm.teardown("validate")


@pytest.mark.parametrize("name", list(BROKEN))
def test_fail_mode_stops_naming_the_file(tmp_path, name):
    root = tmp_path / "coco"
    write_split(root, "train", {"good.jpg": jpeg_bytes()})
    write_split(root, "val", {"good.jpg": jpeg_bytes(), name: BROKEN[name]})
    with pytest.raises(ValueError) as err:
        val_batches(make_dm(root, on_bad_image="fail"))
    assert str(root / "val2017" / name) in str(err.value) and "data.on_bad_image=skip" in str(err.value)


def test_a_batch_of_only_broken_images_gets_a_readable_stand_in(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train", {"good.jpg": jpeg_bytes()})
    write_split(root, "val", {"a.jpg": b"", "b.jpg": b"junk", "c.jpg": jpeg_bytes()})
    with pytest.warns(BadImageWarning):
        batches = val_batches(make_dm(root, batch_size=2))
    assert [b["image_ids"].tolist() for b in batches] == [[3], [3]]  # the run goes on


def test_a_split_of_only_broken_images_is_a_clear_error(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train", {"good.jpg": jpeg_bytes()})
    write_split(root, "val", {"a.jpg": b"", "b.jpg": b"junk"})
    with pytest.warns(BadImageWarning), pytest.raises(ValueError, match="Every image of a batch of 2") as err:
        val_batches(make_dm(root))
    assert str(root / "val2017" / "a.jpg") in str(err.value)


def test_skip_survives_two_workers_and_counts_across_them(broken_root):
    root, _ = broken_root
    dm = make_dm(root, num_workers=2, persistent_workers=False, batch_size=4)
    batches = val_batches(dm)
    assert sorted(i for b in batches for i in b["image_ids"].tolist()) == [1, 7]
    assert dm.bad_image_count == 5  # flagged inside the workers, seen by the main process


# ---------------------------------------------------------------------------------------------- odd images
def _png16(value):
    return Image.fromarray(np.full((6, 5), value, dtype=np.uint16))


ODD = {  # name: (image, expected RGB of the centre pixel after loading)
    "grey.png": (Image.new("L", (7, 5), 100), (100, 100, 100)),
    "one_bit.png": (Image.new("1", (7, 5), 1), (255, 255, 255)),
    "grey_alpha.png": (Image.new("LA", (7, 5), (10, 0)), (255, 255, 255)),
    "rgba_transparent.png": (Image.new("RGBA", (7, 5), (0, 0, 0, 0)), (255, 255, 255)),
    "rgba_opaque.png": (Image.new("RGBA", (7, 5), (10, 200, 30, 255)), (10, 200, 30)),
    "palette.png": (Image.new("RGB", (7, 5), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE), (0, 128, 255)),
    "sixteen_bit.png": (_png16(32768), (128, 128, 128)),  # not clipped to white
    "cmyk.jpg": (Image.new("CMYK", (7, 5), (0, 255, 255, 0)), (255, 0, 0)),
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_modes_become_proper_rgb(tmp_path, name):
    image, expected = ODD[name]
    path = tmp_path / name
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    assert np.abs(np.subtract(loaded.getpixel((3, 2)), expected)).max() <= 3  # JPEG rounding


def test_palette_transparency_composites_over_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((1, 1)) == (255, 255, 255)


def test_odd_images_load_as_3xSxS_tensors_through_the_datamodule(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train", {"good.jpg": jpeg_bytes()})
    write_split(root, "val", {name: image for name, (image, _) in ODD.items()})
    batches = val_batches(make_dm(root))
    images = torch.cat([b["images"] for b in batches])
    assert images.shape == (len(ODD), 3, S, S) and torch.isfinite(images).all()


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))  # past PIL's hard limit
    with pytest.raises(BadImageError, match=re.escape(str(bomb)) + ".*decompression bomb"):
        load_image(bomb)
    large = tmp_path / "large.png"
    large.write_bytes(png_header_only(10_000, 10_000))  # 100 Mpx: past the default limit, under PIL's hard one
    with pytest.raises(BadImageError, match=r"10000x10000 = 100,000,000 pixels.*decompression bomb"):
        load_image(large)
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(small)
    with pytest.raises(BadImageError, match="600 pixels, more than the limit of 100"):
        load_image(small, max_pixels=100)

    root = tmp_path / "coco"
    write_split(root, "train", {"good.jpg": jpeg_bytes()})
    write_split(root, "val", {"small.png": Image.new("RGB", (30, 20)), "tiny.png": Image.new("RGB", (5, 5))})
    with pytest.warns(BadImageWarning, match="data.max_image_pixels"):
        batches = val_batches(make_dm(root, max_image_pixels=100))
    assert [i for b in batches for i in b["image_ids"].tolist()] == [2]


# ---------------------------------------------------------------------------------------------- annotations
def test_empty_and_punctuation_only_captions_are_dropped_with_a_count(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train", {"a.jpg": jpeg_bytes(), "b.jpg": jpeg_bytes(), "c.jpg": jpeg_bytes()},
                captions={1: ["a red square", "", "  ...!  "], 2: ["?!", " "], 3: ["a blue circle"]})
    write_split(root, "val", {"a.jpg": jpeg_bytes()})
    path = root / "annotations" / "captions_train2017.json"
    dm = make_dm(root)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + r".*dropped 4 empty or punctuation-only "
                      r"captions; 1 images had no usable caption left and are left out \(ids \[2\]\)"):
        dm.prepare_data()
    dm.setup("fit")
    train = dm.datasets["train"]
    assert train.split.image_ids.tolist() == [1, 3] and len(train) == 2
    assert train.split.dropped_captions == 4
    assert dm.references("train") == {1: ["a red square"], 3: ["a blue circle"]}


def test_a_split_with_no_images_names_the_file(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train", {"a.jpg": jpeg_bytes()})
    write_split(root, "val", {"a.jpg": jpeg_bytes()}, captions={1: ["...", ""]})
    dm = make_dm(root)
    dm.prepare_data()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="has no images with a usable caption") as err:
        dm.setup("fit")
    assert str(root / "annotations" / "captions_val2017.json") in str(err.value)
    (root / "annotations" / "captions_val2017.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="captions_val2017.json"):
        make_dm(root).setup("validate")


def test_categories_in_a_caption_file_do_not_matter(tmp_path):
    root = tmp_path / "coco"
    path = write_split(root, "train", {"a.jpg": jpeg_bytes()})
    data = json.loads(path.read_text()) | {"categories": [{"id": 1, "name": "thing"}]}
    path.write_text(json.dumps(data))
    write_split(root, "val", {"a.jpg": jpeg_bytes()})
    assert len(val_batches(make_dm(root))) == 1


# ---------------------------------------------------------------------------------------------- fuzzing
MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP",
         b"P6\n", b"\x00\x00\x01\x00"]
real_files = [jpeg_bytes(), (lambda b: (Image.new("RGBA", (9, 7)).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())]


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["random", "magic", "damaged"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(real_files)))
    data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def _assert_clear(err, root):
    assert isinstance(err, ValueError | FileNotFoundError), f"{type(err).__name__}: {err}"
    assert str(root) in str(err), str(err)


# CAPTIONING_FUZZ_EXAMPLES=2000 for a longer hunt
FUZZ = settings(max_examples=int(os.environ.get("CAPTIONING_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(image_bytes(), min_size=1, max_size=3))
def test_random_bytes_as_images_are_skipped_or_clear_errors(contents):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        write_split(root, "train", {"good.jpg": jpeg_bytes()})
        write_split(root, "val", {f"{i}.jpg": data for i, data in enumerate(contents)})
        for on_bad_image in ("skip", "fail"):
            dm = make_dm(root, on_bad_image=on_bad_image)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    batches = val_batches(dm)
                except Exception as err:  # noqa: BLE001 - the point: which exceptions come out
                    _assert_clear(err, root)
                    continue
            for batch in batches:
                assert batch["images"].shape[1:] == (3, S, S) and torch.isfinite(batch["images"]).all()
            assert sum(len(b["image_ids"]) for b in batches) + dm.bad_image_count == len(contents)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)
json_or_scalar = json_values | st.integers(min_value=-(2**70), max_value=2**70)
coco_like = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({"id": json_or_scalar, "file_name": json_or_scalar}) | json_values,
                       max_size=3),
    "annotations": st.lists(st.fixed_dictionaries(
        {"id": json_or_scalar, "image_id": json_or_scalar, "caption": json_or_scalar}) | json_values, max_size=3),
}) | st.dictionaries(st.sampled_from(["images", "annotations", "categories", "info"]), json_values)
karpathy_like = st.fixed_dictionaries({"images": st.lists(st.fixed_dictionaries({
    "cocoid": json_or_scalar, "filepath": json_or_scalar, "filename": json_or_scalar,
    "split": st.sampled_from(["train", "restval", "val", "test", "x"]) | json_values,
    "sentences": st.lists(st.fixed_dictionaries({"raw": json_or_scalar}) | json_values, max_size=2) | json_values,
}) | json_values, max_size=3)})


@FUZZ
@given(st.one_of(json_values, coco_like), st.booleans())
def test_random_json_annotations_give_only_clear_errors(content, as_text):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        (root / "annotations").mkdir(parents=True)
        (root / "train2017").mkdir()
        Image.new("RGB", (4, 4)).save(root / "train2017" / "a.jpg")
        text = json.dumps(content) if as_text else json.dumps(content)[:-1]  # also cut short: not JSON
        for split in ("train", "val"):
            (root / "annotations" / f"captions_{split}2017.json").write_text(text)
        dm = make_dm(root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dm.prepare_data()
                dm.setup("fit")
                list(dm.val_dataloader())
            except Exception as err:  # noqa: BLE001
                _assert_clear(err, root)


@FUZZ
@given(karpathy_like | json_values)
def test_random_karpathy_files_give_only_clear_errors(content):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        root.mkdir()
        (root / "dataset_coco.json").write_text(json.dumps(content))
        dm = make_dm(root, split_source="karpathy", test_split="test")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dm.prepare_data()
                dm.setup()
            except Exception as err:  # noqa: BLE001
                _assert_clear(err, root)


def test_missing_root_and_annotation_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + ".*data.root"):
        make_dm(tmp_path / "nope").prepare_data()
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "coco" / "annotations" /
                                                             "captions_train2017.json"))):
        make_dm(tmp_path / "coco").prepare_data()
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        make_dm(tmp_path / "coco", split_source="karpathy").prepare_data()
    with pytest.raises(ValueError, match="on_bad_image='maybe' is not one of 'skip', 'fail'"):
        make_dm(tmp_path, on_bad_image="maybe")
