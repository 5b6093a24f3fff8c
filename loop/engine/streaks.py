"""Runs of experiments without success, counted from the ledger: failures pause the loop (the
self-pause in recording), a run without a keep changes the search's strategy (proposing)."""

from __future__ import annotations

from nightlab.loop.judge import NOT_COMPARED_PREFIX, REBASE_PREFIX
from nightlab.loop.state import ledger
from nightlab.loop.state.ledger import Experiment
from nightlab.loop.state.store import Store


def failures_in_a_row(store: Store, rows: list[Experiment]) -> int:
    """Experiments that failed (crash, checks_failed) in a row, since the last resume."""
    since = store.get(ledger.FAILURES_SINCE_KEY, 0)
    count = 0
    for e in reversed(rows):
        if e.number <= since or e.status not in ("crash", "checks_failed"):
            break
        count += 1
    return count


def without_a_keep(store: Store, rows: list[Experiment]) -> int:
    """Experiments without a keep since the last keep (or the last resume): what the search
    counts to change its strategy. A result re-run to decide is not one, nor one that had
    nothing to be compared with, nor a run the data failed or whose result was lost (its change runs again)."""
    since = store.get(ledger.FAILURES_SINCE_KEY, 0)
    # a candidate's runs (its first, its re-runs) count once: by the run that decided it
    deciding = {e.commit: e.number for e in rows if e.kind == "confirm"}
    count = 0
    for e in reversed(rows):
        if (e.status == "keep" and e.kind != "baseline") or e.number <= since:
            break
        if (deciding.get(e.commit, e.number) == e.number and e.status != "keep" and e.kind != "baseline"
                and not e.reason.startswith((NOT_COMPARED_PREFIX, REBASE_PREFIX)) and not ledger.measured_nothing(e.reason)):
            count += 1
    return count
