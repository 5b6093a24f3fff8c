"""Fixtures for the bot tests: a workspace with a state store, settings pointing at the fake
servers, a BotService started in its own thread, and experiments recorded through the ledger
(which emits the same `experiment_finished` events the engine does). Replies to read-only
commands come from the real loop/state/views.py over that store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nightlab.bot.outbox import Tuning
from nightlab.bot.service import BotService
from nightlab.loop.state import ledger
from nightlab.loop.state.config import Secrets, Settings, settings_from_table
from nightlab.loop.state.store import Store

FAST = Tuning(backoff_base_s=0.1, backoff_max_s=0.5)
AREAS = ("attention", "optimizer", "schedule")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def store(workspace: Path) -> Iterator[Store]:
    s = Store.for_workspace(workspace)
    s.set(ledger.AREAS_KEY, list(AREAS))  # what the engine publishes from its proposer
    yield s
    s.close()


def settings(**table: Any) -> Settings:
    return settings_from_table(table, source="test.toml")


def start_service(s: Settings, secrets: Secrets, workspace: Path, **kwargs: Any) -> BotService:
    kwargs.setdefault("tuning", FAST)
    svc = BotService(s, secrets, workspace, **kwargs)
    svc.start()
    assert svc.ready.wait(60), "the bot did not connect"
    return svc


def finished(store: Store, status: str = "discard", metric: float | None = 1.0, **extra: Any) -> int:
    """Record one experiment the way the engine does; returns its number. `extra`: kind, commit,
    hardware, setting, best, description, ... (a proposal of commit c0ffee otherwise)."""
    kind, commit = extra.get("kind", "proposal"), extra.get("commit", "c0ffee")
    cand = ledger.new_candidate(store, kind, "base", description=extra.get("description", "a change"))
    exp = ledger.Experiment(
        number=cand.number, kind=kind, confirm_of=None, commit=commit, status=status,
        metric=metric, metrics={}, best=extra.get("best", metric), confidence=None,
        description=extra.get("description", "a change"), hypothesis=extra.get("hypothesis", "because"), area="optimizer",
        duration_s=extra.get("duration_s", 312.0), finished_at=time.time(), setting=extra.get("setting", ""),
        hardware=extra.get("hardware", ""),
    )
    event = {
        "number": cand.number, "status": status, "metric_name": "val_bpb", "metric": metric,
        "best": exp.best, "previous_best": extra.get("previous_best"), "delta": extra.get("delta"),
        "new_best": extra.get("new_best", False), "description": exp.description,
        "hypothesis": exp.hypothesis, "area": "optimizer", "duration_s": exp.duration_s,
        "peak_vram_mb": 45000, "mfu_percent": 38.5, "confidence": 2.5, "focus": None,
        "commit": commit, "lines_added": 1, "lines_removed": 1, "reason": "",
        "log_tail": extra.get("log_tail"), "slot": "gpu0",
    }
    ledger.record_experiment(store, cand.id, exp, event)
    return cand.number


def a_night_to_plot(store: Store) -> None:
    """An earlier setting's baseline, then the current one's: three baseline runs, a discard, a keep, a crash."""
    finished(store, "keep", 1.2, kind="baseline", commit="a", hardware="H200", setting="s1")
    for value in (1.0, 1.01, 0.99):
        finished(store, "keep", value, kind="baseline", commit="a", hardware="H200", setting="s2", best=1.0)
    finished(store, "discard", 1.02, commit="b", hardware="H200", setting="s2", best=1.0)
    finished(store, "keep", 0.97, commit="c", hardware="H200", setting="s2", description="depth 8→10")
    finished(store, "crash", None, commit="d", hardware="H200", setting="s2", best=0.97)


CAPTION = ("6 experiments (3 baseline, 1 keep, 1 discard, 1 crash); 1 of an earlier setting not counted\n"
           "best val_bpb 0.970000 (#6), runs vary ± 0.0100\nvs the baseline 1.000000: better by 0.0300 ± 0.0115")


def finished_with_patch(store: Store, diff: str, **extra: Any) -> int:
    """`finished`, its change recorded as a patch as the engine records it when it commits one."""
    number = finished(store, "keep", 0.98, **extra)
    lines = [x for x in diff.splitlines() if not x.startswith(("+++", "---"))]
    added, removed = sum(x.startswith("+") for x in lines), sum(x.startswith("-") for x in lines)
    ledger.record_patch(store, ledger.make_patch("base", "c0ffee", {"train.py": (added, removed)}, diff))
    return number


def running(store: Store, started_ago_s: float = 60.0) -> int:
    """A candidate with a run in flight, started `started_ago_s` ago; returns its number."""
    cand = ledger.new_candidate(store, "proposal", "base", phase="running", description="in flight")
    run = ledger.add_run(store, cand.id, "{}", "gpu0", "/tmp/log")
    store.connection().execute("UPDATE runs SET started_at = ? WHERE id = ?", (time.time() - started_ago_s, run.id))
    return cand.number
