"""Sweep guards: the multirun + multi-device trap, the Optuna direction, and the value a sweeper optimises."""

from __future__ import annotations

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

__all__ = ["check_sweep", "in_multirun", "optimized_value"]


def in_multirun() -> bool:
    """Whether this is a job of a Hydra multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def _devices_per_node(trainer: DictConfig) -> int:
    devices, accelerator = trainer.get("devices", 1), str(trainer.get("accelerator", "auto"))
    if str(devices).strip() in ("auto", "-1"):
        return 1 if accelerator == "cpu" else max(torch.cuda.device_count(), 1)
    if isinstance(devices, str):
        ids = [d for d in devices.split(",") if d.strip()]
        return len(ids) if "," in devices else int(devices)
    return devices if isinstance(devices, int) else len(devices)


def check_sweep(cfg: DictConfig) -> None:
    """Refuse the multirun + multi-device trap and an Optuna direction that contradicts the metric."""
    if not in_multirun():
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


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; in a multirun a missing metric is an error, else a warning."""
    if not name:
        return None
    if name not in metrics:
        message = (
            f"optimized_metric={name} was not logged by this run (logged: {', '.join(sorted(metrics)) or 'none'}). "
            "Set optimized_metric to one of the validation metrics (val/cider, val/bleu4, val/loss...); a run "
            "without validation (trainer.limit_val_batches=0) has none."
        )
        if in_multirun():
            raise ValueError(message)
        rank_zero_warn(message)
        return None
    return float(metrics[name])
