"""Encoders people use today — timm backbones, CLIP towers, torchvision's ViT and Swin — built with random
weights, loaded from local files, feeding the decoders; and the image contract each declares, which every edge
(the data, the checkpoint, caption.py, the export's run.py) reads images by."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.models import CaptioningRNN
from captioning.models.encoder import TorchvisionEncoder
from captioning.models.hub_encoders import OpenClipEncoder, TimmEncoder
from captioning.runtime import ImageContract, resize

from entrypoints import compose, load_entry_point, run

timm = pytest.importorskip("timm")  # an extra; `make install` has it
open_clip = pytest.importorskip("open_clip")

VIT = "vit_tiny_patch16_224"


def decoder_loss(encoder, images, cell_type):
    """The encoder's output through a decoder's loss: a finite number means the shapes fit."""
    features = encoder(images)
    dim = features.shape[1]
    decoder = CaptioningRNN(vocab_size=12, input_dim=dim, wordvec_dim=8, hidden_dim=16, cell_type=cell_type)
    captions = torch.randint(3, 12, (images.shape[0], 6))
    captions[:, 0] = 1
    return features, decoder(features, captions)


@pytest.mark.parametrize("name, options, size, shape", [
    (VIT, {"model_args": {"img_size": 64}}, 64, (2, 192, 4, 4)),  # patch 16: a 4 x 4 grid of patch tokens
    (VIT, {"model_args": {"img_size": 64}, "pooled": "cls"}, 64, (2, 192)),
    (VIT, {"model_args": {"img_size": 64}, "pooled": "mean"}, 64, (2, 192)),
    (VIT, {"model_args": {"img_size": 64}, "spatial_size": 2}, 64, (2, 192, 2, 2)),
    ("swin_tiny_patch4_window7_224", {}, 224, (2, 768, 7, 7)),
    ("resnet18", {}, 64, (2, 512, 2, 2)),
    ("convnext_atto", {}, 64, (2, 320, 2, 2)),
])
def test_timm_backbones_feed_the_decoders(name, options, size, shape):
    encoder = TimmEncoder(name, **options)
    images = torch.randn(2, 3, size, size)
    cell = "attention" if len(shape) == 4 else "lstm"
    features, loss = decoder_loss(encoder, images, cell)
    assert tuple(features.shape) == shape and encoder.out_dim == shape[1] and torch.isfinite(loss)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())  # big backbones: frozen


def test_the_patch_grid_is_the_vits_own_tokens():
    """The grid holds the last block's patch tokens after the final norm, in raster order; cls the class token."""
    grid_encoder = TimmEncoder(VIT, model_args={"img_size": 64})
    cls_encoder = TimmEncoder(VIT, model_args={"img_size": 64}, pooled="cls")
    cls_encoder.model.load_state_dict(grid_encoder.model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = grid_encoder.model.forward_features(images)  # (N, 1 + 16, D)
        torch.testing.assert_close(grid_encoder(images).flatten(2).transpose(1, 2), tokens[:, 1:])
        torch.testing.assert_close(cls_encoder(images), tokens[:, 0])


def test_torchvision_vit_and_swin_give_patch_grids():
    vit = TorchvisionEncoder("vit_b_32")
    assert vit.image_contract.size == 224 and vit.downsampling == 32  # the position embeddings fix the size
    _, loss = decoder_loss(vit, torch.randn(1, 3, 224, 224), "attention")
    assert torch.isfinite(loss)
    with torch.no_grad():
        grid = vit(torch.randn(1, 3, 224, 224))
    assert tuple(grid.shape) == (1, 768, 7, 7)
    swin = TorchvisionEncoder("swin_t")
    assert swin.image_contract.size is None  # random weights: any size the windows fit
    features, loss = decoder_loss(swin, torch.randn(2, 3, 64, 64), "attention")
    assert tuple(features.shape) == (2, 768, 2, 2) and torch.isfinite(loss)


def test_open_clip_tower_grid_and_embedding():
    grid_encoder = OpenClipEncoder("ViT-B-32")
    contract = grid_encoder.image_contract
    assert contract.size == 224 and contract.interpolation == "bicubic"
    np.testing.assert_allclose(contract.mean, (0.48145466, 0.4578275, 0.40821073))  # CLIP's, not ImageNet's
    images = torch.randn(2, 3, 224, 224)
    features, loss = decoder_loss(grid_encoder, images, "attention")
    assert tuple(features.shape) == (2, 768, 7, 7) and torch.isfinite(loss)
    embedding = OpenClipEncoder("ViT-B-32", pooled="cls")
    embedding.model.load_state_dict(grid_encoder.model.state_dict())
    with torch.no_grad():
        vector = embedding(images)
    assert tuple(vector.shape) == (2, 512) and embedding.out_dim == 512  # the CLIP image embedding


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_from_a_local_file(tmp_path, suffix):
    source = timm.create_model(VIT, num_classes=0, img_size=64)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    encoder = TimmEncoder(VIT, weights=str(path), model_args={"img_size": 64}, pooled="cls")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), source.forward_features(images)[:, 0])
    assert str(path.resolve()) in encoder.cache_key  # the file is the features' identity
    with pytest.raises(FileNotFoundError, match="encoder.weights=.*no such file"):
        TimmEncoder(VIT, weights=str(tmp_path / "missing.safetensors"))


def test_open_clip_weights_from_a_local_file(tmp_path):
    source = open_clip.create_model("ViT-B-32")
    path = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(path))
    encoder = OpenClipEncoder("ViT-B-32", weights=str(path), pooled="cls")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), source.encode_image(images))


def test_torchvision_vit_weights_from_a_local_file(tmp_path):
    import torchvision

    source = torchvision.models.get_model("vit_b_32", weights=None)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    encoder = TorchvisionEncoder("vit_b_32", weights=str(tmp_path / "vit.pth"))
    for key, value in source.state_dict().items():
        if not key.startswith("heads"):
            torch.testing.assert_close(encoder.trunk.state_dict()[key], value)


def test_trainable_blocks_and_layer_decay():
    from captioning.module import CaptioningModule

    encoder = TimmEncoder(VIT, trainable_blocks=2, layer_decay=0.5, model_args={"img_size": 32})
    trainable = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.10.", "blocks.11.", "norm.")) for n in trainable)
    assert any(n.startswith("blocks.10.") for n in trainable) and not encoder.frozen  # features not cacheable
    scales = encoder.lr_scales()
    assert scales["model.norm.weight"] == 1.0 and scales["model.blocks.11.mlp.fc1.weight"] == 1.0
    assert scales["model.blocks.10.mlp.fc1.weight"] == 0.5 and scales["model.patch_embed.proj.weight"] < 0.5**11
    module = CaptioningModule(
        encoder={"_target_": "captioning.models.hub_encoders.TimmEncoder", "name": VIT, "trainable_blocks": 2,
                 "layer_decay": 0.5, "model_args": {"img_size": 32}},
        decoder={"_target_": "captioning.models.CaptioningRNN", "cell_type": "attention", "wordvec_dim": 8,
                 "hidden_dim": 16}, vocab=["<NULL>", "<START>", "<END>", "<UNK>", "a"],
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}, encoder_lr=1e-4)
    groups = {g["name"]: g for g in module._encoder_groups()}
    assert {round(g["lr"], 12) for g in groups.values()} == {1e-4, 5e-5}  # the last block and the one before
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)


def test_the_contract_comes_from_the_backbones_config():
    plain = TimmEncoder(VIT)
    assert plain.image_contract == ImageContract(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", None)
    changed = TimmEncoder(VIT, pretrained_cfg_overlay={"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}, crop=True)
    assert changed.image_contract.mean == (0.1, 0.2, 0.3) and changed.image_contract.std == (0.4, 0.5, 0.6)
    assert changed.image_contract.crop_pct == pytest.approx(0.9)  # timm's evaluation crop of this ViT
    assert TimmEncoder("resnet18").image_contract.size is None  # random convolutions: the data's size


def test_resize_whole_or_centre_crop_by_hand():
    image = Image.fromarray(np.arange(100 * 50 * 3, dtype=np.uint8).reshape(50, 100, 3) % 251)
    whole = resize(image, ImageContract(size=20))
    assert whole.size == (20, 20)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(image.resize((20, 20), Image.BILINEAR)))
    cropped = resize(image, ImageContract(size=20, crop_pct=0.8, interpolation="bicubic"))
    # the shorter side (50) to 20 / 0.8 = 25, the longer in proportion (50), then the centre 20 x 20
    expected = image.resize((50, 25), Image.BICUBIC).crop((15, 2, 35, 22))
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(expected))


def test_a_backbones_mean_changes_the_data_pipeline_and_the_feature_cache_key(tiny_shapes_root, tmp_path):
    from captioning.data.coco import CocoCaptionsDataModule

    keys = []
    for mean in ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]):
        dm = CocoCaptionsDataModule(str(tiny_shapes_root), year="2017", image_size=32, num_workers=0,
                                    progress=False, feature_cache=True, cache_dir=str(tmp_path / "features"))
        encoder = TimmEncoder(VIT, model_args={"img_size": 32}, pretrained_cfg_overlay={"mean": mean})
        dm.use_encoder(encoder)
        pipeline = dm.image_pipeline()
        assert pipeline.contract.mean == tuple(mean) and dm.augmentation.mean.flatten().tolist() == pytest.approx(mean)
        keys.append(dm._require_cache().key({"name": "train"}, [1], ["x.jpg"]))
    assert keys[0] != keys[1]


ODD_FILES = {
    "rgba.png": lambda: Image.fromarray(np.dstack([np.full((30, 40, 3), (200, 30, 30), np.uint8),
                                                   np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))]), "RGBA"),
    "sixteen.png": lambda: Image.fromarray(np.tile(np.arange(40, dtype=np.uint16) * 1600, (30, 1)), "I;16"),
    "cmyk.jpg": lambda: Image.new("CMYK", (40, 30), (10, 200, 30, 20)),
    "grey.png": lambda: Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1)), "L"),
}


def write_odd_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in ODD_FILES.items():
        make().save(folder / name)
    return sorted(folder.iterdir())


@pytest.mark.slow
def test_a_vit_trained_through_train_py_carries_its_contract_to_every_edge(tmp_path):
    """Attention over a ViT's patch tokens, trained through train.py with a changed mean: the checkpoint records the
    contract; caption.py's Captioner, eval.py and export.py's config.json follow it; the exported run.py reads RGBA,
    16-bit, CMYK and greyscale files to the same tensors as caption.py and gives the same captions."""
    from captioning.export import load_exported
    from captioning.inference import Captioner

    run_dir = tmp_path / "outputs" / "train" / "runs" / "vit"
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    overrides = [
        f"paths.root_dir={tmp_path}", "data.num_train=64", "data.num_val=16", "data.num_test=16", "data.image_size=32",
        "data.num_workers=0", "data.persistent_workers=false", "data.progress=false", "data.batch_size=16",
        "model=attention", "model.hidden_dim=32", "model.wordvec_dim=16", "encoder=timm", f"encoder.name={VIT}",
        "encoder.freeze=false", "encoder.model_args={img_size:32,depth:2}",
        f"encoder.pretrained_cfg_overlay={{mean:{mean},std:{std}}}", "logger=csv", "callbacks.progress_bar=null",
        "trainer.max_epochs=2", "test=false"]
    load_entry_point("train").train(compose("train", overrides, run_dir))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["image_contract"]
    assert saved == {"size": 32, "mean": mean, "std": std, "interpolation": "bicubic", "crop_pct": None}
    captioner = Captioner.from_checkpoint(ckpt, device="cpu")
    assert captioner.pipeline.contract == ImageContract.from_dict(saved)

    eval_dir = tmp_path / "eval"
    run("eval.py", [f"ckpt_path={ckpt}", "split=val", "official=false", f"hydra.run.dir={eval_dir}"])
    assert json.loads((eval_dir / "metrics.json").read_text())["num_images"] == 16

    export_dir = tmp_path / "export"
    run("export.py", [f"ckpt_path={ckpt}", "format=torchscript", f"hydra.run.dir={export_dir}"])
    config = json.loads((export_dir / "exported" / "config.json").read_text())
    assert config["image"] == saved
    exported = load_exported(export_dir / "exported")
    files = write_odd_files(tmp_path / "odd")
    for path in files:
        ours = captioner.pipeline(path).numpy()
        theirs = exported.preprocess(path)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6, err_msg=path.name)
    texts = [caption.text for _, _, caption in captioner.caption_files(files)]
    assert [text for text, _ in exported.caption_files([str(p) for p in files])] == texts


def test_a_frozen_vits_features_are_cached_as_its_contract_reads_the_images(tiny_shapes_root, tmp_path):
    """data.feature_cache with a frozen timm ViT: the cached grids are the encoder's on the images read by its
    contract (its mean, not ImageNet's)."""
    from captioning.data.coco import CocoCaptionsDataModule
    from captioning.data.features import FeatureStore

    encoder = TimmEncoder(VIT, model_args={"img_size": 32, "depth": 1}).eval()
    dm = CocoCaptionsDataModule(str(tiny_shapes_root), year="2017", image_size=32, num_workers=0, progress=False,
                                feature_cache=True, feature_dtype="float32", cache_dir=str(tmp_path / "features"),
                                vocab_path=str(tmp_path / "vocab.json"), min_word_count=1)
    dm.use_encoder(encoder)
    dm.prepare_data()
    dm.setup("fit")
    split = dm.datasets["train"].split
    store = FeatureStore(dm.feature_directory("train"))
    pipeline = dm.image_pipeline()
    assert pipeline.contract.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        expected = encoder(torch.stack([pipeline(p) for p in split.image_paths]))
    assert store.features.shape == (len(split.image_paths), 192, 2, 2)
    torch.testing.assert_close(torch.from_numpy(np.array(store.features)), expected, rtol=1e-4, atol=1e-4)


def test_hub_weights_offline_fail_naming_what_to_do():
    """The tests run with the hub offline (conftest): the library's error becomes one paragraph with the way out."""
    with pytest.raises(ValueError, match=r"(?s)encoder=timm name='vit_tiny_patch16_224'.*hub.*encoder.weights=/path"):
        TimmEncoder(VIT, weights="hub")
    with pytest.raises(ValueError, match=r"(?s)encoder=open_clip name='ViT-B-32'.*laion2b.*encoder.weights=/path"):
        OpenClipEncoder("ViT-B-32", weights="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="not a timm model"):
        TimmEncoder("vit_nonexistent_model")
    with pytest.raises(ValueError, match="has no class token"):
        TimmEncoder("resnet18", pooled="cls")
