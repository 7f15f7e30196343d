"""Every option of every config group composes, and its objects instantiate."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from captioning.utils import instantiate_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "model", "encoder", "trainer", "logger", "callbacks", "debug", "experiment", "hparams_search")


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(tmp_path, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")  # set by Hydra at run time; compose() has no run
    HydraConfig.instance().set_config(cfg)
    return cfg


CASES = [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options():
    for group in ("data", "model", "encoder", "trainer", "logger", "callbacks", "debug", "experiment"):
        assert options(group), group


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(tmp_path, monkeypatch, group, option):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(tmp_path, [f"{group}={option}"])
    assert cfg.paths.output_dir == str(tmp_path / "run")
    datamodule = instantiate(cfg.data)
    assert datamodule.batch_size == cfg.data.batch_size
    module = instantiate(cfg.module, _recursive_=False)
    assert module.hparams.decoder["cell_type"] == cfg.model.cell_type
    assert module.encoder.out_dim > 0
    callbacks = instantiate_dict(cfg.callbacks)
    # GPU trainer configs are built on CPU here (no GPU on CI); everything else as configured.
    cpu_only = {"accelerator": "cpu"} if cfg.trainer.get("accelerator") == "gpu" else {}
    if cpu_only and "precision" in cfg.trainer:
        cpu_only["precision"] = "bf16-mixed" if "bf16" in str(cfg.trainer.precision) else "32-true"
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, **cpu_only)
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    assert trainer.num_devices == cfg.trainer.devices


def test_overrides_reach_constructors(tmp_path):
    cfg = compose_train(tmp_path, ["model=attention", "model.hidden_dim=64", "data.batch_size=8",
                                   "trainer.max_epochs=3", "optimizer.lr=0.01"])
    module = instantiate(cfg.module, _recursive_=False)
    assert module.hparams.decoder == {"_target_": "captioning.models.CaptioningRNN", "cell_type": "attention",
                                      "wordvec_dim": 128, "hidden_dim": 64, "dropout": 0.0, "loss_normalize": "batch",
                                      "backward": "autograd"}
    assert module.hparams.optimizer["lr"] == 0.01
    assert instantiate(cfg.data).batch_size == 8


def test_every_key_maps_onto_a_constructor_argument(tmp_path):
    """No dead keys: each group's keys are arguments of its _target_."""
    import importlib
    import inspect

    cfg = compose_train(tmp_path)
    nodes = [cfg.data, cfg.model, cfg.encoder, cfg.trainer, cfg.decoding, cfg.module,
             *[c for c in cfg.callbacks.values() if c], *[c for c in cfg.logger.values() if c]]
    for node in nodes:
        module_name, _, name = node._target_.rpartition(".")
        target = getattr(importlib.import_module(module_name), name)
        params = inspect.signature(target).parameters
        has_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in node:
            if key.startswith("_"):
                continue
            assert key in params or has_kwargs, f"{node._target_} has no argument {key!r}"
