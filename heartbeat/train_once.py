"""`nightlab train`: the workspace's run once, outside the loop, its log streamed to the terminal."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

from nightlab.loop.executors import RunSpec
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.executors.runfiles import read_tail
from nightlab.loop.runenv import run_environment, sandbox_paths
from nightlab.loop.state.config import Settings
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.lock import DAEMON_LOCK, holder
from nightlab.loop.state.store import DB_FILENAME, state_dir
from nightlab.loop.summary import parse_summary
from nightlab.loop.workspace import init_workspace, open_workspace, to_stderr


def train_once(settings: Settings, profile: str | None) -> int:
    """Run the workspace's train.py once through the executor, streaming its log; the exit code."""
    path = settings.workspace_path
    if profile:
        settings = dataclasses.replace(settings, trainer=dataclasses.replace(settings.trainer, profile=profile))
    if (state_dir(path) / DB_FILENAME).exists():
        ws = open_workspace(path, settings)
        if profile and profile != "auto" and profile != ws.profile:
            to_stderr(f"note: {path} was set up with profile {ws.profile!r}; running it as it is")
    else:
        ws = init_workspace(path, settings.workspace.tag, settings)
    # the daemon's lock too: its engine's is free while the daemon restarts it
    pid = holder(ws.path, DAEMON_LOCK) or holder(ws.path)
    if pid is not None:
        raise UserError(f"nightlab (pid {pid}) is running in {ws.path}; stop it before `nightlab train` (`systemctl"
                        " stop nightlab` or kill that pid: a paused loop still owns the workspace)")
    env = run_environment(ws, settings)
    executor = LocalExecutor(settings.executor.gpus, settings.executor.cpu_slots)
    log = state_dir(ws.path) / "runs" / f"train-{int(time.time())}.log"
    read_only, writable = sandbox_paths(ws.path, ws.path)
    handle = executor.launch(RunSpec(ws.run_command, ws.path, log, executor.slots()[0], env,
                                     read_only=read_only, writable=writable))
    to_stderr(f"running `{ws.run_command}` in {ws.path} (log {log})")
    offset = 0
    # The run is in a session of its own (it outlives a daemon restart), so a closed terminal or a
    # `kill` would not reach it: those end it as Ctrl-C does, not leave it holding the GPU; and so
    # does a reader of its output that went away.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            state = executor.poll([handle])[handle.key]
            offset = _stream(log, offset)
            if state.state != "running":
                break
            time.sleep(0.2)
    except (KeyboardInterrupt, BrokenPipeError):  # `nightlab train | head`: the reader has gone too
        executor.cancel(handle, grace_s=5)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _stream(log, offset)
    summary = parse_summary(read_tail(log, 64 * 1024))
    code = state.exit_code if state.exit_code is not None else 1
    if summary.complete:
        print("\nsummary: " + ", ".join(f"{k}={v:g}" for k, v in summary.metrics.items()))
    print(f"exit code {code}" + ("" if summary.complete else "; no summary block in the log"))
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stream(log: Path, offset: int) -> int:
    with open(log, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)
