"""The search's model of the metric: a Bayesian quadratic response surface over the constants.

Why a model, and this one: a 5-minute run measures val_bpb to about ±0.002, and most single
changes are worth about that much, so one run says little about one change. What pools the
night's evidence is a model of the whole configuration: every scored run (baselines, repeats,
discards included) is one noisy observation of the metric at a full configuration, and a
quadratic in each constant's (log) value with pairwise interactions is the shape learning-rate
and size curves have near their optimum. Bayesian linear regression gives that model a
posterior in closed form; the search draws one surface from it (Thompson sampling) and proposes
the best move under that draw, so it explores what is uncertain and exploits what is known
without a tuning knob. The prior sets every effect's scale to the noise's: a change is assumed
worth about one noise σ until runs say otherwise.

Relevance: most constants of a real file matter little (on the yield benchmark's few_big
landscape, eight of ten move the metric by a quarter σ), and a flat constant's quadratic still
has its full prior for the moves not yet run, so draws keep promising it gains and runs go to
moves the keep rule could not tell from noise. So the surface is fitted twice: the first fit
bounds each constant's slope and curve (|mean| + 2 sd), and the second shrinks the prior of a
constant whose bound is small (its pairs too), down to RELEVANCE_FLOOR. A constant never moved
keeps its full prior. Measured on the benchmark's tuning seeds (few_big's worst night 51 → 64 %
of the possible, the other shapes no lower); a full automatic relevance determination (EM to a
fixed point) gained more on few_big but cost the separable shape.

Groups: a run is measured in one group, its hardware class (GPU model) and setting (time budget,
data); val_bpb on an A100 sits at an offset from an H100's, and a 600 s budget's from a 300 s one's.
Each group gets its own intercept (a fixed effect, each centred on its group's mean), so an offset
is never read as the effect of whatever constants that group's runs had: effects are learnt from
differences within groups and shared across them. With one group this is the single intercept.

Coordinates: numeric constants are measured in "steps" from the best configuration (log2 of
the ratio for log-scaled ones, a quarter of the range for linear ones), so one prior fits all;
a choice constant is an indicator per value it is not at now.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from nightlab.loop.proposers.space import Param, SearchSpace, format_value
from nightlab.loop.state.stats import pooled_noise

Config = dict[str, object]

# Prior standard deviations, in units of the noise σ: the slope and curvature of a constant,
# the interaction of two, the effect of a choice's value.
PRIOR_SLOPE = 2.0
PRIOR_CURVE = 1.0
PRIOR_PAIR = 0.5
PRIOR_CHOICE = 1.0
# The least share of its prior a constant the runs show flat keeps (Surface._relevance), so a
# draw can still bring it back.
RELEVANCE_FLOOR = 0.15


@dataclass(frozen=True)
class Observation:
    config: Config  # every searched constant's value in that run
    metric: float
    group: str = ""  # what it was measured in (hardware class and setting): comparable only within one


def _coordinate(param: Param, value: object, origin: object) -> float | None:
    """`value`'s position relative to `origin` in steps, or None for a choice/unusable value."""
    if param.kind == "choice" or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not isinstance(origin, (int, float)) or isinstance(origin, bool):
        return None
    if param.kind == "log":
        if value <= 0 or origin <= 0:
            return None
        return math.log2(value / origin)
    span = (param.high - param.low) / 4 or 1.0
    return (value - origin) / span


class Surface:
    """The posterior over a quadratic surface around `origin` (the best configuration)."""

    def __init__(self, space: SearchSpace, observations: Sequence[Observation], sigma: float) -> None:
        self.space = space
        self.origin = space.current
        self.numeric = [p for p in space.params if p.kind != "choice"]
        self.choices = [(p, c) for p in space.params if p.kind == "choice" for c in p.choices if c != space.current[p.name]]
        self.pairs = list(combinations(range(len(self.numeric)), 2))
        self._first = np.array([i for i, _ in self.pairs], dtype=int)
        self._second = np.array([j for _, j in self.pairs], dtype=int)
        self._numeric_index = {p.name: i for i, p in enumerate(self.numeric)}
        self._choice_index = {(p.name, format_value(c)): j for j, (p, c) in enumerate(self.choices)}
        k = len(self.numeric)
        groups = sorted({o.group for o in observations}) or [""]
        self.intercepts = len(groups)
        base = np.array([10.0] * self.intercepts + [PRIOR_SLOPE] * k + [PRIOR_CURVE] * k + [PRIOR_PAIR] * len(self.pairs)
                        + [PRIOR_CHOICE] * len(self.choices)) * sigma
        self.sigma = sigma
        self.runs = len(observations)
        x = self.features([o.config for o in observations])
        y = np.array([o.metric for o in observations], dtype=float)
        # A group's intercept is not a modelled effect: centre each group on its own mean and
        # leave the rest to the data (one indicator column per group).
        of = np.array([groups.index(o.group) for o in observations], dtype=int)
        self.offset = np.array([y[of == j].mean() for j in range(len(groups))])[of] if len(y) else np.zeros(0)
        x = np.hstack([(of[:, None] == np.arange(len(groups))).astype(float), x])
        self.relevance = np.ones(k)
        if len(y):  # a first fit on the base prior says which constants the runs show flat
            self._fit(x, y, base)
            self.relevance = self._relevance(base)
        self._fit(x, y, base * self._prior_factors())

    def _prior_factors(self) -> np.ndarray:
        """Each coefficient's prior scale factor from its constants' relevance (1: the base
        prior): a constant's slope and curve by its own, a pair by the geometric mean of both."""
        r = self.relevance
        pair = np.sqrt(r[self._first] * r[self._second]) if self.pairs else np.zeros(0)
        return np.concatenate([np.ones(self.intercepts), r, r, pair, np.ones(len(self.choices))])

    def _fit(self, x: np.ndarray, y: np.ndarray, scale: np.ndarray) -> None:
        precision = np.diag(1.0 / scale**2) + x.T @ x / self.sigma**2
        self.cov = np.linalg.inv(precision)
        self.mean = self.cov @ (x.T @ (y - self.offset)) / self.sigma**2 if len(y) else np.zeros(len(scale))

    def _relevance(self, base: np.ndarray) -> np.ndarray:
        """How much of the base prior each constant keeps: the most its slope or curve can
        plausibly be (posterior |mean| + 2 sd) as a share of the base prior's scale, within
        [RELEVANCE_FLOOR, 1]. A constant never moved keeps 1 (its posterior is its prior); one
        the runs show confidently flat shrinks, so a draw stops promising it gains it has not
        got and the night's runs go to the constants that matter."""
        k, g = len(self.numeric), self.intercepts
        bound = (np.abs(self.mean) + 2 * np.sqrt(np.diag(self.cov))) / base
        return np.clip(np.maximum(bound[g:g + k], bound[g + k:g + 2 * k]) / 2, RELEVANCE_FLOOR, 1.0)

    def features(self, configs: Sequence[Config]) -> np.ndarray:
        """Model features of each config; a constant a config leaves out is at the origin (so a
        proposal's changes alone are a config)."""
        k = len(self.numeric)
        z, ind = np.zeros((len(configs), k)), np.zeros((len(configs), len(self.choices)))
        for r, config in enumerate(configs):
            for name, value in config.items():
                if (i := self._numeric_index.get(name)) is not None:
                    z[r, i] = _coordinate(self.numeric[i], value, self.origin[name]) or 0.0
                elif (j := self._choice_index.get((name, format_value(value)))) is not None:
                    ind[r, j] = 1.0
        return np.hstack([z, z * z, z[:, self._first] * z[:, self._second], ind])

    def draw(self, rng: random.Random) -> np.ndarray:
        """One surface from the posterior (Thompson sampling), as coefficients."""
        gen = np.random.default_rng(rng.randrange(2**32))
        return gen.multivariate_normal(self.mean, self.cov, method="cholesky")

    def predict(self, coefficients: np.ndarray, configs: Sequence[Config]) -> np.ndarray:
        """The metric each config would have under `coefficients`, relative to the best's."""
        return self.features(configs) @ coefficients[self.intercepts:]


def noise_sigma(observations: Sequence[Observation], prior: float) -> float:
    """The run-to-run σ pooled over configurations measured more than once (baselines,
    repeats) within one group (another GPU's offset is no noise), with `prior` (> 0) counted as
    one degree of freedom so two runs cannot claim no noise: the keep rule's pooling
    (loop/state/stats.py), lighter on the prior so the search follows the measured noise sooner."""
    groups: dict[tuple[str, str], list[float]] = {}
    for o in observations:
        key = repr(sorted((k, format_value(v)) for k, v in o.config.items()))
        groups.setdefault((o.group, key), []).append(o.metric)
    return pooled_noise(groups.values(), prior, prior_df=1.0).sd
