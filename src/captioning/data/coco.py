"""Datasets and a LightningDataModule for any caption set in the official COCO captions layout.

Layout (COCO 2014 and 2017; ``year`` and the split names are configurable)::

    <root>/annotations/captions_<split><year>.json    # COCO keys: images (id, file_name), annotations
    <root>/<split><year>/<file_name>                  #   (id, image_id, caption)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from captioning.data.vocab import Vocabulary, pad_captions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- annotations
@dataclass(frozen=True)
class CaptionSplit:
    """One split's images and their raw reference captions, in annotation-file order.

    ``image_paths`` is a numpy array of strings rather than a list so DataLoader workers do not
    copy it page by page through reference counting.
    """

    annotation_file: Path
    image_ids: np.ndarray  # (I,) int64
    image_paths: np.ndarray  # (I,) str
    references: list[list[str]]  # I lists, each the image's captions in annotation order

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


def load_caption_split(root: str | os.PathLike, split: str, year: str) -> CaptionSplit:
    """Read ``captions_<split><year>.json`` with pycocotools and check it, with errors that say what to do.

    Images without any caption are dropped (nothing to train on or score against).
    """
    from pycocotools.coco import COCO

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Data root {root} does not exist or is not a directory. Set data.root to the folder holding "
            "the caption set (the built-in shapes set is generated there by data=shapes). "
            + _layout_hint(root, split, year)
        )
    path = annotation_path(root, split, year)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} not found. " + _layout_hint(root, split, year))
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad_annotations(path, f"it is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise _bad_annotations(path, f"the top level is a JSON {type(data).__name__}, not an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise _bad_annotations(path, f"the key '{key}' is missing or not a list")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise _bad_annotations(path, f"images[{i}] = {str(img)[:120]} lacks 'id' or 'file_name'")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
            raise _bad_annotations(path, f"annotations[{i}] = {str(ann)[:120]} lacks 'id' or 'image_id'")
        if not isinstance(ann.get("caption"), str):
            raise _bad_annotations(path, f"annotations[{i}] (id {ann['id']}) has no string 'caption'")

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    unknown = set(coco.imgToAnns) - set(coco.imgs)
    if unknown:
        raise _bad_annotations(path, f"captions refer to image ids not in 'images', e.g. {sorted(unknown)[:5]}")

    folder = image_dir(root, split, year)
    ids, paths, refs = [], [], []
    for img in data["images"]:
        anns = coco.imgToAnns.get(img["id"], [])
        if not anns:
            continue
        ids.append(int(img["id"]))
        paths.append(str(folder / img["file_name"]))
        refs.append([a["caption"].strip() for a in anns])
    return CaptionSplit(path, np.asarray(ids, dtype=np.int64), np.asarray(paths, dtype=str), refs)


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB, with an error naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Image {path} listed in the annotation file is missing; restore it or remove its entry."
        ) from err
    except OSError as err:
        raise OSError(f"Image {path} could not be read as an image ({err}); replace or remove it.") from err


def image_transform(image_size: int, augment: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB -> FloatTensor (3, S, S), ImageNet-normalised.

    The only augmentation is a mild random-resized crop: flips would swap the 'left' and 'right' the
    captions speak of, and colour jitter would change the colours they name.
    """
    resize = (
        v2.RandomResizedCrop((image_size, image_size), scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True)
        if augment
        else v2.Resize((image_size, image_size), antialias=True)
    )
    return v2.Compose([
        v2.ToImage(),
        resize,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ---------------------------------------------------------------------------------------------- datasets
class CaptionPairDataset(Dataset):
    """Training samples: one per (image, caption) pair.

    Captions are encoded once up front into a padded int64 array (P, max_length + 2) so workers share it.
    """

    def __init__(self, split: CaptionSplit, vocab: Vocabulary, max_length: int,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.split, self.transform = split, transform
        encoded = [vocab.encode(c, max_length) for refs in split.references for c in refs]
        self.image_index = np.repeat(np.arange(len(split)), [len(r) for r in split.references])
        self.lengths = np.asarray([len(e) for e in encoded], dtype=np.int64)
        self.captions = np.zeros((len(encoded), max_length + 2), dtype=np.int64)
        for row, e in zip(self.captions, encoded, strict=True):
            row[: len(e)] = e

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self.image_index[index]
        return {
            "image": self.transform(load_image(self.split.image_paths[i])),
            "caption": torch.from_numpy(self.captions[index, : self.lengths[index]].copy()),
            "image_id": int(self.split.image_ids[i]),
        }


class CaptionedImageDataset(Dataset):
    """Evaluation samples: one per image, with all its raw reference captions.

    ``caption`` is the first reference encoded, for a teacher-forced validation loss.
    """

    def __init__(self, split: CaptionSplit, vocab: Vocabulary, max_length: int,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.split, self.transform = split, transform
        self.first_captions = [vocab.encode(refs[0], max_length) for refs in split.references]

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.transform(load_image(self.split.image_paths[index])),
            "caption": torch.tensor(self.first_captions[index], dtype=torch.long),
            "image_id": int(self.split.image_ids[index]),
            "references": list(self.split.references[index]),
        }


def collate_captions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> batch dict.

    ``images`` (N, 3, S, S) float; ``captions`` (N, T+1) long, ``[<START>] w1..wk [<END>]`` padded with
    ``<NULL>`` = 0 to the longest in the batch; ``image_ids`` (N,) long; plus ``references``
    (N lists of raw strings) for evaluation samples.
    """
    batch: dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "captions": pad_captions([s["caption"] for s in samples]),
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
    }
    if "references" in samples[0]:
        batch["references"] = [s["references"] for s in samples]
    return batch


# ---------------------------------------------------------------------------------------------- datamodule
class CocoCaptionsDataModule(L.LightningDataModule):
    """Caption data in the official COCO layout, for training (pairs) and evaluation (images + references).

    Args:
        root: folder holding ``annotations/`` and the ``<split><year>/`` image folders.
        year: the suffix of file and folder names, "2017" or "2014".
        train_split, val_split, test_split: split names; ``test_split=None`` when there is no test set
            (COCO 2017 publishes no test captions).
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
    """

    def __init__(self, root: str, year: str = "2017", train_split: str = "train", val_split: str = "val",
                 test_split: str | None = "test", image_size: int = 224, max_length: int = 16,
                 min_word_count: int = 5, vocab_path: str | None = None, batch_size: int = 64,
                 num_workers: int = 2, pin_memory: bool = False, persistent_workers: bool = True,
                 augment: bool = False) -> None:
        super().__init__()
        for name, value, minimum in (("image_size", image_size, 1), ("max_length", max_length, 1),
                                     ("min_word_count", min_word_count, 1), ("batch_size", batch_size, 1),
                                     ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}.")
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.year = str(year)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.image_size, self.max_length, self.min_word_count = image_size, max_length, min_word_count
        self._vocab_path = Path(vocab_path).expanduser() if vocab_path else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.augment = pin_memory, persistent_workers, augment
        self._vocab: Vocabulary | None = None
        self._splits: dict[str, tuple[Any, CaptionSplit]] = {}
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_path(self) -> Path:
        """Where the vocabulary lives; the same on every rank (it depends only on the arguments)."""
        if self._vocab_path is not None:
            return self._vocab_path
        name = f"vocab_{self.splits['train']}{self.year}_min{self.min_word_count}.json"
        root = self.root.absolute()
        if os.access(root, os.W_OK) or not root.exists():
            return root / name
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
        return Path("~/.cache/captioning").expanduser() / f"{root.name}-{digest}" / name

    def _vocab_fingerprint(self) -> dict[str, Any]:
        """What the saved vocabulary was built from; a mismatch means the training captions changed."""
        path = annotation_path(self.root, self.splits["train"] or "", self.year)
        size = path.stat().st_size if path.is_file() else None
        return {"annotation_file": path.name, "annotation_bytes": size, "min_word_count": self.min_word_count}

    def prepare_data(self) -> None:
        """Build the vocabulary from the training captions and save it (skipped when an up-to-date one exists).

        Lightning calls this on one process per node, before ``setup`` on all of them.
        """
        path = self.vocab_path
        if path.is_file() and (self._vocab_path is not None
                               or Vocabulary.read_metadata(path) == self._vocab_fingerprint()):
            return  # an explicit vocab_path is used as given; the default one is rebuilt when stale
        split = self._load_split("train")
        vocab = Vocabulary.build((c for refs in split.references for c in refs), self.min_word_count)
        vocab.save(path, metadata=self._vocab_fingerprint())

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

    # ------------------------------------------------------------------ splits and datasets
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
        path = annotation_path(self.root, name, self.year)
        stat = path.stat() if path.is_file() else None
        key = (name, stat.st_size, stat.st_mtime_ns) if stat else None
        cached = self._splits.get(name)
        if key is None or cached is None or cached[0] != key:
            self._splits[name] = (key, load_caption_split(self.root, name, self.year))
        return self._splits[name][1]

    def setup(self, stage: str | None = None) -> None:
        """Load the vocabulary (every rank) and build the datasets the stage needs."""
        self._vocab = None  # re-read: prepare_data may have rebuilt it since
        if not self.vocab_path.is_file():
            self._load_split("train")  # a missing root or annotation file is the likelier, clearer error
        vocab = self.vocab
        roles = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}.get(
            stage or "", ["train", "val"] + (["test"] if self.splits["test"] else []))
        for role in roles:
            if role in self.datasets:
                continue
            split = self._load_split(role)
            if role == "train":
                self.datasets[role] = CaptionPairDataset(
                    split, vocab, self.max_length, image_transform(self.image_size, self.augment))
            else:
                self.datasets[role] = CaptionedImageDataset(
                    split, vocab, self.max_length, image_transform(self.image_size))

    def references(self, split: str) -> dict[int, list[str]]:
        """image_id -> raw reference captions of ``split`` ('train', 'val', 'test' or a split name)."""
        data = self._load_split(split)
        return {int(i): list(refs) for i, refs in zip(data.image_ids, data.references, strict=True)}

    # ------------------------------------------------------------------ loaders
    def _loader(self, role: str, shuffle: bool) -> DataLoader:
        if role not in self.datasets:
            raise RuntimeError(f"The {role} dataset is not built; call setup() with a stage that uses it first.")
        return DataLoader(
            self.datasets[role], batch_size=self.batch_size, shuffle=shuffle, drop_last=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate_captions,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
