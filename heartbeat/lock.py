"""One daemon per workspace: <workspace>/.nightlab/daemon.lock (see loop/state/lock.py for how)."""

from __future__ import annotations

from pathlib import Path

from nightlab.loop.state.lock import DAEMON_LOCK, PidLock


class DaemonLock(PidLock):
    def __init__(self, workspace: Path) -> None:
        super().__init__(
            workspace, DAEMON_LOCK,
            "nightlab is already running for {workspace} (pid {pid}); stop it first"
            " (e.g. `systemctl stop nightlab` or kill that pid)",
        )
