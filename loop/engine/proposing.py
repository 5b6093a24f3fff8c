"""Proposing: proposing -> committed. The proposer edits the working tree from the candidate's
base (or a rebase re-makes an older change on the best); the engine, never the proposer, checks
that only editable files changed and commits. A candidate that ends here (the proposer failed,
a rejected or empty change) gets its outcome at once and is recorded by the usual steps."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nightlab.loop.engine.context import Context, say
from nightlab.loop.engine.outcome import Outcome
from nightlab.loop.engine.polling import CANCEL_GRACE_S
from nightlab.loop.engine.streaks import without_a_keep
from nightlab.loop.executors import RunHandle
from nightlab.loop.proposers.base import PastExperiment, Proposal, ProposalContext, ProposalError, ProposalStopped
from nightlab.loop.runenv import data_dir
from nightlab.loop.state import ledger, views
from nightlab.loop.state.errors import USER_ERROR_KEY, UserError
from nightlab.loop.state.ledger import Candidate
from nightlab.loop.workspace import protect

WIDENED_KEY = "loop.focus_widened"  # kv: the focus already said to be exhausted (said once)


def propose(ctx: Context, cand: Candidate, open_: list[Candidate]) -> None:
    git, store = ctx.git, ctx.store
    ctx.reset_tree(cand.base_commit, cand.number)
    notes: list[tuple[int, str]] = []  # delivered only with a proposal that runs (committed below)
    if cand.kind == "rebase":
        remade = remake(ctx, cand)
        if remade is None:
            return None
        proposal = remade
    else:
        notes = ledger.queued_notes(store)
        in_flight = tuple(c.description for c in open_ if c.id != cand.id and c.kind != "baseline" and c.description)
        pctx = dataclasses.replace(proposal_context(ctx, cand, tuple(text for _, text in notes)), in_flight=in_flight)
        ledger_file = store.file_id()
        try:
            proposal = ctx.proposer.propose(pctx)
        except ProposalStopped:  # a stop (SIGTERM) while the agent worked: its edit undone, proposed again
            git.reset_to(cand.base_commit)
            return None
        except ProposalError as exc:
            git.reset_to(cand.base_commit)  # what a failed proposer left is its own, not a person's
            rest_proposer(ctx)
            return no_run(ctx, cand, "crash", ctx.redact(f"proposer failed: {exc}"))
        except Exception as exc:  # noqa: BLE001 -- a proposer bug must not stop the night; it counts as a failure
            say(ctx.redact(traceback.format_exc().rstrip()))  # its message may quote what the agent said
            git.reset_to(cand.base_commit)
            rest_proposer(ctx)
            return no_run(ctx, cand, "crash", ctx.redact(f"proposer error: {type(exc).__name__}: {exc}"))
        finally:
            keep_ledger(ctx, ledger_file, cand.number)
        ctx.proposer_failures = 0
    # the words stored, committed, exported, reported and put in later prompts: clean once, here
    described = {"description": ctx.redact(proposal.description), "hypothesis": ctx.redact(proposal.hypothesis),
                 "area": ctx.redact(proposal.area), "params": dict(proposal.params)}
    if cand.focus and proposal.area and proposal.area != cand.focus and store.get(WIDENED_KEY) != cand.focus:
        store.set(WIDENED_KEY, cand.focus)  # once per focus, not once per proposal
        store.emit("alert", text=f"focus {cand.focus}: nothing left to try there; the search widens to"
                                 f" other areas (#{cand.number}: {proposal.area}). `focus off` or another focus to steer")
    changed = git.changed_files()
    outside = [p for p in changed if p not in ctx.ws.editable]
    # a run without the file it executes measures nothing ("can't open file": exit code 2)
    deleted = [p for p in ctx.ws.run_files if p in changed and not (ctx.ws.path / p).exists()]
    # a link runs code its commit does not hold (train.py -> /tmp/evil.py, kept as the best, editable there)
    linked = [p for p in changed if (ctx.ws.path / p).is_symlink()]
    if outside or deleted or linked:
        reason = refusal_reason(ctx, outside, set(git.untracked_files()), deleted, linked)
        git.reset_to(cand.base_commit)
        protect(ctx.ws)
        return no_run(ctx, cand, "crash", reason, **described)
    if not changed:
        return no_run(ctx, cand, "discard", f"#{cand.confirm_of}'s change is in the best already: nothing to run"
                      if cand.kind == "rebase" else "the proposal changed nothing", **described)
    commit = git.commit_all(f"#{cand.number}: {described['description']}\n\n{described['hypothesis']}")
    git.keep_ref(cand.number, commit)
    if not ctx.in_place:  # the run gets a snapshot; the workspace stays at the wave's base
        git.reset_to(cand.base_commit)
    patch = ctx.patch(cand.base_commit, commit)  # its per-file counts are the candidate's too (one git call)
    added, removed = sum(a for _, a, _ in patch.files), sum(r for _, _, r in patch.files)
    with store.transaction():
        ledger.record_patch(store, patch)
        ledger.update_candidate(store, cand.id, phase="committed", commit_sha=commit,
                                lines_added=added, lines_removed=removed, **described)
        ledger.mark_notes_delivered(store, [cid for cid, _ in notes], cand.number)


PROPOSER_REST_S = 15.0  # after the second failure in a row; doubled at each one after, to MAX
PROPOSER_REST_MAX_S = 600.0


def rest_proposer(ctx: Context) -> None:
    """A proposer that failed twice in a row is asked again later, and later at each failure: an agent
    rate-limited by its provider failed 15 times in two seconds, and the night paused for nothing
    a few minutes would not have mended. Its failures still count toward the pause."""
    ctx.proposer_failures += 1
    if ctx.proposer_failures < 2:  # once may be a glitch: at once
        return
    wait = min(PROPOSER_REST_S * 2 ** (ctx.proposer_failures - 2), PROPOSER_REST_MAX_S)
    ctx.propose_after = time.monotonic() + wait
    say(f"the proposer failed {ctx.proposer_failures} times in a row; the next proposal in {wait:.0f} s")


def proposer_resting(ctx: Context) -> bool:
    return time.monotonic() < ctx.propose_after


def keep_ledger(ctx: Context, before: tuple[int, int] | None, number: int) -> None:
    """An agent that cleaned the workspace (`git clean -fdx`, `rm -rf .nightlab`) took the ledger
    with it: this engine and the daemon went on in the removed file, and the next start found an
    empty one, the night forgotten. Written back from the open copy, and the loop stopped, said
    first in the removed file, which the daemon still reads. The runs in flight lost their logs
    too (`number`: the proposal during which it happened): one still training writes its own back
    when it ends (the run wrapper), one that had ended is recorded as a lost result and runs again."""
    path = ctx.store.path
    if ctx.store.file_id() == before:
        return
    text = (f"the proposer removed the night's ledger ({path}: an agent's `git clean -x` or `rm`);"
            f" written back, and the loop stopped.{_runs_hit(ctx, number)} Tell the agent in program.md not"
            " to clean or remove ignored files, then start nightlab again")
    ctx.store.set(USER_ERROR_KEY, text)
    ctx.store.write_back()  # the marks above go with it: the open copy is what is written back
    raise UserError(text)


def _runs_hit(ctx: Context, number: int) -> str:
    """The runs in flight the cleaning hit, as sentences ("" when none). One still training in its
    folder (a git worktree: `git clean` leaves it) writes its log back when it ends; one that had
    ended (its log and exit status gone unread), or whose folder went too (`rm -rf`: it cannot
    finish as its change would, so it is stopped), is a lost result: its change runs again."""
    at = ctx.run_root
    hit = [(cand, run) for cand, run in ledger.in_flight(ctx.store)
           if not Path(run.log_path).exists() or not ctx.run_dir(cand).exists()]
    if not hit:
        return ""
    handles = {run.id: RunHandle.from_json(run.handle) for _, run in hit}
    statuses = ctx.executor.poll(list(handles.values()))
    lost, going = [], []
    for cand, run in hit:
        handle = handles[run.id]
        alive = statuses[handle.key].state in ("pending", "running")
        if alive and ctx.run_dir(cand).exists():
            going.append(f"#{cand.number}")
            continue
        if not alive and Path(run.log_path).exists():  # it ended just now, and its wrapper wrote the log back
            continue
        if alive:
            ctx.executor.cancel(handle, grace_s=CANCEL_GRACE_S)
            what = f"its folder {ctx.run_dir(cand)} was removed while it ran, so it was stopped"
        else:
            what = f"the run had ended when its log and exit status were removed with {at}"
        lost.append(f"#{cand.number}")
        ledger.finish_run(ctx.store, run.id, None, (
            f"{ledger.RESULT_LOST_PREFIX} {what} (during #{number}'s proposal: an agent's `git clean -x` or"
            " `rm`), so how it went is unknown; not its change's fault: it runs again"))
    said = ""
    if lost:
        said += f" Lost with the cleaning: the results of {', '.join(lost)}, run again at the next start (no crash)."
    if going:
        said += f" Still training: {', '.join(going)}, whose logs are written back when they end."
    return said


def refusal_reason(ctx: Context, outside: list[str], new: set[str], deleted: list[str],
                   linked: Sequence[str] = ()) -> str:
    """Why a change the engine will not run is refused, for the user and the next proposal alike:
    a change to files besides the editable ones (the protected harness said as such: no config lets
    a proposal change it; a new file said removed: a module train.py imports cannot run from a
    commit that lacks it), the deletion of a file each run executes, or a file made a symbolic link."""
    protected = [p for p in outside if p in ctx.ws.protected]
    added = [p for p in outside if p in new and p not in protected]
    other = [p for p in outside if p not in protected and p not in added]
    said = []
    if deleted:
        who = "the agent" if ctx.settings.proposer.kind == "agent" else "the proposal"
        said.append(f"{who} deleted {', '.join(deleted)}, which every run executes; the change was undone")
    if linked:
        said.append(f"made {', '.join(linked)} a symbolic link, whose code the commit would not hold (undone:"
                    " edit the file itself)")
    if protected:
        said.append(f"changed the protected {', '.join(protected)} (the harness that measures every run; restored)")
    if other:
        said.append(f"changed files outside project.editable: {', '.join(other)} (restored)")
    if added:
        said.append(f"added {', '.join(added)} outside project.editable (removed: a change lives in"
                    f" {', '.join(ctx.ws.editable)})")
    return "rejected: " + "; ".join(said)


def remake(ctx: Context, cand: Candidate) -> Proposal | None:
    """A rebase: the change of the experiment it re-runs, applied to the current best."""
    original = next(e for e in ledger.experiments(ctx.store) if e.number == cand.confirm_of)
    conflicts = ctx.git.apply_change(original.commit)
    if conflicts:
        ctx.git.reset_to(cand.base_commit)
        no_run(ctx, cand, "discard", f"could not re-make #{original.number} on {cand.base_commit[:7]}:"
                                     f" its change conflicts with the best's in {', '.join(conflicts)}")
        return None
    return Proposal(cand.description, cand.hypothesis, cand.area, dict(cand.params))


def no_run(ctx: Context, cand: Candidate, status: str, reason: str, **described: Any) -> None:
    """A candidate that ends before any run: judged here, recorded by the usual steps."""
    outcome = Outcome(status, None, ctx.best(), reason, finished_at=time.time())
    ledger.update_candidate(ctx.store, cand.id, phase="finished", commit_sha=cand.base_commit,
                            outcome=outcome.to_json(), **described)


def proposal_context(ctx: Context, cand: Candidate, notes: tuple[str, ...]) -> ProposalContext:
    every = ledger.experiments(ctx.store)
    # a run the data failed, or whose result was lost, says nothing of its change (which runs again)
    rows = [e for e in every if not ledger.measured_nothing(e.reason)]
    history = tuple(_past(e, ctx.setting) for e in rows)
    best = best_for_proposers(rows, ctx.setting)
    # A crash before the last keep is of code the best no longer holds: its log would stay in
    # every prompt of the night, stale, for as long as nothing else crashed.
    kept = max((e.number for e in rows if e.status == "keep" and e.kind != "baseline"), default=0)
    crashes = [e for e in rows if e.status == "crash" and e.duration_s is not None and e.number > kept]
    return ProposalContext(
        workspace=ctx.ws.path, editable=ctx.ws.editable, metric_name=ctx.metric_name,
        direction=ctx.direction, best=best, history=history,
        focus=cand.focus, notes=notes, consecutive_failures=without_a_keep(ctx.store, every),
        last_crash_log=ctx.log_tail(crashes[-1].number, 4000) if crashes else "",
        noise=views.night_noise(ctx.store, every), keep_z=ctx.settings.loop.keep_z,
        best_runs=tuple(views.best_runs(rows)), last_crash=crashes[-1].number if crashes else 0,
        data_dir=data_dir(ctx.env),
    )


def _past(e: ledger.Experiment, setting: str) -> PastExperiment:
    """`setting`: the one the next runs start on; a result of another is no number to compare with."""
    group = f"{e.hardware}|{e.setting}" if e.hardware else ""  # comparable only within one
    return PastExperiment(e.number, e.status, e.metric, e.description, e.hypothesis, e.area, e.params, e.kind,
                          e.reason, group, e.hardware, bool(e.setting) and e.setting != setting)


def best_for_proposers(rows: list[ledger.Experiment], setting: str) -> PastExperiment | None:
    """The best as /best defines it (the latest setting; the hardware class it was kept on), valued
    at its commit's estimate now on that class: another GPU model's value, or an older budget's,
    sits at an offset and is no number to beat. `setting`: the one the next runs start on (a best
    of another, before any run on it, is said to be of an older setting)."""
    made, _ = views.current_best(rows)
    if made is None:
        return None
    value = next(e.best for e in reversed(rows)
                 if e.status == "keep" and e.commit == made.commit and e.hardware_class == made.hardware_class)
    return dataclasses.replace(_past(made, setting), metric=value)
