"""Sweeps: Hydra multirun, Optuna, the W&B sweep config, and the multirun + DDP refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from wandbruns import offline_runs, read_run, tiny, train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_train(tmp_path: Path, overrides=(), multirun: bool = True):
    """The composed train config with Hydra's own node, registered as the running job's (``HydraConfig``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def entry():
    """The sweep guards train.py calls."""
    from captioning import sweeps

    return sweeps


# --------------------------------------------------------------------------------------------------------
# Multirun + several devices: refused, with what to do instead
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["trainer=ddp_cpu"], True),  # strategy=ddp, devices=2
        (["trainer.devices=2", "trainer.accelerator=cpu"], True),  # strategy=auto picks ddp
        (["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1"], True),
        (["trainer.devices='0,1'", "trainer.accelerator=gpu"], True),
        (["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"], False),  # spawn does not re-run the script
        (["trainer=cpu"], False),
        (["trainer.devices=auto", "trainer.accelerator=cpu"], False),  # one CPU device
    ],
)
def test_multirun_with_several_devices_is_refused(tmp_path, entry, overrides, refused):
    cfg = compose_train(tmp_path, overrides)
    if refused:
        with pytest.raises(ValueError, match=r"multirun \(-m\) cannot use trainer.devices=.*trainer.devices=1"):
            entry.check_sweep(cfg)
    else:
        entry.check_sweep(cfg)
    entry.check_sweep(compose_train(tmp_path, overrides, multirun=False))  # a single run may use DDP


def test_multirun_ddp_under_slurm_is_allowed(tmp_path, entry, monkeypatch):
    """SLURM (the submitit launcher) starts one process per device itself: Lightning relaunches nothing."""
    for key, value in {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "n1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "1"}.items():
        monkeypatch.setenv(key, value)
    entry.check_sweep(compose_train(tmp_path, ["trainer=ddp_cpu"]))


def test_multirun_ddp_refusal_through_the_entry_point(tmp_path):
    proc = train(tmp_path, ["-m", f"paths.root_dir={tmp_path}", "trainer=ddp_cpu", "model.hidden_dim=16,32",
                            "logger=csv"], check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "A Hydra multirun (-m) cannot use trainer.devices=2 (strategy=ddp)" in output
    assert "hydra/launcher=submitit_slurm" in output and "wandb agent" in output
    assert not list(tmp_path.glob("outputs/**/checkpoints"))  # refused before anything ran


def test_optuna_direction_must_agree_with_the_metric(tmp_path, entry):
    entry.check_sweep(compose_train(tmp_path, ["hparams_search=optuna"]))
    with pytest.raises(ValueError, match="direction=maximize contradicts optimized_metric=val/loss"):
        entry.check_sweep(compose_train(tmp_path, ["hparams_search=optuna", "optimized_metric=val/loss"]))
    entry.check_sweep(compose_train(tmp_path, ["hparams_search=optuna", "optimized_metric=val/loss",
                                                "hydra.sweeper.direction=minimize"]))


def test_optimized_value_is_a_float_and_a_missing_metric_is_explained(tmp_path, entry):
    import torch

    compose_train(tmp_path, multirun=True)
    assert entry.optimized_value({"val/cider": float(torch.tensor(0.25))}, "val/cider") == 0.25
    assert entry.optimized_value({"val/cider": 0.25}, None) is None
    with pytest.raises(ValueError, match=r"optimized_metric=val/meteor was not logged .*val/cider"):
        entry.optimized_value({"val/cider": 0.25}, "val/meteor")
    compose_train(tmp_path, multirun=False)  # a single run still ends well, with a warning
    with pytest.warns(UserWarning, match="optimized_metric=val/meteor was not logged"):
        assert entry.optimized_value({"val/cider": 0.25}, "val/meteor") is None


# --------------------------------------------------------------------------------------------------------
# The search spaces map onto real config keys
# --------------------------------------------------------------------------------------------------------


def test_optuna_search_space_keys_exist_and_it_maximises_cider(tmp_path):
    cfg = compose_train(tmp_path, ["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "maximize" and sweeper.n_jobs == 1
    assert cfg.optimized_metric == "val/cider" and cfg.test is False
    assert cfg.hydra.mode == RunMode.MULTIRUN
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert {"optimizer.lr", "model.hidden_dim", "model.wordvec_dim", "model.cell_type", "model.dropout"} <= set(
        sweeper.params)


def _agent_command(sweep: dict, choose) -> list[str]:
    """The command a ``wandb agent`` runs for one point of the sweep, macros expanded by W&B's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    point = {key: {"value": choose(spec)} for key, spec in sweep["parameters"].items()}
    macros = create_sweep_command_args({"args": point})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    command = []
    for chunk in create_sweep_command(list(sweep["command"])):
        command += macros[chunk[2:-1]] if chunk.startswith("${") else [chunk]
    return command


@pytest.mark.parametrize("end", ["low", "high"])
def test_wandb_sweep_passes_its_parameters_as_hydra_overrides(tmp_path, end):
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_bayes.yaml").read_text())
    assert sweep["metric"] == {"name": "val/cider", "goal": "maximize"}
    assert sweep["command"][-1] == "${args_no_hyphens}"

    def choose(spec):
        if "values" in spec:
            return spec["values"][0 if end == "low" else -1]
        return spec["min" if end == "low" else "max"]

    command = _agent_command(sweep, choose)
    assert command[:3] == ["/usr/bin/env", "python", "src/train.py"] and (ROOT / command[2]).is_file()
    overrides = command[3:]
    cfg = compose_train(tmp_path, overrides, multirun=False)  # Hydra accepts every argument...
    for key, spec in sweep["parameters"].items():  # ...and each reaches its key
        assert OmegaConf.select(cfg, key) == choose(spec), key
    assert cfg.optimized_metric == sweep["metric"]["name"] and cfg.test is False


# --------------------------------------------------------------------------------------------------------
# Real sweeps on tiny data
# --------------------------------------------------------------------------------------------------------


def _sweep_dir(tmp_path: Path) -> Path:
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    return sweep


@pytest.mark.slow
def test_two_job_multirun_gives_two_runs_and_two_output_dirs(tmp_path):
    train(tmp_path, ["-m", *tiny(tmp_path, "trainer.max_epochs=1", "test=false", "logger=wandb",
                                 "model.hidden_dim=16,32")])
    sweep = _sweep_dir(tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = [read_run(run) for job in jobs for run in offline_runs(job)]
    assert len(runs) == 2 and runs[0].id != runs[1].id
    for job, run, hidden in zip(jobs, runs, (16, 32), strict=True):
        assert run.exit_code == 0 and run.config["output_dir"] == str(job)
        assert run.config["model"]["hidden_dim"] == hidden and run.name == f"{job.name}:model.hidden_dim={hidden}"
        assert run.group == f"train-{sweep.name}"
        assert [r["epoch"] for r in run.history if "val/bleu4" in r] == [0]
        assert (job / "metrics.json").is_file() and (job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_failing_job_ends_its_run_and_the_next_job_gets_its_own(tmp_path):
    proc = train(tmp_path, ["-m", *tiny(tmp_path, "trainer.max_epochs=1", "test=false", "logger=wandb",
                                        "optimizer.lr=-1,0.002")], check=False)
    assert proc.returncode != 0 and "Invalid learning rate: -1" in proc.stdout + proc.stderr
    assert "reuse this run" not in proc.stdout + proc.stderr
    sweep = _sweep_dir(tmp_path)
    failed, ok = (read_run(run) for job in ("0", "1") for run in offline_runs(sweep / job))
    assert failed.exit_code == 1 and ok.exit_code == 0 and failed.id != ok.id
    assert not [r for r in failed.history if "val/bleu4" in r]
    assert [r["epoch"] for r in ok.history if "val/bleu4" in r] == [0]


@pytest.mark.slow
def test_two_trial_optuna_sweep_reports_the_best_trial(tmp_path):
    import json

    proc = train(tmp_path, ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=7",
                            *tiny(tmp_path, "trainer.max_epochs=1", "model.cell_type=lstm", "logger=csv")])
    sweep = _sweep_dir(tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    # train.py returned each trial's last validation CIDEr; the sweeper kept the larger
    finals = [json.loads((job / "metrics.json").read_text())["final"]["val/cider"] for job in jobs]
    assert results["best_value"] == pytest.approx(max(finals))
    # the fixed overrides left lr, weight decay and dropout to search
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "model.dropout"}
    best = jobs[finals.index(max(finals))]
    overrides = yaml.safe_load((best / ".hydra" / "overrides.yaml").read_text())
    lr = next(o for o in overrides if o.startswith("optimizer.lr="))
    assert float(lr.split("=")[1]) == pytest.approx(results["best_params"]["optimizer.lr"])
    assert re.search(r"Best value: [0-9.e-]+", proc.stdout + proc.stderr)
