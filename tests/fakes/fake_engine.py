"""A stand-in for `python -m nightlab.loop.engine` that the daemon can be told to launch.

It speaks the engine's side of the contract the heartbeat relies on: kv['engine.tick'] while
alive, `.nightlab/engine.lock`, exit when the parent daemon is gone, exit 0 with kv['engine.finished'] when done, runs
launched through the real executor and recorded in `runs`. Misbehaviour on request:

    --freeze-first    the first instance stops ticking after 1 s; SIGTERM then takes it 2 s
    --die-first       the first instance exits with code 3 after 0.5 s
    --always-die      every instance exits with code 3 after 0.5 s
    --finish-when F   set engine.finished and exit 0 once the file F exists (the test says when)
    --launch-run CMD  the first instance launches CMD as a run (and records it when it ends)
    --start-experiment  the first instance says experiment #1 started with its first tick

Every start appends its pid to kv['fake_engine.starts'] and records its --max-experiments.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from nightlab.loop.executors import RunHandle, RunSpec, Slot
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger
from nightlab.loop.state.lock import EngineLock
from nightlab.loop.state.store import Store, state_dir

TICK_S = 0.2


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--max-experiments", type=int)
    p.add_argument("--daemon-settings", action="store_true")  # the daemon's engines get it; no config read here
    p.add_argument("--secrets-on-stdin", action="store_true")  # the chat tokens on stdin: not read here
    p.add_argument("--freeze-first", action="store_true")
    p.add_argument("--die-first", action="store_true")
    p.add_argument("--always-die", action="store_true")
    p.add_argument("--finish-when", type=Path)
    p.add_argument("--launch-run")
    p.add_argument("--start-experiment", action="store_true")
    args = p.parse_args()

    workspace = Path(args.workspace)
    EngineLock(workspace).acquire()  # one engine per workspace, as the real one
    store = Store.for_workspace(workspace)
    with store.transaction():
        starts = store.get("fake_engine.starts", [])
        store.set("fake_engine.starts", [*starts, os.getpid()])
        store.set("fake_engine.max_experiments", args.max_experiments)
    first = not starts
    parent = os.getppid()
    executor = LocalExecutor()
    if args.launch_run and first:
        log = state_dir(workspace) / "runs" / "run1.log"
        handle = executor.launch(RunSpec(args.launch_run, workspace, log, Slot("cpu0")))
        ledger.add_run(store, 1, handle.to_json(), "cpu0", str(log))

    started = time.time()
    while os.getppid() == parent:
        age = time.time() - started
        if (args.always_die or (args.die_first and first)) and age > 0.5:
            return 3
        if args.freeze_first and first and age > 1.0:
            # frozen; and slow to stop, so the heartbeat's "engine frozen" window is observable
            signal.signal(signal.SIGTERM, lambda *_: (time.sleep(2.0), os._exit(0)))
            while True:
                time.sleep(1)
        if args.finish_when is not None and args.finish_when.exists():
            store.set("engine.finished", True)
            return 0
        with store.transaction():  # one write: no reader sees the tick without the event
            store.set("engine.tick", time.time())
            if args.start_experiment and first:
                args.start_experiment = False
                store.emit("experiment_started", number=1, kind="candidate", description="first")
        for run in ledger.running_runs(store):  # the engine's part: record runs that ended
            status = executor.poll([RunHandle.from_json(run.handle)])
            if all(s.state != "running" for s in status.values()):
                ledger.finish_run(store, run.id, next(iter(status.values())).exit_code)
        time.sleep(TICK_S)
    return 0  # the daemon is gone


if __name__ == "__main__":
    raise SystemExit(main())
