from __future__ import annotations

from pathlib import Path

import pytest
from nightlab.loop.state.commands import Command, CommandError, help_text, parse_command

AREAS = ("architecture", "attention", "optimizer", "schedule", "batch")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/pause", Command("pause")),
        ("pause now", Command("pause", "now")),
        ("/focus Attention", Command("focus", "attention")),
        ("focus off", Command("focus", "off")),
        ("/note try a longer warmup", Command("note", "try a longer warmup")),
        ("last 3", Command("last", "3")),
        ("kill #42", Command("kill", "42")),
    ],
)
def test_valid(text: str, expected: Command) -> None:
    assert parse_command(text, AREAS) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty command"),
        ("/reboot", "unknown command"),
        ("/kill@otherbot", "unknown command"),  # only the Telegram adapter may drop an addressee
        ("/focus", "focus needs an area"),
        ("/focus quantum", "unknown area 'quantum'; areas: architecture"),
        ("/last many", "last wants a number"),
        ("/last 0", "last wants a number"),
        ("/pause later", "pause takes nothing or 'now'"),
        ("/status please", "status takes no arguments"),
        ("/note", "note needs some text"),
        ("/kill everything", "kill takes an experiment number"),
        ("x" * 5000, "command too long"),
    ],
)
def test_invalid_gets_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        parse_command(text, AREAS)


def test_agent_focus_is_free_text() -> None:
    assert parse_command("focus Attention sinks", None) == Command("focus", "Attention sinks")


def test_roles() -> None:
    assert parse_command("pause").operator and not parse_command("status").operator


def test_help_lists_every_command() -> None:
    text = help_text()
    for name in ("status", "pause [now]", "focus <area>|off", "kill"):
        assert name in text


def test_control_characters_are_neutralised() -> None:
    assert parse_command("note a\x00b\x1bc") == Command("note", "a b c")


class _Loop:
    """Two experiments in flight; kills are only remembered (the engine's side is not under test)."""

    def __init__(self) -> None:
        self.killed: list[int] = []

    def running_numbers(self) -> list[int]:
        return [4, 5]

    def kill(self, number: int, reason: str) -> bool:
        self.killed.append(number)
        return True


def test_the_pause_broadcast_says_each_thing_once(tmp_path: Path) -> None:
    from nightlab.bot.digest import describe
    from nightlab.loop.state.config import DigestSettings
    from nightlab.loop.state.steering import apply_pending
    from nightlab.loop.state.store import Store

    store = Store.for_workspace(tmp_path)
    for text in ("pause", "resume", "pause now"):
        store.add_command(*parse_command(text).text().partition(" ")[::2], sender="telegram:1001")
        apply_pending(store, _Loop())
    lines = [describe(e, DigestSettings())[0].title for e in store.events_after(0) if e.kind == "paused"]
    assert lines == ["⏸ paused by telegram:1001 after #5 finishes", "⏸ paused by telegram:1001: cancelled #4, #5"]
