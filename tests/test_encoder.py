"""Encoders: map shapes, freezing, local and named weights (offline), gradients."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision

from captioning.models import encoder as encoder_module
from captioning.models.encoder import SmallCNN, TorchvisionEncoder, supported_backbones

# name -> channels of the map; random init, so nothing is downloaded.
BACKBONES = {
    "mobilenet_v2": 1280,
    "resnet50": 2048,
    "resnet101": 2048,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
    "regnet_y_400mf": 440,
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network, or wait on it: any connection or download fails at once."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_small_cnn_map_shape_and_out_dim() -> None:
    encoder = SmallCNN(out_dim=48, channels=(8, 16, 24, 32))
    assert encoder.out_dim == 48 and not encoder.frozen
    features = encoder(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 48, 4, 4)
    assert encoder(torch.rand(2, 3, 96, 96)).shape == (2, 48, 6, 6)


def test_small_cnn_depth_per_block() -> None:
    # one convolution in the first block, two in the others: 1 + 2 + 2 + 2 conv-bn-relu, then the 1x1 head
    encoder = SmallCNN(out_dim=16, channels=(8, 8, 8, 8), depth=[1, 2, 2, 2])
    convs = [m for m in encoder.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and [c.stride[0] for c in convs[:3]] == [2, 2, 1]
    assert encoder(torch.rand(2, 3, 64, 64)).shape == (2, 16, 4, 4)
    assert len([m for m in SmallCNN(channels=(8, 8), depth=3).blocks.modules() if isinstance(m, torch.nn.Conv2d)]) == 7
    with pytest.raises(ValueError, match="one per block"):
        SmallCNN(channels=(8, 8, 8), depth=[2, 2])


def test_small_cnn_gradients_reach_every_parameter() -> None:
    encoder = SmallCNN(out_dim=16, channels=(8, 8, 8, 8))
    encoder(torch.rand(2, 3, 64, 64)).square().sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_small_cnn_keeps_position_after_mean_pooling() -> None:
    # The same blob on the left and on the right of an image must give different mean-pooled features,
    # or a vanilla decoder could never say "left of". Without the coordinate channels the network is
    # translation-equivariant (a shift by a multiple of its stride, on a zero background, far enough from
    # the borders that its 31 px receptive field never crosses them), so the pooled features would be equal.
    left, right = torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 128, 128)
    left[..., 56:72, 40:56] = 1.0
    right[..., 56:72, 72:88] = 1.0
    images = torch.cat([left, right])

    def pooled_difference(coordinates: bool) -> float:
        torch.manual_seed(0)
        encoder = SmallCNN(out_dim=16, channels=(8, 8, 8, 8), coordinates=coordinates, depth=1).eval()
        with torch.no_grad():
            pooled = encoder(images).mean(dim=(2, 3))
        return ((pooled[0] - pooled[1]).abs().max() / pooled.abs().max()).item()

    assert pooled_difference(coordinates=False) < 1e-5
    assert pooled_difference(coordinates=True) > 1e-2


def test_small_cnn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="channels"):
        SmallCNN(channels=())
    with pytest.raises(ValueError, match="encoder.pathways='yes' is not true, false or auto"):
        SmallCNN(pathways="yes")
    with pytest.raises(ValueError, match="settled by the decoder"):
        SmallCNN(pathways="auto")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_map_shape_and_out_dim(name: str) -> None:
    encoder = TorchvisionEncoder(name)
    assert encoder.out_dim == BACKBONES[name]
    assert not encoder.frozen
    images = torch.rand(2, 3, 64, 64)
    assert encoder(images).shape == (2, BACKBONES[name], 2, 2)  # S/32
    pooled = TorchvisionEncoder(name, spatial_size=3)
    assert pooled(images[:, :, :48, :48].contiguous()).shape[1:] == (BACKBONES[name], 3, 3)
    assert pooled(images).shape == (2, BACKBONES[name], 3, 3)


def test_supported_backbones_cover_the_families() -> None:
    names = supported_backbones()
    for name in [*BACKBONES, "mobilenet_v3_large", "efficientnet_v2_s", "resnext50_32x4d"]:
        assert name in names
    assert "vit_b_16" in names and "swin_t" in names  # transformers: their patch tokens on a grid
    assert "googlenet" not in names and "maxvit_t" not in names  # no trunk this project knows how to cut out


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="maxvit_t.*not a supported.*mobilenet_v2.*encoder=timm"):
        TorchvisionEncoder("maxvit_t")


def test_freeze_fixes_parameters_and_batchnorm_statistics() -> None:
    encoder = TorchvisionEncoder("mobilenet_v2", freeze=True)
    assert encoder.frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.trunk.training
    assert all(not m.training for m in encoder.trunk.modules())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    features = parent(torch.rand(2, 3, 64, 64) * 3.0 + 1.0)  # far from the init statistics
    assert not features.requires_grad
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unfrozen_backbone_trains_batchnorm() -> None:
    encoder = TorchvisionEncoder("resnet50").train()
    bn = encoder.trunk.bn1
    before = bn.running_mean.clone()
    encoder(torch.rand(2, 3, 64, 64) + 1.0).mean().backward()
    assert not torch.equal(bn.running_mean, before)
    assert encoder.trunk.conv1.weight.grad is not None


def test_local_weights_file_loads(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.get_model("resnet50")
    path = tmp_path / "resnet50_finetuned.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)

    encoder = TorchvisionEncoder("resnet50", weights=str(path))
    expected = source.state_dict()
    for key, value in encoder.trunk.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with torch.no_grad():
        images = torch.rand(2, 3, 64, 64)
        source.eval(), encoder.eval()
        trunk_out = torch.nn.Sequential(*list(source.children())[:-2])(images)
        assert torch.allclose(encoder(images), trunk_out)


def test_local_weights_of_the_trunk_with_another_head_load(tmp_path: Path) -> None:
    # A model fine-tuned with another number of classes: the classifier is not used, so it must not matter.
    source = torchvision.models.get_model("convnext_tiny", num_classes=7)
    path = tmp_path / "convnext.pt"
    torch.save(source.state_dict(), path)
    encoder = TorchvisionEncoder("convnext_tiny", weights=path)
    assert torch.equal(encoder.trunk.classifier[0].weight, source.classifier[0].weight)


def test_local_weights_without_batchnorm_counters_load(tmp_path: Path) -> None:
    # Older torchvision weights were saved before BatchNorm had num_batches_tracked.
    source = torchvision.models.get_model("resnet50")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    encoder = TorchvisionEncoder("resnet50", weights=path)
    assert torch.equal(encoder.trunk.layer4[2].bn3.running_var, source.layer4[2].bn3.running_var)


def test_local_weights_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.get_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*do not fit.*'mobilenet_v2'.*missing keys"):
        TorchvisionEncoder("mobilenet_v2", weights=str(path))


def test_local_weights_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        TorchvisionEncoder("mobilenet_v2", weights=str(garbage))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        TorchvisionEncoder("mobilenet_v2", weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("use_cache_dir", [False, True])
def test_named_weights_offline_fail_fast_with_the_file_to_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_cache_dir: bool
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache_dir = tmp_path / "weights" if use_cache_dir else None
    expected_dir = cache_dir if use_cache_dir else tmp_path / "torch_home" / "hub" / "checkpoints"
    file_name = Path(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url).name

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        TorchvisionEncoder("mobilenet_v2", weights="IMAGENET1K_V1", cache_dir=cache_dir)
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert file_name in message and str(expected_dir) in message
    assert "weights=null" in message
    assert not expected_dir.exists() or not any(expected_dir.iterdir())  # nothing half-written


def test_reachability_probe_is_bounded_when_dns_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reachability probe itself is bounded by download_timeout, even if DNS hangs.
    def hang(*args: object, **kwargs: object) -> None:
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not reachable"):
        TorchvisionEncoder("resnet50", weights="DEFAULT", cache_dir=tmp_path, download_timeout=0.5)
    assert time.perf_counter() - start < 3.0


def test_named_weights_load_from_the_cache(tmp_path: Path) -> None:
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    source = torchvision.models.get_model("mobilenet_v2")
    torch.save(source.state_dict(), tmp_path / Path(weights.url).name)
    for spelling in ["IMAGENET1K_V2", "DEFAULT", "MobileNet_V2_Weights.IMAGENET1K_V2"]:
        encoder = TorchvisionEncoder("mobilenet_v2", weights=spelling, cache_dir=tmp_path, freeze=True)
        assert torch.equal(encoder.trunk.features[0][0].weight, source.features[0][0].weight)
    assert "MobileNet_V2_Weights.IMAGENET1K_V2" in encoder.cache_key


def test_named_weights_download_is_off_by_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = []
    monkeypatch.setattr(encoder_module, "reachable", lambda *a: probed.append(a) or True)
    with pytest.raises(FileNotFoundError, match="download=False"):
        TorchvisionEncoder("mobilenet_v2", weights="DEFAULT", cache_dir=tmp_path, download=False)
    assert not probed


def test_unknown_weights_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V3.*mobilenet_v2.*IMAGENET1K_V1"):
        TorchvisionEncoder("mobilenet_v2", weights="IMAGENET1K_V3")
    with pytest.raises(ValueError, match="ResNet50_Weights"):
        TorchvisionEncoder("mobilenet_v2", weights="ResNet50_Weights.IMAGENET1K_V1")
