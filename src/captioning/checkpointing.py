"""Safe checkpoints: atomic writes, a checkpoint when a run is interrupted, the random state for exact
resumes, and a format number so an incompatible checkpoint is refused with a clear message.

- :class:`AtomicCheckpointIO` (``trainer.plugins``): every checkpoint is written to a temporary file in the
  same directory, synced and renamed over the old one, so a crash while saving keeps the last good file.
- :class:`InterruptCheckpoint` (callback): SIGTERM (or a first Ctrl+C) stops training after the current
  batch and saves ``<dirpath>/interrupted.ckpt``; any other exception during training saves it too. The
  message names the file to resume with (``ckpt_path=last`` finds it as well).
- :class:`RandomState` (callback): the Python, NumPy and torch random generators in every checkpoint, restored
  on resume. With the DataModule's resumable training order (:mod:`captioning.data.sampling`) the loss curve
  after a resume, from an epoch boundary or from the middle of an epoch, equals an uninterrupted run's.
- :func:`check_format` / :func:`read_checkpoint`: a file that is not a checkpoint of this project, or one
  written in another format, gives a one-paragraph error naming the file and what to do.
- :func:`average_checkpoints`: one model whose weights are the mean of several checkpoints' (the cheap
  alternative to an ensemble, for checkpoints of one run).
- :class:`ModelCheckpoint` (callback): Lightning's, whose ``monitor`` may be a list of metrics in order of
  preference: the best checkpoint is chosen by the first one validation logs (true captions where the data can
  check them, else BLEU-4).
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

__all__ = [
    "CHECKPOINT_FORMAT", "AtomicCheckpointIO", "InterruptCheckpoint", "ModelCheckpoint", "RandomState",
    "average_checkpoints", "check_format", "read_checkpoint", "stamp",
]

# Bump when a checkpoint's contents change incompatibly (hyperparameter names, state_dict keys...).
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------------------


def stamp(checkpoint: dict[str, Any]) -> None:
    """Record the format number and the package version in a checkpoint being saved."""
    from . import __version__

    checkpoint["captioning_format"] = CHECKPOINT_FORMAT
    checkpoint["captioning_version"] = __version__


def check_format(checkpoint: Any, path: str | Path = "the checkpoint") -> None:
    """Raise ValueError (naming ``path``) unless ``checkpoint`` is a CaptioningModule checkpoint this
    version of the project reads: a dict with ``state_dict``, ``hyper_parameters`` (vocabulary included)
    and ``captioning_format == CHECKPOINT_FORMAT``."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or not hparams.get("vocab"):
        raise ValueError(
            f"{path} is not a checkpoint of a trained CaptioningModule: it lacks the state_dict or the "
            "hyperparameters with the encoder, decoder and vocabulary that train.py's checkpoints carry. Pass "
            "a .ckpt file written by train.py (its runs keep them under <run dir>/checkpoints/)."
        )
    found = checkpoint.get("captioning_format")
    if found != CHECKPOINT_FORMAT:
        written_by = checkpoint.get("captioning_version", "a version before checkpoints were stamped")
        raise ValueError(
            f"{path} was written by captioning {written_by} in checkpoint format {found}; this version reads "
            f"format {CHECKPOINT_FORMAT}. Use the version of the project that wrote it (pip install "
            f"captioning=={written_by} or its git tag) to evaluate it, or retrain with this version."
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` (memory-mapped: cheap to peek) and
    checked with :func:`check_format`. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} not found; pass the path of a .ckpt file written by train.py.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError... on files that are not checkpoints
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint ({type(error).__name__}: {error}). It is not a "
            "checkpoint or it is truncated; pass a .ckpt file written by train.py (its runs keep them under "
            "<run dir>/checkpoints/)."
        ) from error
    check_format(checkpoint, path)
    return checkpoint


# Kept from the first checkpoint by an average: what rebuilds the model and its data; the training state (optimizer,
# loops, callbacks) belongs to no averaged model, so the result evaluates and captions but does not resume.
_KEPT_BY_AVERAGE = ("epoch", "global_step", "pytorch-lightning_version", "hparams_name", "hyper_parameters",
                    "datamodule_hparams_name", "datamodule_hyper_parameters", "datamodule_target", "image_contract")


def average_checkpoints(paths: list[str | Path], target: str | Path) -> Path:
    """Write to ``target`` a checkpoint whose weights are the element-wise mean of the ``paths``' (Polyak
    averaging of checkpoints; integer buffers, e.g. BatchNorm's step count, are the first's). The model config,
    vocabulary, data config and image contract are the first's. Averaging helps checkpoints of one run (its last
    epochs share a basin); runs from different seeds do not average into a working model (ensemble them).

    Raises ValueError naming both files when two checkpoints differ in vocabulary or in their weights' names
    or shapes.
    """
    if len(paths) < 2:
        raise ValueError(f"average_checkpoints needs two or more checkpoints, got {len(paths)}.")
    first_path = Path(paths[0])
    first = read_checkpoint(first_path)
    weights = first["state_dict"]
    total = {k: v.double().clone() if v.is_floating_point() else v.clone() for k, v in weights.items()}
    for path in paths[1:]:
        other = read_checkpoint(path)
        if other["hyper_parameters"].get("vocab") != first["hyper_parameters"].get("vocab"):
            raise ValueError(f"Cannot average {path} with {first_path}: their vocabularies differ, so the same "
                             "weight rows mean different words. Average checkpoints of one run (or one data set).")
        theirs = other["state_dict"]
        unfit = sorted(set(weights) ^ set(theirs)) or [
            k for k in weights if tuple(weights[k].shape) != tuple(theirs[k].shape)]
        if unfit:
            raise ValueError(f"Cannot average {path} with {first_path}: their models differ ({len(unfit)} weights, "
                             f"e.g. {', '.join(unfit[:3])}). Average checkpoints of the same model config.")
        for k, v in theirs.items():
            if v.is_floating_point():
                total[k] += v.double()
    averaged = {k: (v / len(paths)).to(weights[k].dtype) if weights[k].is_floating_point() else v
                for k, v in total.items()}
    checkpoint = {k: first[k] for k in _KEPT_BY_AVERAGE if k in first}
    checkpoint["state_dict"] = averaged
    checkpoint["averaged_from"] = [str(Path(p).absolute()) for p in paths]
    stamp(checkpoint)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    return target


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``<dir>/.<name>.tmp-<pid>``, syncs it to disk and renames it over
    ``path`` (``os.replace``, atomic on POSIX and Windows): a crash or a full disk while saving leaves the
    previous checkpoint intact, never a truncated one. Remote paths (``s3://``...) use Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or ("://" in str(path) and not str(path).startswith("file://")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------------------------
# Interrupted runs
# ---------------------------------------------------------------------------------------------------------


class InterruptCheckpoint(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when training is interrupted or fails, and says how to resume.

    SIGTERM (a scheduler's pre-emption, ``kill``) or a first Ctrl+C (SIGINT) stops training after the current
    batch (a second Ctrl+C stops at once). The checkpoint then holds a consistent state (weights, optimizer,
    scheduler, loop counters, callbacks, random state) after the last completed batch. Any other exception
    during training (a non-finite loss, a crash in validation) saves it too, so the work up to the failure
    can be resumed after the fix. Nothing is saved before the first step.

    Under DDP every process must stop after the same batch, or the ones still training wait forever in the
    next gradient all-reduce. A signal may reach one process (``kill`` of rank 0, which forwards it to the
    processes it started) or all of them at different moments, so while fitting the handler here only
    notes the request; at the end of every training batch and validation the processes agree (one all-reduce
    of a flag: stop if any process was signalled) and all hand the stop to Lightning at the same point.
    Lightning's own handler is not used meanwhile: it runs a broadcast inside the signal handler, which
    pairs with whatever collective the other processes are in (Lightning #20806).

    Resume with ``ckpt_path=<the printed path>`` or ``ckpt_path=last`` (the newest of the task's
    ``last.ckpt`` and ``interrupted.ckpt``). The run continues exactly: the DataModule resumes the epoch's
    data order at the next batch, :class:`RandomState` the random generators.

    A plain callback, not a ``Checkpoint``: it must not count as the trainer's ``checkpoint_callback``.

    Args:
        dirpath: the run's checkpoint directory.
        filename: file name without ``.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        if not filename:
            raise ValueError("callbacks.interrupt_checkpoint.filename must not be empty.")
        self.dirpath, self.filename = str(dirpath), filename
        self.saved_path: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._launcher: Any = None
        self._watching = False  # our handlers are in place (the same on every process: it gates a collective)
        self._stop_requested = False  # this process was signalled

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    # Signals --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has installed its handlers (trainer._run); only the main thread may.
        if not _main_thread() or self._watching:
            return
        self._launcher = trainer.strategy.launcher
        self._watching, self._stop_requested = True, False
        for signum, handler in ((signal.SIGTERM, self._request_stop), (signal.SIGINT, self._on_sigint)):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if _main_thread() and signal.SIGINT in self._previous_handlers:
            signal.signal(signal.SIGINT, self._previous_handlers.pop(signal.SIGINT))
        _say("Ctrl+C: stopping after the current batch and saving a checkpoint (Ctrl+C again stops at once).")
        self._request_stop(signal.SIGTERM)

    def _request_stop(self, signum: int, frame: Any = None) -> None:
        # Nothing collective in a signal handler: it runs between any two bytecodes of the training step.
        if not self._stop_requested and self._launcher is not None:
            self._launcher.kill(signum)  # the processes this one started (Lightning's subprocess launcher)
        self._stop_requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._agree_to_stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._agree_to_stop(trainer)

    def _agree_to_stop(self, trainer: L.Trainer) -> None:
        if self._watching and trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False):
            # Lightning raises SIGTERMException at its next check, which every process now reaches together.
            trainer._signal_connector.received_sigterm = True

    def _restore_handlers(self) -> None:
        if _main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
        self._previous_handlers, self._launcher, self._watching = {}, None, False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # Saving ---------------------------------------------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        if isinstance(exception, KeyboardInterrupt) and self._stop_requested:
            return  # the second Ctrl+C: the user wants out now, possibly in the middle of a step
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as error:  # never hide the original failure behind a failed save
            rank_zero_warn(f"Could not save the interrupt checkpoint {self.ckpt_path}: {error}")
            return
        self.saved_path = self.ckpt_path
        why = "interrupted" if _is_interrupt(exception) else f"stopped by {type(exception).__name__}"
        _say(
            f"Training {why} at epoch {trainer.current_epoch}, global step {trainer.global_step}: checkpoint "
            f"saved to {self.ckpt_path}. Resume with the same options plus ckpt_path={self.ckpt_path} "
            "(or ckpt_path=last)."
        )


def _is_interrupt(exception: BaseException) -> bool:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(exception, SIGTERMException | KeyboardInterrupt)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Random state
# ---------------------------------------------------------------------------------------------------------


class RandomState(L.Callback):
    """The random generators (Python, NumPy, torch CPU and CUDA) in every checkpoint, restored on resume.

    Lightning restores weights, optimizer, scheduler and loop counters but not the generators, so a resumed
    run would draw different dropout masks (and, in the main process, augmentations and any sampler drawing
    from the global state) than an uninterrupted one. Lightning restores callbacks before the sanity check
    (which it runs in an isolated RNG scope) and before it creates the training iterator, so the next step
    draws from exactly the state the uninterrupted run had.
    States are plain lists and tensors: the checkpoint still loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": [version, list(mt), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "python" in state_dict:
            version, mt, gauss = state_dict["python"]
            random.setstate((version, tuple(mt), gauss))
        if "numpy" in state_dict:
            kind, keys, pos, has_gauss, cached = state_dict["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``monitor`` a metric or a list of them in order of preference: the
    first that validation logs is monitored (decided at the first save, kept in the checkpoint for a resume).

    Why: BLEU-4 on the built-in set moves by ±0.02 from epoch to epoch while the model still learns, so the best
    checkpoint by it was often a half-trained one (epoch 5 of 10: object precision 0.966 against 0.984 at the
    end); ``val/grounding/correct`` (captions with nothing false) picked the truest epoch in every run measured.
    Data without scenes does not log it, and falls back to the next metric of the list.
    """

    def __init__(self, monitor: str | list[str] | tuple[str, ...] | None = None, **kwargs: Any) -> None:
        monitors = [monitor] if monitor is None or isinstance(monitor, str) else [str(m) for m in monitor]
        if not monitors:
            raise ValueError("ModelCheckpoint: monitor is an empty list; give a metric name, a list of them, or "
                             "null (callbacks.model_checkpoint.monitor).")
        self.monitors = monitors
        self._monitor_resolved = len(monitors) == 1
        super().__init__(monitor=monitors[0], **kwargs)

    @property
    def state_key(self) -> str:
        # the whole list, not the metric chosen: the key must be the same before and after the choice for a
        # resumed run to find its state
        return self._generate_state_key(monitor=self.monitors, mode=self.mode,
                                        every_n_train_steps=self._every_n_train_steps,
                                        every_n_epochs=self._every_n_epochs,
                                        train_time_interval=self._train_time_interval)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self._monitor_resolved:
            logged = [m for m in self.monitors if m in monitor_candidates]
            if logged:
                self.monitor, self._monitor_resolved = logged[0], True
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"monitor_resolved": self._monitor_resolved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("monitor_resolved") and state_dict.get("monitor") in self.monitors:
            self.monitor, self._monitor_resolved = state_dict["monitor"], True
