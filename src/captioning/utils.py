"""Helpers the entry points share: instantiating config groups, printing the config, checkpoints."""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax

from .checkpointing import read_checkpoint
from .module import NonFiniteLossError
from .sweeps import in_multirun

__all__ = ["instantiate_dict", "instantiate_callbacks", "has_split", "print_config", "resolve_start", "save_config", "resolve_ckpt_path", "resolve_ckpt_paths", "explain_errors", "seed_everything"]

T = TypeVar("T")
# The checkpoints ckpt_path=last picks from: ModelCheckpoint's and InterruptCheckpoint's.
RESUMABLE = ("last.ckpt", "interrupted.ckpt")
# Errors whose message is the whole story (they name the file/key/value and what to do).
USER_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError)


def instantiate_dict(group: DictConfig | None) -> list[Any]:
    """A config group holding named ``_target_`` entries (callbacks, loggers) -> the instantiated objects.

    Entries set to null are skipped, so ``callbacks.model_checkpoint=null`` switches one off.
    """
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def instantiate_callbacks(group: DictConfig | None, trainer: DictConfig | None = None,
                          loggers: list[Any] | None = None) -> list[Any]:
    """The callbacks of a config group, less those the trainer config switches off.

    ``trainer.enable_progress_bar=false``, ``enable_model_summary=false`` and ``enable_checkpointing=false``
    drop the configured progress bar, model summary and ModelCheckpoint, as they would Lightning's own:
    Lightning refuses the first and last next to a configured callback, and keeps printing a configured
    summary. With ``loggers`` given and empty (``logger=none``) the LearningRateMonitor goes too: it has nowhere
    to log, and Lightning stops the run at its start for it.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar

    switches = {"enable_progress_bar": ProgressBar, "enable_model_summary": ModelSummary,
                "enable_checkpointing": ModelCheckpoint}
    off = tuple(kind for key, kind in switches.items() if trainer is not None and trainer.get(key) is False)
    if loggers is not None and not loggers:
        off = (*off, LearningRateMonitor)
    return [callback for callback in instantiate_dict(group) if not (off and isinstance(callback, off))]


def native_bf16(accelerator: str = "auto") -> str | None:
    """Why the device ``accelerator`` names (Lightning's spelling: auto, cpu, gpu, cuda, mps...) computes
    bfloat16 natively, or None when it does not (it would emulate it, slower than float32)."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        # including_emulation=False: torch otherwise answers yes for GPUs before Ampere, which emulate it
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch before the argument
            native = torch.cuda.is_bf16_supported()
        return "a CUDA GPU with bfloat16" if native else None
    if accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available()):
        # private helpers of torch.cpu, hence the getattr: a torch without them reads as "no"
        for name, what in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
            if getattr(torch.cpu, name, lambda: False)():
                return f"a CPU with {what}"
    return None


def resolve_precision(precision: Any, accelerator: str = "auto") -> Any:
    """``trainer.precision=auto`` -> ``bf16-mixed`` where the device computes bfloat16 natively, else ``32-true``;
    any other value unchanged.

    Mixed bf16 keeps float32 weights and runs convolutions and matrix products in bfloat16 (torch.autocast):
    on the built-in set's default it trained a little faster on an AVX512-BF16 CPU (whole runs 6-10%), to the same
    or truer captions (docs/results.md, "Time to a true captioner"); on a GPU with bf16 it is the usual choice.
    Where bfloat16 would be emulated (most CPUs before 2020, Apple silicon through MPS, GPUs before Ampere) it
    would be slower, so float32 stays."""
    if str(precision) != "auto":
        return precision
    why = native_bf16(str(accelerator))
    resolved = "bf16-mixed" if why else "32-true"
    rank_zero_info(f"trainer.precision=auto: {resolved} ("
                   + (f"{why} computes bfloat16 natively" if why else "this device has no native bfloat16") + ")")
    return resolved


def instantiate_trainer(trainer: DictConfig, **overrides: Any) -> L.Trainer:
    """The trainer group's config (and ``overrides`` of its arguments) -> ``lightning.Trainer``, with
    ``precision=auto`` settled for the accelerator it will run on (:func:`resolve_precision`)."""
    precision = overrides.pop("precision", trainer.get("precision", "32-true"))
    accelerator = overrides.get("accelerator", trainer.get("accelerator", "auto"))
    log_recurrence()
    return instantiate(trainer, precision=resolve_precision(precision, accelerator), **overrides)


def log_recurrence() -> None:
    """Say whether the recurrent cores' loops run compiled on CPU (captioning.models.kernels) and, if not, how."""
    from .models import kernels

    if kernels.load() is not None:
        rank_zero_info("recurrent core: compiled loops on CPU (captioning.models.kernels)")
    elif os.environ.get("CAPTIONING_KERNELS", "").lower() not in ("off", "0", "false"):
        rank_zero_info("recurrent core: Python loops (the compiled ones are not built; `python -m "
                       "captioning.models.kernels` builds them once, ~30 s, for faster CPU training at small sizes)")


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
    """``"last"`` -> the newest (by modification time) ``last.ckpt`` or ``interrupted.ckpt`` among this task's
    runs; a path must exist. Either way the file must be a checkpoint of this project's format.

    Raises FileNotFoundError with what was looked for and what to pass instead, ValueError for a file that
    is not a readable checkpoint (:func:`captioning.checkpointing.read_checkpoint`).
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        runs = Path(log_dir) / task_name
        found = [p for name in RESUMABLE for p in runs.glob(f"*/*/checkpoints/{name}")]
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no {' or '.join(RESUMABLE)} under {runs}/*/*/checkpoints/. Nothing to resume "
                f"for task_name={task_name!r}: pass the checkpoint's path (ckpt_path=outputs/.../last.ckpt) or "
                "start a new run without ckpt_path."
            )
        path = max(found, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path}: no such checkpoint file. Runs keep theirs under "
                f"{log_dir}/<task>/runs/<time>/checkpoints/ (best, last.ckpt and, after an interruption, "
                "interrupted.ckpt); pass one of those, or ckpt_path=last for the newest."
            )
    # A clear error now (not a checkpoint, another format) rather than deep inside Lightning's restore.
    checkpoint = read_checkpoint(path)
    rank_zero_info(f"Checkpoint {path}: epoch {checkpoint.get('epoch')}, global step {checkpoint.get('global_step')}.")
    return str(path)


def resolve_ckpt_paths(ckpt_path: Any, log_dir: str | Path, task_name: str) -> list[str]:
    """``ckpt_path`` as one checkpoint or a list of them (an ensemble, ``'ckpt_path=[a.ckpt,b.ckpt]'``), each
    resolved by :func:`resolve_ckpt_path`."""
    entries = list(ckpt_path) if isinstance(ckpt_path, ListConfig | list | tuple) else [ckpt_path]
    if not entries or any(entry is None for entry in entries):
        raise ValueError(f"ckpt_path={ckpt_path!r}: pass a checkpoint file, last, or a list of checkpoint files "
                         "('ckpt_path=[a.ckpt,b.ckpt]') to decode with as an ensemble.")
    return [resolve_ckpt_path(str(entry), log_dir, task_name) for entry in entries]


def resolve_start(module: Any, ckpt_path: str | None) -> str | None:
    """Resume, or start from another run's weights: the ``ckpt_path`` to hand to ``trainer.fit``.

    A checkpoint trained with the configured objective resumes everything (step, optimizer, schedule, data
    order). One trained with another objective (``ckpt_path=<xe.ckpt> objective=scst``) only gives its weights:
    the new objective starts with a fresh optimizer and schedule from epoch 0, and None is returned.
    """
    if ckpt_path is None:
        return None
    saved = (read_checkpoint(Path(ckpt_path))["hyper_parameters"].get("objective") or {}).get(
        "_target_", "captioning.objectives.CrossEntropy")
    configured = module.hparams["objective"]["_target_"]
    if saved == configured:
        return ckpt_path
    rank_zero_info(f"{ckpt_path} was trained with {saved.rpartition('.')[2]}, this run with "
                   f"{configured.rpartition('.')[2]}: starting from its weights with a new optimizer and schedule.")
    module.start_from(ckpt_path)
    return None


def explain_errors(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap an entry point's task function so that a user's mistake ends in one paragraph, exit code 1.

    A wrong value in the config (a constructor's ValueError, wrapped by Hydra's InstantiationException) is
    printed with the config key it came from; ValueError, FileNotFoundError and a non-finite loss are
    printed as they are (their messages name the file/key and what to do). A run stopped by SIGTERM or
    Ctrl+C exits with 128 + SIGTERM (143) after its checkpoint message. ``HYDRA_FULL_ERROR=1`` re-raises
    everything for the full traceback; other exceptions (bugs) keep their traceback.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> T:
        try:
            return task(cfg)
        except SIGTERMException:
            sys.exit(128 + signal.SIGTERM)
        except (InstantiationException, *USER_ERRORS) as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _print_error(_explain(error))
            if in_multirun():
                raise  # Hydra records the failed job and goes on with the sweep; exiting would end it
            sys.exit(1)

    return wrapped


def _explain(error: BaseException) -> str:
    """The innermost cause of a (nested) instantiation error, with the config key and target it came from."""
    keys, target = [], None
    while isinstance(error, InstantiationException):
        text = str(error)
        if match := re.search(r"full_key: (\S+)", text):
            keys.append(match.group(1))
        if match := re.search(r"target '([^']+)'", text):
            target = match.group(1)
        if error.__cause__ is None:
            return text
        error = error.__cause__
    message = str(error) or type(error).__name__
    if not keys and target is None:
        return message
    where = f"config key {keys[-1]}" if keys else "the config"
    return f"Invalid value in {where} ({target}): {type(error).__name__}: {message}"


@rank_zero_only
def _print_error(message: str) -> None:
    print(f"Error: {message}\n(Set HYDRA_FULL_ERROR=1 for the full traceback.)", file=sys.stderr, flush=True)


def has_split(datamodule: Any, role: str) -> bool:
    """Whether the DataModule has a ``role`` ("train", "val", "test") split configured."""
    splits = getattr(datamodule, "splits", None)
    return bool(splits.get(role)) if isinstance(splits, dict) else True


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        L.seed_everything(seed, workers=True)
