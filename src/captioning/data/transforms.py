"""How an image file becomes the tensor a model sees — one pipeline for training, evaluation, captioning
and the demo, so that the same file always gives the same tensor.

:class:`ImagePipeline` follows an :class:`~captioning.runtime.ImageContract` — the input the encoder declares
(size, mean, std, interpolation, crop): :func:`~captioning.data.images.load_image` (any mode to RGB: transparency
over white, 16-bit rescaled, CMYK and greyscale converted; a decompression-bomb guard), the contract's resize
(PIL's filters, as the exported ``run.py`` resizes), then scale to [0, 1] and normalise with its mean and std.
:class:`CaptionAugment` augments training batches so that their captions stay true.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from captioning.data.arrow_rows import image_source
from captioning.data.images import load_image
from captioning.runtime import IMAGENET_MEAN, IMAGENET_STD, ImageContract, resize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CaptionAugment", "ImageContract", "ImagePipeline", "auto_image_size",
           "image_transform"]


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB -> FloatTensor (3, S, S), ImageNet-normalised, with torchvision's transforms (for comparisons:
    :class:`ImagePipeline` resizes with PIL's filter, which can differ from torchvision's in the last bit)."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImagePipeline:
    """An image file -> (3, S, S) float tensor, as every entry point reads images.

    Decode to RGB, resize by the contract (:func:`captioning.runtime.resize`, the exported runtime's own), scale to
    [0, 1] and normalise with the contract's mean and std. :meth:`stored` and :meth:`finish` split the steps so
    that a DataModule holding a small set's images in memory keeps them decoded and resized (uint8) and only
    finishes them per sample. Training augmentation is not here: it works on whole batches (:class:`CaptionAugment`).

    Args:
        contract: the encoder's :class:`~captioning.runtime.ImageContract` with its size set, or a side S for
            ImageNet's statistics and the whole image resized bilinearly (what every encoder used before encoders
            declared their input).
        max_pixels: refuse larger images (decompression bombs); None = PIL's limit.
    """

    def __init__(self, contract: ImageContract | int, max_pixels: int | None = None) -> None:
        if not isinstance(contract, ImageContract):
            contract = ImageContract(size=int(contract))
        if contract.size is None:
            raise ValueError("ImagePipeline needs a contract with a size: ImageContract.at(data.image_size).")
        self.contract, self.max_pixels = contract, max_pixels
        self.image_size = contract.size
        self._mean, self._std = list(contract.mean), list(contract.std)

    def load(self, path: str | Path) -> Image.Image:
        """The file as RGB; FileNotFoundError or BadImageError (a ValueError naming the file) if it cannot be."""
        return load_image(path, self.max_pixels)

    def stored(self, image: Image.Image) -> torch.Tensor:
        """What a cache of this pipeline's inputs holds: the image resized, as uint8 (3, S, S)."""
        return F.pil_to_tensor(resize(image, self.contract))

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) -> float32 in [0, 1], normalised with the contract's mean and std (one image or a batch)."""
        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), self._mean, self._std)

    def __call__(self, image: str | Path | Image.Image | torch.Tensor) -> torch.Tensor:
        """A file, an RGB image loaded with :meth:`load`, or :meth:`stored`'s tensor -> (3, S, S)."""
        if isinstance(image, torch.Tensor):
            if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
                raise ValueError(f"ImagePipeline: a tensor must be stored()'s (3, {self.image_size}, "
                                 f"{self.image_size}) uint8 image, got shape {tuple(image.shape)}.")
            return self.finish(image)
        if not isinstance(image, Image.Image):
            image = self.load(image)
        return self.finish(self.stored(image))

    def __repr__(self) -> str:
        # Feature caches are keyed on this string: every field of the contract is in it.
        return f"ImagePipeline({self.contract!r})"


class CaptionAugment:
    """Random augmentation of a training batch that keeps every reference caption true, on the batch's device.

    - **Geometry**: one affine warp per image (shift up to ``translate`` of the side, zoom in ``scale``, rotation
      up to ``rotate`` degrees; borders replicated), small enough that "on the left" or "at the top" stay true.
    - **Flips**: with probability ``flip`` an image is mirrored left to right and its caption's ``swaps`` word
      pairs exchanged ("to the left of" <-> "to the right of", "on the left" <-> "on the right"): a plain flip
      would make every caption that names a side false.
    - **Photometry that keeps colours**: brightness and contrast scaled by up to ``brightness`` / ``contrast``
      and Gaussian pixel noise of std ``noise`` (in [0, 1] units) — no hue or saturation jitter, which would
      change the colour the captions name.

    The defaults are what helped on the built-in set (README, "Generalisation"): zooms of 0.75-1.1 (objects drawn
    at 0.8x the training scale are then captioned nearly as well as the usual ones; the size words stay apart:
    a small object zoomed 1.1x is still smaller than a large one at 0.75x) and shifts. Flips, rotation and
    photometry are there for data that needs them, off by default: with them learning was slower within the
    budget, and flips break the left-to-right order in which the built-in set's captions list three objects.

    Batched: a handful of tensor ops for the whole batch, no per-image Python (cheap beside a training step on a
    CPU, free on a GPU). Images come normalised with ``mean`` / ``std`` (the pipeline's) and leave the same way.
    :meth:`bind` gives it the vocabulary (the swap table of word ids) before the first batch.
    """

    def __init__(self, flip: float = 0.0, translate: float = 0.05, scale: tuple[float, float] | list[float] = (0.75, 1.1),
                 rotate: float = 0.0, brightness: float = 0.0, contrast: float = 0.0, noise: float = 0.0,
                 swaps: list[list[str]] | tuple[tuple[str, str], ...] = (("left", "right"),),
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        scale = tuple(float(s) for s in scale)
        checks = (("flip", flip, 0.0, 1.0), ("translate", translate, 0.0, 0.25), ("rotate", rotate, 0.0, 45.0),
                  ("brightness", brightness, 0.0, 0.9), ("contrast", contrast, 0.0, 0.9), ("noise", noise, 0.0, 0.5))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"data.augmentation.{name} must be a number in [{low}, {high}], got {value!r}.")
        if len(scale) != 2 or not 0.5 <= scale[0] <= scale[1] <= 2.0:
            raise ValueError(f"data.augmentation.scale must be [min, max] with 0.5 <= min <= max <= 2, got {list(scale)}.")
        pairs = [tuple(pair) for pair in swaps]
        if any(len(pair) != 2 or not all(isinstance(w, str) for w in pair) for pair in pairs):
            raise ValueError(f"data.augmentation.swaps must be word pairs like [[left, right]], got {swaps!r}.")
        self.flip, self.translate, self.scale, self.rotate = float(flip), float(translate), scale, float(rotate)
        self.brightness, self.contrast, self.noise = float(brightness), float(contrast), float(noise)
        self.swaps: tuple[tuple[str, str], ...] = tuple(pairs)  # type: ignore[assignment]
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self._swap_ids: torch.Tensor | None = None

    def use_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The normalisation the batches arrive with (the encoder's contract): photometry undoes and redoes it."""
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def bind(self, word_to_idx: dict[str, int]) -> None:
        """The vocabulary's word ids: a flip maps each id through this table (the swapped words exchanged)."""
        table = torch.arange(max(word_to_idx.values()) + 1)
        for a, b in self.swaps:
            if a in word_to_idx and b in word_to_idx:
                table[word_to_idx[a]], table[word_to_idx[b]] = word_to_idx[b], word_to_idx[a]
        self._swap_ids = table

    def swap_words(self, captions: torch.Tensor) -> torch.Tensor:
        """Word ids (N, T) -> the ids of the mirrored captions (N, T)."""
        if self._swap_ids is None:
            raise RuntimeError("CaptionAugment.bind(vocabulary) was not called: a flip needs the word ids to swap.")
        return self._swap_ids.to(captions.device)[captions]

    def __call__(self, images: torch.Tensor, captions: torch.Tensor,
                 image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) normalised, captions (N, T) word ids -> the augmented batch (same shapes).

        ``image_index`` (N,): the image of each caption when images carry several captions (else N = B, row to
        row); a flipped image has all of its captions mirrored."""
        n, device = images.shape[0], images.device
        flipped = torch.rand(n, device=device) < self.flip
        if self._geometric:
            images = self._warp(images, flipped)
        elif flipped.any():
            images = torch.where(flipped.view(n, 1, 1, 1), images.flip(-1), images)
        if flipped.any():
            mirrored = flipped if image_index is None else flipped[image_index]
            captions = torch.where(mirrored.unsqueeze(1), self.swap_words(captions), captions)
        if self.brightness or self.contrast or self.noise:
            images = self._photometric(images)
        return images, captions

    @property
    def _geometric(self) -> bool:
        return bool(self.translate or self.rotate or self.scale != (1.0, 1.0))

    def affine(self, flipped: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The warps (N, 2, 3) for ``uniform`` draws (N, 4) in [0, 1] (rotation, zoom, shift x, shift y), as
        ``affine_grid`` takes them: output position -> input position, in [-1, 1] coordinates; the flip folded in."""
        angle = torch.deg2rad((uniform[:, 0] * 2 - 1) * self.rotate)
        zoom = self.scale[0] + uniform[:, 1] * (self.scale[1] - self.scale[0])
        shift = (uniform[:, 2:] * 2 - 1) * (2 * self.translate)  # grid coordinates span [-1, 1]: 2 per side
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        mirror = torch.where(flipped, -1.0, 1.0).to(cos.dtype)
        return torch.stack([torch.stack([cos * mirror, -sin, -shift[:, 0]], 1),
                            torch.stack([sin * mirror, cos, -shift[:, 1]], 1)], 1)

    def _warp(self, images: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        theta = self.affine(flipped, torch.rand(n, 4, device=images.device)).to(images.dtype)
        # affine_grid's sampling positions, theta [x, y, 1] for every output pixel, written out as broadcast
        # products: a batched matmul with an inner size of 3 costs ~20x more on a CPU (6 ms at 64 x 64 x 64 px)
        base = _base_grid(h, w, images.device, images.dtype)  # (1, h*w, 3)
        x, y = base[..., 0:1], base[..., 1:2]  # (1, h*w, 1)
        rows = theta.unsqueeze(1)  # (N, 1, 2, 3): row r gives output coordinate r
        grid = torch.addcmul(torch.addcmul(rows[..., 2], x, rows[..., 0]), y, rows[..., 1])  # (N, h*w, 2)
        grid = grid.view(n, h, w, 2)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                               align_corners=False)

    def _photometric(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness b and contrast c about the image's mean g, and grey pixel noise, in [0, 1] units:
        p' = (p - g) c + g b + noise, computed on the normalised tensor in one pass, x' = x c + offset + noise / std
        (one noise value per pixel for all channels: it changes lightness, not hue)."""
        n, device, dtype = images.shape[0], images.device, images.dtype
        mean, std = self.mean.to(device, dtype), self.std.to(device, dtype)
        draws = torch.rand(n, 2, device=device, dtype=dtype) * 2 - 1
        brightness = (1 + draws[:, 0] * self.brightness).view(n, 1, 1, 1)
        contrast = (1 + draws[:, 1] * self.contrast).view(n, 1, 1, 1)
        grey = (images.mean(dim=(2, 3), keepdim=True) * std + mean).mean(dim=1, keepdim=True)  # (N, 1, 1, 1)
        offset = ((mean - grey) * contrast + grey * brightness - mean) / std
        out = torch.addcmul(offset, images, contrast)
        if self.noise:
            noise = torch.rand(n, 1, *images.shape[2:], device=device, dtype=dtype).sub_(0.5).mul_(self.noise * 12**0.5)
            out.addcdiv_(noise, std)  # uniform noise of standard deviation `noise`
        return out

    def __repr__(self) -> str:
        return (f"CaptionAugment(flip={self.flip}, translate={self.translate}, scale={list(self.scale)}, "
                f"rotate={self.rotate}, brightness={self.brightness}, contrast={self.contrast}, noise={self.noise}, "
                f"swaps={[list(p) for p in self.swaps]})")


@functools.lru_cache(maxsize=8)
def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, h*w, 3): [x, y, 1] of each pixel centre in [-1, 1] (``affine_grid``'s, ``align_corners=False``)."""
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).view(1, h * w, 3)


AUTO_SIZE_CAP = 224  # the largest size "auto" picks from the data itself: ImageNet's, and what a CPU can train on


def auto_image_size(paths: Sequence[str], native: int | None = None, stride: int = 32, sample: int = 64,
                    cap: int = AUTO_SIZE_CAP) -> tuple[int, str]:
    """``image_size: auto`` -> (the size, why), for the images at ``paths`` and the encoder that will see them.

    A pretrained encoder gets its ``native`` size (what its weights were trained at). Otherwise the images' own
    size: the median longer side of up to ``sample`` of them (headers only, spread over the split), rounded to a
    multiple of the encoder's ``stride`` (its downsampling) and capped at ``cap`` — 64 px images stay 64 px
    instead of being upscaled to 224, which costs ~12x the compute for no detail.
    """
    if native:
        return int(native), f"the input size the encoder's pretrained weights expect ({native} px)"
    picked = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, num=min(sample, len(paths)), dtype=int))]
    sides = []
    for path in picked:
        try:
            with Image.open(image_source(path)) as image:  # reads the header only
                sides.append(max(image.size))
        except (OSError, ValueError):
            continue  # unreadable files are the image pipeline's to report
    if not sides:
        return cap, f"no training image could be read to measure, so the cap ({cap} px)"
    median = int(np.median(sides))
    size = int(min(cap, max(stride, round(median / stride) * stride)))
    capped = " capped" if median > cap else ""
    return size, (f"the training images' own size (median longer side {median} px of {len(sides)} sampled), "
                  f"rounded to a multiple of the encoder's stride {stride}{capped}")
