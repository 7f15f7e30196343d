"""Attention overlays: an image and, for every word of its caption, where the attention decoder looked.

Drawn with PIL and NumPy only (no matplotlib), so caption.py and the W&B callbacks can both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = ["attention_overlay", "heat_colors"]

# The "jet" ramp: dark blue (least attention) -> cyan -> yellow -> dark red (most).
_JET_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values (H, W) in [0, 1] -> RGB (H, W, 3) uint8 on the jet colour ramp."""
    values = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(values, _JET_STOPS, _JET_RGB[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def attention_overlay(
    image: Image.Image,
    words: Sequence[str],
    weights: torch.Tensor,
    tile_size: int = 160,
    columns: int = 5,
    alpha: float = 0.5,
    title: str = "",
) -> Image.Image:
    """A grid of tiles: the image, then one tile per word with that word's attention map over the image.

    Args:
        image: the captioned image (any size and mode). The model saw it resized to a square without
            cropping, so its attention grid spans the whole image whatever the aspect ratio.
        words: the L' words to show, in order (e.g. the caption's words and ``<END>``); word t gets row t.
        weights: (L, h, w) attention weights with L >= L', as ``Decoded.attn_weights[i]``.
        tile_size: the longer side of each tile, in pixels (the image is scaled to it, aspect kept).
        columns: tiles per row of the grid.
        alpha: opacity of the heat map over the image.
        title: the label under the plain image tile (e.g. its file name).

    Each map is upsampled bilinearly to the tile and scaled to its own [min, max] (as an image viewer
    would), so a tile shows where that word looked relative to elsewhere, not how peaked the map is.
    Returns an RGB image; every tile has its label (``title`` or the word) under it.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"attention_overlay: weights must be a tensor (L, h, w), got {shape}.")
    if len(words) > weights.shape[0]:
        raise ValueError(
            f"attention_overlay: {len(words)} words but attention weights for only {weights.shape[0]} steps; "
            "pass the weights the decoder returned with this caption."
        )
    if tile_size < 8 or columns < 1 or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"attention_overlay: tile_size must be >= 8, columns >= 1 and alpha in [0, 1]; got "
            f"tile_size={tile_size}, columns={columns}, alpha={alpha}."
        )
    scale = tile_size / max(image.size)
    tile_w, tile_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    base = image.convert("RGB").resize((tile_w, tile_h), Image.BICUBIC)
    base_pixels = np.asarray(base, dtype=np.float32)

    maps = weights[: len(words)].detach().to("cpu", torch.float32)
    if len(words):
        maps = F.interpolate(maps.unsqueeze(1), size=(tile_h, tile_w), mode="bilinear", align_corners=False)
        maps = maps.squeeze(1)
        low = maps.amin(dim=(1, 2), keepdim=True)
        span = maps.amax(dim=(1, 2), keepdim=True) - low
        maps = ((maps - low) / span.clamp_min(1e-12)).numpy()
    tiles = [base]
    for heat in maps:
        blended = (1.0 - alpha) * base_pixels + alpha * heat_colors(heat).astype(np.float32)
        tiles.append(Image.fromarray(np.round(blended).astype(np.uint8)))
    labels = [title, *words]

    font_size = max(10, tile_size // 10)
    font = _font(font_size)
    pad, label_h = 4, font_size + 8
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (tile_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x = pad + (k % cols) * (tile_w + pad)
        y = pad + (k // cols) * (tile_h + label_h + pad)
        canvas.paste(tile, (x, y))
        text = _fit(draw, label, font, tile_w)
        left = x + (tile_w - draw.textlength(text, font=font)) / 2
        draw.text((left, y + tile_h + 3), text, fill="black", font=font)
    return canvas
