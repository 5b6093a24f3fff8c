"""Deciding: ended -> finished. Each run is judged (loop/judge.py: did it fail, and why; the keep
rule itself is loop/decision.py's) against the best commit as measured on its own hardware class;
then the wave keeps at most one winner, and each member's outcome fixes where git and the best
stand once it is recorded. The hooks around a keep live here too: the project's checks command
before it, the overtime check (loop/overtime.py: SUSPECT when it trained past the budget), the
held-out second opinion (built-in trainer) when it is recorded.

Deterministic from stored state, so a restart mid-way decides the same.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nightlab.loop import hardware
from nightlab.loop.decision import Rule
from nightlab.loop.engine import planning
from nightlab.loop.engine.context import Context
from nightlab.loop.engine.outcome import Outcome
from nightlab.loop.engine.upgrading import notice_data_change
from nightlab.loop.executors import RunHandle
from nightlab.loop.executors.sandbox import command_line
from nightlab.loop.judge import NOT_COMPARED_PREFIX, REBASE_PREFIX, Measurement, Verdict, judge
from nightlab.loop.overtime import TRAINING_WALL, Overtime, overtime
from nightlab.loop.runenv import data_dir, sandbox_paths
from nightlab.loop.second_opinion import KeptUnscored, NoOpinion, SecondOpinion, keep_artifact, second_opinion
from nightlab.loop.state import ledger
from nightlab.loop.state.ledger import Candidate, Experiment, HardwareClass, ended_at, started_at
from nightlab.loop.state.stats import OVERTIME, gain, pooled_noise
from nightlab.loop.summary import parse_summary

LOG_TAIL_BYTES = 256 * 1024  # the summary block is at the end of the log
EVENT_LOG_TAIL_LINES = 30
Judged = Sequence[Outcome | None]  # the outcomes of a wave's members judged so far


def decide(ctx: Context, members: list[Candidate], base: str) -> None:
    """Judge every member against its hardware class's reference (the best commit measured
    there), keep only the best of the wave (the minimum of N noisy runs beats the incumbent by
    luck more often as N grows, so the winner still has to beat the best by more than the
    noise, or pass a confirm run), and fix where git and the best stand after each member is
    recorded."""
    notice_data_change(ctx)  # what the runs ended on: one the data changed under is compared with neither best
    rows = ledger.experiments(ctx.store)
    outcomes: dict[int, Outcome] = {}
    for cand in members:
        if cand.outcome is not None:  # ended before any run (proposer failure, rejection)
            outcomes[cand.id] = Outcome.from_json(cand.outcome)
            continue
        run = ledger.run_for_candidate(ctx.store, cand.id)
        assert run is not None
        outcomes[cand.id] = judge_run(ctx, cand, run, rows, [outcomes.get(m.id) for m in members])
    contenders = [c for c in members if c.kind != "baseline" and outcomes[c.id].moves_head]
    # the largest gain over its own class's reference (classes are never compared directly)
    winner = min(contenders, key=lambda c: (-_gain(outcomes[c.id]), c.number), default=None)
    won = None if winner is None else outcomes[winner.id]
    for cand in contenders:
        if cand is not winner:
            assert winner is not None and won is not None and won.metric is not None
            outcomes[cand.id] = dataclasses.replace(
                outcomes[cand.id], status="discard", needs_confirm=False, remeasure_best=False,
                best_after=outcomes[cand.id].reference,
                reason=f"beaten in its wave by #{winner.number} ({won.metric:.6f})")
    for cand in members:
        out = outcomes[cand.id]
        if ctx.in_place:  # the single-slot rule: git follows this candidate
            head = (cand.commit or cand.base_commit) if out.moves_head else cand.base_commit
            outcomes[cand.id] = dataclasses.replace(out, head_after=head)
            continue
        kept = winner is not None and won is not None and won.status == "keep" and winner.number <= cand.number
        if not kept:
            outcomes[cand.id] = dataclasses.replace(out, head_after=base)
            continue
        assert winner is not None and won is not None and winner.commit is not None
        best_after = won.best_after if cand is not winner and out.hardware == won.hardware else out.best_after
        outcomes[cand.id] = dataclasses.replace(out, head_after=winner.commit, best_after=best_after)
    with ctx.store.transaction():
        for cand in members:
            ledger.update_candidate(ctx.store, cand.id, phase="finished", outcome=outcomes[cand.id].to_json())
        planning.close(ctx, len(members))


def _gain(out: Outcome) -> float:
    assert out.gain is not None  # a contender was compared with its incumbent
    return out.gain


def judge_run(ctx: Context, cand: Candidate, run: ledger.RunRecord, rows: list[Experiment],
              judged: Judged) -> Outcome:
    """One run's outcome. `judged`: the outcomes of this wave's members so far (a commit's
    measurements include its repeats judged before it in the same wave)."""
    handle = RunHandle.from_json(run.handle)
    tail = ctx.redact(ctx.executor.read_log(handle, LOG_TAIL_BYTES))  # its lines become reasons and a digest's tail
    cls = ctx.run_class(run)
    hw, started_on = cls.hardware, cls.setting
    ref = ledger.reference(rows, cls)
    measured = _measurements(rows, judged, cls, hw)
    incumbent = measured(cand.base_commit) if ref is not None and ref.commit == cand.base_commit else []
    head = ctx.git.head() if ctx.asynchronous else cand.base_commit  # the best commit now
    # the best moved on while it ran (a keep on another class moves it before this class measures it)
    stale = ctx.asynchronous and cand.kind in ("proposal", "rebase", "confirm") and (
        not incumbent or cand.base_commit != head)
    if stale:  # judged against its own base as measured here
        incumbent = measured(cand.base_commit)
        stale = bool(incumbent)
    best = statistics.fmean(incumbent) if incumbent else None
    groups = _repeat_groups(rows, judged, cls, hw)
    summary = parse_summary(tail)
    # the prior is a share of the metric: of the best, else (the night's first run) of this run's own
    own = summary.metrics.get(ctx.metric_name)
    # (a best of 0 is the scale's end, not a gap: a run's own 1e-11 beside it made float jitter a keep)
    scale = next((abs(v) for v in (best, ref.best if ref is not None else None, own)
                  if v is not None and math.isfinite(v)), 1.0) or 1.0
    loop = ctx.settings.loop
    rule = Rule(z=loop.keep_z, max_runs=loop.max_runs, prior_sd=loop.noise_prior * scale)
    verdict = judge(
        Measurement(run.exit_code, run.kill_reason, summary, tail, in_workspace=ctx.in_place),
        kind=cand.kind, metric_name=ctx.metric_name, direction=ctx.direction,
        earlier=measured(cand.commit or cand.base_commit), incumbent=incumbent or None,
        noise=pooled_noise(groups, rule.prior_sd), rule=rule,
        # the starting commit has baseline rows only; a commit with a change's row is a kept change
        best_again=cand.kind == "baseline" and any(e.commit == cand.commit and e.kind != "baseline" for e in rows),
    )
    if cand.kind == "baseline" and ctx.asynchronous and ref is not None and cand.commit != head:
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
            f" {gain(verdict.metric, best, ctx.direction):.6f}, but the best moved on to {head[:7]}"
            f" while it ran: re-made there and re-run"))
    # the data it is scored on changed while it ran (async has no moment between runs to notice it):
    # its number measured neither data, so it is compared with neither best; a crash is judged by its log.
    # (A setting that moved only in the config's values, at a restart, is the one it ran under throughout.)
    moved = (hardware.setting_changes(ctx.store, started_on, ctx.setting, config=False)
             if started_on != ctx.setting else [])
    across = bool(moved) and verdict.metric is not None
    if across:
        verdict, best, rebase = _across(cand, verdict, moved), None, False
    other = ledger.not_the_change(verdict.reason)
    if cand.kind != "baseline" and other is not None and _failed_before(rows, cand, other):
        said = verdict.reason[len(other.prefix):].strip()
        verdict = dataclasses.replace(verdict, reason=f"{other.again} {said}; {other.blame}")
    if (verdict.status == "keep" or verdict.needs_confirm) and ctx.settings.project.checks_command:
        verdict = checks(ctx, verdict, ctx.run_dir(cand), best)
    if verdict.status == "keep" and cand.kind != "baseline" and TRAINING_WALL in summary.metrics:
        walls = _measurements(rows, judged, cls, hw, TRAINING_WALL)
        verdict = _timed(verdict, overtime([*walls(cand.commit or cand.base_commit), summary.metrics[TRAINING_WALL]],
                                           walls(cand.base_commit)))
    started = started_at(run.log_path) or run.started_at
    finished_at = ended_at(run.log_path) or run.finished_at or time.time()
    c = verdict.comparison
    return Outcome(
        status=verdict.status, metric=verdict.metric, best_after=verdict.best_after, reason=verdict.reason,
        metrics=verdict.metrics, confidence=verdict.confidence, needs_confirm=verdict.needs_confirm,
        remeasure_best=verdict.remeasure_best,
        gain=c.gain if c is not None else
        None if best is None or verdict.metric is None else gain(verdict.metric, best, ctx.direction),
        se=None if c is None else c.se, n=None if c is None else c.n_candidate,
        n_best=None if c is None else c.n_incumbent, reference=best,
        duration_s=max(0.0, finished_at - started), started_at=started, finished_at=finished_at,
        slot=run.slot, node=run.slot.split("@", 1)[1] if "@" in run.slot else "", hardware=hw,
        commit=cand.commit, setting=started_on,
        log_tail="\n".join(tail.splitlines()[-EVENT_LOG_TAIL_LINES:]) if verdict.status == "crash" else "",
        compared=not verdict.reason.startswith(NOT_COMPARED_PREFIX), rebase=rebase,
        # a baseline needs no re-run of its own: planning measures the best again where runs are missing
        retry=cand.kind != "baseline" and (across or ledger.measured_nothing(verdict.reason)),
    )


def _across(cand: Candidate, verdict: Verdict, moved: list[str]) -> Verdict:
    """The verdict on a run whose data changed under it (`moved`: what changed, in words): no
    metric, not compared, no best after it (as one with nothing to be compared with: a change judged
    a keep said its own number as the best, in chat); a change runs again on the new data, after
    the best is measured there (`remeasure_best`)."""
    what = " and ".join(moved)
    then = "its change runs again on the new data" if cand.kind != "baseline" else "the best is measured on the new data"
    return dataclasses.replace(
        verdict, status="discard", metric=None, best_after=None, needs_confirm=False,
        remeasure_best=cand.kind != "baseline", comparison=None, confidence=None, reason=(
            f"{NOT_COMPARED_PREFIX} {what} while it ran: it started on the old data and ended on the new, so its"
            f" {verdict.metric:.6f} is compared with neither best; {then}"))


def _timed(verdict: Verdict, found: Overtime | None) -> Verdict:
    """A keep that trained past the budget (loop/overtime.py): SUSPECT, in its reason and its metrics."""
    if found is None:
        return verdict
    return dataclasses.replace(verdict, reason=f"{verdict.reason}; {found.text()}",
                               metrics={**verdict.metrics, OVERTIME: round(found.seconds, 1)})


def _failed_before(rows: list[Experiment], cand: Candidate, other: ledger.NotTheChange) -> bool:
    """A re-run of a change (confirm, rebase) one of whose runs `other` (bad data, the harness
    changed) failed already."""
    first = cand.confirm_of
    return first is not None and any(
        ledger.not_the_change(e.reason) == other for e in rows if first in (e.number, e.confirm_of))


def checks(ctx: Context, verdict: Verdict, cwd: Path, best: float | None) -> Verdict:
    """The project's checks command on a result that would move the best; a failure turns it
    into `checks_failed`. In the run's sandbox: checks run the change's code (tests that import train.py)."""
    try:
        done = subprocess.run(
            command_line(ctx.settings.project.checks_command, *sandbox_paths(ctx.ws.path, cwd, data_dir(ctx.env))),
            shell=True, check=False, cwd=cwd, capture_output=True, text=True, env={**os.environ, **ctx.env},
            timeout=ctx.settings.heartbeat.run_timeout,
        )
        code, output = done.returncode, ctx.redact(done.stdout + done.stderr).strip()
    except subprocess.TimeoutExpired:
        code, output = -1, "timed out"
    if code == 0:
        return verdict
    last = output.splitlines()[-1] if output else ""
    return dataclasses.replace(
        verdict, status="checks_failed", needs_confirm=False, remeasure_best=False, best_after=best,
        reason=f"checks failed (exit {code}): {last[:200]}" if last else f"checks failed (exit {code}, no output)",
    )


def held_out_opinion(ctx: Context, cand: Candidate, out: Outcome,
                     rows: list[Experiment]) -> SecondOpinion | NoOpinion | KeptUnscored | None:
    """The harness's hook for keeps (built-in trainer): keep the run's model, and score a kept
    change and the commit it replaced on a held-out slice (a fresh one per keep); its gain there
    goes into the keep's metrics and its text into the reason (SUSPECT when the gain vanishes).
    Deterministic from stored state (scores are cached by commit), so a restart records the same."""
    if out.status != "keep" or not ctx.ws.builtin_trainer or cand.commit is None:
        return None
    keep_artifact(ctx.ws, ctx.run_dir(cand), cand.commit)
    if cand.kind == "baseline":
        return None
    earlier = sum(1 for e in rows if e.status == "keep" and e.kind != "baseline")
    return second_opinion(ctx.ws, _scorer_env(ctx, cand), cand.commit, cand.base_commit, earlier, ctx.direction,
                          timeout_s=ctx.settings.heartbeat.run_timeout,
                          tick=lambda: ctx.store.set("engine.tick", time.time()))


def _scorer_env(ctx: Context, cand: Candidate) -> dict[str, str]:
    """The held-out scorer's environment: on this machine, the GPU of the run just recorded (free until
    the next launch), as the executor pins a run. It saw every GPU and took the first, another slot's
    while that one trained: slowing its run, or out of its memory, which made an honest keep SUSPECT."""
    run = ledger.run_for_candidate(ctx.store, cand.id)
    slot = next((s for s in ctx.slots if run is not None and s.name == run.slot), None)
    # On Slurm a run's GPU is its job's (--gres, Slurm's CUDA_VISIBLE_DEVICES on the node); the scorer
    # runs here, on the engine's host, where no slot names a GPU: nothing of this host's to pin it to
    if slot is None or ctx.executor.backend != "local":
        return ctx.env
    return {**ctx.env, "CUDA_VISIBLE_DEVICES": "" if slot.gpu is None else str(slot.gpu)}


def _measurements(rows: list[Experiment], judged: Judged, cls: HardwareClass, hw: str,
                  figure: str | None = None) -> Callable[[str], list[float]]:
    """commit -> its measurements on `cls` (or another figure of those runs, where they gave it):
    recorded, then judged earlier in this wave."""
    def of(commit: str) -> list[float]:
        return ledger.results(rows, commit, cls, figure) + [
            o.metric if figure is None else o.metrics[figure] for o in judged if o is not None and o.commit == commit
            and o.hardware == hw and o.metric is not None and (figure is None or figure in o.metrics)]
    return of


def _repeat_groups(rows: list[Experiment], judged: Judged, cls: HardwareClass, hw: str) -> list[list[float]]:
    """Results of the same commit run more than once on this hardware class and setting
    (baseline repeats, re-runs, re-measurements of the best); the noise is pooled over them."""
    measured = _measurements(rows, judged, cls, hw)
    commits = {e.commit for e in rows if e.hardware_class == cls and e.metric is not None}
    commits |= {o.commit for o in judged if o is not None and o.hardware == hw and o.commit}
    return [measured(c) for c in sorted(commits)]
