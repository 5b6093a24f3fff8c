"""What chat hears when the daemon starts and when it stops, without a line per turn of a crash loop.

A restart at 3 am (systemd, an upgrade, a crash) used to show only in later digests. Now:
- a start is said once the daemon is up (config read, data prepared), just before its engine starts, so
  before anything the engine says (said once it ticked, it came after a quick first experiment), with
  what it found: the runs still in flight (re-attached), a pause and why, a previous daemon that
  ended without stopping (killed, crashed, the machine went down);
- a stop that runs the daemon's shutdown is said with its why and the runs it leaves running.
What a phone owner wants at 3 am is the state, not every turn of a loop (kv LIFECYCLE_KEY):
- a start is said when the last thing said was a stop (the owner heard "stopped": "back" answers
  it), else at most once an hour, and a first start after a crash at most once an hour too; the
  starts not said are counted in the next one said;
- a stop is said when it was asked for (a signal, the experiments done) and the last thing said
  was not a stop (the owner believes it up), else at most once an hour.
So a daemon that keeps dying says about one line an hour: dying before it is up, only its stop;
dying later (OOM, watchdog), only its start, which counts the others.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from nightlab.loop.state import ledger
from nightlab.loop.state.store import Store

log = logging.getLogger("nightlab.daemon")

LIFECYCLE_KEY = "daemon.lifecycle"
QUIET_S = 3600.0  # a start, or a stop nobody asked for, said at most once in this long


@dataclass(frozen=True)
class Lifecycle:
    """The announcements so far, kept in the store across daemons."""

    up_since: float | None = None  # set at a start, cleared by a stop: still set, the daemon died
    start_said: float | None = None
    crash_said: float | None = None  # a start after a daemon that died
    stop_said: float | None = None
    stop_said_last: bool = False  # the last thing said was a stop: the next start answers it
    unsaid: int = 0  # starts not said since the last one said
    unsaid_since: float | None = None


@dataclass(frozen=True)
class Start:
    """What this daemon found when it started."""

    at: float
    in_flight: tuple[int, ...]  # experiments whose run outlived the last daemon
    unclean: bool  # the daemon before did not stop (killed, crashed, the machine went down)


def _read(store: Store) -> Lifecycle:
    return Lifecycle(**store.get(LIFECYCLE_KEY, {}))


def _write(store: Store, state: Lifecycle) -> None:
    store.set(LIFECYCLE_KEY, dataclasses.asdict(state))


def begin(store: Store, now: float) -> Start:
    """At the daemon's start, before its engine: what it finds, and that a daemon is up."""
    with store.transaction():
        state = _read(store)
        start = Start(now, tuple(ledger.running_numbers(store)), unclean=state.up_since is not None)
        _write(store, dataclasses.replace(state, up_since=now))
    return start


def say_started(store: Store, start: Start, now: float) -> None:
    """Once the daemon is up: say so, or count it for the next start said."""
    with store.transaction():
        state = _read(store)
        if not (state.stop_said_last or _quiet(state.start_said, now) or (start.unclean and _quiet(state.crash_said, now))):
            _write(store, dataclasses.replace(state, unsaid=state.unsaid + 1,
                                              unsaid_since=state.unsaid_since or start.at))
            log.info("daemon up; not said in chat (a start was said within the hour)")
            return
        pause = ledger.paused(store)
        store.emit("daemon_started", in_flight=list(start.in_flight), unclean=start.unclean,
                   paused=None if pause is None else {"by": pause.by, "reason": pause.reason},
                   unsaid=state.unsaid, unsaid_since=state.unsaid_since)
        _write(store, dataclasses.replace(state, start_said=now, stop_said_last=False, unsaid=0, unsaid_since=None,
                                          crash_said=now if start.unclean else state.crash_said))


def say_stopped(store: Store, why: str, asked: bool, now: float, heard: bool = False) -> None:
    """At a stop that runs the shutdown (engine stopped already): say why and what runs on.
    `asked`: a signal or the experiments done, not an error; `heard`: an alert said it already."""
    with store.transaction():
        state = dataclasses.replace(_read(store), up_since=None)
        if heard or (asked and not state.stop_said_last) or _quiet(state.stop_said, now):
            if not heard:
                store.emit("daemon_stopped", why=why, in_flight=ledger.running_numbers(store))
            state = dataclasses.replace(state, stop_said=now, stop_said_last=True)
        _write(store, state)


def _quiet(said: float | None, now: float) -> bool:
    """Nothing of the kind said within QUIET_S."""
    return said is None or now - said >= QUIET_S


def why_stopped(reason: str) -> str:
    """The daemon's reason for stopping, for a phone: who sends a SIGTERM is what the owner wonders."""
    return {
        "SIGTERM": "SIGTERM (systemctl stop or restart, or a kill)",
        "SIGINT": "SIGINT (Ctrl-C)",
        "finished": "the experiments asked for are done",
    }.get(reason, reason)
