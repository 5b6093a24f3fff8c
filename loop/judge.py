"""A finished run as the ratchet sees it: did it fail (and why), and its verdict, the keep rule
itself being `decision.py`'s.

Nothing here touches git, processes or the store, so every rule is testable on plain numbers.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

from nightlab.loop.decision import Rule, decide
from nightlab.loop.state.ledger import (
    DATA_PROBLEM_PREFIX,
    HARNESS_CHANGED_PREFIX,
    PYTHON_CHANGED_PREFIX,
    RESULT_LOST_PREFIX,
    USER_KILL_PREFIX,
)
from nightlab.loop.state.stats import ENGINE_KEYS, Comparison, Noise
from nightlab.loop.summary import Summary

# the reason of a result that had nothing to be compared with (no reference on its hardware class)
NOT_COMPARED_PREFIX = "not compared:"
# the reason of a promising result from an older base, re-made on the current best (async mode)
REBASE_PREFIX = "rebased:"
# how the harness says a run met bad data (prepare.DATA_FAIL, written out here: importing prepare
# would load pyarrow and tiktoken into the engine; tests/loop/test_profiles.py holds them equal)
DATA_FAIL = "FAIL: data: "
# how the harness begins its refusal of a run during which the code that scores it changed, nothing else
# (prepare.HARNESS_CHANGED, written out here likewise)
HARNESS_CHANGED = "the code that scores it changed while the training command ran"
# how the harness begins its refusal of a run when the scorer's Python changed (prepare.PYTHON_CHANGED)
PYTHON_CHANGED = "the Python environment the scorer runs in changed"
_NAMED = re.compile(r" \(([^)]+)\)")  # the files HARNESS_CHANGED is followed by
_OOM = re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|MemoryError", re.IGNORECASE)


@dataclass(frozen=True)
class Measurement:
    """A finished run's result, as the judge sees it."""

    exit_code: int | None  # None: the process vanished without writing its exit status
    kill_reason: str | None
    summary: Summary
    log_tail: str
    # it ran in the workspace, where a person may edit the harness while it trains (one local slot); a
    # snapshot's harness changes only by the run's own write
    in_workspace: bool = False


@dataclass(frozen=True)
class Verdict:
    status: str  # keep | discard | crash | checks_failed
    metric: float | None
    best_after: float | None
    reason: str = ""
    confidence: float | None = None  # the gain in standard errors of the difference
    needs_confirm: bool = False  # undecided: re-run the same commit before deciding
    remeasure_best: bool = False  # ... and re-run the incumbent too, its own n is small
    comparison: Comparison | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def failure_reason(m: Measurement, metric_name: str) -> str | None:
    """Why a run counts as a crash, or None when it produced a usable metric."""
    if m.kill_reason:
        return m.kill_reason
    if m.summary.rejected and m.exit_code not in (0, None):  # the harness refused the model (trainer/harness.py)
        if m.in_workspace and m.summary.rejected.startswith(HARNESS_CHANGED):  # whose edit: its re-run tells
            files = _NAMED.match(m.summary.rejected[len(HARNESS_CHANGED):])
            return (f"{HARNESS_CHANGED_PREFIX} {files.group(1) if files else 'the harness'} changed while the run"
                    " trained in the workspace: a person's edit, or the run's own write (nothing tells which as it"
                    " happens); put back as recorded (an edit of yours is kept in `git stash list`)")
        if m.summary.rejected.startswith(PYTHON_CHANGED):  # a person's install, or a write by the run or the agent
            return f"{PYTHON_CHANGED_PREFIX} {m.summary.rejected}"
        return f"rejected by the harness: {m.summary.rejected}"
    value = m.summary.get(metric_name)
    if m.exit_code is None and not (m.summary.complete and value is not None):
        return "the run vanished without an exit status (killed?)"
    if m.exit_code not in (0, None):
        said = [line[len(DATA_FAIL):].strip() for line in m.log_tail.splitlines() if line.startswith(DATA_FAIL)]
        if said:
            return f"{DATA_PROBLEM_PREFIX} {said[-1][:500]}"
        oom = next((line.strip() for line in m.log_tail.splitlines() if _OOM.search(line)), None)
        return f"OOM (exit code {m.exit_code}): {oom[:200]}" if oom else f"exit code {m.exit_code}"
    if value is None:  # a user's project meets this first: say what was read and what is wanted
        found = f" (read: {', '.join(sorted(m.summary.metrics)[:8])})" if m.summary.metrics else ""
        raw = m.summary.unreadable.get(metric_name)
        what = f"{metric_name} in the log is {raw[:40]!r}, not a number" if raw else f"no {metric_name} in the log{found}"
        return (f"{what}; the run must print a line `---`, then"
                f" `{metric_name}: <value>`, or a line `METRIC {metric_name}=<value>`")
    if not math.isfinite(value):
        return f"{metric_name} is {value}"
    return None


def judge(
    m: Measurement,
    *,
    kind: str,
    metric_name: str,
    direction: str,
    earlier: list[float],
    incumbent: list[float] | None,
    noise: Noise,
    rule: Rule,
    best_again: bool = False,
) -> Verdict:
    """Judge one run.

    earlier: this commit's earlier measurements on the run's hardware class (baseline repeats, or
    a candidate's runs before this re-run); incumbent: every measurement of the commit it branched
    from there (None: nothing to compare with on this class). A baseline (the best commit measured
    again) is kept with the mean of all its runs as the class's best; any other run is decided by
    `decision.decide` on the means (see its rule). best_again: the baseline run measures a kept
    change again (the best), not the starting commit, and its reason says so.
    """
    # the engine's own figures (the second opinion's, the overtime) are never a run's: a log that names
    # them (a project's own run command, or a line train.py wrote to the log past the harness's prefix) is not one
    metrics = {name: value for name, value in m.summary.metrics.items() if name not in ENGINE_KEYS}
    best = statistics.fmean(incumbent) if incumbent else None
    reason = failure_reason(m, metric_name)
    if reason is not None:
        # a user's kill, and a result removed after its run ended, are nobody's crash
        status = "discard" if reason.startswith((USER_KILL_PREFIX, RESULT_LOST_PREFIX)) else "crash"
        return Verdict(status, None, best, reason, metrics=metrics)
    value = m.summary.metrics[metric_name]
    runs = [*earlier, value]
    if kind == "baseline":
        mean = statistics.fmean(runs)
        what = "re-measured the best" if best_again else "baseline"
        why = what if len(runs) == 1 else f"{what}: mean of {len(runs)} runs {mean:.6f}"
        why += f"; run-to-run noise ± {noise.sd:.4f} ({noise.how()})"
        return Verdict("keep", value, mean, why, metrics=metrics)
    if not incumbent:
        return Verdict("discard", value, None, f"{NOT_COMPARED_PREFIX} no reference measurement", metrics=metrics)
    d = decide(runs, incumbent, noise, direction, rule)
    z = d.comparison.z
    confidence = z if math.isfinite(z) else None
    after = statistics.fmean(runs) if d.action == "keep" else best
    return Verdict("keep" if d.action == "keep" else "discard", value, after, d.reason, confidence,
                   needs_confirm=d.action == "rerun", remeasure_best=d.rerun_incumbent,
                   comparison=d.comparison, metrics=metrics)
