from __future__ import annotations

import pytest

from nightlab.loop.commands import Command, CommandError, help_text, parse_command

AREAS = ("architecture", "attention", "optimizer", "schedule", "batch")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/pause", Command("pause")),
        ("pause now", Command("pause", "now")),
        ("/status@nightlab_bot", Command("status")),
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
