"""Each GPU profile on this GPU, with the process's memory capped to its tier's card.

    python bench/profiles_gpu.py                          # default, 24gb, 16gb, 8gb; 20 s each
    python bench/profiles_gpu.py --profiles 16gb,16gb-fp16 --budget 30 --data-dir /path/to/data
    python bench/profiles_gpu.py --profiles tiny --budget 5    # the same code path on a CPU

For each profile: a throwaway workspace (train.py with the profile's constants + prepare.py, as
bench/trainer.py makes it), then `python prepare.py run` there (train, then the harness scores) with the profile's harness env, the
budget and a small eval, training started through a short wrapper that first calls
`torch.cuda.set_per_process_memory_fraction` so the caching allocator refuses more than the
tier's card holds (24gb: 24 GiB, ...; no cap without CUDA). A name with -fp16 / -fp32 runs that
tier as adapted for a card without bf16 (needs a train.py that reads NIGHTLAB_DTYPE).

Profiles that would end past --deadline (default 225 s, so a whole call stays under 4 minutes
on a GPU lease) are listed as skipped. Prints one row per profile: memory cap, micro-batch, steps, steady-state tokens/s, the steps a
5-minute budget would make at that rate, peak memory, MFU, val_bpb, the smoothed training loss
first -> last, and pass/FAIL (pass: exit 0, no out-of-memory retry, peak under the cap, loss
fell). The tokens/s are this GPU's, not the tier's card's: the cap shows a profile fits, not how
fast a smaller card runs it. Data: --data-dir, else $NIGHTLAB_DATA_DIR, else the offline stdlib
corpus (bench/trainer.py's choice).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nightlab.loop.state.config import TrainerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer as bench_trainer  # bench/trainer.py: workspace + data, shared with the one-run bench

profiles = bench_trainer.profiles  # trainer/profiles.py (no torch)
parse_summary = bench_trainer.parse_summary

GPU_PROFILES = ("24gb", "16gb", "8gb", "default")  # smallest-risk first, so a short lease reports most
VARIANTS = {"fp16": (7, 5), "fp32": (6, 1)}  # the capability a -fp16 / -fp32 name stands for
FIVE_MINUTES = 300

# The training command: train.py as `python train.py` runs it, after capping this process's CUDA memory.
WRAPPER = """
import os, runpy, sys
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # train.py's, set before torch starts
import torch
cap = float(os.environ.get("NIGHTLAB_BENCH_MEMORY_GB") or 0)
if cap and torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
    print(f"bench: memory capped to {cap:g} GiB of {total / 2**30:.0f} GiB", flush=True)
sys.argv = ["train.py"]
runpy.run_path("train.py", run_name="__main__")
"""
LOSS = re.compile(r"^step \d+ \([\d.]+%\) \| loss ([\d.]+)", re.MULTILINE)


def resolve(name: str) -> profiles.Profile:
    base, _, variant = name.partition("-")
    if base not in profiles.PROFILES or (variant and variant not in VARIANTS):
        known = ", ".join([*profiles.PROFILES, *(f"{t}-{v}" for t in profiles.GPU_TIERS for v in VARIANTS)])
        raise SystemExit(f"bench: unknown profile {name!r}; one of {known}")
    profile = profiles.PROFILES[base]
    return profiles.for_capability(profile, VARIANTS[variant]) if variant else profile


def run_one(profile: profiles.Profile, data_dir: Path, budget: int, eval_tokens: int, log_dir: Path | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nightlab-profile-"))
    try:
        source = (bench_trainer.TRAINER / "train.py").read_text(encoding="utf-8")
        ws = bench_trainer.make_workspace(root / "ws", profiles.apply_constants(source, profile.constants))
        (ws / "capped_train.py").write_text(WRAPPER, encoding="utf-8")
        own_eval = int(profile.harness_env.get("NIGHTLAB_EVAL_TOKENS", 40 * 2**19))
        cap = profiles.TIER_MEMORY_GB.get(profile.name.split("-")[0], 0)
        # as `[trainer] time_budget` does in a night: seconds, also on tiny (whose own budget is steps)
        harness = TrainerSettings(time_budget=budget, eval_tokens=min(own_eval, eval_tokens)).harness_env(
            profile.harness_env)
        env = {**os.environ, **harness, "NIGHTLAB_DATA_DIR": str(data_dir),
               "NIGHTLAB_BENCH_MEMORY_GB": str(cap), "PYTHONUNBUFFERED": "1"}
        t0 = time.time()
        # the harness's run: training (behind the memory cap) without the validation shard, then scoring
        command = ["prepare.py", "run", "--command", f"{shlex.quote(sys.executable)} capped_train.py"]
        run = subprocess.run([sys.executable, *command], cwd=ws, env=env, capture_output=True, text=True, check=False)
        log = run.stdout + run.stderr
        if log_dir is not None:
            (log_dir / f"{profile.name}.log").write_text(log, encoding="utf-8")
        m = parse_summary(run.stdout).metrics
        losses = [float(x) for x in LOSS.findall(run.stdout)]
        tokens_per_s = m.get("tokens_per_sec", 0.0)
        step_tokens = m.get("total_batch_size") or int(str(profile.constants.get("TOTAL_BATCH_SIZE", 2**19)))
        problems = []
        if run.returncode != 0:
            failed = [line for line in log.splitlines() if line.startswith("FAIL")]
            problems.append(f"exit {run.returncode}" + (f" ({failed[-1][:80]})" if failed else ""))
        if "Out of memory at device batch" in run.stdout:
            problems.append("needed an out-of-memory retry")
        if cap and m.get("peak_vram_mb", 0) > cap * 1024:
            problems.append("peak above the cap")
        if len(losses) < 2 or losses[-1] >= losses[0]:
            problems.append("loss did not fall")
        return {
            "profile": profile.name, "cap": f"{cap} GiB" if cap else "none",
            "batch": f"{m.get('device_batch_size', 0):.0f}x{m.get('max_seq_len', 0):.0f}",
            "steps": f"{m.get('num_steps', 0):.0f}", "tok/s": f"{tokens_per_s:,.0f}",
            "steps/5min": f"{tokens_per_s * FIVE_MINUTES / step_tokens:,.0f}" if tokens_per_s else "n/a",
            "peak MB": f"{m.get('peak_vram_mb', 0):,.0f}", "MFU %": f"{m['mfu_percent']:.1f}" if "mfu_percent" in m else "n/a",
            "val_bpb": f"{m['val_bpb']:.4f}" if "val_bpb" in m else "n/a",
            "loss": f"{losses[0]:.2f}->{losses[-1]:.2f}" if losses else "n/a",
            "wall s": f"{time.time() - t0:.0f}", "result": "pass" if not problems else "FAIL: " + "; ".join(problems),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = [" | ".join(k.ljust(widths[k]) for k in keys), "-+-".join("-" * widths[k] for k in keys)]
    lines += [" | ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=",".join(GPU_PROFILES), help="comma-separated (default: the GPU tiers)")
    parser.add_argument("--budget", type=int, default=20, help="TIME_BUDGET per profile in seconds (default 20)")
    parser.add_argument("--eval-tokens", type=int, default=2**20, help="at most this many eval tokens (default 1M)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nightlab-bench-cache"))
    parser.add_argument("--log-dir", default=None, help="write each run's log here")
    parser.add_argument("--deadline", type=float, default=225.0,
                        help="start no profile that would end later than this many seconds in (default 225)")
    args = parser.parse_args(argv)
    chosen = [resolve(name.strip()) for name in args.profiles.split(",") if name.strip()]
    data_dir = bench_trainer.data_dir_for(args)
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: {len(chosen)} profile(s), {args.budget} s each, data {data_dir}", flush=True)
    rows: list[dict] = []
    start, longest = time.time(), 0.0
    for profile in chosen:
        if rows and time.time() - start + longest > args.deadline:  # the next run would end past it
            rows.append({**dict.fromkeys(rows[0], ""), "profile": profile.name,
                         "result": f"skipped: --deadline {args.deadline:g} s"})
            continue
        t0 = time.time()
        rows.append(run_one(profile, data_dir, args.budget, args.eval_tokens, log_dir))
        longest = max(longest, time.time() - t0)
        print(table(rows[-1:]).splitlines()[-1], flush=True)  # progress, in case the lease ends early
    print(table(rows))
    return 0 if all(r["result"] == "pass" or r["result"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
