"""Distributed and mixed-precision training: real 2-process DDP (gloo) through src/train.py, resume,
per-device batch size, bf16 autocast through the hand-written core, and the multi-node / SLURM configs."""

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from captioning.models import CaptioningRNN
from captioning.models.decoding import greedy_decode

from entrypoints import REPO as ROOT
from entrypoints import environment, run_dirs, tiny, train_losses
from entrypoints import train as run_train

CONF = ROOT / "conf"
PAIRS = 64 * 5  # tiny(): 64 training images x 5 captions each
BATCH = 16  # tiny(): data.batch_size, per device


def train(overrides, warnings=False):
    """src/train.py in a subprocess (W&B offline); Python warnings kept only when asked for."""
    return run_train(overrides, env=environment(warnings=warnings))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Multi-node on one machine: 2 "nodes" x 1 CPU process, started the way a cluster starts them.
TWO_NODES = ("trainer=ddp_multinode", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false",
             "trainer.num_nodes=2", "trainer.devices=1", "trainer.max_epochs=1", "test=false")

# A stand-in for srun: SLURM_NTASKS copies of the command with the task variables real srun sets.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((p = 0; p < SLURM_NTASKS; p++)); do
  SLURM_PROCID=$p SLURM_LOCALID=$((p % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((p / SLURM_NTASKS_PER_NODE)) "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def compose_train(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------------------------
# Fast: configs compose
def test_multinode_trainer_and_slurm_launcher_compose(tmp_path):
    cfg = compose_train([f"paths.root_dir={tmp_path}", "trainer=ddp_multinode", "hydra/launcher=slurm",
                         "hydra.launcher.partition=gpu"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    assert cfg.trainer.sync_batchnorm is True
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # SLURM's resources follow the trainer's: one task per GPU on every node.
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.mem_gb > 0
    # the plugin's schema validates the node: a typo is an error, not a silently ignored key
    with pytest.raises(Exception, match="gpus_per_nod"):
        compose_train([f"paths.root_dir={tmp_path}", "hydra/launcher=slurm", "hydra.launcher.gpus_per_nod=1"])
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("backward", ["autograd", "manual"])
@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "attention"])
def test_bf16_autocast_through_the_hand_written_core(cell_type, backward):
    """Loss and gradients under CPU bf16 autocast: finite, float32 parameter gradients, close to float32."""
    torch.manual_seed(0)
    model = CaptioningRNN(vocab_size=30, input_dim=8, wordvec_dim=16, hidden_dim=32, cell_type=cell_type,
                          backward=backward)
    features = torch.randn(6, 8, 4, 4)
    captions = torch.randint(3, 30, (6, 9))
    captions[:, 0], captions[:, -2:] = 1, 0  # <START> ... <NULL> padding
    captions[:, 6] = 2
    reference = model(features, captions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(features, captions)
        decoded = greedy_decode(model, features, 5).captions
    assert loss.dtype == torch.float32  # scored in float32 (models.loss), not summed in bf16
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < 0.03 * reference.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert decoded.shape == (6, 5) and decoded.dtype == torch.long


# -------------------------------------------------------------------------------------------------
# Slow: real runs through the entry point
def _steps_per_epoch(devices):
    # DistributedSampler pads to a multiple of the world size, then each rank batches its share.
    return math.ceil(math.ceil(PAIRS / devices) / BATCH)


@pytest.mark.slow
def test_ddp_cpu_trains_checkpoints_and_resumes(tmp_path):
    """2 gloo processes through src/train.py: one run dir, rank-0 report, per-device batches, resume."""
    proc = train(tiny(tmp_path, "trainer=ddp_cpu", "trainer.max_epochs=1", "test=false"))
    (first,) = run_dirs(tmp_path)  # rank 1 re-ran the script into rank 0's run dir, not a new one
    assert (first / "train_ddp_process_1.log").exists()
    assert proc.stdout.count("metrics written to") == 1  # the run report comes from rank 0 only
    saved = OmegaConf.load(first / "config.yaml").trainer
    assert (saved.strategy, saved.accelerator, saved.devices) == ("ddp", "cpu", 2)
    one = ckpt(first / "checkpoints" / "last.ckpt")
    # data.batch_size is per device: each of 2 processes takes half the pairs in batches of 16.
    assert one["global_step"] == _steps_per_epoch(2) == 10 and one["epoch"] == 0

    proc = train(tiny(tmp_path, "trainer=ddp_cpu", "trainer.max_epochs=2", "ckpt_path=last"))
    runs = run_dirs(tmp_path)
    assert len(runs) == 2
    second = runs[1] if runs[0] == first else runs[0]
    assert re.search(r"Restoring states from the checkpoint path at .*" + re.escape(first.name), proc.stdout
                     + proc.stderr)
    two = ckpt(second / "checkpoints" / "last.ckpt")
    assert two["global_step"] == 2 * _steps_per_epoch(2) and two["epoch"] == 1
    metrics = json.loads((second / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert all(math.isfinite(e["val/loss"]) for e in metrics["epochs"])
    assert set(metrics["test"]) >= {"test/loss", "test/bleu4"}  # test ran under DDP as well
    assert metrics["val_images"] == 16  # every validation image scored once, not once per rank
    assert proc.stdout.count("metrics written to") == 1


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory):
    """Options of a 2-process run (2 epochs, 40 steps each per process) and its uninterrupted losses."""

    root = tmp_path_factory.mktemp("straight")
    options = tiny(root, "trainer=ddp_cpu", "data.batch_size=4", "trainer.max_epochs=2", "test=false",
                   "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1", "callbacks.report=null")
    train(options)
    expected = train_losses(run_dirs(root)[0])
    assert sorted(expected) == list(range(2 * _steps_per_epoch(2) * 4))  # batch 4 instead of 16
    return [o for o in options if not o.startswith("paths.root_dir=")], expected


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1], ids=["rank0-forwards", "rank1-only"])
def test_ddp_sigterm_mid_epoch_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, ddp_uninterrupted,
                                                                                   rank):
    """SIGTERM to one process of 2 (rank 0 forwards it to the process it started; rank 1 alone tells no one):
    every process stops after the same batch, the checkpoint records the position in each process's shard,
    and the resumed run's losses equal an uninterrupted run's. Lightning's own handling hangs in both cases
    now and then (one process stops, the other waits in the next all-reduce; Lightning #20806)."""
    from entrypoints import signal_after_steps

    options, expected = ddp_uninterrupted
    options = [f"paths.root_dir={tmp_path}", *options]
    signal_after_steps(options, tmp_path, signal.SIGTERM, rank=rank)
    (first,) = run_dirs(tmp_path)
    checkpoint = ckpt(first / "checkpoints" / "interrupted.ckpt")
    step = checkpoint["global_step"]
    assert 5 <= step < len(expected) // 2, "the signal should land in the middle of epoch 0"
    assert checkpoint["ShapesDataModule"]["train_position"] == {"epoch": 0, "batch": step, "batch_size": 4,
                                                                "world_size": 2}

    train([*options, "ckpt_path=last"])
    second = next(d for d in run_dirs(tmp_path) if d != first)
    assert min(train_losses(second)) == step
    resumed = {**train_losses(first), **train_losses(second)}
    assert resumed == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_ddp_nan_loss_on_one_rank_only_is_handled_by_every_rank(tmp_path, policy):
    """Rank 1 alone sees a NaN loss at step 3: every rank must take the same branch — all stop with the
    error, or all skip the update — rather than one waiting forever in the gradient all-reduce."""
    options = tiny(tmp_path, "trainer=ddp_cpu", "trainer.max_epochs=1", "test=false", "callbacks.report=null",
                   f"module.nonfinite_loss={policy}", "trainer.log_every_n_steps=1",
                   "+callbacks.fault._target_=faults.NanImages",
                   "+callbacks.fault.step=3", "+callbacks.fault.rank=1")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "default",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "src/train.py", *options], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path)
    if policy == "fail":
        assert proc.returncode == 1, output[-3000:]
        assert "The training loss is nan at global step 3 (epoch 0, batch 3) on process 1 of 2" in output
        saved = ckpt(run / "checkpoints" / "interrupted.ckpt")  # the state before the bad step, resumable
        assert saved["global_step"] == 3
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    else:
        assert proc.returncode == 0, output[-3000:]
        final = ckpt(run / "checkpoints" / "last.ckpt")
        assert final["global_step"] == _steps_per_epoch(2)
        assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())
        with open(run / "csv" / "metrics.csv") as file:  # the running count, from the skipped step on
            skipped = {int(row["step"]): float(row["train/nonfinite_steps"]) for row in csv.DictReader(file)
                       if row.get("train/nonfinite_steps")}
        assert min(skipped) == 3 and set(skipped.values()) == {1.0}
        assert "Non-finite training loss (nan) at global step 3 (epoch 0, batch 3) on process 1 of 2" in output


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lstm", "attention"])
def test_bf16_mixed_training_through_entry_point(tmp_path, model):
    train(tiny(tmp_path, f"model={model}", "trainer.precision=bf16-mixed", "trainer.max_epochs=1", "test=false"))
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    loss = metrics["final"]["val/loss"]
    assert math.isfinite(loss) and 0 < loss < 200
    assert loss != round(loss * 4) / 4  # a float32 number, not a bf16 sum rounded to a quarter
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == _steps_per_epoch(1)


@pytest.mark.slow
def test_16_mixed_on_cpu_falls_back_to_bf16(tmp_path):
    """Lightning has no fp16 AMP on CPU: `precision=16-mixed` warns and trains in bf16-mixed."""
    proc = train(tiny(tmp_path, "trainer.precision=16-mixed", "trainer.max_epochs=1", "test=false"), warnings=True)
    assert "Using `precision='bf16-mixed'` instead" in proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path)
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["final"]["val/loss"])


@pytest.mark.slow
def test_torchrun_two_nodes(tmp_path):
    """`torchrun --nnodes 2` (one torchrun per node, here both on localhost): Lightning takes the ranks
    from TorchElastic and the pinned hydra.run.dir keeps both nodes in one run directory."""
    run = tmp_path / "outputs" / "train" / "runs" / "torchrun-1"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    procs = [subprocess.Popen([*torchrun, "--node-rank", str(node), "src/train.py",
                               *tiny(tmp_path, *TWO_NODES, f"hydra.run.dir={run}")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert run_dirs(tmp_path) == [run]
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == _steps_per_epoch(2)
    assert sum(o.count("metrics written to") for o in outputs) == 1


@pytest.mark.slow
def test_sbatch_example_under_simulated_srun(tmp_path):
    """scripts/slurm/train.sbatch with a stand-in srun (2 nodes x 1 task on localhost): Lightning detects
    SLURM, trainer.num_nodes/devices come from SLURM's variables, the run dir is slurm-<job id>."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "offline",
           "PYTHONWARNINGS": "ignore", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "captioning", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1", "SLURM_NODELIST": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RUN_DIR": str(tmp_path / "outputs" / "train" / "runs" / "slurm-4242")}
    overrides = [o for o in tiny(tmp_path, *TWO_NODES) if not o.startswith(("trainer.num_nodes", "trainer.devices",
                                                                             "data.num_workers"))]
    proc = subprocess.run(["bash", "scripts/slurm/train.sbatch", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    assert run.name == "slurm-4242" and not list(run.glob("train_ddp_process_*.log"))  # SLURM started both
    saved = OmegaConf.load(run / "config.yaml")
    assert (saved.trainer.num_nodes, saved.trainer.devices, saved.data.num_workers) == (2, 1, 0)
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == _steps_per_epoch(2)
