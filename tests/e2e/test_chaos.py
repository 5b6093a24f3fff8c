"""Chaos: the whole service is SIGKILLed at one point of a cycle, started again, and must end as
if nothing had happened.

Each scenario is a real daemon (APScheduler heartbeat, the bot with the fake Telegram and the
fake Slack, the durable outbox) whose engine is tests/fakes/engine_main.py: the real engine with
the scripted proposer and the stub trainer, SIGKILLing the daemon and its own process group at
exactly one named point of experiment N's cycle (in-process hooks, so a point that lasts
microseconds is hit every time). "While sending" is different: the fake Telegram holds the
digest of #2 and the test SIGKILLs the daemon while that request is in flight. Then a fresh
daemon (no kill) runs the session to its end (3 experiments) and every invariant in
tests/e2e/invariants.py is checked. The table of points x invariants is printed at the end of
the pytest run (tests/e2e/chaos_table.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nightlab.loop.state import ledger
from nightlab.loop.state.steering import send_command
from nightlab.loop.state.store import Store

from tests.e2e import chaos_table
from tests.e2e import invariants as inv
from tests.fakes.daemon_config import write_daemon_config
from tests.fakes.loop_workspace import Gates, make_stub_workspace
from tests.fakes.slack_server import FakeSlack
from tests.fakes.telegram_server import FakeTelegram
from tests.waiting import wait_until

FAKES = Path(__file__).resolve().parents[1] / "fakes"
EXPERIMENTS = 3  # the baseline (#1, keep), #2 keep, #3 discard: a keep and a reset in every session
STEPS = [
    {"set": {"VAL_BPB": [0.9], "SLEEP": 0.4}},
    {"set": {"VAL_BPB": [0.95], "SLEEP": 0.2}},
]
OPERATOR = 111

# (point, experiment, what it interrupts); the kill hooks are documented in engine_main.py.
POINTS = [
    ("proposing", 2, "while proposing (the proposer has not edited yet)"),
    ("proposed", 2, "while proposing (tree edited, nothing committed)"),
    ("git_committed", 2, "after the commit, before the phase says so"),
    ("committed", 2, "after the commit, before the launch"),
    ("launched", 2, "right after launch, before the run is recorded"),
    ("running", 2, "right after the run is recorded"),
    ("polled", 2, "while running (output already in the log)"),
    ("exited", 2, "after the exit, before the ledger write"),
    ("finished", 3, "verdict stored, before keep/reset"),
    ("resetting", 3, "while resetting (reset --hard done, clean not)"),
    ("git_lock", 3, "while resetting, git dies holding index.lock"),
    ("recorded", 2, "right after the ledger write"),
    ("exported", 2, "after the exports, before the phase is done"),
    ("steering", 0, "a /note applied, not yet marked done"),
    ("sending", 2, "while the bot sends #2 (request not yet accepted)"),
    ("reply_lost", 2, "while the bot sends #2 (accepted, reply late)"),
]


@pytest.fixture(scope="module")
def chats() -> Iterator[tuple[FakeTelegram, FakeSlack]]:
    with FakeTelegram() as tg, FakeSlack() as slack:
        yield tg, slack


def _daemon(config: Path, ws: Path, log: Path, engine: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(FAKES / "daemon_main.py"), str(config), str(ws),
            "--max-experiments", str(EXPERIMENTS), "--channels", "--", *engine]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _finish(proc: subprocess.Popen[bytes], store: Store, since: int, timeout: float) -> int | None:
    """The restarted daemon's exit code; fails fast when it had to restart its engine (a restart
    that cannot recover: the heartbeat would retry and then pause, and the night is lost)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        trouble = [e for e in store.events_after(since) if e.kind in ("engine_restarted", "alert")]
        if trouble:
            raise AssertionError(f"after the restart the engine failed again: {trouble[0].payload.get('reason')}")
        time.sleep(0.2)
    return proc.poll()


def _slack_done(slack: FakeSlack, channel: str, number: int, ws: Path) -> bool:
    """Slack has the digest of #number and the outbox has nothing for Slack in flight."""
    if not any(f"#{number} keep · " in p.text for p in slack.posts if p.channel == channel):
        return False
    db = Store.for_workspace(ws).connection()
    return db.execute("SELECT COUNT(*) FROM outbox WHERE channel = 'slack' AND status = 'pending'").fetchone()[0] == 0


def run_scenario(tmp: Path, point: str, number: int, tg: FakeTelegram, slack: FakeSlack, index: int) -> list[inv.Check]:
    settings = make_stub_workspace(tmp)
    ws = settings.workspace_path
    chat, channel = -(2000 + index), f"CCHAOS{index}"
    config = write_daemon_config(
        tmp / "nightlab.toml", ws, telegram=(tg, OPERATOR, chat), slack=(slack, "UOP", channel),
        loop={"checkpoint_interval": 0.1},
        heartbeat={"check_interval": 0.3, "run_timeout": 60.0, "stall_after": 60.0, "loop_stall_after": 60.0,
                   "min_free_disk_gb": 0.0, "report_time": ""},
    )
    steps = tmp / "steps.json"
    steps.write_text(json.dumps(STEPS))
    sending = point in ("sending", "reply_lost")
    # While sending, #3's run ends only once the daemon is dead: no other digest is on its way at
    # the kill (it had 2 s of training for that, which a loaded box could spend before the kill).
    # At `polled`, #2's run waits likewise: a poll must find it running (a loaded box could let it
    # end while the engine waited for the outbox before that poll).
    held = 3 if sending else 2 if point == "polled" else None
    gates = Gates(tmp / "gates")
    gates.open(*(n for n in (1, 2, 3) if n != held))
    env = {**os.environ, "NIGHTLAB_TELEGRAM_TOKEN": tg.token, "NIGHTLAB_SLACK_BOT_TOKEN": slack.bot_token,
           "NIGHTLAB_SLACK_APP_TOKEN": slack.app_token, "NIGHTLAB_STUB_GATES": str(gates.folder)}
    engine = [sys.executable, str(FAKES / "engine_main.py"), "--steps", str(steps)]
    log = tmp / "daemon.log"
    kill = ["--kill-at", point, "--kill-number", str(number)]
    if point == "steering":
        send_command(ws, "note kill me while you apply this", "cli:chaos")  # applied at the first checkpoint
    if sending:
        tg.hold(f"#{number} keep · ", accepted=point == "reply_lost")

    first = _daemon(config, ws, log, engine if sending else [*engine, *kill], env)
    try:
        if sending:
            assert tg.holding.wait(60), f"the digest of #{number} was never sent\n{log.read_text()}"
            # Slack's copy of the same digest goes out at the same moment: let it finish, so the
            # held Telegram request is the only one in flight when the daemon dies.
            wait_until(lambda: _slack_done(slack, channel, number, ws), f"Slack's digest of #{number}")
            first.send_signal(signal.SIGKILL)
        code = first.wait(60)
    finally:
        tg.release()
        gates.open(1, 2, 3)
        if first.poll() is None:
            first.kill()
    assert code == -signal.SIGKILL, f"the kill point {point!r} was never reached (exit {code})\n{log.read_text()}"
    if point in WRITTEN:  # the premise: that phase was written (a kill inside its transaction would undo it)
        phases = [c.phase for c in ledger.open_candidates(Store.for_workspace(ws)) if c.number == number]
        assert phases == [point], f"at {point!r} #{number} is in phase {phases}"
    if sending:  # the premise: Telegram has the held digest (reply lost) or has not (request lost)
        assert tg.settled.wait(10), "the released request never decided"
        held = [m for m in tg.messages(chat) if f"#{number} keep · " in m.text]
        assert len(held) == (point == "reply_lost"), f"the held digest was delivered {len(held)} times"

    store = Store.for_workspace(ws)
    since = store.last_event_id()
    second = _daemon(config, ws, log, engine, env)
    try:
        code = _finish(second, store, since, timeout=90)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)
    assert code == 0, f"the restarted daemon did not finish the session (exit {code})\n{log.read_text()}"
    # The engine of a SIGKILLed daemon leaves at its next checkpoint; give it that long (a loaded
    # CI box can take seconds to get there; no_orphans below still fails if it never does).
    deadline = time.monotonic() + 30
    while inv.orphans([ws]) and time.monotonic() < deadline:
        time.sleep(0.1)

    launches = sum(int(p.read_text()) for p in (ws / ".stub").glob("stub-*"))
    received = {
        ("telegram", str(chat)): [s.text for s in tg.messages(chat)],
        ("slack", channel): [p.text for p in slack.posts if p.channel == channel],
    }
    checks = [
        inv.ledger_once(store, EXPERIMENTS),
        inv.exports_agree(ws, store),
        inv.git_at_best(ws, store),
        inv.runs_once(store, launches),
        inv.no_orphans([ws]),
        inv.digests_in_order({f"telegram {chat}": received[("telegram", str(chat))],
                              f"slack {channel}": received[("slack", channel)]}, EXPERIMENTS,
                             in_flight=number if point == "reply_lost" else None),
        inv.outbox_exact(store, received, in_flight=f"#{number} keep · " if point == "reply_lost" else ""),
        inv.commands_once(store),
    ]
    store.close()
    return checks


WRITTEN = ("committed", "running", "finished")  # points right after their phase is written

PARAMS = [pytest.param(point, number, what, id=point) for point, number, what in POINTS]


@pytest.mark.parametrize(("point", "number", "what"), PARAMS)
def test_sigkill_at_a_point_of_the_cycle_then_restart(
    request: pytest.FixtureRequest, tmp_path: Path, chats: tuple[FakeTelegram, FakeSlack], point: str, number: int,
    what: str
) -> None:
    tg, slack = chats
    started = time.monotonic()
    place = [p for p, _, _ in POINTS].index(point)
    try:
        checks = run_scenario(tmp_path, point, number, tg, slack, place)
    except Exception as exc:  # the scenario itself broke: no invariant can be counted as held
        chaos_table.record(request.node, point, place, what, None, time.monotonic() - started,
                           (str(exc) or repr(exc)).splitlines()[0])
        raise
    chaos_table.record(request.node, point, place, what, checks, time.monotonic() - started)
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
