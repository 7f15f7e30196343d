"""Learning-rate schedules stepped every optimizer step, sized by the run they are in.

:class:`OneCycleLR` is torch's one-cycle policy (Smith & Topin 2019: a short warm-up to ``max_lr``, a cosine down to
``max_lr / (div_factor * final_div_factor)``, Adam's beta1 cycled the other way) with two conveniences for configs
that cannot know the run's length: ``total_steps`` and ``max_lr`` may be left out, and
:class:`~captioning.module.CaptioningModule` fills them in (the trainer's ``estimated_stepping_batches``; each
parameter group's own learning rate, so ``module.encoder_lr`` keeps its ratio to ``optimizer.lr``). Past its last
step it holds the final rate instead of raising, so a run resumed with more epochs goes on at that rate (and
:meth:`CaptioningModule.on_train_start` warns that it does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["OneCycleLR", "fill_run_arguments"]


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """``torch.optim.lr_scheduler.OneCycleLR`` that stays at its final rate after ``total_steps`` (see the module
    docstring); same arguments, same schedule up to there."""

    def get_lr(self) -> list[float]:
        # a phase of no length (pct_start * total_steps == 1: a 10-step run) divides by zero in torch's: give it one
        start = 0.0
        for phase in self._schedule_phases:
            phase["end_step"] = max(phase["end_step"], start + 1.0)
            start = phase["end_step"]
        # torch's cycle ends at step total_steps - 1; one step later its cosine already turns up again, and after
        # that it raises
        step, last = self.last_epoch, self.total_steps - 1
        if step <= last:
            return super().get_lr()
        self.last_epoch = last
        try:
            return super().get_lr()
        finally:
            self.last_epoch = step


def fill_run_arguments(factory: Callable[..., Any], optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """``factory(optimizer)`` (a partial scheduler from the config), with ``total_steps`` and ``max_lr`` given where
    the scheduler takes them and the config left them out: the run's optimizer steps and each group's rate."""
    target = getattr(factory, "func", factory)
    given = getattr(factory, "keywords", {}) or {}
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return factory(optimizer)
    extra: dict[str, Any] = {}
    if "total_steps" in parameters and given.get("total_steps") is None and given.get("epochs") is None:
        if total_steps is None or total_steps <= 0 or total_steps == float("inf"):
            raise ValueError(
                f"The learning-rate schedule {target.__name__} needs the run's number of optimizer steps, and the "
                f"trainer cannot tell it ({total_steps}); set trainer.max_epochs or trainer.max_steps, or give "
                "scheduler.total_steps.")
        extra["total_steps"] = int(total_steps)
    if "max_lr" in parameters and given.get("max_lr") is None:
        extra["max_lr"] = [group["lr"] for group in optimizer.param_groups]
    return factory(optimizer, **extra)
