"""Yield: what a night of experiments really gains, on landscapes whose truth is known.

The real engine (run_engine: proposer, git ratchet, executor, decision rule, ledger) runs
120-experiment nights whose `[project] run_command` is a synthetic landscape trainer
(tests/fakes/landscape.py: val_bpb = a known function of train.py's constants + N(0, σ²)),
so each night's true gain, false keeps and over-claim are exact. Per rule x proposer, over
shapes x seeds, the table gives medians (and the range) of:

- gain %     true gain of the night's best over the start, as a share of the possible
- false %    kept changes truly worse than what they replaced, as a share of the keeps
- over σ     over-claim: the reported gain (baseline mean - best's mean) minus the true gain, in σ
- missed     proposals truly better than their base by >= 0.5 σ that were not kept (per night)
- repeats %  experiments spent on repeats (baselines, re-runs, re-measurements of the best)
- keeps      kept changes per night

Rules: `new` = the defaults of [loop] (decision.py); `old` = the rule before issue 13 (one
baseline, noise unknown = 0, so any better run is kept: keep_z = 0, max_runs = 1, no
re-measurement; the old self-pause after 15 discards is left out, it would only stop nights).
Proposers: `search` = the built-in search ([proposer] kind = "search"), `random` = one or two
constants set to a random value ×/÷ 4 around the best's.

    .venv/bin/python bench/yield.py [--shapes separable,interactions,few_big] [--seeds 0,1,2]
                                    [--experiments 120] [--rules new,old] [--proposers search,random]
                                    [--loop key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nightlab.loop.engine import run_engine
from nightlab.loop.proposers.base import Proposal, ProposalContext
from nightlab.loop.proposers.search import describe
from nightlab.loop.proposers.space import build_space
from nightlab.loop.state import ledger, views
from nightlab.loop.state.store import Store
from nightlab.trainer.profiles import apply_constants

from tests.fakes import landscape
from tests.fakes.landscape import Landscape

OLD_RULE = {"baseline_runs": 1, "keep_z": 0.0, "max_runs": 1, "remeasure_every": 0}
MISSED_AT = 0.5  # σ: a proposal at least this much truly better than its base counts as a gain


class RandomProposer:
    """One or two constants, each set to a random value ×/÷ 4 around the best's (two
    significant digits, as the search's grid)."""

    areas = None

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def propose(self, ctx: ProposalContext) -> Proposal:
        rng = random.Random(f"{self.seed}:{len(ctx.history)}")
        path = ctx.workspace / ctx.editable[0]
        source = path.read_text()
        space = build_space(ctx.editable[0], source)
        names = rng.sample(sorted(space.current), rng.choice((1, 2)))
        changes: dict[str, object] = {n: float(f"{float(space.current[n]) * 4 ** rng.uniform(-1, 1):.2g}") for n in names}  # type: ignore[arg-type]
        path.write_text(apply_constants(source, changes))
        return Proposal(describe(space.current, changes), "random", "constants", changes)


@dataclass(frozen=True)
class Night:
    gain_share: float
    false_share: float | None  # None: nothing kept
    over_sigma: float
    missed: int
    repeat_share: float
    keeps: int
    seconds: float


def night(land: Landscape, rule: str, proposer: str, experiments: int, loop: dict[str, Any]) -> Night:
    with tempfile.TemporaryDirectory() as tmp:
        settings = landscape.make_workspace(Path(tmp), land, land.seed, **(OLD_RULE if rule == "old" else {}), **loop)
        repo = settings.workspace_path
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            run_engine(settings, experiments, proposer=RandomProposer(land.seed) if proposer == "random" else None)
        seconds = time.perf_counter() - started
        rows = ledger.experiments(Store.for_workspace(repo))
        truth = {c: landscape.true_at(repo, land, c) for c in {e.commit for e in rows}}
        start = rows[0].commit
        kept = [e for e in rows if e.status == "keep" and e.kind != "baseline"]
        false = 0
        best = start
        missed = 0
        decided: dict[str, bool] = {}  # a proposal's commit -> kept in the end
        for e in rows:
            if e.kind in ("proposal", "confirm", "rebase") and e.metric is not None:
                decided[e.commit] = e.status == "keep"
        firsts = {}
        for e in rows:
            if e.kind in ("proposal", "rebase") and e.metric is not None:
                firsts[e.commit] = best
            if e.status == "keep" and e.kind != "baseline":
                false += truth[e.commit] > truth[best]
                best = e.commit
        for commit, base in firsts.items():
            if truth[base] - truth[commit] >= MISSED_AT * land.sigma and not decided.get(commit):
                missed += 1
        true_gain = land.base - truth[best]
        found = views.night_gain(Store.for_workspace(repo), rows)  # what /best and the report say
        reported = found[1].gain if found is not None else 0.0
        repeats = sum(e.kind in ("baseline", "confirm") for e in rows) - 1  # the first baseline is no repeat
        return Night(
            gain_share=true_gain / land.possible(), false_share=false / len(kept) if kept else None,
            over_sigma=(reported - true_gain) / land.sigma, missed=missed, repeat_share=repeats / len(rows),
            keeps=len(kept), seconds=seconds,
        )


def _med(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="separable,interactions,few_big")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--experiments", type=int, default=120)
    parser.add_argument("--rules", default="new,old")
    parser.add_argument("--proposers", default="search,random")
    parser.add_argument("--loop", nargs="*", default=[], help="[loop] overrides for the new rule, e.g. keep_z=2.5")
    args = parser.parse_args()
    loop: dict[str, Any] = {}
    for item in args.loop:
        key, _, value = item.partition("=")
        loop[key] = float(value) if "." in value else int(value)
    shapes, seeds = args.shapes.split(","), [int(s) for s in args.seeds.split(",")]
    print(f"{args.experiments}-experiment nights, σ = 0.002, shapes {', '.join(shapes)}, seeds {args.seeds}"
          + (f", new rule with {loop}" if loop else ""), flush=True)
    header = f"{'rule':5} {'proposer':8} {'gain % of possible':>22} {'false keeps %':>20} {'over-claim σ':>20} {'missed':>6} {'repeats %':>9} {'keeps':>5} {'s/night':>7}"
    lines = []
    for rule in args.rules.split(","):
        for proposer in args.proposers.split(","):
            nights = []
            for shape in shapes:
                for seed in seeds:
                    n = night(landscape.make(shape, seed), rule, proposer, args.experiments, loop if rule == "new" else {})
                    nights.append(n)
                    print(f"  {rule} {proposer} {shape} seed {seed}: gain {n.gain_share:.0%} false"
                          f" {'—' if n.false_share is None else f'{n.false_share:.0%}'} over {n.over_sigma:+.2f}σ"
                          f" missed {n.missed} repeats {n.repeat_share:.0%} keeps {n.keeps} ({n.seconds:.0f} s)", flush=True)
            lines.append(
                f"{rule:5} {proposer:8} {_med([100 * n.gain_share for n in nights], '.0f'):>22}"
                f" {_med([100 * n.false_share for n in nights if n.false_share is not None], '.0f'):>20}"
                f" {_med([n.over_sigma for n in nights], '+.2f'):>20} {statistics.median(n.missed for n in nights):>6.0f}"
                f" {statistics.median(100 * n.repeat_share for n in nights):>9.0f} {statistics.median(n.keeps for n in nights):>5.0f}"
                f" {statistics.fmean(n.seconds for n in nights):>7.0f}")
    print("\nmedian [min, max] over nights")
    print(header)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
