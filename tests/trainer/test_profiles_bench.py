"""bench/profiles_gpu.py on a CPU: the tiny profile through the same path the GPU tiers take
(a throwaway workspace, `python train.py` behind the memory-cap wrapper, the table)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "bench" / "profiles_gpu.py"), "--data-dir", str(data_dir),
                           "--eval-tokens", "2048", *args], capture_output=True, text=True, timeout=300, check=False)


def test_tiny_runs_learns_and_the_deadline_skips(data_dir: Path) -> None:
    # the least budget: this checks the path and the table, not a result
    out = bench(data_dir, "--profiles", "tiny,tiny", "--budget", "1", "--deadline", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    header, _, first, second = out.stdout.strip().splitlines()[-4:]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in first.split("|")]))
    assert cells["profile"] == "tiny" and cells["cap"] == "none" and cells["result"] == "pass"
    assert int(cells["steps"]) > 0 and cells["batch"] == "4x256"
    before, after = (float(x) for x in cells["loss"].split("->"))
    assert after < before
    assert second.split("|")[-1].strip() == "skipped: --deadline 1 s"


def test_unknown_profile_is_named(data_dir: Path) -> None:
    out = bench(data_dir, "--profiles", "h100")
    assert out.returncode != 0 and "bench: unknown profile 'h100'; one of default, 24gb" in out.stderr
