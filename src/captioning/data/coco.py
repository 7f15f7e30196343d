"""The LightningDataModule for caption sets in the COCO layout, official or Karpathy splits.

Official layout (COCO 2014 and 2017; ``year`` and the split names are configurable), read by
:mod:`captioning.data.annotations`::

    <root>/annotations/captions_<split><year>.json    # COCO keys: images (id, file_name), annotations
    <root>/<split><year>/<file_name>                  #   (id, image_id, caption)

Karpathy splits (``split_source="karpathy"``): ``<root>/dataset_coco.json`` with the images in the
2014 folders, see :mod:`captioning.data.karpathy`. The datasets and their collate function are in
:mod:`captioning.data.datasets`.

With ``feature_cache=True`` and a frozen encoder given by :meth:`CocoCaptionsDataModule.use_encoder`,
batches carry the encoder's cached ``features`` instead of ``images`` (see :mod:`captioning.data.features`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from captioning.data.annotations import (
    CaptionSplit,
    annotation_path,
    check_root,
    load_caption_split,
    require_images,
    split_instance_categories,
)
from captioning.data.datasets import (
    CaptionedImageDataset,
    CaptionPairDataset,
    FeatureSource,
    ImageSource,
    SkippingCollate,
    Source,
    TransformedImages,
    decoded_megabytes,
)
from captioning.data.features import FeatureCache, FeatureStore
from captioning.data.images import BadImageLog
from captioning.data.karpathy import karpathy_caption_split, read_karpathy
from captioning.data.options import (
    LOADING_GROUPS,
    option_defaults,
    option_names,
    parse_options,
)
from captioning.data.sampling import TrainingPosition, training_position, training_sampler
from captioning.data.split_cache import cached_splits
from captioning.data.transforms import (
    CaptionAugment,
    ImageContract,
    ImagePipeline,
    auto_image_size,
)
from captioning.data.vocab import Vocabulary

__all__ = ["CocoCaptionsDataModule"]

SPLIT_SOURCES = ("official", "karpathy")


class CocoCaptionsDataModule(L.LightningDataModule):
    """Caption data in the COCO layout, for training (pairs) and evaluation (images + references).

    Args:
        root: folder holding ``annotations/`` and the ``<split><year>/`` image folders (and, for Karpathy
            splits, ``dataset_coco.json``).
        year: the suffix of file and folder names, "2017" or "2014" (official splits only).
        train_split, val_split, test_split: split names; ``test_split=None`` when there is no test set
            (COCO 2017 publishes no test captions). For Karpathy splits: "train", "val", "test".
        image_size: images are resized to ``image_size`` x ``image_size``; ``"auto"``: the encoder's native size
            when it is pretrained, else the training images' own size rounded to the encoder's stride and capped
            at 224 (:func:`~captioning.data.transforms.auto_image_size`), printed at start with the reason and
            recorded in checkpoints as the number.
        split_source: "official" (``captions_<split><year>.json``) or "karpathy" (``dataset_coco.json``).
        karpathy_file: the Karpathy split file; default ``<root>/dataset_coco.json``.
        restval: with Karpathy splits, train on train + restval (113,287 images) rather than train alone.
        **options: the options every data source shares (:mod:`captioning.data.options`): how batches are loaded
            (``batch_size`` — per device —, ``num_workers``, ``pin_memory``, ``persistent_workers``, ``progress``,
            ``cache_images``, ``image_cache_mb``, ``feature_cache``, ``cache_dir``, ``feature_dtype``), how images are
            read and augmented (``on_bad_image``, ``max_image_pixels``, ``augment``, ``augmentation``) and the
            vocabulary (``max_length``, ``min_word_count``, ``vocab_path``).
    """

    # arguments newer than some checkpoints: one without them was trained as their default says (eval.py)
    ADDED_ARGUMENTS: tuple[str, ...] = ()
    # this source's defaults of the shared options, where they differ from the options' own
    OPTION_DEFAULTS: dict[str, Any] = {}

    def __init__(self, root: str, year: str = "2017", train_split: str = "train", val_split: str = "val",
                 test_split: str | None = "test", image_size: int | str = "auto", split_source: str = "official",
                 karpathy_file: str | None = None, restval: bool = True, **options: Any) -> None:
        super().__init__()
        if image_size != "auto" and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                     or image_size < 1):
            raise ValueError(f"data.image_size must be an integer >= 1 or auto, got {image_size!r}.")
        if split_source not in SPLIT_SOURCES:
            raise ValueError(f"data.split_source={split_source!r} is not one of "
                             f"{', '.join(map(repr, SPLIT_SOURCES))}.")
        loader, images, vocabulary = parse_options(options, self.OPTION_DEFAULTS, type(self).__name__)
        if loader.feature_cache and images.augment:
            # the default augments; cached features are computed once from the plain images
            rank_zero_info("data.feature_cache=true: training batches are the features cached from the plain "
                           "images, so data.augment is not applied (set data.feature_cache=false to augment).")
            images = dataclasses.replace(images, augment=False)
        self.loader, self.images, self.vocab_options = loader, images, vocabulary
        self.save_hyperparameters(
            {"root": root, "year": year, "train_split": train_split, "val_split": val_split,
             "test_split": test_split, "image_size": image_size, "split_source": split_source,
             "karpathy_file": karpathy_file, "restval": restval,
             **{k: v for group in (loader, images, vocabulary) for k, v in dataclasses.asdict(group).items()}},
            logger=False)
        self.root = Path(root).expanduser()
        self.year = str(year)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.image_size = image_size
        # built even when off, so a bad data.augmentation.* fails at once
        self.augmentation = CaptionAugment(**(images.augmentation or {}))
        self.split_source, self.restval = split_source, bool(restval)
        self.karpathy_file = Path(karpathy_file).expanduser() if karpathy_file else self.root / "dataset_coco.json"
        self._encoder: nn.Module | None = None
        self._contract: ImageContract | None = None  # the encoder's declared input, or a checkpoint's (use_encoder)
        self._features: FeatureCache | None = None
        self._feature_keys: dict[str, tuple[CaptionSplit, dict[str, Any]]] = {}
        self._vocab: Vocabulary | None = None
        self._given_vocab: Vocabulary | None = None
        self._splits: dict[str, tuple[Any, CaptionSplit]] = {}
        self._karpathy: tuple[Any, list] | None = None
        self.datasets: dict[str, Dataset] = {}
        self.bad_image_logs: dict[str, BadImageLog] = {}
        self._resume_position: TrainingPosition | None = None

    @property
    def batch_size(self) -> int:
        """``loader.batch_size``, where Lightning's batch-size finder (``Tuner.scale_batch_size``) looks for it."""
        return self.loader.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.loader = dataclasses.replace(self.loader, batch_size=value)

    @classmethod
    def arguments(cls) -> dict[str, Any]:
        """Every constructor argument with its default (inspect.Parameter.empty when required), the shared
        options included: what a checkpoint's saved data arguments are matched against (eval.py)."""
        params = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return {**params, **option_defaults(cls.OPTION_DEFAULTS)}

    @classmethod
    def loading_arguments(cls) -> list[str]:
        """The arguments that say how to load, not what the data is: eval.py takes them from its own config."""
        return option_names(LOADING_GROUPS)

    # ------------------------------------------------------------------ paths
    def _writable_home(self, name: str) -> Path:
        """``<root>/<name>``, or a per-root folder under ~/.cache/captioning when root is read-only."""
        root = self.root.absolute()
        if os.access(root, os.W_OK) or not root.exists():
            return root / name
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
        return Path("~/.cache/captioning").expanduser() / f"{root.name}-{digest}" / name

    @property
    def _custom_vocab_path(self) -> Path | None:
        return Path(self.vocab_options.vocab_path).expanduser() if self.vocab_options.vocab_path else None

    @property
    def vocab_path(self) -> Path:
        """Where the vocabulary lives; the same on every rank (it depends only on the arguments)."""
        if self._custom_vocab_path is not None:
            return self._custom_vocab_path
        if self.split_source == "karpathy":
            train = f"{self.splits['train']}" + ("+restval" if self.restval and self.splits["train"] == "train" else "")
            return self._writable_home(f"vocab_karpathy_{train}_min{self.vocab_options.min_word_count}.json")
        return self._writable_home(f"vocab_{self.splits['train']}{self.year}_min{self.vocab_options.min_word_count}.json")

    @property
    def cache_dir(self) -> Path:
        """The folder holding feature caches (one sub-folder per cache key)."""
        return Path(self.loader.cache_dir).expanduser() if self.loader.cache_dir else self._writable_home("features")

    def _annotation_file(self, role: str) -> Path:
        if self.split_source == "karpathy":
            return self.karpathy_file
        return annotation_path(self.root, self._split_name(role), self.year)

    # ------------------------------------------------------------------ vocabulary
    def _vocab_fingerprint(self) -> dict[str, Any]:
        """What the saved vocabulary was built from; a mismatch means the training captions changed."""
        path = self._annotation_file("train") if self.splits["train"] else Path("-")
        size = path.stat().st_size if path.is_file() else None
        meta = {"annotation_file": path.name, "annotation_bytes": size, "min_word_count": self.vocab_options.min_word_count}
        if self.split_source == "karpathy":
            meta["restval"] = self.restval
        return meta

    def prepare_data(self) -> None:
        """Build the vocabulary from the training captions (skipped when an up-to-date one exists), and
        with ``feature_cache`` the feature caches of every split (each skipped when complete).

        Lightning calls this on one process per node, before ``setup`` on all of them.
        """
        path = self.vocab_path
        if self._given_vocab is not None:
            pass  # a checkpoint's vocabulary (use_vocabulary): no training captions needed
        elif not (path.is_file() and (self._custom_vocab_path is not None
                                    or Vocabulary.read_metadata(path) == self._vocab_fingerprint())):
            # an explicit vocab_path is used as given; the default one is rebuilt when stale
            split = self._load_split("train")
            vocab = Vocabulary.build((c for refs in split.references for c in refs), self.vocab_options.min_word_count)
            vocab.save(path, metadata=self._vocab_fingerprint())
        if self.loader.feature_cache:
            for role in self._roles(None):
                self._build_features(role)

    def use_vocabulary(self, vocab: Vocabulary) -> None:
        """Encode captions with ``vocab`` (a trained model's) instead of one built from the training captions: how
        eval.py scores a checkpoint on a set without a training split, or on another set than it was trained on."""
        self._given_vocab = vocab

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary (after ``prepare_data``); loaded from ``vocab_path`` on first use."""
        if self._given_vocab is not None:
            return self._given_vocab
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
            def parse() -> dict[str, CaptionSplit]:
                if self.split_source == "karpathy":
                    return {name: self._load_karpathy_split(name, key)}
                return {name: load_caption_split(self.root, name, self.year)}

            if key is None:  # no file: the reader's error says what is missing
                split = parse()[name]
            else:  # parsed once, then read back by every later start (the image paths follow from the key)
                split = cached_splits(self._writable_home("captions"), f"split-{name}",
                                      (key, str(self.root.absolute()), self.split_source, self.year,
                                       repr(self.splits)), parse)[name]
            self._splits[name] = (key, split)
        return self._splits[name][1]

    def _load_karpathy_split(self, name: str, key: Any) -> CaptionSplit:
        check_root(self.root, f"Karpathy splits are read from {self.karpathy_file} (data.karpathy_file) with "
                              f"the images at {self.root}/<filepath>/<filename>.")
        if key is None or self._karpathy is None or self._karpathy[0] != key[:3]:
            # dataset_coco.json is ~150 MB: parse it once for all splits
            self._karpathy = (key[:3] if key else None, read_karpathy(self.karpathy_file))
        return karpathy_caption_split(self._karpathy[1], name, self.restval and name == self.splits["train"],
                                      self.root, self.karpathy_file)

    def _roles(self, stage: str | None) -> list[str]:
        return {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}.get(
            stage or "", ["train", "val"] + (["test"] if self.splits["test"] else []))

    # ------------------------------------------------------------------ encoder: image size, feature cache
    def use_encoder(self, encoder: nn.Module, contract: ImageContract | None = None) -> None:
        """The encoder that will see the images: images are read by the input it declares (its
        ``image_contract``: mean, std, interpolation, crop; ``contract`` instead when given — a checkpoint's),
        ``image_size="auto"`` follows it (its ``input_size`` when pretrained, its ``downsampling``), and with
        ``feature_cache`` its frozen features are what the cache stores. Call before ``prepare_data`` /
        ``trainer.fit`` (train.py and eval.py do)."""
        self._encoder = encoder
        self._contract = contract or getattr(encoder, "image_contract", None)
        if self._contract is not None:  # batches arrive normalised by it: the photometry undoes and redoes that
            self.augmentation.use_statistics(self._contract.mean, self._contract.std)
        self._features = None
        self._feature_keys.clear()
        if self.loader.feature_cache:
            self._require_cache()  # a trainable encoder is refused now, not at the first batch

    def resolve_image_size(self) -> int:
        """The side images are resized to: ``image_size``, or for ``"auto"`` the size chosen from the encoder and
        the training images (once; printed with the reason, and stored in the hyperparameters so checkpoints
        record the number)."""
        if self.image_size == "auto":
            paths = self._load_split(self._size_split()).image_paths
            encoder = self._encoder
            size, why = auto_image_size(paths, getattr(encoder, "input_size", None),
                                        int(getattr(encoder, "downsampling", 32)))
            rank_zero_info(f"data.image_size=auto: {size} px, {why} (set data.image_size=<pixels> to choose).")
            self.image_size = self.hparams["image_size"] = size
        return self.image_size

    def _size_split(self) -> str:
        """The split whose images ``image_size="auto"`` measures: the training one, where there is one."""
        return "train" if self.splits["train"] else "val"

    def _require_cache(self) -> FeatureCache:
        if self._features is None and self.loader.feature_cache and self._encoder is not None:
            self._features = FeatureCache(self.cache_dir, self._encoder, repr(self.image_pipeline()),
                                          self.loader.feature_dtype, self.root)
        if self._features is None:
            raise RuntimeError(
                "data.feature_cache=true, but no encoder was given to the DataModule: the features come from "
                "a frozen encoder (set encoder.freeze=true) that train.py hands over with "
                "datamodule.use_encoder(module.encoder) before fitting. Call use_encoder(), or set "
                "data.feature_cache=false."
            )
        return self._features

    def feature_key(self, role: str) -> dict[str, Any]:
        """Everything the cached features of ``role`` depend on (:meth:`FeatureCache.key`); its hash names
        the cache directory."""
        cache = self._require_cache()
        split = self._load_split(role)
        cached = self._feature_keys.get(role)
        if cached is not None and cached[0] is split:
            return cached[1]
        require_images(split, role)
        label = {"source": self.split_source, "name": self._split_name(role),
                 "restval": self.restval if self.split_source == "karpathy" else None}
        key = cache.key(label, split.image_ids.tolist(), split.image_paths.tolist())
        self._feature_keys[role] = (split, key)
        return key

    def feature_directory(self, role: str) -> Path:
        return self._require_cache().path(self.feature_key(role), self._split_name(role))

    def _feature_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _image_source(self, role: str, split: CaptionSplit) -> ImageSource:
        log = self.bad_image_logs.setdefault(role, BadImageLog(split.image_paths, role))
        return ImageSource(split.image_paths, self.image_pipeline(), log, self.images.on_bad_image)

    def _maybe_hold_in_memory(self, role: str, source: ImageSource) -> None:
        """Decode the split's images once and keep them, when ``cache_images`` says so (``auto``: when they
        take at most ``image_cache_mb``): decoding a JPEG per sample costs as much as the training step of a
        small model, and DataLoader workers compete with training for the same cores."""
        if self.loader.cache_images is False:
            return
        if self.loader.cache_images == "auto":
            needed = decoded_megabytes(source)
            if needed > self.loader.image_cache_mb:
                rank_zero_info(f"The {role} images take ~{needed:,.0f} MB decoded, more than data.image_cache_mb="
                               f"{self.loader.image_cache_mb}: they are read from disk each time.")
                return
        source.hold_in_memory(self.loader.progress and len(source) > 2000, f"decoding {self._split_name(role)} images")

    def image_contract(self) -> ImageContract:
        """The encoder's declared input (ImageNet's statistics and the whole image when no encoder was given) at
        the size this DataModule resizes to."""
        return (self._contract or ImageContract()).at(self.resolve_image_size())

    def image_pipeline(self) -> ImagePipeline:
        """How this DataModule reads an image file (caption.py and the demo read theirs the same way)."""
        return ImagePipeline(self.image_contract(), max_pixels=self.images.max_image_pixels)

    def _build_features(self, role: str) -> FeatureStore:
        key, split = self.feature_key(role), self._load_split(role)
        return self._require_cache().build(
            key, self._split_name(role), split.image_ids, TransformedImages(self._image_source(role, split)),
            device=self._feature_device(), batch_size=self.batch_size, num_workers=self.loader.num_workers,
            progress=self.loader.progress)

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        """Load the vocabulary (every rank) and build the datasets the stage needs."""
        self._vocab = None  # re-read: prepare_data may have rebuilt it since
        if self._given_vocab is None and not self.vocab_path.is_file():
            self._load_split("train")  # a missing root or annotation file is the likelier, clearer error
        vocab = self.vocab
        self.augmentation.bind(vocab.word_to_idx)
        for role in self._roles(stage):
            if role in self.datasets:
                continue
            split = self._load_split(role)
            if self.loader.feature_cache:
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
                require_images(split, role)
                source = self._image_source(role, split)
                self._maybe_hold_in_memory(role, source)
            if role == "train":  # its captions encoded once, then read back by every later start
                self.datasets[role] = CaptionPairDataset(split, vocab, self.vocab_options.max_length, source,
                                                         cache=self._writable_home("captions"),
                                                         captions_per_image=self.loader.captions_per_image)
            else:
                self.datasets[role] = CaptionedImageDataset(split, vocab, self.vocab_options.max_length, source)

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
        return split_instance_categories(self.root, self._load_split(split))

    def scenes(self, split: str) -> dict[int, dict[str, Any]]:
        """image_id -> what the image shows (objects with shape, colour, size, centre; width, height), for
        annotation files that record it (the built-in set); {} otherwise."""
        data = self._load_split(split)
        if data.scenes is None:
            return {}
        return {int(i): scene for i, scene in zip(data.image_ids, data.scenes, strict=True)}

    # ------------------------------------------------------------------ loaders
    @property
    def train_batch_size(self) -> int:
        """Samples per training batch: ``batch_size`` captions, as ``batch_size // captions_per_image`` images
        (at least one) when a sample carries several captions."""
        return max(1, self.batch_size // self.loader.captions_per_image)

    def _loader(self, role: str, sampler: Any = None, generator: torch.Generator | None = None) -> DataLoader:
        if role not in self.datasets:
            raise RuntimeError(f"The {role} dataset is not built; call setup() with a stage that uses it first.")
        dataset = self.datasets[role]
        # images held in memory need no workers: they would only copy batches to the training process
        in_memory = getattr(dataset.source, "decoded", None) is not None
        workers = 0 if in_memory else self.loader.num_workers
        return DataLoader(
            dataset, batch_size=self.train_batch_size if role == "train" else self.batch_size, sampler=sampler, shuffle=False, drop_last=False,
            num_workers=workers, pin_memory=self._pin_memory(), collate_fn=SkippingCollate(dataset),
            persistent_workers=self.loader.persistent_workers and workers > 0, generator=generator,
        )

    def sample_loader(self, role: str, count: int) -> DataLoader:
        """``count`` images of a split spread over it, un-augmented, as evaluation batches (images, references):
        the run report captions training images with it beside validation, to show the generalisation gap."""
        if role not in self.datasets:
            raise RuntimeError(f"The {role} dataset is not built; call setup() with a stage that uses it first.")
        built = self.datasets[role]
        dataset = CaptionedImageDataset(built.split, self.vocab, self.vocab_options.max_length, built.source)
        picked = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset)), dtype=int)).tolist()
        subset = Subset(dataset, picked)
        in_memory = getattr(built.source, "decoded", None) is not None
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0 if in_memory else
                          self.loader.num_workers, collate_fn=SkippingCollate(subset))

    def _pin_memory(self) -> bool:
        """``pin_memory``; ``"auto"``: when the trainer computes on a GPU (pinning is for host-to-GPU copies)."""
        if self.loader.pin_memory != "auto":
            return bool(self.loader.pin_memory)
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else None
        return device is not None and device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        """Shuffled pairs in an order fixed by the run's ``seed`` and the epoch (see
        :class:`~captioning.data.sampling.ResumableSampler`), continued where a resumed checkpoint stopped."""
        if "train" not in self.datasets:
            raise RuntimeError("The train dataset is not built; call setup('fit') first.")
        position, self._resume_position = self._resume_position, None
        sampler = training_sampler(self.datasets["train"], self.trainer, self.train_batch_size, position)
        # Its own generator: creating the iterator (and the workers' seeds) must not draw from the global
        # random state, or a resumed run's dropout would drift from the uninterrupted run's.
        return self._loader("train", sampler=sampler, generator=torch.Generator().manual_seed(sampler.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches augmented on their device (``augment``): one batched transform, captions included."""
        trainer = getattr(self, "trainer", None)
        if self.images.augment and trainer is not None and trainer.training and "images" in batch:
            batch["images"], batch["captions"] = self.augmentation(batch["images"], batch["captions"],
                                                                   batch.get("image_index"))
        return batch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Where training stands (epoch, batch, batch size, processes): a resumed run continues the data
        order from there. Plain ints, so checkpoints still load with ``weights_only=True``."""
        position = training_position(self.trainer, self.train_batch_size)
        return {"train_position": position.state_dict()} if position is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_position" in state_dict:
            self._resume_position = TrainingPosition.from_state_dict(state_dict["train_position"])
            # Lightning only asks the DataLoader itself whether it can resume; this DataModule does it.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the "
                                    "epoch ended and your dataloader is not resumable")
