"""One engine per workspace: an flock()ed file holding the owner's pid.

The kernel drops the lock when the process dies (even by SIGKILL), so a stale file never blocks
a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nightlab.loop.errors import UserError
from nightlab.loop.store import state_dir

LOCK_FILENAME = "engine.lock"


def lock_path(workspace: Path) -> Path:
    return state_dir(workspace) / LOCK_FILENAME


class EngineLock:
    def __init__(self, workspace: Path) -> None:
        self.path = lock_path(workspace)
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"another nightlab engine (pid {holder(self.path.parents[1]) or '?'}) is running on"
                f" {self.path.parents[1]}; stop it first (or wait for it to finish)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def holder(workspace: Path) -> int | None:
    """The pid of the engine holding the workspace's lock, or None when nobody holds it."""
    path = lock_path(workspace)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        text = path.read_text().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
