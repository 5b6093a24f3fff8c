"""The built-in `search` proposer: a model of the metric over the editable file's UPPER_CASE
constants, and the constants moved where a draw of that model says is best.

No LLM, no network. Each proposal starts from the best configuration (the clean working tree)
and changes one or two constants of one area. Why so few: a diff of one or two constants is
one experiment with one answer ("MATRIX_LR 0.04→0.05 helped"), readable in a chat digest and
revertible on its own; a ten-constant jump chosen blind teaches nothing about which part won.
The one exception is the "together" move (`_together`): every constant whose own best move the
model's mean already expects to gain, set at once, for effects each too small for the keep rule
to show alone (the model knows each part; the run checks their sum).

Nothing is kept between calls. The model (surface.py) is refitted from `ctx.history` every time:
every scored run (baselines, repeats and discards too) is one noisy observation of the metric at
the full configuration it ran, replayed from the experiments' descriptions; crashes and failed
checks are left out. So a restarted daemon proposes exactly what the old one would have, and
the same seed and history give the same proposal.

Area: `ctx.focus` when set; otherwise the area of the latest search experiment, moving on to
the next area once that area has failed `switch_area_after` times in a row. An area whose every
nearby move has been tried hands over to the next one (a focused one too, said once in the
hypothesis), so a search with nothing left never fails proposal after proposal.

Dedupe: a move equal to a past experiment's params, or an in-flight candidate's (parsed back
from its description), is never proposed again.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from nightlab.loop.proposers.base import (
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
from nightlab.loop.proposers.surface import Observation, Surface, noise_sigma
from nightlab.trainer.profiles import NOT_PYTHON_FIX, apply_constants, not_python

WIDENED = "widened:"  # in a hypothesis: the focused area had nothing left, the proposal is elsewhere
_FAILED = {"discard", "crash", "checks_failed"}
_PRUNED = {"crash", "checks_failed"}
# "NAME old→new" pairs joined by ", "; a tuple value holds ", " too, but never ", NAME ".
_PAIR_SPLIT = re.compile(r", (?=[A-Z_][A-Z0-9_]* )")
_PREFIX = re.compile(r"^[a-z]+ #\d+: ")  # "confirm #6: " before a re-run's changes

Changes = dict[str, object]
# The fewest constants the "together" move sets (_together); with fewer, the one- and two-constant
# moves cover it. Tuned on the yield benchmark's tuning seeds 3-5, 10, 11.
TOGETHER_MIN = 3


@dataclass(frozen=True)
class _Pick:
    changes: Changes
    how: str  # why these values, for the hypothesis


def _nothing_to_search(file: str) -> str:
    return (f"search: {file} (the first of project.editable, the file the search edits) has no numeric"
            " UPPER_CASE constants (`NAME = value` lines) to search; add some, or use the agent proposer")


def _unparsable(file: str, source: str) -> str | None:
    """Why `source` is no Python, in the file's words; None when it parses. A file that does not
    parse has no constants either, but "add some" sent an editor's stray character elsewhere."""
    problem = not_python(file, source)
    return None if problem is None else f"search: {problem}; {NOT_PYTHON_FIX}, then start again"


class SearchProposer:
    def __init__(self, seed: int = 0, switch_area_after: int = 5, target: Path | None = None,
                 noise_prior: float = 0.003) -> None:
        """`target`: the editable file, read once so `areas` (for `focus` validation) matches it;
        `noise_prior`: run-to-run noise as a share of the metric, until repeats measure it."""
        self.seed = seed
        self.noise_prior = noise_prior
        self.switch_area_after = switch_area_after
        self.areas: tuple[str, ...] | None = BUILTIN_AREAS
        self.unsearchable: str | None = None  # why `target` gives the search nothing to set
        self.unparsable: str | None = None  # why `target` is no Python (a fix in the file, not the config)
        if target is not None and target.is_file():
            source = target.read_text(encoding="utf-8", errors="replace")
            space = build_space(target.name, source)
            self.areas = space.areas or BUILTIN_AREAS
            self.unparsable = _unparsable(str(target), source)
            self.unsearchable = None if space.params else _nothing_to_search(target.name)

    def propose(self, ctx: ProposalContext) -> Proposal:
        path = ctx.workspace / ctx.editable[0]
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProposalError(f"search: cannot read {ctx.editable[0]}: {exc}") from None
        space = build_space(ctx.editable[0], source)
        if not space.params:
            raise ProposalError(_unparsable(str(path), source) or _nothing_to_search(ctx.editable[0]))
        if ctx.focus is not None and ctx.focus not in space.areas:
            raise ProposalError(f"search: unknown focus area {ctx.focus!r}; areas: {', '.join(space.areas)}")

        rng = random.Random(f"{self.seed}:{len(ctx.history)}:{len(ctx.in_flight)}")
        tried = _tried(ctx)
        area, switched = self._area(ctx, space)
        # An exhausted area hands over to the next one, a focused one too (the engine says so
        # once in chat): a search with nothing left never fails proposal after proposal.
        observations = _observations(ctx, space)
        prior = self.noise_prior * abs(ctx.best.metric) if ctx.best and ctx.best.metric else self.noise_prior
        surface = Surface(space, observations, noise_sigma(observations, prior))
        pick = None
        candidate_area = area
        for candidate_area in _rotate(space.areas, area):
            pick = _pick(ctx, space, candidate_area, tried, rng, surface)
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


def _pairs(description: str) -> dict[str, tuple[object, object]]:
    """A search description's changes as {name: (old, new)}, a re-run's "confirm #N: " prefix
    skipped; empty for free text (e.g. an agent's)."""
    pairs: dict[str, tuple[object, object]] = {}
    for pair in _PAIR_SPLIT.split(_PREFIX.sub("", description)):
        name, _, rest = pair.partition(" ")
        old, arrow, new = rest.partition("→")
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) or not arrow:
            return {}
        try:
            pairs[name] = (ast.literal_eval(old.strip()), ast.literal_eval(new.strip()))
        except (ValueError, SyntaxError):
            return {}
    return pairs


def parse_description(description: str) -> Changes:
    """The changes in a search description (empty for free text)."""
    return {name: new for name, (_, new) in _pairs(description).items()}


def _observations(ctx: ProposalContext, space: SearchSpace) -> list[Observation]:
    """Every scored run as (full configuration, metric). The configuration is replayed
    backwards from the file now (the best's): each run ran on the best of its time plus its
    own changes, and passing a keep undoes its changes. A keep the search did not make (an
    agent's edit) ends the replay after its own run: what ran before it is unknown."""
    config = dict(space.current)
    seen: list[Observation] = []
    for e in reversed(ctx.history):
        if e.metric is not None and e.status not in _PRUNED:
            seen.append(Observation({**config, **e.params}, e.metric, e.group))
        if e.status == "keep" and e.kind != "baseline" and not e.params:
            break
        if e.status == "keep" and e.params:
            config.update({name: old for name, (old, _) in _pairs(e.description).items()})
    return seen[::-1]


def _key(changes: Changes) -> frozenset[tuple[str, str]]:
    return frozenset((n, format_value(v)) for n, v in changes.items())


def _tried(ctx: ProposalContext) -> set[frozenset[tuple[str, str]]]:
    keys = {_key(e.params) for e in ctx.history if e.params}
    keys |= {_key(c) for d in ctx.in_flight if (c := parse_description(d))}
    return keys


def _rotate(areas: tuple[str, ...], start: str) -> list[str]:
    i = areas.index(start)
    return list(areas[i:] + areas[:i])


def _pick(
    ctx: ProposalContext,
    space: SearchSpace,
    area: str,
    tried: set[frozenset[tuple[str, str]]],
    rng: random.Random,
    surface: Surface,
) -> _Pick | None:
    """The best untried move of `area` under one draw of the model (one or two constants, or the
    together move), or None when every move in the area has been tried."""
    moves = {p.name: space.moves(p) for p in space.in_area(area)}
    candidates: list[Changes] = [{n: v} for n, values in moves.items() for v in values]
    candidates += [{a: v, b: w} for a, b in combinations(moves, 2) for v in moves[a] for w in moves[b]]
    sign = -1.0 if ctx.direction == "maximize" else 1.0
    together = _together(surface, moves, sign)
    candidates += [together] if together else []
    candidates = [c for c in candidates if _key(c) not in tried]
    if not candidates:
        return None
    predicted = surface.predict(surface.draw(rng), candidates)
    i = int(np.argmin(sign * predicted))
    what = "every constant the model expects to gain, moved at once" if candidates[i] is together else "the best move"
    return _Pick(candidates[i], f"{what} on a draw of the model of {surface.runs} runs ({predicted[i]:+.2g} predicted)")


def _together(surface: Surface, moves: dict[str, list[object]], sign: float) -> Changes | None:
    """Each constant at its best single move under the posterior mean, for every constant whose
    best move is expected to gain at all; None when fewer than TOGETHER_MIN are. Effects of a
    quarter σ each are below what the keep rule can show one by one (the few_big landscape's
    eight small constants); moved together they add up to a change it can. The draw then weighs
    this move against the one- and two-constant ones like any other."""
    best: Changes = {}
    for name, values in moves.items():
        if values:
            expected = sign * surface.predict(surface.mean, [{name: v} for v in values])
            j = int(np.argmin(expected))
            if expected[j] < 0:
                best[name] = values[j]
    return best if len(best) >= TOGETHER_MIN else None


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
    listed = moves[0] if len(moves) == 1 else f"{', '.join(moves[:-1])} and {moves[-1]}"
    text = f"In the {area} area, {listed} should give a {better} {ctx.metric_name}{best}; {pick.how}."
    if why_area:
        text += f" Area {area}: {why_area}."
    if ctx.notes:
        # The search cannot act on free text; the notes ride along so the ledger keeps them.
        text += " Notes: " + " | ".join(ctx.notes)
    return text
