"""Encoders from the model hubs: any timm backbone (``encoder=timm``) and CLIP image towers from open_clip
(``encoder=open_clip``), both optional extras (``pip install -e ".[timm]"`` / ``".[clip]"``).

Transformers give tokens, not a map: both libraries' ``forward_intermediates`` lay the last block's patch tokens
out on their (h, w) grid, (N, D, h, w), so the attention decoder attends over patches exactly as over a CNN's
cells, and rnn / lstm mean-pool them; ``pooled="cls"`` gives the class token instead (CLIP: the image embedding
ClipCap-style captioners start from), ``pooled="mean"`` the tokens' mean, as a vector (N, D) for rnn / lstm.

Each encoder declares its input (:attr:`image_contract`) from the library's own preprocessing config — timm's
``pretrained_cfg`` (``resolve_data_config``), open_clip's ``preprocess_cfg`` — so a backbone with CLIP's mean or a
384 px ViT says so in one place and every edge follows. Weights offline: a local ``.pth`` / ``.safetensors`` /
``.bin`` file (``encoder.weights=/path``), loaded through the library's own loader (timm's checkpoint filters,
open_clip's state-dict conversion); ``encoder.weights=hub`` fetches the library's default where the hub is
reachable; null is random initialisation.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from captioning.io import reachable
from captioning.runtime import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ImageContract

__all__ = ["OpenClipEncoder", "TimmEncoder"]

POOLED = (None, "cls", "mean")


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"encoder={extra} needs the {module} package ({error}): pip install -e \".[{extra}]\" "
                          f"(or pip install {module if module != 'open_clip' else 'open_clip_torch'}).") from None


def _weights_file(weights: str | os.PathLike | None, encoder: str, name: str) -> Path | None:
    """A local weights file named by ``weights``, checked; None for ``hub`` / null."""
    if weights is None or str(weights) == "hub":
        return None
    path = Path(os.fspath(weights)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder.weights={weights} for encoder={encoder} name={name!r}: no such file. Give a local .pth / "
            f".safetensors / .bin state dict of that model, 'hub' to download the library's default (needs the "
            f"network), or null for random initialisation.")
    return path


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class _HubEncoder(nn.Module):
    """What both hub encoders share: freezing with the last ``trainable_blocks`` blocks left trainable, the
    layer-wise learning-rate scales, the cache key and the pooled output."""

    def _setup(self, model: nn.Module, layers: dict[str, int], freeze: bool, trainable_blocks: int,
               layer_decay: float | None, pooled: str | None, spatial_size: int | None, identity: str) -> None:
        if spatial_size is not None and (isinstance(spatial_size, bool) or not isinstance(spatial_size, int)
                                         or spatial_size < 1):
            raise ValueError(f"encoder.spatial_size must be a positive integer or null, got {spatial_size!r}.")
        self.spatial_size = spatial_size
        if pooled not in POOLED:
            raise ValueError(f"encoder.pooled={pooled!r} is not null (the patch grid), cls or mean.")
        if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int) or trainable_blocks < 0:
            raise ValueError(f"encoder.trainable_blocks must be an integer >= 0, got {trainable_blocks!r}.")
        if layer_decay is not None and not 0.0 < float(layer_decay) <= 1.0:
            raise ValueError(f"encoder.layer_decay must be in (0, 1] or null, got {layer_decay!r}.")
        self.model, self.pooled, self._identity = model, pooled, identity
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        self._layers = layers  # parameter name (in self.model) -> depth, 0 = the stem, L-1 = the last block
        self.num_layers = max(layers.values(), default=0) + 1
        self.trainable_blocks = int(trainable_blocks)
        self._frozen = bool(freeze) and self.trainable_blocks == 0
        if freeze:
            first_trainable = self.num_layers - self.trainable_blocks
            for name, param in self.model.named_parameters():
                param.requires_grad_(self._layers.get(name, self.num_layers - 1) >= first_trainable
                                     if self.trainable_blocks else False)
        if self._frozen:
            self.model.eval()

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def cache_key(self) -> str:
        if not self._frozen:
            return f"{self._identity}|trainable|id{id(self)}"
        return f"{self._identity}|pooled{self.pooled}|grid{self.spatial_size}"

    def train(self, mode: bool = True) -> _HubEncoder:
        super().train(mode)
        if self._frozen:
            self.model.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """Parameter name (as in ``named_parameters()``) -> learning-rate factor: ``layer_decay ** (L - 1 - depth)``
        (BEiT's layer-wise decay: the stem learns slowest, the last block at the full rate); {} without decay."""
        if self.layer_decay is None:
            return {}
        last = self.num_layers - 1
        return {f"model.{name}": self.layer_decay ** (last - self._layers.get(name, last))
                for name, _ in self.model.named_parameters()}

    def _pool(self, grid: Tensor, cls: Tensor | None) -> Tensor:
        if self.pooled == "cls":
            return cls
        if self.pooled == "mean":
            return grid.mean(dim=(2, 3))
        return nn.functional.adaptive_avg_pool2d(grid, self.spatial_size) if self.spatial_size else grid


class TimmEncoder(_HubEncoder):
    """Any ``timm.create_model`` backbone — ViTs, Swin, DeiT, EVA, ConvNeXt, EfficientNet, ResNets... —
    with its classifier removed.

    Args:
        name: a timm model name (``timm.list_models()``), with or without a pretrained tag
            (``vit_base_patch16_224.augreg_in21k``): the tag picks the preprocessing config too.
        weights: null (random initialisation; the name's preprocessing config still applies), a local weights file
            (timm's checkpoint filters convert it, as ``pretrained_cfg_overlay=dict(file=...)`` does), or ``hub``
            (``pretrained=True``: the Hugging Face hub, where reachable).
        freeze: fix the weights (and keep the model in eval mode); the features are then cacheable.
        trainable_blocks: with ``freeze``, leave the last N blocks (timm's layer grouping) trainable.
        layer_decay: with a trainable backbone, scale each block's learning rate by ``layer_decay ** depth from the
            top`` (0.65-0.85 is usual for ViTs).
        pooled: null (the (h, w) grid of patch tokens or the CNN's last map), ``cls`` (the class token: ViT-like
            models only) or ``mean`` — the last two a vector (N, D) for rnn / lstm.
        spatial_size: average-pool the grid to (s, s) positions (null: the model's own, 14 x 14 for a ViT-B/16).
        crop: evaluate like timm (the shorter side to S / crop_pct, the centre crop). Off by default: a caption
            names what is in the whole image, and a crop can cut off what a reference names.
        pretrained_cfg_overlay: timm's overlay of the preprocessing config (``mean``, ``std``, ``input_size``...).
        model_args: further ``create_model`` arguments (``img_size``, ``dynamic_img_size``, ``drop_path_rate``...).
    """

    def __init__(self, name: str = "vit_small_patch16_224", weights: str | None = None, freeze: bool = True,
                 trainable_blocks: int = 0, layer_decay: float | None = None, pooled: str | None = None,
                 spatial_size: int | None = None, crop: bool = False, pretrained_cfg_overlay: dict[str, Any] | None = None,
                 model_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        timm = _require("timm", "timm")
        if not timm.list_models(name.split(".", 1)[0]):
            close = timm.list_models(f"*{name.split('.', 1)[0].split('_')[0]}*")[:8]
            raise ValueError(f"encoder=timm name={name!r} is not a timm model. Similar names: "
                             f"{', '.join(close) or 'none'} (timm.list_models() has them all).")
        path = _weights_file(weights, "timm", name)
        overlay = dict(pretrained_cfg_overlay or {})
        if path is not None:
            overlay["file"] = str(path)
        try:
            with _hub_or_cache(weights is not None and path is None):
                model = timm.create_model(name, pretrained=weights is not None, num_classes=0, global_pool="",
                                          pretrained_cfg_overlay=overlay or None, **dict(model_args or {}))
        except (OSError, RuntimeError, ValueError) as error:
            where = f"the file {path}" if path else "the Hugging Face hub"
            raise ValueError(f"encoder=timm name={name!r}: could not load weights from {where}: "
                             f"{type(error).__name__}: {error}. Offline, pass encoder.weights=/path/to/weights "
                             "(.safetensors / .pth of this model), or null for random weights.") from None
        info = model.feature_info[-1] if getattr(model, "feature_info", None) else {}
        self.name = name
        self.out_dim = int(info.get("num_chs", model.num_features))
        self.downsampling = int(info.get("reduction", 32))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        if pooled == "cls" and not self.num_prefix_tokens:
            raise ValueError(f"encoder.pooled=cls: timm's {name!r} has no class token; use pooled=mean or null.")
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm's {name!r} has no forward_intermediates(), which lays its last features out on "
                             "their grid; choose another timm model.")
        self._intermediate_args = _supported(model.forward_intermediates, indices=1, norm=True,
                                             output_fmt="NCHW", intermediates_only=True,
                                             return_prefix_tokens=pooled == "cls")
        config = timm.data.resolve_data_config({}, model=model)
        patches = getattr(model, "patch_embed", None)
        fixed = getattr(patches, "img_size", None) is not None and not getattr(model, "dynamic_img_size", False)
        if fixed:  # the position embeddings' size (model_args={img_size: ...} changes it)
            config = {**config, "input_size": (3, *tuple(patches.img_size))}
        self._contract = _contract(config, native=weights is not None or fixed, crop=crop)
        weights_id = "random" if weights is None else (_file_identity(path) if path else f"hub:{name}")
        self._setup(model, _timm_layers(timm, model), freeze, trainable_blocks, layer_decay, pooled, spatial_size,
                    f"timm:{name}|{weights_id}|{sorted(overlay.items())}")

    @property
    def image_contract(self) -> ImageContract:
        return self._contract

    @property
    def input_size(self) -> int | None:  # data.image_size=auto reads it (None: the data's own size)
        return self._contract.size

    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, S, S), normalised by :attr:`image_contract` -> (N, D, S/r, S/r), or (N, D) when pooled."""
        out = self.model.forward_intermediates(images, **self._intermediate_args)[-1]
        grid, cls = (out[0], out[1][:, 0]) if isinstance(out, tuple) else (out, None)
        return self._pool(grid, cls)


class OpenClipEncoder(_HubEncoder):
    """The image tower of an open_clip CLIP model (ViT-B-32, ViT-L-14, ...): its patch tokens on their grid,
    or with ``pooled=cls`` the CLIP image embedding (the class token through the final norm and projection).

    Args:
        name: an open_clip model name (``open_clip.list_models()``: ViT-B-32, ViT-B-16, ViT-L-14, ...).
        weights: null (random), a local checkpoint file of the whole CLIP model (``open_clip_pytorch_model.bin``,
            ``.safetensors``; open_clip converts OpenAI's and other layouts) or a pretrained tag (``laion2b_s34b_b79k``,
            ``openai``: downloaded where the hub is reachable).
        freeze, trainable_blocks, layer_decay, pooled, spatial_size: as for :class:`TimmEncoder` (``pooled=mean``:
            the tokens' mean, unprojected).
        crop: the centre crop open_clip's preprocessing takes (its ``resize_mode``); off by default.
    """

    def __init__(self, name: str = "ViT-B-32", weights: str | None = None, freeze: bool = True,
                 trainable_blocks: int = 0, layer_decay: float | None = None, pooled: str | None = None,
                 spatial_size: int | None = None, crop: bool = False) -> None:
        super().__init__()
        open_clip = _require("open_clip", "clip")
        if name not in open_clip.list_models():
            raise ValueError(f"encoder=open_clip name={name!r} is not an open_clip model; one of: "
                             f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))[:400]}...")
        path = _weights_file(weights, "open_clip", name) if weights and _looks_like_file(weights) else None
        try:
            with _quiet_root_logger(), _hub_or_cache(bool(weights) and path is None):
                # (quiet: "No pretrained weights loaded ... initialized randomly", as asked)
                model = open_clip.create_model(name, pretrained=str(path) if path else weights, device="cpu")
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            where = f"the file {path}" if path else f"the pretrained tag {weights!r} (downloaded from the hub)"
            raise ValueError(f"encoder=open_clip name={name!r}: could not load weights from {where}: "
                             f"{type(error).__name__}: {error}. Offline, pass encoder.weights=/path/to/"
                             "open_clip_pytorch_model.bin (the whole CLIP model's), or null for random weights.") from None
        visual = model.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(f"encoder=open_clip name={name!r}: only the ViT image towers are supported (their patch "
                             "tokens make the grid); for CNN towers use encoder=timm or torchvision.")
        self.name = name
        patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
        self.downsampling = int(patch)
        self.out_dim = int(visual.output_dim if pooled == "cls" else visual.transformer.width)
        config = open_clip.get_model_preprocess_cfg(model)
        size = config.get("size", visual.image_size)
        size = size[0] if isinstance(size, list | tuple) else size
        resize_mode = config.get("resize_mode", "shortest")
        self._contract = ImageContract(
            size=int(size), mean=tuple(config.get("mean", IMAGENET_MEAN)), std=tuple(config.get("std", IMAGENET_STD)),
            interpolation=_interpolation(config.get("interpolation", "bicubic")),
            crop_pct=1.0 if crop and resize_mode != "squash" else None)
        layers = {f"{n}": _clip_layer(n, len(visual.transformer.resblocks)) for n, _ in visual.named_parameters()}
        weights_id = "random" if weights is None else (_file_identity(path) if path else f"tag:{weights}")
        self._setup(visual, layers, freeze, trainable_blocks, layer_decay, pooled, spatial_size, f"open_clip:{name}|{weights_id}")

    @property
    def image_contract(self) -> ImageContract:
        return self._contract

    @property
    def input_size(self) -> int:
        return int(self._contract.size)

    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, S, S), CLIP-normalised -> (N, width, S/p, S/p), or (N, D) when pooled."""
        if self.pooled == "cls":
            return self.model(images)  # the CLIP image embedding
        out = self.model.forward_intermediates(images, indices=1, normalize_intermediates=True,
                                               intermediates_only=True, output_fmt="NCHW")
        return self._pool(out["image_intermediates"][-1], None)


@contextlib.contextmanager
def _hub_or_cache(needed: bool, timeout: float = 3.0):
    """Where the hub does not answer within ``timeout`` seconds, Hugging Face's offline mode for the call: cached
    weights still load, missing ones fail at once (online, huggingface_hub retries for ~45 s before it gives up)."""
    if not needed:
        yield
        return
    from urllib.parse import urlparse

    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if not before and not reachable(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443, timeout):
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _looks_like_file(weights: str) -> bool:
    text = os.fspath(weights)
    return os.sep in text or "/" in text or Path(text).suffix in (".bin", ".pt", ".pth", ".safetensors", ".npz")


def _supported(function: Any, **arguments: Any) -> dict[str, Any]:
    """The arguments ``function`` takes (timm's forward_intermediates differs a little between families)."""
    accepted = inspect.signature(function).parameters
    return {k: v for k, v in arguments.items() if k in accepted and (k != "return_prefix_tokens" or v)}


def _interpolation(name: str) -> str:
    return name if name in INTERPOLATIONS else "bicubic"


def _contract(config: dict[str, Any], native: bool, crop: bool) -> ImageContract:
    """timm's resolved data config -> the contract. A randomly initialised model takes any size that fits its
    patches (size None: the data chooses) except where the model fixes it (ViTs: their position embeddings)."""
    size = int(config["input_size"][-1]) if native else None
    return ImageContract(size=size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                         interpolation=_interpolation(config.get("interpolation", "bilinear")),
                         crop_pct=float(config.get("crop_pct", 1.0)) if crop else None)


def _timm_layers(timm: Any, model: nn.Module) -> dict[str, int]:
    """Parameter name -> depth, by timm's own grouping (what its layer-decay optimiser uses)."""
    from timm.models import group_parameters

    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return {name: 0 for name, _ in model.named_parameters()}


def _clip_layer(name: str, blocks: int) -> int:
    """open_clip ViT parameter name -> depth: the patch embedding 0, resblock k k + 1, the final norm and
    projection blocks + 1."""
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("ln_post", "proj", "attn_pool")):
        return blocks + 1
    return 0
