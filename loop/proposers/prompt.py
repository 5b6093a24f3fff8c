"""The prompt file the agent proposer hands to an external coding agent.

Everything the agent needs to make one good next experiment, and nothing it has to go looking
for: the research directives (program.md), the goal, the best result, what was tried and how it
went, the last crash, the user's steering, what is already running, and the rules.
"""

from __future__ import annotations

import statistics

from nightlab.loop.decision import Rule, kept_at_once
from nightlab.loop.proposers.base import PastExperiment, ProposalContext
from nightlab.loop.state.stats import Noise

RECENT = 10  # experiments shown in full (hypothesis, decision); older ones in brief
# Older ones, in brief, at most: what was tried, so the agent does not try it again, without a
# prompt (paid for every turn) that grows all night. Keeps are always listed: the path to the best.
BRIEF = 100
BRIEF_CHARS = 80  # of an older experiment's description
WHY_CHARS = 300  # of a hypothesis in the prompt: the idea, not an agent's whole closing paragraph
PROPOSAL_FILE = ".nightlab/agent/proposal.json"
REASON_CHARS = 200  # of a past experiment's reason: the decision, not a whole log line
OLDER = "an older setting than the runs from now (another time budget, data or scorer)"
OLDER_MARK = "older setting: not comparable"


def build_prompt(ctx: ProposalContext, program: str, switch_after: int) -> str:
    better = "higher" if ctx.direction == "maximize" else "lower"
    files = ", ".join(ctx.editable)
    parts = [
        "# nightlab: propose the next experiment",
        (
            "You are one step of an unattended research loop. Make ONE focused change to "
            f"{files} that you expect to give a {better} {ctx.metric_name}. The loop then commits "
            "your change, trains for a fixed time budget and keeps it only if the metric improves."
        ),
    ]
    if program.strip():
        parts += ["## Research directives (program.md)", program.strip()]
    recent, older = ctx.history[-RECENT:], ctx.history[:-RECENT]
    # Each GPU model's values sit at their own offset: named beside each value only where the
    # prompt shows more than one (with one, the line reads as it always did).
    gpus = len({e.hardware for e in (*ctx.history, *([ctx.best] if ctx.best else [])) if e.hardware}) > 1
    parts += ["## Goal", f"Metric: {ctx.metric_name}, {ctx.direction} ({better} is better).", _best(ctx, gpus)]
    if ctx.noise is not None:
        parts += ["## Noise", _noise(ctx, ctx.noise)]
    said = _brief(older, gpus) if older else []
    if recent:
        said += [f"## Recent experiments (last {len(recent)} of {len(ctx.history)}, oldest first)"]
        said += [_line(e, gpus) for e in recent]
    if said:  # how to read the values, under the first heading that shows them
        parts += [said[0], *_caveats(ctx.history, gpus), *said[1:]]
    if ctx.consecutive_failures:
        line = ("The last experiment" if ctx.consecutive_failures == 1 else
                f"The last {ctx.consecutive_failures} experiments") + " did not improve on the best."
        if ctx.consecutive_failures >= switch_after:
            line += " Stop refining that line of work: try a clearly different idea or area."
        parts += ["## Streak", line]
    if ctx.last_crash_log.strip():
        parts += [f"## Log tail of the last crash (#{ctx.last_crash})", "```", ctx.last_crash_log.rstrip(), "```"]
    if ctx.focus:
        parts += ["## Focus (set by the user)", f"Work on: {ctx.focus}"]
    if ctx.notes:
        parts += ["## Notes from the user (take them into account)"] + [f"- {n}" for n in ctx.notes]
    if ctx.in_flight:
        parts += ["## Already running (propose something different)"] + [f"- {d}" for d in ctx.in_flight]
    parts += [
        "## Rules",
        f"- Edit only {files}. Any change to another file rejects the whole proposal.",
        "- Do not commit, stash, reset or switch branches: the loop owns git.",
        "- Do not run the training yourself: the loop runs it with the right budget and hardware.",
        "- Do not repeat an experiment listed above: the same code is refused, and a near copy wastes a run.",
        f"- Improve the training itself: do not change how {ctx.metric_name} is computed or printed.",
        "- Keep the change small and readable; simpler code wins ties.",
        (
            f"- Optionally write {PROPOSAL_FILE} as JSON: "
            '{"description": "<one line, e.g. MATRIX_LR 0.04→0.05>", "hypothesis": "<why it should help>"}.'
        ),
    ]
    return "\n\n".join(parts) + "\n"


def _best(ctx: ProposalContext, gpus: bool) -> str:
    best = ctx.best
    if best is None or best.metric is None:
        return "No result yet: the baseline is still to be measured."
    said = f"Best so far: {ctx.metric_name} = {best.metric:.6g}{_gpu(best, gpus)} (#{best.number}: {best.description})."
    if best.older_setting:  # no run on the new setting yet: the number to beat is still unknown
        said += f" It was measured under {OLDER}: no number for the next run's to beat."
    return said


def _caveats(shown: tuple[PastExperiment, ...], gpus: bool) -> list[str]:
    """How to read the labels below, said only where a label is shown. A result of an older
    setting is marked rather than left out: its value compares with nothing now, but what was
    tried, and whether it beat the best of its own time, still tells the agent what helps and
    keeps it from proposing the same change again."""
    said = []
    if gpus:
        said.append("Values compare only within one GPU model (each sits at its own offset), so each is labelled"
                    " with its GPU; a keep or discard was judged against the best on its own GPU.")
    if any(e.older_setting for e in shown):
        said.append(f"Values marked \"{OLDER_MARK}\" were measured under {OLDER}; their keep or discard"
                    " (against the best of their time) still says what helped.")
    return said


def _noise(ctx: ProposalContext, noise: Noise) -> str:
    return (f"Two runs of the same code differ by about ± {noise.sd:.4g} {ctx.metric_name} (one standard"
            f" deviation, {noise.how()}). A change is kept only when it beats the best by more than {ctx.keep_z:g}"
            " standard errors of the difference; one in between is "
            + ("discarded (a re-run gives the same number)." if noise.identical else "re-run first.") + _keep_at(ctx, noise)
            + " Aim for changes you expect to be worth several times the noise: a smaller one costs runs and"
            " is discarded.")


def _keep_at(ctx: ProposalContext, noise: Noise) -> str:
    """The keep rule in the metric's own numbers, for a change's first run against the best's runs."""
    if not ctx.best_runs or (ctx.best is not None and ctx.best.older_setting):
        return ""
    n, mean = len(ctx.best_runs), statistics.fmean(ctx.best_runs)
    at = kept_at_once(ctx.best_runs, noise, ctx.direction, Rule(z=ctx.keep_z))
    runs = "its run" if n == 1 else f"the mean of its {n} runs"
    kept = f" In numbers: against the best ({runs}: {mean:.6g}), a change's first run is kept at once" \
           f" {'below' if ctx.direction == 'minimize' else 'above'} {at:.6g}"
    if noise.identical:  # decision.decide re-runs nothing then
        return f"{kept}, discarded otherwise (the same number again on a re-run)."
    return f"{kept}, re-run between that and {mean:.6g}, discarded otherwise."


def _brief(older: tuple[PastExperiment, ...], gpus: bool) -> list[str]:
    """The experiments before the recent ones, one short line each (keeps always, the rest the
    latest BRIEF): what was tried and how it went, not why."""
    keeps = sum(e.status == "keep" for e in older)
    others = [e.number for e in older if e.status != "keep"]
    shown = {e.number for e in older if e.status == "keep"} | set(others[-BRIEF:])
    left = len(older) - len(shown)
    head = (f"## Earlier experiments (#{older[0].number}–#{older[-1].number} in brief: {keeps} kept,"
            f" {len(older) - keeps} not)")
    return [head] + [_line(e, gpus, brief=True) for e in older if e.number in shown] + (
        [f"({left} earlier not listed)"] if left else [])


def _gpu(e: PastExperiment, gpus: bool) -> str:
    return f" on {e.hardware}" if gpus and e.hardware else ""


def _line(e: PastExperiment, gpus: bool, brief: bool = False) -> str:
    older = f" ({OLDER_MARK})" if e.older_setting else ""
    metric = "no metric" if e.metric is None else f"{e.metric:.6g}{_gpu(e, gpus)}{older}"
    if brief:
        return f"- #{e.number} {e.status}, {metric}: {_cut(e.description, BRIEF_CHARS)}"
    why = f" (hypothesis: {_cut(e.hypothesis, WHY_CHARS)})" if e.hypothesis else ""
    # the decision's words say how sure it was (a gain within the noise, a harness rejection)
    said = f" — {e.reason[:REASON_CHARS]}" if e.reason else ""
    return f"- #{e.number} {e.status}, {metric}: {e.description}{why}{said}"


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"
