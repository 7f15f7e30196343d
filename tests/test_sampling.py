"""The resumable training order: the sampler, the position a checkpoint records, and in-process runs that
are interrupted mid-epoch and resumed (the subprocess version is in test_reliability.py)."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_SHAPES
from torch.utils.data import DistributedSampler

from captioning.checkpointing import AtomicCheckpointIO, InterruptCheckpoint, RandomState
from captioning.data.sampling import ResumableSampler, TrainingPosition
from captioning.data.shapes import ShapesDataModule
from captioning.module import CaptioningModule

# 20 images x 5 captions = 100 pairs; batch 8 -> 13 batches an epoch, the last one of 4 pairs
BATCH_SIZE, STEPS_PER_EPOCH = 8, 13


# ---------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_the_order_is_distributed_samplers_for_every_rank_and_epoch(replicas):
    data = range(50)
    for epoch in range(3):
        shards = []
        for rank in range(replicas):
            ours = ResumableSampler(data, num_replicas=replicas, rank=rank, seed=7)
            ours.set_epoch(epoch)
            reference = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=True, seed=7)
            reference.set_epoch(epoch)
            shards.append(list(ours))
            assert shards[-1] == list(reference) and len(ours) == len(reference)
        assert set().union(*shards) == set(data)  # every sample, every epoch
    first, second = ResumableSampler(data, seed=7), ResumableSampler(data, seed=7, epoch=1)
    assert list(first) != list(second) and sorted(first) == sorted(second)
    assert list(ResumableSampler(data, seed=8)) != list(first)


def test_resume_skips_the_start_of_one_iteration_of_its_epoch_only():
    data = range(30)
    whole = list(ResumableSampler(data, seed=3, epoch=2))
    sampler = ResumableSampler(data, seed=3)
    sampler.resume(epoch=2, skip=12)
    assert sampler.epoch == 2 and len(sampler) == 30  # the loader keeps reporting the whole epoch
    assert list(sampler) == whole[12:]
    assert list(sampler) == whole  # the next pass over the same epoch is whole again

    sampler.resume(epoch=2, skip=12)
    sampler.set_epoch(3)  # Lightning moved on to another epoch before iterating: the skip must not apply
    assert list(sampler) == list(ResumableSampler(data, seed=3, epoch=3))
    with pytest.raises(ValueError, match="skip"):
        sampler.resume(epoch=0, skip=-1)


def test_two_ranks_resumed_at_a_batch_continue_each_shard():
    data, batch = range(40), 4
    for rank in range(2):
        whole = list(ResumableSampler(data, num_replicas=2, rank=rank, seed=1, epoch=1))
        resumed = ResumableSampler(data, num_replicas=2, rank=rank, seed=1)
        resumed.resume(epoch=1, skip=3 * batch)
        assert list(resumed) == whole[3 * batch:]


def test_the_position_is_plain_and_round_trips():
    position = TrainingPosition(epoch=2, batch=5, batch_size=8, world_size=1)
    state = position.state_dict()
    assert state == {"epoch": 2, "batch": 5, "batch_size": 8, "world_size": 1}
    assert TrainingPosition.from_state_dict(state) == position


# ---------------------------------------------------------------------------------------------------------
# Real fits on the tiny shapes set
# ---------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """Losses by global step; optionally SIGTERMs this process after step ``stop_at`` (Lightning then stops
    after the batch and InterruptCheckpoint saves, as for a scheduler's pre-emption)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.positions: list[tuple[str, int, dict]] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.positions.append(("batch_end", trainer.global_step, trainer.datamodule.state_dict()))
        if trainer.global_step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.positions.append(("validation_end", trainer.global_step, trainer.datamodule.state_dict()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.positions.append(("epoch_end", trainer.global_step, trainer.datamodule.state_dict()))


def datamodule(root: Path, **kwargs) -> ShapesDataModule:
    args = {**TINY_SHAPES, "root": str(root), "batch_size": BATCH_SIZE, "num_workers": 0, "progress": False,
            "persistent_workers": False, **kwargs}
    return ShapesDataModule(**args)


def module() -> CaptioningModule:
    return CaptioningModule(
        encoder={"_target_": "captioning.models.encoder.SmallCNN", "out_dim": 16, "channels": [4, 8]},
        decoder={"_target_": "captioning.models.CaptioningRNN", "cell_type": "lstm", "wordvec_dim": 8,
                 "hidden_dim": 16, "dropout": 0.3},  # dropout: the random state must carry over too
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
    )


def fit(root, checkpoints, epochs=2, stop_at=None, ckpt_path=None, validate=False, extra_callbacks=(),
        **data_kwargs) -> Recorder:
    L.seed_everything(0, workers=True)
    recorder = Recorder(stop_at)
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=bool(extra_callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1 if validate else 0,
        callbacks=[recorder, InterruptCheckpoint(str(checkpoints)), RandomState(), *extra_callbacks],
        plugins=[AtomicCheckpointIO()], default_root_dir=checkpoints,
    )
    try:
        trainer.fit(module(), datamodule(root, **data_kwargs), ckpt_path=ckpt_path)
    except BaseException as error:  # SIGTERMException: the interrupted run
        if stop_at is None or type(error).__name__ != "SIGTERMException":
            raise
    return recorder


@pytest.fixture(scope="module")
def straight(tiny_shapes_root, tmp_path_factory):
    """The uninterrupted 2-epoch run's losses by step."""
    return fit(tiny_shapes_root, tmp_path_factory.mktemp("straight")).losses


@pytest.mark.parametrize("stop_at", [5, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 7],
                         ids=["mid-epoch-0", "last-batch-of-epoch-0", "mid-epoch-1"])
def test_a_run_sigtermed_anywhere_resumes_into_the_uninterrupted_loss_curve(tiny_shapes_root, tmp_path, straight,
                                                                            stop_at):
    assert sorted(straight) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    first = fit(tiny_shapes_root, tmp_path, stop_at=stop_at)
    assert sorted(first.losses) == list(range(1, stop_at + 1))
    checkpoint = torch.load(tmp_path / "interrupted.ckpt", weights_only=True)
    epoch, batch = divmod(stop_at, STEPS_PER_EPOCH)
    assert checkpoint["ShapesDataModule"]["train_position"] == {
        "epoch": epoch, "batch": batch, "batch_size": BATCH_SIZE, "world_size": 1}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = fit(tiny_shapes_root, tmp_path / "resumed", ckpt_path=tmp_path / "interrupted.ckpt")
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]
    assert min(second.losses) == stop_at + 1
    assert {**first.losses, **second.losses} == pytest.approx(straight, rel=1e-6, abs=0)


def test_without_the_recorded_position_the_resumed_curve_differs(tiny_shapes_root, tmp_path, straight):
    # The same checkpoint less the DataModule's position: Lightning replays a fresh order for the rest of
    # the epoch, which is what the exact comparison above would catch.
    fit(tiny_shapes_root, tmp_path, stop_at=5)
    checkpoint = torch.load(tmp_path / "interrupted.ckpt", weights_only=True)
    del checkpoint["ShapesDataModule"]
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    second = fit(tiny_shapes_root, tmp_path / "resumed", ckpt_path=tmp_path / "stripped.ckpt")
    assert second.losses[6] != pytest.approx(straight[6], rel=1e-6)


def test_a_step_checkpoint_written_at_batch_end_resumes_exactly(tiny_shapes_root, tmp_path, straight):
    # ModelCheckpoint(every_n_train_steps) saves inside on_train_batch_end, before Lightning counts the
    # batch as completed: the position must still point after it.
    from lightning.pytorch.callbacks import ModelCheckpoint

    steps = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    fit(tiny_shapes_root, tmp_path, epochs=1, extra_callbacks=[steps])
    checkpoint = torch.load(tmp_path / "step=8.ckpt", weights_only=True)
    assert checkpoint["ShapesDataModule"]["train_position"]["batch"] == 8
    second = fit(tiny_shapes_root, tmp_path / "resumed", ckpt_path=tmp_path / "step=8.ckpt")
    assert min(second.losses) == 9
    assert second.losses == pytest.approx({s: straight[s] for s in range(9, 2 * STEPS_PER_EPOCH + 1)}, rel=1e-6)


def test_positions_at_batch_validation_and_epoch_ends(tiny_shapes_root, tmp_path):
    recorder = fit(tiny_shapes_root, tmp_path, epochs=2, validate=True)
    by_hook = {(hook, step): state["train_position"] for hook, step, state in recorder.positions}
    assert by_hook["batch_end", 3] == {"epoch": 0, "batch": 3, "batch_size": BATCH_SIZE, "world_size": 1}
    # after an epoch's last batch, every checkpoint points at the start of the next epoch
    for hook in ("batch_end", "validation_end", "epoch_end"):
        assert by_hook[hook, STEPS_PER_EPOCH] == {"epoch": 1, "batch": 0, "batch_size": BATCH_SIZE, "world_size": 1}
        assert by_hook[hook, 2 * STEPS_PER_EPOCH]["epoch"] == 2
    assert datamodule(tiny_shapes_root).state_dict() == {}  # not fitting: nothing to record


def test_resuming_with_another_batch_size_warns_and_restarts_the_epoch_order(tiny_shapes_root, tmp_path):
    fit(tiny_shapes_root, tmp_path, stop_at=5)
    with pytest.warns(UserWarning, match=r"data.batch_size=8 on 1 process\(es\) and this run uses 4"):
        second = fit(tiny_shapes_root, tmp_path / "resumed", ckpt_path=tmp_path / "interrupted.ckpt", batch_size=4)
    assert min(second.losses) == 6  # the step count carries on; only the order restarted
