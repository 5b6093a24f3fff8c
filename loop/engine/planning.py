"""Planning: what runs next, and where.

A wave is the set of open candidates: up to one per slot, all branching from the best commit
(`loop.wave` in kv: base, kind, size, pins). Members are created one by one (each proposal sees
the ones before it as in flight) and launched as soon as each is committed; when every member has
ended, the wave is decided at once (best of wave) and recorded in number order. In the
asynchronous mode each freed slot gets the next member of a wave re-planned from the best as it
is then.

Results are compared only within a hardware class, so a wave first measures the best commit (a
baseline, pinned there) on every class that has no measurement of it yet: each slot's class known
ahead (local), and each place where a result could not be compared (a cluster; `kv` WANTED_KEY).
The session starts with `loop.baseline_runs` baselines (one on each slot of the first class where
it has more); a new best, and later the best every
`loop.remeasure_every` experiments, is measured again (drift pins).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nightlab.loop.engine.context import ANYWHERE, USER_HEAD_KEY, Context
from nightlab.loop.state import ledger
from nightlab.loop.state.ledger import Candidate, Experiment
from nightlab.loop.state.stats import pooled_noise

WAVE_KEY = "loop.wave"  # kv: the wave in flight; absent between waves
# kv: where a result could not be compared (no reference of its base there): [{hardware, node}];
# the next wave measures the best commit there first
WANTED_KEY = "loop.wanted_baselines"

Pin = dict[str, str]  # {hardware, node}, as candidates.pin


@dataclass(frozen=True)
class Wave:
    base: str  # the commit every member branches from
    kind: str  # baseline | proposal | "" (no record: a confirm run alone)
    size: int  # members at most (closed to new ones once decided)
    done: int = 0  # the session's baselines recorded before it (they number a baseline wave's labels)
    pins: tuple[Pin, ...] = ()  # baselines to run first, where each must run

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "kind": self.kind, "size": self.size, "done": self.done, "pins": list(self.pins)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Wave:
        # a baseline wave stored by an older nightlab has no pins: its members run anywhere
        default = [ANYWHERE] * data["size"] if data["kind"] == "baseline" else []
        return cls(data["base"], data["kind"], data["size"], data.get("done", 0), tuple(data.get("pins", default)))


def current_wave(ctx: Context, open_: list[Candidate]) -> Wave:
    data = ctx.store.get(WAVE_KEY)
    # No wave record: a confirm run (or a single-slot candidate from an older version) alone.
    return Wave.from_json(data) if data else Wave(open_[0].base_commit, "", len(open_))


def new_wave(ctx: Context) -> None:
    """The next wave from the best commit (a person's commit found while runs were open, once), and
    its first member."""
    mine = ctx.store.get(USER_HEAD_KEY)
    if mine is not None:
        ctx.store.delete(USER_HEAD_KEY)
        if ctx.git.has_commit(mine):
            ctx.reset_tree(mine, ledger.last_number(ctx.store) + 1)
    head = ctx.git.head()
    rows = ledger.experiments(ctx.store)
    size = len(ctx.slots)
    if ctx.max_experiments is not None:
        size = max(1, min(size, ctx.max_experiments - len(rows)))
    wave = plan(ctx, rows, head)
    if wave.kind == "baseline":
        size = min(size, len(wave.pins))
    start(ctx, dataclasses.replace(wave, size=size, pins=wave.pins[:size]), rows)


def start(ctx: Context, wave: Wave, rows: list[Experiment]) -> Candidate:
    """Store `wave` as the one in flight and create its next member, in one transaction."""
    with ctx.store.transaction():
        ctx.store.set(WAVE_KEY, wave.to_json())
        ctx.store.delete(WANTED_KEY)
        return add_member(ctx, rows)


def plan(ctx: Context, rows: list[Experiment], head: str) -> Wave:
    """What a wave from `head` must run first: the session's baseline repeats, then a baseline
    on every class (a slot's, or one where a result could not be compared) that has not
    measured `head`."""
    baselines = [e for e in rows if e.kind == "baseline" and e.status == "keep"]
    wanted = [*({"hardware": s.hardware, "node": ""} for s in ctx.slots if s.hardware),
              *ctx.store.get(WANTED_KEY, [])]
    pins: list[Pin] = []
    kind = "proposal"
    first = wanted[0] if wanted else ANYWHERE
    repeats = baseline_repeats(ctx, first)
    if len(baselines) < repeats and all(e.kind == "baseline" for e in rows):
        kind = "baseline"  # the session's first measurements: repeats on the first class
        pins = [first] * (repeats - len(baselines))
    for want in wanted:
        ref = ledger.reference(rows, ctx.hw_class(want["hardware"]))
        if all(p["hardware"] != want["hardware"] for p in pins) and (ref is None or ref.commit != head):
            pins.append(want)
    if kind == "proposal":
        pins += [p for p in drift_pins(ctx, rows, head) if p not in pins]
    return Wave(head, kind, len(ctx.slots), len(baselines), tuple(pins))


def baseline_repeats(ctx: Context, first: Pin) -> int:
    """The session's baseline runs: `loop.baseline_runs`, or one on each slot of the first class
    where it has more slots (they run at the same time: more runs of the noise for no more time,
    where those slots would wait). 1 asks for no repeats at all."""
    asked = ctx.settings.loop.baseline_runs
    return asked if asked <= 1 else max(asked, sum(s.hardware == first["hardware"] for s in ctx.slots))


def drift_pins(ctx: Context, rows: list[Experiment], head: str) -> list[Pin]:
    """Classes where the best (`head`) is measured again: a new best until it has
    `loop.baseline_runs` runs after its keep (the runs that got it kept were picked for
    luck: fresh ones tell its worth, and every later comparison with it gets surer; not where every
    repeat gave the same number, as a fixed seed's do: no luck to undo), then every
    `loop.remeasure_every` experiments (drift: a GPU's speed, a shared machine's load)."""
    loop = ctx.settings.loop
    pins: list[Pin] = []
    for cls in dict.fromkeys(e.hardware_class for e in rows if e.hardware):
        ref = ledger.reference(rows, cls)
        if ref is None or ref.commit != head:
            continue
        mine = [e for e in rows if e.commit == head and e.hardware_class == cls]
        kept = max((e.number for e in mine if e.status == "keep" and e.kind != "baseline"), default=0)
        runs = [e.number for e in mine if e.metric is not None]
        fresh = [n for n in runs if n > kept]
        since = sum(e.number > runs[-1] for e in rows)
        # baseline_runs = 1 asks for no repeats at all: then a new best is not re-measured either
        lucky = loop.baseline_runs > 1 and not pooled_noise(ledger.repeat_groups(rows, cls), 0.0).identical
        if (lucky and len(fresh) < loop.baseline_runs) or 0 < loop.remeasure_every <= since:
            pins.append({"hardware": cls.hardware, "node": ""})
    return pins


def add_member(ctx: Context, rows: list[Experiment]) -> Candidate:
    """The wave's next member: its pinned baselines first, then proposals."""
    store = ctx.store
    wave = Wave.from_json(store.get(WAVE_KEY))
    focus = ledger.focus(store)
    members = ledger.open_candidates(store)
    made = [c.pin or ANYWHERE for c in members if c.kind == "baseline"]
    for pin in wave.pins:
        if pin in made:
            made.remove(pin)
            continue
        if wave.kind == "baseline" and pin == wave.pins[0]:
            n = wave.done + len(members) + 1
            total = baseline_repeats(ctx, pin)
            label = "baseline" if total == 1 else f"baseline {n}/{total}"
        else:
            where = pin["hardware"] or pin["node"]
            ref = ledger.reference(rows, ctx.hw_class(pin["hardware"]))
            again = ref is not None and ref.commit == wave.base
            label = ("re-measure the best" + (f" on {where}" if where else "")) if again else f"baseline on {where}"
        return ledger.new_candidate(store, "baseline", wave.base, commit=wave.base,
                                    phase="committed", description=label, focus=focus, pin=pin)
    return ledger.new_candidate(store, "proposal", wave.base, focus=focus)


def close(ctx: Context, members: int) -> None:
    """A decided wave takes no new members (a /resume while it is being recorded)."""
    data = ctx.store.get(WAVE_KEY)
    if data is not None:
        ctx.store.set(WAVE_KEY, dataclasses.replace(Wave.from_json(data), size=members).to_json())
