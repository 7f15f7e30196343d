"""Loggers: W&B that goes offline by itself instead of failing a run, with the run's whole config."""

from __future__ import annotations

import netrc
import os
import sys
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from omegaconf import OmegaConf

from .io import reachable

__all__ = ["WandbLogger", "resolve_wandb_mode", "find_wandb_logger", "hydra_run_labels"]

MODES = ("auto", "online", "offline", "disabled")
# W&B refuses longer run names.
MAX_NAME = 128


def _has_api_key(host: str) -> bool:
    """An API key in ``WANDB_API_KEY`` or, as ``wandb login`` saves it, in the netrc file for ``host``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto`` -> ``online`` with an API key and a reachable server, else ``offline``.

    ``WANDB_MODE`` in the environment wins over the config, as W&B itself does.
    """
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}.")
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode != "auto":
        return mode
    url = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    return "online" if _has_api_key(host) and reachable(host, port) else "offline"


def hydra_run_labels() -> dict[str, Any]:
    """What Hydra knows about this job: its command-line overrides and, in a multirun, a W&B group
    (the sweep, e.g. ``train-2026-01-31_12-00-00``) and run name (job number + its overrides).

    Empty outside a Hydra app (tests, notebooks).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    if OmegaConf.is_missing(hydra.job, "num") and hydra.mode is not None and hydra.mode.name == "MULTIRUN":
        return {}  # a composed (not launched) config, e.g. in tests: no job to label
    labels: dict[str, Any] = {"overrides": list(hydra.overrides.task)}
    if hydra.mode is not None and hydra.mode.name == "MULTIRUN":
        labels["group"] = f"{hydra.job.name}-{Path(str(hydra.sweep.dir)).name}"
        swept = _swept_keys(hydra)
        own = [o for o in hydra.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
        labels["name"] = f"{hydra.job.num}:{','.join(own) or hydra.job.override_dirname}"[:MAX_NAME]
    return labels


def _swept_keys(hydra: Any) -> set[str]:
    """The keys a multirun varies: its sweep overrides (``key=a,b``, ``range(...)``) on the command line
    and the search-space keys of a sweeper such as Optuna (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = set((hydra.sweeper.get("params") or {}).keys())
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except Exception:  # not a Hydra command line (another launcher's argv): only the sweeper's keys
        return swept
    return swept | {o.key_or_group for o in parsed if o.is_sweep_override()}


def _load_run_config(config_file: str | None, output_dir: str | None) -> dict[str, Any]:
    """The resolved run config the entry point saved (``config.yaml`` beside the outputs), plus where the
    outputs are, as a plain dict for ``wandb.init(config=...)``."""
    config: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if path.is_file():
            config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        else:
            rank_zero_warn(f"logger.wandb.config_file={config_file} does not exist; the W&B run config will "
                           "hold only what the LightningModule saves as hyperparameters.")
    if output_dir:
        config["output_dir"] = str(Path(output_dir).absolute())
    return config


# W&B keeps some files outside the run's folder: it stages every logged table and its media in
# $WANDB_DATA_DIR/artifacts/staging (~/.local/share/wandb) and caches artifact files in $WANDB_CACHE_DIR
# (~/.cache/wandb), and the run file points there by absolute path. An offline run copied to another
# machine for `wandb sync` then loses its tables, and the folders grow without end.
_INSIDE_RUN = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}
_set_by_us: dict[str, str] = {}


def keep_inside_run(wandb_dir: Path) -> None:
    """Point W&B's data (artifact staging) and cache directories into ``wandb_dir`` (the run's ``wandb/``), so that
    everything a run logs lies under its run directory. A directory the user set in the environment wins;
    one this function set for an earlier run of the same process (a multirun) is replaced."""
    for variable, name in _INSIDE_RUN.items():
        current = os.environ.get(variable)
        if current is None or _set_by_us.get(variable) == current:
            path = str((wandb_dir / name).absolute())
            os.environ[variable] = _set_by_us[variable] = path


def find_wandb_logger(loggers: list[Any]) -> WandbLogger | _LightningWandbLogger | None:
    """The first W&B logger of a trainer's loggers, or None."""
    return next((lg for lg in loggers if isinstance(lg, _LightningWandbLogger)), None)


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``mode="auto"``: online when it can be, offline when not.

    An offline run keeps everything under ``<save_dir>/wandb/`` — its tables and media too, which W&B
    would otherwise stage under ``~/.local/share/wandb`` (see :func:`keep_inside_run`) — so the folder can
    be copied to another machine and uploaded there; it prints one line on how, with ``wandb sync``. A run
    never fails because W&B is unreachable.

    On top of Lightning's logger:

    - the run config is the whole resolved run config (``config_file``, which train.py writes before it
      builds the loggers) plus ``output_dir`` and Hydra's ``overrides``; ``output_dir`` is also in the
      run summary, so a dashboard row leads to the checkpoints and metrics.json on disk;
    - in a Hydra multirun each job is its own W&B run, grouped by the sweep and named after its overrides
      (unless ``group``/``name`` are set);
    - the vocabulary the LightningModule keeps among its hyperparameters goes to the config as
      ``vocab_size`` only (the word list would swamp the dashboard's config table);
    - when the trainer fails, the run is finished as failed, so that the next job of a multirun starts
      a run of its own instead of continuing this one.

    Args:
        project, entity, name, group, tags, notes: as for ``wandb.init``.
        mode: ``auto`` | ``online`` | ``offline`` | ``disabled``; ``WANDB_MODE`` in the environment wins.
        save_dir: where the ``wandb/`` folder goes (the run's output dir).
        log_model: checkpoints as W&B artifacts (``True``: at the end of training; ``"all"``: every one).
            Only when online; offline runs keep their checkpoints on disk only.
        config_file: YAML file with the resolved run config (None: no config but the module's).
        output_dir: the run's output dir, recorded in the config and summary.
        **kwargs: passed on to ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "captioning",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str = "auto",
        save_dir: str = ".",
        log_model: bool | str = True,
        config_file: str | None = None,
        output_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.mode = resolve_wandb_mode(mode)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        keep_inside_run(Path(save_dir) / "wandb")
        # Checkpoints become artifacts only when there is a server to upload them to.
        log_model = log_model if self.mode == "online" else False
        labels = hydra_run_labels()
        config = _load_run_config(config_file, output_dir)
        if labels.get("overrides") is not None:
            config["overrides"] = labels["overrides"]
        config.update(kwargs.pop("config", None) or {})
        self.output_dir = config.get("output_dir")
        super().__init__(
            project=project, entity=entity, name=name or labels.get("name"), group=group or labels.get("group"),
            tags=list(tags or []), notes=notes, mode=self.mode, save_dir=save_dir, log_model=log_model,
            config=config, **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:  # wandb 0.19+ warns about the setting even when unset
            self._wandb_init.pop("anonymous", None)
        if self.mode == "offline":
            rank_zero_info(
                f"W&B is offline (no API key or no network): the run is saved under {Path(save_dir) / 'wandb'}; "
                f"upload it later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`."
            )

    @property
    def experiment(self) -> Any:
        """The W&B run, created on first use (rank 0 only; other ranks get a no-op stand-in)."""
        created = self._experiment is None
        run = super().experiment
        if created and self.output_dir and rank_zero_only.rank == 0 and hasattr(run, "summary"):
            run.summary["output_dir"] = self.output_dir
        return run

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        params = dict(vars(params) if isinstance(params, Namespace) else params)
        vocab = params.pop("vocab", None)
        if vocab is not None:
            params["vocab_size"] = len(vocab)
        super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # W&B going away mid-run (server down, disk full under wandb/) must not end a training run: warn
        # once, keep training; the CSV logger still has every number.
        try:
            super().log_metrics(metrics, step)
        except Exception as error:  # wandb raises its own types, and OSError / ConnectionError
            if not getattr(self, "_logging_failed", False):
                rank_zero_warn(f"W&B logging failed ({type(error).__name__}: {error}); training goes on, "
                               "metrics stay in the CSV log.")
            self._logging_failed = True

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Lightning finalizes with "failed" when fit/test raises; nothing logs to this run afterwards.
        if status == "failed" and self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=1)

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run now (entry points call it when the job ends); a no-op when none was started."""
        if self._experiment is not None and rank_zero_only.rank == 0 and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=exit_code)
