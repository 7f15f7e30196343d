"""Helpers the entry points share: instantiating config groups, printing the config, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax

__all__ = ["instantiate_dict", "print_config", "save_config", "resolve_ckpt_path"]


def instantiate_dict(group: DictConfig | None) -> list[Any]:
    """A config group holding named ``_target_`` entries (callbacks, loggers) -> the instantiated objects.

    Entries set to null are skipped, so ``callbacks.model_checkpoint=null`` switches one off.
    """
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """Print the run's whole resolved config (syntax-highlighted YAML)."""
    Console().print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark", word_wrap=True))


@rank_zero_only
def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config beside the run's outputs (Hydra's .hydra/ keeps the unresolved one)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | Path, task_name: str) -> str | None:
    """``"last"`` -> the newest ``last.ckpt`` among this task's runs; a path must exist.

    Raises FileNotFoundError with what was looked for and what to pass instead.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        runs = Path(log_dir) / task_name
        found = sorted(runs.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no last.ckpt under {runs}/*/*/checkpoints/. Nothing to resume for "
                f"task_name={task_name!r}: pass the checkpoint's path (ckpt_path=outputs/.../last.ckpt) or "
                "start a new run without ckpt_path."
            )
        return str(found[-1])
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no such checkpoint file. Runs keep theirs under "
            f"{log_dir}/<task>/runs/<time>/checkpoints/ (best and last.ckpt); pass one of those, or "
            "ckpt_path=last for the newest last.ckpt."
        )
    return str(path)


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        L.seed_everything(seed, workers=True)
