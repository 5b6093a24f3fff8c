"""The command registry: every command a chat or `nightlab ctl` can send, one class each.

As python-telegram-bot's CommandHandler binds a command's name to its callback, each class here is
one command's spec: its name, usage, help, the role it needs, how its arguments parse, and what it
does — a `View` is answered at once from a view; a `Steer` is queued and applied once by the engine
at its next checkpoint (loop/state/steering.py). Text is parsed once (`parse_command`) into a frozen
instance of its class, which travels as itself: the commands table stores its JSON, and the engine
applies what it reads back. Text that does not parse gets a short message with the usage.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from nightlab.loop.state import ledger, views
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import Store

MAX_COMMAND_CHARS = 2000  # a command's text after its name
MAX_NOTE_CHARS = 1000
# An experiment number or a count past it is a typo: no night gets near it, and SQLite's INTEGER
# (2**63 - 1) would refuse a larger one with a traceback.
MAX_NUMBER = 999_999_999
SOON = "within ~2 s"  # a checkpoint comes every ~1 s while a run is in flight


def _when(text: str, soon: str) -> str:
    """`text` with when it happens; none said when no engine runs to do it (it acts at its start)."""
    return f"{text} {soon}" if soon else text

Areas = tuple[str, ...] | None  # the proposer's focus areas; None: any text (the agent proposer)


class CommandError(UserError):
    """Bad command text; the message says what is wrong and shows the usage."""


def whole_number(text: str, most: int = MAX_NUMBER) -> int | None:
    """`text` as a number from 1 to `most`, or None. ASCII digits only: str.isdigit takes "²",
    which int() refuses, and int() takes "٣", which no one means as an experiment number."""
    if not (text.isascii() and text.isdecimal()) or len(text.lstrip("0")) > len(str(most)):
        return None  # the length first: int() refuses 4300 digits and more
    value = int(text)
    return value if 1 <= value <= most else None


def _number(name: str, rest: str, what: str = "an experiment number", most: int = MAX_NUMBER) -> int | None:
    """The number a command's text gives ("#42" too, as the views write it); None when none is given."""
    rest = rest.removeprefix("#")
    if not rest:
        return None
    found = whole_number(rest, most)
    if found is None:
        raise CommandError(f"{name} takes {what} from 1 to {most}, got {rest[:20]!r}; {usage(name)}")
    return found


class Role(enum.Enum):
    VIEWER = "viewer"  # read-only commands
    OPERATOR = "operator"  # also the commands that change the loop


class LoopControl(Protocol):
    """What a command may ask of the engine."""

    def running_numbers(self) -> list[int]: ...

    def kill(self, number: int, reason: str) -> bool: ...


@dataclass(frozen=True)
class Applied:
    """What applying a command did: the result kept with it, and its one event (kind, payload)."""

    result: str
    event: str = "command_done"
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command(abc.ABC):
    name: ClassVar[str]
    usage: ClassVar[str]
    help: ClassVar[str]
    role: ClassVar[Role] = Role.VIEWER
    max_chars: ClassVar[int] = MAX_COMMAND_CHARS  # of the text after the name

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        """The command from the text after its name (commands without arguments take none)."""
        if rest:
            raise CommandError(f"{cls.name} takes no arguments; {usage(cls.name)}")
        return cls()

    def args(self) -> str:
        """The arguments as text: parsing `text()` gives this command back."""
        return ""

    def text(self) -> str:
        return f"{self.name} {self.args()}".strip()

    def to_json(self) -> str:
        return json.dumps({"name": self.name, **dataclasses.asdict(self)})


class View(Command):
    """Read-only: answered at once, never stored."""

    chart: ClassVar[bool] = False  # a chat adds the progress chart

    @abc.abstractmethod
    def answer(self, workspace: Path) -> str: ...


class Steer(Command):
    """Changes the loop: validated and promised when sent, applied once by the engine."""

    role = Role.OPERATOR

    @abc.abstractmethod
    def promise(self, store: Store, running: list[int], soon: str, sender: str) -> str:
        """What will happen and when (`soon`: SOON, or "" while no engine runs), for `sender`;
        UserError when it cannot happen or would change nothing (it is then not queued)."""

    def resolved(self, running: list[int]) -> Self:
        """The command as it is queued: what it means given what is running when it is sent."""
        return self

    @abc.abstractmethod
    def apply(self, store: Store, loop: LoopControl, by: str) -> Applied:
        """Carry it out (inside the command's transaction); UserError when it no longer can."""


# -- read-only ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Help(View):
    name, usage, help = "help", "help", "list the commands"

    def answer(self, workspace: Path) -> str:
        return help_text()


@dataclass(frozen=True)
class Status(View):
    name, usage, help = "status", "status", "current experiment, best, paused?, focus, last results"

    def answer(self, workspace: Path) -> str:
        return views.status_text(workspace)


@dataclass(frozen=True)
class Best(View):
    name, usage, help = "best", "best", "the best result so far and its change"

    def answer(self, workspace: Path) -> str:
        return views.best_text(workspace)


@dataclass(frozen=True)
class Diff(View):
    name, usage = "diff", "diff [N]"
    help = "what experiment N changed, as a diff (default: the best against the baseline)"
    number: int | None = None  # None: the best's change against the night's baseline

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        return cls(_number(cls.name, rest))

    def args(self) -> str:
        return "" if self.number is None else str(self.number)

    def answer(self, workspace: Path) -> str:
        return views.diff_text(workspace, self.number, views.CHAT_DIFF_CHARS)


@dataclass(frozen=True)
class Last(View):
    name, usage, help = "last", "last [N]", "the last N experiments (default 5, at most 50)"
    n: int = 5

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        n = _number(cls.name, rest, "a number", most=50)
        return cls() if n is None else cls(n)

    def args(self) -> str:
        return str(self.n)

    def answer(self, workspace: Path) -> str:
        return views.history_text(workspace, self.n)


@dataclass(frozen=True)
class Plot(View):
    name, usage, help = "plot", "plot", "the progress chart"
    chart = True

    def answer(self, workspace: Path) -> str:
        return "the progress chart is sent by the chat bot; `nightlab report` has the numbers"


@dataclass(frozen=True)
class Report(View):
    name, usage, help = "report", "report", "the session report so far"
    chart = True

    def answer(self, workspace: Path) -> str:
        return views.report_markdown(workspace, chat=True)


# -- steering -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pause(Steer):
    name, usage, help = "pause", "pause [now]", "pause after the current run (now: cancel it and pause)"
    now: bool = False

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        word = rest.lower()  # a phone keyboard writes "Now"
        if word not in ("", "now"):
            raise CommandError(f"pause takes nothing or 'now', got {rest[:20]!r}; {usage(cls.name)}")
        return cls(word == "now")

    def args(self) -> str:
        return "now" if self.now else ""

    def promise(self, store: Store, running: list[int], soon: str, sender: str) -> str:
        listed = views.numbered(running)
        current = ledger.paused(store)
        # Sent again: it would change nothing and tell the other chats a second time. Another's
        # pause is taken over (the run hours resume only a pause of theirs).
        resuming = any(r.name == Resume.name for r in store.pending_commands())
        if not self.now and current is not None and current.by == sender and not resuming:
            after = f"pausing after #{current.after} finishes" if current.after else "paused"
            raise UserError(f"already {after}; nothing changed (resume undoes it)")
        if self.now:
            return _when(f"cancelling {listed} and pausing" if running else "pausing", soon)
        if not running:  # with no engine either, its own words say more: one parenthesis, not two in a row
            return _when("pausing", soon) + (" (nothing is running)" if soon else "")
        if len(running) > 1:
            return f"no new launches; pausing after {listed} finish"
        left = views.remaining_s(store)
        return f"pausing after {listed} finishes" + (f", ~{views.duration(left)}" if left else "")

    def apply(self, store: Store, loop: LoopControl, by: str) -> Applied:
        running = loop.running_numbers()
        if self.now:  # cancels the whole wave in flight
            for number in running:
                loop.kill(number, f"{ledger.USER_KILL_PREFIX}{by} (pause now)")
        after = None if self.now or not running else running[-1]
        ledger.set_paused(store, by, "pause now" if self.now else "pause", after)
        # `by` and `after` say who and when; the reason only adds what else happened.
        cancelled = views.numbered(running) if self.now else ""
        return Applied(f"pausing after #{after}" if after else "paused", "paused",
                       {"by": by, "reason": f"cancelled {cancelled}" if cancelled else "", "after": after})


@dataclass(frozen=True)
class Resume(Steer):
    name, usage, help = "resume", "resume", "start experimenting again"

    def promise(self, store: Store, running: list[int], soon: str, sender: str) -> str:
        # A pause still waiting for the engine counts: pause then resume, sent at once, resumes.
        if ledger.paused(store) is None and not any(r.name == Pause.name for r in store.pending_commands()):
            raise UserError("the loop is not paused; nothing to resume")
        return _when("resuming", soon)

    def apply(self, store: Store, loop: LoopControl, by: str) -> Applied:
        if ledger.paused(store) is None:
            return Applied("not paused")
        ledger.resume(store)
        return Applied("resumed", "resumed", {"by": by, "reason": f"resume by {by}", "after": None})


@dataclass(frozen=True)
class Focus(Steer):
    name, usage, help = "focus", "focus <area>|off", "steer proposals to one area, or off"
    area: str | None  # None: off

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        if not rest:
            raise CommandError(f"focus needs an area or 'off'; {usage(cls.name)}" + _areas(areas))
        rest = rest.lower() if areas is not None else rest
        if areas is not None and rest != "off" and rest not in areas:
            raise CommandError(f"unknown area {rest[:40]!r}" + _areas(areas))
        return cls(None if rest == "off" else rest)

    def args(self) -> str:
        return self.area or "off"

    def promise(self, store: Store, running: list[int], soon: str, sender: str) -> str:
        # Already so, and no other focus on its way: applied, it would tell the other chats again.
        if ledger.focus(store) == self.area and not any(r.name == self.name for r in store.pending_commands()):
            raise UserError(f"the focus is {self.area or 'off'} already; nothing changed")
        return f"focusing on {self.area} from the next proposal" if self.area else "focus off from the next proposal"

    def apply(self, store: Store, loop: LoopControl, by: str) -> Applied:
        # Sent before the engine first started, the area was not checked (the proposer's areas were
        # not known yet); kept unchecked, it would fail every proposal of the night.
        areas = ledger.areas(store)
        area = self.area.lower() if self.area and areas is not None else self.area
        if area and areas is not None and area not in areas:
            raise CommandError(f"unknown area {area[:40]!r}; focus unchanged" + _areas(areas))
        ledger.set_focus(store, area)
        return Applied(f"focus: {area}" if area else "focus off", "focus_changed", {"focus": area, "by": by})


@dataclass(frozen=True)
class Note(Steer):
    name, usage, help = "note", "note <text>", "a note for the next proposal"
    max_chars = MAX_NOTE_CHARS
    body: str

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        if not rest:
            raise CommandError(f"note needs some text; {usage(cls.name)}")
        return cls(rest)

    def args(self) -> str:
        return self.body

    def promise(self, store: Store, running: list[int], soon: str, sender: str) -> str:
        return "note queued: it goes into the next proposal"

    def apply(self, store: Store, loop: LoopControl, by: str) -> Applied:
        # The note waits in the commands table, its result saying so, until a proposal takes it.
        return Applied(ledger.NOTE_QUEUED, "note_added", {"text": self.body, "by": by})


@dataclass(frozen=True)
class Kill(Steer):
    name, usage, help = "kill", "kill [N]", "cancel the running experiment (or #N), recorded as discarded"
    number: int | None = None  # None: the one running

    @classmethod
    def parse(cls, rest: str, areas: Areas) -> Self:
        return cls(_number(cls.name, rest))

    def args(self) -> str:
        return "" if self.number is None else str(self.number)

    def target(self, running: list[int]) -> int:
        """The experiment this kill means; UserError when it names none that is running."""
        if not running:
            raise UserError("nothing is running; there is no experiment to kill")
        if self.number is not None:
            if self.number not in running:
                raise UserError(f"#{self.number} is not running; running now: {views.numbered(running)}")
            return self.number
        if len(running) > 1:
            raise UserError(f"{len(running)} experiments are running ({views.numbered(running)}); say which: kill N")
        return running[0]

    def resolved(self, running: list[int]) -> Self:
        # "kill" means the run it was promised for: applied later, it must not land on the next one
        return dataclasses.replace(self, number=self.target(running))

    def promise(self, store: Store, running: list[int], soon: str, sender: str) -> str:
        number = self.target(running)
        _not_stopping(store, number)
        queued = [r.sender for r in store.pending_commands() if r.name == self.name and r.args == str(number)]
        if queued:
            raise UserError(f"a kill of #{number} from {queued[0]} is queued already; nothing changed")
        # no engine: the run may end before one starts, and what it measured then stands
        return _when(f"killing #{number}", soon) + ("; it will be recorded as discarded" if soon
                                                    else "; it will be recorded as discarded unless it has ended by then")

    def apply(self, store: Store, loop: LoopControl, by: str) -> Applied:
        number = self.target(loop.running_numbers())
        _not_stopping(store, number)  # sent by two chats at once: the second was queued before the first applied
        loop.kill(number, f"{ledger.USER_KILL_PREFIX}{by}")
        return Applied(f"killed #{number}")


def _not_stopping(store: Store, number: int) -> None:
    """UserError when #number's run is being stopped already (a kill, a timeout): a second kill
    would change nothing, and announced, read as a second run killed."""
    reason = next((run.kill_reason for cand, run in ledger.in_flight(store) if cand.number == number), None)
    if reason:
        raise UserError(f"#{number} is being stopped already ({reason}); nothing changed")


REGISTRY: dict[str, type[Command]] = {
    c.name: c for c in (Help, Status, Best, Diff, Last, Plot, Report, Pause, Resume, Focus, Note, Kill)
}


# Telegram's apps send "/start" when the owner first opens the bot's chat: the list of commands
# answers it (an unknown command's warning was the first thing a new owner read).
ALIASES = {"start": Help.name}


def usage(name: str) -> str:
    return f"usage: {REGISTRY[name].usage}"


def help_text() -> str:
    width = max(len(c.usage) for c in REGISTRY.values())
    return "\n".join(f"{c.usage.ljust(width)}  {c.help}" for c in REGISTRY.values())


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def parse_command(text: str, areas: Areas = None) -> Command:
    """Parse `"/focus attention"`, `"pause now"`, `"note try rope base 50k"`, ...

    `areas` are the focus areas the proposer knows (`ledger.areas`); None means any text is
    accepted (the agent proposer takes the focus as free text in its prompt).
    """
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        # bytes of another encoding (a terminal not set to UTF-8) come as surrogates, which the store
        # cannot keep; refused, not replaced: a note with a character replaced may say something
        # else, and the sender still has the text to send again
        where = f"after {text[max(0, exc.start - 20):exc.start]!r}" if exc.start else "at its start"
        raise CommandError(f"the text has a byte that is not UTF-8 {where}; send it as UTF-8"
                           " (from a terminal set to UTF-8, e.g. LANG=C.UTF-8)") from None
    text = _CONTROL.sub(" ", text).strip()
    if not text:
        raise CommandError("empty command; send 'help' for the list")
    parts = text.split(maxsplit=1)  # any space: "/note" and its text on the next line, as a phone sends it
    head, rest = parts[0], parts[1] if len(parts) > 1 else ""
    # "/status@somebot" is not stripped here: the Telegram adapter decides whom a command is
    # addressed to and hands over only ours, without the "@thisbot".
    name = head.lstrip("/").lower()
    cls = REGISTRY.get(ALIASES.get(name, name))
    if cls is None:
        raise CommandError(f"unknown command {head[:40]!r}; commands: {', '.join(REGISTRY)}")
    rest = rest.strip()
    if len(rest) > cls.max_chars:  # the text after the name: a note's limit is its own text's
        raise CommandError(f"{cls.name} too long ({len(rest)} characters, at most {cls.max_chars})")
    return cls.parse(rest, areas)


def from_json(text: str) -> Command:
    """A command as the commands table stores it; CommandError when it cannot be read back."""
    try:
        fields = json.loads(text)
        return REGISTRY[fields.pop("name")](**fields)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CommandError(f"unreadable command {text[:80]!r} (from an older nightlab?); send it again") from None


def _areas(areas: Areas) -> str:
    return f"; areas: {', '.join(areas)}, off" if areas else ""
