"""`[heartbeat] hours`: the loop starts experiments only in the owner's chosen hours. At their end
it pauses after the run in flight, at their start it resumes what they paused; an owner's own
/pause or /resume holds until the next edge, and a restart does not act twice."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from nightlab.heartbeat.engine_child import EngineProcess
from nightlab.heartbeat.jobs import Heartbeat
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.engine.steering import apply_commands
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger, steering
from nightlab.loop.state.config import RunHours, settings_from_table
from nightlab.loop.state.store import Store

HOURS = "22:00-08:00"


def heartbeat(ws: Path, store: Store, hours: str = HOURS) -> Heartbeat:
    """One start of the daemon: its heartbeat with the run hours, in UTC."""
    settings = settings_from_table({"heartbeat": {"hours": hours}})
    beat = Heartbeat(settings, ws, store, LocalExecutor(), EngineProcess(["true"]), Notifier(None),
                     on_engine_stopped=lambda *_: None)
    scheduler = BackgroundScheduler(timezone=UTC)
    beat.schedule(scheduler)
    assert (scheduler.get_job("check_hours") is not None) == bool(hours)
    return beat


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC)


def queued_then_applied(store: Store) -> list[tuple[str, str]]:
    """The commands the heartbeat queued, applied as the engine's next checkpoint would."""
    queued = [(c.name, c.sender) for c in store.pending_commands()]
    apply_commands(store)
    return queued


def test_the_hours_pause_and_resume_the_loop_and_the_owner_overrides_until_the_next_edge(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    beat = heartbeat(ws, store)
    by = f"the run hours {HOURS}"

    beat.check_hours(at(1, 14))  # started in the afternoon: outside the hours
    assert queued_then_applied(store) == [("pause", by)]
    assert (paused := ledger.paused(store)) is not None and paused.by == by
    beat.check_hours(at(1, 18))
    assert queued_then_applied(store) == []  # only the edges act
    beat.check_hours(at(1, 22))
    assert queued_then_applied(store) == [("resume", by)] and ledger.paused(store) is None

    steering.send_command(ws, "pause", "telegram:1")  # the owner pauses in the night
    apply_commands(store)
    beat.check_hours(at(2, 8, 30))
    beat.check_hours(at(2, 22, 0))
    assert queued_then_applied(store) == []  # the hours do not resume what the owner paused
    assert (paused := ledger.paused(store)) is not None and paused.by == "telegram:1"

    steering.send_command(ws, "resume", "telegram:1")
    apply_commands(store)
    heartbeat(ws, store).check_hours(at(3, 8, 1))  # a daemon restarted in the morning pauses once
    heartbeat(ws, store).check_hours(at(3, 8, 2))
    assert queued_then_applied(store) == [("pause", by)]
    steering.send_command(ws, "resume", "telegram:1")  # the owner wants the GPU busy today
    apply_commands(store)
    beat.check_hours(at(3, 12))
    assert queued_then_applied(store) == [] and ledger.paused(store) is None


def test_hours_taken_out_of_the_config_leave_no_pause_behind(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    heartbeat(ws, store).check_hours(at(1, 14))
    assert queued_then_applied(store) == [("pause", f"the run hours {HOURS}")]
    heartbeat(ws, store, hours="")  # restarted (or reloaded) without them
    assert queued_then_applied(store) == [("resume", "the config (no run hours)")] and ledger.paused(store) is None


def test_the_hours_pause_queued_twice_before_the_engine_applies_it_is_queued_once(tmp_path: Path, caplog) -> None:
    """Hours edited back and forth while the engine is not applying commands (it is down): the
    second pause would change nothing; it was a job error with a traceback in the log."""
    caplog.set_level(logging.INFO)
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    heartbeat(ws, store).check_hours(at(1, 14))  # queued, not applied
    heartbeat(ws, store, hours="13:00-16:00").check_hours(at(1, 14, 10))  # inside: nothing of theirs is paused yet
    heartbeat(ws, store).check_hours(at(1, 14, 20))  # edited back: outside, the same pause, still queued
    assert [c.name for c in store.pending_commands()] == ["pause"]
    assert "is queued already" in caplog.text


def test_hours_within_one_day() -> None:
    day = RunHours.parse("09:00-17:30")
    assert day is not None and day.contains(9 * 60) and day.contains(17 * 60 + 29)
    assert not day.contains(17 * 60 + 30) and not day.contains(8 * 60 + 59)
    night = RunHours.parse(" 22:00 - 08:00 ")
    assert night is not None and night.text == HOURS and night.contains(23 * 60) and night.contains(0)
    assert not night.contains(8 * 60) and not night.contains(12 * 60)
    assert RunHours.parse("") is None
