"""The engine process: `python -m nightlab.loop.engine`, one per workspace (its lock), until
stopped (SIGTERM/SIGINT at the next checkpoint) or `--max-experiments` are recorded.

    python -m nightlab.loop.engine --config FILE [--workspace PATH] [--max-experiments N]
                                   [--prepared-data DIR] [--daemon-settings] [--secrets-on-stdin]

`--prepared-data`: the daemon has just prepared the built-in trainer's data dir; the engine
uses it as it is instead of preparing it again (a standalone engine prepares it itself).
`--daemon-settings`: the daemon's engine runs with the config the daemon loaded (kv
DAEMON_CONFIG_KEY), so an edit of the file takes effect on a reload or a restart, as said, and
never by surprise when the heartbeat restarts this process.
`--secrets-on-stdin`: the daemon kept the chat tokens' variables out of this environment and
writes their values on stdin (one JSON list), read once at the start so they are starred out too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from nightlab.loop.engine.context import say
from nightlab.loop.engine.cycle import Engine
from nightlab.loop.executors import Executor, make_executor
from nightlab.loop.proposers.base import ProposalStopped, Proposer
from nightlab.loop.runenv import run_environment
from nightlab.loop.state.config import (
    DAEMON_CONFIG_KEY,
    LIVE_HEARTBEAT_KEY,
    HeartbeatSettings,
    Secret,
    Settings,
    load_settings,
    settings_from_text,
)
from nightlab.loop.state.errors import EXIT_USER_ERROR, USER_ERROR_KEY, UserError
from nightlab.loop.state.lock import EngineLock, LockHeld
from nightlab.loop.state.store import DB_FILENAME, Store, state_dir, unusable
from nightlab.loop.workspace import open_workspace


def _proposer_tick(store: Store, stop: threading.Event, lock: EngineLock) -> None:
    """Called about once a second while a slow proposer works (an agent, for minutes): liveness
    for the heartbeat, the lock file put back if the agent removed it, and a way out on stop.
    Steering commands wait until the proposal is in, because the proposer owns the working tree
    until then."""
    store.set("engine.tick", time.time())
    lock.keep()
    if stop.is_set():
        raise ProposalStopped("the engine is stopping")


def run_engine(
    settings: Settings,
    max_experiments: int | None = None,
    stop: threading.Event | None = None,
    *,
    proposer: Proposer | None = None,
    executor: Executor | None = None,
    parent_pid: int | None = None,
    prepared_data: Path | None = None,
    handed: Iterable[Secret] = (),
) -> int:
    """Run the loop in this process until `stop` is set or `max_experiments` are recorded.
    `prepared_data`: the data dir the daemon prepared (None: prepare it here); `handed`: the chat
    tokens the daemon kept out of this environment, to be starred out too."""
    ws = open_workspace(settings.workspace_path, settings)
    lock = EngineLock(ws.path)
    lock.acquire()
    try:
        stop = stop or threading.Event()
        if proposer is None:
            from nightlab.loop.proposers import make_proposer

            proposer = make_proposer(settings, tick=lambda: _proposer_tick(ws.store, stop, lock))
        # Quiet: the daemon prepared the data and said so just before starting this process.
        env = run_environment(ws, settings, lambda _: None, prepared=prepared_data)
        engine = Engine(settings, ws, executor or make_executor(settings), proposer, env, stop, parent_pid, handed)
        return engine.run(max_experiments)
    finally:
        lock.release()


def _daemon_settings(workspace: Path) -> Settings | None:
    """The settings the daemon runs with: the config text it loaded, with [heartbeat] as it last
    reloaded it; None when none is stored (the engine then reads the file)."""
    store = Store.for_workspace(workspace)
    try:
        loaded, live = store.get(DAEMON_CONFIG_KEY), store.get(LIVE_HEARTBEAT_KEY)
    finally:
        store.close()
    if not loaded:
        return None
    settings = settings_from_text(loaded["text"], loaded["path"])
    return dataclasses.replace(settings, heartbeat=HeartbeatSettings(**live)) if live else settings


def _handed_secrets() -> list[Secret]:
    """The chat tokens the daemon kept out of this environment, read once from stdin (one JSON list
    of strings; heartbeat/engine_child.py writes it and closes the pipe). stdin is /dev/null after,
    so nothing this engine starts (an agent, a run, a check) can read them there."""
    try:
        chunks = []
        while chunk := os.read(0, 1 << 16):
            chunks.append(chunk)
        values = json.loads(b"".join(chunks))
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError
    except (OSError, ValueError) as exc:  # never the content in the message: it may be a token
        why = exc.strerror if isinstance(exc, OSError) else "not a JSON list of strings"
        say(f"the chat tokens the daemon hands over on stdin could not be read ({why}); the engine runs on, but"
            " a chat token an agent or a run writes back is not starred out: restart nightlab if this is said again")
        values = []
    finally:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    return [Secret(v) for v in values]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nightlab.loop.engine",
                                     description="The experiment cycle, until stopped.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workspace", help="overrides [workspace] path")
    parser.add_argument("--max-experiments", type=int, default=None)
    parser.add_argument("--prepared-data", type=Path, default=None,
                        help="the data dir the daemon prepared (skips preparing it again)")
    parser.add_argument("--daemon-settings", action="store_true",
                        help="run with the config the daemon loaded (kept in the workspace's store), not the"
                             " file as it is now")
    parser.add_argument("--secrets-on-stdin", action="store_true",
                        help="read the chat tokens the daemon kept out of this environment from stdin (a JSON list)")
    args = parser.parse_args(argv)
    handed = _handed_secrets() if args.secrets_on_stdin else []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings: Settings | None = None
    try:
        settings = _daemon_settings(Path(args.workspace)) if args.daemon_settings and args.workspace else None
        settings = settings or load_settings(args.config)
        if args.workspace:
            settings = dataclasses.replace(
                settings, workspace=dataclasses.replace(settings.workspace, path=str(args.workspace))
            )
        return run_engine(settings, args.max_experiments, stop, parent_pid=os.getppid(),
                          prepared_data=args.prepared_data, handed=handed)
    except LockHeld as exc:  # an engine on its way out (a restart's race): the daemon's next try gets it
        print(f"nightlab: {exc}", file=sys.stderr)
        return 1
    except (UserError, sqlite3.DatabaseError) as exc:
        if isinstance(exc, sqlite3.DatabaseError) and "locked" in str(exc):
            raise  # another process's long write: a restart heals it
        text = str(exc)
        if isinstance(exc, sqlite3.DatabaseError):  # damaged past its schema, or its disk filled
            text = unusable(state_dir(settings.workspace_path) / DB_FILENAME if settings else Path(DB_FILENAME), exc)
        print(f"nightlab: {text}", file=sys.stderr)
        if settings is not None:
            _tell_the_daemon(settings.workspace_path, text)
        return EXIT_USER_ERROR


def _tell_the_daemon(workspace: Path, text: str) -> None:
    """What stopped the engine, for the daemon to say in chat before it stops too: a restart would
    only meet the same problem. Not written where there is no state database to write it in."""
    if not (state_dir(workspace) / DB_FILENAME).is_file():
        return
    try:
        Store.for_workspace(workspace).set(USER_ERROR_KEY, text)
    except (UserError, sqlite3.Error):  # the problem is the store itself: the daemon's log has it
        pass
