"""The heartbeat against real processes: run timeout, stalled run, frozen engine, flapping,
and what systemd hears meanwhile."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from nightlab.heartbeat import jobs
from nightlab.heartbeat.engine_child import EngineProcess
from nightlab.heartbeat.jobs import Heartbeat
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.executors import RunHandle
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger
from nightlab.loop.state.config import settings_from_table
from nightlab.loop.state.steering import send_command
from nightlab.loop.state.store import Store

from tests.heartbeat.conftest import FAKES, Harness, gone, write_config
from tests.heartbeat.test_daemon import cleaning_night
from tests.waiting import wait_until


def _trainer(mode: str, pidfile: Path) -> str:
    return f"{sys.executable} {FAKES / 'fake_trainer.py'} {mode} {pidfile}"


def _tree(harness: Harness, pidfile: Path, store: Store) -> list[int]:
    """The executor's wrapper shell, the trainer, and the trainer's own child (cleaned up after)."""
    wait_until(pidfile.exists, what="the trainer to start")
    wrapper = RunHandle.from_json(ledger.get_run(store, 1).handle).pid
    pids = [wrapper, *(int(p) for p in pidfile.read_text().split())]
    harness.cleanup_pids.extend(pids)
    return pids


@pytest.mark.parametrize(
    ("mode", "limits", "reason"),
    [
        ("hang", {"run_timeout": 2.0}, "timeout after 0m02s"),
        ("silent", {"stall_after": 1.0}, "stalled: no output for 0m01s"),
        ("flood", {"max_log_mb": 1.0}, "its log passed 1 MB: the run printed too much (a print in its training"
                                       " loop?); raise [heartbeat] max_log_mb if it must"),
    ],
)
def test_misbehaving_run_is_killed_with_its_whole_tree(
    harness: Harness, tmp_path: Path, mode: str, limits: dict, reason: str
) -> None:
    pidfile = tmp_path / "trainer.pids"
    daemon = harness.start("--launch-run", _trainer(mode, pidfile))
    pids = _tree(harness, pidfile, daemon.store)
    assert len(pids) == 3 and not any(gone(p) for p in pids)
    # The limit comes in a live reload once the whole tree is seen alive: set from the start, a
    # second's stall or a megabyte of log could kill a run whose trainer a loaded box was slow to
    # start, before it had written its pids.
    write_config(tmp_path / "daemon.toml", **limits)
    daemon.proc.send_signal(signal.SIGHUP)

    wait_until(lambda: all(gone(p) for p in pids), what="every process of the run to be gone")
    run = ledger.get_run(daemon.store, 1)
    assert run.kill_reason == reason
    # the (fake) engine saw it end and recorded it, as the real one does
    wait_until(lambda: ledger.get_run(daemon.store, 1).state == "exited", what="the run recorded")
    assert daemon.proc.poll() is None  # the daemon goes on
    assert daemon.stop() == 0


class _NotifySocket:
    """An abstract AF_UNIX datagram socket standing in for systemd; keeps (time, fields)."""

    def __init__(self) -> None:
        self.address = f"@nightlab-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.time(), fields))

    def fields(self) -> list[str]:
        return [k for _, fields in self.messages for k in fields]

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


def test_frozen_engine_is_restarted_and_the_watchdog_pauses_meanwhile(harness: Harness) -> None:
    notify = _NotifySocket()
    try:
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}  # pings every 0.2 s
        daemon = harness.start("--freeze-first", env=env, loop_stall_after=1.5)
        restarted = wait_until(lambda: daemon.events("engine_restarted"), what="engine_restarted")
        assert restarted[0]["restarts_last_hour"] == 1
        assert restarted[0]["reason"].startswith("engine stalled: no progress for")
        # the second engine carries on: it ticks
        tick = wait_until(lambda: len(daemon.store.get("fake_engine.starts", [])) == 2
                          and daemon.store.get("engine.tick"), what="the new engine")
        wait_until(lambda: daemon.store.get("engine.tick") > tick, what="the new engine to tick")
        resumed = time.time()
        wait_until(lambda: any(t > resumed and "WATCHDOG" in f for t, f in notify.messages),
                   what="watchdog pings to resume")
        assert daemon.stop() == 0
        wait_until(lambda: "STOPPING" in notify.fields(), what="STOPPING=1")
    finally:
        notify.close()

    keys = notify.fields()
    assert keys[0] == "READY"
    assert keys.index("READY") < keys.index("STATUS") < keys.index("WATCHDOG") < keys.index("STOPPING")
    assert "STOPPING" not in keys[: keys.index("STOPPING")] and keys[-2:] == ["STOPPING", "STATUS"]
    # While the frozen engine was being dealt with, STATUS went on without WATCHDOG=1 ...
    pings = ["WATCHDOG" in f for _, f in notify.messages if "STATUS" in f and "READY" not in f]
    first_ping = pings.index(True)
    gap = max(len(run) for run in "".join("W" if p else "." for p in pings[first_ping:]).split("W"))
    assert gap >= 3, pings
    # ... and resumed once the new engine ticked.
    assert pings[-2] is True or pings[-3] is True


def test_flapping_engine_pauses_the_loop_and_alerts_once(harness: Harness) -> None:
    notify = _NotifySocket()
    try:
        daemon = harness.start("--always-die", env={"NOTIFY_SOCKET": notify.address}, max_restarts_per_hour=2)
        wait_until(lambda: daemon.events("self_paused"), what="self_paused")
        restarts = daemon.events("engine_restarted")
        assert [r["restarts_last_hour"] for r in restarts] == [1, 2]
        assert all(r["reason"] == "engine exited with code 3" for r in restarts)
        paused = ledger.paused(daemon.store)
        assert paused is not None and paused.by == "heartbeat"
        # Several more beats (systemd hears each: the engine check runs on the same interval),
        # each of which would have restarted the engine or alerted again.
        seen = len(notify.messages)
        wait_until(lambda: len(notify.messages) >= seen + 4, what="four more heartbeat beats")
    finally:
        notify.close()
    assert len(daemon.store.get("fake_engine.starts")) == 3
    # one message in chat: an alert beside the pause said the same words again
    assert daemon.events("alert") == [] and len(daemon.events("self_paused")) == 1
    assert daemon.events("self_paused")[0]["reason"] == ("the engine needed 2 restarts within an hour (last: engine"
                                                         " exited with code 3). Check the logs, then /resume.")
    assert daemon.stop() == 0


def test_a_resume_starts_a_flapping_engine_again(harness: Harness) -> None:
    # "Check the logs, then /resume": the /resume waited up to an hour, until old restarts aged out.
    notify = _NotifySocket()
    try:
        daemon = harness.start("--always-die", env={"NOTIFY_SOCKET": notify.address}, max_restarts_per_hour=1)
        wait_until(lambda: daemon.events("self_paused"), what="self_paused")
        assert "acts on this when it starts" in send_command(daemon.workspace, "resume", "telegram:1")
        wait_until(lambda: len(daemon.store.get("fake_engine.starts")) == 3, what="the engine started again")
        # It dies again before applying the resume: paused and said again, not restarted at every beat.
        wait_until(lambda: len(daemon.events("self_paused")) == 2, what="the second self-pause")
        seen = len(notify.messages)
        wait_until(lambda: len(notify.messages) >= seen + 4, what="four more heartbeat beats")
    finally:
        notify.close()
    assert len(daemon.store.get("fake_engine.starts")) == 3
    assert daemon.stop() == 0


def test_while_an_agent_has_removed_the_ledger_the_status_says_so_not_to_init_a_workspace(
        harness: Harness, tmp_path: Path) -> None:
    """Between an agent's `git clean -fdx` and the engine writing the ledger back, every beat logged
    "status line unavailable: ... is not a nightlab workspace; run `nightlab init` first": advice
    that would start the night's ledger afresh."""
    workspace, config, gate = cleaning_night(tmp_path)
    notify = _NotifySocket()
    try:
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000",  # a beat every 0.2 s
               "NIGHTLAB_SANDBOX": "0"}  # unconfined: sandboxed, the agent cannot clean
        daemon = harness.start(real_engine=True, extra_config=config, env=env)
        wait_until(lambda: not (workspace / ".nightlab" / "state.db").exists(), timeout=60,
                   what="the agent to clean", abort=lambda: daemon.proc.poll() is not None and daemon.log())
        status = wait_until(lambda: [f["STATUS"] for _, f in notify.messages if "removed" in f.get("STATUS", "")],
                            what="the status in the cleaned workspace")
        gate.touch()
        assert daemon.proc.wait(timeout=60) == 2, daemon.log()
    finally:
        notify.close()
    assert status[0] == "the ledger was removed (an agent's `git clean -x`?); waiting for the engine to write it back"
    assert "status line unavailable" not in daemon.log(), daemon.log()


def test_a_run_whose_log_an_agent_removed_is_not_killed_as_stalled_while_it_prints(
        harness: Harness, tmp_path: Path) -> None:
    """An agent's `git clean -fdx` took .nightlab/runs: the heartbeat found no log, took the run for
    silent since it started, and killed it as stalled though it trained on (a crash of its change)."""
    pidfile = tmp_path / "trainer.pids"
    daemon = harness.start("--launch-run", _trainer("hang", pidfile))  # a line every 0.2 s
    pids = _tree(harness, pidfile, daemon.store)
    shutil.rmtree(daemon.workspace / ".nightlab" / "runs")
    write_config(tmp_path / "daemon.toml", stall_after=1.0)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: reloaded heartbeat.stall_after" in daemon.log(), what="the reload")
    reloaded = time.time()

    def printed_since() -> float:
        try:  # the removed log, as the run's wrapper still writes it
            return os.stat(f"/proc/{pids[0]}/fd/1").st_mtime - reloaded
        except OSError:
            return 0.0

    wait_until(lambda: printed_since() > 3.0, what="the run to print for three times stall_after",
               abort=lambda: ledger.get_run(daemon.store, 1).kill_reason)
    assert ledger.get_run(daemon.store, 1).kill_reason is None and not any(gone(p) for p in pids)
    assert daemon.stop() == 0


def test_systemd_hears_the_watchdog_while_an_agent_has_removed_the_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ping waited for the ledger as the checks do: on a scheduler thread that had not opened it
    before an agent's `git clean -fdx`, no WATCHDOG=1 until the engine wrote it back, and an agent
    working past WatchdogSec had systemd restart the daemon. The scheduler starts after the removal
    here, so no thread of it has the ledger open."""
    monkeypatch.setattr(jobs, "SUPERVISION_SLACK_S", 1.0)  # the checks' bound: 1.4 s, not 30.4 s
    store = Store.for_workspace(tmp_path, follow=True)
    for path in (tmp_path / ".nightlab").glob("state.db*"):
        path.unlink()
    notify = _NotifySocket()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
    settings = settings_from_table({"heartbeat": {"check_interval": 0.2, "report_time": ""}})
    beat = Heartbeat(settings, tmp_path, store, LocalExecutor(),
                     EngineProcess([sys.executable, "-c", "import time; time.sleep(600)"]), notifier,
                     on_engine_stopped=lambda why, code: None)
    scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True})
    try:
        beat.start_engine()
        notifier.ready("up")
        scheduler.start()
        beat.schedule(scheduler)

        def span() -> float:  # from the first status to the last, past the checks' bound
            times = [t for t, fields in notify.messages if "STATUS" in fields and "READY" not in fields]
            return times[-1] - times[0] if times else 0.0

        wait_until(lambda: span() > 2.0, what="statuses for longer than the checks' bound")
    finally:
        scheduler.shutdown(wait=True)
        beat.stop_engine()
        notify.close()
    statuses = [fields for _, fields in notify.messages if "STATUS" in fields and "READY" not in fields]
    assert statuses[0]["STATUS"].startswith("the ledger was removed")
    assert all(fields.get("WATCHDOG") == "1" for fields in statuses), statuses
