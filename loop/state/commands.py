"""Steering commands: one parser and one table of usages for the CLI (`nightlab ctl`) and the bot.

Parsing never touches the loop: a command that parses is written to the store and the engine
applies it at its next checkpoint. Anything that does not parse gets a short message with the usage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_COMMAND_CHARS = 2000
MAX_NOTE_CHARS = 1000


class CommandError(ValueError):
    """Bad command text; the message says what is wrong and shows the usage."""


@dataclass(frozen=True)
class Spec:
    usage: str
    help: str
    operator: bool  # changes the loop: only operators may send it


SPECS: dict[str, Spec] = {
    "help": Spec("help", "list the commands", operator=False),
    "status": Spec("status", "current experiment, best, paused?, focus, last results", operator=False),
    "best": Spec("best", "the best result so far and its change", operator=False),
    "last": Spec("last [N]", "the last N experiments (default 5, at most 50)", operator=False),
    "plot": Spec("plot", "the progress chart", operator=False),
    "report": Spec("report", "the session report so far", operator=False),
    "pause": Spec("pause [now]", "pause after the current run (now: cancel it and pause)", operator=True),
    "resume": Spec("resume", "start experimenting again", operator=True),
    "focus": Spec("focus <area>|off", "steer proposals to one area, or off", operator=True),
    "note": Spec("note <text>", "a note for the next proposal", operator=True),
    "kill": Spec("kill [N]", "cancel the running experiment (or #N), recorded as discarded", operator=True),
}


@dataclass(frozen=True)
class Command:
    name: str
    args: str = ""

    @property
    def operator(self) -> bool:
        return SPECS[self.name].operator

    def text(self) -> str:
        return f"{self.name} {self.args}".strip()


def usage(name: str) -> str:
    return f"usage: {SPECS[name].usage}"


def help_text() -> str:
    width = max(len(s.usage) for s in SPECS.values())
    return "\n".join(f"{s.usage.ljust(width)}  {s.help}" for s in SPECS.values())


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def parse_command(text: str, areas: tuple[str, ...] | None = None) -> Command:
    """Parse `"/focus attention"`, `"pause now"`, `"note try rope base 50k"`, ...

    `areas` are the focus areas the proposer knows; None means any text is accepted
    (the agent proposer takes the focus as free text in its prompt).
    """
    if len(text) > MAX_COMMAND_CHARS:
        raise CommandError(f"command too long ({len(text)} characters, at most {MAX_COMMAND_CHARS})")
    text = _CONTROL.sub(" ", text).strip()
    if not text:
        raise CommandError("empty command; send 'help' for the list")
    head, _, rest = text.partition(" ")
    # "/status@somebot" is not stripped here: the Telegram adapter decides whom a command is
    # addressed to and hands over only ours, without the "@thisbot".
    name = head.lstrip("/").lower()
    rest = rest.strip()
    if name not in SPECS:
        raise CommandError(f"unknown command {head[:40]!r}; commands: {', '.join(SPECS)}")
    if name in ("help", "status", "best", "plot", "report", "resume") and rest:
        raise CommandError(f"{name} takes no arguments; {usage(name)}")
    if name == "last":
        if rest and not (rest.isdigit() and 1 <= int(rest) <= 50):
            raise CommandError(f"last wants a number from 1 to 50, got {rest[:20]!r}; {usage(name)}")
        return Command(name, rest)
    if name == "pause" and rest not in ("", "now"):
        raise CommandError(f"pause takes nothing or 'now', got {rest[:20]!r}; {usage(name)}")
    if name == "kill" and rest and not (rest.lstrip("#").isdigit()):
        raise CommandError(f"kill takes an experiment number, got {rest[:20]!r}; {usage(name)}")
    if name == "focus":
        if not rest:
            raise CommandError(f"focus needs an area or 'off'; {usage(name)}" + _areas(areas))
        rest = rest.lower() if areas is not None else rest
        if areas is not None and rest != "off" and rest not in areas:
            raise CommandError(f"unknown area {rest[:40]!r}" + _areas(areas))
    if name == "note":
        if not rest:
            raise CommandError(f"note needs some text; {usage(name)}")
        if len(rest) > MAX_NOTE_CHARS:
            raise CommandError(f"note too long ({len(rest)} characters, at most {MAX_NOTE_CHARS})")
    if name == "kill":
        rest = rest.lstrip("#")
    return Command(name, rest)


def _areas(areas: tuple[str, ...] | None) -> str:
    return f"; areas: {', '.join(areas)}, off" if areas else ""
