"""An advisory lock for preparation work that several processes may start at once: Lightning runs
``prepare_data`` on one process per node, and nodes often share the data directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX; elsewhere concurrent preparers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, with its folder) for the ``with`` block.

    The lock file stays behind: removing it would let a waiting process lock a file that a newcomer no
    longer sees. Whoever gets the lock second should check whether the work is already done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
