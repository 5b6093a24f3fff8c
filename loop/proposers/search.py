"""The built-in `search` proposer: Optuna's TPE over the editable file's UPPER_CASE constants.

No LLM, no network. Each proposal starts from the best configuration (the clean working tree)
and changes one or two constants of one area. Why so few: a diff of one or two constants is
one experiment with one answer ("MATRIX_LR 0.04→0.05 helped"), readable in a chat digest and
revertible on its own; a ten-constant jump that wins teaches nothing about which part won, and
one that loses wastes five minutes without telling what to avoid.

Nothing is kept between calls. The study is rebuilt from `ctx.history` every time: the best
configuration (the file's current values) is one trial scored with the best metric, every past
search experiment is a trial over the constants it set (keep/discard: its metric; crash or
failed checks: pruned, which TPE ranks below every scored trial), and candidates in flight are
running trials (TPE's constant liar steers away from them). So a restarted daemon proposes
exactly what the old one would have, and the same seed and history give the same proposal.

Area: `ctx.focus` when set; otherwise the area of the latest search experiment, moving on to
the next area once that area has failed `switch_area_after` times in a row.

Dedupe: a candidate whose changes equal a past experiment's params, or an in-flight
candidate's (parsed back from its description), or that sets a value equal to the current one,
is re-asked up to `MAX_ASKS` times; then one constant is nudged to its nearest untried value.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import optuna
from nightlab.loop.proposers.base import (
    PastExperiment,
    Proposal,
    ProposalContext,
    ProposalError,
)
from nightlab.loop.proposers.space import (
    BUILTIN_AREAS,
    SearchSpace,
    build_space,
    format_value,
)
from nightlab.trainer.profiles import apply_constants
from optuna.samplers import TPESampler
from optuna.trial import TrialState, create_trial

WIDENED = "widened:"  # in a hypothesis: the focused area had nothing left, the proposal is elsewhere
MAX_ASKS = 10  # TPE picks to try before nudging by hand (each ask costs a few ms)
EXPLOIT_SHARE = 0.5  # how often a proposal steps around the best rather than asking TPE
NEAR = 6  # a step: one of a value's nearest neighbours (×/÷ 2 at most for a log-scaled one)
N_STARTUP = 5  # scored trials before TPE models anything; random sampling until then
TWO_PARAM_SHARE = 0.4  # how often a proposal changes two constants rather than one

# Every call builds a fresh study; Optuna would log "A new study created" each time.
optuna.logging.set_verbosity(optuna.logging.WARNING)

_FAILED = {"discard", "crash", "checks_failed"}
_PRUNED = {"crash", "checks_failed"}
# "NAME old→new" pairs joined by ", "; a tuple value holds ", " too, but never ", NAME ".
_PAIR_SPLIT = re.compile(r", (?=[A-Z_][A-Z0-9_]* )")

Changes = dict[str, object]


@dataclass(frozen=True)
class _Pick:
    changes: Changes
    how: str  # why these values, for the hypothesis


class SearchProposer:
    def __init__(self, seed: int = 0, switch_area_after: int = 5, target: Path | None = None) -> None:
        """`target`: the editable file, read once so `areas` (for `focus` validation) matches it."""
        self.seed = seed
        self.switch_area_after = switch_area_after
        self.areas: tuple[str, ...] | None = BUILTIN_AREAS
        if target is not None and target.is_file():
            space = build_space(target.name, target.read_text(encoding="utf-8", errors="replace"))
            self.areas = space.areas or BUILTIN_AREAS

    def propose(self, ctx: ProposalContext) -> Proposal:
        path = ctx.workspace / ctx.editable[0]
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProposalError(f"search: cannot read {ctx.editable[0]}: {exc}") from None
        space = build_space(ctx.editable[0], source)
        if not space.params:
            raise ProposalError(
                f"search: {ctx.editable[0]} has no numeric UPPER_CASE constants (`NAME = value` lines)"
                " to search; add some, or use the agent proposer"
            )
        if ctx.focus is not None and ctx.focus not in space.areas:
            raise ProposalError(f"search: unknown focus area {ctx.focus!r}; areas: {', '.join(space.areas)}")

        rng = random.Random(f"{self.seed}:{len(ctx.history)}:{len(ctx.in_flight)}")
        tried = _tried(ctx)
        area, switched = self._area(ctx, space)
        # Two near misses (better than the best by one run, not shown) in different constants
        # are tried together first; then an exhausted area hands over to the next one, a focused
        # one too (the engine says so once in chat): a search with nothing left never fails
        # proposal after proposal.
        pick = _combine(ctx, space, area, tried)
        candidate_area = area
        for candidate_area in [] if pick else _rotate(space.areas, area):
            pick = _pick(ctx, space, candidate_area, tried, rng)
            if pick is not None:
                break
        if pick is None:
            raise ProposalError("search: every nearby configuration in every area has been tried")

        if candidate_area != area and ctx.focus:
            why = f"{WIDENED} focus {area!r} has nothing left to try (every nearby configuration has been tried)"
        elif candidate_area != area:
            why = f"every nearby {area} configuration has been tried"
        elif switched:
            why = f"switched from {switched} after {ctx.consecutive_failures} failures in a row"
        else:
            why = ""
        path.write_text(apply_constants(source, pick.changes), encoding="utf-8")
        return Proposal(
            description=describe(space.current, pick.changes),
            hypothesis=_hypothesis(ctx, space, candidate_area, pick, why),
            area=candidate_area,
            params=pick.changes,
        )

    def _area(self, ctx: ProposalContext, space: SearchSpace) -> tuple[str, str | None]:
        """(area to search, the area left behind after too many failures or None)."""
        if ctx.focus:
            return ctx.focus, None
        recent = [e for e in ctx.history if e.area in space.areas]
        if not recent:
            return space.areas[0], None
        current = recent[-1].area
        # The engine's counter bounds the streak; counting only this area's failures means that
        # after a switch the new area gets its own N tries instead of switching again at once.
        window = ctx.history[-ctx.consecutive_failures:] if ctx.consecutive_failures > 0 else ()
        streak = 0
        for e in reversed(window):
            if e.status not in _FAILED:
                break
            streak += e.area == current
        if streak >= self.switch_area_after and len(space.areas) > 1:
            return _rotate(space.areas, current)[1], current
        return current, None


def describe(current: dict[str, object], changes: Changes) -> str:
    """ "MATRIX_LR 0.04→0.05, WARMUP_RATIO 0.0→0.02" """
    return ", ".join(f"{n} {format_value(current[n])}→{format_value(v)}" for n, v in changes.items())


def parse_description(description: str) -> Changes:
    """The changes in a search description (empty for free text, e.g. an agent's)."""
    changes: Changes = {}
    for pair in _PAIR_SPLIT.split(description):
        name, _, rest = pair.partition(" ")
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) or "→" not in rest:
            return {}
        try:
            changes[name] = ast.literal_eval(rest.split("→", 1)[1].strip())
        except (ValueError, SyntaxError):
            return {}
    return changes


def _key(changes: Changes) -> frozenset[tuple[str, str]]:
    return frozenset((n, format_value(v)) for n, v in changes.items())


def _tried(ctx: ProposalContext) -> set[frozenset[tuple[str, str]]]:
    keys = {_key(e.params) for e in ctx.history if e.params}
    keys |= {_key(c) for d in ctx.in_flight if (c := parse_description(d))}
    return keys


def _rotate(areas: tuple[str, ...], start: str) -> list[str]:
    i = areas.index(start)
    return list(areas[i:] + areas[:i])


def _study(ctx: ProposalContext, space: SearchSpace, seed: int) -> optuna.Study:
    """An in-memory study holding everything the ledger knows about this space."""
    direction: Literal["minimize", "maximize"] = "maximize" if ctx.direction == "maximize" else "minimize"
    sampler = TPESampler(seed=seed, n_startup_trials=N_STARTUP, constant_liar=True)
    study = optuna.create_study(direction=direction, sampler=sampler)

    def add(values: Changes, state: TrialState, metric: float | None) -> None:
        params, dists = {}, {}
        for name, value in values.items():
            param = space.by_name(name)
            raw = param.to_optuna(value) if param else None
            if param is not None and raw is not None:
                params[name], dists[name] = raw, param.distribution()
        if params:
            study.add_trial(create_trial(state=state, value=metric, params=params, distributions=dists))

    if ctx.best is not None and ctx.best.metric is not None:
        add(space.current, TrialState.COMPLETE, ctx.best.metric)
    for e in ctx.history:
        if e.params:
            add(e.params, *_outcome(e))
    for description in ctx.in_flight:
        add(parse_description(description), TrialState.RUNNING, None)
    return study


def _outcome(e: PastExperiment) -> tuple[TrialState, float | None]:
    if e.status in _PRUNED:
        return TrialState.PRUNED, None
    if e.metric is None:  # e.g. killed by the user: says nothing about the configuration
        return TrialState.FAIL, None
    return TrialState.COMPLETE, e.metric


def _pick(
    ctx: ProposalContext,
    space: SearchSpace,
    area: str,
    tried: set[frozenset[tuple[str, str]]],
    rng: random.Random,
) -> _Pick | None:
    """New values for one or two constants of `area`, or None when nothing nearby is untried."""
    params = list(space.in_area(area))
    if not params:
        return None
    count = 2 if len(params) >= 2 and rng.random() < TWO_PARAM_SHARE else 1
    chosen = rng.sample(params, count)
    study = _study(ctx, space, seed=rng.randrange(2**31))

    def fresh(changes: Changes) -> bool:
        return all(v != space.current[n] for n, v in changes.items()) and _key(changes) not in tried

    if rng.random() < EXPLOIT_SHARE:  # a step around the best (good values are usually near it)
        near = {p.name: p.neighbours(space.current[p.name], rng)[:NEAR] for p in chosen}
        if all(near.values()):
            for _ in range(MAX_ASKS):
                changes = {n: rng.choice(values) for n, values in near.items()}
                if fresh(changes):
                    return _Pick(changes, "a step around the best")
    for _ in range(MAX_ASKS):
        trial = study.ask({p.name: p.distribution() for p in chosen})
        changes = {p.name: p.from_optuna(trial.params[p.name]) for p in chosen}
        if fresh(changes):
            return _Pick(changes, f"TPE's pick from {_scored(study)} scored trials")
    # TPE keeps landing on tried values (a small or well-explored area): nudge one constant.
    rng.shuffle(params)
    for param in params:
        for value in param.neighbours(space.current[param.name], rng):
            if fresh({param.name: value}):
                return _Pick({param.name: value}, "the nearest untried value (TPE's picks had all been tried)")
    return None


def _combine(ctx: ProposalContext, space: SearchSpace, area: str, tried: set[frozenset[tuple[str, str]]]) -> _Pick | None:
    """The two best near misses since the last keep (a single run better than the best, not
    shown better by the rule) that change different constants of `area`, together."""
    best = ctx.best
    if best is None or best.metric is None:
        return None
    sign = -1 if ctx.direction == "maximize" else 1
    since = [e for e in ctx.history if e.number > best.number and e.params and e.metric is not None]
    near = sorted((e for e in since if sign * (e.metric - best.metric) < 0  # type: ignore[operator]
                   and all(space.by_name(n) is not None and space.by_name(n).area == area for n in e.params)),  # type: ignore[union-attr]
                  key=lambda e: sign * e.metric)  # type: ignore[operator]
    for i, a in enumerate(near):
        for b in near[i + 1:]:
            changes = {**a.params, **b.params}
            if not set(a.params) & set(b.params) and _key(changes) not in tried:
                return _Pick(changes, f"near misses #{a.number} and #{b.number} together")
    return None


def _scored(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _hypothesis(
    ctx: ProposalContext, space: SearchSpace, area: str, pick: _Pick, why_area: str
) -> str:
    moves = []
    for name, new in pick.changes.items():
        old = space.current[name]
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
            moves.append(f"{'raising' if new > old else 'lowering'} {name}")
        else:
            moves.append(f"changing {name}")
    better = "lower" if ctx.direction != "maximize" else "higher"
    best = f" than the best ({ctx.metric_name} {ctx.best.metric:.6g}, #{ctx.best.number})" if ctx.best and ctx.best.metric is not None else ""
    text = f"In the {area} area, {' and '.join(moves)} should give a {better} {ctx.metric_name}{best}; {pick.how}."
    if why_area:
        text += f" Area {area}: {why_area}."
    if ctx.notes:
        # The search cannot act on free text; the notes ride along so the ledger keeps them.
        text += " Notes: " + " | ".join(ctx.notes)
    return text
