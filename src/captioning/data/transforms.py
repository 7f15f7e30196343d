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

    def __call__(self, image: str | Path | Image.Image) -> torch.Tensor:
        """A file (or an RGB image already loaded with :meth:`load`) -> (3, S, S)."""
        return self.transform(image if isinstance(image, Image.Image) else self.load(image))

    def __repr__(self) -> str:
        return f"ImagePipeline(image_size={self.image_size}, augment={self.augment}, transform={self.transform!r})"
