"""How an image file becomes the tensor a model sees — one pipeline for training, evaluation, captioning
and the demo, so that the same file always gives the same tensor.

:class:`ImagePipeline` = :func:`~captioning.data.images.load_image` (any mode to RGB: transparency over
white, 16-bit rescaled, CMYK and greyscale converted; a decompression-bomb guard) then
:func:`image_transform` (resize to S x S, scale to [0, 1], normalise with ImageNet's mean and std: what
torchvision's pretrained weights expect, and what the small CNN trained from scratch learns on too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from captioning.data.images import load_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImagePipeline", "image_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class ImagePipeline:
    """An image file -> (3, S, S) float tensor, as every entry point reads images.

    Without augmentation the steps are spelled out with torchvision's functional ops — decode to uint8,
    resize, scale to [0, 1], normalise — the same kernels :func:`image_transform` runs, so the tensors are
    equal to its, without its per-call overhead; :meth:`stored` and :meth:`finish` split them so that a
    DataModule holding a small set's images in memory keeps them decoded and resized (uint8) and only
    finishes them per sample.

    Args:
        image_size: S, the side images are resized to (the DataModule's ``image_size``).
        augment: the training augmentation (:func:`image_transform`); off for evaluation and captioning.
        max_pixels: refuse larger images (decompression bombs); None = PIL's limit.
    """

    def __init__(self, image_size: int, augment: bool = False, max_pixels: int | None = None) -> None:
        self.image_size, self.augment, self.max_pixels = image_size, augment, max_pixels
        self.transform = image_transform(image_size, augment)

    def load(self, path: str | Path) -> Image.Image:
        """The file as RGB; FileNotFoundError or BadImageError (a ValueError naming the file) if it cannot be."""
        return load_image(path, self.max_pixels)

    def stored(self, image: Image.Image) -> torch.Tensor:
        """What a cache of this pipeline's inputs holds: the image as uint8 (3, H, W), resized to (3, S, S)
        unless the pipeline augments (the random crop then needs the whole image)."""
        pixels = F.pil_to_tensor(image)
        return pixels if self.augment else self._resize(pixels)

    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) == (self.image_size, self.image_size):
            return pixels  # what Resize does with an image of the size already
        return F.resize(pixels, [self.image_size, self.image_size], antialias=True)

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, S, S) -> float32 in [0, 1], ImageNet-normalised."""
        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, image: str | Path | Image.Image | torch.Tensor) -> torch.Tensor:
        """A file, an RGB image loaded with :meth:`load`, or :meth:`stored`'s tensor -> (3, S, S)."""
        if not isinstance(image, Image.Image | torch.Tensor):
            image = self.load(image)
        if self.augment:
            return self.transform(image).as_subclass(torch.Tensor)
        pixels = image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)
        return self.finish(self._resize(pixels))

    def __repr__(self) -> str:
        return f"ImagePipeline(image_size={self.image_size}, augment={self.augment}, transform={self.transform!r})"
