"""The proposer interface: what the engine gives a proposer and what it gets back.

A proposer edits the editable files of a clean working tree and describes the edit; it never
commits, runs or judges (the engine does). It keeps no state of its own: everything it learns
from arrives in `ProposalContext`, which the engine rebuilds from the ledger, so a restarted
daemon proposes exactly as the old one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nightlab.loop.state.stats import Noise


@dataclass(frozen=True)
class PastExperiment:
    """One recorded experiment, as a proposer may learn from it (built by the engine)."""

    number: int
    status: str  # keep | discard | crash | checks_failed
    metric: float | None
    description: str
    hypothesis: str
    area: str
    params: dict[str, object]  # the constants the search set (empty for agent proposals)
    kind: str = "proposal"  # baseline | proposal | confirm | rebase
    reason: str = ""  # the decision's words, e.g. "not better: worse by 0.0048 ± 0.0034 (n = 1 vs 3)"
    # What it was measured in (hardware class and setting; "": no run), opaque: metrics compare
    # only within one group (an A100's val_bpb sits at an offset from an H100's)
    group: str = ""
    hardware: str = ""  # the group's GPU model, readable ("NVIDIA H100 80GB HBM3"; "": no run)
    older_setting: bool = False  # measured under a setting runs no longer use (another budget, data, scorer)


@dataclass(frozen=True)
class ProposalContext:
    workspace: Path  # the working tree to edit (at the best commit, clean)
    editable: tuple[str, ...]  # files the proposal may change
    metric_name: str
    direction: str  # "minimize" | "maximize"
    best: PastExperiment | None  # the best as /best states it: the latest setting, on the best's hardware class
    history: tuple[PastExperiment, ...]  # oldest first
    focus: str | None
    notes: tuple[str, ...]  # the user's pending notes (delivered with this proposal)
    consecutive_failures: int  # experiments in a row without a keep (discards and failures)
    last_crash_log: str  # tail of the last crash's log since the last keep, "" if none
    in_flight: tuple[str, ...] = ()  # descriptions of candidates already running (waves)
    noise: Noise | None = None  # run-to-run noise of the metric on the best's hardware (None: no run yet)
    keep_z: float = 2.0  # a change is kept when it beats the best by more than this many standard errors
    best_runs: tuple[float, ...] = ()  # the best's runs on its hardware, the keep rule's incumbent (): none
    last_crash: int = 0  # the experiment whose log is last_crash_log
    data_dir: Path | None = None  # the built-in trainer's data dir: read-only to an agent (runenv.sandbox_paths)


@dataclass(frozen=True)
class Proposal:
    description: str  # one line, e.g. "MATRIX_LR 0.04→0.05"
    hypothesis: str
    area: str = ""
    params: dict[str, object] = field(default_factory=dict)


class ProposalError(Exception):
    """The proposer could not propose (agent failed, timed out, changed nothing).

    The message is meant for people; the engine logs it and counts a failure.
    """


class ProposalStopped(Exception):
    """The engine is stopping (SIGTERM) while the proposer works: no proposal and no failure of one;
    the next start proposes again."""


class Proposer(Protocol):
    areas: tuple[str, ...] | None  # focus areas; None = free text (agent)

    def propose(self, ctx: ProposalContext) -> Proposal:
        """Edit files in ctx.workspace and describe the edit."""
        ...
