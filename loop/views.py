"""Plain-text views of a workspace's ledger: the CLI prints them, the bot escapes and sends them.

Read-only: every view opens the store, reads, and formats; none of them needs the engine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from nightlab.loop import ledger
from nightlab.loop.errors import UserError
from nightlab.loop.executors.runfiles import started_at
from nightlab.loop.ledger import Experiment
from nightlab.loop.store import DB_FILENAME, Store, state_dir


def _store(workspace: Path) -> Store:
    if not (state_dir(Path(workspace)) / DB_FILENAME).exists():
        raise UserError(f"{workspace} is not a nightlab workspace; run `nightlab init {workspace}` first")
    return Store.for_workspace(Path(workspace))


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _metric_name(store: Store) -> str:
    return store.get("loop.metric_name", "val_bpb")


def _running(store: Store) -> tuple[ledger.Candidate, ledger.RunRecord] | None:
    runs = ledger.running_runs(store)
    return (ledger.get_candidate(store, runs[-1].candidate_id), runs[-1]) if runs else None


def _in_flight(store: Store) -> list[tuple[ledger.Candidate, ledger.RunRecord]]:
    return [(ledger.get_candidate(store, r.candidate_id), r) for r in ledger.running_runs(store)]


def _elapsed(run: ledger.RunRecord) -> str:
    """How long the command has run; a cluster job still waiting in the queue says so."""
    began = started_at(run.log_path)
    if began is None and run.handle and '"job_id": ""' not in run.handle:
        return f"queued {duration(time.time() - run.started_at)}"
    return f"running {duration(time.time() - (began or run.started_at))}"


def remaining_s(store: Store) -> float | None:
    """Expected seconds left of the running experiment: the median past duration minus elapsed."""
    now = _running(store)
    past = [e.duration_s for e in ledger.experiments(store, last=20) if e.duration_s and e.metric is not None]
    if now is None or not past:
        return None
    return max(0.0, statistics.median(past) - (time.time() - now[1].started_at))


def _best(rows: list[Experiment]) -> tuple[Experiment | None, float | None]:
    """The experiment that set the current best and the best value, on its hardware class: the
    last kept change (a later baseline on another class only re-measures it), else the baseline."""
    keeps = [e for e in rows if e.status == "keep"]
    changes = [e for e in keeps if e.kind != "baseline"]
    if changes:
        return changes[-1], changes[-1].best
    if not keeps:
        return None, None
    first = [e for e in keeps if e.hardware_class == keeps[0].hardware_class]
    return first[-1], first[-1].best  # the mean of the baseline repeats


def _baseline(rows: list[Experiment], best: Experiment | None) -> float | None:
    """The session's baseline on the best's hardware class (its first measured commit there)."""
    bases = [e for e in rows if e.kind == "baseline" and e.status == "keep"
             and (best is None or e.hardware_class == best.hardware_class)]
    first = [e for e in bases if e.commit == bases[0].commit] if bases else []
    return first[-1].best if first else None


def _classes_line(rows: list[Experiment]) -> str:
    """With more than one hardware class: each one's best commit as measured there."""
    refs = {}
    for e in rows:
        if e.status == "keep" and e.hardware:
            refs[e.hardware_class] = e
    if len(refs) < 2:
        return ""
    return "per hardware: " + " · ".join(
        f"{cls.hardware} {_fmt(e.best)} ({e.commit[:7]})" for cls, e in sorted(refs.items()))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6f}"


def _line(e: Experiment) -> str:
    figure = _fmt(e.metric).ljust(8)
    why = f" ({e.reason})" if e.status != "keep" and e.reason else ""
    return f"#{e.number} {e.status:<13} {figure}  {e.description or e.kind}{why}"


def _gain_text(baseline: float | None, best: float | None) -> str:
    if baseline is None or best is None:
        return ""
    delta = best - baseline
    pct = f" ({delta / baseline * 100:+.2f}%)" if baseline else ""
    return f"{delta:+.6f}{pct}"


def status_text(workspace: Path) -> str:
    store = _store(workspace)
    rows = ledger.experiments(store)
    name = _metric_name(store)
    lines = [f"nightlab · {store.get('workspace.branch', '?')} · profile {store.get('workspace.profile', '?')}"]
    flight = _in_flight(store)
    if len(flight) == 1:
        cand, run = flight[0]
        left = remaining_s(store)
        lines.append(
            f"now: #{cand.number} {cand.kind} running {duration(time.time() - run.started_at)}"
            + (f" (~{duration(left)} left)" if left is not None else "")
            + f" on {run.slot}: {cand.description or cand.kind}" + (f" [{cand.area}]" if cand.area else "")
        )
    elif flight:  # a wave: one line per slot
        slots = store.get("loop.slots") or []
        lines.append(f"now: {len(flight)} runs in flight" + (f" on {len(slots)} slots" if slots else ""))
        for cand, run in flight:
            lines.append(f"  {run.slot}: #{cand.number} {cand.kind} {_elapsed(run)}: {cand.description or cand.kind}"
                         + (f" [{cand.area}]" if cand.area else ""))
    else:
        lines.append("now: no run in flight")
    pause = ledger.paused(store)
    if pause:
        waits = f", after #{pause.after}" if pause.after else ""
        lines.append(f"paused by {pause.by} ({pause.reason}{waits}) {duration(time.time() - pause.since)} ago")
    best_exp, best = _best(rows)
    if best_exp is not None:
        gain = _gain_text(_baseline(rows, best_exp), best)
        lines.append(f"best {name}: {_fmt(best)} (#{best_exp.number}, {best_exp.commit[:7]})" + (f" · vs baseline {gain}" if gain else ""))
    classes = _classes_line(rows)
    if classes:
        lines.append(classes)
    lines.append(f"focus: {ledger.focus(store) or 'off'}")
    lines.append(f"experiments: {len(rows)} ({_counts(rows)})")
    if rows:
        lines.append("last:")
        lines += [f"  {_line(e)}" for e in rows[-3:]]
    return "\n".join(lines)


def _counts(rows: list[Experiment]) -> str:
    counts = {s: sum(e.status == s for e in rows) for s in ("keep", "discard", "crash", "checks_failed")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none yet"


def history_text(workspace: Path, n: int = 20, *, status: str | None = None, top: int | None = None,
                 direction: str = "minimize") -> str:
    """The last `n` experiments; with `status` only those (e.g. keep, crash); with `top` the `top`
    best results by the metric (in `direction`), best first, instead of the last ones."""
    if status is None and top is None:
        rows = ledger.experiments(_store(workspace), last=max(1, n))
        return "\n".join(_line(e) for e in rows) if rows else "no experiments yet"
    rows = [e for e in ledger.experiments(_store(workspace)) if status is None or e.status == status]
    if top is not None:
        scored = sorted((e for e in rows if e.metric is not None),
                        key=lambda e: (e.metric if direction == "minimize" else -e.metric, e.number))  # type: ignore[operator]
        rows = scored[:max(1, top)]
    else:
        rows = rows[-max(1, n):]
    if not rows:
        return f"no {status or 'scored'} experiments yet"
    several = len({e.hardware for e in rows}) > 1  # metrics of different classes are not comparable
    return "\n".join(_line(e) + (f" [{e.hardware or 'no run'}]" if several else "") for e in rows)


def best_text(workspace: Path) -> str:
    store = _store(workspace)
    rows = ledger.experiments(store)
    best_exp, best = _best(rows)
    if best_exp is None:
        return "no result yet"
    name = _metric_name(store)
    text = f"best {name}: {_fmt(best)} — #{best_exp.number} {best_exp.commit[:7]}: {best_exp.description or best_exp.kind}"
    if best_exp.hypothesis:
        text += f"\nhypothesis: {best_exp.hypothesis}"
    baseline = _baseline(rows, best_exp)
    gain = _gain_text(baseline, best)
    if gain:
        text += f"\nvs baseline {_fmt(baseline)}: {gain}"
    if best_exp.hardware:
        text += f"\nmeasured on: {best_exp.hardware}"
    classes = _classes_line(rows)
    if classes:
        text += "\n" + classes
    if best_exp.confidence is not None:
        text += f"\nconfidence: {best_exp.confidence:.1f}x noise"
    return text


def improvements(rows: list[Experiment]) -> list[tuple[Experiment, float]]:
    """Every kept change with how much it moved the best of its hardware class, largest first."""
    found, previous = [], {}
    for e in rows:
        if e.status != "keep" or e.best is None:
            continue
        before = previous.get(e.hardware_class)
        if e.kind != "baseline" and before is not None:
            found.append((e, abs(before - e.best)))
        previous[e.hardware_class] = e.best
    return sorted(found, key=lambda item: item[1], reverse=True)


def report_markdown(workspace: Path) -> str:
    store = _store(workspace)
    rows = ledger.experiments(store)
    name = _metric_name(store)
    out = [f"# nightlab report — {store.get('workspace.branch', '?')}", ""]
    if not rows:
        return "\n".join([*out, "No experiments yet."])
    span = rows[-1].finished_at - (rows[0].started_at or rows[0].finished_at)
    best_exp, best = _best(rows)
    baseline = _baseline(rows, best_exp)
    out += [
        f"- experiments: {len(rows)} ({_counts(rows)}) over {duration(span)}",
        f"- baseline {name}: {_fmt(baseline)}",
        f"- best {name}: {_fmt(best)}"
        + (f" (#{best_exp.number}, `{best_exp.commit[:7]}`)" if best_exp else ""),
        f"- gain: {_gain_text(baseline, best) or '—'}",
        "",
        "## Top improvements",
    ]
    top = improvements(rows)[:10]
    if top:
        out += ["", f"| # | commit | {name} | gain | confidence | description |", "|---|---|---|---|---|---|"]
        for e, delta in top:
            conf = "—" if e.confidence is None else f"{e.confidence:.1f}"
            out.append(f"| {e.number} | `{e.commit[:7]}` | {_fmt(e.best)} | {delta:.6f} | {conf} | {e.description} |")
    else:
        out.append("\nNothing beat the baseline yet.")
    failed = [e for e in rows if e.status != "keep"][-15:]
    out += ["", "## What did not work", ""]
    out += [f"- #{e.number} {e.status}: {e.description or e.kind} — {e.reason}" for e in failed] or ["- nothing failed"]
    return "\n".join(out)


def status_line(workspace: Path) -> str:
    """One line for systemd's STATUS=, e.g. "exp #42 running 3m12s · best 0.987100 · focus attention"."""
    store = _store(workspace)
    parts = []
    flight = _in_flight(store)
    if len(flight) > 1:
        parts.append(f"{len(flight)} runs in flight (" + ", ".join(f"#{c.number}" for c, _ in flight) + ")")
    elif flight:
        parts.append(f"exp #{flight[0][0].number} running {duration(time.time() - flight[0][1].started_at)}")
    elif ledger.paused(store):
        parts.append("paused")
    else:
        parts.append("idle")
    best = _best(ledger.experiments(store))[1]
    if best is not None:
        parts.append(f"best {best:.6f}")
    area = ledger.focus(store)
    if area:
        parts.append(f"focus {area}")
    return " · ".join(parts)
