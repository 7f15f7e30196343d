"""Running the entry points as the tests do: in a subprocess, as a user would, or in process on a composed
config (faster, for tests that only need the run's outputs); the overrides of a tiny run; what a run leaves.

A helper module, not a test module: test files import from here, never from each other.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def tiny(tmp_path: Path, *extra: str, logger: str | None = "csv") -> list[str]:
    """Overrides for a run of seconds: 64/16/16 images of 32 px, a small model, no progress bar."""
    return [
        f"paths.root_dir={tmp_path}", "data.num_train=64", "data.num_val=16", "data.num_test=16",
        "data.image_size=32", "data.num_workers=0", "data.persistent_workers=false", "data.progress=false",
        "data.batch_size=16", "model.hidden_dim=32", "model.wordvec_dim=16", "encoder.channels=[8,16,32]",
        "encoder.out_dim=32", *([f"logger={logger}"] if logger else []), "callbacks.progress_bar=null", *extra,
    ]


def environment(warnings: bool = False, **extra: str) -> dict[str, str]:
    """The environment of an entry point started by a test: W&B offline, no full Hydra tracebacks."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "default" if warnings else "ignore", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def command(script: str, overrides: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``subprocess`` arguments that run ``src/<script>`` with ``overrides`` from the repository root."""
    return dict(args=[sys.executable, str(REPO / "src" / script), *overrides], cwd=REPO,
                env=env if env is not None else environment(), text=True)


def run(script: str, overrides: list[str], check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``src/<script>`` in a subprocess as a user would; with ``check``, fail showing its output's end."""
    proc = subprocess.run(**command(script, overrides, env), capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} {' '.join(overrides)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def train(overrides: list[str], check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run("train.py", overrides, check, env)


def load_entry_point(name: str) -> ModuleType:
    """An entry-point script of src/ as a module (src/ is not a package): its train / evaluate / helpers."""
    spec = importlib.util.spec_from_file_location(f"entry_{name}", REPO / "src" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose(config_name: str, overrides: list[str], output_dir: Path) -> Any:
    """The config an entry point would run with, composed and registered as the running job's (Hydra's
    own node included), its run directory at ``output_dir``: for calling ``train(cfg)`` in process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as Hydra hands the task its config: Hydra's own node is HydraConfig's
    return cfg


def run_dirs(tmp_path: Path, task: str = "train") -> list[Path]:
    return sorted((tmp_path / "outputs" / task / "runs").iterdir())


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from a run's CSV log."""
    with open(run_dir / "csv" / "metrics.csv") as file:
        return {int(r["step"]): float(r["train/loss_step"]) for r in csv.DictReader(file) if r.get("train/loss_step")}


def signal_after_steps(options: list[str], root: Path, signum: int, steps: int = 5, rank: int = 0) -> tuple[str, str]:
    """Start src/train.py, send ``signum`` to the process of ``rank`` (0: the one started here; under DDP
    the others are its children) once the CSV log has ``steps`` losses; (stdout, stderr) after it exited
    with 128 + SIGTERM (a first Ctrl+C stops the same way)."""
    proc = subprocess.Popen(**command("train.py", options), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        runs = list((root / "outputs" / "train" / "runs").glob("*/csv/metrics.csv"))
        if runs and len(train_losses(runs[0].parents[1])) >= steps:
            break
        time.sleep(0.2)
    os.kill(proc.pid if rank == 0 else _child_of_rank(proc.pid, rank), signum)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # a hung DDP run: leave no process behind
            os.kill(pid, signal.SIGKILL)
        raise
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    return stdout, stderr


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return [grand for child in children for grand in (child, *_descendants(child))]


def _child_of_rank(pid: int, rank: int) -> int:
    """The process Lightning's DDP launcher started for ``rank`` (its environment says LOCAL_RANK)."""
    for child in _descendants(pid):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={rank}".encode() in environ:
            return child
    raise AssertionError(f"no child process of {pid} has LOCAL_RANK={rank}")
