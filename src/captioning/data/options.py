"""The options every caption DataModule shares, in three groups: how to load, how images are read, the vocabulary.

A data source (COCO files, the built-in set, Flickr, a caption folder, a Hugging Face dataset) takes its
own arguments — where the data is and what it holds — and ``**options``; :func:`parse_options` sorts those into
the groups, checks them, and names an unknown key. The groups' fields are the config's flat keys
(``data.batch_size``, ``data.augment``, ``data.min_word_count``), so a new option is one field here.

``eval.py`` rebuilds a checkpoint's data from the arguments saved with it except the loading ones
(:data:`LOADING_GROUPS`), which it takes from its own config: the batch size or workers of an evaluation are not
what the data is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from captioning.data.features import FEATURE_DTYPES
from captioning.data.images import ON_BAD_IMAGE

__all__ = ["ImageOptions", "LOADING_GROUPS", "LoaderOptions", "OPTION_GROUPS", "VocabOptions", "parse_options"]

CACHE_IMAGES = ("auto", True, False)


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}.")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"data.{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are made (``torch.utils.data.DataLoader`` and the caches).

    batch_size: samples per batch **per device (process)**; under DDP the global batch is ``batch_size x devices x
        num_nodes`` (times gradient accumulation): scale the learning rate accordingly. A training batch holds
        ``batch_size`` captions: ``batch_size // captions_per_image`` images with their captions.
    captions_per_image: how many of an image's captions a training sample carries (seq_per_img of Karpathy's
        neuraltalk2 and Luo's self-critical.pytorch): the image is read, augmented and encoded once for all of them.
        An epoch still covers every caption once; 1 (a sample per caption) draws more distinct images per batch.
    num_workers, pin_memory, persistent_workers: as for the DataLoader (``persistent_workers`` only with workers);
        ``pin_memory="auto"`` pins only when the trainer runs on a GPU (pinned CPU memory buys nothing and warns).
    progress: a progress bar while building the feature cache or decoding images into memory.
    cache_images: decode each split's images once and keep them in memory (uint8, as decoded; no workers needed):
        ``True``, ``False`` or ``"auto"`` — when a split takes at most ``image_cache_mb`` megabytes decoded.
    image_cache_mb: the memory ``cache_images="auto"`` may use per split.
    feature_cache: read a frozen encoder's features from a cache built once by ``prepare_data`` instead of decoding
        images (batches carry ``features``); needs ``use_encoder`` with a frozen encoder; no augmentation then.
    cache_dir: where feature caches live; default ``<root>/features`` (or under ``~/.cache/captioning``).
    feature_dtype: ``"float16"`` (half the disk and page cache) or ``"float32"``.
    """

    batch_size: int = 64
    captions_per_image: int = 1
    num_workers: int = 4
    pin_memory: bool | str = "auto"
    persistent_workers: bool = True
    progress: bool = True
    cache_images: bool | str = "auto"
    image_cache_mb: int = 2048
    feature_cache: bool = False
    cache_dir: str | None = None
    feature_dtype: str = "float16"

    def __post_init__(self) -> None:
        _integer("batch_size", self.batch_size, 1)
        _integer("captions_per_image", self.captions_per_image, 1)
        _integer("num_workers", self.num_workers, 0)
        _choice("feature_dtype", self.feature_dtype, FEATURE_DTYPES)
        if self.cache_images not in CACHE_IMAGES:
            raise ValueError(f"data.cache_images={self.cache_images!r} is not one of auto, true, false.")
        if isinstance(self.image_cache_mb, bool) or not isinstance(self.image_cache_mb, int) or self.image_cache_mb < 0:
            raise ValueError(f"data.image_cache_mb must be an integer >= 0 (megabytes), got {self.image_cache_mb!r}.")
        object.__setattr__(self, "feature_cache", bool(self.feature_cache))


@dataclass(frozen=True)
class ImageOptions:
    """How image files are read and training batches augmented.

    on_bad_image: ``"skip"`` an unreadable image (corrupt, truncated, empty, not an image, too large) with a warning
        naming it, counted in the DataModule's ``bad_images``; or ``"fail"`` with an error naming it.
    max_image_pixels: larger images are refused as possible decompression bombs; default PIL's (~89 Mpx).
    augment: augment training batches on their device keeping every reference true
        (:class:`~captioning.data.transforms.CaptionAugment`); not with ``feature_cache``.
    augmentation: ``CaptionAugment``'s arguments (``flip``, ``translate``, ``scale``, ``rotate``, ``brightness``,
        ``contrast``, ``noise``, ``swaps``); unset ones keep its defaults.
    """

    on_bad_image: str = "skip"
    max_image_pixels: int | None = None
    augment: bool = True
    augmentation: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _choice("on_bad_image", self.on_bad_image, ON_BAD_IMAGE)
        if self.max_image_pixels is not None:
            _integer("max_image_pixels", self.max_image_pixels, 1)
        # plain values: checkpoints hold these and load with weights_only=True
        if OmegaConf.is_config(self.augmentation):
            object.__setattr__(self, "augmentation", OmegaConf.to_container(self.augmentation, resolve=True))


@dataclass(frozen=True)
class VocabOptions:
    """The captions' words.

    max_length: captions are cut to this many words; encoded captions hold at most ``max_length + 2`` tokens.
    min_word_count: training-caption words seen fewer times become ``<UNK>``.
    vocab_path: the vocabulary JSON; default a file beside the data named by the training split and min count.
    """

    max_length: int = 16
    min_word_count: int = 5
    vocab_path: str | None = None

    def __post_init__(self) -> None:
        _integer("max_length", self.max_length, 1)
        _integer("min_word_count", self.min_word_count, 1)


OPTION_GROUPS = (LoaderOptions, ImageOptions, VocabOptions)
LOADING_GROUPS = (LoaderOptions, ImageOptions)  # how to load, not what the data is: eval.py's own config


def option_names(groups: tuple[type, ...] = OPTION_GROUPS) -> list[str]:
    return [f.name for group in groups for f in dataclasses.fields(group)]


def option_defaults(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every option with its default (a data source's own ``overrides`` of them applied)."""
    defaults = {f.name: f.default for group in OPTION_GROUPS for f in dataclasses.fields(group)}
    return {**defaults, **(overrides or {})}


def parse_options(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, where: str = "data",
                  ) -> tuple[LoaderOptions, ImageOptions, VocabOptions]:
    """``options`` (flat keys, as in the config) -> the three groups, with a source's ``defaults`` for the unset."""
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise TypeError(f"data.{unknown[0]} is not an option of {where}: its options are "
                        f"{', '.join(option_names())} besides the data source's own arguments.")
    values = option_defaults(defaults)
    values.update(options)
    return tuple(group(**{f.name: values[f.name] for f in dataclasses.fields(group)})  # type: ignore[return-value]
                 for group in OPTION_GROUPS)
