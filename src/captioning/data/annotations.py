"""Caption annotations in COCO's official files: reading, checking and cleaning one split.

The twin of :mod:`captioning.data.karpathy` (Karpathy's ``dataset_coco.json``). Official layout (COCO 2014
and 2017; ``year`` and the split names are configurable)::

    <root>/annotations/captions_<split><year>.json    # COCO keys: images (id, file_name), annotations
    <root>/annotations/instances_<split><year>.json   # optional: the objects in each image (CHAIR)
    <root>/<split><year>/<file_name>                  #   (id, image_id, caption)

Every problem with a file is a one-paragraph error naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioning.data.arrow_rows import arrow_file
from captioning.data.vocab import Vocabulary
from captioning.io import read_json

__all__ = [
    "CaptionSplit",
    "annotation_path",
    "check_root",
    "clean_split",
    "image_dir",
    "instances_path",
    "load_caption_split",
    "load_instance_categories",
    "missing_images",
    "require_images",
    "split_instance_categories",
]

INT64_MAX = 2**63 - 1  # image ids must fit the int64 tensors they travel in


@dataclass(frozen=True)
class CaptionSplit:
    """One split's images and their raw reference captions, in annotation-file order.

    ``image_paths`` is a numpy array of strings rather than a list so DataLoader workers do not
    copy it page by page through reference counting. ``dropped_captions`` counts the empty or
    punctuation-only captions left out.
    """

    annotation_file: Path
    image_ids: np.ndarray  # (I,) int64
    image_paths: np.ndarray  # (I,) str
    references: list[list[str]]  # I lists, each the image's captions in annotation order
    dropped_captions: int = 0
    # what each image shows, where the annotation file says (the built-in set's ``scene`` records, with the
    # image's width and height): the truth the grounded metrics check captions against; else None
    scenes: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)


def annotation_path(root: str | os.PathLike, split: str, year: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}{year}.json"


def image_dir(root: str | os.PathLike, split: str, year: str) -> Path:
    return Path(root) / f"{split}{year}"


def _layout_hint(root: Path, split: str, year: str) -> str:
    return (
        f"A COCO-format caption set is laid out as {root}/annotations/captions_<split><year>.json with "
        f"the images in {root}/<split><year>/ (here {annotation_path(root, split, year)} and "
        f"{image_dir(root, split, year)}/); check data.root, data.year and the split names."
    )


def _bad_annotations(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"Annotation file {path} is not a COCO captions file: {problem}. It needs a JSON object with "
        "'images' (each with 'id' and 'file_name') and 'annotations' (each with 'id', 'image_id' and "
        "'caption'), as in the official captions_<split><year>.json; re-download or regenerate it."
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX <= value <= INT64_MAX


def check_root(root: Path, hint: str) -> None:
    if not root.is_dir():
        raise FileNotFoundError(
            f"Data root {root} does not exist or is not a directory. Set data.root to the folder holding "
            "the caption set (the built-in shapes set is generated there by data=shapes). " + hint
        )


def clean_split(annotation_file: Path, label: str, image_ids: Sequence[int], image_paths: Sequence[str],
                references: Sequence[Sequence[str]],
                scenes: Sequence[dict[str, Any] | None] | None = None) -> CaptionSplit:
    """Drop captions without a single word (empty or punctuation only), then images left without any.

    Warns with the counts; raises ValueError naming the file when no image is left. ``scenes`` (one per
    image, or None) are kept only when every image has one.
    """
    ids, paths, refs, kept_scenes, dropped, emptied = [], [], [], [], 0, []
    all_scenes = scenes if scenes is not None else [None] * len(image_ids)
    for image_id, path, captions, scene in zip(image_ids, image_paths, references, all_scenes, strict=True):
        usable = [c.strip() for c in captions if Vocabulary.has_words(c)]
        dropped += len(captions) - len(usable)
        if not usable:
            if captions:
                emptied.append(image_id)
            continue
        ids.append(int(image_id))
        paths.append(str(path))
        refs.append(usable)
        kept_scenes.append(scene)
    if dropped:
        warnings.warn(
            f"{annotation_file} ({label}): dropped {dropped} empty or punctuation-only captions"
            + (f"; {len(emptied)} images had no usable caption left and are left out (ids {emptied[:5]})"
               if emptied else "") + ". Fix or remove those annotations to silence this.",
            UserWarning, stacklevel=3,
        )
    if not ids:
        raise ValueError(
            f"The {label} split of {annotation_file} has no images with a usable caption (it lists "
            f"{len(image_ids)} images). Check that data.*_split names the split you meant, and that the "
            "file's annotations refer to its images and hold words."
        )
    has_scenes = bool(kept_scenes) and all(scene is not None for scene in kept_scenes)
    return CaptionSplit(annotation_file, np.asarray(ids, dtype=np.int64), np.asarray(paths, dtype=str), refs,
                        dropped, kept_scenes if has_scenes else None)


def load_caption_split(root: str | os.PathLike, split: str, year: str) -> CaptionSplit:
    """Read ``captions_<split><year>.json`` with pycocotools and check it, with errors that say what to do.

    Images without any caption are dropped (nothing to train on or score against), as are empty or
    punctuation-only captions (with a warning).
    """
    from pycocotools.coco import COCO

    root = Path(root)
    check_root(root, _layout_hint(root, split, year))
    path = annotation_path(root, split, year)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} not found. " + _layout_hint(root, split, year))
    data = read_json(path, lambda problem: _bad_annotations(path, problem))
    if not isinstance(data, dict):
        raise _bad_annotations(path, f"the top level is a JSON {type(data).__name__}, not an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise _bad_annotations(path, f"the key '{key}' is missing or not a list")
    seen: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise _bad_annotations(path, f"images[{i}] = {str(img)[:120]} lacks 'id' or 'file_name'")
        if not _is_id(img["id"]):
            raise _bad_annotations(path, f"images[{i}] has id {str(img['id'])[:60]}, not an integer")
        if not img["file_name"] or "\x00" in img["file_name"]:
            raise _bad_annotations(path, f"images[{i}] (id {img['id']}) has file_name {img['file_name']!r}")
        if img["id"] in seen:
            raise _bad_annotations(path, f"images[{i}] repeats image id {img['id']}")
        seen.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
            raise _bad_annotations(path, f"annotations[{i}] = {str(ann)[:120]} lacks 'id' or 'image_id'")
        if not _is_id(ann["image_id"]) or isinstance(ann["id"], dict | list):
            raise _bad_annotations(path, f"annotations[{i}] has image_id {str(ann['image_id'])[:60]} / id "
                                         f"{str(ann['id'])[:60]}; both must be integers")
        if not isinstance(ann.get("caption"), str):
            raise _bad_annotations(path, f"annotations[{i}] (id {ann['id']}) has no string 'caption'")

    coco = COCO()
    # only what captions need: a stray 'categories' key would make pycocotools index category ids too
    coco.dataset = {"images": data["images"], "annotations": data["annotations"]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    unknown = set(coco.imgToAnns) - set(coco.imgs)
    if unknown:
        raise _bad_annotations(path, f"captions refer to image ids not in 'images', e.g. {sorted(unknown)[:5]}")

    folder = image_dir(root, split, year)
    captioned = [img for img in data["images"] if coco.imgToAnns.get(img["id"])]
    return clean_split(
        path, f"{split}{year}",
        [img["id"] for img in captioned],
        [str(folder / img["file_name"]) for img in captioned],
        [[a["caption"] for a in coco.imgToAnns[img["id"]]] for img in captioned],
        [_scene(img) for img in captioned],
    )


def _scene(image: dict[str, Any]) -> dict[str, Any] | None:
    """An image record's ``scene`` (what it shows: the built-in set writes one), with the image's size."""
    scene = image.get("scene")
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        return None
    return {**scene, "width": image.get("width"), "height": image.get("height")}


def instances_path(root: str | os.PathLike, folder: str) -> Path:
    """The instance annotations of an image folder: ``<root>/annotations/instances_<folder>.json``."""
    return Path(root) / "annotations" / f"instances_{folder}.json"


def load_instance_categories(path: Path, image_ids: Sequence[int] | None = None) -> dict[int, set[str]]:
    """image_id -> the category names of its instance annotations, from a COCO ``instances_*.json``.

    Every image the file lists is included (one without annotations has an empty set: nothing is in it);
    with ``image_ids`` only those. Raises ValueError naming the file when it is not an instances file.
    """
    from pycocotools.coco import COCO

    def bad(problem: str) -> ValueError:
        return ValueError(
            f"Instance annotation file {path} is not a COCO instances file: {problem}. It needs 'images' (each "
            "with 'id'), 'annotations' (each with 'image_id' and 'category_id') and 'categories' (each with 'id' "
            "and 'name'), as in the official instances_<split><year>.json; re-download it, or move it out of "
            "annotations/ to evaluate without the CHAIR hallucination metrics."
        )

    data = read_json(path, bad)
    if not isinstance(data, dict):
        raise bad(f"the top level is a JSON {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise bad(f"the key '{key}' is missing or not a list")
    if not all(isinstance(c, dict) and _is_id(c.get("id")) and isinstance(c.get("name"), str)
               for c in data["categories"]):
        raise bad("a category lacks an integer 'id' or a string 'name'")
    if not all(isinstance(i, dict) and _is_id(i.get("id")) for i in data["images"]):
        raise bad("an image lacks an integer 'id'")
    if not all(isinstance(a, dict) and _is_id(a.get("image_id")) and _is_id(a.get("category_id")) and "id" in a
               for a in data["annotations"]):
        raise bad("an annotation lacks an 'id', or an integer 'image_id' or 'category_id'")
    coco = COCO()
    coco.dataset = {key: data[key] for key in ("images", "annotations", "categories")}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    unknown = {a["category_id"] for a in data["annotations"]} - set(coco.cats)
    if unknown:
        raise bad(f"annotations use category ids not in 'categories', e.g. {sorted(unknown)[:5]}")
    wanted = set(coco.imgs) if image_ids is None else set(map(int, image_ids)) & set(coco.imgs)
    return {int(i): {coco.cats[a["category_id"]]["name"] for a in coco.imgToAnns.get(i, [])} for i in sorted(wanted)}


def missing_images(paths: Sequence[str] | np.ndarray) -> list[str]:
    """The paths that do not exist, found with one directory listing per folder (fast on COCO's 123k)."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    in_arrow: dict[str, list[str]] = defaultdict(list)  # rows of a dataset's Arrow files: there while the file is
    for path in map(str, paths):
        if "#" in path and (file := arrow_file(path)) != path:
            in_arrow[file].append(path)
            continue
        folder, name = os.path.split(path)
        by_folder[folder].append(name)
    missing = [path for file, rows in in_arrow.items() if not os.path.isfile(file) for path in rows]
    for folder, names in by_folder.items():
        try:
            present = set(os.listdir(folder or "."))
        except (OSError, ValueError):
            present = set()
        # os.path.exists settles what the listing cannot (case-insensitive file systems, odd names)
        missing += [p for n in names if n not in present and not os.path.exists(p := os.path.join(folder, n))]
    return missing


def require_images(split: CaptionSplit, role: str) -> None:
    """FileNotFoundError listing the first missing files when images of ``split`` are not on disk."""
    missing = missing_images(split.image_paths)
    if missing:
        listed = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of the {len(split)} images of the {role} split listed in "
            f"{split.annotation_file} are missing, e.g.\n  {listed}\nCheck data.root (and data.year / the "
            "split names), and that the image folders were fully downloaded and unpacked; or remove the "
            "entries of the images you do not have from the annotation file."
        )


def split_instance_categories(root: str | os.PathLike, split: CaptionSplit) -> dict[int, set[str]]:
    """image_id -> COCO object categories, for the images of ``split`` whose folder has an
    ``annotations/instances_<folder>.json`` (``instances_val2017.json`` for ``val2017/``; Karpathy's splits
    draw on the 2014 folders); {} when none has."""
    by_folder: dict[str, list[int]] = defaultdict(list)
    for image_id, path in zip(split.image_ids.tolist(), split.image_paths.tolist(), strict=True):
        by_folder[Path(path).parent.name].append(image_id)
    categories: dict[int, set[str]] = {}
    for folder, ids in by_folder.items():
        path = instances_path(root, folder)
        if path.is_file():
            categories.update(load_instance_categories(path, ids))
    return categories
