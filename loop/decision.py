"""The keep rule on plain numbers: how noisy results are, how sure a gain is, what to do next.

The rule, as the README states it: a candidate is kept when its mean beats the incumbent's mean
(every measurement of the best commit) by more than `z` standard errors of the difference; a
candidate that measures no better than the incumbent is discarded after one run; in between it is
re-run (and the incumbent too when its own uncertainty dominates) until it is shown better, falls
back, or has had `max_runs` runs, and then it is discarded.

The noise is pooled over every group of repeated runs of one commit on one hardware class and
setting, starting from a prior (`prior_sd`, weighted as `prior_df` degrees of freedom), so an
unmeasured noise is never zero and a few repeats soon outweigh the guess.

Nothing here touches git, processes or the store.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

PRIOR_DF = 2.0  # the prior noise weighs as much as one group of three repeats
# kv keys where the engine leaves what the views need to state a gain the same way
DIRECTION_KEY = "loop.direction"
NOISE_PRIOR_KEY = "loop.noise_prior"  # [loop] noise_prior: a share of the metric
# A keep's gain on a held-out slice (its second opinion; positive = better), in its metrics.
HELDOUT_GAIN = "heldout_gain"


@dataclass(frozen=True)
class Rule:
    z: float = 2.0  # keep when the gain exceeds z standard errors of the difference
    max_runs: int = 3  # runs of one candidate at most (its first run and its re-runs)
    prior_sd: float = 0.0  # the noise assumed before repeats measure it (metric units)


@dataclass(frozen=True)
class Noise:
    sd: float  # run-to-run standard deviation
    df: int  # measured degrees of freedom behind it (0: the prior alone)

    @property
    def measured(self) -> bool:
        return self.df > 0


@dataclass(frozen=True)
class Comparison:
    """A candidate's mean against the incumbent's mean; gain > 0 means the candidate is better."""

    gain: float
    se: float  # standard error of the gain
    n_candidate: int
    n_incumbent: int

    @property
    def z(self) -> float:
        return self.gain / self.se if self.se > 0 else math.inf if self.gain > 0 else -math.inf

    def text(self) -> str:
        """ "better by 0.0031 ± 0.0012 (n = 3 vs 5)" (± one standard error)."""
        word = "better" if self.gain > 0 else "worse"
        return f"{word} by {abs(self.gain):.4f} ± {self.se:.4f} (n = {self.n_candidate} vs {self.n_incumbent})"


Action = Literal["keep", "discard", "rerun"]


@dataclass(frozen=True)
class Decision:
    action: Action
    comparison: Comparison
    rerun_incumbent: bool  # a re-run is asked and the incumbent's uncertainty dominates
    reason: str


def gain(metric: float, best: float, direction: str) -> float:
    """How much better `metric` is than `best` (positive = better), for either direction."""
    return best - metric if direction == "minimize" else metric - best


def pooled_noise(groups: Iterable[Sequence[float]], prior_sd: float, prior_df: float = PRIOR_DF) -> Noise:
    """The pooled standard deviation of groups of repeated runs (each group: one commit on one
    hardware class), shrunk towards the prior: (prior_df x prior² + Σ squared deviations from each
    group's mean) / (prior_df + Σ (n - 1))."""
    squares, df = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            mean = statistics.fmean(values)
            squares += sum((v - mean) ** 2 for v in values)
            df += len(values) - 1
    weight = prior_df if prior_sd > 0 else 0.0
    if df == 0 and weight == 0:
        return Noise(0.0, 0)
    return Noise(math.sqrt((weight * prior_sd**2 + squares) / (weight + df)), df)


def compare(candidate: Sequence[float], incumbent: Sequence[float], noise_sd: float, direction: str) -> Comparison:
    se = noise_sd * math.sqrt(1 / len(candidate) + 1 / len(incumbent))
    return Comparison(gain(statistics.fmean(candidate), statistics.fmean(incumbent), direction), se,
                      len(candidate), len(incumbent))


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
    # Another candidate run shrinks 1/n_candidate; when 1/n_incumbent is as large, run both.
    rerun_incumbent = c.n_incumbent <= c.n_candidate
    why = f"re-running to decide: {c.text()}, not yet {rule.z:g} SE" + (" (the best too: its n is small)" if rerun_incumbent else "")
    return Decision("rerun", c, rerun_incumbent, why)


def suspect(metrics: dict[str, float]) -> bool:
    """A keep whose gain vanishes on rows no decision has seen (its held-out second opinion)."""
    return HELDOUT_GAIN in metrics and metrics[HELDOUT_GAIN] <= 0
