"""Captions from an exported captioner, without the ``captioning`` package: NumPy and ONNX Runtime (or
PyTorch for the TorchScript export), nothing else.

``src/export.py`` writes this file into the export folder as ``run.py``, beside ``encoder.onnx`` and
``step.onnx`` (or ``.pt``), ``vocab.json`` and ``config.json``::

    pip install numpy pillow onnxruntime          # (torch instead of onnxruntime for format=torchscript)
    python run.py <export folder> photo.jpg other.png [--beam 3] [--max-length 20]

or from Python::

    from run import ExportedCaptioner
    captioner = ExportedCaptioner("exported/")
    captioner.caption_files(["photo.jpg"])           # [("a red square on the left", -1.23)]

The encoder graph maps images (N, 3, S, S) to the decoder's initial state; the step graph maps the words
fed (N,) and the state to the next word's log-probabilities (N, V) and the next state (the hand-written
cell inside). The loops below — greedy decoding, and beam search that keeps the greedy hypothesis in the
beam — are the same algorithms as ``captioning.models.decoding``, so the captions are the same.

The file is also where the package reads images: :class:`ImageContract` (the input an encoder declares: size,
mean, std, interpolation, crop), :func:`to_rgb` (any PIL mode to 8-bit RGB) and :func:`resize` are what
training's ``ImagePipeline`` runs, so an exported folder reads a file exactly as training did — one
implementation, copied along.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ExportedCaptioner", "ImageContract", "resize", "to_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Where transparent pixels show: white, as image viewers and browsers show them.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class ImageContract:
    """The input an encoder expects — declared by the encoder, stored in the checkpoint, obeyed by every edge
    (training and evaluation transforms, caption.py, the demo, the feature-cache key, the export).

    Args:
        size: S, the side of the square the model sees; None for an encoder trained from scratch, which takes
            any size (the data then chooses: ``data.image_size``).
        mean, std: per-channel normalisation of pixels in [0, 1] (ImageNet's; CLIP's for CLIP towers).
        interpolation: the resampling filter, ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` (PIL's, antialiased).
        crop_pct: None resizes the whole image to S x S (every object stays in view, so every reference stays
            true); a fraction resizes the shorter side to S / crop_pct and takes the centre S x S, as timm and
            CLIP evaluate ImageNet.
    """

    size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"image contract: size must be a positive integer or None, got {self.size!r}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image contract: mean and std need 3 values each, std > 0; got {self.mean}, {self.std}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"image contract: interpolation {self.interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}.")
        if self.crop_pct is not None and not 0.2 <= float(self.crop_pct) <= 1.0:
            raise ValueError(f"image contract: crop_pct must be in [0.2, 1] or None, got {self.crop_pct!r}.")

    def at(self, size: int) -> ImageContract:
        """The same contract at side ``size`` (the data's choice for an encoder that takes any size)."""
        return replace(self, size=int(size))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageContract:
        known = {k: values[k] for k in ("size", "mean", "std", "interpolation", "crop_pct") if k in values}
        return cls(**known)


def to_rgb(image):
    """Any PIL mode -> 8-bit RGB that looks like the image.

    Plain ``convert("RGB")`` is wrong for two families: 16/32-bit greyscale (it clips at 255, so a 16-bit PNG
    comes out nearly white) is rescaled to 8 bits instead; and images with transparency (RGBA, LA, palette +
    transparency) are composited over a white background instead of showing whatever colour the invisible
    pixels happen to hold. CMYK, YCbCr, greyscale and palettes convert as PIL converts them.
    """
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max(initial=0.0))
        if mode in _SIXTEEN_BIT_MODES or (mode == "I" and 255 < peak <= 65535):
            scale = 65535.0
        elif mode == "F" and peak <= 1.0:
            scale = 1.0
        else:
            scale = max(peak, 255.0) if mode == "I" else max(peak, 1e-12)
        grey = np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image, contract: ImageContract):
    """An RGB PIL image -> the S x S image the contract says (``contract.size`` must be set): the whole image
    resized, or with ``crop_pct`` the shorter side to S / crop_pct and the centre S x S."""
    from PIL import Image

    size = contract.size
    if size is None:
        raise ValueError("image contract: no size to resize to (the data sets it: ImageContract.at(size)).")
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[contract.interpolation]
    width, height = image.size
    if contract.crop_pct is None:
        return image if (width, height) == (size, size) else image.resize((size, size), resample)
    short = int(size / contract.crop_pct)  # timm's rounding (floor)
    scaled = (short, max(short, round(height * short / width))) if width <= height else \
        (max(short, round(width * short / height)), short)
    if scaled != (width, height):
        image = image.resize(scaled, resample)
    left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, contract: ImageContract) -> np.ndarray:
    """uint8 (..., 3, S, S) -> float32 in [0, 1], normalised with the contract's mean and std."""
    mean = np.asarray(contract.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(contract.std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels.astype(np.float32) / np.float32(255.0) - mean) / std


class _Session:
    """One exported graph: ``run(inputs dict) -> list of arrays`` for ONNX Runtime or TorchScript."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.kind = "onnx"
        else:
            import warnings

            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is in maintenance: still loads
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
            self.kind = "torchscript"

    def run(self, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.kind == "onnx":
            return self.session.run(None, {k: inputs[k] for k in self.inputs})
        import torch

        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in names))
        return [t.numpy() for t in (out if isinstance(out, tuple | list) else (out,))]


class ExportedCaptioner:
    """An export folder, ready to caption images.

    ``config.json`` says the image size and normalisation, the special token ids, the state's names (which
    the encoder returns and the step takes and gives back) and the file format.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.words: list[str] = json.loads((self.folder / "vocab.json").read_text())
        suffix = ".onnx" if self.config["format"] == "onnx" else ".pt"
        self.encoder = _Session(self.folder / f"encoder{suffix}")
        self.step_graph = _Session(self.folder / f"step{suffix}")
        self.state_names: list[str] = self.config["state"]  # what the encoder gives, in order
        self.carried: list[str] = self.config["carried"]  # what the step gives back, in order
        self.null_id, self.start_id, self.end_id = (self.config[k] for k in ("null_id", "start_id", "end_id"))
        # exports before the contract was recorded: size, mean, std at the top level, the whole image bilinear
        self.contract = ImageContract.from_dict(self.config["image"]) if "image" in self.config else ImageContract(
            self.config["image_size"], tuple(self.config["mean"]), tuple(self.config["std"]))
        # classifier-free guidance: every step also scores the words without an image (the state in prior.npz)
        self.guidance = float(self.config.get("guidance", 0.0))
        self.prior: dict[str, np.ndarray] = {}
        if self.guidance:
            with np.load(self.folder / self.config["prior"]) as prior:
                self.prior = {k: prior[k] for k in self.state_names}

    # ------------------------------------------------------------------------------------ images
    def preprocess(self, image) -> np.ndarray:
        """A file or PIL image -> (3, S, S) float32 as training saw it: :func:`to_rgb`, :func:`resize` and the
        normalisation of the contract in ``config.json``."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                opened.load()
                image = to_rgb(opened)
        else:
            image = to_rgb(image)
        pixels = np.asarray(resize(image, self.contract), dtype=np.uint8).transpose(2, 0, 1)
        return normalize(pixels, self.contract)

    # ------------------------------------------------------------------------------------ graphs
    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images (N, 3, S, S) float32 -> the decoder's initial state by name (with guidance: 2N rows, the
        images' then the prior's)."""
        outputs = self.encoder.run(["images"], {"images": np.ascontiguousarray(images, dtype=np.float32)})
        state = dict(zip(self.state_names, outputs, strict=True))
        if self.guidance:
            n = images.shape[0]
            state = {k: np.concatenate([v, np.repeat(self.prior[k], n, axis=0)]) for k, v in state.items()}
        return state

    def step(self, words: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """words (N,) int64 -> (log-probabilities (N, V), the next state, attention weights or None).

        With guidance the state holds 2N rows and the log-probabilities are log p(w | image) + g (log p(w |
        image) - log p(w)), renormalised: ``captioning.models.decoding.Guided``."""
        fed = np.concatenate([words, words]) if self.guidance else words
        outputs = self.step_graph.run(["words", *self.state_names], {"words": fed.astype(np.int64), **state})
        log_probs = outputs[0].astype(np.float32, copy=False)
        new_state = dict(state)
        new_state.update(zip(self.carried, outputs[1:1 + len(self.carried)], strict=True))
        weights = outputs[1 + len(self.carried)] if len(outputs) > 1 + len(self.carried) else None
        if self.guidance:
            n = words.shape[0]
            with_image, prior = log_probs[:n], log_probs[n:]
            with np.errstate(invalid="ignore"):
                guided = with_image + np.float32(self.guidance) * (with_image - prior)
            guided = np.where(np.isinf(with_image), -np.inf, guided).astype(np.float32)
            top = guided.max(axis=1, keepdims=True)
            log_probs = guided - (top + np.log(np.exp(guided - top).sum(axis=1, keepdims=True)))
            weights = None if weights is None else weights[:n]
        return log_probs, new_state, weights

    def _rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        """State rows to keep for the hypotheses' rows (N*K,): with guidance, the same rows of both halves."""
        return np.concatenate([rows, rows + n]) if self.guidance else rows

    # ------------------------------------------------------------------------------------ decoding
    def greedy(self, images: np.ndarray, max_length: int = 20, block_ngrams: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The most likely word at every step: captions (N, L) ending in <END> then <NULL>, log-probs (N,);
        ``block_ngrams=n``: no n-gram twice in a caption."""
        state = self.encode(images)
        N = images.shape[0]
        words = np.full(N, self.start_id, dtype=np.int64)
        captions = np.full((N, max_length), self.null_id, dtype=np.int64)
        total = np.zeros(N, dtype=np.float32)
        done = np.zeros(N, dtype=bool)
        for t in range(max_length):
            log_probs, state, _ = self.step(words, state)
            log_probs = _block_ngrams(log_probs, captions[:, :t], block_ngrams, self.end_id)
            words = log_probs.argmax(axis=1)
            best = log_probs[np.arange(N), words]
            words = np.where(done, self.null_id, words)
            total += np.where(done, 0.0, best).astype(np.float32)
            captions[:, t] = words
            done |= words == self.end_id
            if done.all():
                break
        return captions, total

    def beam(self, images: np.ndarray, beam_size: int = 3, max_length: int = 20, length_penalty: float = 0.0,
             groups: int = 1, diversity: float = 0.0, block_ngrams: int = 0,
             length_norm: str = "power") -> tuple[np.ndarray, np.ndarray]:
        """Beam search over N x K hypotheses in ``groups`` groups (diverse beam search: a group's extensions cost
        ``diversity`` per earlier group that chose the same word at this step), each group's greedy hypothesis
        kept (plain beam search never returns a less likely caption than greedy). The pick maximises
        log p / lp(length): ``length ** length_penalty`` ("power") or ``((5 + length) / 6) ** length_penalty``
        ("gnmt"). ``captioning.models.decoding.beam_search``, step for step."""
        if beam_size == 1:
            return self.greedy(images, max_length, block_ngrams)
        if beam_size % groups:
            raise ValueError(f"beam_size={beam_size} does not split into {groups} equal groups.")
        N, K, G = images.shape[0], beam_size, groups
        Kg = K // G
        # each image's rows (and, with guidance, the prior's) repeated K times: rows 0..NK-1, then NK..2NK-1
        state = {k: np.repeat(v, K, axis=0) for k, v in self.encode(images).items()}
        words = np.full(N * K, self.start_id, dtype=np.int64)
        captions = np.full((N, K, max_length), self.null_id, dtype=np.int64)
        ranked_scores = np.full((N, G, Kg), -np.inf, dtype=np.float32)
        ranked_scores[:, :, 0] = 0.0
        scores = ranked_scores.copy()
        done = np.zeros((N, K), dtype=bool)
        lengths = np.zeros((N, K), dtype=np.float32)
        greedy_beam = np.zeros((N, G), dtype=np.int64)
        images_idx = np.arange(N)
        for t in range(max_length):
            log_probs, state, _ = self.step(words, state)
            V = log_probs.shape[1]
            log_probs = _block_ngrams(log_probs, captions.reshape(N * K, max_length)[:, :t], block_ngrams, self.end_id)
            ended = np.full(V, -np.inf, dtype=np.float32)
            ended[self.null_id] = 0.0
            log_probs = np.where(done.reshape(N * K, 1), ended, log_probs).reshape(N, G, Kg, V)
            group_done = done.reshape(N, G, Kg)
            counts = np.zeros((N, V), dtype=np.float32) if diversity and G > 1 else None
            beams, picked = [], []
            for g in range(G):
                group_lp = log_probs[:, g]
                ranked = group_lp
                if counts is not None and g > 0:
                    ranked = np.where(group_done[:, g, :, None], ended,
                                      group_lp - np.float32(diversity) * counts[:, None, :]).astype(np.float32)
                candidates = (ranked_scores[:, g, :, None] + ranked).reshape(N, Kg * V)
                flat = _topk(candidates, Kg)
                top = np.take_along_axis(candidates, flat, axis=1)
                gb = greedy_beam[:, g]
                greedy_flat = gb * V + ranked[images_idx, gb].argmax(axis=1)
                lost = ~(flat == greedy_flat[:, None]).any(axis=1)
                flat[lost, Kg - 1] = greedy_flat[lost]
                top[lost, Kg - 1] = candidates[lost, greedy_flat[lost]]
                greedy_beam[:, g] = (flat == greedy_flat[:, None]).astype(np.int32).argmax(axis=1)
                ranked_scores[:, g] = top
                scores[:, g] = np.take_along_axis((scores[:, g, :, None] + group_lp).reshape(N, Kg * V), flat, axis=1)
                beam, chosen = flat // V, flat % V
                if counts is not None:
                    live = ~np.take_along_axis(group_done[:, g], beam, axis=1) & np.isfinite(top)
                    np.add.at(counts, (np.repeat(images_idx, Kg), chosen.reshape(-1)), live.reshape(-1))
                beams.append(beam + g * Kg)
                picked.append(chosen)
            beam, chosen = np.concatenate(beams, axis=1), np.concatenate(picked, axis=1)
            rows = (beam + images_idx[:, None] * K).reshape(-1)
            state = {k: (v[self._rows(rows, N * K)] if k in self.carried else v) for k, v in state.items()}
            captions = np.take_along_axis(captions, beam[..., None], axis=1).copy()
            captions[:, :, t] = chosen
            prev_done = np.take_along_axis(done, beam, axis=1)
            lengths = np.take_along_axis(lengths, beam, axis=1) + (~prev_done).astype(np.float32)
            done = prev_done | (chosen == self.end_id)
            words = chosen.reshape(-1)
            if done.all():
                break
        flat_scores = scores.reshape(N, K)
        final = flat_scores
        if length_penalty:
            length = np.maximum(lengths, 1.0)
            final = flat_scores / (length ** length_penalty if length_norm == "power"
                                   else ((5.0 + length) / 6.0) ** length_penalty)
        best = final.argmax(axis=1)
        return captions[images_idx, best], flat_scores[images_idx, best]

    # ------------------------------------------------------------------------------------ text
    def text(self, ids: np.ndarray) -> str:
        words = []
        for i in ids.tolist():
            if i == self.end_id:
                break
            if i not in (self.null_id, self.start_id):
                words.append(self.words[i])
        return " ".join(words)

    def caption_files(self, files, beam_size: int = 1, max_length: int = 20, groups: int = 1,
                      diversity: float = 0.0, block_ngrams: int = 0, length_penalty: float = 1.0,
                      length_norm: str = "power") -> list[tuple[str, float]]:
        """(caption, log p) of each image file; beam search ranks by log p per word by default, as the package's
        ``decoding=beam`` does (``length_penalty=0``: the most likely caption)."""
        images = np.stack([self.preprocess(f) for f in files])
        captions, log_probs = self.beam(images, beam_size, max_length, length_penalty, groups=groups,
                                        diversity=diversity, block_ngrams=block_ngrams, length_norm=length_norm)
        return [(self.text(c), float(p)) for c, p in zip(captions, log_probs, strict=True)]


def _block_ngrams(log_probs: np.ndarray, history: np.ndarray, n: int, end_id: int) -> np.ndarray:
    """log_probs (R, V) with every word that would repeat an n-gram of its row's history (R, t) at -inf,
    renormalised (``captioning.models.decoding.StepRules``); unchanged when n = 0."""
    t = history.shape[1]
    if not n or t < n - 1 or (n > 1 and t < n):
        return log_probs
    out = log_probs.copy()
    if n == 1:
        np.put_along_axis(out, history, -np.inf, axis=1)
    else:
        windows = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # (R, t - n + 1, n)
        match = (windows[:, :, :-1] == history[:, None, t - n + 1:]).all(axis=2)
        r, m = np.nonzero(match)
        out[r, windows[r, m, -1]] = -np.inf
    out[np.isinf(out).all(axis=1), end_id] = 0.0
    top = out.max(axis=1, keepdims=True)
    return (out - (top + np.log(np.exp(out - top).sum(axis=1, keepdims=True)))).astype(np.float32)


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first; ties to the lower index (as torch)."""
    order = np.argsort(-values, axis=1, kind="stable")
    return order[:, :k].copy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Caption images with an exported captioner.")
    parser.add_argument("folder", help="the export folder (config.json, vocab.json, encoder/step graphs)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--groups", type=int, default=1, help="diverse beam search: beam groups (beam %% groups == 0)")
    parser.add_argument("--diversity", type=float, default=0.0, help="diverse beam search: the Hamming penalty")
    parser.add_argument("--block-ngrams", type=int, default=0, help="no n-gram twice in a caption (3: trigrams)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search picks max log p / lp(length); 0: the most likely caption (default 1.0)")
    parser.add_argument("--length-norm", choices=("power", "gnmt"), default="power",
                        help="lp = length ** penalty (power) or ((5 + length) / 6) ** penalty (gnmt)")
    args = parser.parse_args(argv)
    captioner = ExportedCaptioner(args.folder)
    captions = captioner.caption_files(args.images, args.beam, args.max_length, args.groups, args.diversity,
                                       args.block_ngrams, args.length_penalty, args.length_norm)
    for path, (caption, log_prob) in zip(args.images, captions, strict=True):
        print(f"{path}\t{caption}\t{log_prob:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
