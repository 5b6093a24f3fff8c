"""The cycle: the engine's phases in order, as a restartable state machine over the candidates.

    startup -> plan -> propose -> launch -> poll -> decide -> record -> export -> plan ...

Each candidate's `phase` says how far its cycle got, and every step is idempotent from its
phase, so the engine may be SIGKILLed anywhere and a new one carries on:

  proposing  the proposer is editing the tree      -> reset the tree to base, propose again
  committed  the commit exists                     -> launch (or adopt the run a launch left)
  running    a run is recorded in `runs`           -> poll it (alive) or read how it ended
  finished   the outcome is stored (Outcome JSON)  -> move git to keep/reset, record
  recorded   experiment + event written, once      -> regenerate the exports
  done

Each phase is a module named for it (planning, proposing, launching, polling, deciding,
recording, exporting); this one only says which comes next. Between steps, a checkpoint ticks,
applies steering commands and the heartbeat settings a SIGHUP reloaded.

With several slots the candidates run in waves (all from the best commit, decided together), or,
with `loop.mode = "async"`, each freed slot starts the next candidate at once and each result is
decided as it ends; a promising result from an older base is re-made on the current best (a
`rebase` candidate) and re-run before it can be kept.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from nightlab.loop.engine import planning
from nightlab.loop.engine.caching import prune_compile_cache, prune_waiting
from nightlab.loop.engine.context import USER_HEAD_KEY, Context, say
from nightlab.loop.engine.deciding import decide
from nightlab.loop.engine.exporting import export
from nightlab.loop.engine.launching import free_slot, launch
from nightlab.loop.engine.outcome import Outcome
from nightlab.loop.engine.polling import poll
from nightlab.loop.engine.proposing import propose, proposer_resting
from nightlab.loop.engine.recording import record
from nightlab.loop.engine.startup import startup
from nightlab.loop.engine.steering import apply_commands
from nightlab.loop.engine.upgrading import notice_data_change, upgrade_harness
from nightlab.loop.executors import Executor
from nightlab.loop.proposers.base import Proposer
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import LIVE_HEARTBEAT_KEY, HeartbeatSettings, Secret, Settings
from nightlab.loop.state.ledger import Candidate
from nightlab.loop.workspace import Workspace

FIRST_POLL_S = 0.02  # polls start fast (a stub run ends at once) and back off to the checkpoint


class Engine:
    def __init__(
        self,
        settings: Settings,
        ws: Workspace,
        executor: Executor,
        proposer: Proposer,
        env: dict[str, str],
        stop: threading.Event,
        parent_pid: int | None = None,
        handed: Iterable[Secret] = (),
    ) -> None:
        self.ctx = Context(settings, ws, executor, proposer, env, handed)
        self.store = self.ctx.store
        self.stop = stop
        self.parent_pid = parent_pid
        self._last_checkpoint = 0.0
        self._delay = FIRST_POLL_S
        # the daemon's heartbeat settings as this engine last applied them (a change: a SIGHUP)
        self._live: Any = self.store.get(LIVE_HEARTBEAT_KEY)
        self._paused = ledger.paused(self.store) is not None

    def run(self, max_experiments: int | None) -> int:
        ctx, store = self.ctx, self.store
        startup(ctx)
        ctx.max_experiments = max_experiments
        busy = True
        while not self.stop.is_set():
            if busy or time.monotonic() - self._last_checkpoint >= ctx.settings.loop.checkpoint_interval:
                self.checkpoint()
                if self.stop.is_set():
                    break  # runs in flight go on; the next engine re-attaches
            open_ = ledger.open_candidates(store)
            if (not _in_flight(open_) and max_experiments is not None
                    and ledger.experiment_count(store) >= max_experiments):
                store.set("engine.finished", True)
                say(f"{views.counted(ledger.experiment_count(store), 'experiment')} recorded; stopping")  # a wave ends whole
                break
            if not open_:
                upgrade_harness(ctx)  # one that waited for the runs in flight at the start
                if ledger.paused(store) is not None:
                    self.stop.wait(ctx.settings.loop.checkpoint_interval)
                    continue
                prune_compile_cache(ctx)  # no candidate open, so no run in flight reads the caches
                notice_data_change(ctx)  # a file rewritten during the night scores what runs next
                planning.new_wave(ctx)
                busy = True
                continue
            busy = self.step(open_)
            if not busy:  # only runs in flight: poll fast at first, back off to the checkpoint
                self.stop.wait(self._delay)
                self._delay = min(self._delay * 1.5, ctx.settings.loop.checkpoint_interval)
        self.rest()
        return 0

    def rest(self) -> None:
        """The workspace as every stop leaves it (SIGTERM, the parent gone, --max-experiments): with no
        run in flight, the session branch at the best that status and best name (or at a person's
        commit the loop has not measured yet, which the next start measures). Git had followed a
        result to be re-run (or a proposal not launched yet) to its commit; the next start checks it
        out again. A run in flight keeps the tree it runs in, and a result being recorded its git step."""
        open_ = ledger.open_candidates(self.store)
        if self.ctx.in_place and open_ and not _in_flight(open_):
            self.ctx.reset_tree(open_[0].base_commit, open_[0].number)
        mine = self.store.get(USER_HEAD_KEY)
        if not open_ and mine is not None and self.ctx.git.has_commit(mine):
            # a person's commit found while runs were open, not measured yet: the next wave starts from
            # it; stopped before, the branch is left on it (it was left off it, "kept" as the alert said)
            self.ctx.reset_tree(mine, ledger.last_number(self.store) + 1)

    def checkpoint(self) -> None:
        """Tick, apply steering commands and reloaded settings, notice a dead parent. Cheap;
        called often."""
        self._last_checkpoint = time.monotonic()
        self.store.set("engine.tick", time.time())
        # runs that ended since the last look are recorded ended before a command is applied: a kill
        # sent while nightlab was stopped discarded the result of a run that had finished meanwhile
        # (only then: the step polls anyway)
        if self.store.pending_commands():
            poll(self.ctx)
        apply_commands(self.store)
        paused = ledger.paused(self.store) is not None
        if self._paused and not paused:  # before a data-failed run is run again, maybe on repaired data
            notice_data_change(self.ctx)
        self._paused = paused
        live = self.store.get(LIVE_HEARTBEAT_KEY)
        if live is not None and live != self._live:
            self._live = live
            changed = self.ctx.apply_heartbeat(HeartbeatSettings(**live))
            say(f"settings reloaded: {', '.join(changed) or 'nothing changed here'}")
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            say("the parent daemon is gone; stopping (the runs in flight are left to be re-attached)")
            self.stop.set()

    def step(self, open_: list[Candidate]) -> bool:
        """One step of the wave in flight; False when there was nothing to do but wait."""
        ctx, store = self.ctx, self.store
        if poll(ctx):
            return True
        wave = planning.current_wave(ctx, open_)
        if ctx.asynchronous and wave.kind != "baseline":
            return self.step_async(open_)
        paused = ledger.paused(store) is not None
        if not paused:  # a pause stops new launches; the runs in flight finish
            for cand in open_:
                if cand.phase == "committed" and free_slot(ctx, cand) is not None:
                    launch(ctx, cand)
                    self._delay = FIRST_POLL_S
                    return True
                if cand.phase == "proposing" and not proposer_resting(ctx):
                    propose(ctx, cand, open_)
                    return True
            if len(open_) < wave.size and free_slot(ctx) is not None:
                planning.add_member(ctx, ledger.experiments(store))
                return True
        runs = {c.id: ledger.run_for_candidate(store, c.id) for c in open_ if c.phase == "running"}
        ended = all(c.phase in ("finished", "recorded") or ((run := runs.get(c.id)) is not None and run.state == "exited")
                    for c in open_)
        if not ended or (len(open_) < wave.size and not paused):
            return False
        if not all(_decided(c) for c in open_):
            decide(ctx, open_, wave.base)
            return True
        for cand in open_:
            if cand.phase == "finished":
                record(ctx, cand)
                return True
        export(ctx, open_)
        return True

    def step_async(self, open_: list[Candidate]) -> bool:
        """One step of the asynchronous mode. Order matters for git: a proposal is made at once
        (from the best commit it was created on, before anything can move the best), then each
        ended candidate goes through decide -> record -> export on its own, then launches, and a
        free slot gets a new candidate."""
        ctx, store = self.ctx, self.store
        for cand in open_:
            if cand.phase == "proposing" and not proposer_resting(ctx):
                propose(ctx, cand, open_)
                return True
        for cand in open_:
            if cand.phase == "finished" and not _decided(cand):
                decide(ctx, [cand], ctx.git.head())  # ended before any run
                return True
            if cand.phase == "finished":
                record(ctx, cand)
                return True
            if cand.phase == "recorded":
                export(ctx, [cand])
                return True
        waiting = 0  # ended, their results waiting for their base's measurement: they hold no slot
        for cand in open_:
            run = ledger.run_for_candidate(store, cand.id) if cand.phase == "running" else None
            if run is not None and run.state == "exited":
                if _measuring_base(ctx, cand, run, open_):
                    waiting += 1
                    continue
                decide(ctx, [cand], ctx.git.head())
                return True
        if ledger.paused(store) is not None:  # a pause stops new launches; the runs in flight finish
            return False
        for cand in open_:
            if cand.phase == "committed" and free_slot(ctx, cand) is not None:
                launch(ctx, cand)
                self._delay = FIRST_POLL_S
                return True
        # an upgrade of the harness, and a prune of the compile caches, wait for no candidate to be
        # open: none new until then (the caches are measured last, only when one would start)
        # a person's commit waits for the open runs to end, then a new wave starts from it (new_wave)
        room = not ctx.upgrade_waiting and store.get(USER_HEAD_KEY) is None and (
            ctx.max_experiments is None or ledger.experiment_count(store) + len(open_) < ctx.max_experiments)
        if room and len(open_) - waiting < len(ctx.slots) and free_slot(ctx) is not None and not prune_waiting(ctx):
            notice_data_change(ctx)  # planned on the data as it is now: the best measured first on new data
            rows = ledger.experiments(store)  # a wave from the best commit as it is now
            planning.start(ctx, planning.plan(ctx, rows, ctx.git.head()), rows)
            return True
        return False


def _measuring_base(ctx: Context, cand: Candidate, run: ledger.RunRecord, open_: list[Candidate]) -> bool:
    """Its base commit is being measured on its class where it was not measured yet (new data, an
    edited config): its result waits for that run, or it could find nothing on its setting to be
    compared with. A base measured there already (a drift re-measurement of the best) is compared at
    once, and a measurement on another class is none of its business: waiting only idled a slot."""
    if cand.kind == "baseline" or (run.setting or ctx.setting, cand.base_commit) in ctx.kept:
        return False
    measuring = (ledger.run_for_candidate(ctx.store, o.id) for o in open_
                 if o.kind == "baseline" and o.commit == cand.base_commit and o.phase == "running")
    return any(other is not None and ctx.run_class(other) == ctx.run_class(run) for other in measuring)


def _in_flight(open_: list[Candidate]) -> bool:
    """A run of the candidates is under way, or its result is being recorded."""
    return any(c.phase in ("running", "finished", "recorded") for c in open_)


def _decided(cand: Candidate) -> bool:
    return cand.outcome is not None and Outcome.from_json(cand.outcome).decided
