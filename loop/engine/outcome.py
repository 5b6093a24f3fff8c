"""What deciding hands to recording and exporting: one candidate's verdict, typed.

It is stored as JSON in `candidates.outcome` together with the phase `finished`, so a restarted
engine records exactly what was decided; `from_json` reads what an older nightlab stored (missing
fields take their defaults, unknown ones are ignored).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Outcome:
    status: str  # keep | discard | crash | checks_failed
    metric: float | None
    best_after: float | None  # the class's best once this is recorded
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None  # the gain in standard errors of the difference
    needs_confirm: bool = False  # undecided: re-run the same commit (a confirm candidate)
    remeasure_best: bool = False  # ... and the incumbent too, its own n is small
    # the decision's figures: gain over the incumbent (positive = better) ± se, n vs n_best runs
    gain: float | None = None
    se: float | None = None
    n: int | None = None
    n_best: int | None = None
    reference: float | None = None  # the incumbent's mean it was judged against
    # the run (none for a candidate that ended before any run: a proposer failure, a rejection)
    duration_s: float | None = None
    started_at: float | None = None
    finished_at: float = 0.0  # every outcome is given its time
    slot: str = ""
    node: str = ""  # a cluster's node it ran on
    hardware: str = ""
    commit: str | None = None
    setting: str = ""  # the setting digest its run started on (recorded with it); "" without a run
    log_tail: str = ""  # crashes only
    compared: bool = True  # False: nothing on its hardware class to compare it with
    rebase: bool = False  # async: better than an older base; re-made on the best and re-run
    # the data failed the run (a damaged shard), not its change: the change runs again, undecided
    retry: bool = False
    # where git stands once it is recorded; None until its wave is decided
    head_after: str | None = None

    @property
    def moves_head(self) -> bool:
        """Git follows it: a keep, or a result re-run at its own commit."""
        return self.status == "keep" or self.needs_confirm

    @property
    def decided(self) -> bool:
        return self.head_after is not None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
