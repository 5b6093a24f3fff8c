"""How sure a difference between recorded results is: run-to-run noise pooled over repeats, and a
candidate's mean against an incumbent's, in standard errors. Plain numbers, shared by the engine's
keep rule (loop/decision.py) and the views and charts, so both state a gain the same way.

The noise is pooled over every group of repeated runs of one commit on one hardware class and
setting, starting from a prior (`prior_sd`, weighted as `prior_df` degrees of freedom), so an
unmeasured noise is never zero and a few repeats soon outweigh the guess.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PRIOR_DF = 2.0  # the prior noise weighs as much as one group of three repeats
# kv keys where the engine leaves what the views need to state a gain the same way
DIRECTION_KEY = "loop.direction"
NOISE_PRIOR_KEY = "loop.noise_prior"  # [loop] noise_prior: a share of the metric
# A keep's gain on a held-out slice (its second opinion; positive = better), in its metrics.
HELDOUT_GAIN = "heldout_gain"
# 1 in a keep's metrics when its own model could not be scored on the held-out slice (the commit it
# replaced could): suspect as a gain that vanishes there.
HELDOUT_UNSCORED = "heldout_unscored"
# How many seconds longer a keep's training command ran than the replaced commit's (loop/overtime.py),
# in its metrics where that is past the allowance: suspect as training past the budget.
OVERTIME = "overtime_seconds"
ENGINE_KEYS = (HELDOUT_GAIN, HELDOUT_UNSCORED, OVERTIME)  # the engine's figures alone: never a run's own


@dataclass(frozen=True)
class Noise:
    sd: float  # run-to-run standard deviation
    df: int  # measured degrees of freedom behind it (0: the prior alone)
    # every repeat gave its commit the same number (a fixed seed: the tiny CPU profile): no spread
    # between runs was seen, so the sd is the prior's, and a re-run can tell nothing new
    identical: bool = False

    @property
    def measured(self) -> bool:
        return self.df > 0 and not self.identical

    def how(self) -> str:
        """Where the sd comes from, in a few words."""
        if self.measured:
            return f"measured from {self.df + 1}+ repeats"
        if self.identical:
            return "assumed: the repeats gave the same number, so they measure no noise"
        return "assumed until repeats measure it"


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
        return f"{gain_words(self.gain, self.se)} (n = {self.n_candidate} vs {self.n_incumbent})"


def gain_words(gain: float, se: float) -> str:
    """ "better by 0.0031 ± 0.0012", "worse by …"; a gain that rounds to nothing is "the same"
    (it read "worse by 0.0000")."""
    if f"{abs(gain):.4f}" == "0.0000":
        return f"the same to 4 decimals ± {se:.4f}"
    return f"{'better' if gain > 0 else 'worse'} by {abs(gain):.4f} ± {se:.4f}"


def gain(metric: float, best: float, direction: str) -> float:
    """How much better `metric` is than `best` (positive = better), for either direction."""
    return best - metric if direction == "minimize" else metric - best


def pooled_noise(groups: Iterable[Sequence[float]], prior_sd: float, prior_df: float = PRIOR_DF) -> Noise:
    """The pooled standard deviation of groups of repeated runs (each group: one commit on one
    hardware class), shrunk towards the prior: (prior_df x prior² + Σ squared deviations from each
    group's mean) / (prior_df + Σ (n - 1)). Repeats that all gave the same number measured nothing:
    the prior stands (pooled, their zeros shrank it towards 0 as a night went on, and ever smaller
    differences were kept as shown)."""
    squares, df, spread = 0.0, 0, False
    for values in groups:
        if len(values) >= 2:
            mean = statistics.fmean(values)
            squares += sum((v - mean) ** 2 for v in values)
            df += len(values) - 1
            spread = spread or min(values) != max(values)
    weight = prior_df if prior_sd > 0 else 0.0
    if df == 0 and weight == 0:
        return Noise(0.0, 0)
    if df > 0 and not spread:
        return Noise(prior_sd, df, identical=True)
    return Noise(math.sqrt((weight * prior_sd**2 + squares) / (weight + df)), df)


def compare(candidate: Sequence[float], incumbent: Sequence[float], noise_sd: float, direction: str) -> Comparison:
    se = noise_sd * math.sqrt(1 / len(candidate) + 1 / len(incumbent))
    return Comparison(gain(statistics.fmean(candidate), statistics.fmean(incumbent), direction), se,
                      len(candidate), len(incumbent))


def suspect(metrics: dict[str, float]) -> bool:
    """A keep whose gain vanishes on rows no decision has seen (its held-out second opinion), whose
    model could not be scored there, or whose training ran past the budget."""
    return bool(suspicions(metrics))


def suspicions(metrics: dict[str, float]) -> list[str]:
    """Why a keep is suspect, a few words each (none: it is not)."""
    words = []
    if heldout_suspect(metrics):
        words.append("its gain vanishes on held-out rows" if HELDOUT_GAIN in metrics
                     else "its model could not be scored on held-out rows")
    over = overtime_words(metrics)
    if over is not None:
        words.append(over)
    return words


def heldout_suspect(metrics: dict[str, float]) -> bool:
    """Suspect by its held-out second opinion: the gain vanishes there, or its model was not scored."""
    return (HELDOUT_GAIN in metrics and metrics[HELDOUT_GAIN] <= 0) or metrics.get(HELDOUT_UNSCORED, 0) > 0


def overtime_words(metrics: dict[str, float]) -> str | None:
    """A keep that trained past the budget, in words; None for one that did not."""
    if metrics.get(OVERTIME, 0) <= 0:
        return None
    return f"it trained {metrics[OVERTIME]:.0f} s longer than the commit it replaced (past the budget?)"
