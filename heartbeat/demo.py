"""`nightlab demo`: a short offline night on this machine, through the real daemon.

Embedded defaults, the offline choices of config.example.toml: the `stdlib` corpus (built from
Python's own sources, no download), the search proposer (no LLM), the console channel (digests
printed here) and the `tiny` profile (40 optimizer steps per run, on the CPU or, when there is
one, the GPU). The daemon runs the baseline plus N experiments and stops by itself; then the
report (markdown) and the progress chart (PNG) are written and their paths printed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nightlab.heartbeat.daemon import Daemon, DaemonOptions
from nightlab.heartbeat.report import write_report
from nightlab.loop.state import views
from nightlab.loop.state.config import load_settings
from nightlab.loop.state.store import Store, state_dir

DEMO_CONFIG = """\
# written by `nightlab demo`; run it again with:
#   nightlab run --config {config} --max-experiments N
[workspace]
path = "{workspace}"

[data]
source = "stdlib"

[trainer]
profile = "tiny"

[proposer]
kind = "search"

[heartbeat]
check_interval = 2.0
run_timeout = 180.0       # a tiny run takes well under a minute
stall_after = 90.0
report_time = ""          # the report is written at the end instead
"""


def run_demo(workspace: Path | None, experiments: int) -> int:
    workspace = (Path(workspace) if workspace else Path(tempfile.mkdtemp(prefix="nightlab-demo-")) / "ws")
    workspace = workspace.expanduser().resolve()
    # Inside the workspace's state folder: never part of the git tree the loop works on.
    config = state_dir(workspace) / "demo.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(DEMO_CONFIG.format(config=config, workspace=workspace))
    settings = load_settings(config)
    done = views.recorded(workspace)
    if done < settings.loop.baseline_runs:
        print(f"nightlab demo: workspace {workspace}\n"
              f"  the baseline ({settings.loop.baseline_runs} runs, to see how much runs of one commit vary) + {experiments}"
              " experiments with the tiny profile; digests follow")
    else:
        print(f"nightlab demo: workspace {workspace}\n  {views.counted(experiments, 'more experiment')} ({done} recorded"
              " so far); digests follow")
    total = demo_limit(done, settings.loop.baseline_runs, experiments)
    code = Daemon(settings, DaemonOptions(max_experiments=total)).run()
    report = write_report(workspace, Store.for_workspace(workspace), settings.project)
    print(f"\nreport: {report.markdown_path}")
    if report.chart_path is not None:
        print(f"chart:  {report.chart_path}")
    print(f"config: {config} (nightlab run --config {config} --max-experiments N to go on)")
    return code


def demo_limit(recorded: int, baseline_runs: int, experiments: int) -> int:
    """The ledger size the demo stops at: a demo run again on its workspace goes on by N experiments
    (an unfinished baseline is finished first), rather than stopping at once on what it has."""
    return max(recorded, baseline_runs) + experiments
