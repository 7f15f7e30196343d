"""Reading image files robustly: odd modes to proper RGB, a decompression-bomb guard, bad files tracked.

A long run must not die on one broken JPEG: :func:`load_image` raises only ``FileNotFoundError`` or
:class:`BadImageError` (a ``ValueError``), each naming the file, and :class:`BadImageLog` records which
images of a split turned out unreadable, shared by every DataLoader worker, so the DataModule can skip
them, warn once per file and report how many there were.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioning.data.arrow_rows import arrow_file, image_source

# The RGB rules live with the exported runtime, so an export reads files as training does (one implementation).
from captioning.runtime import to_rgb

__all__ = ["BadImage", "BadImageError", "BadImageLog", "BadImageWarning", "load_image", "to_rgb"]

ON_BAD_IMAGE = ("skip", "fail")


class BadImageError(ValueError):
    """An image file that cannot be used: corrupt, truncated, empty, not an image, or too large."""


class BadImageWarning(UserWarning):
    """An image was skipped because it could not be read (``data.on_bad_image=skip``)."""


class BadImage:
    """Stands in for a sample whose image could not be read; the collate function drops it.

    Picklable (it crosses from DataLoader workers), and carries what to tell the user.
    """

    __slots__ = ("path", "reason")

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return BadImage, (self.path, self.reason)

    def __repr__(self) -> str:
        return f"BadImage({self.path!r}, {self.reason!r})"


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """The image at ``path`` as RGB (see :func:`to_rgb`), fully decoded.

    Raises FileNotFoundError when the file is missing, else :class:`BadImageError` naming the file and
    the cause: empty, not an image, truncated or corrupt, or more than ``max_pixels`` pixels (default
    PIL's ``Image.MAX_IMAGE_PIXELS``, ~89 Mpx), a guard against decompression bombs that would take
    gigabytes to decode. The size is checked from the header, before decoding.
    """
    path = str(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's warning for a merely large image would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image_source(path)) as image:  # a file, or a row of a dataset's Arrow file
                width, height = image.size
                if limit is not None and width * height > limit:
                    raise BadImageError(_too_large(path, width, height, limit))
                image.load()
                return to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError as err:
        if arrow_file(path) != path:
            raise  # its message names the Arrow file
        raise FileNotFoundError(f"Image {path} is missing (the annotations list it)") from err
    except IsADirectoryError as err:
        raise BadImageError(f"Image {path} is a directory, not an image file.") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(f"Image {path} is refused as a possible decompression bomb: {err}") from err
    except Exception as err:  # noqa: BLE001 - any decoder failure means this one file is unusable
        raise BadImageError(f"Image {path} could not be decoded: {_describe(err, path)}") from err


def _too_large(path: str, width: int, height: int, limit: int) -> str:
    return (f"Image {path} is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{limit:,} (data.max_image_pixels), so it is refused as a possible decompression bomb")


def _describe(err: Exception, path: str) -> str:
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return "the file is empty (0 bytes)"
    text = str(err).replace(f"'{path}'", "").replace(path, "").strip() or type(err).__name__
    return f"{type(err).__name__}: {text}"


class BadImageLog:
    """Which images of one split are unreadable: one flag per image, in shared memory.

    DataLoader workers are separate processes; the flags live in a shared-memory tensor, so a file one
    worker finds broken is known to all of them and to the main process (for the count), and is warned
    about once, not once per worker and epoch.

    Args:
        paths: (I,) the split's image paths, in the split's order.
        role: the split's role ("train", "val", "test"), for messages.
    """

    def __init__(self, paths: Sequence[str] | np.ndarray, role: str) -> None:
        self.paths = paths
        self.role = role
        self.flags = torch.zeros(len(paths), dtype=torch.uint8).share_memory_()

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[index])

    def record(self, index: int, reason: str) -> BadImage:
        """Flag image ``index`` as bad and warn about it the first time; returns the stand-in sample.

        ``reason`` is the error's message, which names the file.
        """
        path = str(self.paths[index])
        if not self.flags[index]:
            self.flags[index] = 1
            warnings.warn(
                f"Skipping a {self.role} image: {reason.rstrip('.')}. The run goes on without it; replace or "
                "remove the file (or its annotation), or set data.on_bad_image=fail to stop on such files.",
                BadImageWarning, stacklevel=2,
            )
        return BadImage(path, reason)

    def mark(self, indices: Sequence[int]) -> None:
        """Flag images known to be bad already (found while building the feature cache), without warning."""
        if len(indices):
            self.flags[torch.as_tensor(list(indices), dtype=torch.long)] = 1

    @property
    def count(self) -> int:
        return int(self.flags.sum())

    def bad_paths(self) -> list[str]:
        return [str(self.paths[i]) for i in torch.nonzero(self.flags).flatten().tolist()]
