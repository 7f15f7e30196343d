"""src/train.py end to end: through the Hydra entry point (fast_dev_run, errors, progress in a log file), and
its train(cfg) in process (a real short run, resume)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from entrypoints import REPO, compose, environment, load_entry_point, run_dirs, tiny, train

ROOT = REPO


def train_in_process(tmp_path, name, *overrides):
    """src/train.py's train(cfg) on the composed config, in this process (no interpreter start-up)."""
    output_dir = tmp_path / "outputs" / "train" / "runs" / name
    return load_entry_point("train").train(compose("train", tiny(tmp_path, *overrides), output_dir))


def test_fast_dev_run_through_hydra_entry_point(tmp_path):
    train(tiny(tmp_path, "debug=fdr"))
    (run,) = run_dirs(tmp_path, "debug")
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (tmp_path / "data" / "shapes" / "annotations" / "captions_train2017.json").is_file()


def test_real_training_writes_checkpoints_metrics_and_report(tmp_path, capsys):
    train_in_process(tmp_path, "run", "trainer.max_epochs=2", "model=attention")
    printed = capsys.readouterr().out
    (run,) = run_dirs(tmp_path)
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(n.startswith("epoch") for n in ckpts)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    for key in ("val/loss", "val/bleu1", "val/bleu4", "val/cider"):
        assert isinstance(metrics["final"][key], float) and isinstance(metrics["best"][key], float)
    assert metrics["best"]["val/loss"] <= metrics["epochs"][0]["val/loss"]
    assert metrics["epochs"][1]["val/loss"] < metrics["epochs"][0]["val/loss"]  # it learns
    assert set(metrics["test"]) >= {"test/loss", "test/bleu4", "test/cider"}
    assert metrics["blind_baseline"]["caption"] and metrics["val_images"] == 16
    assert "blind baseline" in printed and "Sample validation captions" in printed
    # the generalisation gap: the final model on training images beside validation
    assert metrics["train_subset"]["images"] == 64 and 0 <= metrics["train_subset"]["grounding/precision"] <= 1
    assert "generalisation gap (final model, 64 training images / validation): bleu4" in printed
    # The checkpoint alone rebuilds the model, vocabulary included, and loads with weights_only.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    vocab = ckpt["hyper_parameters"]["vocab"]
    assert vocab[:4] == ["<NULL>", "<START>", "<END>", "<UNK>"] and len(vocab) > 10
    assert (run / "csv" / "metrics.csv").is_file()


def test_resume_from_last_checkpoint(tmp_path):
    """ckpt_path=last goes on where the run stopped; a run resumed with more epochs than the one-cycle schedule was
    sized for says that its extra steps train at the final rate (the schedule comes back from the checkpoint)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_in_process(tmp_path, "first", "trainer.max_epochs=1", "test=false")
    assert not [w for w in caught if "learning-rate schedule" in str(w.message)]
    (first,) = run_dirs(tmp_path)
    last = first / "checkpoints" / "last.ckpt"
    step_after_one = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step_after_one == 20  # 64 images x 5 captions / batch 16
    with pytest.warns(UserWarning, match=r"OneCycleLR ends at optimizer step 20, but this run goes on to step 40 "
                                         r"\(trainer.max_epochs=2\): the last 20 steps train at its final rate"):
        train_in_process(tmp_path, "second", "trainer.max_epochs=2", "test=false", "ckpt_path=last")
    second = [d for d in run_dirs(tmp_path) if d != first][0]
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 2 * step_after_one and resumed["epoch"] == 1
    metrics = json.loads((second / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]  # history carried over from the first run


def test_a_schedule_shorter_than_a_fresh_run_names_its_key(tmp_path):
    with pytest.warns(UserWarning, match=r"ends at optimizer step 10, but this run goes on to step 20 .* "
                                         r"scheduler.total_steps is shorter than the run: leave it out"):
        train_in_process(tmp_path, "run", "trainer.max_epochs=1", "test=false", "+scheduler.total_steps=10")


def test_several_captions_per_image_train_and_resume(tmp_path):
    """data.captions_per_image=5: a sample is an image with its five captions, 16 captions a batch = 3 images."""
    train_in_process(tmp_path, "first", "trainer.max_epochs=1", "test=false", "data.captions_per_image=5",
                     "trainer.limit_train_batches=10", "trainer.limit_val_batches=1")
    (first,) = run_dirs(tmp_path)
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10
    # the data order is counted in samples (images) per batch: 3
    position = next(v for k, v in ckpt.items() if k.endswith("DataModule"))["train_position"]
    assert position["batch_size"] == 3 and position["epoch"] == 1
    train_in_process(tmp_path, "second", "trainer.max_epochs=2", "test=false", "data.captions_per_image=5",
                     "ckpt_path=last", "trainer.limit_val_batches=1")
    second = [d for d in run_dirs(tmp_path) if d != first][0]
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 10 + 22  # then a whole epoch: ceil(64 images / 3)
    metrics = json.loads((second / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(e["val/loss"])) for e in metrics["epochs"])


def test_progress_lines_in_a_log_file(tmp_path):
    """stdout to a file (SLURM, CI, | tee): a plain progress line every N steps, not an epoch of silence."""
    overrides = [o for o in tiny(tmp_path, "trainer.max_epochs=2", "test=false",
                                 "callbacks.progress_bar.every_n_steps=5", "callbacks.progress_bar.every_seconds=0")
                 if o != "callbacks.progress_bar=null"]
    log = tmp_path / "train.out"
    with log.open("w") as stdout:
        subprocess.run([sys.executable, "src/train.py", *overrides], cwd=ROOT, env=environment(), stdout=stdout,
                       stderr=subprocess.STDOUT, timeout=600, check=True)
    lines = log.read_text().splitlines()
    steps = [line for line in lines if line.startswith("epoch ") and " step " in line]
    # 64 images x 5 captions / 16 = 20 steps an epoch: lines at 5, 10, 15, 20 and the epoch's end, twice
    assert [line.split("  ")[1] for line in steps if line.startswith("epoch 1/2")][:4] == [
        "step 5/20 (25%)", "step 10/20 (50%)", "step 15/20 (75%)", "step 20/20 (100%)"]
    assert len([line for line in steps if line.startswith("epoch 2/2")]) >= 4
    middle = steps[1]
    assert "train/loss" in middle and "images/s" in middle and "epoch ETA" in middle and "fit ETA" in middle
    assert sum(line.startswith("validation after epoch") for line in lines) == 2
    assert not any("\x1b[" in line for line in lines)  # no terminal control codes in a log
    # the run directory's train.log, which is what people open on a cluster, has the same lines and the report
    (run,) = run_dirs(tmp_path)
    written = (run / "train.log").read_text()
    assert "step 5/20 (25%)" in written and written.count("validation after epoch") == 2
    assert "Trainable params" in written and "blind baseline caption" in written and "generalisation gap" in written
    assert "FLOPs" not in written and "FLOPs" not in log.read_text()  # Lightning counts none for a captioner
    for line in steps:  # the rest of the fit is never shorter than the rest of the epoch
        if "epoch ETA" in line:
            eta = {k: v for k, v in (part.rsplit(" ", 1) for part in line.split("  ") if "ETA" in part)}
            seconds = {k: sum(int(x) * 60**i for i, x in enumerate(reversed(v.split(":")))) for k, v in eta.items()}
            assert seconds["fit ETA"] >= seconds["epoch ETA"], line
    # files a run writes are readable like any other the user's umask allows (mkstemp's are 0600)
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_last_checkpoint_is_the_newest_even_without_improvement(tmp_path):
    """ckpt_path=last resumes last.ckpt: after an epoch whose val/bleu4 did not improve (Lightning's save_last
    then keeps the older file) it must still hold the newest state."""
    # lr 0 and the same batches each epoch (no augmentation); BatchNorm's running statistics still drift, which
    # changes the untrained captions of the two-pathway encoder and of guided decoding: the plain ones do not
    train_in_process(tmp_path, "flat", "trainer.max_epochs=2", "test=false", "optimizer.lr=0", "data.augment=false",
                     "decoding.guidance=0", "encoder.pathways=false")
    (run,) = run_dirs(tmp_path)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 40)
    best = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch")]
    assert [p.name.split("-")[0] for p in best] == ["epoch000"]  # the best stays the first: nothing improved


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = train(tiny(tmp_path, "ckpt_path=/nonexistent/last.ckpt"), check=False)
    assert proc.returncode != 0
    assert "ckpt_path=/nonexistent/last.ckpt: no such checkpoint file" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_quick_recipe_learns_to_see(tmp_path):
    """The two-minute recipe (experiment=shapes_quick: five epochs of the default, a 30% warm-up, the weights'
    moving average) names what is in the picture, not only the language of the references: judged against the
    scenes the generator drew.

    Measured on 500 validation images (seeds 12345 / 1 / 2, 2 threads, bf16-mixed, ~2 min 20 s each as a whole
    command): object precision 0.980 / 0.982 / 0.980, colour 0.990 / 0.975 / 0.990, true captions 0.936 / 0.920 /
    0.934, BLEU-4 0.848 / 0.849 / 0.852; four epochs of it 0.968 / 0.964 / 0.966. The courses' setup
    (experiment=shapes_courses) stays at object precision ~0.1 with a BLEU-4 of ~0.3."""
    train([f"paths.root_dir={tmp_path}", "experiment=shapes_quick", "data.num_val=200", "data.num_test=50",
           "data.progress=false", "logger=csv", "callbacks.progress_bar=null"])
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    final, blind = metrics["final"], metrics["blind_baseline"]
    assert final["val/grounding/precision"] >= 0.9  # named objects that are in the picture
    assert final["val/grounding/color"] >= 0.95 and final["val/grounding/shape"] >= 0.9
    assert final["val/grounding/single_exact"] >= 0.9
    assert final["val/grounding/correct"] >= 0.8  # captions with nothing false in them
    # the best constant caption ("there is a large white triangle on the left": BLEU-4 0.29, CIDEr-D 0.71) names an
    # object that is there an eighth of the time
    assert blind["grounding/precision"] < 0.25 and final["val/grounding/precision"] > 3 * blind["grounding/precision"]
    assert final["val/bleu4"] >= 0.75 and final["val/bleu4"] > 2 * blind["bleu4"]
    assert final["val/cider"] > 4 * blind["cider"]
    assert metrics["distinct_val_captions"] > 100


@pytest.mark.parametrize(("monitor", "chosen"), [(None, "val/grounding/correct"),
                                                  ("[val/not_logged,val/bleu4]", "val/bleu4")])
def test_the_best_checkpoint_is_chosen_by_the_first_monitor_validation_logs(tmp_path, monitor, chosen):
    """The default monitors true captions on the built-in set; a metric the data does not log falls through to the
    next one of the list. The choice and its best score are in the checkpoint, for a resume."""
    extra = [f"callbacks.model_checkpoint.monitor={monitor}"] if monitor else []
    train_in_process(tmp_path, "run", "trainer.max_epochs=3", "test=false", *extra)
    run = tmp_path / "outputs" / "train" / "runs" / "run"
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    states = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    (state,) = [v for k, v in states.items() if k.startswith("ModelCheckpoint{'monitor': [")]
    assert state["monitor"] == chosen and state["monitor_resolved"]
    best = max(range(3), key=lambda i: epochs[i][chosen])  # the first of equals, as ModelCheckpoint keeps it
    assert float(state["best_model_score"]) == pytest.approx(epochs[best][chosen], abs=1e-6)
    assert Path(state["best_model_path"]).name.startswith(f"epoch{best:03d}-")


def test_ema_weights_are_what_validation_and_checkpoints_use(tmp_path):
    """callbacks.ema: validation scores the averaged weights and checkpoints hold them (the raw ones ride along
    to resume), and test=true scores the average of the best checkpoint. With decay 1 the average stays the weights
    after the first step, so its loss is the nearly untrained model's, far above the trained one's."""
    plain = train_in_process(tmp_path, "plain", "trainer.max_epochs=2")
    ema = train_in_process(tmp_path, "ema", "trainer.max_epochs=2", "callbacks=ema", "callbacks.ema.decay=1.0")
    assert ema["val/loss"] > plain["val/loss"] + 5  # validation ran on the (frozen) average, not the trained weights
    run = next(d for d in run_dirs(tmp_path) if d.name == "ema")
    # the raw weights are the plain run's (the average does not touch training), so a test of them scores exactly the
    # plain run's loss: Lightning's callback alone loads them back before the test, as for a resume
    tested = {d.name: json.loads((d / "metrics.json").read_text())["test"]["test/loss"] for d in run_dirs(tmp_path)}
    assert tested["ema"] > tested["plain"] + 2
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert set(average) == set(current)
    assert any(not torch.equal(average[k], current[k]) for k in average)
    # eval.py / load_checkpoint read the average from the checkpoint with nothing to set
    from captioning.module import load_checkpoint

    module, _ = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in average.items())


def test_a_resumed_ema_run_carries_its_average_and_its_raw_weights_on(tmp_path):
    """ckpt_path=last with callbacks=ema: the average comes back from the checkpoint's state_dict and training goes
    on from its raw weights (current_model_state). With decay 1 the average is frozen at the first step's weights,
    so after the resume it is still exactly the first run's. (The first run's one cycle has ended, so the second
    epoch moves the raw weights by ~1e-5; restarted from the average they would sit ~1 away from the first run's.)"""
    ema = ("callbacks=ema", "callbacks.ema.decay=1.0", "test=false")
    train_in_process(tmp_path, "first", "trainer.max_epochs=1", *ema)
    (first,) = run_dirs(tmp_path)
    before = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    train_in_process(tmp_path, "second", "trainer.max_epochs=2", *ema, "ckpt_path=last")
    second = next(d for d in run_dirs(tmp_path) if d != first)
    after = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 2 * before["global_step"]
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    moved = [k for k, v in before["current_model_state"].items()
             if v.is_floating_point() and not torch.equal(after["current_model_state"][k], v)]
    assert moved  # trained on from the raw weights
    # not restarted from the average: the raw weights after the resume are nearer the first run's raw than its average
    key = max(moved, key=lambda k: before["current_model_state"][k].numel())
    raw, average, now = (d[key].float() for d in (before["current_model_state"], before["state_dict"],
                                                   after["current_model_state"]))
    assert (now - raw).norm() < (now - average).norm()


def test_the_gap_line_says_when_validation_is_much_worse():
    from captioning.callbacks import RunReport

    final = {"val/bleu4": 0.80, "val/grounding/precision": 0.95, "val/grounding/chair_i": 0.05}
    close = RunReport.gap_line({"images": 500, "bleu4": 0.82, "grounding/precision": 0.97,
                                "grounding/chair_i": 0.03}, final)
    assert close.startswith("generalisation gap (final model, 500 training images / validation): bleu4 0.820 / 0.800")
    assert "much worse" not in close
    far = RunReport.gap_line({"images": 500, "bleu4": 0.95, "grounding/precision": 0.97,
                              "grounding/chair_i": 0.01}, {**final, "val/grounding/chair_i": 0.2})
    assert "validation is much worse than training on bleu4, grounding/chair_i" in far


def test_beside_a_terminal_bar_the_progress_lines_go_to_the_log_file(tmp_path):
    """In a terminal the rich bar draws; the run's log file still gets the plain lines (and the ETAs agree)."""
    import io
    import logging

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from captioning.progress import RichProgressBarWithLog, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(every_n_steps=4, every_seconds=0, stream=Terminal())
    assert isinstance(bar, RichProgressBarWithLog)
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        L.Trainer(max_steps=10, limit_val_batches=2, val_check_interval=5, callbacks=[bar], logger=False, enable_checkpointing=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(BoringModel())
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    written = (tmp_path / "train.log").read_text().splitlines()
    steps = [line for line in written if line.startswith("epoch 1") and " step " in line]
    assert [line.split("  ")[1] for line in steps][:2] == ["step 4/10 (40%)", "step 8/10 (80%)"]
    assert any(line.startswith("validation after epoch 1") for line in written)
    # max_steps=10 ends the fit inside the first epoch of 64 batches: the epoch is 10 batches, its rest the fit's
    for line in steps[:2]:
        parts = dict(part.rsplit(" ", 1) for part in line.split("  ") if "ETA" in part)
        assert parts["fit ETA"] >= parts["epoch ETA"], line


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_its_steps_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh is run by hand on a GPU machine, never by CI: its CPU mode keeps it working."""
    out = tmp_path / "out"
    env = environment(CHECK_DEVICE="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), *tiny(tmp_path, logger=None)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["core.json", "gpu_check.txt", "train.log", "train_metrics.json"]
    core = json.loads((out / "core.json").read_text())
    assert core["benchmark"] and core["results"]
    assert "val/loss" in json.loads((out / "train_metrics.json").read_text())["final"]
    assert "train.py wall time" in (out / "gpu_check.txt").read_text()
