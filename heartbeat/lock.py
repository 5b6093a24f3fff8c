"""One daemon per workspace: an fcntl.flock on <workspace>/.nightlab/daemon.lock.

flock locks belong to the open file, so the kernel drops the lock the moment the daemon dies,
even by SIGKILL: no stale-lock cleanup. The file also holds the owner's pid for the message a
second daemon prints. Python opens files close-on-exec, so neither the engine nor a training
run inherits the lock (a surviving run must not keep the workspace locked).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from nightlab.loop.errors import UserError
from nightlab.loop.store import state_dir

LOCK_FILENAME = "daemon.lock"


class AlreadyRunning(UserError):
    def __init__(self, workspace: Path, pid: int | None) -> None:
        super().__init__(
            f"nightlab is already running for {workspace} (pid {pid if pid else 'unknown'});"
            " stop it first (e.g. `systemctl stop nightlab` or kill that pid)"
        )
        self.pid = pid


class DaemonLock:
    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)
        self.path = state_dir(self.workspace) / LOCK_FILENAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.workspace, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Truncate first so a reader never sees our pid after we are gone.
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
