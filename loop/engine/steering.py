"""Steering at a checkpoint: the pending commands, applied against the runs in flight.

One unit on purpose: the command path (parse, apply, answer) is the state layer's, and this is
the engine's only contact with it.
"""

from __future__ import annotations

from nightlab.loop.state import ledger, steering
from nightlab.loop.state.store import Store


class Control:
    """What a command may ask of the engine (steering.LoopControl)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def running_numbers(self) -> list[int]:
        return steering.running_numbers(self.store)

    def kill(self, number: int, reason: str) -> bool:
        """Mark the run (durably, inside the command's transaction); the next poll cancels it, so a
        kill interrupted by a crash is still carried out after the restart."""
        for cand, run in ledger.in_flight(self.store):
            if cand.number == number:
                return ledger.mark_kill(self.store, run.id, reason)
        return False


def apply_commands(store: Store) -> None:
    steering.apply_pending(store, Control(store))
