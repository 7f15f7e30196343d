"""Small COCO trees shaped like the real downloads, for tests of the paths users take.

Shaped as the files ship, not as the code would like them:

- **2017** (``layout="2017"``): ``annotations/captions_{train,val}2017.json`` (+ ``instances_*``), images in
  ``train2017/`` and ``val2017/`` named ``000000391895.jpg``; no test captions (the official download has none).
- **2014** (``layout="2014"``): ``captions_{train,val}2014.json``, images named ``COCO_val2014_000000391895.jpg``.
- **Karpathy** (``karpathy=True``, on the 2014 tree): ``dataset_coco.json`` with Karpathy's fields
  (``filepath``, ``filename``, ``imgid``, ``cocoid``, ``split`` in train / restval / val / test, ``sentids``,
  ``sentences`` with ``tokens``, ``raw``, ``imgid``, ``sentid``).

Every captions file has COCO's ``info`` and ``licenses``, every image record ``license``, ``coco_url``,
``flickr_url``, ``date_captured``, ``width`` and ``height``; image ids are large and not contiguous; images
have 5, 6 or 7 captions, written as people wrote them (trailing spaces, a newline, upper case, unicode);
images have odd sizes and some are greyscale or CMYK JPEGs, as in COCO. Instance files have COCO's
non-contiguous category ids, ``segmentation``, ``area``, ``bbox`` and ``iscrowd``.

The pictures are the built-in set's drawings (one or two coloured shapes), so a model can learn a little.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioning.data.shapes import render_scene, sample_scene

# COCO's own (a few of its 80 categories, with their real, non-contiguous ids)
CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "animal", "id": 17, "name": "cat"},
    {"supercategory": "furniture", "id": 67, "name": "dining table"},
    {"supercategory": "food", "id": 58, "name": "hot dog"},
    {"supercategory": "sports", "id": 41, "name": "skateboard"},
]
LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
     "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
]
# Caption spellings seen in COCO's files: trailing spaces and newlines, capitals, unicode
DIRT = ["{}", "{} ", "{}.", " {}\n", "{}.  ", "{} \u00e9t\u00e9", "{}!"]


@dataclass
class CocoImage:
    image_id: int
    split: str  # train / val (the official folders)
    captions: list[str]
    objects: list[str]  # COCO category names of its instances
    file_name: str = ""
    karpathy_split: str = ""
    mode: str = "RGB"
    size: tuple[int, int] = (64, 48)
    scene: Any = None  # the drawn scene (captioning.data.shapes.Scene)


def _captions(rng: random.Random, scene, count: int, objects: list[str]) -> list[str]:
    from captioning.data.shapes import scene_captions

    base = scene_captions(scene, 64, np.random.default_rng(rng.randrange(2**31)))
    # some name the image's COCO objects, so that CHAIR has mentions to check
    words = [base[k % len(base)] + (f" with a {objects[k % len(objects)]}" if k % 2 else "") for k in range(count)]
    out = []
    for k, caption in enumerate(words):
        caption = DIRT[k % len(DIRT)].format(caption)
        out.append(caption.capitalize() if k % 2 == 0 else caption.upper() if k % 5 == 4 else caption)
    return out


def make_images(num_train: int = 24, num_val: int = 8, seed: int = 0) -> list[CocoImage]:
    """The images of a tree: ids like COCO's (large, gaps), 5-7 captions, odd sizes, some grey or CMYK."""
    rng = random.Random(seed)
    images, image_id = [], 9
    sizes = [(64, 48), (48, 64), (80, 60), (64, 64), (70, 52)]
    for split, count in (("train", num_train), ("val", num_val)):
        for k in range(count):
            image_id += rng.randint(3, 40000)  # non-contiguous, as in COCO
            scene = sample_scene(np.random.default_rng([seed, k, len(images)]), 64)
            objects = ["dog", "dining table"] if k % 3 == 0 else ["cat"] if k % 3 == 1 else ["person", "skateboard"]
            images.append(CocoImage(
                image_id=image_id, split=split, captions=_captions(rng, scene, 5 + k % 3, objects), objects=objects,
                mode=("L", "CMYK", "RGB", "RGB")[k % 4], size=sizes[k % len(sizes)], scene=scene,
            ))
    return images


def _write_picture(image: CocoImage, path: Path) -> None:
    picture = render_scene(image.scene, 64, np.random.default_rng(image.image_id)).resize(image.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.convert(image.mode).save(path, format="JPEG", quality=90)


def _record(image: CocoImage, folder: str) -> dict:
    return {
        "license": 4 if image.image_id % 2 else 1, "file_name": image.file_name,
        "coco_url": f"http://images.cocodataset.org/{folder}/{image.file_name}",
        "height": image.size[1], "width": image.size[0], "date_captured": "2013-11-14 17:02:52",
        "flickr_url": f"http://farm7.staticflickr.com/6116/{image.image_id}_da26cf2c9e_z.jpg", "id": image.image_id,
    }


def write_coco(root: Path, layout: str = "2017", images: list[CocoImage] | None = None, instances: bool = True,
               karpathy: bool = False) -> list[CocoImage]:
    """Write a COCO tree at ``root`` (``layout`` "2017" or "2014"); returns its images.

    ``instances`` also writes ``instances_<split><year>.json``; ``karpathy`` (2014 layout) also writes
    ``dataset_coco.json``, whose val and test images come from val2014, and train and restval from both.
    """
    year = layout
    images = images if images is not None else make_images()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    sentence_id = 770337
    for split in ("train", "val"):
        folder = f"{split}{year}"
        records, captions, objects = [], [], []
        for image in (i for i in images if i.split == split):
            image.file_name = f"COCO_{folder}_{image.image_id:012d}.jpg" if year == "2014" else f"{image.image_id:012d}.jpg"
            _write_picture(image, root / folder / image.file_name)
            records.append(_record(image, folder))
            for caption in image.captions:
                captions.append({"image_id": image.image_id, "id": sentence_id, "caption": caption})
                sentence_id += 13
            for name in image.objects:
                category = next(c for c in CATEGORIES if c["name"] == name)
                objects.append({"segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0]], "area": 200.0, "iscrowd": 0,
                                "image_id": image.image_id, "bbox": [10.0, 10.0, 20.0, 20.0],
                                "category_id": category["id"], "id": 1768 + len(objects) * 7})
        info = {"description": f"COCO {year} Dataset", "url": "http://cocodataset.org", "version": "1.0",
                "year": int(year), "contributor": "COCO Consortium", "date_created": "2017/09/01"}
        # COCO lists the images in another order than the captions
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(
            {"info": info, "licenses": LICENSES, "images": records[::-1], "annotations": captions}))
        if instances:
            (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(
                {"info": info, "licenses": LICENSES, "images": records, "annotations": objects,
                 "categories": CATEGORIES}))
    if karpathy:
        if year != "2014":
            raise ValueError("Karpathy's splits are of the 2014 images")
        write_karpathy(root, images)
    return images


def write_karpathy(root: Path, images: list[CocoImage]) -> None:
    """``dataset_coco.json`` over a written 2014 tree: val2014 images go to val / test / restval, train2014 to train."""
    entries, sentence_id = [], 1
    val_images = [i for i in images if i.split == "val"]
    for k, image in enumerate(val_images):
        image.karpathy_split = ("val", "test", "restval")[k % 3]
    for image in images:
        image.karpathy_split = image.karpathy_split or "train"
    for imgid, image in enumerate(images):
        sentences = []
        for caption in image.captions:
            tokens = [w for w in "".join(ch if ch.isalnum() or ch == " " else " " for ch in caption.lower()).split()]
            sentences.append({"tokens": tokens, "raw": caption, "imgid": imgid, "sentid": sentence_id})
            sentence_id += 1
        entries.append({"filepath": f"{image.split}2014", "sentids": [s["sentid"] for s in sentences],
                        "filename": image.file_name, "imgid": imgid, "split": image.karpathy_split,
                        "sentences": sentences, "cocoid": image.image_id})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))


def check_modes(root: Path) -> set[str]:
    """The PIL modes of the JPEGs under ``root`` (the tests check that greyscale and CMYK are among them)."""
    modes = set()
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            modes.add(image.mode)
    return modes
