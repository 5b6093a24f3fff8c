"""Scale: experiments per hour with N local slots, and 64 jobs in flight on a test Slurm.

A stub trainer (tests/fakes/stub_train.py) that sleeps a fixed time per run, and a proposer whose
every result is worse than the best (nothing kept or re-measured), so the only variables are the
slot count and nightlab.

- local N = 1, 2, 4, 8 slots (pinned fake GPUs; nothing runs on a GPU): experiments per hour,
  and the loop's overhead per experiment = slot time not spent in a run / experiments
  (proposing, committing, snapshots, launching, polling latency, judging, recording).
- uneven run lengths (1-5 s in turn), 4 local slots: waves vs the asynchronous mode (loop.mode),
  experiments per hour and how busy the slots were (run time / slot time).
- slurm: 64 one-GPU jobs in flight on the real single-node test Slurm (64 fake GPUs as gres),
  managed by the real daemon in its own process (tests/fakes/daemon_main.py: heartbeat/daemon.py's
  Daemon with the console channel, as `nightlab run`), executor.kind = "slurm", its engine child
  the real engine with the distinct-value proposer (tests/fakes/bench_engine.py). psutil samples
  the daemon, the engine child and their other children: CPU (% of one core over a window with
  every job in flight), RSS, and squeue calls per minute (a logging `squeue` first on the daemon's
  PATH). Then the wave finishes, the daemon stops, leftovers are scancelled, the cluster stops.

    .venv/bin/python bench/scale.py [--only local|uneven|slurm] [--sleep 3] [--waves 3] [--slurm-sleep 90] [--slurm-window 20]
                                    [--only local|slurm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nightlab.loop.engine import run_engine
from nightlab.loop.proposers.base import Proposal, ProposalContext
from nightlab.loop.state import ledger
from nightlab.loop.state.store import Store

from tests.fakes.daemon_config import stop_daemon, write_daemon_config
from tests.fakes.loop_workspace import make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.fakes.slurm_cluster import SlurmCluster, missing_binaries


def local(slots: int, sleep: float, waves: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_stub_workspace(Path(tmp), executor={"gpus": list(range(slots))},
                                       loop={"checkpoint_interval": 1.0})
        count = 1 + waves * slots  # the baseline (SLEEP 0) and `waves` full waves
        # every result worse than the best: one near it (a distinct value 0.0001 better) made the
        # noise-aware rule re-measure the best, zero-length runs counted as experiments
        run_engine(settings, count, proposer=Worse(sleep, lengths=(3.0,)))
        end = time.time()
        rows = ledger.experiments(Store.for_workspace(settings.workspace_path))[1:]
        # from the first proposal's start (the baseline run is not part of the waves) to the end
        window = end - min(e.started_at for e in rows if e.started_at is not None)
        busy = sum(e.duration_s or 0.0 for e in rows)
        return {"slots": slots, "experiments": len(rows), "wall_s": window,
                "per_hour": len(rows) / window * 3600, "overhead_s": (slots * window - busy) / len(rows)}


class Worse:
    """Run lengths from a fixed cycle (uneven by default), and every result worse than the baseline
    (nothing is kept or re-run), so what differs is only how the slots are filled."""

    areas = ("lr",)
    UNEVEN = (1.0, 5.0, 2.0, 4.0, 3.0)  # x --sleep / 3: mean = --sleep

    def __init__(self, sleep: float, lengths: tuple[float, ...] = UNEVEN) -> None:
        self.lengths = [length * sleep / 3.0 for length in lengths]

    def propose(self, ctx: ProposalContext) -> Proposal:
        k = len(ctx.history) + len(ctx.in_flight)
        step = {"set": {"VAL_BPB": [1.0 + 0.0001 * k], "SLEEP": self.lengths[k % len(self.lengths)]}}
        return ScriptedProposer([step]).propose(ctx)


def uneven(slots: int, mode: str, sleep: float, count: int) -> dict[str, Any]:
    """`count` experiments with uneven run lengths on `slots` local slots, in waves or async."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_stub_workspace(Path(tmp), executor={"gpus": list(range(slots))},
                                       loop={"checkpoint_interval": 1.0, "mode": mode,
                                             "pause_after_failures": 10_000})  # all discards: never self-pause
        run_engine(settings, 1 + count, proposer=Worse(sleep))
        end = time.time()
        rows = ledger.experiments(Store.for_workspace(settings.workspace_path))[1:]
        window = end - min(e.started_at for e in rows if e.started_at is not None)
        busy = sum(e.duration_s or 0.0 for e in rows)
        return {"experiments": len(rows), "wall_s": window, "per_hour": len(rows) / window * 3600,
                "busy": busy / (slots * window)}


def _squeue_wrapper(folder: Path, calls: Path) -> Path:
    """A `squeue` first on the daemon's PATH that logs each call (time, caller pid), then runs the
    real one: the daemon and its engine each count their calls in-process only."""
    real = shutil.which("squeue")
    assert real is not None
    folder.mkdir()
    script = folder / "squeue"
    script.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $PPID" >> {shlex.quote(str(calls))}\n'
                      f'exec {shlex.quote(real)} "$@"\n')
    script.chmod(0o755)
    return folder


def _cpu(t: Any) -> tuple[float, float]:
    """(the process's own CPU seconds, its reaped children's: squeue, sbatch, git ...)."""
    return t.user + t.system, t.children_user + t.children_system


def slurm(jobs: int, sleep: float, window: float, poll: float) -> dict[str, Any]:
    """The real daemon (heartbeat/daemon.py's Daemon, as `nightlab run` starts it) in its own
    process, executor.kind = "slurm" against the test cluster, its engine child with the
    DistinctProposer (tests/fakes/bench_engine.py); psutil watches both while `jobs` are in flight."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cluster = SlurmCluster(tmp / "slurm", gpus=jobs, cpus=jobs)
        cluster.start()
        proc: subprocess.Popen[bytes] | None = None
        log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed below, after the daemon
        try:
            (tmp / "w").mkdir()
            ws = make_stub_workspace(tmp / "w").workspace_path
            config = write_daemon_config(
                tmp / "nightlab.toml", ws, loop={"checkpoint_interval": 1.0}, heartbeat={"min_free_disk_gb": 0.0},
                executor={"kind": "slurm"},
                **{"executor.slurm": {"shared_dir": str(cluster.root / "shared"), "jobs": jobs, "poll_interval": poll}},
            )
            calls = tmp / "squeue-calls"
            wrapper = _squeue_wrapper(tmp / "bin", calls)
            env = {**cluster.env, "PATH": f"{wrapper}{os.pathsep}{cluster.env.get('PATH', os.defpath)}"}
            count = 1 + jobs  # the baseline, then one wave of `jobs`
            argv = [sys.executable, str(REPO / "tests/fakes/daemon_main.py"), str(config), str(ws),
                    "--max-experiments", str(count), "--channels",
                    "--", sys.executable, str(REPO / "tests/fakes/bench_engine.py"), "--sleep", f"{sleep:g}"]
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            store = Store.for_workspace(ws)

            def in_flight() -> int:
                return len(ledger.running_runs(store))

            deadline = t0 + 300
            while in_flight() < jobs:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{in_flight()} of {jobs} jobs in flight; see {tmp / 'daemon.log'}:\n"
                                       + (tmp / "daemon.log").read_text(errors="replace")[-3000:])
                time.sleep(0.2)
            launched = time.monotonic() - t0
            daemon, engine = psutil.Process(proc.pid), psutil.Process(store.get("engine.pid"))
            if engine.ppid() != daemon.pid:
                raise RuntimeError(f"engine.pid {engine.pid} is not the daemon's child")
            # measure while all jobs are in flight: CPU time over the window, RSS sampled every 0.5 s
            d0, e0, w0, wall0 = _cpu(daemon.cpu_times()), _cpu(engine.cpu_times()), time.monotonic(), time.time()
            rss = {"daemon": 0, "engine": 0, "others": 0, "total": 0}
            least, others_seen = jobs, 0
            while time.monotonic() - w0 < window:
                d_rss, e_rss = daemon.memory_info().rss, engine.memory_info().rss
                o_rss = 0
                for child in daemon.children(recursive=True):
                    if child.pid != engine.pid:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            o_rss += child.memory_info().rss
                            others_seen += 1
                for key, value in (("daemon", d_rss), ("engine", e_rss), ("others", o_rss),
                                   ("total", d_rss + e_rss + o_rss)):
                    rss[key] = max(rss[key], value)
                least = min(least, in_flight())
                time.sleep(0.5)
            d1, e1, w1, wall1 = _cpu(daemon.cpu_times()), _cpu(engine.cpu_times()), time.monotonic(), time.time()
            span = w1 - w0

            def pct(a: float, b: float) -> float:
                return (b - a) / span * 100

            cpu = {"daemon": pct(d0[0], d1[0]), "engine": pct(e0[0], e1[0]),
                   "others": pct(d0[1] + e0[1], d1[1] + e1[1])}
            cpu["total"] = sum(cpu.values())
            stamps = [line.split() for line in calls.read_text().splitlines() if line.strip()]
            in_window = [int(pid) for at, pid in stamps if wall0 <= float(at) <= wall1]
            squeue = {"daemon": in_window.count(proc.pid) / span * 60,
                      "engine": in_window.count(engine.pid) / span * 60}
            squeue["total"] = len(in_window) / span * 60
            # let the wave finish: the engine records all `count` and exits; the daemon then stops
            end = time.monotonic() + sleep * 2 + 180
            while len(ledger.experiments(store)) < count and proc.poll() is None and time.monotonic() < end:
                time.sleep(1.0)
            recorded = len(ledger.experiments(store))
            store.close()
            stopped_by_itself = proc.poll() is not None
            code = stop_daemon(proc, 60)
            return {"jobs": jobs, "launch_s": launched, "window_s": span, "least_in_flight": least,
                    "cpu": cpu, "rss_mb": {k: v / 2**20 for k, v in rss.items()}, "others_seen": others_seen,
                    "squeue_per_min": squeue, "poll_s": poll, "recorded": recorded,
                    "daemon_exit": code, "stopped_by_itself": stopped_by_itself}
        finally:
            if proc is not None:
                stop_daemon(proc, 60)
            log.close()
            cluster.stop()  # scancels what is left (a stopped daemon leaves its runs running, on purpose)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds per stub run (local)")
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--slurm-sleep", type=float, default=90.0,
                        help="seconds per stub run on Slurm: longer than submitting the wave + the window")
    parser.add_argument("--slurm-window", type=float, default=20.0, help="seconds of measurement, all jobs in flight")
    parser.add_argument("--slurm-poll", type=float, default=5.0, help="executor.slurm.poll_interval (the default)")
    parser.add_argument("--slurm-jobs", type=int, default=64)
    parser.add_argument("--uneven-count", type=int, default=20, help="experiments per mode, uneven run lengths")
    parser.add_argument("--only", choices=("local", "uneven", "slurm"), help="run one part only")
    args = parser.parse_args()
    if args.only in (None, "uneven"):
        lengths = ", ".join(f"{x:g}" for x in Worse(args.sleep).lengths)
        print(f"uneven run lengths ({lengths} s, in turn), 4 local slots, {args.uneven_count} experiments:")
        print(f"{'mode':>6} {'wall s':>7} {'exp/hour':>9} {'slots busy':>11}")
        for mode in ("waves", "async"):
            r = uneven(4, mode, args.sleep, args.uneven_count)
            print(f"{mode:>6} {r['wall_s']:>7.1f} {r['per_hour']:>9.0f} {r['busy'] * 100:>10.0f}%")
        print()
    if args.only in (None, "local"):
        print(f"local: stub run = {args.sleep:g} s, {args.waves} waves per N (after one baseline)")
        print(f"{'slots':>5} {'experiments':>11} {'wall s':>7} {'exp/hour':>9} {'vs N=1':>7} {'overhead s/exp':>15}")
        first = None
        for n in (1, 2, 4, 8):
            r = local(n, args.sleep, args.waves)
            first = first or r["per_hour"]
            print(f"{n:>5} {r['experiments']:>11} {r['wall_s']:>7.1f} {r['per_hour']:>9.0f} "
                  f"{r['per_hour'] / first:>6.2f}x {r['overhead_s']:>15.2f}")
    if args.only in ("local", "uneven"):
        return 0
    missing = missing_binaries()
    if missing:
        print(f"slurm: skipped (missing {', '.join(missing)})")
        return 0
    r = slurm(args.slurm_jobs, args.slurm_sleep, args.slurm_window, args.slurm_poll)
    n = r["jobs"]
    print(f"\nslurm: the daemon (a separate process) with {n} jobs in flight on the test Slurm"
          f" (fake gres gpu:{n}, stub run {args.slurm_sleep:g} s, poll_interval {r['poll_s']:g} s)")
    print(f"  all {n} submitted and tracked {r['launch_s']:.1f} s after the daemon started"
          f" (start-up + baseline run + propose, commit, snapshot, sbatch each)")
    print(f"  over {r['window_s']:.0f} s with {r['least_in_flight']}-{n} jobs in flight"
          f" (CPU: % of one core; RSS: the highest sample, every 0.5 s):")
    print(f"  {'process':<38} {'CPU %':>6} {'RSS MB':>7} {'squeue/min':>11}")
    labels = (("daemon", "daemon (heartbeat, bot, scheduler)"), ("engine", "engine child"),
              ("others", f"their children (squeue, sbatch, git){'' if r['others_seen'] else ' *'}"))
    for key, label in labels:
        rss = f"{r['rss_mb'][key]:.0f}" if key != "others" or r["others_seen"] else "-"
        squeue = f"{r['squeue_per_min'][key]:.1f}" if key in r["squeue_per_min"] else ""
        print(f"  {label:<38} {r['cpu'][key]:>6.1f} {rss:>7} {squeue:>11}")
    print(f"  {'daemon + engine + children':<38} {r['cpu']['total']:>6.1f} {r['rss_mb']['total']:>7.0f}"
          f" {r['squeue_per_min']['total']:>11.1f}")
    if not r["others_seen"]:
        print("  * short-lived: their CPU is what the daemon and the engine reaped; none alive at a sample")
    how = "by itself (--max-experiments reached)" if r["stopped_by_itself"] else "on SIGTERM once all were recorded"
    print(f"  recorded: {r['recorded']} experiments; the daemon stopped {how}, exit {r['daemon_exit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
