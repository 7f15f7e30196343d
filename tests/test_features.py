"""Encoder feature cache: built once, reused, invalidated by a changed key, resumed, read by workers."""

import json
import re

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from captioning.data import CocoCaptionsDataModule
from captioning.data.features import FeatureStore
from captioning.data.images import load_image
from captioning.data.transforms import image_transform


class CountingEncoder(nn.Module):
    """A frozen 4x4/stride-4 conv: images (N, 3, S, S) -> (N, 3, S/4, S/4), counting its calls.

    ``fail_at``: raise on that call, as a run killed mid-build would stop.
    """

    def __init__(self, seed=0, fail_at=None):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 4, stride=4)
        self.requires_grad_(False)
        self.calls, self.rows, self.fail_at = 0, 0, fail_at

    def forward(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed mid-build")
        self.rows += len(images)
        return self.conv(images)


def make_dm(root, tmp_path, encoder=None, **kwargs):
    args = {"root": str(root), "year": "2017", "image_size": 32, "max_length": 8, "min_word_count": 1,
            "batch_size": 4, "num_workers": 0, "vocab_path": str(tmp_path / "vocab.json"),
            "cache_dir": str(tmp_path / "features"), "feature_cache": True, "feature_dtype": "float32",
            "progress": False} | kwargs
    dm = CocoCaptionsDataModule(**args)
    if encoder is not None:
        dm.use_encoder(encoder)
    return dm


def direct_features(encoder, split):
    """The encoder run on every image of the split the ordinary way (no cache)."""
    transform = image_transform(32)
    images = torch.stack([transform(load_image(p)) for p in split.image_paths])
    with torch.no_grad():
        return encoder.conv(images)


def cache_dirs(tmp_path):
    return sorted(p.name for p in (tmp_path / "features").iterdir())


def test_cache_is_built_once_then_reused(tiny_shapes_root, tmp_path):
    encoder = CountingEncoder()
    dm = make_dm(tiny_shapes_root, tmp_path, encoder)
    dm.prepare_data()
    assert encoder.rows == 20 + 5 + 5  # every image of train, val and test once
    names = cache_dirs(tmp_path)
    assert len(names) == 3 and {n.split("-")[0] for n in names} == {"train", "val", "test"}
    directory = dm.feature_directory("train")
    assert "size=32," in json.loads((directory / "key.json").read_text())["transform"]
    assert json.loads((directory / "progress.json").read_text())["complete"] is True

    dm.setup("fit")
    train = dm.datasets["train"]
    expected = direct_features(encoder, train.split)  # (20, 3, 8, 8)
    store = FeatureStore(directory)
    assert store.features.shape == (20, 3, 8, 8) and store.features.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(np.array(store.features)), expected, rtol=1e-5, atol=1e-5)
    index = json.loads((directory / "index.json").read_text())
    assert index["image_ids"] == train.split.image_ids.tolist()

    calls = encoder.calls
    seen = 0
    for batch in dm.train_dataloader():
        assert "images" not in batch and batch["features"].shape[1:] == (3, 8, 8)
        assert batch["features"].dtype == torch.float32
        rows = [store.row_of(i) for i in batch["image_ids"].tolist()]
        torch.testing.assert_close(batch["features"], expected[rows], rtol=1e-5, atol=1e-5)
        seen += len(batch["captions"])
    assert seen == len(train) == 100
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"features", "captions", "image_ids", "references"}

    again = make_dm(tiny_shapes_root, tmp_path, encoder)  # a new run with the same key
    again.prepare_data()
    again.setup("fit")
    next(iter(again.train_dataloader()))
    assert encoder.calls == calls  # nothing recomputed
    assert cache_dirs(tmp_path) == names


@pytest.mark.parametrize("change", ["weights", "cache_key", "image_size", "dtype"])
def test_a_changed_key_builds_a_new_cache(tiny_shapes_root, tmp_path, change):
    first = CountingEncoder()
    dm = make_dm(tiny_shapes_root, tmp_path, first)
    dm.prepare_data()
    old = dm.feature_directory("val")
    old_features = np.load(old / "features.npy").copy()

    encoder, extra = CountingEncoder(), {}
    if change == "weights":
        encoder = CountingEncoder(seed=1)  # same config, other weights: must not read the old features
    elif change == "cache_key":
        encoder.cache_key = "pool2"  # what a config change of the same weights (spatial_size) changes
    elif change == "image_size":
        extra = {"image_size": 16}
    else:
        extra = {"feature_dtype": "float16"}
    dm2 = make_dm(tiny_shapes_root, tmp_path, encoder, **extra)
    dm2.prepare_data()
    assert encoder.rows == 30  # recomputed
    new = dm2.feature_directory("val")
    assert new != old and len(cache_dirs(tmp_path)) == 6
    np.testing.assert_array_equal(np.load(old / "features.npy"), old_features)  # the old cache is untouched
    dm2.setup("validate")
    batch = next(iter(dm2.val_dataloader()))
    expected = direct_features(encoder, dm2.datasets["val"].split)
    if change == "image_size":
        assert batch["features"].shape[2:] == (4, 4)
    else:
        torch.testing.assert_close(batch["features"], expected[:4], rtol=1e-3, atol=1e-3)
        if change == "weights":
            assert not torch.allclose(batch["features"], torch.from_numpy(old_features[:4]))


def test_an_image_replaced_in_place_builds_a_new_cache(tiny_shapes_root, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes_root, root)
    dm = make_dm(root, tmp_path, CountingEncoder())
    dm.prepare_data()
    old = dm.feature_directory("val")
    first = sorted((root / "val2017").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 255)).save(first)  # same name, new pixels (a regenerated set)
    encoder = CountingEncoder()
    dm = make_dm(root, tmp_path, encoder)
    dm.prepare_data()
    assert dm.feature_directory("val") != old and encoder.rows == 5  # only the val split is rebuilt
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(batch["features"], direct_features(encoder, dm.datasets["val"].split)[:4])


def test_interrupted_build_resumes_where_it_stopped(tiny_shapes_root, tmp_path):
    crashing = CountingEncoder(fail_at=3)  # batch size 4: rows 0-7 are done when call 3 dies
    dm = make_dm(tiny_shapes_root, tmp_path, crashing)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    directory = dm.feature_directory("train")
    progress = json.loads((directory / "progress.json").read_text())
    assert progress == {"rows_done": 8, "feature_shape": [3, 8, 8], "bad_rows": {}, "complete": False}
    with pytest.raises(RuntimeError, match="not complete"):
        dm.setup("fit")

    resumed = CountingEncoder()  # same weights (seed 0)
    dm = make_dm(tiny_shapes_root, tmp_path, resumed)
    dm.prepare_data()
    assert resumed.rows == (20 - 8) + 5 + 5  # only the rest of train, then val and test
    dm.setup("fit")
    expected = direct_features(resumed, dm.datasets["train"].split)
    got = torch.from_numpy(np.array(FeatureStore(directory).features))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


DYING_BUILD = """
import os, sys, torch
from torch import nn
from captioning.data.features import build_feature_store

class Encoder(nn.Module):
    def __init__(self, die_at):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.calls, self.die_at = nn.Conv2d(3, 2, 1), 0, die_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.die_at:
            os._exit(3)  # a hard kill: no exception handler, no cleanup runs
        return self.conv(x)

images = [torch.full((3, 2, 2), float(i)) for i in range(10)]
build_feature_store(sys.argv[1], {"k": 1}, list(range(10)), images, Encoder(die_at=4), batch_size=2,
                    chunk_rows=4, progress=False, dtype="float32")
"""


def test_hard_killed_build_resumes_from_its_last_progress_record(tmp_path):
    import subprocess
    import sys

    from captioning.data.features import build_feature_store

    directory = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", DYING_BUILD, str(directory)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    # 3 batches of 2 were computed; the record after the chunk of 4 rows survives, the 6th row is redone
    assert json.loads((directory / "progress.json").read_text())["rows_done"] == 4

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1)
    calls = []
    conv.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    images = [torch.full((3, 2, 2), float(i)) for i in range(10)]
    store = build_feature_store(directory, {"k": 1}, list(range(10)), images, conv, batch_size=2,
                                progress=False, dtype="float32")
    assert calls == [2, 2, 2]  # rows 4-9 only
    with torch.no_grad():
        expected = conv(torch.stack(images))
    torch.testing.assert_close(torch.from_numpy(np.array(store.features)), expected)
    assert store.get(7) is not None and store.row_of(7) == 7


def test_two_workers_read_the_encoders_features(tiny_shapes_root, tmp_path):
    encoder = CountingEncoder()
    dm = make_dm(tiny_shapes_root, tmp_path, encoder, num_workers=2, persistent_workers=False,
                 feature_dtype="float16")
    dm.prepare_data()
    dm.setup("fit")
    store = dm.datasets["val"].source.store
    assert store._features is None  # not mapped in the main process: each worker maps it itself
    expected = direct_features(encoder, dm.datasets["val"].split)
    batches = list(dm.val_dataloader())
    features = torch.cat([b["features"] for b in batches])
    assert [i for b in batches for i in b["image_ids"].tolist()] == dm.datasets["val"].split.image_ids.tolist()
    torch.testing.assert_close(features, expected, rtol=2e-3, atol=2e-3)  # float16 storage
    ids = sorted(i for b in dm.train_dataloader() for i in b["image_ids"].tolist())
    assert len(ids) == 100


def test_bad_image_during_the_build_is_skipped_and_counted(tiny_shapes_root, tmp_path):
    import shutil

    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes_root, root)
    broken = sorted((root / "val2017").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:50])  # truncated JPEG
    dm = make_dm(root, tmp_path, CountingEncoder())
    with pytest.warns(UserWarning, match=re.escape(str(broken))):
        dm.prepare_data()
    with pytest.warns(UserWarning, match="could not be read when the feature cache was built"):
        dm.setup("fit")
    ids = [i for b in dm.val_dataloader() for i in b["image_ids"].tolist()]
    assert len(ids) == 4 and dm.bad_images == {"val": [str(broken)]}

    strict = make_dm(root, tmp_path / "strict", CountingEncoder(), on_bad_image="fail")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        strict.prepare_data()


def test_cache_needs_a_frozen_encoder(tiny_shapes_root, tmp_path):
    dm = make_dm(tiny_shapes_root, tmp_path)
    with pytest.raises(RuntimeError, match="encoder.freeze=true") as err:
        dm.prepare_data()
    assert "use_encoder" in str(err.value)
    trainable = nn.Conv2d(3, 3, 4, stride=4)
    with pytest.raises(ValueError, match="encoder.freeze=true"):
        dm.use_encoder(trainable)
    assert not make_dm(tiny_shapes_root, tmp_path, augment=True).images.augment  # cached features: nothing to augment
    plain = make_dm(tiny_shapes_root, tmp_path, feature_cache=False)
    plain.use_encoder(trainable)  # nothing to cache: fine
    plain.prepare_data()
    plain.setup("validate")
    assert "images" in next(iter(plain.val_dataloader()))


def test_training_reads_features_through_the_lightning_module(tiny_shapes_root, tmp_path):
    """CaptioningModule.encode takes batch['features']: a frozen torchvision encoder's cache trains a decoder."""
    from captioning.module import CaptioningModule

    encoder_cfg = {"_target_": "captioning.models.encoder.TorchvisionEncoder", "name": "mobilenet_v2",
                   "weights": None, "freeze": True}
    module = CaptioningModule(
        encoder=encoder_cfg,
        decoder={"_target_": "captioning.models.CaptioningRNN", "cell_type": "lstm", "wordvec_dim": 8,
                 "hidden_dim": 16},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    )
    calls = []
    module.encoder.register_forward_hook(lambda *args: calls.append(1))
    dm = make_dm(tiny_shapes_root, tmp_path, module.encoder, batch_size=10)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert len(calls) == 2 + 1 + 1  # the cache build (20/5/5 images, batch 10), none in training
    assert trainer.global_step == 10  # 100 pairs / 10
    assert np.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))
