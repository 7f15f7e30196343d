"""Train a captioner: ``python src/train.py [group=option ...] [key=value ...]``.

Composes the run from conf/ (train.yaml and its groups), then fits, tests the best checkpoint and
returns the optimised metric (for sweeps).
"""

from __future__ import annotations

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

from captioning.loggers import WandbLogger
from captioning.utils import instantiate_dict, print_config, resolve_ckpt_path, save_config, seed_everything


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def _devices_per_node(trainer: DictConfig) -> int:
    devices, accelerator = trainer.get("devices", 1), str(trainer.get("accelerator", "auto"))
    if str(devices).strip() in ("auto", "-1"):
        return 1 if accelerator == "cpu" else max(torch.cuda.device_count(), 1)
    if isinstance(devices, str):
        ids = [d for d in devices.split(",") if d.strip()]
        return len(ids) if "," in devices else int(devices)
    return devices if isinstance(devices, int) else len(devices)


def _check_sweep(cfg: DictConfig) -> None:
    """Refuse the multirun + multi-device trap and an Optuna direction that contradicts the metric."""
    if not _in_multirun():
        return
    trainer, metric = cfg.trainer, str(cfg.get("optimized_metric") or "")
    devices, strategy = trainer.get("devices", 1), str(trainer.get("strategy", "auto"))
    # spawn/fork strategies and cluster-launched processes (SLURM, torchrun) do not re-run the script
    relaunches = not any(w in strategy for w in ("spawn", "fork")) and not any(
        env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment))
    if relaunches and (_devices_per_node(trainer) > 1 or int(trainer.get("num_nodes", 1)) > 1):
        raise ValueError(
            f"A Hydra multirun (-m) cannot use trainer.devices={devices} (strategy={strategy}): Lightning starts "
            "DDP by re-running this script with the same command line for every extra device, so each child "
            "process would re-run the whole sweep. Instead, sweep with one device per job (trainer.devices=1), "
            "or run each configuration as its own run on all devices (one `python src/train.py trainer=ddp "
            "...` per configuration, or a W&B sweep: `wandb agent <sweep id>`), or on SLURM use the submitit "
            "launcher so each job owns its GPUs and SLURM starts its processes (hydra/launcher=submitit_slurm "
            "hydra.launcher.tasks_per_node=<devices> hydra.launcher.gpus_per_node=<devices>)."
        )
    sweeper = HydraConfig.get().sweeper
    if "Optuna" in str(sweeper.get("_target_", "")) and metric:
        wanted = "minimize" if metric.endswith("loss") else "maximize"
        if str(sweeper.get("direction")) != wanted:
            raise ValueError(
                f"hydra.sweeper.direction={sweeper.get('direction')} contradicts optimized_metric={metric}: "
                f"{metric} should be {wanted}d. Set hydra.sweeper.direction={wanted} (or another metric)."
            )


def _optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; in a multirun a missing metric is an error, else a warning."""
    if not name:
        return None
    if name not in metrics:
        message = (
            f"optimized_metric={name} was not logged by this run (logged: {', '.join(sorted(metrics)) or 'none'}). "
            "Set optimized_metric to one of the validation metrics (val/cider, val/bleu4, val/loss...); a run "
            "without validation (trainer.limit_val_batches=0) has none."
        )
        if _in_multirun():
            raise ValueError(message)
        rank_zero_warn(message)
        return None
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    _check_sweep(cfg)
    print_config(cfg)
    save_config(cfg, f"{cfg.paths.output_dir}/config.yaml")
    seed_everything(cfg.get("seed"))

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    module: L.LightningModule = instantiate(cfg.module, _recursive_=False)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test") and datamodule.hparams.get("test_split", "test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
    elif cfg.get("test") and trainer.fast_dev_run:
        trainer.test(module, datamodule=datamodule)

    # End the W&B run with the job, so each job of a multirun is its own run (a trainer that raised has
    # ended it already, as failed: captioning.loggers.WandbLogger.finalize).
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.finish()
    return _optimized_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
