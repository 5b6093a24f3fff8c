"""Benchmark the harness's scorer: where the seconds of `python harness.py score` go (issue 18).

    .venv/bin/python bench/scoring.py                 # tiny profile on CPU, default on GPU
    .venv/bin/python bench/scoring.py --repeat 5

Trains one model as the loop does (`python prepare.py run` in a throwaway workspace, data from
--data-dir, else $NIGHTLAB_DATA_DIR, else the offline `stdlib` corpus under --cache-dir), then runs
the scorer on it --repeat times in fresh processes, as `prepare.py run` does after training, and
prints the median of each part: the process itself (interpreter start, imports, exit; the imports
of torch and prepare's, as `python -X importtime -c "import harness"` counts them) and the phases the
scorer reports in its result (`phases`: start = the tokenizer read and the two model processes
started; rows = the eval rows from the data dir's cache; model = waiting while those processes
import train.py, build the model and load its weights; eval = the scoring loop; probe = the
causality probe's changed batch through the fresh model's process), then how the model's processes
were confined and how far the probe saw the honest model's logits move (numerical noise, which
the probe's tolerance must stay above). The first scorer call (it fills the eval
cache and warms the compile cache) is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nightlab.trainer.prepare import scorer_command  # no torch

import trainer as trainer_bench  # bench/trainer.py: the same workspace and data as the trainer's bench

profiles = trainer_bench.profiles  # trainer/profiles.py

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)$")
NAMED_IMPORTS = ("torch", "prepare", "pyarrow", "tiktoken")  # harness.py's imports worth a row


def score_once(ws: Path, env: dict[str, str], result: Path) -> dict[str, float]:
    """One scorer process: its wall time and the phases it reports (seconds)."""
    t0 = time.time()
    proc = subprocess.run(scorer_command(ws / "harness.py", "--result", str(result)),  # as `prepare.py run` starts it
                          cwd=ws, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    found = json.loads(result.read_text()) if result.is_file() else {}
    if proc.returncode != 0 or "bpb" not in found:
        sys.exit(f"bench: the scorer exited {proc.returncode}: {found or proc.stderr[-2000:]}")
    sandbox = next((line for line in proc.stdout.splitlines() if line.startswith("Model processes: ")), "?")
    return {"wall": wall, "score": found["score_seconds"], "bpb": found["bpb"], "moved": found["probe_moved"],
            "sandbox": sandbox, **{f"phase {k}": v for k, v in found["phases"].items()}}


def nested_imports(ws: Path, env: dict[str, str]) -> dict[str, tuple[float, int]]:
    """What importing harness.py costs: {module: (cumulative seconds, nesting level)} for torch and
    prepare (with its pyarrow and tiktoken); `-X importtime` lists each module once, indented two
    spaces a level (harness.py itself is level 0)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import harness"],
                          cwd=ws, env=env, capture_output=True, text=True, check=False)
    per: dict[str, tuple[float, int]] = {}
    for line in proc.stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m and m.group(3) in NAMED_IMPORTS:
            per[m.group(3)] = (int(m.group(1)) / 1e6, len(m.group(2)) // 2)
    return per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help=f"one of {', '.join(profiles.PROFILES)} (default: tiny without a GPU)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nightlab-bench-cache"))
    parser.add_argument("--repeat", type=int, default=3, help="scorer processes measured (median)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace and print its path")
    args = parser.parse_args(argv)
    profile = profiles.PROFILES[args.profile or trainer_bench.default_profile()]
    data_dir = trainer_bench.data_dir_for(args)
    root = Path(tempfile.mkdtemp(prefix="nightlab-bench-scoring-"))
    cache = Path(args.cache_dir) / "compile"
    env = {**os.environ, **profile.harness_env, "NIGHTLAB_DATA_DIR": str(data_dir),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    try:
        source = profiles.apply_constants((trainer_bench.TRAINER / "train.py").read_text(encoding="utf-8"),
                                          profile.constants)
        ws = trainer_bench.make_workspace(root / "ws", source)
        code, log, _ = trainer_bench._run([sys.executable, "prepare.py", "run"], ws, env)
        if code != 0:
            print(log[-4000:])
            print(f"bench: the training run exited {code}")
            return 1
        score_once(ws, env, root / "warm.json")  # eval cache and compile cache filled, not counted
        runs = [score_once(ws, env, root / f"r{i}.json") for i in range(max(1, args.repeat))]
        harness_imports = nested_imports(ws, env)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "sandbox"}
    phases = [k for k in runs[0] if k.startswith("phase ")]
    process = med["wall"] - med["score"]
    rows: list[tuple[str, float]] = [("scorer process, wall", med["wall"]),
                                     ("  python start, imports, exit", process)]
    for name in NAMED_IMPORTS:
        if name in harness_imports:
            seconds, level = harness_imports[name]
            rows.append((f"{'  ' * (1 + level)}import {name}", seconds))
    rows.append(("  score() (the harness's own figure)", med["score"]))
    rows += [(f"    {k.removeprefix('phase ')}", med[k]) for k in phases]
    print(f"bench: profile {profile.name}, {len(runs)} scorer runs (median), val_bpb {med['bpb']:.6f},"
          f" python {sys.version.split()[0]}, {os.cpu_count()} CPUs; the import rows are measured apart"
          " (python -X importtime -c 'import harness')")
    # an honest model's logits up to the probe's cuts, moved by numerical noise alone: PROBE_ATOL stays above it
    print(f"{runs[0]['sandbox']}\nprobe: the logits up to the cuts moved by at most {max(r['moved'] for r in runs):.3g}"
          " (an honest model: numerical noise; the probe's tolerance PROBE_ATOL is 0.01)")
    width = max(len(k) for k, _ in rows)
    print(f"{'part':<{width}}  seconds  share")
    for key, value in rows:
        print(f"{key:<{width}}  {value:7.3f}  {100 * value / med['wall']:4.0f}%")
    if args.keep:
        print(f"workspace: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
