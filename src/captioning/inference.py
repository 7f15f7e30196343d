"""Captions for image files with a trained checkpoint — the one path caption.py and the demo page take.

:class:`Captioner` is a checkpoint ready to caption: the module in eval mode on its device, the
training-time image pipeline with the checkpoint's image size, and a decoding strategy. It reads files
the way training read them (:class:`~captioning.data.transforms.ImagePipeline`), so the same file gives the
same tensor, and decodes in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig
from PIL import Image

from captioning.data.images import BadImageError
from captioning.data.transforms import ImagePipeline
from captioning.models.decoding import CaptionDecoder
from captioning.module import CaptioningModule, load_ensemble
from captioning.runtime import ImageContract

__all__ = ["Caption", "Captioner", "collect_images", "image_suffixes", "pick_contract", "pick_device", "pick_image_size", "unique_stem"]

log = logging.getLogger(__name__)


@dataclass
class Caption:
    """One image's caption: the text, its log-probability, the emitted words (``<END>`` included), for the
    attention model the attention map of each word (L, h, w), and with ``decoding.n_best`` > 1 the n-best list
    (text, log p), best first (the caption itself is its first)."""

    text: str
    log_prob: float
    words: list[str]
    attention: torch.Tensor | None = None
    alternatives: list[tuple[str, float]] | None = None


class Captioner:
    """A trained checkpoint that captions images.

    Args:
        module: the trained module (:func:`captioning.module.load_checkpoint`).
        pipeline: how files are read and transformed (the training DataModule's, with its image size).
        decoding: the decoding strategy; None keeps the checkpoint's.
        device: where the model runs.
    """

    def __init__(self, module: CaptioningModule, pipeline: ImagePipeline, decoding: CaptionDecoder | None = None,
                 device: str | torch.device = "cpu") -> None:
        if decoding is not None:
            module.set_decoding(decoding)
        self.module = module.eval().to(torch.device(device))
        self.pipeline = pipeline
        self.data: dict[str, Any] = {}  # the checkpoint's DataModule config (from_checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | Path | Sequence[str | Path], decoding: CaptionDecoder | None = None,
                        device: str = "auto", image_size: int | None = None,
                        max_pixels: int | None = None) -> Captioner:
        """The checkpoint alone: model, vocabulary, the image contract (size, mean, std, resize) and the pixel
        limit it was trained with (``max_pixels`` instead when given: a server's own guard). ``.data`` keeps the
        checkpoint's DataModule config. Several paths: an ensemble (:func:`captioning.module.load_ensemble`)."""
        module, data = load_ensemble(path)
        path = path if isinstance(path, str | Path) else path[0]
        contract = pick_contract(module, image_size, data, str(path))
        limit = max_pixels if max_pixels is not None else data.get("max_image_pixels")
        captioner = cls(module, ImagePipeline(contract, max_pixels=limit), decoding, pick_device(device))
        captioner.data = data
        return captioner

    @property
    def has_attention(self) -> bool:
        return self.module.decoder.cell_type == "attention" and not len(self.module.members)

    def load(self, path: str | Path) -> Image.Image | None:
        """The file as training read it, or None with a warning naming it when it cannot be read."""
        try:
            return self.pipeline.load(path)
        except (FileNotFoundError, BadImageError) as error:
            log.warning("Skipped %s: %s", path, error)
            return None

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[Caption]:
        """RGB images (as :meth:`load` gives them) -> their captions, decoded as one batch."""
        if not images:
            return []
        batch = torch.stack([self.pipeline(image) for image in images]).to(self.module.device)
        decoded = self.module(batch)
        vocab = self.module.vocab

        def alternatives(i: int) -> list[tuple[str, float]] | None:
            if decoded.nbest is None:
                return None
            return [(vocab.decode(ids), float(lp)) for ids, lp in zip(decoded.nbest.captions[i], decoded.nbest.log_probs[i],
                                                                    strict=True) if lp > float("-inf")]

        return [
            Caption(vocab.decode(decoded.captions[i]), float(decoded.log_probs[i]), vocab.words(decoded.captions[i]),
                    None if decoded.attn_weights is None else decoded.attn_weights[i].cpu(), alternatives(i))
            for i in range(len(images))
        ]

    def caption_files(self, files: Sequence[Path], batch_size: int = 32) -> Iterator[tuple[Path, Image.Image, Caption]]:
        """(file, image, caption) for every readable file, in order; unreadable ones are skipped with a warning."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        for start in range(0, len(files), batch_size):
            loaded = [(path, image) for path in files[start:start + batch_size]
                      if (image := self.load(path)) is not None]
            captions = self([image for _, image in loaded])
            for (path, image), caption in zip(loaded, captions, strict=True):
                yield path, image, caption


def image_suffixes() -> set[str]:
    """File name endings PIL can open (.jpg, .png, .webp, ...), lower case."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


def collect_images(images: Any) -> list[Path]:
    """The ``images`` config value -> the image files to caption, in the order given (folders sorted).

    Paths that do not exist are skipped with a warning, as are files in a folder whose name is not an
    image file name. Raises ValueError when ``images`` names no path at all.
    """
    if isinstance(images, str):
        entries = [images] if Path(images).expanduser().exists() else images.split(",")
    elif isinstance(images, ListConfig | Sequence):
        entries = [str(entry) for entry in images]
    else:
        raise ValueError(
            f"images={images!r}: pass an image file, a folder, a list images=[a.jpg,photos/] or a quoted "
            "comma-separated string images='a.jpg,b.jpg'."
        )
    entries = [entry.strip() for entry in entries if entry.strip()]
    if not entries:
        raise ValueError("images is empty: pass an image file, a folder or a list of them (images=...).")
    suffixes, files = image_suffixes(), []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            others = [p.name for p in found if p.suffix.lower() not in suffixes]
            if others:
                log.warning("Skipped %d file(s) in %s that are not image files by name: %s",
                            len(others), path, ", ".join(others))
            files.extend(p for p in found if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            log.warning("Skipped %s: no such file or folder.", path)
    return list(dict.fromkeys(files))


def pick_contract(module: CaptioningModule, image_size: int | None, saved: dict[str, Any],
                  ckpt_path: str) -> ImageContract:
    """The checkpoint's image contract (its encoder's declared input at the trained size), at ``image_size`` when
    one is given. Checkpoints from before encoders declared their input: ImageNet's statistics, the whole image
    resized, at the DataModule's saved size."""
    contract = module.image_contract
    if contract is None:
        return ImageContract(size=pick_image_size(image_size, saved, ckpt_path))
    return contract.at(pick_image_size(image_size, {"image_size": contract.size}, ckpt_path))


def pick_image_size(configured: int | None, saved: dict[str, Any], ckpt_path: str) -> int:
    """The side images are resized to: ``image_size`` if given, else the training DataModule's."""
    trained = saved.get("image_size")
    if configured is None:
        if trained is None:
            raise ValueError(
                f"{ckpt_path} does not record the image size its model was trained with (it holds no "
                "DataModule hyperparameters); pass image_size=<pixels>, the data.image_size of its training run."
            )
        return int(trained)
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ValueError(f"image_size={configured!r} must be a positive integer (pixels), or null.")
    if trained is not None and int(trained) != configured:
        log.warning("image_size=%d differs from the %d px the model was trained with; captions may suffer.",
                    configured, trained)
    return configured


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:<n> or mps.") from error


def unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, suffixed -1, -2... when another image already took it (a.jpg and a.png)."""
    stem, n = path.stem, 0
    while (stem if n == 0 else f"{stem}-{n}") in used:
        n += 1
    name = stem if n == 0 else f"{stem}-{n}"
    used.add(name)
    return name
