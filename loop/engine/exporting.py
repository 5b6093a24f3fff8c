"""Exporting: recorded -> done. results.tsv and autoresearch.jsonl are regenerated from the
ledger; in one transaction the recorded candidates are done, the follow-ups their outcomes ask
for are created (a confirm run and a re-measurement of the best, a rebase), places that could not
compare are remembered for the next wave, and the wave ends when nothing of it is in flight."""

from __future__ import annotations

from nightlab.loop.engine.context import Context
from nightlab.loop.engine.outcome import Outcome
from nightlab.loop.engine.planning import WANTED_KEY, WAVE_KEY
from nightlab.loop.executors.runfiles import trim_log
from nightlab.loop.state import ledger
from nightlab.loop.state.ledger import Candidate


def export(ctx: Context, members: list[Candidate]) -> None:
    store = ctx.store
    ledger.write_exports(ctx.ws.path, store, ctx.metric_name, ctx.direction, ctx.ws.branch)
    recorded = [c for c in members if c.phase == "recorded"]
    done = {c.id for c in recorded}
    others = [c for c in ledger.open_candidates(store) if c.id not in done]  # async: still running
    head = ctx.git.head()
    for cand in recorded:  # decided: only a person reads its log now, and the proposer its last crash's tail
        trim_log(ctx.log_path(cand.number), int(ctx.settings.loop.decided_log_mb * 2**20))
    # The wave ends in one transaction; a confirm run it asked for is created here, not while
    # recording, so it never joins the wave being recorded: it is the next wave, alone.
    with store.transaction():
        wanted = store.get(WANTED_KEY, [])
        for cand in recorded:
            ledger.update_candidate(store, cand.id, phase="done")
            assert cand.outcome is not None
            out = Outcome.from_json(cand.outcome)
            where = {"hardware": out.hardware, "node": out.node}
            # a change the data failed runs again as it was, or re-made on the best when the best moved on
            on_best = cand.base_commit == head
            if out.needs_confirm or (out.retry and on_best):
                _rerun(ctx, cand, out, where, others)
            if out.rebase or (out.retry and not on_best):  # from the best as it is now, before it can be kept
                ledger.new_candidate(
                    store, "rebase", head, confirm_of=cand.number,
                    description=f"rebase of #{cand.number}: {cand.description}", hypothesis=cand.hypothesis,
                    area=cand.area, params=cand.params, focus=cand.focus,
                )
            if not out.compared and where not in wanted:
                wanted.append(where)
        if wanted:
            store.set(WANTED_KEY, wanted)
        if not others:
            store.delete(WAVE_KEY)
    if not ctx.in_place:
        for cand in recorded:
            ctx.git.drop_snapshot(ctx.snapshot_path(cand.number))


def _rerun(ctx: Context, cand: Candidate, out: Outcome, where: dict[str, str], others: list[Candidate]) -> None:
    """A result to decide by re-running it: on the same hardware class, and node when a
    cluster's; the incumbent first when its own n is small (its result counts for the re-run),
    unless a measurement of it there on this setting is in flight already (async: `others`)."""
    assert cand.commit is not None
    # every re-run names the first run of its commit
    first, what = (cand.confirm_of, cand.description.split(": ", 1)[-1]) if cand.kind == "confirm" \
        else (cand.number, cand.description)
    if out.remeasure_best and not any(_measures(ctx, o, cand.base_commit, where) for o in others):
        ledger.new_candidate(
            ctx.store, "baseline", cand.base_commit, commit=cand.base_commit, phase="committed",
            description=f"re-measure the best for #{first}", focus=cand.focus, pin=where,
        )
    ledger.new_candidate(
        ctx.store, "confirm", cand.base_commit, commit=cand.commit, phase="committed",
        confirm_of=first, description=f"confirm #{first}: {what}",
        hypothesis=cand.hypothesis, area=cand.area, params=cand.params, focus=cand.focus,
        pin=where,
    )


def _measures(ctx: Context, other: Candidate, commit: str, where: dict[str, str]) -> bool:
    """`other` is a measurement of `commit` at `where` on the setting runs start on now."""
    if other.kind != "baseline" or other.commit != commit or other.pin != where:
        return False
    run = ledger.run_for_candidate(ctx.store, other.id) if other.phase == "running" else None
    return run is None or (run.setting or ctx.setting) == ctx.setting
