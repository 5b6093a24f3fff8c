"""The keep rule on plain numbers: how noisy results are, how sure a gain is, what to do next.

The rule, as the README states it: a candidate is kept when its mean beats the incumbent's mean
(every measurement of the best commit) by more than `z` standard errors of the difference; a
candidate that measures no better than the incumbent is discarded after one run; in between it is
re-run (and the incumbent too when its own uncertainty dominates) until it is shown better, falls
back, or has had `max_runs` runs, and then it is discarded. Where every repeat gave the same number
(a fixed-seed trainer) nothing is re-run: it is discarded at once.

The noise and the comparison of means are the state layer's (loop/state/stats.py: the views state
a gain the same way).

Nothing here touches git, processes or the store.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nightlab.loop.state.stats import Comparison, Noise, compare


@dataclass(frozen=True)
class Rule:
    z: float = 2.0  # keep when the gain exceeds z standard errors of the difference
    max_runs: int = 3  # runs of one candidate at most (its first run and its re-runs)
    prior_sd: float = 0.0  # the noise assumed before repeats measure it (metric units)


Action = Literal["keep", "discard", "rerun"]


@dataclass(frozen=True)
class Decision:
    action: Action
    comparison: Comparison
    rerun_incumbent: bool  # a re-run is asked and the incumbent's uncertainty dominates
    reason: str


def decide(candidate: Sequence[float], incumbent: Sequence[float], noise: Noise, direction: str, rule: Rule) -> Decision:
    """What to do with a candidate measured `candidate` against an incumbent measured `incumbent`
    (both non-empty, same hardware class and setting)."""
    c = compare(candidate, incumbent, noise.sd, direction)
    if c.gain > rule.z * c.se:
        return Decision("keep", c, False, c.text())
    if c.gain <= 0:
        return Decision("discard", c, False, "not better: " + c.text())
    if c.n_candidate >= rule.max_runs:
        return Decision("discard", c, False, f"not shown after {c.n_candidate} runs: {c.text()}, not {rule.z:g} SE")
    if noise.identical:  # a re-run gives the same number: it would only spend a run
        return Decision("discard", c, False, f"not shown: {c.text()}, not {rule.z:g} SE (a re-run gives the same number)")
    # Another candidate run shrinks 1/n_candidate; when 1/n_incumbent is as large, run both.
    rerun_incumbent = c.n_incumbent <= c.n_candidate
    why = f"re-running to decide: {c.text()}, not yet {rule.z:g} SE" + (" (the best too: its n is small)" if rerun_incumbent else "")
    return Decision("rerun", c, rerun_incumbent, why)


def kept_at_once(incumbent: Sequence[float], noise: Noise, direction: str, rule: Rule) -> float:
    """The value a change's first run must pass to be kept at once against `incumbent`: its mean
    by more than z standard errors of the difference (between that and the mean it is re-run)."""
    margin = rule.z * compare(incumbent[:1], incumbent, noise.sd, direction).se
    mean = statistics.fmean(incumbent)
    return mean - margin if direction == "minimize" else mean + margin
