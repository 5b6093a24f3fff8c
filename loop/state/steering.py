"""Steering: sending a command (CLI, bot) and applying it (the engine, at its checkpoints).

A command that parses is written to the store with its sender and answered with what will
happen and when; the engine applies it at its next checkpoint (every `loop.checkpoint_interval`
seconds while a run is in flight), marks it done or rejected and emits events. Pause and focus
live in the store's kv table, so they survive restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from nightlab.loop.state import ledger, views
from nightlab.loop.state.commands import Command, CommandError, help_text, parse_command
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.lock import holder
from nightlab.loop.state.store import DB_FILENAME, Store, state_dir

_READ_ONLY = ("help", "status", "best", "last", "plot", "report")


# -- sending (any process) -----------------------------------------------------------------------
def send_command(workspace_path: Path, text: str, sender: str) -> str:
    """Validate and queue a command; returns a reply for people. Raises UserError when invalid."""
    if not (state_dir(Path(workspace_path)) / DB_FILENAME).exists():
        raise UserError(f"{workspace_path} is not a nightlab workspace; run `nightlab init {workspace_path}` first")
    store = Store.for_workspace(Path(workspace_path))
    areas = store.get(ledger.AREAS_KEY)
    try:
        command = parse_command(text, tuple(areas) if areas is not None else None)
    except CommandError as exc:
        raise UserError(str(exc)) from None
    if command.name in _READ_ONLY:
        return _answer(Path(workspace_path), command)
    running = running_numbers(store)
    if command.name == "kill":
        _kill_target(command, running)
    store.add_command(command.name, command.args, sender=sender)
    return _promise(store, command, running) + _engine_note(Path(workspace_path))


def _kill_target(command: Command, running: list[int]) -> int:
    """The experiment `kill [N]` means; UserError when it names none that is running."""
    if not running:
        raise UserError("nothing is running; there is no experiment to kill")
    listed = ", ".join(f"#{n}" for n in running)
    if command.args:
        if int(command.args) not in running:
            raise UserError(f"#{command.args} is not running; running now: {listed}")
        return int(command.args)
    if len(running) > 1:
        raise UserError(f"{len(running)} experiments are running ({listed}); say which: kill N")
    return running[0]


def _answer(workspace: Path, command: Command) -> str:
    if command.name == "help":
        return help_text()
    if command.name == "status":
        return views.status_text(workspace)
    if command.name == "best":
        return views.best_text(workspace)
    if command.name == "last":
        return views.history_text(workspace, int(command.args or 5))
    if command.name == "report":
        return views.report_markdown(workspace)
    return "the progress chart is sent by the chat bot; `nightlab report` has the numbers"


def running_numbers(store: Store) -> list[int]:
    """Experiments with a run in flight, oldest first."""
    return [ledger.get_candidate(store, r.candidate_id).number for r in ledger.running_runs(store)]


def _promise(store: Store, command: Command, running: list[int]) -> str:
    name, args = command.name, command.args
    soon = "within ~2 s"
    listed = ", ".join(f"#{n}" for n in running)
    if name == "pause" and args == "now":
        return f"cancelling {listed} and pausing {soon}" if running else f"pausing {soon}"
    if name == "pause":
        if not running:
            return f"pausing {soon} (nothing is running)"
        if len(running) > 1:
            return f"no new launches; pausing after {listed} finish"
        left = views.remaining_s(store)
        return f"pausing after {listed} finishes" + (f", ~{views.duration(left)}" if left else "")
    if name == "resume":
        return f"resuming {soon}" if ledger.paused(store) else "the loop is not paused; nothing to resume"
    if name == "focus":
        return "focus off from the next proposal" if args == "off" else f"focusing on {args} from the next proposal"
    if name == "note":
        return "note queued: it goes into the next proposal"
    return f"killing #{_kill_target(command, running)} {soon}; it will be recorded as discarded"


def _engine_note(workspace: Path) -> str:
    if holder(workspace) is None:
        return " (the loop is not running right now: it acts on this when it starts)"
    return ""


# -- applying (the engine) -----------------------------------------------------------------------
class LoopControl(Protocol):
    """What a command may ask of the engine."""

    def running_numbers(self) -> list[int]: ...

    def kill(self, number: int, reason: str) -> bool: ...


def apply_pending(store: Store, loop: LoopControl) -> None:
    """Apply every pending command in order; each is marked done or rejected with a result."""
    for record in store.pending_commands():
        # One transaction per command: its effect, its "done" mark and its event commit together,
        # so a crash can never apply a command twice (or mark it done without its effect).
        with store.transaction():
            current = store.command(record.id)
            if current is None or current.status != "pending":
                continue
            try:
                command = parse_command(f"{record.name} {record.args}".strip(), _areas(store))
                status, result = "done", _apply(store, loop, command, record.sender)
            except (CommandError, UserError) as exc:
                status, result = "rejected", str(exc)
            store.finish_command(record.id, status, result)
            store.emit("command_done", command_id=record.id, name=record.name, sender=record.sender, result=result)


def _areas(store: Store) -> tuple[str, ...] | None:
    areas = store.get(ledger.AREAS_KEY)
    return tuple(areas) if areas is not None else None


def _apply(store: Store, loop: LoopControl, command: Command, by: str) -> str:
    name, args = command.name, command.args
    running = loop.running_numbers()
    if name in _READ_ONLY:
        return "answered by the bot"
    if name == "pause":
        if args == "now":  # cancels the whole wave in flight
            for number in running:
                loop.kill(number, f"{ledger.USER_KILL_PREFIX}{by} (pause now)")
        after = None if args == "now" or not running else running[-1]
        with store.transaction():
            ledger.set_paused(store, by, "pause now" if args == "now" else "pause", after)
            # `by` and `after` say who and when; the reason only adds what else happened.
            cancelled = ", ".join(f"#{n}" for n in running) if args == "now" else ""
            store.emit("paused", by=by, reason=f"cancelled {cancelled}" if cancelled else "", after=after)
        return f"pausing after #{after}" if after else "paused"
    if name == "resume":
        if ledger.paused(store) is None:
            return "not paused"
        with store.transaction():
            store.delete(ledger.PAUSED_KEY)
            store.set(ledger.FAILURES_SINCE_KEY, ledger.last_number(store))
            store.emit("resumed", by=by, reason=f"resume by {by}", after=None)
        return "resumed"
    if name == "focus":
        area = None if args == "off" else args
        with store.transaction():
            if area is None:
                store.delete(ledger.FOCUS_KEY)
            else:
                store.set(ledger.FOCUS_KEY, area)
            store.emit("focus_changed", focus=area, by=by)
        return "focus off" if area is None else f"focus: {area}"
    if name == "note":
        store.emit("note_added", text=args, by=by)
        return ledger.NOTE_QUEUED
    # kill [N]
    number = _kill_target(command, running)
    loop.kill(number, f"{ledger.USER_KILL_PREFIX}{by}")
    return f"killed #{number}"
