"""`nightlab run`: the daemon process that keeps one workspace's loop going with nobody awake.

What runs where
- This process holds the workspace lock, runs the chat channels (bot service, background
  thread) and an APScheduler BackgroundScheduler with the heartbeat jobs (jobs.py). The start's
  doctor findings are made in a thread of their own: the night does not wait for them.
- The engine runs as a CHILD PROCESS (`python -m nightlab.loop.engine`), not a thread: a thread
  cannot be killed, so an engine stuck in a blocking call could never be recovered; a process can
  be terminated or SIGKILLed and a new one resumes from the state store.
- Training runs are launched by the engine in their own process sessions (loop.executors). They
  are nobody's to kill by accident: stopping or restarting the engine or this daemon leaves a run
  running, and the next engine re-attaches to it (pid + create time in `runs.handle`). Only the
  heartbeat (run timeout, stall) and the engine (a user's /kill) cancel a run, through the executor.

Stopping
- SIGTERM/SIGINT: STOPPING=1, the scheduler stops, the bot stops (no more commands accepted), the
  engine gets SIGTERM (SIGKILL after a grace period), the lock is released, exit 0. All bounded:
  at most about BOT_STOP_TIMEOUT_S + ENGINE_STOP_GRACE_S (+ DOCTOR_JOIN_S in the seconds after a
  start, while the doctor's findings are still coming). The in-flight training run is LEFT
  RUNNING on purpose, to be re-attached by the next start (a restart costs no experiment). The
  systemd unit agrees: KillMode=process (service.py) makes `systemctl stop/restart` signal only
  this process, not the run's session that still lives in the service's cgroup. The stop, and
  the start (once the data is prepared, before the engine starts), are said in chat (lifecycle.py:
  a crash loop about hourly).
- `--max-experiments N`: the engine exits 0 with kv['engine.finished'] after N; the daemon then
  stops everything as above and exits 0.
- The engine exits 2 on a problem a person must fix (kv['engine.user_error'] says what): the
  daemon says it in chat and stops as above with exit 2 (the systemd unit does not restart on 2).
- SIGHUP: re-reads the config file and applies what is safe to change live: the [heartbeat]
  settings, here (the jobs are rescheduled) and in the engine (kv LIVE_HEARTBEAT_KEY, applied at
  its next checkpoint: run_timeout is also the checks' timeout and Slurm's --time); everything
  else that changed is logged as needing a restart. An edit of the file without a reload is
  logged once (it applies on a reload or a restart); the engine, restarted or not, runs with the
  config the daemon loaded (kv DAEMON_CONFIG_KEY), never with the file as it is now.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from nightlab.heartbeat import lifecycle
from nightlab.heartbeat.doctor import log_report
from nightlab.heartbeat.engine_child import (
    ENGINE_STOP_GRACE_S,
    EngineProcess,
    engine_argv,
    stop_leftover_engine,
)
from nightlab.heartbeat.health import left_data_dirs
from nightlab.heartbeat.jobs import JOB_PROBLEMS, Heartbeat, log_job_problem
from nightlab.heartbeat.lock import DaemonLock
from nightlab.heartbeat.logsetup import setup_logging
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.executors import make_executor
from nightlab.loop.state.config import (
    DAEMON_CONFIG_KEY,
    LIVE_HEARTBEAT_KEY,
    ConfigError,
    Secrets,
    Settings,
    changed_fields,
    environment_secrets,
    read_config_text,
    resolve_secrets,
    secret_env_names,
    settings_from_text,
)
from nightlab.loop.state.errors import EXIT_USER_ERROR, USER_ERROR_KEY, UserError
from nightlab.loop.state.store import Store

if TYPE_CHECKING:  # imported when channels are on: the bot pulls in the HTTP clients
    from nightlab.bot.service import BotService

log = logging.getLogger("nightlab.daemon")

BOT_STOP_TIMEOUT_S = 10.0
DOCTOR_JOIN_S = 10.0  # a stop waits this long at most for the start's doctor findings
SETTLE_S = 0.5  # how often the main thread looks for signals' requests and an edit of the config (a small file)


@dataclass(frozen=True)
class DaemonOptions:
    max_experiments: int | None = None
    engine_program: Sequence[str] | None = None  # replaces `python -m nightlab.loop.engine` (tests)
    prepare: bool = True  # create the workspace and prepare data when missing
    channels: bool = True  # run the bot service (Telegram / Slack / console)


def run_daemon(settings: Settings, max_experiments: int | None = None) -> int:
    return Daemon(settings, DaemonOptions(max_experiments=max_experiments)).run()


class Daemon:
    def __init__(self, settings: Settings, options: DaemonOptions) -> None:
        config = Path(settings.origin)
        if not config.is_file():
            # The engine child reads the same file; there is nothing to hand it otherwise.
            raise UserError(f"the daemon needs a configuration file, got {settings.origin!r}")
        self.settings = settings
        self.options = options
        self.config = config.resolve()
        # the text these settings came from (read again: Settings keeps no text), for the engine
        self._config_text = read_config_text(self.config)
        self._config_seen = self._config_text  # as last loaded (start, SIGHUP): an edit since is said
        self.workspace = settings.workspace_path
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._why = ""
        self._exit_code = 0  # EXIT_USER_ERROR when the engine stopped on something to fix
        self._bot: BotService | None = None
        self._prepared_data: Path | None = None  # the built-in trainer's data dir, once prepared

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> int:
        secrets = resolve_secrets(self.settings)  # a missing token fails here, before anything starts
        setup_logging([*secrets.values(), *environment_secrets()])
        notifier = Notifier.from_environ()
        self.workspace.mkdir(parents=True, exist_ok=True)  # `--workspace PATH` creates it
        with DaemonLock(self.workspace) as lock:
            log.info("nightlab daemon (pid %d) for %s, config %s", os.getpid(), self.workspace, self.config)
            # `nightlab doctor`'s findings in the log; a night starts either way, so it does not wait
            # for them (the torch probe alone takes ~2 s, a slow chat API up to its timeout)
            doctor = threading.Thread(target=log_report, args=(self.settings,), name="doctor", daemon=True)
            doctor.start()
            # following its path: after an agent removed the ledger, the engine writes it back and stops;
            # this stop, and what the bot sends meanwhile, belong in that file, which the next start reads
            store = Store.for_workspace(self.workspace, follow=True)
            store.check()  # a damaged ledger said now, not by a night of engine restarts
            store.delete(USER_ERROR_KEY)  # what stopped an earlier engine is not this one's problem
            store.set(LIVE_HEARTBEAT_KEY, dataclasses.asdict(self.settings.heartbeat))  # what the engine follows
            store.set(DAEMON_CONFIG_KEY, {"path": str(self.config), "text": self._config_text})
            start = lifecycle.begin(store, time.time())  # what this start found, said in chat once up
            # the chat tokens' variables stay in this process: an edited train.py or an agent cannot
            # print them from its environment; the engine gets the values on stdin, to star them out
            # where one that read them here (/proc/<pid>/environ) writes them back
            hidden = secret_env_names(self.settings)
            engine = EngineProcess(self._engine_argv(), {k: v for k, v in os.environ.items() if k not in hidden},
                                   handed=secrets.values())
            heartbeat = Heartbeat(self.settings, self.workspace, store, make_executor(self.settings),
                                  engine, notifier, on_engine_stopped=self._engine_stopped)
            scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True})
            scheduler.add_listener(log_job_problem, JOB_PROBLEMS)
            self._install_signals()
            scheduler.start()
            heartbeat.schedule(scheduler)
            notifier.ready("starting")
            error: BaseException | None = None
            try:
                self._serve(heartbeat, scheduler, secrets, lock, start)
            except BaseException as exc:
                error = exc
                raise
            finally:
                notifier.stopping(f"stopping ({self._why or 'error'})")
                scheduler.shutdown(wait=False)
                heartbeat.stop_engine()  # first, so the engine's last events reach the bot's drain
                self._say_stopped(store, error)  # before the bot's drain, which sends it
                if self._bot is not None:
                    self._bot.stop(timeout=BOT_STOP_TIMEOUT_S)
                # a stop seconds after the start: the findings still reach the log, the probe is not left behind
                doctor.join(DOCTOR_JOIN_S)
                store.close()
                log.info("nightlab daemon stopped (%s)", self._why or "error")
        return self._exit_code

    def _serve(self, heartbeat: Heartbeat, scheduler: BackgroundScheduler, secrets: Secrets, lock: DaemonLock,
               start: lifecycle.Start) -> None:
        if self.options.prepare:
            self._init_workspace(heartbeat)
        if self.options.channels:
            from nightlab.bot.service import BotService

            self._bot = BotService(self.settings, secrets, self.workspace)
            self._bot.start()
        if self.options.prepare and not self._prepare_data(heartbeat):
            return  # asked to stop while preparing
        heartbeat.engine.argv = self._engine_argv()  # with the data dir just prepared
        if self._stop.is_set():
            return
        stop_leftover_engine(self.workspace, ENGINE_STOP_GRACE_S)
        # said before the engine starts, so before anything it says: said once it ticked, up to a
        # poll later, it came after an experiment the engine had started meanwhile
        lifecycle.say_started(heartbeat.store, start, time.time())
        heartbeat.start_engine()
        while not self._stop.wait(SETTLE_S):
            self._keep(lock)
            if self._reload.is_set():
                self._reload.clear()
                self.reload(heartbeat, scheduler)
            self._notice_edit()

    def _keep(self, lock: DaemonLock) -> None:
        """The lock file put back if removed; one who took the workspace meanwhile is not shared with."""
        other = lock.keep()
        if other is not None:
            log.error("another nightlab (pid %s) took %s while its lock file was removed; this one stops",
                      other, self.workspace)
            self.request_stop("another nightlab took the workspace")

    def _say_stopped(self, store: Store, error: BaseException | None) -> None:
        why = self._why or (str(error) if isinstance(error, UserError)
                            else f"an error, see the daemon's log: {error!r}")
        try:
            # a UserError (bad data, say) is not restarted: as much a stop asked for as a signal
            lifecycle.say_stopped(store, lifecycle.why_stopped(why), asked=error is None or isinstance(error, UserError),
                                  now=time.time(),
                                  heard=self._exit_code == EXIT_USER_ERROR)  # its alert said why
        except sqlite3.Error as exc:  # the ledger's disk is full: the log is all there is
            log.error("the stop could not be stored for chat (%s)", exc)

    def _notice_edit(self) -> None:
        """Say once per edit that the file is not what is in force: nothing reads it by itself."""
        try:
            text = read_config_text(self.config)
        except ConfigError:
            return  # gone or unreadable for a moment (an editor saving it); a reload would say why
        if text != self._config_seen:
            self._config_seen = text
            log.warning("%s was edited; it applies on `systemctl reload nightlab` (SIGHUP: [heartbeat] at once,"
                        " then says what needs a restart) or a restart, not before", self.config)

    def _engine_argv(self) -> list[str]:
        # the data dir once prepared: the engine uses it as it is, not preparing it again
        return engine_argv(self.config, self.workspace, self.options.max_experiments,
                           self.options.engine_program, self._prepared_data)

    def _engine_stopped(self, why: str, code: int) -> None:
        self._exit_code = code
        self.request_stop(why)

    def request_stop(self, why: str) -> None:
        if not self._stop.is_set():
            self._why = why
            log.info("stopping: %s", why)
            self._stop.set()

    # -- preparation -----------------------------------------------------------------------------
    def _init_workspace(self, heartbeat: Heartbeat) -> None:
        from nightlab.loop.workspace import init_workspace

        heartbeat.startup_status = "creating the workspace"
        init_workspace(self.workspace, tag="", settings=self.settings, say=_say)

    def _prepare_data(self, heartbeat: Heartbeat) -> bool:
        """Shards + tokenizer for the built-in trainer (idempotent: quick when all is there), then
        the FA3 kernel on a Hopper box, so no run downloads.

        It runs in a thread so SIGTERM is honoured at once even in the middle of a download;
        prepare() keeps what is complete and validates the rest next time. Returns False when
        stopped first; the data dir is left in `_prepared_data`.
        """
        if self.settings.project.run_command:
            return True  # a custom project brings its own data
        from nightlab.loop.kernel_prefetch import prefetch_fa3
        from nightlab.trainer import prepare

        failure: list[BaseException] = []

        def progress(line: str) -> None:
            heartbeat.startup_status = f"preparing data: {line}"
            _say(line)

        def work() -> None:
            try:
                self._prepared_data = prepare.prepare(self.settings.data_source, self.settings.data.shards,
                                                      self.settings.cache_path, progress)
                for line in left_data_dirs(self._prepared_data):  # a source moved by editing the config
                    _say(line)
                heartbeat.startup_status = "fetching the FA3 kernel (Hopper GPUs only)"
                _say(prefetch_fa3().line)  # never raises: offline, the runs fall back
            except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
                failure.append(exc)

        worker = threading.Thread(target=work, name="prepare", daemon=True)
        worker.start()
        while worker.is_alive():
            if self._stop.wait(SETTLE_S):
                return False
        if failure:
            exc = failure[0]
            raise UserError(str(exc)) if isinstance(exc, prepare.PrepareError) else exc
        return True

    # -- signals ---------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def reload(self, heartbeat: Heartbeat, scheduler: BackgroundScheduler) -> None:
        try:
            text = read_config_text(self.config)
            self._config_seen = text  # this reload says what it makes of it
            new = settings_from_text(text, str(self.config))
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        old = heartbeat.settings
        changed = changed_fields(old.heartbeat, new.heartbeat, "heartbeat")
        heartbeat.settings = dataclasses.replace(old, heartbeat=new.heartbeat)
        heartbeat.schedule(scheduler)
        # the engine applies them at its next checkpoint (the checks' timeout, Slurm's --time)
        heartbeat.store.set(LIVE_HEARTBEAT_KEY, dataclasses.asdict(new.heartbeat))
        needs_restart = [
            f.name for f in dataclasses.fields(Settings)
            if f.name not in ("heartbeat", "origin", "workspace")
            and getattr(old, f.name) != getattr(new, f.name)
        ]
        log.info("SIGHUP: reloaded %s", (", ".join(changed) + " (here and in the engine)") if changed
                 else "nothing (no live setting changed)")
        if needs_restart:
            log.warning("SIGHUP: changed but only applied after a restart: [%s]", "], [".join(needs_restart))


def _say(line: str) -> None:
    log.info("%s", line)
