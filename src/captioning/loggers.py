"""Loggers: W&B that goes offline by itself instead of failing a run."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["WandbLogger", "resolve_wandb_mode"]

MODES = ("auto", "online", "offline", "disabled")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
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
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return "online" if _has_api_key() and _reachable(host.split(":")[0]) else "offline"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``mode="auto"``: online when it can be, offline when not.

    An offline run keeps everything under ``<save_dir>/wandb/`` and prints one line on how to upload it
    later with ``wandb sync``; a run never fails because W&B is unreachable.
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
        log_model: bool | str = False,
        **kwargs: Any,
    ) -> None:
        self.mode = resolve_wandb_mode(mode)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        # Checkpoints become artifacts only when there is a server to upload them to.
        log_model = log_model if self.mode == "online" else False
        super().__init__(
            project=project, entity=entity, name=name, group=group, tags=list(tags or []), notes=notes,
            mode=self.mode, save_dir=save_dir, log_model=log_model, **kwargs,
        )
        if self.mode == "offline":
            rank_zero_info(
                f"W&B is offline (no API key or no network): the run is saved under {Path(save_dir) / 'wandb'}; "
                f"upload it later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`."
            )
