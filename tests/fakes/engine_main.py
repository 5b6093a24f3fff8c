"""Runs the engine in a subprocess with the scripted proposer, for kill -9 tests.

    python engine_main.py WORKSPACE STEPS_JSON MAX [KILL_AT NUMBER]

or, as the daemon's engine program (DaemonOptions.engine_program; the daemon appends
`--config C --workspace W [--max-experiments N]`, as for `python -m nightlab.loop.engine`):

    python engine_main.py --steps STEPS_JSON [--kill-at POINT --kill-number N] --config C --workspace W ...

KILL_AT names a point of experiment NUMBER's cycle where this process SIGKILLs itself, exactly
there and every time (a timer from outside would race with phases that last milliseconds):
  proposing      the candidate exists (phase proposing), the proposer has not started
  proposed       the proposer has edited the tree, nothing committed yet
  git_committed  the commit exists in git, the candidate still says proposing
  committed      the candidate's phase `committed` is written (committed), no run launched yet
  launched       the run's process started, not yet recorded in `runs`
  running        just after the candidate's phase `running` was written (committed)
  polled         while running: a poll found the run alive and its log already has output
  exited         a poll found the run ended; nothing about it written yet
  finished       just after the candidate's phase `finished` (the verdict) was written (committed)
  resetting      inside the keep/reset step: `git reset --hard` done, `git clean` not yet
  git_lock       inside the keep/reset step, as git dies holding `.git/index.lock`
  recorded       just after the experiment's transaction committed
  exported       results.tsv / autoresearch.jsonl rewritten, the phase not yet `done`
  steering       a steering command applied, not yet marked done (NUMBER: ignored)

As the daemon's engine the kill is a crash of the whole service: the parent daemon is SIGKILLed
first (so it cannot restart us), then our own process group (the engine and any git it runs);
training runs live in their own sessions and survive, as they would a power cut of the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nightlab.loop import engine, ratchet
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger, steering
from nightlab.loop.state.commands import REGISTRY, Steer
from nightlab.loop.state.config import load_settings

from tests.fakes.loop_workspace import stub_settings
from tests.fakes.scripted_proposer import ScriptedProposer


def _die(service: bool) -> None:
    if service:
        os.kill(os.getppid(), signal.SIGKILL)  # the daemon first: it must not restart us
        if os.getpgrp() == os.getpid():  # we lead our group (the daemon starts us that way)
            os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_outbox(store: ledger.Store, parent: int, timeout: float) -> None:
    """Hold the daemon's clean stop until its bot has sent everything (bounded).

    The daemon stops as soon as the engine exits with engine.finished, and its bot does not
    deliver what is still waiting in the outbox before stopping (see tests/e2e/test_shutdown.py,
    an expected failure until that is fixed). The chaos suite checks what a KILL does to delivery,
    so its sessions end only once the bot has caught up: every channel's cursor at the last
    event, and no message still waiting.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.getppid() == parent:
        db = store.connection()
        last = store.last_event_id()
        cursors = [json.loads(r[0]) for r in db.execute("SELECT value FROM kv WHERE key LIKE 'bot.cursor.%'")]
        try:
            waiting = db.execute("SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'batched')").fetchone()[0]
        except sqlite3.OperationalError:  # no outbox table: the bot has not started yet
            waiting = 1
        if cursors and all(c is not None and c >= last for c in cursors) and waiting == 0:
            return
        time.sleep(0.1)


def _args(argv: list[str]) -> argparse.Namespace:
    if argv and not argv[0].startswith("--"):  # the positional form (tests/loop/test_engine.py)
        ns = argparse.Namespace(workspace=argv[0], steps=argv[1], max_experiments=int(argv[2]),
                                kill_at="", kill_number=0, config=None)
        if len(argv) > 4:
            ns.kill_at, ns.kill_number = argv[3], int(argv[4])
        return ns
    p = argparse.ArgumentParser()
    p.add_argument("--steps", required=True)
    p.add_argument("--kill-at", default="")
    p.add_argument("--kill-number", type=int, default=0)
    p.add_argument("--config", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--max-experiments", type=int)
    p.add_argument("--daemon-settings", action="store_true")  # the daemon's engines get it; a test never edits the file
    p.add_argument("--secrets-on-stdin", action="store_true")  # the chat tokens on stdin: not read here
    return p.parse_args(argv)


def main() -> int:
    args = _args(sys.argv[1:])
    ws_path, steps = Path(args.workspace), json.loads(Path(args.steps).read_text())
    kill_at, number, service = args.kill_at, args.kill_number, args.config is not None
    proposer, executor = ScriptedProposer(steps), LocalExecutor()
    engine_store = ledger.Store.for_workspace(ws_path)

    parent = os.getppid()

    def armed(point: str, n: int) -> bool:
        return point == kill_at and (n == number or point == "steering")

    def at(point: str, n: int) -> None:
        if armed(point, n):
            _die(service)

    def settle(n: int, *points: str) -> None:
        """Before the step a kill follows: let the daemon's bot send what earlier steps emitted,
        so that no message is in flight when we die (a kill during a send repeats that message:
        at-least-once delivery, which the `sending`/`reply_lost` scenarios test on purpose).
        Never inside the engine's write transactions: the bot could not mark anything sent."""
        if service and any(armed(p, n) for p in points):
            _wait_for_outbox(engine_store, parent, timeout=15.0)

    def current() -> int:
        open_ = ledger.open_candidates(engine_store)
        return open_[0].number if open_ else 0

    def current_phase() -> str:
        open_ = ledger.open_candidates(engine_store)
        return open_[0].phase if open_ else ""

    propose, launch, poll = proposer.propose, executor.launch, executor.poll
    update, record, export = ledger.update_candidate, ledger.record_experiment, ledger.write_exports
    commit_all, reset_to = ratchet.Git.commit_all, ratchet.Git.reset_to
    begin, apply_pending = ledger.Store.transaction, steering.apply_pending

    def proposing(ctx):  # type: ignore[no-untyped-def]
        settle(current(), "proposing", "proposed")
        at("proposing", current())
        proposal = propose(ctx)
        at("proposed", current())
        return proposal

    def launched(spec):  # type: ignore[no-untyped-def]
        n = int(Path(spec.log_path).stem)
        settle(n, "committed", "launched", "running")
        # Here, not where the phase is written: that write is inside a transaction (a kill there
        # would undo it, and the bot could not mark anything sent while we wait for it).
        at("committed", n)
        handle = launch(spec)
        at("launched", n)
        return handle

    def polled(handles):  # type: ignore[no-untyped-def]
        for h in handles:
            if Path(h.log_path).stem.isdigit():
                settle(int(Path(h.log_path).stem), "polled", "exited", "finished", "recorded")
        statuses = poll(handles)
        for h in handles:
            n = int(Path(h.log_path).stem) if Path(h.log_path).stem.isdigit() else 0
            if statuses[h.key].state == "running":
                if Path(h.log_path).exists() and Path(h.log_path).stat().st_size > 0:
                    at("polled", n)
            else:
                at("exited", n)
        return statuses

    after_commit: list[tuple[str, int]] = []  # kill points reached inside a write transaction

    def updated(store, candidate_id, **fields):  # type: ignore[no-untyped-def]
        cand = update(store, candidate_id, **fields)
        if fields.get("phase") in ("running", "finished"):
            if store.connection().in_transaction:  # dying now would undo the write: die once it is committed
                after_commit.append((fields["phase"], cand.number))
            else:
                at(fields["phase"], cand.number)
        return cand

    @contextlib.contextmanager
    def transaction(store):  # type: ignore[no-untyped-def]
        with begin(store) as db:
            yield db
        if not store.connection().in_transaction:  # the outermost one has committed
            reached = list(after_commit)
            after_commit.clear()
            for point, n in reached:
                at(point, n)

    def recorded(store, candidate_id, exp, event):  # type: ignore[no-untyped-def]
        done = record(store, candidate_id, exp, event)
        at("recorded", exp.number)
        return done

    def exported(*a, **kw):  # type: ignore[no-untyped-def]
        settle(current(), "exported")
        export(*a, **kw)
        at("exported", current())

    def committed_all(self, message):  # type: ignore[no-untyped-def]
        settle(current(), "git_committed")
        sha = commit_all(self, message)
        at("git_committed", current())
        return sha

    def resetting(self, sha):  # type: ignore[no-untyped-def]
        if current_phase() == "finished" and current() == number and kill_at in ("resetting", "git_lock"):
            settle(number, kill_at)
            if kill_at == "git_lock":
                # What a git killed mid-write leaves: its lock file (git creates it first, renames it last).
                (Path(self.repo.git_dir) / "index.lock").write_bytes(b"")
            else:
                self.g.reset("--hard", "-q", sha)
            at(kill_at, number)
        return reset_to(self, sha)

    def applying_pending(store, loop):  # type: ignore[no-untyped-def]
        # before the command's transaction: the daemon's start message may still be on its way
        if store.pending_commands() and not store.connection().in_transaction:
            settle(0, "steering")
        return apply_pending(store, loop)

    def applying(apply):  # type: ignore[no-untyped-def]
        def applied(self, store, loop, by):  # type: ignore[no-untyped-def]
            result = apply(self, store, loop, by)
            at("steering", 0)
            return result
        return applied

    proposer.propose, executor.launch, executor.poll = proposing, launched, polled  # type: ignore[method-assign]
    ledger.update_candidate, ledger.record_experiment, ledger.write_exports = updated, recorded, exported
    ratchet.Git.commit_all, ratchet.Git.reset_to = committed_all, resetting  # type: ignore[method-assign]
    for spec in REGISTRY.values():  # every steering command's action
        if issubclass(spec, Steer):
            spec.apply = applying(spec.apply)  # type: ignore[method-assign]
    ledger.Store.transaction = transaction  # type: ignore[method-assign]
    steering.apply_pending = applying_pending
    if service:
        settings = load_settings(args.config)
        settings = dataclasses.replace(settings, workspace=dataclasses.replace(settings.workspace, path=str(ws_path)))
        stop = threading.Event()  # as `python -m nightlab.loop.engine`: SIGTERM stops at a checkpoint
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        code = engine.run_engine(settings, args.max_experiments, stop, proposer=proposer, executor=executor,
                                 parent_pid=os.getppid())
        if code == 0 and engine_store.get("engine.finished"):
            _wait_for_outbox(engine_store, parent, timeout=20.0)
        return code
    return engine.run_engine(stub_settings(ws_path), args.max_experiments, proposer=proposer, executor=executor)


if __name__ == "__main__":
    sys.exit(main())
