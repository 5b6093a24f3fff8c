"""Steering: sending a command (CLI, bots) and applying it (the engine, at its checkpoints).

A command is parsed once (loop/state/commands.py) and arrives here as its typed object. A read-only
one is answered at once; a steering one is checked against what is running, written to the store
as its JSON with its sender (and the chat that sent it), and answered with what will happen and
when: that promise is the sender's one answer. The engine calls `apply_pending` at its next
checkpoint (every `loop.checkpoint_interval` seconds while a run is in flight): each command is
applied once, marked done or rejected, and leaves one event for the chats, which skip the chat
that already has its answer. Pause and focus live in the store's kv table, so they survive restarts.
"""

from __future__ import annotations

from pathlib import Path

from nightlab.loop.state import ledger
from nightlab.loop.state.commands import SOON, LoopControl, Steer, View, from_json, parse_command
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.lock import holder
from nightlab.loop.state.store import Store


# -- sending (any process) -----------------------------------------------------------------------
def send_command(workspace_path: Path, text: str, sender: str) -> str:
    """`nightlab ctl`: parse, then answer or queue; returns the reply. Raises UserError when invalid."""
    workspace = Path(workspace_path)
    store = Store.existing(workspace)
    command = parse_command(text, ledger.areas(store))
    if isinstance(command, View):
        return command.answer(workspace)
    assert isinstance(command, Steer)  # every command is one or the other
    return queue(store, workspace, command, sender)


def queue(store: Store, workspace: Path, command: Steer, sender: str, reply_to: str = "") -> str:
    """Write a steering command for the engine; returns the promise. `reply_to` ("telegram:<chat>")
    is the chat that gets this promise as its answer, so the command's event is not sent there again."""
    running = running_numbers(store)
    command = command.resolved(running)  # UserError: e.g. nothing to kill
    if any(r.sender == sender and r.command == command.to_json() for r in store.pending_commands()):
        # A double tap: applied twice, the other chats would hear it twice (a kill, a note).
        raise UserError(f"the same {command.name} is queued already (sent twice?); nothing changed")
    engine = holder(workspace) is not None  # none: it acts on this at its start, whenever that is
    promise = command.promise(store, running, SOON if engine else "", sender)  # UserError: e.g. nothing changes
    store.add_command(command.name, command.args(), sender=sender, command=command.to_json(), reply_to=reply_to)
    return promise + ("" if engine else " (the loop is not running right now: it acts on this when it starts)")


def running_numbers(store: Store) -> list[int]:
    """Experiments with a run in flight, oldest first."""
    return [cand.number for cand, _ in ledger.in_flight(store)]


# -- applying (the engine) -----------------------------------------------------------------------
def apply_pending(store: Store, loop: LoopControl) -> None:
    """Apply every pending command in order; each is marked done or rejected and leaves one event."""
    for record in store.pending_commands():
        # One transaction per command: its effect, its "done" mark and its event commit together,
        # so a crash can never apply a command twice (or mark it done without its effect).
        with store.transaction():
            current = store.command(record.id)
            if current is None or current.status != "pending":
                continue
            said = {"command_id": record.id, "name": record.name, "sender": record.sender}
            try:
                command = from_json(record.command)
                if not isinstance(command, Steer):
                    raise UserError(f"{command.name} is answered when it is sent; there is nothing to apply")
                applied = command.apply(store, loop, record.sender)
            except UserError as exc:
                store.finish_command(record.id, "rejected", str(exc))
                store.emit("command_done", **said, result=str(exc))  # to every chat: the promise failed
                continue
            store.finish_command(record.id, "done", applied.result)
            store.emit(applied.event, **said, result=applied.result, answered_in=record.reply_to or None,
                       **applied.payload)
