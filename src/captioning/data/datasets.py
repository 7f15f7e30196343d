"""What the DataLoaders iterate: image sources (pixels or cached features), the training and evaluation
datasets, and the collate function that skips unreadable images.

A *source* maps image ``i`` of a split to ``{"image": (3, S, S)}`` or ``{"features": (D, h, w)}``, or to
a :class:`~captioning.data.images.BadImage` when the file cannot be read; the datasets pair sources with
encoded captions, and :class:`SkippingCollate` drops the bad ones from a batch.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from captioning.data.annotations import CaptionSplit
from captioning.data.features import FeatureStore
from captioning.data.images import BadImage, BadImageError, BadImageLog
from captioning.data.split_cache import write_keyed_npz
from captioning.data.transforms import ImagePipeline
from captioning.data.vocab import Vocabulary, pad_captions

__all__ = [
    "CaptionPairDataset",
    "CaptionedImageDataset",
    "FeatureSource",
    "ImageSource",
    "SkippingCollate",
    "Source",
    "TransformedImages",
    "collate_captions",
    "decoded_megabytes",
    "encode_captions",
]

CAPTION_CACHE_VERSION = 1  # bump when Vocabulary.encode changes what ids a caption gets


def encode_captions(captions: Sequence[str], vocab: Vocabulary, max_length: int, cache: Path | None = None,
                    name: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids (P, max_length + 2) int64 padded with ``<NULL>``, lengths (P,)): ``Vocabulary.encode``
    of each.

    With ``cache`` (a folder) the result is kept in ``<cache>/<name>-<key>.npz`` and read back by the next run
    with the same captions, vocabulary and max_length (the key hashes all three), so a second start of a
    COCO-sized run (591k captions: ~7 s of encoding) skips the work. A changed caption, vocabulary or
    max_length gives another key; the file of an older key is replaced. A cache that cannot be written (a
    read-only disk) is skipped.
    """
    key = None
    if cache is not None:
        digest = hashlib.sha1(f"v{CAPTION_CACHE_VERSION}|{max_length}|".encode())
        digest.update("\x00".join(vocab.idx_to_word).encode())
        digest.update(b"\x01")
        digest.update("\x00".join(captions).encode("utf-8", "surrogatepass"))
        key = digest.hexdigest()[:20]
        path = Path(cache) / f"{name}-{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as stored:
                    ids, lengths = stored["ids"].astype(np.int64), stored["lengths"].astype(np.int64)
                if ids.shape == (len(captions), max_length + 2):
                    return ids, lengths
            except (OSError, ValueError, KeyError, EOFError):
                pass  # a damaged file is rebuilt below
    ids, lengths = vocab.encode_batch(captions, max_length)
    if key is not None:
        small = np.uint16 if len(vocab) < 2**16 else np.int32
        write_keyed_npz(Path(cache) / f"{name}-{key}.npz",
                        {"ids": ids.astype(small), "lengths": lengths.astype(np.int32)})
    return ids, lengths


class ImageSource:
    """Image ``i`` of a split -> ``{"image": (3, S, S)}``, or a :class:`BadImage` when it cannot be read.

    ``on_bad_image="fail"`` raises instead (FileNotFoundError or a ValueError naming the file). After
    :meth:`hold_in_memory` the decoded images (uint8, as the files hold them) come from memory: the same
    tensors, without decoding a JPEG per sample (for sets small enough; see the DataModule's
    ``cache_images``).
    """

    def __init__(self, paths: np.ndarray, pipeline: ImagePipeline, log: BadImageLog,
                 on_bad_image: str = "skip") -> None:
        self.paths, self.pipeline, self.log = paths, pipeline, log
        self.on_bad_image = on_bad_image
        self.decoded: list[torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> torch.Tensor | BadImage:
        """The image as the pipeline stores it (uint8 (3, S, S)), or a BadImage (recorded) when unreadable."""
        path = str(self.paths[index])
        if self.log.is_bad(index) and self.on_bad_image == "skip":
            return BadImage(path, "unreadable (see the earlier warning)")
        try:
            return self.pipeline.stored(self.pipeline.load(path))
        except (FileNotFoundError, BadImageError) as err:
            if self.on_bad_image == "fail":
                raise type(err)(
                    f"{err}. Replace or remove the file (or its annotation), or set data.on_bad_image=skip "
                    "to skip unreadable images with a warning and train on."
                ) from err
            return self.log.record(index, str(err))

    def hold_in_memory(self, progress: bool = False, description: str = "decoding images") -> None:
        """Decode every image once and keep it (uint8): later samples skip the file and the JPEG decoder."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        decoded: list[torch.Tensor | None] = []
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), disable=not progress) as bar:
            for index in bar.track(range(len(self.paths)), description=description):
                image = self._decode(index)
                decoded.append(None if isinstance(image, BadImage) else image)
        self.decoded = decoded

    def __call__(self, index: int) -> dict[str, torch.Tensor] | BadImage:
        image = self.decoded[index] if self.decoded is not None else self._decode(index)
        if image is None:
            return BadImage(str(self.paths[index]), "unreadable (see the earlier warning)")
        if isinstance(image, BadImage):
            return image
        return {"image": self.pipeline(image)}

    def many(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor] | BadImage]:
        """``[self(i) for i in indices]``; images held in memory are finished (scaled and normalised) as one batch:
        a handful of ops per batch instead of per image (~10% of a small model's training step)."""
        if self.decoded is None:
            return [self(i) for i in indices]
        held = [self.decoded[i] for i in indices]
        good = [k for k, image in enumerate(held) if image is not None]
        samples: list[dict[str, torch.Tensor] | BadImage] = [
            BadImage(str(self.paths[i]), "unreadable (see the earlier warning)") for i in indices]
        if good:
            finished = self.pipeline.finish(torch.stack([held[k] for k in good]))
            for k, image in zip(good, finished.unbind(0), strict=True):
                samples[k] = {"image": image}
        return samples


def decoded_megabytes(source: ImageSource, sample: int = 8) -> float:
    """What holding every image of ``source`` decoded would take, in MB, estimated from a few of them."""
    sizes = []
    for index in np.linspace(0, len(source) - 1, num=min(sample, len(source)), dtype=int):
        image = source._decode(int(index))
        if not isinstance(image, BadImage):
            sizes.append(image.numel())
    return float(np.mean(sizes)) * len(source) / 1e6 if sizes else 0.0


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


class CaptionPairDataset(Dataset):
    """Training samples: one per (image, caption) pair, or with ``captions_per_image=k`` one per image and group of
    up to k of its captions (an image's captions in order, cut into groups of k: an epoch still covers each once).

    Captions are encoded once up front into a padded int64 array (P, max_length + 2) so workers share it
    (:func:`encode_captions`; kept in ``cache`` for the next start when a folder is given).
    ``source(i)`` gives image ``i``'s pixels or cached features (or a BadImage, passed through).
    """

    def __init__(self, split: CaptionSplit, vocab: Vocabulary, max_length: int, source: Source,
                 cache: Path | None = None, captions_per_image: int = 1) -> None:
        self.split, self.source = split, source
        counts = np.array([len(r) for r in split.references], dtype=np.int64)
        self.image_index = np.repeat(np.arange(len(split)), counts)
        self.captions, self.lengths = encode_captions([c for refs in split.references for c in refs], vocab,
                                                      max_length, cache)
        self.captions_per_image = int(captions_per_image)
        # caption j's place among its image's captions; a group starts at every k-th of them
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        place = np.arange(len(self.image_index)) - first[self.image_index]
        starts = np.flatnonzero(place % self.captions_per_image == 0)
        self.group_bounds = np.stack([starts, np.append(starts[1:], len(self.image_index))], axis=1)

    def __len__(self) -> int:
        return len(self.captions) if self.captions_per_image == 1 else len(self.group_bounds)

    def _caption(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.captions[index, : self.lengths[index]].copy())

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | BadImage]:
        """The samples of a batch (the DataLoader asks for them together): the images of a source that can
        (:meth:`ImageSource.many`) are prepared as one batch."""
        if self.captions_per_image == 1:
            images = [int(self.image_index[index]) for index in indices]
        else:
            images = [int(self.image_index[self.group_bounds[index][0]]) for index in indices]
        many = getattr(self.source, "many", None)
        pixels = many(images) if many is not None else [self.source(i) for i in images]
        samples: list[dict[str, Any] | BadImage] = []
        for index, i, sample in zip(indices, images, pixels, strict=True):
            if isinstance(sample, BadImage):
                samples.append(sample)
            elif self.captions_per_image == 1:
                samples.append({**sample, "caption": self._caption(index), "image_id": int(self.split.image_ids[i])})
            else:
                start, end = self.group_bounds[index]
                samples.append({**sample, "captions": [self._caption(j) for j in range(start, end)],
                                "image_id": int(self.split.image_ids[i])})
        return samples


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
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | BadImage]:
        many = getattr(self.source, "many", None)
        pixels = many(list(indices)) if many is not None else [self.source(i) for i in indices]
        return [sample if isinstance(sample, BadImage) else {
            **sample,
            "caption": torch.tensor(self.first_captions[index], dtype=torch.long),
            "image_id": int(self.split.image_ids[index]),
            "references": list(self.split.references[index]),
        } for index, sample in zip(indices, pixels, strict=True)]


def collate_captions(samples: Sequence[dict[str, Any] | BadImage | None]) -> dict[str, Any]:
    """Samples -> batch dict; samples of unreadable images (BadImage or None) are dropped.

    ``images`` (N, 3, S, S) float, or ``features`` (N, D, h, w) float32 from the feature cache;
    ``captions`` (N, T+1) long, ``[<START>] w1..wk [<END>]`` padded with ``<NULL>`` = 0 to the longest in
    the batch; ``image_ids`` (N,) long; plus ``references`` (N lists of raw strings) for evaluation samples.
    Samples of several captions (``captions_per_image``) give B images and N >= B captions: ``captions`` and
    ``image_ids`` have a row per caption and ``image_index`` (N,) says which image (row of ``images``) each is of.
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
    if "captions" in kept[0]:  # samples of several captions (captions_per_image): one row per caption
        counts = torch.tensor([len(s["captions"]) for s in kept])
        batch["captions"] = pad_captions([c for s in kept for c in s["captions"]])
        batch["image_index"] = torch.repeat_interleave(torch.arange(len(kept)), counts)
        batch["image_ids"] = torch.tensor([s["image_id"] for s in kept], dtype=torch.long)[batch["image_index"]]
        return batch
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
