"""What the owner reads: an event from the store becomes a channel-neutral message.

One digest per finished experiment (payload keys in ARCHITECTURE.md's events table) and a short
line for the loop's other events. Pure functions of the event: the outbox calls them inside the
transaction that advances its cursor, so they must never raise on an odd payload.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nightlab.bot.format import (
    Outgoing,
    Photo,
    Span,
    bold,
    italic,
    plain,
    pre,
    text_message,
)
from nightlab.loop.state import ledger
from nightlab.loop.state.config import DigestSettings
from nightlab.loop.state.stats import gain_words
from nightlab.loop.state.store import Event
from nightlab.loop.state.views import numbered

MARKS = {"keep": "✅", "discard": "❌", "crash": "💥", "checks_failed": "⚠️"}


def wanted(event: Event, settings: DigestSettings) -> bool:
    """Whether the digest mode sends this event at all (hourly mode sends every one, batched)."""
    if event.kind != "experiment_finished" or settings.mode != "keeps_and_crashes":
        return True
    return event.payload.get("status") in ("keep", "crash") or bool(event.payload.get("new_best"))


def describe(event: Event, settings: DigestSettings, progress: bool = False) -> list[Outgoing]:
    """The messages for one event; `progress` adds a line when an experiment starts (the console's:
    it comes in order with the digests, which the engine's own log line could not)."""
    p = event.payload
    try:
        if event.kind == "experiment_started":
            if not progress:
                return []
            where = f" on {p['slot']}" if p.get("slot") else ""
            return [text_message(plain(f"▶ #{p.get('number', '?')} {p.get('kind', '')} started{where}: "
                                       f"{p.get('description', '')}"))]
        if event.kind == "experiment_finished":
            return [experiment_digest(p, settings.log_tail_lines)]
        if event.kind == "report":  # its text for a chat; an older nightlab's event has the markdown only
            title, _, rest = str(p.get("text") or p.get("markdown", "")).partition("\n")
            out: list[Outgoing] = [text_message(bold(f"📋 {title.removeprefix('# ')}"), plain("\n" + rest))]
            chart = p.get("chart_path")
            if chart and Path(chart).is_file():
                out.append(Photo(Path(chart), "progress"))
            return out
        line = _short_line(event.kind, p)
        return [text_message(plain(line))] if line else []
    except Exception as exc:  # noqa: BLE001 - a payload we cannot read must not stall the outbox
        return [text_message(plain(f"event {event.kind} #{event.id} (unreadable payload: {exc})"))]


def _short_line(kind: str, p: dict[str, Any]) -> str | None:
    by = f" by {p['by']}" if p.get("by") else ""
    if kind == "paused":
        after = f" after #{p['after']} finishes" if p.get("after") is not None else ""
        return f"⏸ paused{by}{after}" + (f": {p['reason']}" if p.get("reason") else "")
    if kind == "resumed":
        return f"▶️ resumed{by}"
    if kind == "focus_changed":
        return f"🎯 focus → {p.get('focus') or 'off'}{by}"
    if kind == "note_added":
        return f"📝 note{by}: {p.get('text', '')}"
    if kind == "self_paused":
        return f"⏸ the loop paused itself: {p.get('reason', '')}"
    if kind == "engine_restarted":
        return f"🔁 engine restarted ({p.get('restarts_last_hour', '?')} in the last hour): {p.get('reason', '')}"
    if kind == "alert":
        return f"🚨 {p.get('text', '')}"
    if kind == "daemon_started":
        return "🟢 nightlab started" + "".join(f"; {part}" for part in _found_at_start(p))
    if kind == "daemon_stopped":
        runs = p.get("in_flight") or []
        left = f"; {numbered(runs)} {'keeps' if len(runs) == 1 else 'keep'} running, re-attached at the next start"
        return f"⏹ nightlab stopped: {p.get('why', '?')}" + (left if runs else "")
    if kind == "harness_upgraded":
        return f"🔧 {p.get('text', '')}"
    if kind == "command_done":
        return f"↳ {p.get('name', '?')} from {p.get('sender', '?')}: {p.get('result', '')}"
    return None  # experiment_started and unknown kinds: nothing to say


def _found_at_start(p: dict[str, Any]) -> list[str]:
    parts = []
    if p.get("unclean"):
        parts.append("the daemon before it did not stop cleanly (killed, crashed, or the machine went down)")
    runs = numbered(p.get("in_flight") or [])
    if runs:
        parts.append(f"{runs} in flight at the last stop, picked up again")  # it may have ended meanwhile
    pause = p.get("paused")
    if pause:
        parts.append(f"the loop is paused by {pause.get('by', '?')}" + (f": {pause['reason']}" if pause.get("reason") else ""))
    if p.get("unsaid"):
        since = time.strftime("%H:%M", time.localtime(float(p["unsaid_since"]))) if p.get("unsaid_since") else "?"
        parts.append(f"{p['unsaid']} more {'start' if p['unsaid'] == 1 else 'starts'} since {since} not announced"
                     " (restarting often? see its log: journalctl -u nightlab)")
    return parts


def experiment_digest(p: dict[str, Any], log_tail_lines: int) -> Outgoing:
    status = str(p.get("status", "?"))
    name = p.get("metric_name") or "val_bpb"
    # a run the rule re-runs to decide is recorded as a discard, one the data failed as a crash;
    # "❌ discard" or "💥 crash" read as the change's end
    mark = "🏆" if p.get("new_best") else "🔁" if p.get("rerun") else MARKS.get(status, "•")
    other = ledger.not_the_change(str(p.get("reason", "")))
    again = (f"{other.digest}: runs again{' after /resume' if other.resume else ''}" if other
             else "undecided, runs again")
    head = f"{mark} #{p.get('number', '?')} {again if p.get('rerun') else status}"
    metric = p.get("metric")
    figure = f"{name} {_num(metric)}" if metric is not None else f"{name} —"
    if p.get("gain") is not None and p.get("se") is not None:  # a gain is positive when better
        figure += f" ({gain_words(float(p['gain']), float(p['se']))}"
        figure += f", n = {p['n']} vs {p['n_best']})" if p.get("n") and p.get("n_best") else ")"
    elif p.get("delta") is not None:  # worded as the gains are: "better"/"worse", whichever the direction
        d, was = float(p["delta"]), p.get("previous_best")
        better = (d < 0) == (p.get("direction", "minimize") == "minimize")  # an older event: val_bpb's
        moved = f"{abs(d):.4f}" != "0.0000"  # "worse by 0.0000" read as a loss (as in gain_words)
        words = f"{'better' if better else 'worse'} by {abs(d):.4f}" if moved else \
            "the same to 4 decimals" if d else "the same"
        figure += f" ({words} {'than' if moved else 'as'} {_num(was)})" if was is not None else f" ({words})"
    spans: list[Span] = [bold(f"{head} · {figure}")]
    if p.get("new_best"):
        spans += [plain("  "), bold("NEW BEST")]
    if p.get("description"):
        spans.append(plain(f"\n{p['description']}"))
    if p.get("hypothesis"):
        spans += [plain("\n"), italic(p["hypothesis"])]
    facts = [
        f"⏱ {_duration(p['duration_s'])}" if p.get("duration_s") is not None else "",
        # "memory": the same figure on a GPU (VRAM) and on a CPU run (RAM)
        f"memory {float(p['peak_vram_mb']) / 1024:.1f} GB" if p.get("peak_vram_mb") else "",
        f"MFU {float(p['mfu_percent']):.1f}%" if p.get("mfu_percent") is not None else "",
        f"confidence {float(p['confidence']):.1f} SE" if p.get("confidence") is not None else "",
        f"focus {p['focus']}" if p.get("focus") else "",
        " ".join(x for x in (p.get("slot"), f"({p['hardware']})" if p.get("hardware") else "") if x),
        f"best {_num(p['best'])}" if p.get("best") is not None and not p.get("new_best") else "",
    ]
    if any(facts):
        spans.append(plain("\n" + " · ".join(f for f in facts if f)))
    if p.get("kind") == "baseline" and p.get("profile"):  # the first digest says what the night runs with
        harness = p.get("harness") or {}
        spans.append(plain(f"\nprofile {p['profile']}" + "".join(f" · {k} {v}" for k, v in harness.items())))
    if p.get("reason"):
        spans.append(plain(f"\nreason: {p['reason']}"))
    tail = str(p.get("log_tail") or "").rstrip()
    if status == "crash" and tail:
        lines = tail.splitlines()[-log_tail_lines:]
        spans.append(pre("\n" + "\n".join(lines)))
    return text_message(*spans)


def _num(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def _duration(seconds: Any) -> str:
    s = int(float(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
