"""A shuffled training order that a run resumed in the middle of an epoch continues exactly.

``torch.utils.data.RandomSampler`` draws each epoch's order from the global random state when the epoch's
iterator is created; a run restored from a mid-epoch checkpoint cannot recreate the rest of that order
(Lightning warns "your dataloader is not resumable" and replays a fresh order for the remaining batches).
:class:`ResumableSampler` makes the order a function of ``(seed, epoch)`` — the permutation of
``DistributedSampler``, so one process and each DDP rank shuffle exactly as Lightning's own injected
sampler would — and can start part-way through an epoch's shard. The DataModule records where training
stands in every checkpoint (:func:`training_position`) and hands it back to the sampler on resume.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sized
from dataclasses import asdict, dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler", "TrainingPosition", "training_position", "training_sampler"]


@dataclass(frozen=True)
class TrainingPosition:
    """Where the next training batch comes from: batch ``batch`` (0-based) of epoch ``epoch``, for a run
    with ``batch_size`` samples per batch on ``world_size`` processes (the shard layout depends on both)."""

    epoch: int
    batch: int
    batch_size: int
    world_size: int

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainingPosition:
        return cls(**{key: int(state[key]) for key in ("epoch", "batch", "batch_size", "world_size")})


def training_position(trainer: Any, batch_size: int) -> TrainingPosition | None:
    """The position after the last batch ``trainer`` trained on; None outside ``fit``.

    Counts batches that went through ``training_step`` (``processed``), not batches the DataLoader has
    already produced: workers fetch ahead, and those batches were never trained on. Once an epoch's batches
    are all done (a checkpoint at validation, at epoch end or after a SIGTERM there) it points at the start
    of the next epoch, which Lightning has counted as ``started`` from then on.
    """
    from lightning.pytorch.trainer.states import TrainerFn

    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    batch = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batch < trainer.num_training_batches:
        epoch = trainer.current_epoch
    else:
        epoch, batch = trainer.fit_loop.epoch_progress.current.started, 0
    return TrainingPosition(epoch=epoch, batch=batch, batch_size=batch_size, world_size=trainer.world_size)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, one shard per rank) that can start mid-epoch.

    Being a ``DistributedSampler``, Lightning leaves it in place under DDP instead of wrapping it, and
    calls :meth:`set_epoch` before every epoch. :meth:`resume` makes the next iteration of an epoch skip
    the start of this rank's shard (the batches already trained on); later iterations are whole again.

    Args:
        dataset: the sized dataset to draw indices from.
        num_replicas, rank: processes and this one's rank (1 and 0 without DDP).
        seed: the shuffle's seed; the same on every rank.
        shuffle: a fresh permutation every epoch (``seed + epoch``), or the dataset's order.
        epoch: the first epoch this sampler serves (a resumed run's), so the first iterator is right even
            when it is created before Lightning calls :meth:`set_epoch`.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, epoch: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.epoch = epoch
        self._resume: tuple[int, int] | None = None  # (epoch, indices of this shard to skip)

    def resume(self, epoch: int, skip: int) -> None:
        """Start the next iteration of ``epoch`` at index ``skip`` of this rank's shard."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}.")
        self.epoch = epoch
        self._resume = (epoch, skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            indices = indices[resume[1]:]
        return iter(indices)

    # __len__ stays the whole shard: Lightning counts a resumed epoch's batches from where it stopped, so
    # the loader must report the epoch's full length while yielding only the rest.


def training_sampler(dataset: Sized, trainer: Any, batch_size: int,
                     position: TrainingPosition | None = None) -> ResumableSampler:
    """This process's shuffled training order for the trainer's current epoch, continued at ``position``
    (a resumed checkpoint's) when it was written with the same batch size and number of processes.

    The seed is Lightning's convention for the samplers it injects: the ``seed_everything`` seed, else 0,
    so every rank agrees.
    """
    world_size, rank, epoch = ((trainer.world_size, trainer.global_rank, trainer.current_epoch)
                               if trainer is not None else (1, 0, 0))
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, epoch=epoch)
    if position is None:
        return sampler
    if (position.batch_size, position.world_size) == (batch_size, world_size):
        sampler.resume(position.epoch, position.batch * batch_size)
        if position.batch:
            rank_zero_info(f"Resuming the data order of epoch {position.epoch} at batch {position.batch}.")
    else:
        warnings.warn(
            f"The checkpoint was written with data.batch_size={position.batch_size} on {position.world_size} "
            f"process(es) and this run uses {batch_size} on {world_size}: the rest of epoch {position.epoch} "
            "cannot continue the interrupted order, so its remaining batches restart that epoch's order from the "
            "beginning. Resume with the same batch size and number of devices to continue exactly.",
            UserWarning, stacklevel=3)
        sampler.set_epoch(position.epoch)
    return sampler
