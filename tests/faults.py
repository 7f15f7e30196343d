"""Faults injected into real runs by the tests: callbacks that src/train.py loads through Hydra
(``+callbacks.fault._target_=faults.NanImages`` with ``tests/`` on PYTHONPATH)."""

from __future__ import annotations

import lightning as L


class NanImages(L.Callback):
    """Turns the images of one training batch into NaNs, on one rank only: that rank's loss is NaN at
    ``step`` while the others' are finite."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch["images"].fill_(float("nan"))
