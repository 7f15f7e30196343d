"""W&B dashboards, read back from offline runs (tests/wandbruns.py): nothing here needs an account or a
network."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from captioning.grounding import ground_caption

from wandbruns import offline_runs, read_run, tiny, train, wandb_env

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------
# End to end: what a training run leaves in its offline W&B run
# --------------------------------------------------------------------------------------------------------


def test_offline_run_holds_config_metrics_tables_and_summary(tmp_path):
    """logger=default (csv + wandb, auto -> offline), the attention model, 2 epochs."""
    # 32 images x 5 captions / 32 per batch: 5 steps per epoch
    proc = train(tmp_path, tiny(tmp_path, "model=attention", "trainer.max_epochs=2", "trainer.log_every_n_steps=2",
                                "data.num_train=32", "data.batch_size=32",
                                "logger=default", "callbacks.wandb_samples.num_images=6",
                                "callbacks.wandb_samples.attention_images=2"), as_users_have_it=True)
    (output_dir,) = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    (run_dir,) = offline_runs(output_dir)
    assert f"wandb sync {output_dir / 'wandb'}/offline-run-*" in proc.stdout + proc.stderr
    run = read_run(run_dir)
    assert run.exit_code == 0

    # the run config is the resolved Hydra config, linked to the run's files
    assert run.config["output_dir"] == str(output_dir)
    assert run.summary["output_dir"] == str(output_dir)
    assert run.config["model"]["cell_type"] == "attention" and run.config["model"]["hidden_dim"] == 32
    assert run.config["trainer"]["max_epochs"] == 2 and run.config["data"]["num_train"] == 32
    assert run.config["optimizer"]["lr"] == 0.003 and "model=attention" in run.config["overrides"]
    assert "vocab" not in run.config

    # validation metrics, once per epoch, equal to what metrics.json reports
    report = json.loads((output_dir / "metrics.json").read_text())
    val_rows = [row for row in run.history if "val/bleu4" in row]
    assert [row["epoch"] for row in val_rows] == [0, 1]
    for row, epoch in zip(val_rows, report["epochs"], strict=True):
        for key in ("val/loss", "val/bleu1", "val/bleu2", "val/bleu3", "val/bleu4", "val/cider"):
            assert row[key] == pytest.approx(epoch[key], rel=1e-6), key
    assert val_rows[1]["val/loss"] < val_rows[0]["val/loss"]
    # and the grounded metrics (the built-in set knows every scene)
    for row, epoch in zip(val_rows, report["epochs"], strict=True):
        for key in ("val/grounding/precision", "val/grounding/color", "val/grounding/correct"):
            assert row[key] == pytest.approx(epoch[key], rel=1e-6), key

    # training curves: loss, learning rate, gradient norm, throughput
    train_rows = [row for row in run.history if "train/grad_norm" in row]
    assert len(train_rows) >= 4
    for row in train_rows:
        assert row["train/grad_norm"] > 0 and row["train/loss_step"] > 0
        assert row["train/images_per_sec"] > 0
        # every caption has 2..17 target tokens (words and <END>)
        assert 2 * row["train/images_per_sec"] <= row["train/tokens_per_sec"] <= 17 * row["train/images_per_sec"]
    assert any("lr-AdamW/decoder" in row for row in run.history)

    # the sample table: the same 6 validation images every epoch, scored per image
    references = {int(i): refs for i, refs in _val_references(tmp_path).items()}
    first_ids = list(references)[:6]
    scenes = _val_scenes(tmp_path)
    tables = [row["val/samples"] for row in run.history if "val/samples" in row]
    assert len(tables) == 2 and all(t["_type"] == "table-file" and t["nrows"] == 6 for t in tables)
    from captioning.metrics import corpus_bleu

    for epoch, table in enumerate(tables):
        content = json.loads((run_dir / "files" / table["path"]).read_text())
        assert content["columns"] == ["epoch", "image_id", "image", "caption", "references", "bleu4", "true",
                                      "grounding", "attention"]
        rows = [dict(zip(content["columns"], r, strict=True)) for r in content["data"]]
        assert [r["image_id"] for r in rows] == first_ids and {r["epoch"] for r in rows} == {epoch}
        for r in rows:
            assert r["references"].split("\n") == references[r["image_id"]]
            assert r["bleu4"] == pytest.approx(corpus_bleu([r["caption"]], [references[r["image_id"]]])[3])
            assert r["image"] == "Image"  # the pictures travel in the table's artifact
            # right or wrong against the scene the generator drew
            verdict = ground_caption(r["caption"], scenes[r["image_id"]])
            assert r["true"] is verdict.correct and r["grounding"] == verdict.summary()
    by_epoch = next(row["val/samples_by_epoch"] for row in run.history if "val/samples_by_epoch" in row)
    assert by_epoch["nrows"] == 12
    # the table artifacts carry the 6 thumbnails and 2 attention overlays of each epoch
    tables_with_images = [paths for kind, paths in run.artifacts if kind == "run_table"]
    assert len(tables_with_images) == 3 and all(len(p) >= 6 for p in tables_with_images)
    # self-contained: every file the run will upload lies inside the run's folder, none in $HOME
    assert run.local_paths and all(Path(p).is_relative_to(output_dir) for p in run.local_paths), run.local_paths
    assert all(Path(p).is_file() for p in run.local_paths)
    home = tmp_path / "home"
    assert not home.exists() or not any("wandb" in str(p) for p in home.rglob("*")), list(home.rglob("*"))[:5]

    # attention overlays: one image per word grid, for the first 2 images, every epoch
    for image_id in first_ids[:2]:
        overlays = [row[f"val/samples_attention/{image_id}"] for row in run.history
                    if f"val/samples_attention/{image_id}" in row]
        assert len(overlays) == 2 and all(o["_type"] == "image-file" for o in overlays)
        from PIL import Image

        with Image.open(run_dir / "files" / overlays[-1]["path"]) as picture:
            assert picture.width >= 160 and picture.height >= 160
    assert not any(f"val/samples_attention/{first_ids[2]}" in row for row in run.history)

    # best numbers and the blind baseline in the summary
    best = report["best"]
    for key in ("val/bleu4", "val/cider", "val/loss"):
        assert run.summary[f"best/{key}"] == pytest.approx(best[key], rel=1e-6)
    assert run.summary["best/val/loss"] == pytest.approx(min(r["val/loss"] for r in val_rows))
    assert run.summary["blind_baseline/bleu4"] == pytest.approx(report["blind_baseline"]["bleu4"])
    assert run.summary["distinct_val_captions"] == report["distinct_val_captions"]
    assert "test/bleu4" in run.summary


def _val_scenes(tmp_path: Path) -> dict:
    annotations = json.loads((tmp_path / "data" / "shapes" / "annotations" / "captions_val2017.json").read_text())
    return {image["id"]: {**image["scene"], "width": image["width"], "height": image["height"]}
            for image in annotations["images"]}


def _val_references(tmp_path: Path) -> dict:
    annotations = json.loads((tmp_path / "data" / "shapes" / "annotations" / "captions_val2017.json").read_text())
    references: dict[int, list[str]] = {image["id"]: [] for image in annotations["images"]}
    for annotation in annotations["annotations"]:
        references[annotation["image_id"]].append(annotation["caption"].strip())
    return references


# --------------------------------------------------------------------------------------------------------
# The logger, in process
# --------------------------------------------------------------------------------------------------------


def test_logger_config_from_file_vocab_trimmed_and_failed_run_finished(tmp_path, monkeypatch):
    import wandb

    from captioning.loggers import WandbLogger

    for key, value in wandb_env(tmp_path).items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    (tmp_path / "config.yaml").write_text("model:\n  hidden_dim: 64\ntrainer:\n  max_epochs: 3\n")
    logger = WandbLogger(save_dir=str(tmp_path), config_file=str(tmp_path / "config.yaml"),
                         output_dir=str(tmp_path), tags=["unit"])
    assert logger.mode == "offline"
    logger.log_hyperparams({"vocab": ["<NULL>", "<START>", "<END>", "<UNK>", "a"], "encoder_lr": None})
    logger.log_metrics({"val/bleu4": 0.25}, step=3)
    logger.finalize("failed")  # what Lightning does when fit raises: the run ends, marked failed
    assert wandb.run is None
    wandb.teardown()  # the service writes the record log asynchronously: wait until it has flushed it
    run = read_run(offline_runs(tmp_path)[0])
    assert run.exit_code == 1 and run.tags == ["unit"]
    assert run.config["model"] == {"hidden_dim": 64} and run.config["trainer"] == {"max_epochs": 3}
    assert run.config["vocab_size"] == 5 and "vocab" not in run.config
    assert run.config["output_dir"] == str(tmp_path) and run.summary["output_dir"] == str(tmp_path)
    assert run.history[0]["val/bleu4"] == 0.25 and run.history[0]["trainer/global_step"] == 3


def test_auto_mode_is_online_only_with_a_key_and_a_reachable_server(tmp_path, monkeypatch):
    import socket

    from captioning.loggers import resolve_wandb_mode

    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    server = socket.create_server(("127.0.0.1", 0))  # a stand-in W&B server: it only has to accept
    port = server.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    try:
        assert resolve_wandb_mode("auto") == "offline"  # no key anywhere
        (tmp_path / "netrc").write_text("machine 127.0.0.1\n  login user\n  password 0123456789abcdef\n")
        assert resolve_wandb_mode("auto") == "online"  # `wandb login` saved a key for this host
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port + 1 if port < 65535 else 1}")
        assert resolve_wandb_mode("auto") == "offline"  # the server is unreachable
        assert resolve_wandb_mode("disabled") == "disabled"
        monkeypatch.setenv("WANDB_MODE", "dryrun")  # the environment wins, in W&B's old spelling too
        assert resolve_wandb_mode("online") == "offline"
    finally:
        server.close()
    with pytest.raises(ValueError, match="logger.wandb.mode='sometimes' is not one of"):
        resolve_wandb_mode("sometimes")


def test_missing_config_file_warns_and_logs_the_rest(tmp_path, monkeypatch):
    from captioning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.warns(UserWarning, match="config_file=.*does not exist"):
        logger = WandbLogger(save_dir=str(tmp_path), config_file=str(tmp_path / "nope.yaml"), output_dir="out")
    assert logger._wandb_init["config"] == {"output_dir": str(Path("out").absolute())}


# --------------------------------------------------------------------------------------------------------
# Callbacks, on stand-ins for the trainer (no training)
# --------------------------------------------------------------------------------------------------------


class _Recorder:
    """A LightningModule stand-in that records ``log`` calls."""

    def __init__(self) -> None:
        from captioning.data.vocab import Vocabulary

        self.logged: list[tuple[str, float]] = []
        self.vocab = Vocabulary(Vocabulary.SPECIALS)

    def log(self, name, value, **kwargs) -> None:
        self.logged.append((name, float(value)))


def test_throughput_counts_images_and_target_tokens_over_the_window(monkeypatch):
    from captioning.callbacks import Throughput

    clock = iter([10.0, 10.5, 11.5, 12.0, 13.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    # captions (N, T+1): <START> w.. <END> <NULL>..; the targets are captions[:, 1:], <NULL> excluded
    batch_a = {"captions": torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])}  # 5 target tokens, 2 images
    batch_b = {"captions": torch.tensor([[1, 5, 6, 7, 2], [1, 2, 0, 0, 0], [1, 4, 4, 2, 0]])}  # 8 tokens, 3 images
    trainer, module = SimpleNamespace(world_size=2), _Recorder()
    callback = Throughput(window=2)
    callback.on_train_epoch_start(trainer, module)  # t = 10
    callback.on_train_batch_end(trainer, module, None, batch_a, 0)  # t = 10.5
    assert module.logged == [("train/images_per_sec", 2 * 2 / 0.5), ("train/tokens_per_sec", pytest.approx(2 * 5 / 0.5))]
    callback.on_train_batch_end(trainer, module, None, batch_b, 1)  # t = 11.5
    callback.on_train_batch_end(trainer, module, None, batch_a, 2)  # t = 12: the window drops the first batch
    assert module.logged[-2:] == [("train/images_per_sec", pytest.approx(2 * 5 / 1.5)),
                                  ("train/tokens_per_sec", pytest.approx(2 * 13 / 1.5))]
    with pytest.raises(ValueError, match="window"):
        Throughput(window=0)


def test_summary_keeps_best_scores_lowest_loss_and_the_monitored_epoch(monkeypatch):
    import captioning.callbacks as callbacks

    run = SimpleNamespace(summary={})
    # a stand-in logger that counts as the trainer's W&B logger
    monkeypatch.setattr(callbacks, "find_wandb_logger", lambda loggers: loggers[0] if loggers else None)
    callback = callbacks.WandbSummary(monitor="val/cider")
    epochs = [{"val/bleu4": 0.2, "val/cider": 0.5, "val/loss": 3.0},
              {"val/bleu4": 0.3, "val/cider": 0.4, "val/loss": 2.5},
              {"val/bleu4": 0.25, "val/cider": 0.6, "val/loss": float("nan")}]
    for epoch, metrics in enumerate(epochs):
        trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=epoch,
                                  loggers=[SimpleNamespace(experiment=run)],
                                  callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})
        callback.on_validation_end(trainer, None)
    assert run.summary == pytest.approx({"best/val/bleu4": 0.3, "best/val/cider": 0.6, "best/val/loss": 2.5,
                                         "best/epoch": 2})
    # not rank 0: nothing is written (Lightning gives other ranks no W&B run)
    trainer.is_global_zero, run.summary = False, {}
    trainer.callback_metrics = {"val/bleu4": torch.tensor(0.9)}
    callback.on_validation_end(trainer, None)
    assert run.summary == {} and callback.best["best/val/bleu4"] == pytest.approx(0.9)
    # resuming from a checkpoint carries the best values on
    restored = callbacks.WandbSummary(monitor="val/cider")
    restored.load_state_dict(callback.state_dict())
    assert restored.best == callback.best


def test_callbacks_do_nothing_without_a_wandb_logger(tmp_path):
    from captioning.callbacks import WandbCaptionSamples, WandbSummary

    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0, loggers=[],
                              callback_metrics={"val/bleu4": torch.tensor(0.5)}, callbacks=[])
    samples = WandbCaptionSamples(num_images=2)
    samples.on_validation_end(trainer, None)  # would need a datamodule if it tried to log
    samples.on_fit_end(trainer, None)
    summary = WandbSummary()
    summary.on_validation_end(trainer, None)
    summary.on_fit_end(trainer, None)
    assert summary.best == {"best/val/bleu4": 0.5, "best/epoch": 0} and samples.rows == []
    with pytest.raises(ValueError, match="num_images"):
        WandbCaptionSamples(num_images=0)


# --------------------------------------------------------------------------------------------------------
# DDP: one W&B run, from rank 0
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_run_logs_one_wandb_run_from_rank_zero(tmp_path):
    train(tmp_path, tiny(tmp_path, "trainer=ddp_cpu", "trainer.max_epochs=2", "model=attention",
                         "trainer.log_every_n_steps=2", "logger=wandb"))
    (output_dir,) = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    (run_dir,) = offline_runs(output_dir)  # rank 1 starts no run of its own
    run = read_run(run_dir)
    assert run.exit_code == 0
    assert [row["epoch"] for row in run.history if "val/bleu4" in row] == [0, 1]
    assert len([row for row in run.history if "val/samples" in row]) == 2
    # 64 images x 5 captions / (16 per batch x 2 processes) = 10 steps per epoch
    assert max(row["trainer/global_step"] for row in run.history) >= 19
    assert list(tmp_path.glob("outputs/**/offline-run-*")) == [run_dir]
