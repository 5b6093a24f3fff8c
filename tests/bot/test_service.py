"""The service without any chat platform: console digests, the router's answers, the chart."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import pytest
from nightlab.bot.auth import allowlists
from nightlab.bot.channel import Incoming, OnMessage
from nightlab.bot.console import ConsoleChannel
from nightlab.bot.format import Photo, Text
from nightlab.bot.router import Router
from nightlab.bot.service import BotService, build_channels
from nightlab.loop.state.config import Redactor, Secret, Secrets
from nightlab.loop.state.store import Store

from tests.bot.conftest import FAST, finished, running, settings, start_service
from tests.waiting import wait_until


def test_console_is_the_default_and_prints_digests(workspace: Path, store: Store,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    s = settings()
    (channel,) = build_channels(s, Secrets())
    assert channel.name == "console"
    svc = start_service(s, Secrets(), workspace)
    try:
        finished(store, "keep", 0.97, new_best=True, description="MATRIX_LR 0.04→0.05")
        store.emit("paused", by="cli:alice", reason="", after=None)
        chart = workspace / "chart.png"
        chart.write_bytes(b"\x89PNG")
        store.emit("report", markdown="# Night report", chart_path=str(chart))
        seen: list[str] = []
        out = wait_until(lambda: seen.append(capsys.readouterr().out) or ("[chart]" in "".join(seen) and "".join(seen)),
                         "the chart on the console")
    finally:
        assert svc.stop(5)
    assert "🏆 #1 keep · val_bpb 0.9700" in out and "MATRIX_LR 0.04→0.05" in out and "⏸ paused by cli:alice" in out
    assert "📋 Night report" in out and f"[chart] progress: {chart}" in out  # an older event: its markdown


def ask(router: Router, text: str, user: str = "1", private: bool = True) -> list[Text | Photo]:
    return asyncio.run(router.handle(Incoming("telegram", user, user if private else "-5", private, text)))


def test_router_answers_and_promises(workspace: Path, store: Store) -> None:
    s = settings(telegram={"operators": [1], "viewers": [2]})
    router = Router(store, workspace, allowlists(s))
    assert ask(router, "hello")[0].title.startswith("⚠️ unknown command 'hello'")
    assert "too long" in ask(router, "/note " + "é" * 3000)[0].title
    assert ask(router, "\x00\x07")[0].title.startswith("⚠️ empty command")
    assert ask(router, "/plot")[0].title == "No finished experiments to plot yet."
    assert ask(router, "/pause")[0].title == "✔ pausing (the loop is not running right now: it acts on this when it starts)"
    assert ask(router, "/focus gpu")[0].title.startswith("⚠️ unknown area 'gpu'; areas: attention")
    assert "only operators" in ask(router, "/resume", user="2")[0].title
    number = running(store, started_ago_s=10)
    assert ask(router, "/pause now")[0].title.startswith(f"✔ cancelling #{number} and pausing")
    assert ask(router, "/note try a longer warmup")[0].title.startswith("✔ note queued")
    assert [c.args for c in store.pending_commands()] == ["", "now", "try a longer warmup"]
    finished(store, "keep", 1.0)
    finished(store, "crash", None)
    report = ask(router, "/report", user="2")
    assert report[0].title == "nightlab report — ?" and isinstance(report[1], Photo)  # no markdown marks
    assert report[1].path.read_bytes().startswith(b"\x89PNG")


def test_a_command_that_cannot_be_read_still_gets_an_answer(workspace: Path, store: Store,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """"/diff ²" raised a ValueError out of the router: the sender got no reply at all; and
    "/diff 99999999999999999999" an OverflowError, said as "diff failed on the server"."""
    router = Router(store, workspace, allowlists(settings(telegram={"operators": [1]})))
    assert ask(router, "/diff ²")[0].title.startswith("⚠️ diff takes an experiment number from 1 to 999999999")
    assert ask(router, "/diff 99999999999999999999")[0].title.startswith("⚠️ diff takes an experiment number")

    def broken(text: str, areas: object) -> None:
        raise ValueError("a bug in a command's parse")

    monkeypatch.setattr("nightlab.bot.router.parse_command", broken)
    assert [m.title for m in ask(router, "/diff 3")] == ["⚠️ that command failed on the server; the log has the details."]
    assert "a bug in a command's parse" in caplog.text  # the traceback is logged, not swallowed


def test_a_token_pasted_into_a_note_is_queued_starred(workspace: Path, store: Store) -> None:
    """The note went into the commands table, the ledger and the next agent's prompt as written."""
    s = settings(telegram={"operators": [1]})
    router = Router(store, workspace, allowlists(s), redact=Redactor.of([Secret("123456:ABCdefGHIjklMNOpqr")]))
    assert ask(router, "/note the bot is 123456:ABCdefGHIjklMNOpqr")[0].title.startswith("✔ note queued")
    assert [c.args for c in store.pending_commands()] == ["the bot is ***"]


class _SlowToStart(ConsoleChannel):
    """A console whose start holds the bot's event loop until released: the bot thread slow to
    get going, as on a loaded box (a platform client is built synchronously in its start)."""

    def __init__(self, stream: io.StringIO) -> None:
        super().__init__(stream)
        self.release = threading.Event()

    async def start(self, on_message: OnMessage) -> None:
        self.release.wait(10)


def test_an_event_written_once_the_service_has_started_is_delivered(workspace: Path, store: Store) -> None:
    """The daemon starts the engine when the bot's start() returns. The outbox placed its cursor
    on its first pass, which a slow bot thread made later than the engine's first events: they
    were taken for history and never sent (the chaos suite, on a loaded box, lost #1's digest)."""
    out = io.StringIO()
    console = _SlowToStart(out)
    svc = BotService(settings(), Secrets(), workspace, channels=[console], tuning=FAST)
    svc.start()
    try:
        store.emit("alert", text="the engine's first event")
        console.release.set()
        wait_until(lambda: "the engine's first event" in out.getvalue(), "the event on the console")
    finally:
        console.release.set()
        assert svc.stop(5)
