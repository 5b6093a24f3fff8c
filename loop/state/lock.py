"""One process per role and workspace: an flock()ed file under .nightlab/ holding the owner's pid.

flock locks belong to the open file, so the kernel drops the lock the moment the owner dies, even
by SIGKILL: a stale file never blocks a restart. Python opens files close-on-exec, so a child
(a training run that outlives us) never inherits the lock. The daemon and the engine each hold
one (`daemon.lock`, `engine.lock`).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import state_dir

ENGINE_LOCK = "engine.lock"
DAEMON_LOCK = "daemon.lock"  # taken by heartbeat/lock.py; the views ask whether a daemon runs


class LockHeld(UserError):
    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class PidLock:
    def __init__(self, workspace: Path, filename: str, held_message: str) -> None:
        """`held_message` is formatted with {pid} and {workspace} when someone else holds it."""
        self.workspace = Path(workspace)
        self.path = state_dir(self.workspace) / filename
        self.held_message = held_message
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            message = self.held_message.format(pid=pid or "unknown", workspace=self.workspace)
            raise LockHeld(message, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def keep(self) -> int | None:
        """Put the lock file back where it was removed (an agent's `git clean -fdx`, `rm -rf .nightlab`):
        the lock held on the removed file is no one else's to see, and a second daemon or engine would
        start on the workspace beside this one. None when held (again); else the pid of the one that
        took it while it was gone."""
        if self._fd is None:
            return None
        try:
            st = self.path.stat()
            held = os.fstat(self._fd)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                return None
        except OSError:  # gone, or its folder replaced: put back below
            pass
        old = self._fd
        try:
            self.acquire()
        except LockHeld as exc:
            return exc.pid or -1
        except OSError:  # the folder not writable just now: tried again at the next call
            return None
        os.close(old)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a reader never sees our pid after we are gone
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class EngineLock(PidLock):
    def __init__(self, workspace: Path) -> None:
        super().__init__(
            workspace, ENGINE_LOCK,
            "another nightlab engine (pid {pid}) is running on {workspace}; stop it first (or wait for it to finish)",
        )


def holder(workspace: Path, filename: str = ENGINE_LOCK) -> int | None:
    """The pid holding a workspace's lock, or None when nobody holds it (-1: held, pid unknown)."""
    path = state_dir(workspace) / filename
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _read_pid(fd) or -1
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
