"""The daemon's engine program for bench/scale.py's slurm row: `python -m nightlab.loop.engine`
with one difference, the proposer (DaemonOptions.engine_program; the daemon appends
`--config C --workspace W [--max-experiments N]` and its flags):

    python bench_engine.py --sleep S --config C --workspace W [--max-experiments N]

Everything else is the real engine's: the executor comes from the config (executor.kind =
"slurm": the SlurmExecutor, its Slurm commands found on PATH with the daemon's environment),
SIGTERM/SIGINT stop it at a checkpoint, and it exits when its parent daemon is gone. The proposer
gives member k of a wave a VAL_BPB no other experiment had and makes every run sleep S seconds,
so a whole wave stays in flight for a known time. The built-in search proposer's modules (numpy's model)
are imported as the default engine imports them, so the engine's memory is that of a real one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nightlab.loop.proposers.search  # noqa: F401 - loaded by the default engine: its memory counts
from nightlab.loop.engine import run_engine
from nightlab.loop.proposers.base import Proposal, ProposalContext
from nightlab.loop.state.config import load_settings

from tests.fakes.scripted_proposer import ScriptedProposer


class DistinctProposer:
    """Member k of a wave sets VAL_BPB to a value no other experiment had; every run sleeps."""

    areas = ("lr",)

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def propose(self, ctx: ProposalContext) -> Proposal:
        k = len(ctx.history) + len(ctx.in_flight)
        return ScriptedProposer([{"set": {"VAL_BPB": [1.0 - 0.0001 * k], "SLEEP": self.sleep}}]).propose(ctx)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sleep", type=float, required=True, help="seconds every stub run sleeps")
    p.add_argument("--config", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--max-experiments", type=int)
    p.add_argument("--daemon-settings", action="store_true")  # the daemon's engines get it; the file is read here
    p.add_argument("--secrets-on-stdin", action="store_true")  # the chat tokens on stdin: not read here
    args = p.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = load_settings(args.config)
    settings = dataclasses.replace(settings, workspace=dataclasses.replace(settings.workspace, path=args.workspace))
    return run_engine(settings, args.max_experiments, stop, proposer=DistinctProposer(args.sleep),
                      parent_pid=os.getppid())


if __name__ == "__main__":
    sys.exit(main())
