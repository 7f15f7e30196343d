"""Image encoders: images (N, 3, S, S) -> feature map (N, D, h, w).

Every encoder here returns a spatial map, never a pooled vector: the attention decoder attends over the h*w
positions and the vanilla decoders pool the map themselves. Each encoder declares its input
(``image_contract``: size, mean, std, interpolation, crop — what its weights were trained on; ImageNet's for
the small CNN trained from scratch), and the data, the checkpoint and the export read images by it. Each exposes

- ``out_dim``: D, the number of channels of the map;
- ``frozen``: True when its parameters are fixed (no gradients, BatchNorm statistics kept);
- ``cache_key``: a string that changes whenever the features it computes would (for feature caches);
- ``image_contract``: the :class:`~captioning.runtime.ImageContract` it expects (size None: any).

timm's backbones and open_clip's CLIP towers are in :mod:`captioning.models.hub_encoders`.

Hydra instantiates the classes directly through ``_target_``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from captioning.io import reachable
from captioning.runtime import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ImageContract


class SmallCNN(nn.Module):
    """A small CNN trained from scratch — the default for the built-in 64x64 shapes data set.

    One block per entry of ``channels``: a conv3x3-bn-relu with stride 2, then ``depth - 1`` more at the new
    resolution; then a 1x1 conv-bn-relu to ``out_dim`` channels. The map is S / 2**len(channels) on a side,
    4x4 at 64 px with the default four blocks (16 positions for attention). Fully convolutional, so any image
    size divisible by ``downsampling`` works. Doubling the channels at each halving keeps every block at the
    same cost; the 1x1 head widens the features without paying 9x for it.

    ``depth=2`` (the default) is what makes shapes learnable in a short run: with one convolution per block
    (``depth=1``: five layers, receptive field 31 px, every layer strided) a classifier trained on the
    built-in set's (colour, shape) pairs named 76% of single objects right after 12 epochs; with two, 99%
    (and captioners trained through it name shapes right, where they did not before). It costs ~1.6x the
    encoder's time (~20 ms forward + backward at batch 64, 64 px, on 2 CPU cores).

    With ``coordinates`` (CoordConv, Liu et al. 2018) two channels holding each pixel's x and y in [-1, 1]
    are appended to the input. Captions of the built-in set say "left of" / "above"; a decoder that mean-pools
    the map would otherwise lose where things are, since convolutions are translation-equivariant.

    With ``pathways`` (the project's config; off in code so that checkpoints from before it load as trained) the
    map is two maps side by side: the blocks above see only *where the image changes* (:meth:`edges`: the
    Sobel gradient's magnitude over the colour channels, saturated), so their shape features are the same for a
    red star and a blue one; ``color_dim`` channels come from each pixel alone (two 1x1 convolutions, max-pooled
    to the map's cells), which know colour and cannot know shape. Trained on a set where no star is ever red, a
    single CNN learns colour-specific shape detectors (a linear probe on its features reads the shape of held-out
    pairs worse than chance) and the captioner names no held-out pair; with the pathways the probe reads them
    perfectly and the captioner names most (README, "Generalisation").
    """

    def __init__(
        self,
        out_dim: int = 256,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
        batch_norm: bool = True,
        coordinates: bool = True,
        depth: int | tuple[int, ...] | list[int] = 2,
        pathways: bool | str = False,
        color_dim: int | None = None,
    ) -> None:
        super().__init__()
        if pathways == "auto":
            raise ValueError("SmallCNN(pathways='auto') is settled by the decoder it feeds (CaptioningModule: on for "
                             "model=attention, off for rnn/lstm); building SmallCNN alone, pass true or false.")
        if not isinstance(pathways, bool):
            raise ValueError(f"encoder.pathways={pathways!r} is not true, false or auto.")
        channels = tuple(int(c) for c in channels)
        per_block = isinstance(depth, Sequence) and not isinstance(depth, str)
        depths = tuple(int(d) for d in depth) if per_block else (int(depth),) * len(channels)
        if out_dim <= 0 or not channels or min(channels) <= 0 or len(depths) != len(channels) or min(depths) < 1:
            raise ValueError(
                f"SmallCNN needs a positive out_dim, at least one positive channel count and depth >= 1 (one number, "
                f"or one per block of channels); got out_dim={out_dim}, channels={channels}, depth={depth}."
            )
        self.out_dim = int(out_dim)
        self.coordinates = coordinates
        self.depth = depths if per_block else depths[0]
        self.downsampling = 2 ** len(channels)
        self.input_size = None  # trained from scratch: any size divisible by downsampling (data.image_size=auto)

        self.pathways = pathways
        color_dim = max(1, out_dim // 8) if color_dim is None else color_dim
        if self.pathways and not 0 < color_dim < out_dim:
            raise ValueError(f"SmallCNN: color_dim must be in (0, out_dim={out_dim}) with pathways, got {color_dim}.")
        self.color_dim = int(color_dim) if self.pathways else 0
        in_dims = ((1 if self.pathways else 3) + (2 if coordinates else 0), *channels[:-1])
        blocks = []
        for c_in, c_out, block_depth in zip(in_dims, channels, depths, strict=True):
            # the strided convolution halves the resolution, then depth - 1 more at the new one
            blocks.append(_conv_bn_relu(c_in, c_out, 3, 2, batch_norm))
            blocks += [_conv_bn_relu(c_out, c_out, 3, 1, batch_norm) for _ in range(block_depth - 1)]
        blocks.append(_conv_bn_relu(channels[-1], self.out_dim - self.color_dim, 1, 1, batch_norm))
        self.blocks = nn.Sequential(*blocks)
        if self.pathways:
            # colour from each pixel alone (1x1 convolutions: no neighbourhood, so no shape), kept where it is
            self.color = nn.Sequential(_conv_bn_relu(3, 16, 1, 1, batch_norm),
                                       _conv_bn_relu(16, self.color_dim, 1, 1, batch_norm))

    @property
    def frozen(self) -> bool:
        return False

    @property
    def image_contract(self) -> ImageContract:
        """Trained from scratch: any size (the data's), ImageNet's statistics, the whole image resized."""
        return ImageContract()

    @property
    def cache_key(self) -> str:
        # A from-scratch encoder trains with the captioner, so its features are never cacheable by name.
        return f"small_cnn|id{id(self)}"

    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, S, S) -> feature map (N, out_dim, S/f, S/f) with f = ``self.downsampling``."""
        x = self.edges(images) if self.pathways else images
        if self.coordinates:
            x = torch.cat([x, _coordinate_channels(x)], dim=1)
        # channels-last makes CPU BatchNorm and small convolutions several times faster (oneDNN's layout).
        features = self.blocks(x.contiguous(memory_format=torch.channels_last))
        if self.pathways:
            # at a quarter of the resolution (a 4x4 block inside even a small object keeps its colour): the pathway
            # then costs ~nothing beside the convolutions (at half resolution it added ~40% to the encoder's time)
            color = self.color(nn.functional.avg_pool2d(images, 4).contiguous(memory_format=torch.channels_last))
            color = nn.functional.adaptive_max_pool2d(color, features.shape[-2:])
            features = torch.cat([features, color], dim=1)
        return features.contiguous()

    def edges(self, images: Tensor) -> Tensor:
        """images (N, 3, S, S) -> (N, 1, S, S): where the image changes, whatever the colours (the Sobel gradient's
        magnitude over the channels, saturated): what the shape pathway sees.

        Written as shifted differences (the Sobel kernel is separable): ~10x faster on a CPU than a 3x3 conv2d
        with one input channel."""
        x = nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")  # no edge at the image's own border
        dx = x[..., 2:] - x[..., :-2]  # (N, 3, S + 2, S)
        dy = x[..., 2:, :] - x[..., :-2, :]  # (N, 3, S, S + 2)
        gx = (dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 4
        gy = (dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]) / 4
        magnitude = (gx.square() + gy.square()).sum(dim=1, keepdim=True).add_(1e-6).sqrt_()
        return torch.tanh(magnitude / 0.5)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, batch_norm: bool) -> nn.Sequential:
    # The conv bias is redundant in front of BatchNorm's own shift.
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=not batch_norm)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(c_out)] if batch_norm else [conv]
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _coordinate_channels(images: Tensor) -> Tensor:
    """images (N, C, H, W) -> (N, 2, H, W): x then y of each pixel, in [-1, 1]."""
    n, _, h, w = images.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=images.dtype, device=images.device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=images.dtype, device=images.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(n, 2, h, w)


# Which children of each torchvision family make up the trunk, and which head modules to keep
# as its last layer (ConvNeXt's final LayerNorm2d belongs to the representation, not the classifier).
# Keeping torchvision's child names means the trunk's state_dict keys are the classification model's own.
_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "mobilenet_v2": (("features",), ()),
    "mobilenet_v3_": (("features",), ()),
    "efficientnet_": (("features",), ()),
    "convnext_": (("features",), (0,)),
    "resnet": (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), ()),
    "resnext": (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), ()),
    "wide_resnet": (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), ()),
    "regnet_": (("stem", "trunk_output"), ()),
    # transformers: the patch tokens laid out on their grid (TorchvisionEncoder._tokens_to_grid)
    "swin_": (("features", "norm"), ()),
    "vit_": ((), ()),
}


def supported_backbones() -> list[str]:
    """The torchvision model names TorchvisionEncoder accepts."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if _family(n) is not None]


def _family(name: str) -> str | None:
    return next((prefix for prefix in _FAMILIES if name.startswith(prefix)), None)


class TorchvisionEncoder(nn.Module):
    """The trunk of a torchvision classification model (classifier and global pool dropped), as a feature map.

    Vision transformers give tokens, not a map: ViT's patch tokens (the class token dropped) and Swin's last stage
    are laid out on their (h, w) grid, so the attention decoder attends over patches. ViTs take only the size
    their position embeddings were made for (224; ``vit_h_14``'s SWAG weights 518), which :attr:`image_contract`
    declares; ``data.image_size=auto`` follows it.

    Args:
        name: a torchvision model name, see ``supported_backbones()``: mobilenet_v2, mobilenet_v3_{small,large},
            efficientnet_b0..b7 / efficientnet_v2_{s,m,l}, convnext_{tiny,small,base,large}, resnet18..152,
            resnext*, wide_resnet*, regnet_{x,y}_*, vit_{b,l}_{16,32}, vit_h_14, swin_{t,s,b}, swin_v2_{t,s,b}.
        weights: None (random init); a torchvision weights name — "DEFAULT", "IMAGENET1K_V1" or the full
            "ResNet50_Weights.IMAGENET1K_V2"; or the path of a local ``.pth``/``.pt`` state_dict of the
            classification model (plain, or nested under "state_dict"/"model"; a "module." prefix is
            stripped; classifier keys are ignored).
        freeze: fix all parameters and keep the trunk in eval mode even when the parent calls ``.train()``,
            so BatchNorm statistics do not drift.
        spatial_size: adaptive-average-pool the map to (s, s) (e.g. 4 at 112 px as the courses do, 7, 14);
            None keeps the trunk's own size: S/32 rounded up (ConvNeXt: rounded down), 2x2 at 64 px, 7x7 at 224.
        cache_dir: where named weights are looked for (and downloaded to); default
            ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``).
        download: whether to download named weights missing from the cache. The download is only tried when
            the weights host answers within ``download_timeout`` seconds, so an offline machine fails at once
            with a message naming the file to place, instead of hanging.
        crop: read images as torchvision's evaluation transform of the weights does (the shorter side to the
            resize size, the centre crop); off by default: the whole image resized, so nothing a reference names is
            cut off. Mean, std and interpolation always follow the weights (``weights.transforms()``).
    """

    def __init__(
        self,
        name: str = "mobilenet_v2",
        weights: str | os.PathLike | None = None,
        freeze: bool = False,
        spatial_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        download_timeout: float = 3.0,
        crop: bool = False,
    ) -> None:
        super().__init__()
        family = _family(name)
        if family is None or name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(
                f"encoder name {name!r} is not a supported torchvision backbone. Use one of: "
                f"{', '.join(supported_backbones())}; timm's backbones (encoder=timm) and CLIP towers "
                f"(encoder=open_clip) are the other encoders."
            )
        if spatial_size is not None and spatial_size <= 0:
            raise ValueError(f"encoder spatial_size must be a positive int or null; got {spatial_size}.")

        self.name = name
        self.spatial_size = spatial_size
        model = torchvision.models.get_model(name, weights=None)
        self.family = family
        self.out_dim = _head_in_features(model, name)
        self.trunk, head_keys = _split_trunk(model, family)
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(spatial_size) if spatial_size else nn.Identity()
        self._weights_id = "random"
        # the size the pretrained weights saw (data.image_size=auto uses it); None for random initialisation
        # (a ViT's position embeddings fix it either way)
        self.input_size: int | None = int(model.image_size) if family == "vit_" else None
        self.downsampling = int(model.patch_size) if family == "vit_" else 32
        self._contract = ImageContract(size=self.input_size)

        if weights is not None:
            self.input_size = _pretrained_size(name, weights)
            self._contract = _declared_input(name, weights, self.input_size, crop)
            state_dict, source, self._weights_id = _resolve_weights(
                name, weights, cache_dir, download, download_timeout
            )
            _load_trunk(self.trunk, state_dict, head_keys, name, source)

        self._frozen = bool(freeze)
        if self._frozen:
            self.trunk.requires_grad_(False)
            self.trunk.eval()

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def image_contract(self) -> ImageContract:
        """The input the weights expect (``weights.transforms()``: size, mean, std, interpolation, crop)."""
        return self._contract

    @property
    def cache_key(self) -> str:
        if not self._frozen:
            return f"{self.name}|trainable|id{id(self)}"
        return f"{self.name}|{self._weights_id}|pool{self.spatial_size}"

    def train(self, mode: bool = True) -> TorchvisionEncoder:
        super().train(mode)
        if self._frozen:
            self.trunk.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, S, S), normalised by :attr:`image_contract` -> feature map (N, out_dim, h, w)."""
        if self.family == "vit_":
            return self.pool(self._vit_grid(images))
        features = self.trunk(images)
        if self.family == "swin_":  # (N, h, w, D), layer-normed over D
            features = features.permute(0, 3, 1, 2)
        return self.pool(features)

    def _vit_grid(self, images: Tensor) -> Tensor:
        """images (N, 3, S, S) -> the patch tokens of the last block, normed, on their grid (N, D, S/p, S/p)."""
        vit = self.trunk
        tokens = vit._process_input(images)  # (N, L, D), checks the size
        n = tokens.shape[0]
        tokens = vit.encoder(torch.cat([vit.class_token.expand(n, -1, -1), tokens], dim=1))[:, 1:]
        side = images.shape[-1] // self.downsampling
        return tokens.transpose(1, 2).reshape(n, -1, images.shape[-2] // self.downsampling, side)


def _split_trunk(model: nn.Module, family: str) -> tuple[nn.Sequential, set[str]]:
    """The trunk as an nn.Sequential named like the model's children, and the model's other state keys."""
    children, kept_head = _FAMILIES[family]
    if family == "vit_":  # a class token and position embeddings beside the blocks: the model, its heads dropped
        full = set(model.state_dict())
        model.heads = nn.Sequential()
        return model, full - set(model.state_dict())
    parts: OrderedDict[str, nn.Module] = OrderedDict((c, getattr(model, c)) for c in children)
    if kept_head:
        # Same index as in model.classifier, so the key stays e.g. "classifier.0.weight".
        classifier = model.classifier
        parts["classifier"] = nn.Sequential(OrderedDict((str(i), classifier[i]) for i in kept_head))
    trunk = nn.Sequential(parts)
    head_keys = set(model.state_dict()) - set(trunk.state_dict())
    return trunk, head_keys


def _head_in_features(model: nn.Module, name: str) -> int:
    """The channel count of the trunk's output: what the classifier's first Linear takes in."""
    head = next(getattr(model, n) for n in ("fc", "classifier", "heads", "head") if hasattr(model, n))
    linear = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:  # pragma: no cover - every supported family has a Linear head
        raise ValueError(f"cannot find the classifier of torchvision model {name!r} to size its features.")
    return int(linear.in_features)


def _resolve_weights(
    name: str,
    weights: str | os.PathLike,
    cache_dir: str | os.PathLike | None,
    download: bool,
    timeout: float,
) -> tuple[dict[str, Tensor], str, str]:
    """-> (state_dict, where it came from for error messages, an identity for cache keys)."""
    text = os.fspath(weights)
    if _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder weights file {path} does not exist. Give the path of a .pth/.pt state_dict of "
                f"torchvision's {name!r}, a torchvision weights name such as 'DEFAULT', or null for random init."
            )
        stat = path.stat()
        return _read_state_dict(path), str(path), f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    entry = _weights_entry(name, text)
    file_name = os.path.basename(urlparse(entry.url).path)
    directory = (
        Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    )
    path = directory / file_name
    if not path.is_file():
        _download(entry.url, path, name, str(entry), download, timeout)
    return _read_state_dict(path), str(path), str(entry)


def _pretrained_size(name: str, weights: str | os.PathLike) -> int:
    """The crop size torchvision's preprocessing of these weights uses (224 for most ImageNet weights); 224 for a
    local file, whose preprocessing torchvision does not know."""
    text = os.fspath(weights)
    if _looks_like_path(text):
        return 224
    crop = getattr(_weights_entry(name, text).transforms(), "crop_size", [224])
    return int(crop[0] if isinstance(crop, list | tuple) else crop)


def _declared_input(name: str, weights: str | os.PathLike, size: int, crop: bool) -> ImageContract:
    """The input torchvision's preprocessing of these weights declares; ImageNet's for a local file."""
    text = os.fspath(weights)
    if _looks_like_path(text):
        return ImageContract(size=size)
    preprocess = _weights_entry(name, text).transforms()
    resize = getattr(preprocess, "resize_size", [size])
    resize = int(resize[0] if isinstance(resize, list | tuple) else resize)
    interpolation = getattr(getattr(preprocess, "interpolation", None), "value", "bilinear")
    return ImageContract(size=size, mean=tuple(getattr(preprocess, "mean", IMAGENET_MEAN)),
                         std=tuple(getattr(preprocess, "std", IMAGENET_STD)),
                         interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
                         crop_pct=min(1.0, size / resize) if crop else None)


def _looks_like_path(text: str) -> bool:
    return (
        text.endswith((".pth", ".pt", ".bin", ".ckpt"))
        or os.sep in text
        or "/" in text
        or Path(text).is_file()
    )


def _weights_entry(name: str, text: str) -> Any:
    """'DEFAULT' / 'IMAGENET1K_V1' / 'ResNet50_Weights.IMAGENET1K_V1' -> the torchvision weights enum member."""
    enum = torchvision.models.get_model_weights(name)
    member = text.split(".", 1)[1] if "." in text else text
    if "." in text and text.split(".", 1)[0] != enum.__name__:
        member = ""  # another model's weights: report below
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise ValueError(
            f"encoder weights {text!r} are not torchvision weights of {name!r}. Use one of: {choices} "
            f"(or {enum.__name__}.<NAME>), a local .pth/.pt file, or null for random init."
        ) from None


def _download(url: str, path: Path, name: str, weights: str, download: bool, timeout: float) -> None:
    """Fetch ``url`` to ``path``, or fail at once with what to do when that is impossible."""
    instructions = (
        f"Pretrained weights {weights} for encoder {name!r} are not in the cache: expected the file "
        f"{path.name} in {path.parent}. On a machine with network, download {url} and copy it to "
        f"{path} (or set TORCH_HOME / encoder.cache_dir to where it is); or use encoder.weights=null for "
        f"random init, or encoder.weights=/path/to/state_dict.pth for a local file."
    )
    if not download:
        raise FileNotFoundError(f"{instructions} (Downloading is switched off: download=False.)")
    host = urlparse(url)
    if not reachable(host.hostname or "", host.port or 443, timeout):
        raise FileNotFoundError(f"{instructions} (The weights host {host.hostname} is not reachable.)")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = re.search(r"-([a-f0-9]+)\.", path.name)
    try:
        # torch.hub writes to a temporary file and moves it into place, so an interrupted download
        # never leaves a truncated checkpoint behind.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=digest.group(1) if digest else None)
    except (OSError, RuntimeError) as error:
        raise FileNotFoundError(f"{instructions} (The download failed: {error}.)") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"cannot read encoder weights file {path}: {type(error).__name__}: {error}. It must be a "
            f"state_dict saved with torch.save; if it is a partial download, delete it and retry."
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"encoder weights file {path} does not hold a state_dict (a dict of tensors, possibly under "
            f"'state_dict' or 'model'); found {type(loaded).__name__}."
        )
    return _with_metadata(
        {k.removeprefix("module."): v for k, v in loaded.items()},
        {k.removeprefix("module."): v for k, v in getattr(loaded, "_metadata", {}).items()},
    )


def _with_metadata(state_dict: dict[str, Tensor], metadata: dict[str, Any]) -> OrderedDict[str, Tensor]:
    # Modules read their saved version from `_metadata` to upgrade old checkpoints (BatchNorm fills in
    # num_batches_tracked, absent from older torchvision weights), so a rebuilt dict must carry it along.
    result = OrderedDict(state_dict)
    result._metadata = metadata  # type: ignore[attr-defined]
    return result


def _load_trunk(
    trunk: nn.Module, state_dict: dict[str, Tensor], head_keys: set[str], name: str, source: str
) -> None:
    trunk_state = _with_metadata(
        {k: v for k, v in state_dict.items() if k not in head_keys}, getattr(state_dict, "_metadata", {})
    )
    expected = trunk.state_dict()
    # Old weights lack BatchNorm's num_batches_tracked; load_state_dict fills it in (see _with_metadata).
    missing = sorted(k for k in set(expected) - set(trunk_state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(trunk_state) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(trunk_state) if expected[k].shape != trunk_state[k].shape
    )
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ValueError(
            f"encoder weights {source} do not fit torchvision's {name!r}: "
            f"{len(missing)} missing keys [{show(missing)}], {len(unexpected)} unexpected keys "
            f"[{show(unexpected)}], {len(mismatched)} keys of another shape [{show(mismatched)}]. "
            f"Is it a state_dict of a different architecture? Set encoder.name to the model it was saved from."
        )
    trunk.load_state_dict(trunk_state)
