"""Launching: committed -> running. A free slot (of the pinned hardware class when a candidate
has one), the protected files checked at the commit, the run started by the executor and
recorded in `runs` with its `experiment_started` event."""

from __future__ import annotations

from nightlab.loop.engine.context import ANYWHERE, Context
from nightlab.loop.engine.proposing import no_run
from nightlab.loop.engine.upgrading import notice_data_change
from nightlab.loop.executors import RunHandle, RunSpec, Slot
from nightlab.loop.executors.runfiles import find_handle
from nightlab.loop.runenv import sandbox_paths
from nightlab.loop.state import ledger
from nightlab.loop.state.ledger import Candidate
from nightlab.loop.workspace import protect, protected_mismatches

PYTHON_SINCE_ENV = "NIGHTLAB_PYTHON_SINCE"  # prepare.ENV_PYTHON_SINCE (importing prepare loads pyarrow)


def free_slot(ctx: Context, cand: Candidate | None = None) -> Slot | None:
    """A slot with no run; for a candidate pinned to a hardware class, one of that class (when
    this machine has one: a pin to a class no slot has any more does not hold the loop)."""
    used = {RunHandle.from_json(r.handle).slot for r in ledger.running_runs(ctx.store)}
    want = (cand.pin or ANYWHERE)["hardware"] if cand is not None else ""
    eligible = []
    if want:  # a slot's hardware: probed ahead, or else seen in its last run
        eligible = [s for s in ctx.slots if (s.hardware or ctx.slot_hardware.get(s.name)) == want]
    return next((s for s in eligible or ctx.slots if s.name not in used), None)


def launch(ctx: Context, cand: Candidate) -> None:
    assert cand.commit is not None
    git, ws = ctx.git, ctx.ws
    log = ctx.log_path(cand.number)
    # A launch that happened just before we were killed left its handle: adopt that run.
    handle = find_handle(log, since=cand.created_at)
    notice_data_change(ctx)  # what this run is scored on: the data as found now (async has no pause between runs)
    if handle is None:
        if ctx.in_place:
            ctx.reset_tree(cand.commit, cand.number)
            bad = protected_mismatches(ws)
        else:
            bad = protected_mismatches(ws, git.snapshot(ctx.run_dir(cand), cand.commit))
        if bad:
            if ctx.in_place:
                git.reset_to(cand.base_commit)
                protect(ws)
            return no_run(ctx, cand, "crash", f"rejected: protected files changed: {', '.join(bad)}")
        slot = free_slot(ctx, cand)
        assert slot is not None  # the cycle launches only with a free slot
        node = (cand.pin or ANYWHERE)["node"]
        # the harness holds the scorer's Python to how it was when this change began, before an agent edited
        env = {**ctx.env, PYTHON_SINCE_ENV: f"{cand.created_at:.3f}"}
        read_only, writable = sandbox_paths(ws.path, ctx.run_dir(cand))
        spec = RunSpec(ws.run_command, ctx.run_dir(cand), log, slot, env, node, read_only, writable)
        handle = ctx.executor.launch(spec)
    with ctx.store.transaction():
        ledger.add_run(ctx.store, cand.id, handle.to_json(), handle.slot, str(log), ctx.setting)
        ledger.update_candidate(ctx.store, cand.id, phase="running")
        ctx.store.emit(
            "experiment_started", number=cand.number, kind=cand.kind, description=cand.description,
            hypothesis=cand.hypothesis, area=cand.area, commit=cand.commit[:7], slot=handle.slot,
            focus=cand.focus,
        )
