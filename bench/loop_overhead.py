"""The loop's own overhead per experiment: everything but the training process and the proposer.

A stub trainer that exits at once (`cat` of a file holding the summary block) and a proposer that
rewrites one number, so nearly all the time left is nightlab's: git, the ledger, the exports,
launching and polling, events.

    .venv/bin/python bench/loop_overhead.py [--experiments 60]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nightlab.loop.engine import run_engine
from nightlab.loop.proposers.base import Proposal, ProposalContext
from nightlab.loop.state import ledger
from nightlab.loop.state.config import Settings, settings_from_table
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import init_workspace


class RandomWalk:
    """Rewrites val_bpb in result.txt; the time it takes is measured and left out."""

    areas = None

    def __init__(self) -> None:
        self.seconds = 0.0
        self.rng = random.Random(0)

    def propose(self, ctx: ProposalContext) -> Proposal:
        start = time.perf_counter()
        value = 1.0 - 0.001 * len(ctx.history) + self.rng.uniform(-0.01, 0.01)
        (ctx.workspace / "result.txt").write_text(f"---\nval_bpb: {value:.6f}\npeak_vram_mb: 1.0\n")
        self.seconds += time.perf_counter() - start
        return Proposal(f"val_bpb -> {value:.4f}", "noise")


def stub_workspace(root: Path, run_command: str, protected: dict[str, str],
                   loop: dict[str, Any] | None = None) -> Settings:
    """A nightlab workspace in `root`/ws whose only editable file is result.txt (the summary block
    the stub trainer prints, rewritten by RandomWalk), beside the `protected` files; its settings."""
    repo = root / "ws"
    repo.mkdir()
    (repo / "result.txt").write_text("---\nval_bpb: 1.000000\n")
    for name, text in protected.items():
        (repo / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "i"], check=True)
    settings = settings_from_table({
        "workspace": {"path": str(repo), "tag": "bench"},
        "project": {"run_command": run_command, "editable": ["result.txt"], "protected": list(protected)},
        **({"loop": loop} if loop else {}),
    })
    init_workspace(repo, "bench", settings, say=lambda _: None)
    return settings


def measure(n: int = 60) -> dict[str, float]:
    """Run `n` experiments with the stub trainer; seconds per experiment that are nightlab's own."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = stub_workspace(Path(tmp), "cat result.txt", {"harness.txt": "fixed\n"})
        proposer = RandomWalk()
        start = time.perf_counter()
        run_engine(settings, n, proposer=proposer)
        total = time.perf_counter() - start
        rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
        training = sum(e.duration_s or 0.0 for e in rows)
    return {"experiments": n, "kept": sum(e.status == "keep" for e in rows), "wall_s": total,
            "training_s": training / n, "overhead_s": (total - training - proposer.seconds) / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=60)
    n = parser.parse_args().experiments
    m = measure(n)
    print(f"experiments:             {n} ({m['kept']} kept)")
    print(f"wall time:               {m['wall_s']:.2f} s")
    print(f"experiments per minute:  {n / m['wall_s'] * 60:.0f}")
    print(f"trainer processes:       {m['training_s'] * 1000:.0f} ms per experiment")
    print(f"loop overhead:           {m['overhead_s'] * 1000:.0f} ms per experiment (target <= 1000 ms)")
    return 0 if m["overhead_s"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
