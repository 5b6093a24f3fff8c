"""The ratchet's rules as pure functions: how a finished run is judged and how noisy results are.

Nothing here touches git, processes or the store, so every rule is testable on plain numbers.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from nightlab.loop.summary import Summary

USER_KILL_PREFIX = "killed by "  # kill_reason of a user's kill: recorded as discard, not crash
# the reason of a result that had nothing to be compared with (no reference on its hardware class)
NOT_COMPARED_PREFIX = "not compared:"
# the reason of a promising result from an older base, re-made on the current best (async mode)
REBASE_PREFIX = "rebased:"
_MAD_TO_STD = 1.4826  # MAD of a normal distribution x this = its standard deviation
_OOM = re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|MemoryError", re.IGNORECASE)


@dataclass(frozen=True)
class Measurement:
    """A finished run's result, as the judge sees it."""

    exit_code: int | None  # None: the process vanished without writing its exit status
    kill_reason: str | None
    summary: Summary
    log_tail: str


@dataclass(frozen=True)
class Verdict:
    status: str  # keep | discard | crash | checks_failed
    metric: float | None
    best_after: float | None
    reason: str = ""
    confidence: float | None = None
    needs_confirm: bool = False  # a small gain: re-run the same commit before keeping it
    metrics: dict[str, float] = field(default_factory=dict)


def gain(metric: float, best: float, direction: str) -> float:
    """How much better `metric` is than `best` (positive = better), for either direction."""
    return best - metric if direction == "minimize" else metric - best


def noise(groups: Iterable[list[float]]) -> float:
    """Run-to-run noise (a standard deviation) from groups of repeated runs of one commit.

    Pooled over all groups with two or more results: the robust MAD of each result's distance
    from its group's median, scaled to a standard deviation. 0.0 = unknown (no repeats yet).
    """
    deviations = []
    for values in groups:
        if len(values) >= 2:
            centre = statistics.median(values)
            deviations += [abs(v - centre) for v in values]
    if not deviations:
        return 0.0
    return _MAD_TO_STD * statistics.median(deviations)


def failure_reason(m: Measurement, metric_name: str) -> str | None:
    """Why a run counts as a crash, or None when it produced a usable metric."""
    if m.kill_reason:
        return m.kill_reason
    if m.summary.rejected and m.exit_code not in (0, None):  # the harness refused the model (trainer/harness.py)
        return f"rejected by the harness: {m.summary.rejected}"
    value = m.summary.get(metric_name)
    if m.exit_code is None and not (m.summary.complete and value is not None):
        return "the run vanished without an exit status (killed?)"
    if m.exit_code not in (0, None):
        oom = next((line.strip() for line in m.log_tail.splitlines() if _OOM.search(line)), None)
        return f"OOM (exit code {m.exit_code}): {oom[:200]}" if oom else f"exit code {m.exit_code}"
    if value is None:
        return f"no {metric_name} in the log"
    if not math.isfinite(value):
        return f"{metric_name} is {value}"
    return None


def judge(
    m: Measurement,
    *,
    kind: str,
    metric_name: str,
    direction: str,
    best: float | None,
    baselines: list[float],
    confirm_of_metric: float | None,
    noise_sd: float,
    confirm_k: float,
) -> Verdict:
    """Judge one run.

    kind: baseline (its metric, averaged with the earlier runs of the same commit on the same
    hardware class, becomes that class's best), proposal (keep when strictly better than the best;
    a gain under confirm_k x noise asks for a confirm run first; a rebase is a proposal re-made on
    a newer best), confirm (the mean of the original and the re-run decides). `best` None: no reference on this run's class, nothing to compare with.
    """
    metrics = dict(m.summary.metrics)
    reason = failure_reason(m, metric_name)
    if reason is not None:
        status = "discard" if reason.startswith(USER_KILL_PREFIX) else "crash"
        return Verdict(status, None, best, reason, metrics=metrics)
    value = m.summary.metrics[metric_name]
    if kind == "baseline":
        runs = [*baselines, value]
        mean = statistics.fmean(runs)
        why = "baseline" if len(runs) == 1 else f"baseline: mean of {len(runs)} runs {mean:.6f}"
        return Verdict("keep", value, mean, why, metrics=metrics)
    if best is None:
        return Verdict("discard", value, None, f"{NOT_COMPARED_PREFIX} no reference measurement", metrics=metrics)
    judged = value if confirm_of_metric is None else statistics.fmean([confirm_of_metric, value])
    delta = gain(judged, best, direction)
    confidence = delta / noise_sd if noise_sd > 0 else None
    if delta <= 0:
        why = "equal to the best" if delta == 0 else f"worse than the best {best:.6f}"
        if confirm_of_metric is not None:
            why = f"not confirmed: mean {judged:.6f} {why}"
        return Verdict("discard", value, best, why, confidence, metrics=metrics)
    if kind in ("proposal", "rebase") and noise_sd > 0 and delta < confirm_k * noise_sd:
        why = f"gain {delta:.6f} < {confirm_k:g} x noise {noise_sd:.6f}: re-running to confirm"
        return Verdict("discard", value, best, why, confidence, needs_confirm=True, metrics=metrics)
    why = f"better by {delta:.6f}" + (f" (confirmed: mean {judged:.6f})" if confirm_of_metric else "")
    return Verdict("keep", value, judged, why, confidence, metrics=metrics)
