"""The engine as a child process of the daemon, so the heartbeat can really stop it.

Why a process and not a thread: a Python thread cannot be killed from outside. An engine stuck in
a blocking call (a hung git, an sqlite lock, a deadlock in a library) would stay stuck forever and
the heartbeat could only watch. A child process can be terminated and, if it ignores that,
SIGKILLed; its replacement rebuilds everything from the state store, which is built for exactly
that (every step of a cycle is idempotent from its recorded phase).

The engine gets its own process group so a stop also takes down whatever it started itself
(git, a coding agent), while training runs, which the executor starts in their own sessions, are
left running for the next engine to re-attach.

The chat tokens the daemon keeps out of the engine's environment reach it once, on a pipe on its
stdin (never argv or the environment, which other processes of the user can read), so it can star
them out of what an agent or a run writes back: an agent can still find them in the daemon's
/proc/<pid>/environ.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil
from nightlab.loop.state.config import Secret
from nightlab.loop.state.lock import holder

log = logging.getLogger(__name__)

ENGINE_STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL: the engine stops at its next checkpoint (~1 s)


def engine_argv(config: Path, workspace: Path, max_experiments: int | None,
                program: Sequence[str] | None = None, prepared_data: Path | None = None) -> list[str]:
    """The engine's command line (ARCHITECTURE.md: engine entry point); `program` replaces
    `python -m nightlab.loop.engine`, e.g. with a fake engine in tests; `prepared_data`: the data
    dir the daemon prepared, so the engine does not prepare it again."""
    argv = list(program or (sys.executable, "-m", "nightlab.loop.engine"))
    # --daemon-settings: the config as the daemon loaded it, not the file as it is now
    argv += ["--config", str(config), "--workspace", str(workspace), "--daemon-settings"]
    if max_experiments is not None:
        argv += ["--max-experiments", str(max_experiments)]
    if prepared_data is not None:
        argv += ["--prepared-data", str(prepared_data)]
    return argv


class EngineProcess:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 handed: Sequence[Secret] | None = None) -> None:
        self.argv = list(argv)
        self.env = None if env is None else dict(env)  # None: this process's environment
        # None: the engine reads no stdin; else these values go to it on stdin, with the flag that says so
        self.handed = None if handed is None else list(handed)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False  # its group was killed; never signal that pgid again (pid reuse)
        self.started_at = 0.0  # the heartbeat gives a fresh engine this long before expecting ticks

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        # stdout/stderr are inherited: the engine's log lines land in the daemon's journal.
        argv, stdin = (self.argv, subprocess.DEVNULL) if self.handed is None else (
            [*self.argv, "--secrets-on-stdin"], subprocess.PIPE)
        self._proc = subprocess.Popen(argv, stdin=stdin, start_new_session=True, env=self.env)
        self._stopped = False
        self.started_at = time.time()
        log.info("engine started (pid %d)", self._proc.pid)
        if self._proc.stdin is not None and self.handed is not None:
            self._hand_over(self._proc.stdin, self.handed)

    def _hand_over(self, pipe: IO[bytes], handed: list[Secret]) -> None:
        # A few hundred bytes: the pipe's buffer takes them whether or not the engine reads yet.
        try:
            with pipe:
                pipe.write(json.dumps([s.reveal() for s in handed]).encode())
        except BrokenPipeError:  # it died at once; its restart gets them again
            log.warning("engine (pid %d) exited before it got the chat tokens", self.pid)

    def poll(self) -> int | None:
        """None while running (or never started); the exit code once it has ended."""
        if self._proc is None:
            return None
        return self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the engine's process group, SIGKILL it after `grace_s`; returns the exit code."""
        proc = self._proc
        if proc is None or self._stopped:
            return None if proc is None else proc.poll()
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("engine (pid %d) ignored SIGTERM for %.0fs; killing it", proc.pid, grace_s)
        # Also when the leader has exited: helpers it started may still be in the group.
        _killpg(proc.pid, signal.SIGKILL)
        self._stopped = True
        return proc.wait()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_leftover_engine(workspace: Path, grace_s: float) -> int | None:
    """Stop an engine left over by a previous daemon; returns its pid, None when there was none.

    Under the daemon lock no other daemon lives, so an engine holding the workspace's engine lock
    is an orphan (the daemon was SIGKILLed, or systemd restarted it with KillMode=process). It
    would exit by itself at its next checkpoint, but a frozen one never would, and it would keep
    every new engine from starting.
    """
    pid = holder(workspace)
    if pid is None or pid <= 0:
        return None
    log.warning("stopping an engine left over by a previous daemon (pid %d)", pid)
    try:
        proc = psutil.Process(pid)
        group = os.getpgid(pid) == pid  # our engines lead their own group (start_new_session)
        _killpg(pid, signal.SIGTERM) if group else proc.terminate()
        try:
            proc.wait(grace_s)
        except psutil.TimeoutExpired:
            _killpg(pid, signal.SIGKILL) if group else proc.kill()
            proc.wait(grace_s)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    return pid
