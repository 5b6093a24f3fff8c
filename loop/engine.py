"""The experiment cycle as a restartable state machine over the candidates table.

    propose -> commit -> launch -> poll -> judge -> keep or reset -> record -> exports -> repeat

Each candidate's `phase` says how far its cycle got, and every step is idempotent from its
phase, so the engine may be SIGKILLed anywhere and a new one carries on:

  proposing  the proposer is editing the tree      -> reset the tree to base, propose again
  committed  the commit exists                     -> launch (or adopt the run a launch left)
  running    a run is recorded in `runs`           -> poll it (alive) or read how it ended
  finished   the verdict is stored (outcome JSON)  -> move git to keep/reset, record
  recorded   experiment + event written, once      -> regenerate the exports
  done

Rejected proposals (a file outside `project.editable` changed) are recorded as `crash` with the
reason "rejected: ..." and no run: they count as failures for the anti-thrash rules.

With several slots the candidates run in waves (all from the best commit, decided together), or,
with `loop.mode = "async"`, each freed slot starts the next candidate at once and each result is
decided as it ends; a promising result from an older base is re-made on the current best (a
`rebase` candidate) and re-run before it can be kept.

    python -m nightlab.loop.engine --config FILE [--workspace PATH] [--max-experiments N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nightlab.loop import hardware, ledger, steering
from nightlab.loop.config import Settings, load_settings
from nightlab.loop.decision import (
    DIRECTION_KEY,
    NOISE_PRIOR_KEY,
    Rule,
    gain,
    pooled_noise,
)
from nightlab.loop.errors import UserError
from nightlab.loop.executors import Executor, RunHandle, RunSpec, Slot, make_executor
from nightlab.loop.executors.runfiles import (
    find_handle,
    read_tail,
    run_hardware,
    started_at,
)
from nightlab.loop.hardware import HardwareClass
from nightlab.loop.judge import (
    NOT_COMPARED_PREFIX,
    REBASE_PREFIX,
    Measurement,
    Verdict,
    judge,
)
from nightlab.loop.ledger import Candidate, Experiment
from nightlab.loop.lock import EngineLock
from nightlab.loop.proposers.base import (
    PastExperiment,
    Proposal,
    ProposalContext,
    ProposalError,
    Proposer,
)
from nightlab.loop.store import Store, state_dir
from nightlab.loop.summary import parse_summary
from nightlab.loop.workspace import (
    Git,
    Workspace,
    clear_stale_git_locks,
    dirty_error,
    keep_artifact,
    open_workspace,
    protect,
    protected_mismatches,
    run_environment,
    second_opinion,
)

_LOG_TAIL_BYTES = 256 * 1024  # the summary block is at the end of the log
_EVENT_LOG_TAIL_LINES = 30
_CANCEL_GRACE_S = 10.0
_FIRST_POLL_S = 0.02  # polls start fast (a stub run ends at once) and back off to the checkpoint
WAVE_KEY = "loop.wave"  # kv: the wave in flight {base, kind, size, done, pins}; absent between waves
# kv: where a result could not be compared (no reference of its base there): [{hardware, node}];
# the next wave measures the best commit there first
WANTED_KEY = "loop.wanted_baselines"
_ANYWHERE = {"hardware": "", "node": ""}  # a pin that does not restrict where a run goes
DISCARDS_SAID_KEY = "loop.discards_said"  # kv: the keep whose following run of discards was reported
WIDENED_KEY = "loop.focus_widened"  # kv: the focus already said to be exhausted (said once)


def _say(message: str) -> None:
    # Beside the daemon's log lines: a time in a terminal, none under journald (it adds its own).
    stamp = "" if os.environ.get("JOURNAL_STREAM") else time.strftime("%H:%M:%S ")
    print(f"{stamp}nightlab engine: {message}", file=sys.stderr, flush=True)


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
    ) -> None:
        self.settings, self.ws, self.executor, self.proposer = settings, ws, executor, proposer
        self.env, self.stop, self.parent_pid = env, stop, parent_pid
        self.store: Store = ws.store
        self.setting = hardware.record_setting(self.store, ws.run_command, env)
        self.git = Git(ws.path)
        self.slots = executor.slots()
        self.metric_name = settings.project.metric
        self.direction = settings.project.direction
        # One local slot: the run happens in the workspace itself, exactly as the single-slot loop
        # always did. Several slots, or a cluster (its nodes see only the shared filesystem): each
        # candidate runs in its own snapshot (a worktree at its commit), the workspace stays at the
        # wave's base, and the branch moves only when a wave is decided.
        self.in_place = len(self.slots) == 1 and getattr(executor, "backend", "local") == "local"
        self.asynchronous = settings.loop.mode == "async" and not self.in_place
        self.max_experiments: int | None = None
        shared = getattr(executor, "shared_dir", None)
        self.run_root = state_dir(ws.path) if shared is None else Path(shared) / _run_dir_name(ws)
        self._last_checkpoint = 0.0
        self._delay = _FIRST_POLL_S

    # -- LoopControl (steering) ------------------------------------------------------------------
    def _in_flight(self) -> list[tuple[Candidate, ledger.RunRecord]]:
        return [(ledger.get_candidate(self.store, r.candidate_id), r) for r in ledger.running_runs(self.store)]

    def running_numbers(self) -> list[int]:
        return [cand.number for cand, _ in self._in_flight()]

    def kill(self, number: int, reason: str) -> bool:
        """Mark the run (durably, inside the command's transaction); the next poll cancels it, so a
        kill interrupted by a crash is still carried out after the restart."""
        for cand, run in self._in_flight():
            if cand.number == number:
                return ledger.mark_kill(self.store, run.id, reason)
        return False

    # -- the loop --------------------------------------------------------------------------------
    def run(self, max_experiments: int | None) -> int:
        self._startup()
        self.max_experiments = max_experiments
        busy = True
        while not self.stop.is_set():
            if busy or time.monotonic() - self._last_checkpoint >= self.settings.loop.checkpoint_interval:
                self.checkpoint()
                if self.stop.is_set():
                    break  # runs in flight go on; the next engine re-attaches
            open_ = ledger.open_candidates(self.store)
            in_flight = any(c.phase in ("running", "finished", "recorded") for c in open_)
            if (not in_flight and max_experiments is not None
                    and ledger.experiment_count(self.store) >= max_experiments):
                self.store.set("engine.finished", True)
                _say(f"{max_experiments} experiments recorded; stopping")
                return 0
            if not open_:
                if ledger.paused(self.store) is not None:
                    self.stop.wait(self.settings.loop.checkpoint_interval)
                    continue
                self._new_wave(max_experiments)
                busy = True
                continue
            busy = self._step(open_)
            if not busy:  # only runs in flight: poll fast at first, back off to the checkpoint
                self.stop.wait(self._delay)
                self._delay = min(self._delay * 1.5, self.settings.loop.checkpoint_interval)
        return 0

    def checkpoint(self) -> None:
        """Tick, apply steering commands, notice a dead parent. Cheap; called often."""
        self._last_checkpoint = time.monotonic()
        self.store.set("engine.tick", time.time())
        steering.apply_pending(self.store, self)
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            _say("the parent daemon is gone; stopping (the runs in flight are left to be re-attached)")
            self.stop.set()

    def _startup(self) -> None:
        for lock in clear_stale_git_locks(self.ws.path):  # we hold the engine lock: they are stale
            _say(f"removed a stale git lock left by a killed git process: {lock}")
        branch = self.git.branch()
        if branch != self.ws.branch:
            raise UserError(
                f"{self.ws.path} is on {branch or 'a detached HEAD'}, not the session branch"
                f" {self.ws.branch}; run `git -C {self.ws.path} checkout {self.ws.branch}`"
            )
        open_ = ledger.open_candidates(self.store)
        changed = self.git.changed_files()
        if changed and not open_:
            raise dirty_error(self.ws, changed)
        proposing = [c for c in open_ if c.phase == "proposing"]
        if proposing:
            self.git.reset_to(proposing[0].base_commit)  # our own interrupted edit
        if not open_ or proposing:
            bad = protected_mismatches(self.ws)
            if bad:
                raise UserError(
                    f"protected files changed since `nightlab init`: {', '.join(bad)}; restore them"
                    f" (git -C {self.ws.path} checkout -- {' '.join(bad)}) or init a new workspace"
                )
        with self.store.transaction():
            self.store.set(ledger.AREAS_KEY, None if self.proposer.areas is None else list(self.proposer.areas))
            self.store.set("loop.metric_name", self.metric_name)
            self.store.set(DIRECTION_KEY, self.direction)
            self.store.set(NOISE_PRIOR_KEY, self.settings.loop.noise_prior)
            self.store.set("loop.slots", [s.name for s in self.slots])
            self.store.set("engine.finished", False)
            self.store.set("engine.pid", os.getpid())

    # -- waves -----------------------------------------------------------------------------------
    # A wave is the set of open candidates: up to one per slot, all branching from the best commit
    # (`loop.wave` in kv: base, kind, size, pins). Members are created one by one (each proposal
    # sees the ones before it as in flight) and launched as soon as each is committed; when every
    # member has ended, the wave is decided at once (best of wave) and recorded in number order.
    # Results are compared only within a hardware class, so a wave first measures the best commit
    # (a baseline, pinned there) on every class that has no measurement of it yet: each slot's
    # class known ahead (local), and each place where a result could not be compared (a cluster).
    def _new_wave(self, max_experiments: int | None) -> None:
        head = self.git.head()
        rows = ledger.experiments(self.store)
        size = len(self.slots)
        if max_experiments is not None:
            size = max(1, min(size, max_experiments - len(rows)))
        wave = self._wave_record(rows, head)
        if wave["kind"] == "baseline":
            size = min(size, len(wave["pins"]))
        with self.store.transaction():
            self.store.set(WAVE_KEY, {**wave, "size": size, "pins": wave["pins"][:size]})
            self.store.delete(WANTED_KEY)
            self._add_member()

    def _wave_record(self, rows: list[Experiment], head: str) -> dict[str, Any]:
        """What a wave from `head` must run first: the session's baseline repeats, then a baseline
        on every class (a slot's, or one where a result could not be compared) that has not
        measured `head`."""
        baselines = [e for e in rows if e.kind == "baseline" and e.status == "keep"]
        wanted = [*({"hardware": s.hardware, "node": ""} for s in self.slots if s.hardware),
                  *self.store.get(WANTED_KEY, [])]
        pins: list[dict[str, str]] = []
        kind = "proposal"
        if len(baselines) < self.settings.loop.baseline_runs and all(e.kind == "baseline" for e in rows):
            kind = "baseline"  # the session's first measurements: repeats on the first class
            first = wanted[0] if wanted else _ANYWHERE
            pins = [first] * (self.settings.loop.baseline_runs - len(baselines))
        for want in wanted:
            ref = ledger.reference(rows, self._class(want["hardware"]))
            if all(p["hardware"] != want["hardware"] for p in pins) and (ref is None or ref.commit != head):
                pins.append(want)
        if kind == "proposal":
            pins += [p for p in self._drift_pins(rows, head) if p not in pins]
        return {"base": head, "kind": kind, "size": len(self.slots), "done": len(baselines), "pins": pins}

    def _drift_pins(self, rows: list[Experiment], head: str) -> list[dict[str, str]]:
        """Classes where the best (`head`) is measured again: a new best until it has
        `loop.baseline_runs` runs after its keep (the runs that got it kept were picked for
        luck: fresh ones tell its worth, and every later comparison with it gets surer), then every
        `loop.remeasure_every` experiments (drift: a GPU's speed, a shared machine's load)."""
        loop = self.settings.loop
        pins: list[dict[str, str]] = []
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
            if len(fresh) < (loop.baseline_runs if loop.baseline_runs > 1 else 0) or 0 < loop.remeasure_every <= since:
                pins.append({"hardware": cls.hardware, "node": ""})
        return pins

    def _wave(self, open_: list[Candidate]) -> dict[str, Any]:
        # No wave record: a confirm run (or a single-slot candidate from an older version) alone.
        return self.store.get(WAVE_KEY) or {"base": open_[0].base_commit, "kind": "", "size": len(open_)}

    def _add_member(self) -> Candidate:
        """The wave's next member: its pinned baselines first, then proposals."""
        wave = self.store.get(WAVE_KEY)
        focus = ledger.focus(self.store)
        members = ledger.open_candidates(self.store)
        made = [c.pin or _ANYWHERE for c in members if c.kind == "baseline"]
        # a baseline wave stored by an older nightlab has no pins: its members run anywhere
        pins = wave.get("pins", [_ANYWHERE] * wave["size"] if wave["kind"] == "baseline" else [])
        for pin in pins:
            if pin in made:
                made.remove(pin)
                continue
            if wave["kind"] == "baseline" and pin == pins[0]:
                n = wave["done"] + len(members) + 1
                total = self.settings.loop.baseline_runs
                label = "baseline" if total == 1 else f"baseline {n}/{total}"
            else:
                where = pin["hardware"] or pin["node"]
                ref = ledger.reference(ledger.experiments(self.store), self._class(pin["hardware"]))
                again = ref is not None and ref.commit == wave["base"]
                label = ("re-measure the best" + (f" on {where}" if where else "")) if again else f"baseline on {where}"
            return ledger.new_candidate(self.store, "baseline", wave["base"], commit=wave["base"],
                                        phase="committed", description=label, focus=focus, pin=pin)
        return ledger.new_candidate(self.store, "proposal", wave["base"], focus=focus)

    def _class(self, hardware_name: str) -> HardwareClass:
        return HardwareClass(hardware_name, self.setting)

    def _step(self, open_: list[Candidate]) -> bool:
        """One step of the wave in flight; False when there was nothing to do but wait."""
        if self._poll(open_):
            return True
        wave = self._wave(open_)
        if self.asynchronous and wave["kind"] != "baseline":
            return self._step_async(open_)
        paused = ledger.paused(self.store) is not None
        if not paused:  # a pause stops new launches; the runs in flight finish
            for cand in open_:
                if cand.phase == "committed" and self._free_slot(cand) is not None:
                    self._launch(cand)
                    self._delay = _FIRST_POLL_S
                    return True
                if cand.phase == "proposing":
                    self._propose(cand, open_)
                    return True
            if len(open_) < wave["size"] and self._free_slot() is not None:
                self._add_member()
                return True
        runs = {c.id: ledger.run_for_candidate(self.store, c.id) for c in open_ if c.phase == "running"}
        ended = all(c.phase in ("finished", "recorded")
                    or ((run := runs.get(c.id)) is not None and run.state == "exited") for c in open_)
        if not ended or (len(open_) < wave["size"] and not paused):
            return False
        if any(c.outcome is None or "head_after" not in c.outcome for c in open_):
            self._decide(open_, wave["base"])
            return True
        for cand in open_:
            if cand.phase == "finished":
                self._record(cand)
                return True
        self._export(open_)
        return True

    def _step_async(self, open_: list[Candidate]) -> bool:
        """One step of the asynchronous mode. Order matters for git: a proposal is made at once
        (from the best commit it was created on, before anything can move the best), then each
        ended candidate goes through decide -> record -> export on its own, then launches, and a
        free slot gets a new candidate."""
        for cand in open_:
            if cand.phase == "proposing":
                self._propose(cand, open_)
                return True
        for cand in open_:
            if cand.phase == "finished" and "head_after" not in (cand.outcome or {}):
                self._decide([cand], self.git.head())  # ended before any run
                return True
            if cand.phase == "finished":
                self._record(cand)
                return True
            if cand.phase == "recorded":
                self._export([cand])
                return True
        for cand in open_:
            run = ledger.run_for_candidate(self.store, cand.id) if cand.phase == "running" else None
            if run is not None and run.state == "exited":
                self._decide([cand], self.git.head())
                return True
        if ledger.paused(self.store) is not None:  # a pause stops new launches; the runs in flight finish
            return False
        for cand in open_:
            if cand.phase == "committed" and self._free_slot(cand) is not None:
                self._launch(cand)
                self._delay = _FIRST_POLL_S
                return True
        room = self.max_experiments is None or ledger.experiment_count(self.store) + len(open_) < self.max_experiments
        if room and len(open_) < len(self.slots) and self._free_slot() is not None:
            with self.store.transaction():  # from the best commit as it is now
                self.store.set(WAVE_KEY, self._wave_record(ledger.experiments(self.store), self.git.head()))
                self.store.delete(WANTED_KEY)
                self._add_member()
            return True
        return False

    # -- proposing -> committed -------------------------------------------------------------------
    def _propose(self, cand: Candidate, open_: list[Candidate]) -> None:
        if self.git.changed_files() or self.git.head() != cand.base_commit:
            self.git.reset_to(cand.base_commit)
        notes: list[tuple[int, str]] = []  # delivered only with a proposal that runs (committed below)
        if cand.kind == "rebase":
            proposal = self._remake(cand)
            if proposal is None:
                return None
        else:
            notes = ledger.queued_notes(self.store)
            in_flight = tuple(c.description for c in open_ if c.id != cand.id and c.kind != "baseline" and c.description)
            ctx = dataclasses.replace(self._context(cand, tuple(text for _, text in notes)), in_flight=in_flight)
            try:
                proposal = self.proposer.propose(ctx)
            except ProposalError as exc:
                return self._no_run(cand, "crash", f"proposer failed: {exc}")
            except Exception as exc:  # noqa: BLE001 -- a proposer bug must not stop the night; it counts as a failure
                traceback.print_exc()
                return self._no_run(cand, "crash", f"proposer error: {type(exc).__name__}: {exc}")
        described = {"description": proposal.description, "hypothesis": proposal.hypothesis,
                     "area": proposal.area, "params": dict(proposal.params)}
        if cand.focus and proposal.area and proposal.area != cand.focus and self.store.get(WIDENED_KEY) != cand.focus:
            self.store.set(WIDENED_KEY, cand.focus)  # once per focus, not once per proposal
            self.store.emit("alert", text=f"focus {cand.focus}: nothing left to try there; the search widens to"
                                          f" other areas (#{cand.number}: {proposal.area}). `focus off` or another focus to steer")
        changed = self.git.changed_files()
        outside = [p for p in changed if p not in self.ws.editable]
        if outside:
            self.git.reset_to(cand.base_commit)
            protect(self.ws)
            reason = f"rejected: changed files outside project.editable: {', '.join(outside)} (restored)"
            return self._no_run(cand, "crash", reason, **described)
        if not changed:
            return self._no_run(cand, "discard", "the proposal changed nothing", **described)
        commit = self.git.commit_all(f"#{cand.number}: {proposal.description}\n\n{proposal.hypothesis}")
        self.git.keep_ref(cand.number, commit)
        if not self.in_place:  # the run gets a snapshot; the workspace stays at the wave's base
            self.git.reset_to(cand.base_commit)
        added, removed = self.git.numstat(cand.base_commit, commit)
        with self.store.transaction():
            ledger.update_candidate(self.store, cand.id, phase="committed", commit_sha=commit,
                                    lines_added=added, lines_removed=removed, **described)
            ledger.mark_notes_delivered(self.store, [cid for cid, _ in notes], cand.number)

    def _remake(self, cand: Candidate) -> Proposal | None:
        """A rebase: the change of the experiment it re-runs, applied to the current best."""
        original = next(e for e in ledger.experiments(self.store) if e.number == cand.confirm_of)
        conflicts = self.git.apply_change(original.commit)
        if conflicts:
            self.git.reset_to(cand.base_commit)
            self._no_run(cand, "discard", f"could not re-make #{original.number} on {cand.base_commit[:7]}:"
                                          f" its change conflicts with the best's in {', '.join(conflicts)}")
            return None
        return Proposal(cand.description, cand.hypothesis, cand.area, dict(cand.params))

    def _no_run(self, cand: Candidate, status: str, reason: str, **described: Any) -> None:
        """A candidate that ends before any run: judged here, recorded by the usual steps."""
        outcome: dict[str, Any] = {"status": status, "metric": None, "metrics": {}, "best_after": self._best(), "reason": reason,
                   "confidence": None, "needs_confirm": False, "duration_s": None, "started_at": None,
                   "finished_at": time.time(), "log_tail": "", "slot": ""}
        ledger.update_candidate(self.store, cand.id, phase="finished", commit_sha=cand.base_commit,
                                outcome=outcome, **described)

    def _context(self, cand: Candidate, notes: tuple[str, ...]) -> ProposalContext:
        rows = ledger.experiments(self.store)
        history = tuple(
            PastExperiment(e.number, e.status, e.metric, e.description, e.hypothesis, e.area, e.params)
            for e in rows
        )
        # the best: the experiment that made it (a change, else the first baseline), valued at its
        # estimate now (every measurement of its commit), not at its own single run
        keeps = [e for e in rows if e.status == "keep"]
        made = next((e for e in reversed(keeps) if e.kind != "baseline"), keeps[0] if keeps else None)
        best = None if made is None else dataclasses.replace(
            history[rows.index(made)], metric=next(e.best for e in reversed(keeps) if e.commit == made.commit))
        crashes = [e for e in rows if e.status == "crash" and e.duration_s is not None]
        return ProposalContext(
            workspace=self.ws.path, editable=self.ws.editable, metric_name=self.metric_name,
            direction=self.direction, best=best, history=history,
            focus=cand.focus, notes=notes, consecutive_failures=self._consecutive_failures(rows),
            last_crash_log=self._log_tail(crashes[-1].number, 4000) if crashes else "",
        )

    # -- committed -> running ---------------------------------------------------------------------
    def _log_path(self, number: int) -> Path:
        return self.run_root / "runs" / f"{number}.log"

    def _snapshot_path(self, number: int) -> Path:
        return self.run_root / "worktrees" / str(number)

    def _run_dir(self, cand: Candidate) -> Path:
        return self.ws.path if self.in_place else self._snapshot_path(cand.number)

    def _log_tail(self, number: int, tail_bytes: int) -> str:
        return read_tail(self._log_path(number), tail_bytes)

    def _free_slot(self, cand: Candidate | None = None) -> Slot | None:
        """A slot with no run; for a candidate pinned to a hardware class, one of that class (when
        this machine has one: a pin to a class no slot has any more does not hold the loop)."""
        used = {RunHandle.from_json(r.handle).slot for r in ledger.running_runs(self.store)}
        want = (cand.pin or _ANYWHERE)["hardware"] if cand is not None else ""
        eligible = []
        if want:  # a slot's hardware: probed ahead, or else seen in its last run
            seen = {e.slot: e.hardware for e in ledger.experiments(self.store) if e.hardware}
            eligible = [s for s in self.slots if (s.hardware or seen.get(s.name)) == want]
        return next((s for s in eligible or self.slots if s.name not in used), None)

    def _launch(self, cand: Candidate) -> None:
        assert cand.commit is not None
        log = self._log_path(cand.number)
        # A launch that happened just before we were killed left its handle: adopt that run.
        handle = find_handle(log)
        if handle is None:
            if self.in_place:
                if self.git.head() != cand.commit or self.git.changed_files():
                    self.git.reset_to(cand.commit)
                bad = protected_mismatches(self.ws)
            else:
                bad = protected_mismatches(self.ws, self.git.snapshot(self._run_dir(cand), cand.commit))
            if bad:
                if self.in_place:
                    self.git.reset_to(cand.base_commit)
                    protect(self.ws)
                return self._no_run(cand, "crash", f"rejected: protected files changed: {', '.join(bad)}")
            slot = self._free_slot(cand)
            assert slot is not None  # _step launches only with a free slot
            node = (cand.pin or _ANYWHERE)["node"]
            spec = RunSpec(self.ws.run_command, self._run_dir(cand), log, slot, self.env, node)
            handle = self.executor.launch(spec)
        with self.store.transaction():
            ledger.add_run(self.store, cand.id, handle.to_json(), handle.slot, str(log))
            ledger.update_candidate(self.store, cand.id, phase="running")
            self.store.emit(
                "experiment_started", number=cand.number, kind=cand.kind, description=cand.description,
                hypothesis=cand.hypothesis, area=cand.area, commit=cand.commit[:7], slot=handle.slot,
                focus=cand.focus,
            )

    # -- running -> ended -------------------------------------------------------------------------
    def _poll(self, open_: list[Candidate]) -> bool:
        """One executor poll for every run in flight; True when one of them ended."""
        runs = ledger.running_runs(self.store)
        if not runs:
            return False
        handles = {r.id: RunHandle.from_json(r.handle) for r in runs}
        statuses = self.executor.poll(list(handles.values()))
        ended = False
        for run in runs:
            handle = handles[run.id]
            status = statuses[handle.key]
            where = f"{handle.slot}@{status.where}" if status.where else run.slot
            if where != run.slot:  # a cluster job: record the node it landed on
                ledger.set_run_slot(self.store, run.id, where)
            if status.state in ("pending", "running"):
                if run.kill_reason:  # marked for a kill (a user's, or ours before a crash): carry it out
                    self.executor.cancel(handle, grace_s=_CANCEL_GRACE_S)
                continue
            ledger.finish_run(self.store, run.id, status.exit_code, status.reason)
            ended = True
        return ended

    # -- ended -> finished: the wave's verdicts, all at once ---------------------------------------
    def _decide(self, members: list[Candidate], base: str) -> None:
        """Judge every member against its hardware class's reference (the best commit measured
        there), keep only the best of the wave (the minimum of N noisy runs beats the incumbent by
        luck more often as N grows, so the winner still has to beat the best by more than the
        noise, or pass a confirm run), and fix where git and the best stand after each member is
        recorded. Deterministic from stored state, so a restart mid-way decides the same."""
        rows = ledger.experiments(self.store)
        outcomes: dict[int, dict[str, Any]] = {}
        for cand in members:
            if cand.outcome is not None:  # ended before any run (proposer failure, rejection)
                outcomes[cand.id] = dict(cand.outcome)
                continue
            run = ledger.run_for_candidate(self.store, cand.id)
            assert run is not None
            outcomes[cand.id] = self._judge(cand, run, rows, [outcomes.get(m.id) for m in members])
        contenders = [c for c in members if c.kind != "baseline"
                      and (outcomes[c.id]["status"] == "keep" or outcomes[c.id]["needs_confirm"])]
        # the largest gain over its own class's reference (classes are never compared directly)
        winner = min(contenders, key=lambda c: (-outcomes[c.id]["gain"], c.number), default=None)
        for cand in contenders:
            if cand is not winner:
                assert winner is not None
                outcomes[cand.id].update(
                    status="discard", needs_confirm=False, remeasure_best=False, best_after=outcomes[cand.id]["reference"],
                    reason=f"beaten in its wave by #{winner.number} ({outcomes[winner.id]['metric']:.6f})")
        won = outcomes[winner.id] if winner is not None else None
        for cand in members:
            out = outcomes[cand.id]
            if self.in_place:  # the single-slot rule: git follows this candidate
                moves = out["status"] == "keep" or out["needs_confirm"]
                out["head_after"] = (cand.commit or cand.base_commit) if moves else cand.base_commit
                continue
            kept = won is not None and won["status"] == "keep" and winner.number <= cand.number  # type: ignore[union-attr]
            out["head_after"] = winner.commit if kept else base  # type: ignore[union-attr]
            if kept and cand is not winner and out.get("hardware") == won["hardware"]:  # type: ignore[index]
                out["best_after"] = won["best_after"]  # type: ignore[index]
        with self.store.transaction():
            for cand in members:
                ledger.update_candidate(self.store, cand.id, phase="finished", outcome=outcomes[cand.id])
            wave = self.store.get(WAVE_KEY)
            if wave is not None:  # decided: closed to new members (a /resume during recording)
                self.store.set(WAVE_KEY, {**wave, "size": len(members)})

    def _judge(self, cand: Candidate, run: ledger.RunRecord, rows: list[Experiment],
               judged: list[dict[str, Any] | None]) -> dict[str, Any]:
        """One run's verdict. `judged`: the outcomes of this wave's members so far (a commit's
        measurements include its repeats judged before it in the same wave)."""
        handle = RunHandle.from_json(run.handle)
        tail = self.executor.read_log(handle, _LOG_TAIL_BYTES)
        hw = run_hardware(run.log_path) or next((s.hardware for s in self.slots if s.name == handle.slot), "")
        cls = self._class(hw)
        ref = ledger.reference(rows, cls)
        measured = self._measurements(rows, judged, cls, hw)
        incumbent = measured(cand.base_commit) if ref is not None and ref.commit == cand.base_commit else []
        stale = not incumbent and self.asynchronous and cand.kind in ("proposal", "rebase", "confirm")
        if stale:  # the best moved on while it ran: judged against its own base as measured here
            incumbent = measured(cand.base_commit)
            stale = bool(incumbent)
        best = statistics.fmean(incumbent) if incumbent else None
        groups = self._repeat_groups(rows, judged, cls, hw)
        scale = abs(best if best is not None else ref.best if ref is not None and ref.best else 1.0) or 1.0
        loop = self.settings.loop
        rule = Rule(z=loop.keep_z, max_runs=loop.max_runs, prior_sd=loop.noise_prior * scale)
        verdict = judge(
            Measurement(run.exit_code, run.kill_reason, parse_summary(tail), tail),
            kind=cand.kind, metric_name=self.metric_name, direction=self.direction,
            earlier=measured(cand.commit or cand.base_commit), incumbent=incumbent or None,
            noise=pooled_noise(groups, rule.prior_sd), rule=rule,
        )
        if cand.kind == "baseline" and self.asynchronous and ref is not None and cand.commit != self.git.head():
            # the best moved on while this re-measurement of an older best ran: a measurement
            # (for the noise), not the class's reference
            verdict = dataclasses.replace(verdict, status="discard", best_after=ref.best,
                                          reason=f"re-measured {cand.base_commit[:7]}, no longer the best")
        if verdict.reason.startswith(NOT_COMPARED_PREFIX):
            has = f"{ref.commit[:7]}" if ref is not None else "nothing yet"
            verdict = dataclasses.replace(verdict, reason=(
                f"{NOT_COMPARED_PREFIX} {hw or 'this hardware'} has no measurement of {cand.base_commit[:7]}"
                f" (it has {has}); measuring the best commit there first"))
        rebase = stale and (verdict.status == "keep" or verdict.needs_confirm)
        if stale:  # whatever it was, the class's best is the newer one
            assert ref is not None
            verdict = dataclasses.replace(verdict, best_after=ref.best)
        if rebase:
            assert ref is not None and verdict.metric is not None and best is not None
            verdict = dataclasses.replace(verdict, status="discard", needs_confirm=False, remeasure_best=False, reason=(
                f"{REBASE_PREFIX} better than its base {cand.base_commit[:7]} by"
                f" {gain(verdict.metric, best, self.direction):.6f}, but the best moved on to {ref.commit[:7]}"
                f" while it ran: re-made there and re-run"))
        if (verdict.status == "keep" or verdict.needs_confirm) and self.settings.project.checks_command:
            verdict = self._checks(verdict, self._run_dir(cand), best)
        started = started_at(run.log_path) or run.started_at
        finished_at = _mtime(f"{run.log_path}.exit") or run.finished_at or time.time()
        where = run.slot.split("@", 1)[1] if "@" in run.slot else ""
        return {
            "status": verdict.status, "metric": verdict.metric, "metrics": verdict.metrics,
            "best_after": verdict.best_after, "reason": verdict.reason, "confidence": verdict.confidence,
            "needs_confirm": verdict.needs_confirm, "remeasure_best": verdict.remeasure_best,
            "se": None if verdict.comparison is None else verdict.comparison.se,
            "n": None if verdict.comparison is None else verdict.comparison.n_candidate,
            "n_best": None if verdict.comparison is None else verdict.comparison.n_incumbent,
            "duration_s": max(0.0, finished_at - started),
            "started_at": started, "finished_at": finished_at, "slot": run.slot,
            "log_tail": "\n".join(tail.splitlines()[-_EVENT_LOG_TAIL_LINES:]) if verdict.status == "crash" else "",
            "hardware": hw, "node": where, "kind": cand.kind, "commit": cand.commit, "reference": best,
            "gain": verdict.comparison.gain if verdict.comparison is not None else
            None if best is None or verdict.metric is None else gain(verdict.metric, best, self.direction),
            "compared": not verdict.reason.startswith(NOT_COMPARED_PREFIX), "rebase": rebase,
        }

    def _checks(self, verdict: Verdict, cwd: Path, best: float | None) -> Verdict:
        try:
            done = subprocess.run(
                self.settings.project.checks_command, shell=True, check=False, cwd=cwd, capture_output=True,
                text=True, env={**os.environ, **self.env}, timeout=self.settings.heartbeat.run_timeout,
            )
            code, output = done.returncode, (done.stdout + done.stderr).strip()
        except subprocess.TimeoutExpired:
            code, output = -1, "timed out"
        if code == 0:
            return verdict
        last = output.splitlines()[-1] if output else ""
        return dataclasses.replace(
            verdict, status="checks_failed", needs_confirm=False, remeasure_best=False, best_after=best,
            reason=f"checks failed (exit {code}): {last[:200]}",
        )

    # -- finished -> recorded -> done -------------------------------------------------------------
    def _record(self, cand: Candidate) -> None:
        out = cand.outcome or {}
        commit = cand.commit or cand.base_commit
        target = out.get("head_after") or (
            commit if out["status"] == "keep" or out["needs_confirm"] else cand.base_commit)
        if self.git.head() != target or self.git.changed_files():
            self.git.reset_to(target)
        rows = ledger.experiments(self.store)
        hw = out.get("hardware", "")
        if hw:  # the best of its class before it
            ref = ledger.reference(rows, self._class(hw))
            previous = None if ref is None else ref.best
        else:  # no run (a proposer failure, a rejection): the last best recorded
            previous = self._best(rows)
        reason = out["reason"] + self._second_opinion(cand, out, rows)
        exp = Experiment(
            number=cand.number, kind=cand.kind, confirm_of=cand.confirm_of, commit=commit,
            status=out["status"], metric=out["metric"], metrics=out["metrics"], best=out["best_after"],
            confidence=out["confidence"], description=cand.description, hypothesis=cand.hypothesis,
            area=cand.area, params=cand.params, focus=cand.focus, reason=reason,
            lines_added=cand.lines_added, lines_removed=cand.lines_removed, duration_s=out["duration_s"],
            slot=out["slot"], started_at=out["started_at"], finished_at=out["finished_at"],
            hardware=hw, setting=self.setting if hw else "",
        )
        # a class's later baselines re-measure the best commit: a new reference, not a new best
        new_best = out["status"] == "keep" and previous != exp.best and (exp.kind != "baseline" or previous is None)
        event = {
            "number": exp.number, "status": exp.status, "metric_name": self.metric_name,
            "metric": exp.metric, "best": exp.best, "previous_best": previous,
            # this result against the best before it: what a reader wants to see for any status
            "delta": None if exp.metric is None or previous is None else exp.metric - previous,
            "new_best": new_best, "description": exp.description, "hypothesis": exp.hypothesis,
            "area": exp.area, "duration_s": exp.duration_s, "peak_vram_mb": exp.metrics.get("peak_vram_mb"),
            "mfu_percent": exp.metrics.get("mfu_percent"), "confidence": exp.confidence, "focus": exp.focus,
            "commit": commit[:7], "lines_added": exp.lines_added, "lines_removed": exp.lines_removed,
            "reason": exp.reason, "log_tail": out["log_tail"], "slot": exp.slot, "kind": exp.kind,
            "hardware": exp.hardware, "profile": self.ws.profile, "harness": hardware.harness_values(self.env),
            # the decision's figures: the gain (positive = better) ± its standard error, n vs n
            "gain": out.get("gain") if out.get("se") is not None else None, "se": out.get("se"),
            "n": out.get("n"), "n_best": out.get("n_best"),
        }
        with self.store.transaction():
            if not ledger.record_experiment(self.store, cand.id, exp, event):
                ledger.update_candidate(self.store, cand.id, phase="recorded")
                return
            self._maybe_self_pause([*rows, exp])
        _say(f"#{exp.number} {exp.status} {exp.metric if exp.metric is not None else ''} {exp.reason}")

    def _second_opinion(self, cand: Candidate, out: dict[str, Any], rows: list[Experiment]) -> str:
        """The harness's hook for keeps (built-in trainer): keep the run's model, and score a kept
        change and the commit it replaced on a held-out slice (a fresh one per keep); a text for
        the reason, flagging a keep whose gain vanishes there as SUSPECT. Deterministic from
        stored state (scores are cached by commit), so a restart writes the same reason."""
        if out["status"] != "keep" or not self.ws.builtin_trainer or cand.commit is None:
            return ""
        keep_artifact(self.ws, self._run_dir(cand), cand.commit)
        if cand.kind == "baseline":
            return ""
        earlier = sum(1 for e in rows if e.status == "keep" and e.kind != "baseline")
        opinion = second_opinion(self.ws, self.env, cand.commit, cand.base_commit, earlier, self.direction)
        return "" if opinion is None else f"; {opinion.text()}"

    def _maybe_self_pause(self, rows: list[Experiment]) -> None:
        """Only failures (crashes, timeouts, rejected proposals, failed checks) pause the loop: a
        run of discards is the search's business (it widens), said once in chat, never a stop."""
        failures = self._failures_in_a_row(rows)
        limit = self.settings.loop.pause_after_failures
        if failures >= limit and ledger.paused(self.store) is None:
            reason = f"{failures} failed experiments in a row; resume when you have looked (focus, note)"
            ledger.set_paused(self.store, "nightlab", reason, None)
            self.store.emit("self_paused", reason=reason)
        misses = self._consecutive_failures(rows)
        streak = next((e.number for e in reversed(rows) if e.status == "keep" and e.kind != "baseline"), 0)
        if misses >= limit and self.store.get(DISCARDS_SAID_KEY) != streak:
            self.store.set(DISCARDS_SAID_KEY, streak)  # said once per streak (it starts at a keep)
            self.store.emit("alert", text=(
                f"{misses} experiments in a row without a keep: the search widens its moves and changes area;"
                " the loop goes on (only failures pause it)"))

    def _export(self, members: list[Candidate]) -> None:
        ledger.write_exports(self.ws.path, self.store, self.metric_name, self.direction, self.ws.branch)
        recorded = [c for c in members if c.phase == "recorded"]
        done = {c.id for c in recorded}
        others = [c for c in ledger.open_candidates(self.store) if c.id not in done]  # async: still running
        # The wave ends in one transaction; a confirm run it asked for is created here, not while
        # recording, so it never joins the wave being recorded: it is the next wave, alone.
        with self.store.transaction():
            wanted = self.store.get(WANTED_KEY, [])
            for cand in recorded:
                ledger.update_candidate(self.store, cand.id, phase="done")
                out = cand.outcome or {}
                where = {"hardware": out.get("hardware", ""), "node": out.get("node", "")}
                if out.get("needs_confirm"):  # on the same hardware class, and node when a cluster's
                    assert cand.commit is not None
                    # every re-run names the first run of its commit
                    first, what = (cand.confirm_of, cand.description.split(": ", 1)[-1]) if cand.kind == "confirm" \
                        else (cand.number, cand.description)
                    if out.get("remeasure_best"):  # numbered first: its result counts for the re-run
                        ledger.new_candidate(
                            self.store, "baseline", cand.base_commit, commit=cand.base_commit, phase="committed",
                            description=f"re-measure the best for #{first}", focus=cand.focus, pin=where,
                        )
                    ledger.new_candidate(
                        self.store, "confirm", cand.base_commit, commit=cand.commit, phase="committed",
                        confirm_of=first, description=f"confirm #{first}: {what}",
                        hypothesis=cand.hypothesis, area=cand.area, params=cand.params, focus=cand.focus,
                        pin=where,
                    )
                if out.get("rebase"):  # from the best as it is now, before it can be kept
                    ledger.new_candidate(
                        self.store, "rebase", self.git.head(), confirm_of=cand.number,
                        description=f"rebase of #{cand.number}: {cand.description}", hypothesis=cand.hypothesis,
                        area=cand.area, params=cand.params, focus=cand.focus,
                    )
                if out.get("compared") is False and where not in wanted:
                    wanted.append(where)
            if wanted:
                self.store.set(WANTED_KEY, wanted)
            if not others:
                self.store.delete(WAVE_KEY)
        if not self.in_place:
            for cand in recorded:
                self.git.drop_snapshot(self._snapshot_path(cand.number))

    # -- ledger-derived figures -------------------------------------------------------------------
    def _best(self, rows: list[Experiment] | None = None) -> float | None:
        rows = ledger.experiments(self.store, last=1) if rows is None else rows
        return rows[-1].best if rows else None

    def _failures_in_a_row(self, rows: list[Experiment]) -> int:
        """Experiments that failed (crash, checks_failed) in a row, since the last resume."""
        since = self.store.get(ledger.FAILURES_SINCE_KEY, 0)
        count = 0
        for e in reversed(rows):
            if e.number <= since or e.status not in ("crash", "checks_failed"):
                break
            count += 1
        return count

    def _consecutive_failures(self, rows: list[Experiment]) -> int:
        """Experiments without a keep since the last keep (or the last resume): what the search
        counts to change its strategy. A result re-run to decide is not one, nor one that had
        nothing to be compared with."""
        since = self.store.get(ledger.FAILURES_SINCE_KEY, 0)
        # a candidate's runs (its first, its re-runs) count once: by the run that decided it
        deciding = {e.commit: e.number for e in rows if e.kind == "confirm"}
        count = 0
        for e in reversed(rows):
            if (e.status == "keep" and e.kind != "baseline") or e.number <= since:
                break
            if (deciding.get(e.commit, e.number) == e.number and e.status != "keep" and e.kind != "baseline"
                    and not e.reason.startswith((NOT_COMPARED_PREFIX, REBASE_PREFIX))):
                count += 1
        return count

    def _measurements(self, rows: list[Experiment], judged: list[dict[str, Any] | None], cls: HardwareClass,
                      hw: str) -> Callable[[str], list[float]]:
        """commit -> its measurements on `cls`: recorded, then judged earlier in this wave."""
        def of(commit: str) -> list[float]:
            values = [e.metric for e in rows if e.commit == commit and e.hardware_class == cls and e.metric is not None]
            return values + [o["metric"] for o in judged if o is not None and o.get("commit") == commit
                             and o.get("hardware") == hw and o["metric"] is not None]
        return of

    def _repeat_groups(self, rows: list[Experiment], judged: list[dict[str, Any] | None], cls: HardwareClass,
                       hw: str) -> list[list[float]]:
        """Results of the same commit run more than once on this hardware class and setting
        (baseline repeats, re-runs, re-measurements of the best); the noise is pooled over them."""
        measured = self._measurements(rows, judged, cls, hw)
        commits = {e.commit for e in rows if e.hardware_class == cls and e.metric is not None}
        commits |= {o["commit"] for o in judged if o is not None and o.get("hardware") == hw and o.get("commit")}
        return [measured(c) for c in sorted(commits)]


def _run_dir_name(ws: Workspace) -> str:
    """This workspace's folder on a shared filesystem: readable, and unique per workspace path."""
    digest = hashlib.sha1(str(ws.path).encode()).hexdigest()[:8]
    return f"{ws.path.name}-{ws.branch.replace('/', '-')}-{digest}"


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _proposer_tick(store: Store, stop: threading.Event) -> None:
    """Called about once a second while a slow proposer works (an agent, for minutes): liveness
    for the heartbeat and a way out on stop. Steering commands wait until the proposal is in,
    because the proposer owns the working tree until then."""
    store.set("engine.tick", time.time())
    if stop.is_set():
        raise ProposalError("the engine is stopping")


def run_engine(
    settings: Settings,
    max_experiments: int | None = None,
    stop: threading.Event | None = None,
    *,
    proposer: Proposer | None = None,
    executor: Executor | None = None,
    parent_pid: int | None = None,
) -> int:
    """Run the loop in this process until `stop` is set or `max_experiments` are recorded."""
    ws = open_workspace(settings.workspace_path, settings)
    lock = EngineLock(ws.path)
    lock.acquire()
    try:
        stop = stop or threading.Event()
        if proposer is None:
            from nightlab.loop.proposers import make_proposer

            proposer = make_proposer(settings, tick=lambda: _proposer_tick(ws.store, stop))
        engine = Engine(
            settings, ws, executor or make_executor(settings), proposer,
            # Quiet: the daemon prepared the data and said so just before starting this process.
            run_environment(ws, settings, lambda _: None), stop, parent_pid,
        )
        return engine.run(max_experiments)
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nightlab.loop.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workspace", help="overrides [workspace] path")
    parser.add_argument("--max-experiments", type=int, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        settings = load_settings(args.config)
        if args.workspace:
            settings = dataclasses.replace(
                settings, workspace=dataclasses.replace(settings.workspace, path=str(args.workspace))
            )
        return run_engine(settings, args.max_experiments, stop, parent_pid=os.getppid())
    except UserError as exc:
        print(f"nightlab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
