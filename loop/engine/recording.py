"""Recording: finished -> recorded. Git moves to where the decision put it (keep: the
candidate's commit; otherwise its base), and the experiment and its `experiment_finished` event
are written once, in one transaction; failures in a row pause the loop, a run of discards is
said once."""

from __future__ import annotations

from typing import Any

from nightlab.loop import hardware
from nightlab.loop.engine.context import Context, say
from nightlab.loop.engine.deciding import held_out_opinion
from nightlab.loop.engine.outcome import Outcome
from nightlab.loop.engine.streaks import failures_in_a_row, without_a_keep
from nightlab.loop.state import ledger, views
from nightlab.loop.state.ledger import Candidate, Experiment, HardwareClass

DISCARDS_SAID_KEY = "loop.discards_said"  # kv: the keep whose following run of discards was reported


def record(ctx: Context, cand: Candidate) -> None:
    assert cand.outcome is not None
    out = Outcome.from_json(cand.outcome)
    commit = cand.commit or cand.base_commit
    target = out.head_after or (commit if out.moves_head else cand.base_commit)
    ctx.reset_tree(target, cand.number)
    rows = ledger.experiments(ctx.store)
    hw = out.hardware
    setting = out.setting or ctx.setting  # an outcome an older nightlab decided has none
    if hw:  # the best of its class before it
        ref = ledger.reference(rows, HardwareClass(hw, setting))
        previous = None if ref is None else ref.best
    else:  # no run (a proposer failure, a rejection): the last best recorded
        previous = ctx.best(rows)
    opinion = held_out_opinion(ctx, cand, out, rows)
    reason = out.reason + ("" if opinion is None else f"; {opinion.text()}")
    metrics = out.metrics if opinion is None else {**out.metrics, **opinion.metrics}
    exp = Experiment(
        number=cand.number, kind=cand.kind, confirm_of=cand.confirm_of, commit=commit,
        status=out.status, metric=out.metric, metrics=metrics, best=out.best_after,
        confidence=out.confidence, description=cand.description, hypothesis=cand.hypothesis,
        area=cand.area, params=cand.params, focus=cand.focus, reason=reason,
        lines_added=cand.lines_added, lines_removed=cand.lines_removed, duration_s=out.duration_s,
        slot=out.slot, started_at=out.started_at, finished_at=out.finished_at,
        hardware=hw, setting=setting if hw else "",
    )
    night = _night_patch(ctx, exp, rows)
    with ctx.store.transaction():
        if night is not None:
            ledger.record_patch(ctx.store, night)
        if not ledger.record_experiment(ctx.store, cand.id, exp, finished_event(ctx, exp, out, previous, rows)):
            ledger.update_candidate(ctx.store, cand.id, phase="recorded")
            return
        _on_streaks(ctx, [*rows, exp])
    ctx.learn([exp])
    # a run to be repeated is recorded as a discard, but undecided, as the digest and the views say
    shown = "undecided" if out.needs_confirm or out.retry else exp.status
    say(f"#{exp.number} {shown} {exp.metric if exp.metric is not None else ''} {exp.reason}")


def _night_patch(ctx: Context, exp: Experiment, rows: list[Experiment]) -> ledger.Patch | None:
    """A kept commit against the night's baseline: what /diff shows of the best. A baseline keeps
    one when it measured a commit of the user's (an edit committed between nights); one that
    re-measured a kept change finds its patch recorded."""
    base = views.baseline(rows, exp.hardware_class)
    if exp.status != "keep" or base is None or base.commit == exp.commit:
        return None
    if exp.kind == "baseline" and ledger.recorded_patch(ctx.store, base.commit, exp.commit) is not None:
        return None
    return ctx.patch(base.commit, exp.commit)


def finished_event(ctx: Context, exp: Experiment, out: Outcome, previous: float | None,
                   rows: list[Experiment]) -> dict[str, Any]:
    """The `experiment_finished` payload (ARCHITECTURE.md: events); `rows`: the experiments before it."""
    # A baseline is a new best only as the night's first keep: later ones measure the best commit on
    # another class or a new setting (after a budget change "🏆 NEW BEST 0.9722" read as a gain over
    # the 0.9764 measured under the old budget), or re-measure it: a new reference, not a new best.
    first = not any(e.status == "keep" for e in rows)
    new_best = exp.status == "keep" and previous != exp.best and (exp.kind != "baseline" or first)
    return {
        "number": exp.number, "status": exp.status, "metric_name": ctx.metric_name,
        "metric": exp.metric, "best": exp.best, "previous_best": previous,
        # this result against the best before it: what a reader wants to see for any status
        "delta": None if exp.metric is None or previous is None else exp.metric - previous,
        "direction": ctx.direction,  # which way the delta is better
        "new_best": new_best, "description": exp.description, "hypothesis": exp.hypothesis,
        "area": exp.area, "duration_s": exp.duration_s, "peak_vram_mb": exp.metrics.get("peak_vram_mb"),
        "mfu_percent": exp.metrics.get("mfu_percent"), "confidence": exp.confidence, "focus": exp.focus,
        "commit": exp.commit[:7], "lines_added": exp.lines_added, "lines_removed": exp.lines_removed,
        "reason": exp.reason, "log_tail": out.log_tail, "slot": exp.slot, "kind": exp.kind,
        "hardware": exp.hardware, "profile": ctx.ws.profile, "harness": hardware.harness_values(ctx.env),
        # the decision's figures: the gain (positive = better) ± its standard error, n vs n
        "gain": out.gain if out.se is not None else None, "se": out.se, "n": out.n, "n_best": out.n_best,
        # not decided (recorded as a discard, or the data failed it): the same change runs again
        # (or re-made on the best)
        "rerun": out.needs_confirm or out.rebase or out.retry,
    }


def _on_streaks(ctx: Context, rows: list[Experiment]) -> None:
    """Failures in a row pause the loop, a data problem at once, the starting commit at its second crash;
    a run without a keep is said once. Only failures (crashes, timeouts, rejected proposals, failed
    checks) pause it: a run of discards is the search's business (it widens), said once in chat,
    never a stop."""
    store = ctx.store
    failures = failures_in_a_row(store, rows)
    limit = ctx.settings.loop.pause_after_failures
    # bad data fails every run alike: pausing at once spares the proposals that would follow (a harness
    # changed while a run trained is put back by the engine: no pause)
    last = rows[-1]
    again = ledger.not_the_change(last.reason)  # its change runs again (after /resume)
    other = again or next((kind for kind in ledger.NOT_THE_CHANGE if last.reason.startswith(kind.again)), None)
    other = other if other is not None and other.resume is not None else None
    # the commit the night starts from, never run to a result: every proposal would branch from it.
    # Its second crash pauses: the first may be the box's (another process holding the GPU's memory)
    # (failing the checks command too: such a baseline ran again and again, to the failure limit)
    failed = ("crash", "checks_failed")
    crashes = [e for e in rows if e.commit == last.commit and e.kind == "baseline" and e.status in failed]
    broken_start = (last.kind == "baseline" and last.status in failed and other is None and len(crashes) >= 2
                    and not any(e.commit == last.commit and e.status == "keep" for e in rows))
    if (failures >= limit or other is not None or broken_start) and ledger.paused(store) is None:
        if other is not None:
            reason = f"#{last.number}: {last.reason}; {other.resume}" + (
                f", and #{last.number} runs again" if again else "")
        elif broken_start:
            what = "crashed" if last.status == "crash" else "failed its checks"
            reason = (f"#{last.number}: the baseline {what} again ({last.reason}): {last.commit[:7]}, the commit the night"
                      " starts from, does not run, and every experiment branches from it; fix it, commit the fix in"
                      f" {ctx.ws.path} and /resume (the fix is measured as the baseline)")
        else:
            reason = f"{failures} failed experiments in a row; resume when you have looked (focus, note)"
        ledger.set_paused(store, "nightlab", reason, None)
        store.emit("self_paused", reason=reason)
    misses = without_a_keep(store, rows)
    streak = next((e.number for e in reversed(rows) if e.status == "keep" and e.kind != "baseline"), 0)
    if misses >= limit and store.get(DISCARDS_SAID_KEY) != streak:
        store.set(DISCARDS_SAID_KEY, streak)  # said once per streak (it starts at a keep)
        # each proposer's own answer to the streak: the search's moves, the agent's prompt (loop/proposers/prompt.py)
        answer = ("the agent's prompt asks it for a clearly different idea or area" if ctx.settings.proposer.kind ==
                  "agent" else "the search widens its moves and changes area")
        store.emit("alert", text=(f"{misses} experiments in a row without a keep: {answer}; the loop goes on (only"
                                  " failures pause it)"))
