"""A keep that trained past the budget: the budget is counted by train.py's own loop (the harness's
`Budget`), so an edit can train longer and win by it. Under a time budget the harness times the
training command from outside (`prepare.run` prints TRAINING_WALL; the command cannot print that line
past the harness's prefix), and a keep whose fastest run took longer than the slowest run of the
commit it replaced, by more than a tenth (at least OVERTIME_MIN_S), is marked SUSPECT, as a gain
that vanishes on the held-out slice is. Not refused: start-up is in the figure, and a change that compiles a larger
graph starts up slower (a cold compile took 42 s on an H200); a person reads the flag.

Plain numbers, as loop/judge.py's rule: nothing here touches git, processes or the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# the harness's figure (prepare.TRAINING_WALL, written out here: importing prepare would load
# pyarrow and tiktoken into the engine; tests/loop/test_profiles.py holds them equal)
TRAINING_WALL = "training_command_seconds"
OVERTIME_SHARE = 0.1  # of the replaced commit's slowest run
OVERTIME_MIN_S = 30.0  # start-up differs by change and by a cold or warm compile cache


@dataclass(frozen=True)
class Overtime:
    fastest: float  # the kept change's fastest run, seconds of its training command
    slowest: float  # the replaced commit's slowest run

    @property
    def seconds(self) -> float:
        return self.fastest - self.slowest

    def text(self) -> str:
        return (f"SUSPECT: its training command ran {self.seconds:.0f} s longer than the best's slowest run"
                f" ({self.fastest:.0f} s vs {self.slowest:.0f} s, start-up included): training past the budget?")


def overtime(candidate: Sequence[float], incumbent: Sequence[float]) -> Overtime | None:
    """The kept change's runs (`candidate`: seconds of each run's training command) against the
    replaced commit's; None when either has no figure (an older harness, a step budget, a
    project with no run command of the harness's) or the change's fastest run is within the allowance."""
    if not candidate or not incumbent:
        return None
    found = Overtime(min(candidate), max(incumbent))
    return found if found.seconds > max(OVERTIME_SHARE * found.slowest, OVERTIME_MIN_S) else None
