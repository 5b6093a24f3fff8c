"""Polling: running -> ended. One executor poll for every run in flight; a run marked for a kill
(a user's, or one marked before a crash) is cancelled here, an ended one is marked exited."""

from __future__ import annotations

from nightlab.loop.engine.context import Context
from nightlab.loop.executors import RunHandle
from nightlab.loop.state import ledger

CANCEL_GRACE_S = 10.0


def poll(ctx: Context) -> bool:
    """True when a run ended."""
    runs = ledger.running_runs(ctx.store)
    if not runs:
        return False
    handles = {r.id: RunHandle.from_json(r.handle) for r in runs}
    statuses = ctx.executor.poll(list(handles.values()))
    ended = False
    for run in runs:
        handle = handles[run.id]
        status = statuses[handle.key]
        where = f"{handle.slot}@{status.where}" if status.where else run.slot
        if where != run.slot:  # a cluster job: record the node it landed on
            ledger.set_run_slot(ctx.store, run.id, where)
        if status.state in ("pending", "running"):
            if run.kill_reason:  # marked for a kill (a user's, or ours before a crash): carry it out
                ctx.executor.cancel(handle, grace_s=CANCEL_GRACE_S)
            continue
        ledger.finish_run(ctx.store, run.id, status.exit_code, status.reason)
        ended = True
    return ended
