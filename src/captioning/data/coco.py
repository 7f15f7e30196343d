"""Datasets and a LightningDataModule for caption sets in the COCO layout, official or Karpathy splits.

Official layout (COCO 2014 and 2017; ``year`` and the split names are configurable)::

    <root>/annotations/captions_<split><year>.json    # COCO keys: images (id, file_name), annotations
    <root>/<split><year>/<file_name>                  #   (id, image_id, caption)

Karpathy splits (``split_source="karpathy"``): ``<root>/dataset_coco.json`` with the images in the
2014 folders, see :mod:`captioning.data.karpathy`.

With ``feature_cache=True`` and a frozen encoder given by :meth:`CocoCaptionsDataModule.use_encoder`,
batches carry the encoder's cached ``features`` instead of ``images`` (see :mod:`captioning.data.features`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from captioning.data.features import (
    FEATURE_DTYPES,
    FEATURE_FORMAT,
    FeatureStore,
    build_feature_store,
    cache_directory,
    encoder_fingerprint,
)
from captioning.data.images import ON_BAD_IMAGE, BadImage, BadImageError, BadImageLog, load_image
from captioning.data.karpathy import karpathy_split_names, read_karpathy
from captioning.data.sampling import ResumableSampler, TrainingPosition, training_position
from captioning.data.transforms import ImagePipeline, image_transform
from captioning.data.vocab import Vocabulary, pad_captions

__all__ = [
    "CaptionSplit",
    "CaptionPairDataset",
    "CaptionedImageDataset",
    "CocoCaptionsDataModule",
    "collate_captions",
    "image_transform",
    "load_caption_split",
    "load_image",
]

SPLIT_SOURCES = ("official", "karpathy")
_INT64_MAX = 2**63 - 1
# Encoder config keys that say where weights come from, not what they are (the weights are hashed anyway).
_NOT_IN_FEATURE_KEY = frozenset({"cache_dir", "download", "download_timeout"})


# ---------------------------------------------------------------------------------------------- annotations
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
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64_MAX <= value <= _INT64_MAX


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
        usable = [c.strip() for c in captions if Vocabulary.tokenize(c)]
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
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _bad_annotations(path, f"it is not readable JSON ({err})") from err
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

    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad(f"it is not readable JSON ({err})") from err
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
    for path in paths:
        folder, name = os.path.split(str(path))
        by_folder[folder].append(name)
    missing = []
    for folder, names in by_folder.items():
        try:
            present = set(os.listdir(folder or "."))
        except (OSError, ValueError):
            present = set()
        # os.path.exists settles what the listing cannot (case-insensitive file systems, odd names)
        missing += [p for n in names if n not in present and not os.path.exists(p := os.path.join(folder, n))]
    return missing


# ---------------------------------------------------------------------------------------------- sources
class ImageSource:
    """Image ``i`` of a split -> ``{"image": (3, S, S)}``, or a :class:`BadImage` when it cannot be read.

    ``on_bad_image="fail"`` raises instead (FileNotFoundError or a ValueError naming the file).
    """

    def __init__(self, paths: np.ndarray, pipeline: ImagePipeline, log: BadImageLog,
                 on_bad_image: str = "skip") -> None:
        self.paths, self.pipeline, self.log = paths, pipeline, log
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, index: int) -> dict[str, torch.Tensor] | BadImage:
        path = str(self.paths[index])
        if self.log.is_bad(index) and self.on_bad_image == "skip":
            return BadImage(path, "unreadable (see the earlier warning)")
        try:
            image = self.pipeline.load(path)
        except (FileNotFoundError, BadImageError) as err:
            if self.on_bad_image == "fail":
                raise type(err)(
                    f"{err}. Replace or remove the file (or its annotation), or set data.on_bad_image=skip "
                    "to skip unreadable images with a warning and train on."
                ) from err
            return self.log.record(index, str(err))
        return {"image": self.pipeline(image)}


class TransformedImages(Dataset):
    """The transformed images of a split, one per row (what the feature cache is built from)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor | BadImage:
        sample = self.source(index)
        return sample if isinstance(sample, BadImage) else sample["image"]


class FeatureSource:
    """Image ``i`` of a split -> ``{"features": (D, h, w)}`` read from the feature cache.

    Row ``i`` of the store is image ``i`` of the split (the cache key includes the split's image list).
    """

    def __init__(self, store: FeatureStore, paths: np.ndarray, log: BadImageLog) -> None:
        self.store, self.paths, self.log = store, paths, log

    def __call__(self, index: int) -> dict[str, torch.Tensor] | BadImage:
        if self.log.is_bad(index):
            return BadImage(str(self.paths[index]), self.store.bad_rows.get(index, "unreadable"))
        return {"features": torch.from_numpy(self.store.row(index))}


Source = Callable[[int], "dict[str, torch.Tensor] | BadImage"]


# ---------------------------------------------------------------------------------------------- datasets
class CaptionPairDataset(Dataset):
    """Training samples: one per (image, caption) pair.

    Captions are encoded once up front into a padded int64 array (P, max_length + 2) so workers share it.
    ``source(i)`` gives image ``i``'s pixels or cached features (or a BadImage, passed through).
    """

    def __init__(self, split: CaptionSplit, vocab: Vocabulary, max_length: int, source: Source) -> None:
        self.split, self.source = split, source
        encoded = [vocab.encode(c, max_length) for refs in split.references for c in refs]
        self.image_index = np.repeat(np.arange(len(split)), [len(r) for r in split.references])
        self.lengths = np.asarray([len(e) for e in encoded], dtype=np.int64)
        self.captions = np.zeros((len(encoded), max_length + 2), dtype=np.int64)
        for row, e in zip(self.captions, encoded, strict=True):
            row[: len(e)] = e

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        i = int(self.image_index[index])
        sample = self.source(i)
        if isinstance(sample, BadImage):
            return sample
        return {
            **sample,
            "caption": torch.from_numpy(self.captions[index, : self.lengths[index]].copy()),
            "image_id": int(self.split.image_ids[i]),
        }


class CaptionedImageDataset(Dataset):
    """Evaluation samples: one per image, with all its raw reference captions.

    ``caption`` is the first reference encoded, for a teacher-forced validation loss.
    """

    def __init__(self, split: CaptionSplit, vocab: Vocabulary, max_length: int, source: Source) -> None:
        self.split, self.source = split, source
        self.first_captions = [vocab.encode(refs[0], max_length) for refs in split.references]

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        sample = self.source(index)
        if isinstance(sample, BadImage):
            return sample
        return {
            **sample,
            "caption": torch.tensor(self.first_captions[index], dtype=torch.long),
            "image_id": int(self.split.image_ids[index]),
            "references": list(self.split.references[index]),
        }


def collate_captions(samples: Sequence[dict[str, Any] | BadImage | None]) -> dict[str, Any]:
    """Samples -> batch dict; samples of unreadable images (BadImage or None) are dropped.

    ``images`` (N, 3, S, S) float, or ``features`` (N, D, h, w) float32 from the feature cache;
    ``captions`` (N, T+1) long, ``[<START>] w1..wk [<END>]`` padded with ``<NULL>`` = 0 to the longest in
    the batch; ``image_ids`` (N,) long; plus ``references`` (N lists of raw strings) for evaluation samples.
    """
    kept = [s for s in samples if s is not None and not isinstance(s, BadImage)]
    if not kept:
        named = [s.path for s in samples if isinstance(s, BadImage)][:5]
        raise ValueError(
            f"Every image of a batch of {len(samples)} was unreadable ({', '.join(named) or 'no sample'}); "
            "see the warnings above. So many broken files usually mean a wrong data.root or a damaged "
            "download: check the image folders."
        )
    batch: dict[str, Any] = {}
    if "features" in kept[0]:
        batch["features"] = torch.stack([s["features"] for s in kept]).float()
    else:
        batch["images"] = torch.stack([s["image"] for s in kept])
    batch["captions"] = pad_captions([s["caption"] for s in kept])
    batch["image_ids"] = torch.tensor([s["image_id"] for s in kept], dtype=torch.long)
    if "references" in kept[0]:
        batch["references"] = [s["references"] for s in kept]
    return batch


class SkippingCollate:
    """:func:`collate_captions` for one dataset, so that a run never stops on a batch of broken files.

    In the rare batch whose every image is unreadable (a small last batch, or a run of broken files), the
    first readable sample of the dataset found from a pseudo-random position (fixed by the broken files'
    names, so runs repeat) takes their place; only when none of ``max_tries`` samples is readable does it
    raise the ValueError of :func:`collate_captions`.
    """

    def __init__(self, dataset: Dataset, max_tries: int = 1000) -> None:
        self.dataset, self.max_tries = dataset, max_tries

    def __call__(self, samples: Sequence[dict[str, Any] | BadImage | None]) -> dict[str, Any]:
        if any(s is not None and not isinstance(s, BadImage) for s in samples) or not len(self.dataset):
            return collate_captions(samples)
        size = len(self.dataset)
        names = "".join(s.path for s in samples if isinstance(s, BadImage))
        start = zlib.crc32(names.encode("utf-8", "replace")) % size
        for k in range(min(size, self.max_tries)):
            sample = self.dataset[(start + k) % size]
            if not isinstance(sample, BadImage):
                return collate_captions([sample])
        return collate_captions(samples)  # raises, naming the files


def _plain(value: Any) -> Any:
    """Config nodes (Hydra's DictConfig / ListConfig included) -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _file_signature(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "-"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _encoder_is_frozen(encoder: nn.Module) -> bool:
    frozen = getattr(encoder, "frozen", None)
    if isinstance(frozen, bool):
        return frozen
    return not any(p.requires_grad for p in encoder.parameters())


# ---------------------------------------------------------------------------------------------- datamodule
class CocoCaptionsDataModule(L.LightningDataModule):
    """Caption data in the COCO layout, for training (pairs) and evaluation (images + references).

    Args:
        root: folder holding ``annotations/`` and the ``<split><year>/`` image folders (and, for Karpathy
            splits, ``dataset_coco.json``).
        year: the suffix of file and folder names, "2017" or "2014" (official splits only).
        train_split, val_split, test_split: split names; ``test_split=None`` when there is no test set
            (COCO 2017 publishes no test captions). For Karpathy splits: "train", "val", "test".
        image_size: images are resized to ``image_size`` x ``image_size``.
        max_length: captions are cut to this many words; encoded captions hold at most
            ``max_length + 2`` tokens (with ``<START>`` and ``<END>``).
        min_word_count: training-caption words seen fewer times become ``<UNK>``.
        vocab_path: the vocabulary JSON; default ``<root>/vocab_<train_split><year>_min<k>.json``,
            or a per-root file under ``~/.cache/captioning/`` when ``root`` is not writable.
        batch_size: samples per batch **per device (process)**. Under DDP each process loads its own
            batches, so the global batch is ``batch_size x devices x num_nodes`` (times gradient
            accumulation); scale the learning rate accordingly.
        num_workers, pin_memory, persistent_workers: as for ``torch.utils.data.DataLoader``
            (``persistent_workers`` only applies when ``num_workers > 0``).
        augment: mild random-resized crop on training images (no flips or colour jitter: captions
            name sides and colours).
        split_source: "official" (``captions_<split><year>.json``) or "karpathy" (``dataset_coco.json``).
        karpathy_file: the Karpathy split file; default ``<root>/dataset_coco.json``.
        restval: with Karpathy splits, train on train + restval (113,287 images) rather than train alone.
        on_bad_image: "skip" an unreadable image (corrupt, truncated, empty, not an image, too large) with a
            warning naming it, counted in :attr:`bad_images`; or "fail" with an error naming it.
        max_image_pixels: images with more pixels are refused as possible decompression bombs; default
            PIL's ``Image.MAX_IMAGE_PIXELS`` (~89 Mpx).
        feature_cache: read a frozen encoder's features from a cache built once by ``prepare_data``
            instead of decoding images: batches carry ``features`` (N, D, h, w) in place of ``images``.
            Needs :meth:`use_encoder` with a frozen encoder; incompatible with ``augment``.
        cache_dir: where feature caches live; default ``<root>/features`` (or under ``~/.cache/captioning``
            when ``root`` is not writable).
        feature_dtype: "float16" (half the disk and page cache) or "float32".
        progress: show a progress bar while building the feature cache.
    """

    def __init__(self, root: str, year: str = "2017", train_split: str = "train", val_split: str = "val",
                 test_split: str | None = "test", image_size: int = 224, max_length: int = 16,
                 min_word_count: int = 5, vocab_path: str | None = None, batch_size: int = 64,
                 num_workers: int = 2, pin_memory: bool = False, persistent_workers: bool = True,
                 augment: bool = False, split_source: str = "official", karpathy_file: str | None = None,
                 restval: bool = True, on_bad_image: str = "skip", max_image_pixels: int | None = None,
                 feature_cache: bool = False, cache_dir: str | None = None, feature_dtype: str = "float16",
                 progress: bool = True) -> None:
        super().__init__()
        for name, value, minimum in (("image_size", image_size, 1), ("max_length", max_length, 1),
                                     ("min_word_count", min_word_count, 1), ("batch_size", batch_size, 1),
                                     ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}.")
        for name, value, choices in (("split_source", split_source, SPLIT_SOURCES),
                                     ("on_bad_image", on_bad_image, ON_BAD_IMAGE),
                                     ("feature_dtype", feature_dtype, FEATURE_DTYPES)):
            if value not in choices:
                raise ValueError(f"data.{name}={value!r} is not one of {', '.join(map(repr, choices))}.")
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool)
                                             or not isinstance(max_image_pixels, int) or max_image_pixels < 1):
            raise ValueError(f"data.max_image_pixels must be a positive integer or null, got {max_image_pixels!r}.")
        if feature_cache and augment:
            raise ValueError(
                "data.feature_cache=true computes each image's features once, so it cannot apply "
                "data.augment=true (a new random crop every epoch). Set one of them to false."
            )
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.year = str(year)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.image_size, self.max_length, self.min_word_count = image_size, max_length, min_word_count
        self._vocab_path = Path(vocab_path).expanduser() if vocab_path else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.augment = pin_memory, persistent_workers, augment
        self.split_source, self.restval = split_source, bool(restval)
        self.karpathy_file = Path(karpathy_file).expanduser() if karpathy_file else self.root / "dataset_coco.json"
        self.on_bad_image, self.max_image_pixels = on_bad_image, max_image_pixels
        self.feature_cache, self.feature_dtype, self.progress = bool(feature_cache), feature_dtype, progress
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._encoder: nn.Module | None = None
        self._encoder_config: dict[str, Any] = {}
        self._encoder_fingerprint: str | None = None
        self._feature_keys: dict[str, tuple[CaptionSplit, dict[str, Any]]] = {}
        self._vocab: Vocabulary | None = None
        self._splits: dict[str, tuple[Any, CaptionSplit]] = {}
        self._karpathy: tuple[Any, list] | None = None
        self.datasets: dict[str, Dataset] = {}
        self.bad_image_logs: dict[str, BadImageLog] = {}
        self._resume_position: TrainingPosition | None = None

    # ------------------------------------------------------------------ paths
    def _writable_home(self, name: str) -> Path:
        """``<root>/<name>``, or a per-root folder under ~/.cache/captioning when root is read-only."""
        root = self.root.absolute()
        if os.access(root, os.W_OK) or not root.exists():
            return root / name
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
        return Path("~/.cache/captioning").expanduser() / f"{root.name}-{digest}" / name

    @property
    def vocab_path(self) -> Path:
        """Where the vocabulary lives; the same on every rank (it depends only on the arguments)."""
        if self._vocab_path is not None:
            return self._vocab_path
        if self.split_source == "karpathy":
            train = f"{self.splits['train']}" + ("+restval" if self.restval and self.splits["train"] == "train" else "")
            return self._writable_home(f"vocab_karpathy_{train}_min{self.min_word_count}.json")
        return self._writable_home(f"vocab_{self.splits['train']}{self.year}_min{self.min_word_count}.json")

    @property
    def cache_dir(self) -> Path:
        """The folder holding feature caches (one sub-folder per cache key)."""
        return self._cache_dir if self._cache_dir is not None else self._writable_home("features")

    def _annotation_file(self, role: str) -> Path:
        if self.split_source == "karpathy":
            return self.karpathy_file
        return annotation_path(self.root, self._split_name(role), self.year)

    # ------------------------------------------------------------------ vocabulary
    def _vocab_fingerprint(self) -> dict[str, Any]:
        """What the saved vocabulary was built from; a mismatch means the training captions changed."""
        path = self._annotation_file("train") if self.splits["train"] else Path("-")
        size = path.stat().st_size if path.is_file() else None
        meta = {"annotation_file": path.name, "annotation_bytes": size, "min_word_count": self.min_word_count}
        if self.split_source == "karpathy":
            meta["restval"] = self.restval
        return meta

    def prepare_data(self) -> None:
        """Build the vocabulary from the training captions (skipped when an up-to-date one exists), and
        with ``feature_cache`` the feature caches of every split (each skipped when complete).

        Lightning calls this on one process per node, before ``setup`` on all of them.
        """
        path = self.vocab_path
        if not (path.is_file() and (self._vocab_path is not None
                                    or Vocabulary.read_metadata(path) == self._vocab_fingerprint())):
            # an explicit vocab_path is used as given; the default one is rebuilt when stale
            split = self._load_split("train")
            vocab = Vocabulary.build((c for refs in split.references for c in refs), self.min_word_count)
            vocab.save(path, metadata=self._vocab_fingerprint())
        if self.feature_cache:
            for role in self._roles(None):
                self._build_features(role)

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary (after ``prepare_data``); loaded from ``vocab_path`` on first use."""
        if self._vocab is None:
            if not self.vocab_path.is_file():
                raise RuntimeError(
                    f"No vocabulary yet at {self.vocab_path}: call prepare_data() (it builds the vocabulary "
                    "from the training captions) and setup() before using the DataModule's vocab."
                )
            self._vocab = Vocabulary.load(self.vocab_path)
        return self._vocab

    # ------------------------------------------------------------------ splits
    def _split_name(self, role: str) -> str:
        if role in self.splits:
            name = self.splits[role]
        elif role in self.splits.values():
            name = role
        else:
            raise ValueError(f"Unknown split {role!r}; use one of 'train', 'val', 'test' "
                             f"(here {[s for s in self.splits.values() if s]}).")
        if not name:
            raise ValueError(f"This DataModule has no {role} split (data.{role}_split is empty).")
        return name

    def _load_split(self, role: str) -> CaptionSplit:
        """The split's annotations, read once; read again if the file changed since (size or mtime)."""
        name = self._split_name(role)
        path = self._annotation_file(role)
        stat = path.stat() if path.is_file() else None
        key = (str(path), stat.st_size, stat.st_mtime_ns, self.restval) if stat else None
        cached = self._splits.get(name)
        if key is None or cached is None or cached[0] != key:
            if self.split_source == "karpathy":
                split = self._load_karpathy_split(name, key)
            else:
                split = load_caption_split(self.root, name, self.year)
            self._splits[name] = (key, split)
        return self._splits[name][1]

    def _load_karpathy_split(self, name: str, key: Any) -> CaptionSplit:
        check_root(self.root, f"Karpathy splits are read from {self.karpathy_file} (data.karpathy_file) with "
                              f"the images at {self.root}/<filepath>/<filename>.")
        if key is None or self._karpathy is None or self._karpathy[0] != key[:3]:
            # dataset_coco.json is ~150 MB: parse it once for all splits
            self._karpathy = (key[:3] if key else None, read_karpathy(self.karpathy_file))
        labels = karpathy_split_names(name, self.restval and name == self.splits["train"])
        entries = [e for e in self._karpathy[1] if e.split in labels]
        return clean_split(self.karpathy_file, "+".join(labels), [e.image_id for e in entries],
                           [str(self.root / e.path) for e in entries], [list(e.captions) for e in entries])

    def _check_images(self, role: str, split: CaptionSplit) -> None:
        missing = missing_images(split.image_paths)
        if missing:
            listed = "\n  ".join(missing[:5])
            raise FileNotFoundError(
                f"{len(missing)} of the {len(split)} images of the {role} split listed in "
                f"{split.annotation_file} are missing, e.g.\n  {listed}\nCheck data.root (and data.year / the "
                "split names), and that the image folders were fully downloaded and unpacked; or remove the "
                "entries of the images you do not have from the annotation file."
            )

    def _roles(self, stage: str | None) -> list[str]:
        return {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}.get(
            stage or "", ["train", "val"] + (["test"] if self.splits["test"] else []))

    # ------------------------------------------------------------------ feature cache
    def use_encoder(self, encoder: nn.Module, key: Mapping[str, Any]) -> None:
        """The frozen encoder whose features ``feature_cache`` stores, and its plain config (for the key).

        Call before ``prepare_data`` / ``trainer.fit``. ``key`` is the encoder's ``_target_`` config
        (name, weights, spatial_size, ...); the cache key also holds a hash of the encoder's weights.
        """
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"use_encoder needs the encoder nn.Module, got {type(encoder).__name__}.")
        if self.feature_cache and not _encoder_is_frozen(encoder):
            raise ValueError(
                f"data.feature_cache=true needs a frozen encoder, but {type(encoder).__name__} "
                f"({dict(key).get('_target_', '?')}) is trainable: its features change as it learns, so they "
                "cannot be computed once. Set encoder.freeze=true (a torchvision encoder such as "
                "encoder=mobilenet_v2 encoder.freeze=true), or data.feature_cache=false."
            )
        self._encoder = encoder
        self._encoder_config = {k: v for k, v in _plain(key).items() if k not in _NOT_IN_FEATURE_KEY}
        self._encoder_fingerprint = None
        self._feature_keys.clear()

    def _require_encoder(self) -> nn.Module:
        if self._encoder is None:
            raise RuntimeError(
                "data.feature_cache=true, but no encoder was given to the DataModule: the features come from "
                "a frozen encoder (set encoder.freeze=true) that train.py hands over with "
                "datamodule.use_encoder(module.encoder, encoder_config) before fitting. Call use_encoder(), "
                "or set data.feature_cache=false."
            )
        if not _encoder_is_frozen(self._encoder):
            raise ValueError(
                f"data.feature_cache=true needs a frozen encoder; {type(self._encoder).__name__} is trainable. "
                "Set encoder.freeze=true, or data.feature_cache=false."
            )
        return self._encoder

    def feature_key(self, role: str) -> dict[str, Any]:
        """Everything the cached features of ``role`` depend on; its hash names the cache directory.

        The split part holds every image's id, path, size and modification time, so images replaced in
        place (a regenerated data set) make a new cache too.
        """
        encoder = self._require_encoder()
        if self._encoder_fingerprint is None:
            self._encoder_fingerprint = encoder_fingerprint(encoder)
        split = self._load_split(role)
        cached = self._feature_keys.get(role)
        if cached is not None and cached[0] is split:
            return cached[1]
        self._check_images(role, split)
        prefix = str(self.root) + os.sep
        names = "\n".join(f"{i}\t{p.removeprefix(prefix)}\t{_file_signature(p)}" for i, p in
                          zip(split.image_ids.tolist(), split.image_paths.tolist(), strict=True))
        key = {
            "format": FEATURE_FORMAT,
            "encoder": self._encoder_config,
            "encoder_class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
            "encoder_cache_key": str(getattr(encoder, "cache_key", "")),
            "encoder_weights": self._encoder_fingerprint,
            "image_size": self.image_size,
            "transform": repr(image_transform(self.image_size)),
            "dtype": self.feature_dtype,
            "split": {"source": self.split_source, "name": self._split_name(role),
                      "restval": self.restval if self.split_source == "karpathy" else None,
                      "images": len(split), "files": hashlib.sha256(names.encode("utf-8", "replace")).hexdigest()},
        }
        self._feature_keys[role] = (split, key)
        return key

    def feature_directory(self, role: str) -> Path:
        return cache_directory(self.cache_dir, self.feature_key(role), self._split_name(role))

    def _feature_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _image_source(self, role: str, split: CaptionSplit, augment: bool = False) -> ImageSource:
        log = self.bad_image_logs.setdefault(role, BadImageLog(split.image_paths, role))
        return ImageSource(split.image_paths, self.image_pipeline(augment), log, self.on_bad_image)

    def image_pipeline(self, augment: bool = False) -> ImagePipeline:
        """How this DataModule reads an image file (caption.py and the demo read theirs the same way)."""
        return ImagePipeline(self.image_size, augment, self.max_image_pixels)

    def _build_features(self, role: str) -> FeatureStore:
        directory = self.feature_directory(role)
        try:
            return FeatureStore(directory)
        except RuntimeError:
            pass  # not built yet, or interrupted: build (or resume) below
        split = self._load_split(role)
        images = TransformedImages(self._image_source(role, split))
        return build_feature_store(
            directory, self.feature_key(role), split.image_ids, images, self._require_encoder(),
            device=self._feature_device(), batch_size=self.batch_size, num_workers=self.num_workers,
            dtype=self.feature_dtype, progress=self.progress,
            description=f"encoder features {self._split_name(role)}",
        )

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        """Load the vocabulary (every rank) and build the datasets the stage needs."""
        self._vocab = None  # re-read: prepare_data may have rebuilt it since
        if not self.vocab_path.is_file():
            self._load_split("train")  # a missing root or annotation file is the likelier, clearer error
        vocab = self.vocab
        for role in self._roles(stage):
            if role in self.datasets:
                continue
            split = self._load_split(role)
            if self.feature_cache:
                store = FeatureStore(self.feature_directory(role))
                log = self.bad_image_logs.setdefault(role, BadImageLog(split.image_paths, role))
                log.mark(sorted(store.bad_rows))
                if store.bad_rows:
                    warnings.warn(
                        f"{len(store.bad_rows)} {role} images could not be read when the feature cache was "
                        f"built and are skipped, e.g. {list(store.bad_rows.values())[:3]}.", UserWarning,
                        stacklevel=2)
                source: Source = FeatureSource(store, split.image_paths, log)
            else:
                self._check_images(role, split)
                source = self._image_source(role, split, augment=self.augment and role == "train")
            dataset_type = CaptionPairDataset if role == "train" else CaptionedImageDataset
            self.datasets[role] = dataset_type(split, vocab, self.max_length, source)

    @property
    def bad_images(self) -> dict[str, list[str]]:
        """role -> the images found unreadable so far (and skipped), across all DataLoader workers."""
        return {role: log.bad_paths() for role, log in self.bad_image_logs.items() if log.count}

    @property
    def bad_image_count(self) -> int:
        return sum(log.count for log in self.bad_image_logs.values())

    def teardown(self, stage: str | None = None) -> None:
        bad = self.bad_images
        if bad:
            summary = "; ".join(f"{role}: {len(paths)} (e.g. {', '.join(paths[:3])})" for role, paths in bad.items())
            warnings.warn(f"Unreadable images were skipped — {summary}. Replace or remove them.", UserWarning,
                          stacklevel=2)

    def references(self, split: str) -> dict[int, list[str]]:
        """image_id -> raw reference captions of ``split`` ('train', 'val', 'test' or a split name)."""
        data = self._load_split(split)
        return {int(i): list(refs) for i, refs in zip(data.image_ids, data.references, strict=True)}

    def object_categories(self, split: str) -> dict[int, set[str]]:
        """image_id -> the COCO object categories its instance annotations hold, for the images of ``split``
        whose folder has an ``annotations/instances_<folder>.json`` (``instances_val2017.json`` for
        ``val2017/``; Karpathy's splits draw on the 2014 folders); {} when there is none."""
        data = self._load_split(split)
        by_folder: dict[str, list[int]] = defaultdict(list)
        for image_id, path in zip(data.image_ids.tolist(), data.image_paths.tolist(), strict=True):
            by_folder[Path(path).parent.name].append(image_id)
        categories: dict[int, set[str]] = {}
        for folder, ids in by_folder.items():
            path = instances_path(self.root, folder)
            if path.is_file():
                categories.update(load_instance_categories(path, ids))
        return categories

    def scenes(self, split: str) -> dict[int, dict[str, Any]]:
        """image_id -> what the image shows (objects with shape, colour, size, centre; width, height), for
        annotation files that record it (the built-in set); {} otherwise."""
        data = self._load_split(split)
        if data.scenes is None:
            return {}
        return {int(i): scene for i, scene in zip(data.image_ids, data.scenes, strict=True)}

    # ------------------------------------------------------------------ loaders
    def _loader(self, role: str, sampler: Any = None, generator: torch.Generator | None = None) -> DataLoader:
        if role not in self.datasets:
            raise RuntimeError(f"The {role} dataset is not built; call setup() with a stage that uses it first.")
        return DataLoader(
            self.datasets[role], batch_size=self.batch_size, sampler=sampler, shuffle=False, drop_last=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=SkippingCollate(self.datasets[role]),
            persistent_workers=self.persistent_workers and self.num_workers > 0, generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled pairs in an order fixed by the run's ``seed`` and the epoch (see
        :class:`~captioning.data.sampling.ResumableSampler`), continued where a resumed checkpoint stopped."""
        if "train" not in self.datasets:
            raise RuntimeError("The train dataset is not built; call setup('fit') first.")
        trainer = self.trainer
        world_size, rank, epoch = ((trainer.world_size, trainer.global_rank, trainer.current_epoch)
                                   if trainer is not None else (1, 0, 0))
        # Lightning's convention for the samplers it injects: the seed_everything seed, else 0 (every rank agrees).
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(self.datasets["train"], num_replicas=world_size, rank=rank, seed=seed,
                                   epoch=epoch)
        position, self._resume_position = self._resume_position, None
        if position is not None:
            if (position.batch_size, position.world_size) == (self.batch_size, world_size):
                sampler.resume(position.epoch, position.batch * self.batch_size)
                if position.batch:
                    rank_zero_info(f"Resuming the data order of epoch {position.epoch} at batch {position.batch}.")
            else:
                warnings.warn(
                    f"The checkpoint was written with data.batch_size={position.batch_size} on "
                    f"{position.world_size} process(es) and this run uses {self.batch_size} on {world_size}: the "
                    f"rest of epoch {position.epoch} cannot continue the interrupted order, so its remaining "
                    "batches restart that epoch's order from the beginning. Resume with the same batch size and "
                    "number of devices to continue exactly.", UserWarning, stacklevel=2)
                sampler.set_epoch(position.epoch)
        # Its own generator: creating the iterator (and the workers' seeds) must not draw from the global
        # random state, or a resumed run's dropout would drift from the uninterrupted run's.
        return self._loader("train", sampler=sampler, generator=torch.Generator().manual_seed(seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Where training stands (epoch, batch, batch size, processes): a resumed run continues the data
        order from there. Plain ints, so checkpoints still load with ``weights_only=True``."""
        position = training_position(self.trainer, self.batch_size)
        return {"train_position": position.state_dict()} if position is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_position" in state_dict:
            self._resume_position = TrainingPosition.from_state_dict(state_dict["train_position"])
            # Lightning only asks the DataLoader itself whether it can resume; this DataModule does it.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the "
                                    "epoch ended and your dataloader is not resumable")
