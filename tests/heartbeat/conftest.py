"""A real daemon in a subprocess (real APScheduler, real signals, real process trees) with a fake
engine (tests/fakes/fake_engine.py) and heartbeat limits shortened through its config file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from nightlab.loop.state.store import Store

from tests.fakes.slack_server import FakeSlack
from tests.fakes.telegram_server import FakeTelegram

FAKES = Path(__file__).resolve().parents[1] / "fakes"

FAST = {
    "check_interval": 0.3,
    "run_timeout": 600.0,
    "stall_after": 600.0,
    "loop_stall_after": 600.0,
    "max_restarts_per_hour": 3,
    "min_free_disk_gb": 0.0,
    "report_time": "",
}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def write_config(path: Path, extra: str = "", **heartbeat: object) -> Path:
    values = {**FAST, **heartbeat}
    lines = ["[heartbeat]"] + [
        f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in values.items()
    ]
    path.write_text(extra + "\n".join(lines) + "\n")
    return path


@dataclass
class DaemonRun:
    proc: subprocess.Popen[bytes]
    workspace: Path
    log_path: Path
    store: Store

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, kind: str) -> list[dict]:
        return [e.payload for e in self.store.events_after(0, 10_000) if e.kind == kind]

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@dataclass
class Harness:
    tmp: Path
    started: list[DaemonRun] = field(default_factory=list)
    cleanup_pids: list[int] = field(default_factory=list)

    def start(
        self,
        *engine_flags: str,
        env: dict[str, str] | None = None,
        max_experiments: int | None = None,
        name: str = "daemon",
        real_engine: bool = False,
        extra_config: str = "",
        channels: bool = False,
        **heartbeat: object,
    ) -> DaemonRun:
        """A daemon with the fake engine and `engine_flags`, or with the real engine; `channels`: the
        chats the config names (else none)."""
        workspace = self.tmp / "ws"
        workspace.mkdir(exist_ok=True)
        config = write_config(self.tmp / f"{name}.toml", extra_config, **heartbeat)
        log_path = self.tmp / f"{name}.log"
        argv = [sys.executable, str(FAKES / "daemon_main.py"), str(config), str(workspace)]
        if max_experiments is not None:
            argv += ["--max-experiments", str(max_experiments)]
        argv += ["--channels"] if channels else []
        argv.append("--")
        if not real_engine:
            argv += [sys.executable, str(FAKES / "fake_engine.py"), *engine_flags]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        run = DaemonRun(proc, workspace, log_path, Store.for_workspace(workspace))
        self.started.append(run)
        return run


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    for run in h.started:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(10)
    # Engines exit when their daemon is gone; runs (own sessions) must be cleaned up by hand.
    for pid in h.cleanup_pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def telegram() -> Iterator[FakeTelegram]:
    with FakeTelegram() as fake:
        yield fake


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake
