"""What a night leaves on disk, by category, per experiment: run logs, the agent's files, kept
models, the state database, git, the exports, and the bound on the compile caches (the stub
compiles nothing: how fast they grow is a GPU night's question). A stub trainer (a fixed summary
block after `--lines` progress lines, about what the harness prints in a 5-minute run) and a
proposer that rewrites one number, on one local slot.

Then what keeping the compile caches under their bound costs the loop: the walk the engine makes
once per wave, and a prune that halves them, on `--kernels` triton kernel folders (6 files each)
and twice as many inductor kernels (a source and its library) in plain files.

    .venv/bin/python bench/disk.py [--experiments 60] [--lines 600] [--kernels 10000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loop_overhead import RandomWalk, stub_workspace  # bench/loop_overhead.py: the same stub night
from nightlab.loop.compile_cache import cache_dir, entries, prune
from nightlab.loop.engine import run_engine

# one progress line as the harness prints it every 0.5 s when not on a terminal
PROGRESS = "step 00421 (46.8%) | loss: 3.421234 | lrm: 1.00 | dt: 322ms | tok/sec: 1,628,112 | mfu: 32.9% | epoch: 1 | remaining: 160s"


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def measure(n: int, lines: int, decided_log_mb: float) -> tuple[dict[str, int], float]:
    """The sizes by category, and the compile caches' bound in force (GB)."""
    with tempfile.TemporaryDirectory() as tmp:
        progress = "".join(f"{PROGRESS}\n" for _ in range(lines))
        settings = stub_workspace(Path(tmp), "cat progress.txt result.txt",
                                  {"harness.txt": "fixed\n", "progress.txt": progress}, {"decided_log_mb": decided_log_mb})
        repo = settings.workspace_path
        before = {"git": du(repo / ".git")}
        run_engine(settings, n, proposer=RandomWalk())
        state = repo / ".nightlab"
        sizes = {
            "run logs (.nightlab/runs)": du(state / "runs"),
            "state db (state.db)": du(state / "state.db"),
            "its write-ahead log (reused: 4 MB at most)": du(state / "state.db-wal"),
            "git objects (.git, grown)": du(repo / ".git") - before["git"],
            "exports (results.tsv, autoresearch.jsonl)": du(repo / "results.tsv") + du(repo / "autoresearch.jsonl"),
            "kept models (.nightlab/artifacts)": du(state / "artifacts"),
            "worktrees (.nightlab/worktrees)": du(state / "worktrees"),
            "compile caches (.nightlab/compile-cache)": du(cache_dir(repo)),
        }
        sizes["everything else in .nightlab"] = du(state) - sum(
            du(p) for p in (state / "runs", state / "artifacts", state / "worktrees", cache_dir(repo),
                            *state.glob("state.db*")))
        return sizes, settings.loop.compile_cache_gb


def cache_costs(kernels: int) -> tuple[int, float, float]:
    """Files in a cache of `kernels` triton kernels; seconds to walk it, and to prune it to half."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(kernels):
            folder = root / "triton" / f"{i:052d}"
            folder.mkdir(parents=True)
            for name in ("k.cubin", "k.ptx", "k.json", "k.ttir", "k.ttgir", "__grp__k.json"):
                (folder / name).write_bytes(b"x" * 100)
        for i in range(2 * kernels):
            stem = f"c{i:051x}"
            bucket = root / "inductor" / stem[-2:]
            bucket.mkdir(parents=True, exist_ok=True)
            for ext in (".cpp", ".so"):
                (bucket / (stem + ext)).write_bytes(b"x" * 100)
        files = 10 * kernels
        start = time.perf_counter()
        entries(root)
        walk = time.perf_counter() - start
        start = time.perf_counter()
        prune(root, files * 100 * 2 // 3)  # down to 3/4 of 2/3: half
        return files, walk, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=60)
    parser.add_argument("--lines", type=int, default=600, help="progress lines a run prints (600 = 5 min at 2/s)")
    parser.add_argument("--decided-log-mb", type=float, default=1.0, help="[loop] decided_log_mb (0 = logs kept whole)")
    parser.add_argument("--kernels", type=int, default=10000, help="triton kernels in the compile-cache timing (0: none)")
    args = parser.parse_args()
    sizes, bound_gb = measure(args.experiments, args.lines, args.decided_log_mb)
    print(f"{'category':45s} {'bytes':>12s} {'per experiment':>15s}")
    for name, size in sizes.items():
        print(f"{name:45s} {size:12,d} {size / args.experiments:15,.0f}")
    print(f"the compile caches are kept under [loop] compile_cache_gb = {bound_gb:g} GB (pruned between"
          " experiments, least recently used first); the stub trainer compiles nothing")
    if args.kernels:
        files, walk, pruned = cache_costs(args.kernels)
        print(f"a compile cache of {files:,} files: the walk once per wave {walk:.2f} s, a prune to half {pruned:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
