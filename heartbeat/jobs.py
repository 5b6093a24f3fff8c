"""The heartbeat: the checks the daemon's APScheduler runs, and their schedule.

Each check is a method that reads the state store, decides, and acts; none of them records an
experiment (that is the engine's job, ARCHITECTURE.md "kill protocol"). The checks run in the
scheduler's worker threads, so they must stay correct if one of them blocks for a while (killing
a process tree waits for it to die): each job has max_instances=1 and coalesces missed runs.

- check_runs:   a run past run_timeout, whose log has not grown for stall_after or has grown past
                max_log_mb (a trainer printing in a tight loop would fill the disk), is marked with
                the reason and cancelled through the executor (its whole process tree). A cluster
                job's log removed under it is out of sight, not silent: only run_timeout bounds it.
- check_engine: the engine child exited, or has not ticked for loop_stall_after -> killed and
                restarted from durable state; at most max_restarts_per_hour restarts in any hour,
                beyond that the loop is paused and an alert raised instead. A paused engine is
                watched too: it still ticks at every checkpoint (it has to, to hear /resume), so a
                paused engine that stops ticking is frozen, and only a restart gets /resume heard.
                An engine that exits 2 stopped on a problem a person must fix (a user's edit in
                the tree, a detached HEAD): not restarted; its words go to chat and the daemon stops.
- check_host:   free disk under min_free_disk_gb -> pause + alert (once per episode).
- check_hours:  `[heartbeat] hours`: pause after the run in flight at their end, resume at their start.
- notify:       systemd STATUS= every beat, WATCHDOG=1 only while the checks above are passing (a check
                waiting for a removed ledger passes: the ping never waits for the ledger).
- daily_report: a `report` event at report_time; missed_report, at start, the one a daemon that
                was down at that time missed (kv LAST_REPORT_KEY: each time's report goes out once).
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from nightlab.heartbeat.engine_child import ENGINE_STOP_GRACE_S, EngineProcess
from nightlab.heartbeat.health import MIB, free_disk_gb, space_used, watched_paths
from nightlab.heartbeat.report import write_report
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.executors import Executor, RunHandle
from nightlab.loop.state import ledger, steering, views
from nightlab.loop.state.commands import Pause, Resume
from nightlab.loop.state.config import HeartbeatSettings, RunHours, Settings
from nightlab.loop.state.errors import EXIT_USER_ERROR, USER_ERROR_KEY, UserError
from nightlab.loop.state.ledger import started_at
from nightlab.loop.state.store import LedgerGone, Store

log = logging.getLogger(__name__)

HOURS_INSIDE_KEY = "hours.inside"  # the side of `[heartbeat] hours` the last check saw
HOURS_SENDER = "the run hours"  # who a pause or resume of the hours is by
RUN_CANCEL_GRACE_S = 10.0  # SIGTERM -> SIGKILL for a run's tree: lets a trainer flush its log
HOUR_S = 3600.0
# The watchdog is withheld when the supervision passes themselves stop completing: longer than
# this beyond their interval means a check is stuck (e.g. on a locked database).
SUPERVISION_SLACK_S = 30.0
LAST_REPORT_KEY = "report.last"  # kv: when the last daily report was sent (time.time())


def fmt_duration(seconds: float) -> str:
    """600 -> '10m00s' (the form used in kill reasons and messages)."""
    total = round(seconds)
    return f"{total // 60}m{total % 60:02d}s"


@dataclass
class RestartWindow:
    """Engine restarts in the last hour, to tell recovering from flapping."""

    times: deque[float] = field(default_factory=deque)

    def count(self, now: float) -> int:
        while self.times and self.times[0] <= now - HOUR_S:
            self.times.popleft()
        return len(self.times)

    def add(self, now: float) -> int:
        self.times.append(now)
        return self.count(now)


class Heartbeat:
    def __init__(
        self,
        settings: Settings,
        workspace: Path,
        store: Store,
        executor: Executor,
        engine: EngineProcess,
        notifier: Notifier,
        on_engine_stopped: Callable[[str, int], None],
    ) -> None:
        self.settings = settings  # replaced on SIGHUP (the daemon's reload), then schedule() again
        self.workspace = workspace
        self.store = store
        self.executor = executor
        self.engine = engine
        self.notifier = notifier
        self.on_engine_stopped = on_engine_stopped  # (why, the exit code the daemon ends with)
        self.restarts = RestartWindow()
        self.supervising = False  # False until the engine has been started (data prep before)
        self.startup_status = "starting"
        self._last_pass = time.time()
        self._flapping = False  # we paused the loop for flapping; cleared by the next restart
        self._resume_heard = 0  # the last /resume that started a flapping engine again (its command id)
        self._low_disk = False  # we alerted about disk; cleared when space is back
        self._engine_lock = threading.Lock()  # check_engine vs. the daemon's own start/stop
        self._report_trigger: CronTrigger | None = None  # set by schedule()
        self._tz: Any = None  # the scheduler's time zone, set by schedule()
        self._ledger_gone = False  # a check found the ledger removed; said once until it is back
        self._gone_lock = threading.Lock()
        self._unseen_logs: set[int] = set()  # runs whose removed log was said out of sight

    @property
    def limits(self) -> HeartbeatSettings:
        return self.settings.heartbeat

    # -- scheduling ------------------------------------------------------------------------------
    def schedule(self, scheduler: BaseScheduler) -> None:
        """Add (or, after a reload, replace) every job with the current limits."""
        every = self.limits.check_interval
        common = {"max_instances": 1, "coalesce": True, "replace_existing": True,
                  # a beat late by more than one interval is skipped: the next one comes soon
                  "misfire_grace_time": max(1, int(every))}
        beat = IntervalTrigger(seconds=every)
        scheduler.add_job(self.waiting_for_the_ledger, beat, args=[self.check_runs], id="check_runs", **common)
        scheduler.add_job(self.waiting_for_the_ledger, beat, args=[self.check_engine], id="check_engine", **common)
        scheduler.add_job(self.waiting_for_the_ledger, IntervalTrigger(seconds=max(every, 30.0)),
                          args=[self.check_host], id="check_host", next_run_time=_now_dt(), **common)
        if self.notifier.enabled:
            notify_every = min(every, self.notifier.watchdog_interval or every)
            # not waiting for the ledger: WATCHDOG=1 says this process is alive, with the ledger or without
            scheduler.add_job(self.notify, IntervalTrigger(seconds=notify_every), id="notify",
                              next_run_time=_now_dt(), **common)
        self._tz = scheduler.timezone
        if RunHours.parse(self.limits.hours) is not None:
            scheduler.add_job(self.waiting_for_the_ledger, IntervalTrigger(seconds=max(every, 30.0)),
                              args=[self.check_hours], id="check_hours", next_run_time=_now_dt(), **common)
        else:
            if scheduler.get_job("check_hours"):
                scheduler.remove_job("check_hours")
            self._release_hours()
        self._report_trigger = self._daily_trigger(scheduler)
        if self._report_trigger is not None:
            scheduler.add_job(self.waiting_for_the_ledger, self._report_trigger, args=[self.daily_report],
                              id="daily_report", **{**common, "misfire_grace_time": 3600})
            # a daemon that was down at the report time sends the one it missed, once
            scheduler.add_job(self.waiting_for_the_ledger, args=[self.missed_report], id="missed_report",
                              next_run_time=_now_dt(), **{**common, "misfire_grace_time": None})  # however late: once
        elif scheduler.get_job("daily_report"):
            scheduler.remove_job("daily_report")

    def waiting_for_the_ledger(self, check: Callable[[], object]) -> None:
        """A check as the scheduler runs it. Between an agent's `git clean -x` of the ledger and the
        engine writing it back, a scheduler thread that had not opened it yet cannot: said once, and
        the checks skip until it is back (a traceback at every beat said nothing more)."""
        try:
            check()
        except LedgerGone as exc:
            with self._gone_lock:
                if not self._ledger_gone:
                    log.warning("heartbeat: %s; the checks wait for the engine to write it back", exc)
                self._ledger_gone = True
                self._last_pass = time.time()  # waiting is this pass's work: it completed, it is not stuck
            return
        with self._gone_lock:
            if self._ledger_gone and self.store.file_id() is not None:
                self._ledger_gone = False
                log.info("heartbeat: the ledger is back; the checks go on")

    def _daily_trigger(self, scheduler: BaseScheduler) -> CronTrigger | None:
        if not self.limits.report_time:
            return None
        hour, minute = self.limits.report_time.split(":")
        # the scheduler's time zone (the machine's, or $TZ) for the job and for what was due alike
        return CronTrigger(hour=int(hour), minute=int(minute), timezone=scheduler.timezone)

    # -- runs ------------------------------------------------------------------------------------
    def check_runs(self) -> None:
        # Active from the start, engine or not: a run left over by a crashed daemon is bounded too.
        now = time.time()
        records = ledger.running_runs(self.store)
        handles = {r.id: RunHandle.from_json(r.handle) for r in records}
        # The engine may not have noticed an exit yet (it may be the frozen one); only a process
        # that is still running may be killed, or a finished run would be turned into a crash.
        statuses = self.executor.poll(list(handles.values())) if handles else {}
        for run in records:
            handle = handles[run.id]
            if statuses[handle.key].state != "running":
                continue
            reason = self._kill_reason(run, now)
            if reason is None:
                continue
            # The first reason wins (mark_kill); cancelling again on later beats is harmless and
            # finishes a kill that a crash of ours interrupted.
            if ledger.mark_kill(self.store, run.id, reason):
                log.warning("run %d (%s): %s; cancelling it", run.id, handle.key, reason)
            self.executor.cancel(handle, grace_s=RUN_CANCEL_GRACE_S)
        self._last_pass = time.time()

    def _kill_reason(self, run: ledger.RunRecord, now: float) -> str | None:
        # The clock starts when the command started (a cluster job may queue first; a requeued
        # one starts again), per run: every slot has its own limit.
        started = max(run.started_at, started_at(run.log_path) or 0.0)
        if now - started > self.limits.run_timeout:
            return f"timeout after {fmt_duration(self.limits.run_timeout)}"
        output = _log_stat(run)  # None: no log yet, silent since it started
        if output is None and RunHandle.from_json(run.handle).backend != "local":
            self._out_of_sight(run)
            return None
        if output is not None and output.st_size > self.limits.max_log_mb * MIB:
            return (f"its log passed {self.limits.max_log_mb:g} MB: the run printed too much (a print in its"
                    " training loop?); raise [heartbeat] max_log_mb if it must")
        if now - max(started, output.st_mtime if output else 0.0) > self.limits.stall_after:
            return f"stalled: no output for {fmt_duration(self.limits.stall_after)}"
        return None

    def _out_of_sight(self, run: ledger.RunRecord) -> None:
        """A running cluster job's log is there from its start: gone, it was removed (an agent's clean)
        and the job writes on on its node where we cannot look; its wrapper writes it back at the end.
        Not silence, so no stall is judged; said once per run."""
        if run.id not in self._unseen_logs:
            self._unseen_logs.add(run.id)
            log.warning("run %d: its log %s was removed; its output is out of sight until it ends, so only"
                        " run_timeout (%s) bounds it, not stall_after", run.id, run.log_path,
                        fmt_duration(self.limits.run_timeout))

    # -- engine ----------------------------------------------------------------------------------
    def check_engine(self) -> None:
        if not self.supervising:
            return
        with self._engine_lock:
            code = self.engine.poll()
            if code is not None:
                if code == 0 and self.store.get("engine.finished"):
                    log.info("engine finished (max experiments reached)")
                    self.supervising = False
                    self.on_engine_stopped("finished", 0)
                    return
                if code == EXIT_USER_ERROR:  # something to fix first: a restart would meet it again
                    self._stop_for_the_user()
                    return
                self._restart(exit_reason(code))
            else:
                age = self._tick_age(time.time())
                if age > self.limits.loop_stall_after:
                    self._restart(f"engine stalled: no progress for {fmt_duration(age)}")
        self._last_pass = time.time()

    def _stop_for_the_user(self) -> None:
        problem = self.store.get(USER_ERROR_KEY) or "see the daemon's log"
        text = f"nightlab stopped: {problem}"
        log.error("%s", text)
        try:
            self.store.emit("alert", text=text)
        except sqlite3.Error as exc:  # the ledger's disk is full: the log is all there is, stop anyway
            log.error("that could not be stored for chat (%s)", exc)
        self.supervising = False
        self.on_engine_stopped("a problem to fix first", EXIT_USER_ERROR)

    def start_engine(self) -> None:
        with self._engine_lock:
            self.engine.start()
            self.supervising = True

    def stop_engine(self) -> None:
        with self._engine_lock:
            self.supervising = False
            self.engine.stop(ENGINE_STOP_GRACE_S)

    def _resume_asked(self) -> bool:
        """A /resume waits for the engine: the owner has looked at the logs, as the self-pause asks,
        so the engine starts now rather than once the old restarts age out of the hour (once per
        /resume: one it dies before applying does not restart it at every beat)."""
        asked = [r.id for r in self.store.pending_commands() if r.name == Resume.name]
        if not asked or asked[-1] == self._resume_heard:
            return False
        self._resume_heard = asked[-1]
        log.info("a /resume is waiting: the engine starts again")
        return True

    def _restart(self, reason: str) -> None:
        if not self._flapping:  # while flapping this comes every beat; said once is enough
            log.warning("%s", reason)
        self.engine.stop(ENGINE_STOP_GRACE_S)
        now = time.time()
        if self.restarts.count(now) >= self.limits.max_restarts_per_hour and not self._resume_asked():
            # Flapping. Restarts resume on their own as old ones age out of the hour, so a
            # paused engine comes back to hear /resume; until then nothing runs.
            if not self._flapping:
                self._flapping = True
                text = (f"the engine needed {views.counted(self.restarts.count(now), 'restart')} within an hour"
                        f" (last: {reason}). Check the logs, then /resume.")
                self._pause(text)
                # one message: chats render it "⏸ the loop paused itself: …" (an alert beside it
                # said the same words a second time)
                self.store.emit("self_paused", reason=text)
                log.error("the loop is paused: %s", text)
            return
        self._flapping = False
        self.engine.start()
        count = self.restarts.add(now)
        self.store.emit("engine_restarted", restarts_last_hour=count, reason=reason)
        log.warning("engine restarted (%d in the last hour)", count)

    def last_tick(self) -> float:
        """When the engine last ticked (kv `engine.tick`, 0.0 before any did)."""
        return float(self.store.get("engine.tick", 0.0) or 0.0)

    def _tick_age(self, now: float) -> float:
        # A fresh engine has not ticked yet; its start counts as its first sign of life.
        return now - max(self.last_tick(), self.engine.started_at)

    def _paused(self) -> bool:
        return ledger.paused(self.store) is not None

    def _pause(self, reason: str) -> None:
        if not self._paused():  # an operator's pause (and its reason) stays as it is
            ledger.set_paused(self.store, "heartbeat", reason, None)

    # -- host ------------------------------------------------------------------------------------
    def check_host(self) -> None:
        low = {str(p): free_disk_gb(p) for p in watched_paths(self.settings, self.workspace).values()}
        low = {p: gb for p, gb in low.items() if gb < self.limits.min_free_disk_gb}
        if low and not self._low_disk:
            where = ", ".join(f"{p} has {gb:.1f} GB free" for p, gb in low.items())
            used = space_used(self.workspace, self.settings.cache_path)
            text = (f"low disk: {where} (minimum {self.limits.min_free_disk_gb:g} GB); the loop is"
                    " paused. Free some space, then /resume."
                    + (f" nightlab's files there: {used}" if used else ""))
            self._pause(text)
            self.store.emit("alert", text=text)
            log.error("%s", text)
        self._low_disk = bool(low)

    # -- run hours -------------------------------------------------------------------------------
    def check_hours(self, now: datetime | None = None) -> None:
        """At the end of `[heartbeat] hours` the loop pauses after the run in flight (the GPU is the
        owner's for the day); at their start it resumes if these hours paused it. Only the edges
        act, and the last side seen is kept in the store: an owner's /resume in the day, or /pause
        in the night, holds until the next edge, across restarts too."""
        hours = RunHours.parse(self.limits.hours)
        if hours is None:
            return
        local = (now or _now_dt()).astimezone(self._tz)
        inside = hours.contains(local.hour * 60 + local.minute)
        if self.store.get(HOURS_INSIDE_KEY) == inside:
            return
        self.store.set(HOURS_INSIDE_KEY, inside)
        pause, sender = ledger.paused(self.store), f"{HOURS_SENDER} {hours.text}"
        if not inside and pause is None:
            log.info("outside the run hours %s: the loop pauses after the run in flight", hours.text)
            self._steer(Pause(), sender)
        elif inside and pause is not None and pause.by.startswith(HOURS_SENDER):
            log.info("the run hours %s begin: the loop resumes", hours.text)
            self._steer(Resume(), sender)

    def _steer(self, command: Pause | Resume, sender: str) -> None:
        """Queue the hours' pause or resume; one that would change nothing (the same one still
        queued: the hours edited back and forth before the engine applied it) is a line, not a job error."""
        try:
            steering.queue(self.store, self.workspace, command, sender)
        except UserError as exc:
            log.info("%s: %s", sender, exc)

    def _release_hours(self) -> None:
        """Run hours taken out of the config (a reload or a restart) leave no pause of theirs behind."""
        self.store.delete(HOURS_INSIDE_KEY)
        pause = ledger.paused(self.store)
        if pause is not None and pause.by.startswith(HOURS_SENDER):
            log.info("no run hours in the config any more: the loop they paused resumes")
            self._steer(Resume(), "the config (no run hours)")

    # -- systemd ---------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """What WATCHDOG=1 vouches for: the supervision passes complete, and the engine is ticking
        (paused or not) or deliberately not running (not started yet, finished, or held back by
        the flapping protection, with the loop paused)."""
        if not self.supervising:
            return True
        now = time.time()
        if now - self._last_pass > 2 * self.limits.check_interval + SUPERVISION_SLACK_S:
            return False
        try:
            ticking = self._tick_age(now) <= self.limits.loop_stall_after
        except LedgerGone:  # its ticks are in the removed file; the engine is what writes it back
            ticking = True
        return self._flapping or (self.engine.running and ticking)

    def notify(self) -> None:
        text = self.startup_status
        if self.supervising and self.store.file_id() is None:  # removed under us: no workspace to `init`
            text = "the ledger was removed (an agent's `git clean -x`?); waiting for the engine to write it back"
        elif self.supervising:
            try:
                text = views.status_line(self.workspace)
            except Exception as exc:  # noqa: BLE001 - a broken status line must not silence the watchdog
                log.warning("status line unavailable: %r", exc)
                text = "running (status unavailable)"
        self.notifier.status(text, watchdog=self.healthy())

    # -- report ----------------------------------------------------------------------------------
    def report_due(self, now: datetime) -> datetime | None:
        """The latest report time at or before `now` (None without a daily report)."""
        if self._report_trigger is None:
            return None
        # the last of its times in the past day (26 hours: a day around a DST change has 25)
        due, fire = None, self._report_trigger.get_next_fire_time(None, now - timedelta(hours=26))
        while fire is not None and fire <= now:
            due, fire = fire, self._report_trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        return due

    def daily_report(self, now: datetime | None = None) -> bool:
        """The report at its time; not again when one already went out for this time (a daemon
        restarted within the minute, after sending it)."""
        now = now or _now_dt()
        due = self.report_due(now)
        last = self._last_report()
        if due is not None and last is not None and last >= due.timestamp():
            return False
        self._send_report(last, now)
        return True

    def missed_report(self, now: datetime | None = None) -> bool:
        """At start: the report the daemon was down for, if the last time passed without one and
        the loop had been at work by then (a first start after the report time sends nothing)."""
        now = now or _now_dt()
        due = self.report_due(now)
        if due is None:
            return False
        last = self._last_report()
        if last is None:
            first = ledger.experiments(self.store)[:1]
            if not first or first[0].finished_at >= due.timestamp():
                return False
        elif last >= due.timestamp():
            return False
        log.info("the daily report of %s was missed (the daemon was not running); sending it now",
                 due.strftime("%a %H:%M"))
        self._send_report(last, now)
        return True

    def _last_report(self) -> float | None:
        # a report sent by a nightlab before the key was kept: its event's time
        last = self.store.get(LAST_REPORT_KEY)
        return last if last is not None else self.store.last_event_time("report")

    def _send_report(self, last: float | None, now: datetime) -> None:
        report = write_report(self.workspace, self.store, self.settings.project, since=last)
        # recorded with the event: one report per time, whatever restarts follow
        with self.store.transaction():
            self.store.emit("report", markdown=report.markdown, text=report.text,
                            chart_path=str(report.chart_path) if report.chart_path else None)
            self.store.set(LAST_REPORT_KEY, now.timestamp())
        log.info("daily report written to %s", report.markdown_path)


def _log_stat(run: ledger.RunRecord) -> os.stat_result | None:
    """The run's log as it grows: at its path, or, removed under the run (an agent's `git clean -x`
    of .nightlab), the file a local run's wrapper still writes to (its stdout): a run training on
    is not silent, and is not killed as stalled."""
    try:
        return Path(run.log_path).stat()
    except OSError:
        pass
    handle = RunHandle.from_json(run.handle)
    try:
        return os.stat(f"/proc/{handle.pid}/fd/1") if handle.backend == "local" else None
    except OSError:
        return None


def exit_reason(code: int) -> str:
    """How the engine ended, for a chat: a signal by its name (-9 means nothing on a phone)."""
    if code >= 0:
        return f"engine exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    why = " (the out-of-memory killer, or kill -9)" if code == -signal.SIGKILL else ""
    return f"engine killed by {name}{why}"


def _now_dt() -> datetime:
    return datetime.now(UTC)


JOB_PROBLEMS = EVENT_JOB_ERROR | EVENT_JOB_MISSED


def log_job_problem(event: JobExecutionEvent) -> None:
    """Scheduler listener (mask JOB_PROBLEMS)."""
    # The scheduler keeps going after a failed job; the error is ours to report.
    if event.exception is not None:
        log.error("heartbeat job %s failed: %r\n%s", event.job_id, event.exception,
                  event.traceback or "")
    else:
        log.warning("heartbeat job %s missed its time (host suspended or overloaded?)", event.job_id)
