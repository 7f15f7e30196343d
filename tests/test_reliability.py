"""Reliability: interrupted and resumed runs, non-finite losses, atomic and checked checkpoints, config errors
through the entry point, a logging backend that fails."""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from torch.utils.data import DataLoader, Dataset

from captioning.checkpointing import (
    CHECKPOINT_FORMAT,
    AtomicCheckpointIO,
    InterruptCheckpoint,
    RandomState,
    check_format,
    read_checkpoint,
)
from captioning.module import CaptioningModule, NonFiniteLossError, load_checkpoint
from captioning.utils import explain_errors, resolve_ckpt_path

from entrypoints import run_dirs, signal_after_steps, tiny, train, train_losses

VOCAB = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "red", "blue", "circle", "square"]


# ---------------------------------------------------------------------------------------------------------
# In-process pieces: a tiny module on random tensors (no data set, no Hydra)
# ---------------------------------------------------------------------------------------------------------


def make_module(vocab=VOCAB, cell_type="lstm", lr=1e-3, dropout=0.0, image_input=False, **kwargs) -> CaptioningModule:
    return CaptioningModule(
        encoder={"_target_": "captioning.models.encoder.SmallCNN", "out_dim": 16, "channels": [4, 8]},
        decoder={"_target_": "captioning.models.CaptioningRNN", "cell_type": cell_type, "wordvec_dim": 8,
                 "hidden_dim": 16, "dropout": dropout, "image_input": image_input},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr},
        vocab=vocab, **kwargs,
    )


class RandomCaptions(Dataset):
    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=generator)
        self.captions = torch.randint(4, len(VOCAB), (n, 6), generator=generator)
        self.captions[:, 0], self.captions[:, -1] = 1, 2

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "captions": self.captions[i]}


def fit(module, tmp_path, callbacks=(), logger=False, epochs=1) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs, limit_val_batches=0, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
        default_root_dir=tmp_path, log_every_n_steps=1, plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, DataLoader(RandomCaptions(), batch_size=8))
    return trainer


def test_nonfinite_loss_stops_with_the_step_and_saves_a_finite_checkpoint(tmp_path, capsys):
    # lr 1e30: the first update blows the weights up, the second step's loss is not finite
    module = make_module(lr=1e30)
    interrupt = InterruptCheckpoint(str(tmp_path / "checkpoints"))
    with pytest.raises(NonFiniteLossError, match=r"global step 1 \(epoch 0, batch 1\)") as error:
        fit(module, tmp_path, callbacks=[interrupt])
    assert "optimizer.lr" in str(error.value) and "gradient_clip_val" in str(error.value)
    assert "nonfinite_loss=skip" in str(error.value)
    # The failure saved the state before the bad step: resumable after lowering the lr.
    saved = torch.load(interrupt.ckpt_path, weights_only=True)
    assert saved["global_step"] == 1
    # weights and BatchNorm statistics both as they were before the bad batch's forward
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert int(saved["state_dict"]["encoder.blocks.0.1.num_batches_tracked"]) == 1
    assert "stopped by NonFiniteLossError at epoch 0, global step 1" in capsys.readouterr().err


def test_nonfinite_loss_skip_counts_and_never_updates_on_nan(tmp_path):
    module = make_module(lr=1e30, nonfinite_loss="skip")
    with pytest.warns(UserWarning, match="step skipped"):
        trainer = fit(module, tmp_path)
    # step 0 updates (to huge weights); every later loss is non-finite and its update skipped
    assert module.nonfinite_steps == 3 and trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 3
    with pytest.raises(ValueError, match="module.nonfinite_loss='ignore' is not one of fail, skip"):
        make_module(nonfinite_loss="ignore")


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tmp_path):
    from faults import NanImages

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.before = copy.deepcopy((pl_module.state_dict(), trainer.optimizers[0].state_dict()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                self.after = copy.deepcopy((pl_module.state_dict(), trainer.optimizers[0].state_dict()))

    module = make_module(nonfinite_loss="skip")
    module.hparams.optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 0.1}
    snapshot = Snapshot()
    with pytest.warns(UserWarning, match=r"Non-finite training loss \(nan\) at global step 2"):
        trainer = fit(module, tmp_path, callbacks=[NanImages(step=2), snapshot])
    (weights, optimizer), (weights_after, optimizer_after) = snapshot.before, snapshot.after
    assert all(torch.equal(weights[k], weights_after[k]) for k in weights)
    for state, state_after in zip(optimizer["state"].values(), optimizer_after["state"].values(), strict=True):
        assert all(torch.equal(state[k], state_after[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        assert int(state_after["step"]) == 2
    assert module.nonfinite_steps == 1 and trainer.global_step == 4  # the other steps did update
    assert not all(torch.equal(weights[k], v) for k, v in module.state_dict().items())


def test_wandb_without_a_network_keeps_training(tmp_path, monkeypatch):
    # No API key and an unreachable server: mode=auto goes offline, which never touches the network.
    from captioning.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = WandbLogger(mode="auto", save_dir=str(tmp_path))
    assert logger.mode == "offline"
    trainer = fit(make_module(), tmp_path, logger=logger)
    logger.finish()
    assert trainer.global_step == 4 and list((tmp_path / "wandb").glob("offline-run-*"))


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    state = RandomState().state_dict()
    expected = torch.rand(3)
    torch.save({"state": state}, tmp_path / "rng.pt")
    torch.manual_seed(99)
    RandomState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True)["state"])
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------


def test_atomic_save_keeps_the_old_checkpoint_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.ones(3)}, path)
    real_save = torch.save

    def crash_mid_write(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"weights": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"weights": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.zeros(3))


def saved_checkpoint(tmp_path, module=None) -> Path:
    trainer = fit(module or make_module(), tmp_path)
    path = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_checkpoints_are_stamped_plain_and_checked(tmp_path):
    path = saved_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["captioning_format"] == CHECKPOINT_FORMAT
    module, _ = load_checkpoint(path)
    assert module.vocab.idx_to_word == VOCAB and module.hparams.vocab == VOCAB

    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_bytes(b"\x89PNG not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.ckpt could not be read as a PyTorch checkpoint"):
        load_checkpoint(not_a_checkpoint)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "epoch": 1}, other)
    with pytest.raises(ValueError, match=r"other.ckpt is not a checkpoint of a trained CaptioningModule"):
        read_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="missing.ckpt not found"):
        read_checkpoint(tmp_path / "missing.ckpt")

    old = tmp_path / "old.ckpt"
    del checkpoint["captioning_format"], checkpoint["captioning_version"]
    torch.save(checkpoint, old)
    with pytest.raises(ValueError, match=r"old.ckpt was written by captioning a version before .* format None; "
                                         rf"this version reads format {CHECKPOINT_FORMAT}"):
        load_checkpoint(old)
    with pytest.raises(ValueError, match="retrain with this version"):
        check_format(checkpoint)


def test_resuming_a_checkpoint_of_another_model_or_vocabulary_is_a_clear_error(tmp_path):
    path = saved_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"model.cell_type \(checkpoint: 'lstm', config: 'attention'\)"):
        make_module(cell_type="attention").on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"model.image_input \(checkpoint: False, config: True\)"):
        make_module(image_input=True).on_load_checkpoint(checkpoint)  # another input size for the core
    make_module(dropout=0.3).on_load_checkpoint(checkpoint)  # what does not shape the weights may change
    with pytest.raises(ValueError, match=r"vocabulary \(9 words\) differs from the data's \(10 words\)"):
        make_module(vocab=[*VOCAB, "green"]).on_load_checkpoint(checkpoint)
    # through the Trainer, before any weight is touched
    with pytest.raises(ValueError, match="model.cell_type"):
        L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, limit_val_batches=0).fit(
            make_module(cell_type="rnn"), DataLoader(RandomCaptions(), batch_size=8), ckpt_path=path)


def test_ckpt_path_last_picks_the_newest_of_last_and_interrupted(tmp_path):
    path = saved_checkpoint(tmp_path)
    runs = tmp_path / "outputs" / "train" / "runs"
    older, newer = runs / "a" / "checkpoints" / "last.ckpt", runs / "b" / "checkpoints" / "interrupted.ckpt"
    for target in (older, newer):
        target.parent.mkdir(parents=True)
        target.write_bytes(path.read_bytes())
    os.utime(older, (time.time() - 60, time.time() - 60))
    assert resolve_ckpt_path("last", tmp_path / "outputs", "train") == str(newer)
    newer.write_bytes(b"truncated")
    os.utime(newer, (time.time() - 120, time.time() - 120))
    assert resolve_ckpt_path("last", tmp_path / "outputs", "train") == str(older)
    with pytest.raises(ValueError, match="interrupted.ckpt could not be read"):
        resolve_ckpt_path(str(newer), tmp_path / "outputs", "train")
    with pytest.raises(FileNotFoundError, match="no last.ckpt or interrupted.ckpt under"):
        resolve_ckpt_path("last", tmp_path / "outputs", "eval")


# ---------------------------------------------------------------------------------------------------------
# Errors through the entry point
# ---------------------------------------------------------------------------------------------------------


def test_explain_errors_prints_the_innermost_cause_with_its_key(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def task(cfg):
        inner = InstantiationException("Error in call to target 'captioning.models.decoding.CaptionDecoder':\n"
                                       "ValueError('...')")
        inner.__cause__ = ValueError("decoding.beam_size=0 is out of range: beam_size must be >= 1.")
        outer = InstantiationException("Error in call to target 'captioning.module.CaptioningModule':\n"
                                       "InstantiationException(...)\nfull_key: module")
        raise outer from inner

    with pytest.raises(SystemExit) as exit_:
        explain_errors(task)(None)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Invalid value in config key module (captioning.models.decoding.CaptionDecoder): "
                          "ValueError: decoding.beam_size=0 is out of range")
    assert "Traceback" not in err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(InstantiationException):
        explain_errors(task)(None)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.cell_type=gru", "Unknown cell_type 'gru'; choose one of rnn, lstm, attention (model.cell_type)"),
        ("decoding=beam decoding.beam_size=0", "config key module (captioning.models.decoding.CaptionDecoder): ValueError: "
                                 "decoding.beam_size=0 is out of range"),
        # each costs a subprocess (~7 s of CPU): the rest run with -m slow
        pytest.param("model.hidden_dim=-1", "hidden_dim must be a positive integer, got -1", marks=pytest.mark.slow),
        pytest.param("data=nope", "Could not find 'data/nope'", marks=pytest.mark.slow),
        pytest.param("model.no_such_key=1", "Key 'no_such_key' is not in struct", marks=pytest.mark.slow),
        pytest.param("module.nonfinite_loss=maybe", "module.nonfinite_loss='maybe' is not one of fail, skip",
                     marks=pytest.mark.slow),
    ],
)
def test_config_errors_through_the_entry_point(tmp_path, override, expected):
    proc = train(tiny(tmp_path, "debug=fdr", *override.split()), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert expected in output, output[-3000:]
    assert "Traceback" not in output
    if override == "data=nope":
        assert all(choice in output for choice in ("coco", "shapes"))  # Hydra lists the options


# ---------------------------------------------------------------------------------------------------------
# Interrupted runs (subprocesses)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_saves_a_checkpoint_and_ckpt_path_last_resumes_it(tmp_path, signum):
    # 64 images x 5 captions / batch 4 = 80 steps an epoch; stop after a few
    options = tiny(tmp_path, "data.batch_size=4", "trainer.max_epochs=1", "test=false",
                   "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1")
    stdout, stderr = signal_after_steps(options, tmp_path, signum)  # SIGINT = Ctrl+C: stops like SIGTERM
    if signum == signal.SIGINT:
        assert "Ctrl+C: stopping after the current batch" in stderr
    (first,) = run_dirs(tmp_path)
    interrupted = first / "checkpoints" / "interrupted.ckpt"
    assert f"checkpoint saved to {interrupted}" in stderr and "ckpt_path=last" in stderr
    checkpoint = torch.load(interrupted, weights_only=True)
    step = checkpoint["global_step"]
    assert 5 <= step < 80 and checkpoint["epoch"] == 0
    assert checkpoint["optimizer_states"][0]["state"]  # Adam's moments travel with it

    proc = train([*options, "ckpt_path=last"])
    assert f"Checkpoint {interrupted}: epoch 0, global step {step}" in proc.stdout + proc.stderr
    second = next(d for d in run_dirs(tmp_path) if d != first)
    resumed = train_losses(second)
    assert min(resumed) == step  # continues at the restored step, not from 0
    final = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 80 and final["epoch"] == 0


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    # 320 pairs / batch 4 = 80 steps an epoch, 2 epochs; two DataLoader workers, dropout and validation as usual
    options = [o for o in tiny(tmp_path, "data.batch_size=4") if not o.startswith("data.num_workers=")]
    options += ["data.num_workers=2", "trainer.max_epochs=2", "test=false", "trainer.log_every_n_steps=1",
                "+logger.csv.flush_logs_every_n_steps=1", "callbacks.report=null"]
    straight = [o.replace(f"paths.root_dir={tmp_path}", f"paths.root_dir={tmp_path / 'straight'}") for o in options]
    train(straight)
    expected = train_losses(run_dirs(tmp_path / "straight")[0])
    assert sorted(expected) == list(range(160))

    signal_after_steps(options, tmp_path, signal.SIGTERM)
    (first,) = run_dirs(tmp_path)
    checkpoint = torch.load(first / "checkpoints" / "interrupted.ckpt", weights_only=True)
    step = checkpoint["global_step"]
    assert 5 <= step < 80, "the signal should land in the middle of epoch 0"
    assert checkpoint["ShapesDataModule"]["train_position"]["batch"] == step

    proc = train([*options, "ckpt_path=last"])
    assert f"Resuming the data order of epoch 0 at batch {step}" in proc.stdout + proc.stderr
    second = next(d for d in run_dirs(tmp_path) if d != first)
    resumed = {**train_losses(first), **train_losses(second)}
    assert min(train_losses(second)) == step
    assert resumed == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_loss_curve(tmp_path):
    # the schedule is fixed when a run starts (its length follows trainer.max_epochs): all three runs plan
    # for 2 epochs (40 steps), as a run that was interrupted after its first would have
    options = ["test=false", "trainer.log_every_n_steps=1", "callbacks.report=null", "+scheduler.total_steps=40"]
    train(tiny(tmp_path / "straight", "trainer.max_epochs=2", *options))
    train(tiny(tmp_path / "split", "trainer.max_epochs=1", *options))
    train(tiny(tmp_path / "split", "trainer.max_epochs=2", "ckpt_path=last", *options))
    (straight,) = run_dirs(tmp_path / "straight")
    first, second = run_dirs(tmp_path / "split")
    expected = train_losses(straight)
    assert sorted(expected) == list(range(40))
    resumed = {**train_losses(first), **train_losses(second)}
    assert sorted(train_losses(second)) == list(range(20, 40))
    assert resumed == pytest.approx(expected, rel=1e-6, abs=0)


def test_wandb_failing_mid_run_only_warns(tmp_path, monkeypatch):
    """A W&B logger whose upload raises does not stop training: one warning, later calls are no-ops."""
    import warnings

    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    from captioning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path))
    calls = []

    def broken(self, metrics, step=None):
        calls.append(step)
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(LightningWandbLogger, "log_metrics", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_metrics({"train/loss": 1.0}, step=1)
        logger.log_metrics({"train/loss": 0.9}, step=2)
    assert calls == [1, 2]
    assert sum("W&B logging failed" in str(w.message) for w in caught) == 1
