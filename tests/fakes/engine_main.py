"""Runs the engine in a subprocess with the scripted proposer, for kill -9 tests.

    python engine_main.py WORKSPACE STEPS_JSON MAX [KILL_AT NUMBER]

KILL_AT names a point of experiment NUMBER's cycle where this process SIGKILLs itself, exactly
there and every time (a timer from outside would race with phases that last milliseconds):
  proposed  the proposer has edited the tree, nothing committed yet
  launched  the run's process started, not yet recorded in `runs`
  running / finished   just after the candidate's phase was written
  recorded  just after the experiment's transaction committed
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nightlab.loop import engine, ledger
from nightlab.loop.executor import LocalExecutor

from tests.fakes.loop_workspace import stub_settings
from tests.fakes.scripted_proposer import ScriptedProposer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    workspace, steps, limit = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3])
    kill_at, number = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else ("", 0)
    proposer, executor = ScriptedProposer(steps), LocalExecutor()

    def at(point: str, n: int) -> None:
        if point == kill_at and n == number:
            _die()

    propose, launch = proposer.propose, executor.launch
    update, record = ledger.update_candidate, ledger.record_experiment

    def proposed(ctx):  # type: ignore[no-untyped-def]
        proposal = propose(ctx)
        at("proposed", ledger.open_candidates(engine_store)[0].number)
        return proposal

    def launched(spec):  # type: ignore[no-untyped-def]
        handle = launch(spec)
        at("launched", int(Path(spec.log_path).stem))
        return handle

    def updated(store, candidate_id, **fields):  # type: ignore[no-untyped-def]
        cand = update(store, candidate_id, **fields)
        if fields.get("phase") in ("running", "finished"):
            at(fields["phase"], cand.number)
        return cand

    def recorded(store, candidate_id, exp, event):  # type: ignore[no-untyped-def]
        done = record(store, candidate_id, exp, event)
        at("recorded", exp.number)
        return done

    proposer.propose, executor.launch = proposed, launched  # type: ignore[method-assign]
    ledger.update_candidate, ledger.record_experiment = updated, recorded
    engine_store = ledger.Store.for_workspace(workspace)
    return engine.run_engine(stub_settings(workspace), limit, proposer=proposer, executor=executor)


if __name__ == "__main__":
    sys.exit(main())
