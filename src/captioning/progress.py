"""Progress that reads well in a terminal and in a log file.

Lightning's rich progress bar redraws one line in place; with stdout redirected (SLURM, CI, ``| tee``) it
writes nothing until an epoch ends, so a COCO epoch under SLURM is an hour of silence. :func:`progress_bar`
keeps the rich bar in a terminal and otherwise uses :class:`LogProgressBar`, which prints a plain line every
``every_n_steps`` batches or ``every_seconds`` seconds, whichever comes first::

    epoch 3/10  step 120/313 (38%)  train/loss 24.12  412 images/s  epoch ETA 0:00:28  fit ETA 0:05:02

The same lines go to the run's log file (Hydra's ``train.log``) in both cases, which is what people open on a
cluster: :func:`to_log_file` writes to the root logger's file handlers without echoing on the console.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

__all__ = ["LogProgressBar", "RichProgressBarWithLog", "progress_bar", "to_log_file"]


def to_log_file(text: str, name: str = "captioning") -> None:
    """Write ``text`` to the log files of the root logger (Hydra's ``<task>.log`` in the run directory) as an INFO
    record, without printing it on the console; nothing when no file is configured (a plain ``python -c``)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        return
    record = logging.LogRecord(name, logging.INFO, __file__, 0, text.rstrip("\n"), None, None)
    for handler in handlers:
        handler.handle(record)


def progress_bar(every_n_steps: int = 50, every_seconds: float = 30.0, stream: TextIO | None = None,
                 **rich_kwargs: Any) -> ProgressBar:
    """Lightning's rich bar when ``stream`` (stdout) is a terminal, else a :class:`LogProgressBar`; the plain lines
    go to the run's log file either way."""
    stream = stream if stream is not None else sys.stdout
    if getattr(stream, "isatty", lambda: False)():
        return RichProgressBarWithLog(LogProgressBar(every_n_steps, every_seconds, stream, console=False),
                                      **rich_kwargs)
    return LogProgressBar(every_n_steps, every_seconds, stream)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class LogProgressBar(ProgressBar):
    """Plain progress lines for logs: epoch, step/total, the progress-bar metrics, images/s and ETAs.

    A line every ``every_n_steps`` training batches or ``every_seconds`` seconds (whichever comes first),
    one when each epoch's training ends, one per validation (its metrics) and per test. Rank 0 only.

    Args:
        every_n_steps: at most this many batches between lines (0: no step limit).
        every_seconds: at most this many seconds between lines (0: no time limit).
        stream: where lines go (stdout).
        console: print them on ``stream`` (False: only to the run's log file, beside a rich bar).
    """

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 30.0, stream: TextIO | None = None,
                 console: bool = True) -> None:
        super().__init__()
        if every_n_steps < 0 or every_seconds < 0 or (every_n_steps == 0 and every_seconds == 0):
            raise ValueError(f"LogProgressBar: every_n_steps ({every_n_steps}) and every_seconds ({every_seconds}) "
                             "must be >= 0 and not both 0.")
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self.stream, self.console = stream, console
        self._enabled = True
        self._epoch_start = self._last_line = self._fit_start = 0.0
        self._last_batch = 0
        self._images = 0
        self._steps_done = 0  # batches trained in this process (for the fit ETA)

    # Lightning's ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    def _write(self, trainer: L.Trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            if self.console:
                self.print(text)
            to_log_file(text)

    # -------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_line = time.perf_counter()
        self._last_batch, self._images = 0, 0
        # Lightning's total shrinks with every step of a max_steps run (the steps left): fixed per epoch here
        self._epoch_total = self.total_train_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps_done += 1
        if isinstance(batch, dict) and "captions" in batch:
            self._images += len(batch["captions"])
        now, done = time.perf_counter(), batch_idx + 1
        due = (self.every_n_steps and done - self._last_batch >= self.every_n_steps) or (
            self.every_seconds and now - self._last_line >= self.every_seconds)
        if due:
            self._line(trainer, pl_module, done, now)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line(trainer, pl_module, self._last_batch_total(trainer), time.perf_counter(), end=True)

    def _last_batch_total(self, trainer: L.Trainer) -> int:
        total = self._epoch_total
        return int(total) if math.isfinite(total) else self._last_batch

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, done: int, now: float,
              end: bool = False) -> None:
        total = self._epoch_total
        elapsed = max(now - self._epoch_start, 1e-9)
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}"]
        if math.isfinite(total) and total:
            parts.append(f"step {done}/{int(total)} ({done / total:.0%})")
        else:
            parts.append(f"step {done}")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        if self._images:
            parts.append(f"{self._images / elapsed:.0f} images/s")
        per_batch = elapsed / max(done, 1)
        fit_left = self._fit_batches_left(trainer, done)
        epoch_eta = None
        if math.isfinite(total) and not end:
            # a fit that stops mid-epoch (max_steps) ends this epoch early too
            epoch_eta = (total - done if fit_left is None else min(total - done, fit_left)) * per_batch
            parts.append(f"epoch ETA {_duration(epoch_eta)}")
        if fit_left is not None:
            # the whole fit's rate includes validation; the rest of the fit is never shorter than the epoch's rest
            fit_eta = fit_left * (now - self._fit_start) / max(self._steps_done, 1)
            parts.append(f"fit ETA {_duration(max(fit_eta, epoch_eta or 0.0))}")
        if end:
            parts.append(f"epoch done in {_duration(elapsed)}")
        self._write(trainer, "  ".join(parts))
        self._last_batch, self._last_line = done, now

    def _fit_batches_left(self, trainer: L.Trainer, done: int) -> float | None:
        """Training batches left in the whole fit after ``done`` of this epoch (None when unbounded or unknown)."""
        per_epoch = trainer.num_training_batches
        left = []
        if trainer.max_steps and trainer.max_steps > 0:
            left.append((trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches)
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(per_epoch):
            left.append((trainer.max_epochs - trainer.current_epoch) * per_epoch - done)
        return float(max(min(left), 0)) if left else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        self._write(trainer, f"validation after epoch {trainer.current_epoch + 1}: {shown}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        self._write(trainer, "test: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))


class RichProgressBarWithLog(RichProgressBar):
    """Lightning's rich bar in the terminal, with ``lines`` (a :class:`LogProgressBar` with ``console=False``)
    writing the plain progress lines to the run's log file beside it: every hook the lines need is called on
    both (``FORWARDED``)."""

    FORWARDED = ("setup", "on_train_start", "on_train_epoch_start", "on_train_batch_end", "on_train_epoch_end",
                 "on_validation_end", "on_test_end")

    def __init__(self, lines: LogProgressBar, **rich_kwargs: Any) -> None:
        super().__init__(**rich_kwargs)
        self.lines = lines


def _to_both(hook: str) -> Any:
    def forwarded(self: RichProgressBarWithLog, *args: Any, **kwargs: Any) -> None:
        getattr(RichProgressBar, hook)(self, *args, **kwargs)
        getattr(self.lines, hook)(*args, **kwargs)

    forwarded.__name__ = hook
    return forwarded


for _hook in RichProgressBarWithLog.FORWARDED:
    setattr(RichProgressBarWithLog, _hook, _to_both(_hook))
