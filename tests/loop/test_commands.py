from __future__ import annotations

import re
from pathlib import Path

import pytest
from nightlab.loop.state.commands import (
    REGISTRY,
    Command,
    CommandError,
    Diff,
    Focus,
    Kill,
    Last,
    Note,
    Pause,
    Role,
    Status,
    from_json,
    help_text,
    parse_command,
)

AREAS = ("architecture", "attention", "optimizer", "schedule", "batch")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/pause", Pause()),
        ("pause now", Pause(now=True)),
        ("Pause Now", Pause(now=True)),  # as a phone keyboard capitalises it
        ("/focus Attention", Focus("attention")),
        ("focus off", Focus(None)),
        ("/note try a longer warmup", Note("try a longer warmup")),
        ("last 3", Last(3)),
        ("kill #42", Kill(42)),
        ("/diff", Diff()),
        ("diff #37", Diff(37)),
        ("diff 007", Diff(7)),
        ("last 50", Last(50)),
        # typed on a phone: the line break after the command, not a space; the note keeps its lines
        ("/note\ntry a longer warmup\nthen rope", Note("try a longer warmup\nthen rope")),
        ("/pause\tnow", Pause(now=True)),
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
        ("/last many", "last takes a number from 1 to 50"),
        ("/last 0", "last takes a number from 1 to 50"),
        ("/last 51", "last takes a number from 1 to 50, got '51'"),
        ("/pause later", "pause takes nothing or 'now'"),
        ("/status please", "status takes no arguments"),
        ("/note", "note needs some text"),
        ("/kill everything", "kill takes an experiment number"),
        ("/diff best", "diff takes an experiment number from 1 to 999999999, got 'best'; usage: diff"),
        ("/diff 0", "diff takes an experiment number"),
        # digits to str.isdigit, yet int() refuses them: a ValueError, and no reply in a chat
        ("/diff ²", "diff takes an experiment number from 1 to 999999999, got '²'"),
        ("/kill ²", "kill takes an experiment number from 1 to 999999999, got '²'"),
        ("/last ²", "last takes a number from 1 to 50, got '²'"),
        # past SQLite's INTEGER: an OverflowError when the view looked it up
        ("/diff 99999999999999999999", "got '99999999999999999999'; usage: diff"),
        ("/kill 99999999999999999999", "got '99999999999999999999'; usage: kill"),
        ("/note " + "x" * 1999, "note too long (1999 characters, at most 1000)"),  # not the 2005 of "/note …"
        ("/focus " + "x" * 2001, "focus too long (2001 characters, at most 2000)"),
        # a byte of another encoding, as a non-UTF-8 terminal's argument arrives: the store could not keep it
        ("note caf\udce9 au lait", "the text has a byte that is not UTF-8 after 'note caf'; send it as UTF-8"),
    ],
    ids=lambda value: value[:40],  # not a note's 2000 characters
)
def test_invalid_gets_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        parse_command(text, AREAS)


def test_agent_focus_is_free_text() -> None:
    assert parse_command("focus Attention sinks", None) == Focus("Attention sinks")


def test_roles() -> None:
    assert parse_command("pause").role is Role.OPERATOR and parse_command("status").role is Role.VIEWER


def test_help_lists_every_command() -> None:
    text = help_text()
    for name in ("status", "pause [now]", "focus <area>|off", "kill"):
        assert name in text


def test_control_characters_are_neutralised() -> None:
    assert parse_command("note a\x00b\x1bc") == Note("a b c")


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
        command = parse_command(text)
        store.add_command(command.name, command.args(), sender="telegram:1001", command=command.to_json())
        apply_pending(store, _Loop())
    lines = [describe(e, DigestSettings())[0].title for e in store.events_after(0) if e.kind == "paused"]
    assert lines == ["⏸ paused by telegram:1001 after #5 finishes", "⏸ paused by telegram:1001: cancelled #4, #5"]


@pytest.mark.parametrize("text", ["help", "last 7", "pause now", "pause", "focus attention", "focus off",
                                  "note try rope", "kill", "kill 3", "resume", "status", "diff", "diff 4"])
def test_a_command_travels_as_itself(text: str) -> None:
    """What the commands table keeps is the typed command, read back equal; and its text parses to it."""
    command = parse_command(text, AREAS)
    assert from_json(command.to_json()) == command
    assert parse_command(command.text(), AREAS) == command


def test_an_unreadable_stored_command_says_so() -> None:
    for text in ("", "focus attention", '{"name": "dance"}', '{"name": "focus", "colour": "red"}'):
        with pytest.raises(CommandError, match="unreadable command .* send it again"):
            from_json(text)


def test_every_command_is_one_spec_in_the_registry() -> None:
    assert list(REGISTRY) == ["help", "status", "best", "diff", "last", "plot", "report",
                              "pause", "resume", "focus", "note", "kill"]
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.usage.startswith(name) and spec.help
        assert issubclass(spec, Command)
    assert REGISTRY["status"] is Status and Status.role is Role.VIEWER and Kill.role is Role.OPERATOR


def test_the_engine_applies_the_stored_command_once_with_one_event(tmp_path: Path) -> None:
    from nightlab.loop.state import ledger
    from nightlab.loop.state.steering import apply_pending
    from nightlab.loop.state.store import Store

    store = Store.for_workspace(tmp_path)
    store.add_command("focus", "attention", sender="cli:old")  # an older nightlab's row: text only
    focus = Focus("attention")
    store.add_command(focus.name, focus.args(), sender="cli:me", command=focus.to_json(), reply_to="telegram:5")
    apply_pending(store, _Loop())
    apply_pending(store, _Loop())  # a second checkpoint finds nothing left to apply
    old, new = store.command(1), store.command(2)
    assert old is not None and old.status == "rejected" and "send it again" in old.result
    assert new is not None and (new.status, new.result) == ("done", "focus: attention")
    assert ledger.focus(store) == "attention"
    events = [(e.kind, e.payload["command_id"], e.payload.get("answered_in")) for e in store.events_after(0)]
    assert events == [("command_done", 1, None), ("focus_changed", 2, "telegram:5")]


def test_a_focus_sent_before_the_areas_were_known_is_checked_when_applied(tmp_path: Path) -> None:
    from nightlab.loop.state import ledger
    from nightlab.loop.state.steering import apply_pending
    from nightlab.loop.state.store import Store

    store = Store.for_workspace(tmp_path)  # an engine that never started: no areas published yet
    for text in ("focus nosucharea", "focus Attention"):
        focus = parse_command(text, ledger.areas(store))
        store.add_command(focus.name, focus.args(), sender="cli:me", command=focus.to_json())
    store.set(ledger.AREAS_KEY, list(AREAS))  # the engine starts and publishes them, then applies
    apply_pending(store, _Loop())
    rejected, done = store.command(1), store.command(2)
    assert rejected is not None and rejected.status == "rejected"
    assert rejected.result == f"unknown area 'nosucharea'; focus unchanged; areas: {', '.join(AREAS)}, off"
    assert done is not None and (done.status, done.result) == ("done", "focus: attention")
    assert ledger.focus(store) == "attention"


def test_a_second_kill_of_a_run_being_stopped_says_so_and_kills_nothing(tmp_path: Path) -> None:
    """A `/kill` sent again (from another chat, or after the first was applied while the run was
    still stopping) was promised "killing #1" and announced "killed #1" a second time; a `kill`
    queued while #1 ran could also land on whatever ran by the time the engine applied it."""
    from nightlab.loop.engine.steering import Control
    from nightlab.loop.state import ledger
    from nightlab.loop.state.errors import UserError
    from nightlab.loop.state.steering import apply_pending, queue
    from nightlab.loop.state.store import Store

    store = Store.for_workspace(tmp_path)
    cand = ledger.new_candidate(store, "proposal", "base")
    ledger.add_run(store, cand.id, "{}", "cpu0", str(tmp_path / "1.log"))
    assert queue(store, tmp_path, Kill(), "telegram:1").startswith("killing #1")
    assert store.pending_commands()[0].args == "1"  # the run it promised, whatever runs when it is applied
    with pytest.raises(UserError, match=r"^a kill of #1 from telegram:1 is queued already; nothing changed$"):
        queue(store, tmp_path, Kill(1), "telegram:2")
    apply_pending(store, Control(store))
    with pytest.raises(UserError, match=r"^#1 is being stopped already \(killed by telegram:1\); nothing changed$"):
        queue(store, tmp_path, Kill(), "telegram:1")
    # sent by two chats at once, both queued before the engine applied either: the second is refused
    # (to every chat), not announced as a kill
    second = Kill(1)
    store.add_command(second.name, second.args(), sender="telegram:2", command=second.to_json())
    apply_pending(store, Control(store))
    done = [(e.payload["sender"], e.payload["result"]) for e in store.events_after(0) if e.kind == "command_done"]
    assert done == [("telegram:1", "killed #1"),
                    ("telegram:2", "#1 is being stopped already (killed by telegram:1); nothing changed")]
