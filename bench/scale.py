"""Scale: experiments per hour with N local slots, and 64 jobs in flight on a test Slurm.

A stub trainer (tests/fakes/stub_train.py) that sleeps a fixed time per run, and a proposer that
gives every wave member a distinct value, so the only variables are the slot count and nightlab.

- local N = 1, 2, 4, 8 slots (pinned fake GPUs; nothing runs on a GPU): experiments per hour,
  and the loop's overhead per experiment = slot time not spent in a run / experiments
  (proposing, committing, snapshots, launching, polling latency, judging, recording).
- slurm: 64 one-GPU jobs in flight on the real single-node test Slurm (64 fake GPUs as gres), the
  engine's CPU and memory (RSS) while it watches them.

    .venv/bin/python bench/scale.py [--sleep 3] [--waves 3] [--slurm-sleep 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nightlab.loop import ledger
from nightlab.loop.engine import run_engine
from nightlab.loop.proposers.base import Proposal, ProposalContext
from nightlab.loop.slurm import SlurmExecutor
from nightlab.loop.store import Store

from tests.fakes.loop_workspace import make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.fakes.slurm_cluster import SlurmCluster, missing_binaries


class Distinct:
    """Member k of a wave sets VAL_BPB to a value no other experiment had; every run sleeps."""

    areas = ("lr",)

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def propose(self, ctx: ProposalContext) -> Proposal:
        k = len(ctx.history) + len(ctx.in_flight)
        return ScriptedProposer([{"set": {"VAL_BPB": [1.0 - 0.0001 * k], "SLEEP": self.sleep}}]).propose(ctx)


def local(slots: int, sleep: float, waves: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_stub_workspace(Path(tmp), executor={"gpus": list(range(slots))},
                                       loop={"checkpoint_interval": 1.0})
        count = 1 + waves * slots  # the baseline (SLEEP 0) and `waves` full waves
        run_engine(settings, count, proposer=Distinct(sleep))
        end = time.time()
        rows = ledger.experiments(Store.for_workspace(settings.workspace_path))[1:]
        # from the first proposal's start (the baseline run is not part of the waves) to the end
        window = end - min(e.started_at for e in rows if e.started_at is not None)
        busy = sum(e.duration_s or 0.0 for e in rows)
        return {"slots": slots, "experiments": len(rows), "wall_s": window,
                "per_hour": len(rows) / window * 3600, "overhead_s": (slots * window - busy) / len(rows)}


def slurm(jobs: int, sleep: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = SlurmCluster(Path(tmp) / "slurm", gpus=jobs, cpus=jobs)
        cluster.start()
        try:
            (Path(tmp) / "w").mkdir()
            settings = make_stub_workspace(
                Path(tmp) / "w", loop={"checkpoint_interval": 1.0},
                executor={"kind": "slurm", "slurm": {"shared_dir": str(cluster.root / "shared"), "jobs": jobs,
                                                     "poll_interval": 2.0}})
            ex = SlurmExecutor(settings.executor.slurm, settings.heartbeat.run_timeout, env=cluster.env)
            store = Store.for_workspace(settings.workspace_path)
            stop, me = threading.Event(), psutil.Process()
            thread = threading.Thread(target=run_engine, args=(settings, 1 + jobs, stop),
                                      kwargs={"proposer": Distinct(sleep), "executor": ex}, daemon=True)
            t0 = time.monotonic()
            thread.start()
            while len(ledger.running_runs(store)) < jobs and thread.is_alive():
                time.sleep(0.1)
            launched = time.monotonic() - t0
            # measure while all jobs are in flight
            cpu0, w0, calls0 = sum(me.cpu_times()[:2]), time.monotonic(), ex.squeue_calls
            rss = me.memory_info().rss
            while time.monotonic() - w0 < sleep * 0.5:
                rss = max(rss, me.memory_info().rss)
                time.sleep(0.5)
            window = time.monotonic() - w0
            cpu = (sum(me.cpu_times()[:2]) - cpu0) / window * 100
            calls = ex.squeue_calls - calls0
            thread.join(sleep * 4 + 120)
            rows = ledger.experiments(store)
            return {"jobs": jobs, "launch_s": launched, "cpu_percent": cpu, "rss_mb": rss / 2**20,
                    "squeue_per_min": calls / window * 60, "recorded": len(rows), "window_s": window}
        finally:
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds per stub run (local)")
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--slurm-sleep", type=float, default=20.0)
    parser.add_argument("--slurm-jobs", type=int, default=64)
    args = parser.parse_args()
    print(f"local: stub run = {args.sleep:g} s, {args.waves} waves per N (after one baseline)")
    print(f"{'slots':>5} {'experiments':>11} {'wall s':>7} {'exp/hour':>9} {'vs N=1':>7} {'overhead s/exp':>15}")
    first = None
    for n in (1, 2, 4, 8):
        r = local(n, args.sleep, args.waves)
        first = first or r["per_hour"]
        print(f"{n:>5} {r['experiments']:>11} {r['wall_s']:>7.1f} {r['per_hour']:>9.0f} "
              f"{r['per_hour'] / first:>6.2f}x {r['overhead_s']:>15.2f}")
    missing = missing_binaries()
    if missing:
        print(f"slurm: skipped (missing {', '.join(missing)})")
        return 0
    r = slurm(args.slurm_jobs, args.slurm_sleep)
    print(f"\nslurm: {r['jobs']} jobs in flight (stub run {args.slurm_sleep:g} s, fake gres gpu:{r['jobs']})")
    print(f"  all {r['jobs']} submitted and tracked after {r['launch_s']:.1f} s (propose + commit + worktree + sbatch each)")
    print(f"  engine while watching them: CPU {r['cpu_percent']:.1f}% of one core, RSS {r['rss_mb']:.0f} MB"
          f" (this bench process), squeue {r['squeue_per_min']:.0f}/min for all jobs together"
          f" over {r['window_s']:.0f} s")
    print(f"  recorded: {r['recorded']} experiments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
