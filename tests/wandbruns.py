"""Offline W&B runs as the tests read them, and train.py started with W&B offline.

An offline run is ``<output_dir>/wandb/offline-run-*/run-<id>.wandb``: W&B's record log (LevelDB log
framing around ``wandb.proto`` ``Record`` messages). :func:`read_run` parses it, so the tests check what
``wandb sync`` would upload: the run config, every history row, the summary, the exit code and the files.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace

from entrypoints import environment
from entrypoints import tiny as tiny_run
from entrypoints import train as run_train

_BLOCK, _HEADER = 32768, 7  # LevelDB log: 32 KiB blocks, 7-byte record headers (crc32, length, type)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    """The protobuf ``Record`` messages of a ``.wandb`` file, checksums verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B record log v0"
    position, parts = _HEADER, []
    while position + _HEADER <= len(data):
        if _BLOCK - position % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            position += _BLOCK - position % _BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        chunk = data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"corrupt record in {path}"
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _items(items) -> dict:
    """Record items -> dict; media and tables arrive as nested keys (("val/samples", "path"), ...)."""
    out: dict = {}
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
    return out


def read_run(path: Path) -> SimpleNamespace:
    """An offline run's ``run-*.wandb`` (or its folder) -> id, name, group, tags, config, history rows,
    summary and exit code."""
    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run = SimpleNamespace(id=None, name=None, group=None, tags=[], config={}, history=[], summary={},
                          exit_code=None, artifacts=[], local_paths=[])
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name, run.group = record.run.run_id, record.run.display_name, record.run.run_group
            run.tags = list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            run.artifacts.append((record.artifact.type, [e.path for e in record.artifact.manifest.contents]))
            # the files `wandb sync` will upload: W&B records where it staged them
            run.local_paths += [e.local_path for e in record.artifact.manifest.contents if e.local_path]
    run.config.pop("_wandb", None)
    return run


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((Path(output_dir) / "wandb").glob("offline-run-*"))


def wandb_env(tmp_path: Path, as_users_have_it: bool = False) -> dict[str, str]:
    """Offline W&B whose caches and artifact staging stay in the test's folder, not in $HOME.

    ``as_users_have_it``: no W&B directories set at all (a user's environment), with $HOME in the test's
    folder so that whatever W&B writes outside the run shows there.
    """
    env = environment(WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    if as_users_have_it:
        for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
            env.pop(key, None)
        return {**env, "HOME": str(tmp_path / "home")}
    return {**env, "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """The tiny run with the default loggers (CSV and W&B)."""
    return tiny_run(tmp_path, *extra, logger=None)


def train(tmp_path: Path, overrides: list[str], check: bool = True,
          as_users_have_it: bool = False) -> subprocess.CompletedProcess:
    return run_train(overrides, check, env=wandb_env(tmp_path, as_users_have_it))
