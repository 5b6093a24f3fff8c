"""The product end to end: one night, the way an owner would live it, on a 2-core CPU box.

`nightlab run` (the real CLI, a subprocess) with both chat channels pointed at the fake Telegram
and the fake Slack, the search proposer and the built-in trainer (tiny profile, stdlib corpus),
through 7 experiments. Along the way:
- the operator sends /status, /focus attention, /note, /pause, /resume, /focus optimizer, and a
  final /pause in the morning, half of it over Telegram and half over Slack;
- a stranger sends /kill (Telegram, privately: refused with a message; Slack, in the channel:
  ignored) and nothing happens to the run;
- the trainer hangs once (silent, with a child process: the heartbeat's stall check must kill
  the tree) and crashes once (tests/fakes/flaky_train.py picks the invocations);
- the daemon is SIGKILLed once while a run is in flight, and started again: the run must be
  re-attached, not restarted.
The runs the test steers (the baseline, the one the daemon dies during, the two paused) wait on a
gate (flaky_train.py's --hold) that the test opens once its command was answered and applied: a
real tiny run takes a few seconds, a chat round trip about one, and on a loaded box the run could
otherwise end first.
Then every invariant of tests/e2e/invariants.py must hold, and each step above must have left
its trace (a refusal, a stall reason, a note delivered to a proposal, ...).

The run command wraps the built-in trainer: `nightlab init` with the tiny profile writes
train.py/prepare.py and the profile's environment; the night's config then names a run command
(the wrapper), so the daemon neither prepares data nor sets NIGHTLAB_DATA_DIR, and the command
sets it itself along with a 2-step budget (a variable set on the command line wins over the
profile's, which the executor exports).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from nightlab.loop.executors import RunHandle
from nightlab.loop.state import ledger
from nightlab.loop.state.store import Store

from tests.e2e import invariants as inv
from tests.fakes.loop_workspace import Gates
from tests.fakes.slack_server import FakeSlack
from tests.fakes.tagged import tagged
from tests.fakes.telegram_server import FakeTelegram
from tests.waiting import wait_until

FAKES = Path(__file__).resolve().parents[1] / "fakes"
OPERATOR, STRANGER, CHAT = 111, 666, -1001
SLACK_OPERATOR, SLACK_STRANGER, CHANNEL = "UOP", "USTRANGER", "CLAB"
EXPERIMENTS = 7  # the fewest the story below needs: the morning's pause comes during the last one
HANG, CRASH, KILL_DURING = 3, 5, 4  # trainer invocations: the n-th run the loop launches
LAST = EXPERIMENTS  # the last experiment's run: one run per experiment, as runs_once checks
HELD = (1, KILL_DURING, CRASH + 1, LAST)  # the runs that wait on the test's gate
STALL_AFTER = 15  # longer than any silence of a real tiny run on a loaded 2-core box


def _nightlab() -> list[str]:
    script = Path(sys.executable).with_name("nightlab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nightlab.heartbeat.cli"]


class Night:
    """The test's handles on one night: the fakes, the store, the daemon and its log."""

    def __init__(self, tmp: Path, tg: FakeTelegram, slack: FakeSlack, config: Path, counter: Path) -> None:
        self.tmp, self.tg, self.slack, self.config, self.counter = tmp, tg, slack, config, counter
        self.ws = tmp / "ws"
        self.log = tmp / "daemon.log"
        self.store = Store.for_workspace(self.ws)
        self.gates = Gates(tmp / "gates")
        self.daemon: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "NIGHTLAB_TELEGRAM_TOKEN": tg.token,
                    "NIGHTLAB_SLACK_BOT_TOKEN": slack.bot_token, "NIGHTLAB_SLACK_APP_TOKEN": slack.app_token}

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.daemon = subprocess.Popen([*_nightlab(), "run", "--config", str(self.config)],
                                           stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        def died() -> str | None:
            code = self.daemon.poll() if self.daemon is not None else None
            return None if code is None else f"the daemon exited with code {code}"

        try:
            return wait_until(predicate, what, timeout, every=0.1, abort=died)
        except AssertionError as exc:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(f"{exc}\n{tail}") from None

    def ticks(self, count: int = 2) -> None:
        """Wait for `count` more engine checkpoints: each applies the queued commands, then the
        loop decides what to start; after two it has done both at least once since the call."""
        for _ in range(count):
            tick = self.store.get("engine.tick")
            self.wait(lambda: self.store.get("engine.tick") != tick, "the engine's next checkpoint")

    # -- what the loop is doing -------------------------------------------------------------
    def invocations(self) -> int:
        try:
            return int(self.counter.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def running(self, invocation: int) -> ledger.RunRecord | None:
        """The run in flight, once the trainer's `invocation`-th start is the one running."""
        runs = ledger.running_runs(self.store)
        return runs[-1] if runs and self.invocations() == invocation else None

    def recorded(self) -> list[ledger.Experiment]:
        return ledger.experiments(self.store)

    def number_of(self, run: ledger.RunRecord) -> int:
        return ledger.get_candidate(self.store, run.candidate_id).number

    def paused_after(self, number: int) -> bool:
        """The engine applied a pause that waits for #number (not just queued it)."""
        return any(e.kind == "paused" and e.payload.get("after") == number
                   for e in self.store.events_after(0, 100_000))

    # -- chats --------------------------------------------------------------------------------
    def telegram(self, text: str, expect: str, user: int = OPERATOR) -> str:
        before = len(self.tg.messages(user))
        self.tg.inject(text, user)
        replies = self.wait(lambda: [m.text for m in self.tg.messages(user)[before:] if expect in m.text],
                            f"a Telegram reply to {text!r} containing {expect!r}", timeout=20)
        return replies[0]

    def slack_command(self, text: str, expect: str) -> str:
        before = len(self.channel_posts())
        envelope = self.slack.slash_command(text, SLACK_OPERATOR, CHANNEL)
        assert self.slack.acked(envelope)
        replies = self.wait(lambda: [t for t in self.channel_posts()[before:] if expect in t],
                            f"a Slack reply to {text!r} containing {expect!r}", timeout=20)
        return replies[0]

    def channel_posts(self) -> list[str]:
        return [p.text for p in self.slack.posts if p.channel == CHANNEL]

    def group_messages(self) -> list[str]:
        return [m.text for m in self.tg.messages(CHAT)]

    @staticmethod
    def digest(texts: list[str], number: int) -> str:
        return next(t for t in texts if (m := inv.DIGEST.search(t)) and int(m.group(1)) == number)

    def outbox_idle(self) -> bool:
        """Every event read by both channels, and nothing waiting to be sent."""
        db = self.store.connection()
        try:
            waiting = db.execute("SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'batched')").fetchone()[0]
        except Exception:  # noqa: BLE001 - the bot has not created its table yet
            return False
        cursors = [json.loads(r[0]) for r in db.execute("SELECT value FROM kv WHERE key LIKE 'bot.cursor.%'")]
        return waiting == 0 and len(cursors) == 2 and all(c == self.store.last_event_id() for c in cursors)


def _configs(tmp: Path, cache: Path, data: Path, tg: FakeTelegram, slack: FakeSlack) -> tuple[Path, Path, Path]:
    ws, counter, pidfile, gates = tmp / "ws", tmp / "invocations", tmp / "hung.pids", tmp / "gates"
    common = (f"[workspace]\npath = {json.dumps(str(ws))}\ntag = \"night\"\n"
              f"[data]\nsource = \"stdlib\"\ncache_dir = {json.dumps(str(cache))}\n"
              "[trainer]\nprofile = \"tiny\"\n")
    init = tmp / "init.toml"
    init.write_text(common)
    py, q = sys.executable, shlex.quote
    command = (f"NIGHTLAB_DATA_DIR={q(str(data))} NIGHTLAB_BUDGET_STEPS=2 NIGHTLAB_EVAL_TOKENS=2048"
               f" {q(py)} {q(str(FAKES / 'flaky_train.py'))} --counter {q(str(counter))} --hang {HANG}"
               f" --crash {CRASH} --pidfile {q(str(pidfile))} --gates {q(str(gates))}"
               f"{''.join(f' --hold {n}' for n in HELD)} -- {q(py)} prepare.py run")
    night = tmp / "night.toml"
    night.write_text(common + f"""\
[project]
run_command = {json.dumps(command)}
[loop]
checkpoint_interval = 0.2
[heartbeat]
check_interval = 0.5
run_timeout = 120.0
stall_after = {float(STALL_AFTER)}
loop_stall_after = 60.0
min_free_disk_gb = 0.0
report_time = ""
[telegram]
token = {{ env = "NIGHTLAB_TELEGRAM_TOKEN" }}
operators = [{OPERATOR}]
chats = [{CHAT}]
api_base = {json.dumps(tg.url)}
[slack]
bot_token = {{ env = "NIGHTLAB_SLACK_BOT_TOKEN" }}
app_token = {{ env = "NIGHTLAB_SLACK_APP_TOKEN" }}
operators = [{json.dumps(SLACK_OPERATOR)}]
channels = [{json.dumps(CHANNEL)}]
api_base = {json.dumps(slack.api_url)}
""")
    return init, night, counter


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_night_with_chats_a_hang_a_crash_and_a_sigkill(tmp_path: Path, stdlib_data: tuple[Path, Path]) -> None:
    cache, data = stdlib_data
    with FakeTelegram() as tg, FakeSlack() as slack:
        init, config, counter = _configs(tmp_path, cache, data, tg, slack)
        done = subprocess.run([*_nightlab(), "init", str(tmp_path / "ws"), "--tag", "night", "--config", str(init)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        night = Night(tmp_path, tg, slack, config, counter)
        try:
            _the_night(night)
        finally:
            if night.daemon is not None and night.daemon.poll() is None:
                night.daemon.kill()
                night.daemon.wait(10)
            for proc in tagged(str(tmp_path / "hung.pids")):  # never leave a stray process behind, pass or fail
                _kill_quietly(proc.pid)
        _the_morning(night)


def _the_night(n: Night) -> None:
    n.start()
    first = n.daemon
    assert first is not None
    n.wait(lambda: n.slack.connected(0.1) and "getUpdates" in n.tg.methods, "both channels connected")

    # The baseline runs: the operator asks what is going on; a stranger tries to kill it.
    base = n.wait(lambda: n.running(1), "the baseline run")
    status = n.telegram("/status", "nightlab · autoresearch/night")
    assert "now: #1 baseline running" in status and "profile tiny" in status
    refusal = n.telegram("/kill", "Not authorised", user=STRANGER)
    assert f"your id: {STRANGER}" in refusal
    n.slack.acked(n.slack.slash_command("kill", SLACK_STRANGER, CHANNEL))  # in a channel: silence
    n.wait(lambda: f"refused slack:{SLACK_STRANGER}" in n.log.read_text(errors="replace"), "the Slack refusal")
    n.ticks()  # a kill that got through would have been applied by now
    assert ledger.get_run(n.store, base.id).kill_reason is None
    n.gates.open(1)

    # #2: steer it, over both channels.
    n.wait(lambda: n.running(2), "the second run", timeout=120)
    assert "focusing on attention from the next proposal" in n.slack_command("focus attention", "focusing")
    assert "note queued" in n.telegram("/note try a sliding window pattern with more short layers", "note queued")

    # The hang (invocation 3) is killed by the heartbeat only: nothing else would ever end it.
    hung = n.wait(lambda: n.running(HANG), "the run that hangs", timeout=120)
    stalled = n.wait(lambda: [e for e in n.recorded() if e.reason.startswith("stalled")],
                     "the heartbeat to kill the hung run", timeout=STALL_AFTER + 60)
    assert stalled[0].number == n.number_of(hung) and stalled[0].status == "crash"

    # SIGKILL the daemon while a run is in flight and its log is growing.
    victim = n.wait(lambda: n.running(KILL_DURING), "the run during which the daemon dies", timeout=120)
    n.wait(lambda: Path(victim.log_path).stat().st_size > 0 and n.outbox_idle(), "output in its log, an idle outbox")
    engine_pid = n.store.get("engine.pid")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    handle = RunHandle.from_json(victim.handle)
    assert psutil.pid_exists(handle.pid), "the run died with the daemon"
    n.start()  # the same command again, as systemd's Restart= would
    n.wait(lambda: not psutil.pid_exists(engine_pid) or psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE,
           "the old engine to go")
    n.gates.open(KILL_DURING)  # in flight across the restart: the new daemon must re-attach it
    n.wait(lambda: any(e.number == n.number_of(victim) for e in n.recorded()), "the re-attached run to be recorded",
           timeout=120)

    # The crash (invocation 5), then a pause over Telegram and a resume over Slack.
    n.wait(lambda: n.invocations() > CRASH or any("exit code 1" in e.reason for e in n.recorded()),
           "the crash", timeout=120)
    pausing = n.wait(lambda: n.running(CRASH + 1), "the run after the crash", timeout=120)
    number = n.number_of(pausing)
    assert f"pausing after #{number} finishes" in n.telegram("/pause", "pausing")
    n.wait(lambda: n.paused_after(number), f"the pause after #{number} to be applied")
    n.gates.open(CRASH + 1)
    n.wait(lambda: any(e.number == number for e in n.recorded()), f"#{number} to finish", timeout=120)
    n.ticks()  # a paused loop starts nothing
    assert not ledger.running_runs(n.store) and n.invocations() == CRASH + 1
    assert "paused by telegram:111" in n.telegram("/status", "paused by")
    assert "focusing on optimizer" in n.telegram("/focus optimizer", "focusing")
    assert "resuming" in n.slack_command("resume", "resuming")

    # The morning: the operator pauses during the last experiment and stops the service once
    # every digest is out (a clean SIGTERM; nothing is left in flight).
    last = n.wait(lambda: len(n.recorded()) == EXPERIMENTS - 1 and n.running(LAST), "the last experiment",
                  timeout=150)
    assert f"pausing after #{n.number_of(last)} finishes" in n.telegram("/pause", "pausing")
    n.wait(lambda: n.paused_after(n.number_of(last)), "the morning's pause to be applied")
    n.gates.open(LAST)
    n.wait(lambda: len(n.recorded()) == EXPERIMENTS and not ledger.running_runs(n.store), "the last result",
           timeout=120)
    n.wait(lambda: n.outbox_idle(), "every message to go out")
    assert n.daemon is not None
    n.daemon.send_signal(signal.SIGTERM)
    assert n.daemon.wait(40) == 0
    assert ledger.get_run(n.store, last.id).state == "exited"


def _the_morning(n: Night) -> None:
    store = n.store
    rows = n.recorded()
    checks = [
        inv.ledger_once(store, EXPERIMENTS),
        inv.exports_agree(n.ws, store),
        inv.git_at_best(n.ws, store),
        inv.runs_once(store, n.invocations()),
        inv.no_orphans([n.ws, n.tmp]),
        inv.digests_in_order({"telegram": n.group_messages(), "slack": n.channel_posts()}, EXPERIMENTS),
        inv.outbox_exact(store, {("telegram", str(CHAT)): n.group_messages(),
                                 ("slack", CHANNEL): n.channel_posts()}),
        inv.commands_once(store),
    ]
    assert all(c.ok for c in checks), "\n".join(str(c) for c in checks if not c.ok)

    by_status = {s: [e.number for e in rows if e.status == s] for s in ("keep", "discard", "crash")}
    assert rows[0].kind == "baseline" and rows[0].status == "keep" and rows[0].metric is not None
    # The hang: killed by the stall check, its whole tree gone, reported with the reason.
    (hang,) = [e for e in rows if e.reason.startswith("stalled")]
    assert hang.reason == f"stalled: no output for 0m{STALL_AFTER}s"
    assert "stalled" in n.digest(n.group_messages(), hang.number)
    assert (n.tmp / "hung.pids").exists() and not tagged(str(n.tmp / "hung.pids"))
    # The crash: its digest carries the traceback's last lines.
    (crash,) = [e for e in rows if e.reason == "exit code 1"]
    assert "injected crash" in n.digest(n.group_messages(), crash.number)
    assert "injected crash" in n.digest(n.channel_posts(), crash.number)
    assert set(by_status["crash"]) == {hang.number, crash.number}, by_status
    # Real training happened: every other run produced a finite val_bpb from the tiny model.
    assert all(e.metric is not None and 0 < e.metric < 20 for e in rows if e.status != "crash")
    # Focus: proposals made after it are in the area asked for; the note reached a proposal.
    focused = [e for e in rows if e.focus == "attention" and e.kind == "proposal"]
    # tiny's DEPTH 2 leaves one attention model to try ('L'): past it the focus widens, saying so
    assert focused and focused[0].area == "attention"
    assert all(e.area == "attention" or "widened: focus 'attention'" in e.hypothesis for e in focused), focused
    # (a proposal's: a re-measure of a new best, which may be all that runs after it, has none)
    optimizer = [e for e in rows if e.focus == "optimizer"]
    assert optimizer and all(e.area == "optimizer" for e in optimizer if e.kind == "proposal"), [
        (e.number, e.kind, e.status, e.area, e.focus, e.description) for e in rows]
    notes = store.connection().execute("SELECT result FROM commands WHERE name = 'note'").fetchall()
    assert [r[0] for r in notes] and notes[0][0].startswith("delivered with #")
    # The stranger changed nothing: no kill was queued, and only the hung run was ever killed.
    assert not store.connection().execute("SELECT 1 FROM commands WHERE name = 'kill'").fetchall()
    assert not any("Not authorised" in t for t in n.channel_posts())
    killed = store.connection().execute("SELECT kill_reason FROM runs WHERE kill_reason IS NOT NULL").fetchall()
    assert [r[0] for r in killed] == [hang.reason]
    # Pause held: nothing started between the pause taking effect and the resume.
    events = store.events_after(0, 100_000)
    paused_at = next(e.ts for e in events if e.kind == "paused")
    resumed_at = next(e.ts for e in events if e.kind == "resumed")
    pause_waited_for = next(e.payload["after"] for e in events if e.kind == "paused")
    finished_at = next(e.ts for e in events if e.kind == "experiment_finished" and e.payload["number"] == pause_waited_for)
    assert paused_at < finished_at < resumed_at
    assert not [e for e in events if e.kind == "experiment_started" and finished_at < e.ts < resumed_at]
    # The re-attached run: one run row for it, and the trainer started once per run.
    assert n.invocations() == store.connection().execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert not any(e.kind == "engine_restarted" for e in events)  # the restart was the daemon's, cleanly


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
