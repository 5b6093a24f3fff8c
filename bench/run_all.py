"""Every benchmark of the product in one table (markdown, ready for the README).

    .venv/bin/python bench/run_all.py            # ~35 s on a 2-core CPU box
    .venv/bin/python bench/run_all.py --quick    # fewer samples, for a smoke check

Rows, and where each number comes from:
- loop overhead per experiment: bench/loop_overhead.py's measure() (stub trainer, no proposer time);
- command -> reply and experiment end -> digest, p50/p95: bench/bot_latency.py's measure() (the bot
  with Telegram and Slack up against the fake servers);
- daemon RSS and idle CPU: a real `nightlab run` (Telegram + Slack on, against the fakes, the loop
  paused so nothing runs), watched with psutil; its engine child is reported beside it;
- trainer: bench/trainer.py's measure() when a GPU is visible (otherwise the row says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# bench/ is not a package: its scripts are imported by path (their CLIs stay as they were)
import bot_latency
import loop_overhead


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _p50_p95(values: list[float]) -> str:
    return f"p50 {_ms(statistics.median(values))}, p95 {_ms(bot_latency.percentile(values, 0.95))}"


def daemon_idle(seconds: float) -> dict[str, float]:
    """RSS (MB) and CPU (% of one core) of an idle `nightlab run` and of its engine child."""
    import psutil
    from nightlab.loop.state.steering import send_command

    from tests.fakes.daemon_config import stop_daemon, write_daemon_config
    from tests.fakes.loop_workspace import make_stub_workspace
    from tests.fakes.slack_server import FakeSlack
    from tests.fakes.telegram_server import FakeTelegram

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(name, None)
    tmp = Path(tempfile.mkdtemp(prefix="nightlab-bench-idle-"))
    ws = make_stub_workspace(tmp).workspace_path
    # Paused before the engine starts: it applies the pause at its first checkpoint and then only
    # ticks, so what is measured is the daemon's own idle cost (heartbeat, bot, engine ticks).
    send_command(ws, "pause", "bench")
    with FakeTelegram() as tg, FakeSlack() as slack:
        config = write_daemon_config(
            tmp / "nightlab.toml", ws, telegram=(tg, 111, -1001), slack=(slack, "UOP", "CLAB"),
            heartbeat={"min_free_disk_gb": 0.0},
        )
        env = {**os.environ, "NIGHTLAB_TELEGRAM_TOKEN": tg.token, "NIGHTLAB_SLACK_BOT_TOKEN": slack.bot_token,
               "NIGHTLAB_SLACK_APP_TOKEN": slack.app_token}
        script = Path(sys.executable).with_name("nightlab")
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "nightlab.heartbeat.cli"]
        log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed below, after the daemon
        proc = subprocess.Popen([*argv, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            from nightlab.loop.state import ledger
            from nightlab.loop.state.store import Store

            store = Store.for_workspace(ws)
            deadline = time.monotonic() + 60
            while not (slack.connected(0.1) and "getUpdates" in tg.methods and ledger.paused(store)
                       and store.get("engine.pid")):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the daemon did not come up; see {tmp / 'daemon.log'}")
                time.sleep(0.2)
            time.sleep(3.0)  # start-up work (imports, connections, first fills) is not idle time
            daemon, engine = psutil.Process(proc.pid), psutil.Process(store.get("engine.pid"))
            t0, d0, e0 = time.monotonic(), daemon.cpu_times(), engine.cpu_times()
            time.sleep(seconds)
            t1, d1, e1 = time.monotonic(), daemon.cpu_times(), engine.cpu_times()

            def cpu(a: Any, b: Any) -> float:
                # CPU times come in clock ticks, so an idle process can read a hair below zero.
                return max(0.0, (b.user + b.system - a.user - a.system) / (t1 - t0) * 100)

            result = {"daemon_rss_mb": daemon.memory_info().rss / 2**20, "engine_rss_mb": engine.memory_info().rss / 2**20,
                      "daemon_cpu_pct": cpu(d0, d1), "engine_cpu_pct": cpu(e0, e1), "seconds": t1 - t0}
        finally:
            stop_daemon(proc, 40)
            log.close()
    return result


def trainer_rows(budget: int) -> list[tuple[str, str, str]]:
    from nightlab.loop.executors.local import visible_gpus

    how = f"bench/trainer.py --budget {budget}"
    if not visible_gpus():
        return [("trainer (H100, default profile)", "not measured: no GPU on this machine", f"{how} on a GPU box")]
    import trainer as trainer_bench  # bench/trainer.py

    rows = trainer_bench.measure(["--budget", str(budget)])
    if rows is None:
        return [("trainer", "train.py failed (log above)", how)]
    wanted = ("device", "profile", "tokens/s (steady state)", "step time median (ms)", "MFU (%)",
              "peak memory (MB)", "val_bpb", "overhead (total - training, s)")
    table = dict(rows)
    return [(f"trainer: {key}", table[key], how) for key in wanted if key in table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke check, not numbers to publish)")
    parser.add_argument("--trainer-budget", type=int, default=90, help="TIME_BUDGET of the GPU trainer run (s)")
    args = parser.parse_args(argv)
    experiments, samples, idle_s = (15, 10, 5.0) if args.quick else (60, 50, 10.0)

    rows: list[tuple[str, str, str]] = []
    print(f"loop overhead: {experiments} experiments ...", file=sys.stderr, flush=True)
    with contextlib.redirect_stderr(io.StringIO()):  # the engine narrates every experiment
        loop = loop_overhead.measure(experiments)
    rows.append(("loop overhead per experiment", _ms(loop["overhead_s"]),
                 f"bench/loop_overhead.py: {experiments} experiments, stub trainer, proposer time excluded"))
    print(f"bot latency: {samples} samples each ...", file=sys.stderr, flush=True)
    bot = bot_latency.measure(samples)
    rows.append(("command → reply (Telegram /status)", _p50_p95(bot["replies"]),  # type: ignore[arg-type]
                 f"bench/bot_latency.py: fake Telegram, {samples} samples"))
    rows.append(("experiment end → digest (Telegram)", _p50_p95(bot["digests"]),  # type: ignore[arg-type]
                 f"bench/bot_latency.py: event written → message at the fake server, {samples} samples"))
    print(f"daemon idle: {idle_s:.0f} s ...", file=sys.stderr, flush=True)
    idle = daemon_idle(idle_s)
    rows.append(("daemon RSS (Telegram + Slack up, paused)",
                 f"{idle['daemon_rss_mb']:.0f} MB (engine child {idle['engine_rss_mb']:.0f} MB)",
                 "nightlab run against the fake servers, psutil"))
    rows.append(("daemon idle CPU (paused)",
                 f"{idle['daemon_cpu_pct']:.1f} % of a core (engine child {idle['engine_cpu_pct']:.1f} %)",
                 f"CPU time over {idle['seconds']:.0f} s of wall time, psutil"))
    rows += trainer_rows(args.trainer_budget)

    widths = [max(len(r[i]) for r in [("what", "number", "how"), *rows]) for i in range(3)]

    def line(cells: tuple[str, str, str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(("what", "number", "how")))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
