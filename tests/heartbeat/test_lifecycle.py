"""What chat hears of the daemon's starts and stops: each restart a person made, and a crash loop
at most once an hour (heartbeat/lifecycle.py against a real store; the daemon's own use of it is
in test_daemon.py)."""

from __future__ import annotations

from pathlib import Path

from nightlab.bot import digest
from nightlab.heartbeat import lifecycle
from nightlab.loop.state import ledger
from nightlab.loop.state.config import DigestSettings
from nightlab.loop.state.store import Store

T0 = 1_800_000_000.0
MINUTE = 60.0


def _said(store: Store) -> list[str]:
    """The lines chat gets for the daemon's events, in order."""
    lines = []
    for event in store.events_after(0, 10_000):
        for message in digest.describe(event, DigestSettings()):
            lines.append("".join(span.text for span in message.spans))
    return lines


def _crash_after_up(store: Store, at: float) -> None:
    """A daemon that gets up, then dies without its shutdown (the OOM killer, the watchdog)."""
    lifecycle.say_started(store, lifecycle.begin(store, at), at + 5)


def test_a_crash_loop_says_one_line_an_hour_and_counts_the_starts_it_did_not_say(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    for n in range(13):  # a start every 5 minutes for an hour
        _crash_after_up(store, T0 + n * 5 * MINUTE)
    unclean = "🟢 nightlab started; the daemon before it did not stop cleanly (killed, crashed, or the machine went down)"
    assert _said(store) == ["🟢 nightlab started", unclean]  # the first crash is news; the next ones are not
    _crash_after_up(store, T0 + 65 * MINUTE)
    last = _said(store)[-1]
    assert last.startswith(f"{unclean}; 11 more starts since ")
    assert last.endswith(" not announced (restarting often? see its log: journalctl -u nightlab)")


def test_a_daemon_failing_before_it_is_up_says_its_stop_once_an_hour(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    for n in range(6):  # systemd's restarts of a daemon that fails while starting
        lifecycle.begin(store, T0 + n * MINUTE)
        lifecycle.say_stopped(store, "an error, see the daemon's log: OSError('x')", asked=False, now=T0 + n * MINUTE + 1)
    assert _said(store) == ["⏹ nightlab stopped: an error, see the daemon's log: OSError('x')"]


def test_every_restart_asked_for_is_said_with_what_the_new_daemon_found(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    candidate = ledger.new_candidate(store, "proposal", "a" * 40)
    ledger.add_run(store, candidate.id, "{}", "gpu0", str(tmp_path / "run.log"))
    for i in range(2):  # two restarts within ten minutes (an upgrade, then a config change)
        at = T0 + i * 5 * MINUTE
        lifecycle.say_started(store, lifecycle.begin(store, at), at + 5)
        lifecycle.say_stopped(store, lifecycle.why_stopped("SIGTERM"), asked=True, now=at + 60)
    ledger.set_paused(store, "telegram:7", "checking the GPU", None)
    lifecycle.say_started(store, lifecycle.begin(store, T0 + 11 * MINUTE), T0 + 11 * MINUTE + 5)
    n = candidate.number
    stopped = (f"⏹ nightlab stopped: SIGTERM (systemctl stop or restart, or a kill); #{n} keeps running, re-attached"
               " at the next start")
    started = f"🟢 nightlab started; #{n} in flight at the last stop, picked up again"
    assert _said(store) == [started, stopped, started, stopped,
                            f"{started}; the loop is paused by telegram:7: checking the GPU"]
