"""Every option of every config group composes, and its objects instantiate."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from captioning.utils import instantiate_callbacks, instantiate_dict, instantiate_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "model", "encoder", "decoding", "trainer", "logger", "callbacks", "debug", "experiment",
          "hparams_search")


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
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=False, **cpu_only)
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    assert trainer.num_devices == cfg.trainer.devices


def test_overrides_reach_constructors(tmp_path):
    cfg = compose_train(tmp_path, ["model=attention", "model.hidden_dim=64", "data.batch_size=8",
                                   "trainer.max_epochs=3", "optimizer.lr=0.01"])
    module = instantiate(cfg.module, _recursive_=False)
    assert module.hparams.decoder == {"_target_": "captioning.models.CaptioningRNN", "cell_type": "attention",
                                      "wordvec_dim": 128, "hidden_dim": 64, "dropout": 0.0, "loss_normalize": "batch",
                                      "backward": "manual", "feature_pool": "max", "feature_grid": 4,
                                      "image_input": False, "context_output": True}
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


# Trainer arguments people reach for, set without "+" (each is listed in conf/trainer/default.yaml), and
# where the built Trainer shows it.
KNOBS = {
    "max_steps=7": lambda t: t.max_steps == 7,
    "min_steps=3": lambda t: t.min_steps == 3,
    "max_time=00:00:10:00": lambda t: any(type(c).__name__ == "Timer" for c in t.callbacks),
    "limit_train_batches=5": lambda t: t.limit_train_batches == 5,
    "limit_val_batches=0.5": lambda t: t.limit_val_batches == 0.5,
    "limit_test_batches=3": lambda t: t.limit_test_batches == 3,
    "limit_predict_batches=2": lambda t: t.limit_predict_batches == 2,
    "val_check_interval=0.25": lambda t: t.val_check_interval == 0.25,
    "check_val_every_n_epoch=2": lambda t: t.check_val_every_n_epoch == 2,
    "fast_dev_run=true": lambda t: t.fast_dev_run is True,
    "overfit_batches=2": lambda t: t.overfit_batches == 2,
    "profiler=simple": lambda t: type(t.profiler).__name__ == "SimpleProfiler",
    "enable_progress_bar=false": lambda t: t.progress_bar_callback is None,
    "enable_model_summary=false": lambda t: not any(type(c).__name__.endswith("ModelSummary") for c in t.callbacks),
    "enable_checkpointing=false": lambda t: t.checkpoint_callback is None,
    "detect_anomaly=true": lambda t: t._detect_anomaly is True,
    "num_sanity_val_steps=0": lambda t: t.num_sanity_val_steps == 0,
    "log_every_n_steps=5": lambda t: t.log_every_n_steps == 5,
    "accumulate_grad_batches=4": lambda t: t.accumulate_grad_batches == 4,
    "reload_dataloaders_every_n_epochs=1": lambda t: t.reload_dataloaders_every_n_epochs == 1,
    "inference_mode=false": lambda t: t.predict_loop.inference_mode is False,
    "use_distributed_sampler=false": lambda t: t._accelerator_connector.use_distributed_sampler is False,
    "precision=bf16-mixed": lambda t: t.precision == "bf16-mixed",
    "precision=32-true": lambda t: t.precision == "32-true",
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_trainer_knobs_need_no_plus(tmp_path, knob):
    cfg = compose_train(tmp_path, [f"trainer.{knob}"])
    callbacks = instantiate_callbacks(cfg.callbacks, cfg.trainer)  # as train.py builds them
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=False)
    assert KNOBS[knob](trainer), knob


def test_trainer_config_lists_lightnings_arguments_with_lightnings_defaults(tmp_path):
    import inspect

    import lightning as L

    cfg = compose_train(tmp_path)
    params = inspect.signature(L.Trainer.__init__).parameters
    # configured by the entry points (logger, callbacks), or deliberately not exposed
    not_listed = {"self", "logger", "callbacks", "enable_autolog_hparams", "model_registry"}
    assert set(params) - not_listed - set(cfg.trainer) == set()
    # the values this project changes on purpose; every other listed one is Lightning's default
    ours = {"default_root_dir", "devices", "precision", "min_epochs", "max_epochs", "num_sanity_val_steps",
            "gradient_clip_val", "gradient_clip_algorithm", "log_every_n_steps", "deterministic", "benchmark",
            "plugins"}
    for key in set(cfg.trainer) - ours - {"_target_"}:
        assert cfg.trainer[key] == params[key].default, key


def test_scst_carries_the_optimisation_it_needs(tmp_path):
    """objective=scst alone fine-tunes at SCST's constant learning rate for one epoch (the cross-entropy rate buys
    CIDEr-D with false objects); both stay overridable; cross-entropy keeps its own one-cycle schedule."""
    scst = compose_train(tmp_path, ["objective=scst"])
    assert scst.optimizer.lr == 5e-5 and scst.trainer.max_epochs == 1 and scst.scheduler is None
    assert scst.module.objective._target_ == "captioning.objectives.SelfCritical"
    mine = compose_train(tmp_path, ["objective=scst", "optimizer.lr=1e-4", "trainer.max_epochs=3"])
    assert mine.optimizer.lr == 1e-4 and mine.trainer.max_epochs == 3
    xe = compose_train(tmp_path)
    assert xe.optimizer.lr == 3e-3 and xe.trainer.max_epochs == 10
    assert xe.scheduler._target_ == "captioning.schedules.OneCycleLR" and xe.module.scheduler_interval == "step"


@pytest.mark.parametrize(("model", "pathways"), [("attention", True), ("lstm", False), ("rnn", False)])
def test_small_cnn_pathways_auto_follows_the_decoder(tmp_path, model, pathways):
    """encoder.pathways=auto: on for the attention decoder, off for the pooling ones; the hparams (and so the
    checkpoint) record the outcome, and an explicit value wins."""
    module = instantiate(compose_train(tmp_path, [f"model={model}"]).module, _recursive_=False)
    assert module.encoder.pathways is pathways and module.hparams.encoder["pathways"] is pathways
    forced = instantiate(compose_train(tmp_path, [f"model={model}", "encoder.pathways=true"]).module,
                         _recursive_=False)
    assert forced.encoder.pathways is True


# A code default that differs from the shipped config's on purpose, and why. Every other default of the project's own
# classes is the config's: a model built in Python is the model `python src/train.py` builds.
DELIBERATE_DIFFERENCES = {
    # keys added after checkpoints were saved without them: the code default is how those were trained
    ("CaptioningRNN", "feature_pool"): "checkpoints from before the key were trained with the courses' mean pool",
    ("CaptioningRNN", "image_input"): "checkpoints from before the key were trained with h0 as the only image input",
    ("SmallCNN", "pathways"): "checkpoints from before the key have no pathway weights",
    ("CrossEntropy", "image_dropout"): "checkpoints from before the key were trained on every image",
    ("CaptioningRNN", "context_output"): "checkpoints from before the key have no context_proj weights",
    # Lightning's signature: monitor=None keeps the newest epoch; the config names what the best one is
    ("ModelCheckpoint", "monitor"): "Lightning's default (None) has nothing to choose by",
    # a data set's own config says what its files hold
    ("CocoCaptionsDataModule", "test_split"): "COCO 2017 has no test captions; Karpathy's split has one",
    ("CocoCaptionsDataModule", "augmentation"): "the recipe is a mapping; None (= CaptionAugment's defaults) in code",
    ("ShapesDataModule", "augmentation"): "the recipe is a mapping; None (= CaptionAugment's defaults) in code",
}


def _own_targets():
    """(config file, dotted key, class, {key: value}) for every _target_ of the project's own classes."""
    import importlib
    import inspect

    from omegaconf import OmegaConf

    def walk(node, where, file):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str) and node["_target_"].startswith("captioning."):
                module, _, name = node["_target_"].rpartition(".")
                cls = getattr(importlib.import_module(module), name)
                if inspect.isclass(cls) and getattr(cls.__init__, "__module__", "").startswith("captioning"):
                    yield file, where, cls, node
            for key, value in node.items():
                yield from walk(value, f"{where}.{key}".lstrip("."), file)

    for path in sorted(CONF.rglob("*.yaml")):
        if path.parent.name in ("experiment", "debug", "hparams_search"):
            continue  # recipes that change the defaults are what those groups are for
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        yield from walk(node, "", path.relative_to(CONF))


def test_code_defaults_are_the_config_defaults():
    import inspect

    seen, differences = set(), []
    for file, where, cls, node in _own_targets():
        seen.add(cls.__name__)
        # a DataModule's shared options are not in its signature (**options): its arguments() lists them
        defaults = cls.arguments() if hasattr(cls, "arguments") else {
            key: p.default for key, p in inspect.signature(cls).parameters.items()}
        for key, default in defaults.items():
            if key not in node or default is inspect.Parameter.empty:
                continue
            value = node[key]
            if isinstance(value, str) and "${" in value:
                continue  # interpolated from another group
            if (cls.__name__, key) in DELIBERATE_DIFFERENCES:
                assert value != (list(default) if isinstance(default, tuple) else default), (
                    f"{cls.__name__}.{key} now equals the config: drop it from DELIBERATE_DIFFERENCES")
                continue
            if value != (list(default) if isinstance(default, tuple) else default):
                differences.append(f"{file} {where}.{key}: config {value!r}, {cls.__name__} {default!r}")
    assert {"CaptioningRNN", "CaptionDecoder", "SmallCNN", "CrossEntropy", "SelfCritical",
            "ShapesDataModule", "CocoCaptionsDataModule"} <= seen
    assert not differences, "\n".join(differences)


def test_logger_none_drops_the_learning_rate_monitor(tmp_path):
    """``logger=none``: Lightning refuses a LearningRateMonitor without a logger at the start of fit; train.py
    leaves it out (and keeps it when there is a logger)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    cfg = compose_train(tmp_path, ["logger=none"])
    assert not any(isinstance(c, LearningRateMonitor) for c in instantiate_callbacks(cfg.callbacks, cfg.trainer, []))
    kept = instantiate_callbacks(cfg.callbacks, cfg.trainer, [object()])
    assert any(isinstance(c, LearningRateMonitor) for c in kept)


def test_precision_auto_is_bf16_mixed_only_where_bf16_is_native(tmp_path, monkeypatch):
    """The default trainer.precision=auto: bf16-mixed on a CPU with AVX512-BF16 or AMX, 32-true on one without
    (emulated bf16 would be slower); explicit values are kept; eval.py scores in float32 whatever the machine."""
    import torch

    from captioning import utils

    cfg = compose_train(tmp_path)
    assert cfg.trainer.precision == "auto"
    for amx, avx512_bf16, expected in ((False, False, "32-true"), (False, True, "bf16-mixed"),
                                       (True, False, "bf16-mixed")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert utils.resolve_precision("auto", "cpu") == expected
        trainer = instantiate_trainer(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False,
                                      enable_progress_bar=False, enable_model_summary=False)
        assert trainer.precision == expected
        assert utils.resolve_precision("32-true", "cpu") == "32-true"
        assert utils.resolve_precision("16-mixed", "cpu") == "16-mixed"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        trainer = compose("eval", overrides=["ckpt_path=x.ckpt"]).trainer
    # eval.yaml's own trainer settings win over the trainer group's defaults
    assert trainer.precision == "32-true" and trainer.enable_model_summary is False


def test_precision_auto_on_a_gpu_asks_for_native_bf16_only(monkeypatch):
    """torch.cuda.is_bf16_supported() answers yes for GPUs that emulate bf16; auto must ask without emulation."""
    import torch

    from captioning import utils

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: asked.append(including_emulation) or n)
        assert utils.resolve_precision("auto", "gpu") == ("bf16-mixed" if native else "32-true")
    assert asked == [False, False]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_fused_optimizer_is_clipped_where_nothing_scales_gradients(tmp_path, precision):
    # Lightning refuses to clip for an optimizer that can unscale gradients itself (the default fused AdamW) under
    # any mixed precision; under bf16-mixed (precision=auto on bf16 hardware) the module clips the true gradients
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    cfg = compose_train(tmp_path, ["model.hidden_dim=8", "model.wordvec_dim=4"])
    module = instantiate(cfg.module, _recursive_=False)
    module._build_decoder(["<NULL>", "<START>", "<END>", "<UNK>", "a", "star"])
    plugin = Precision() if precision == "32-true" else MixedPrecision("bf16-mixed", "cpu")
    module._trainer = SimpleNamespace(precision_plugin=plugin, estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] and optimizer._step_supports_amp_scaling
    for param in module.parameters():
        param.grad = torch.full_like(param, 3.0)
    module.configure_gradient_clipping(optimizer, 5.0, "norm")
    assert float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()])) == pytest.approx(5.0, rel=1e-4)
    module.configure_gradient_clipping(optimizer, 0.5, "value")
    assert max(float(p.grad.abs().max()) for p in module.parameters()) <= 0.5
    # 16-mixed scales gradients: refused, in one paragraph naming the keys that fix it
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu")),
                                      gradient_clip_val=5.0, gradient_clip_algorithm="norm")
    with pytest.raises(ValueError, match=r"fused optimizer under trainer.precision=16-mixed.*optimizer\.fused=false"):
        module.configure_gradient_clipping(optimizer, 5.0, "norm")
