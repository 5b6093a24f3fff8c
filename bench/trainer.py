"""Benchmark the built-in trainer: one run as the loop runs it (`python prepare.py run`: train, then
the harness scores in its own process), optionally beside another train.py on the same data.

    .venv/bin/python bench/trainer.py                     # tiny profile on CPU, default on GPU
    .venv/bin/python bench/trainer.py --budget 40         # a 40 s wall-clock budget
    .venv/bin/python bench/trainer.py --budget 40 --other /path/to/upstream/train.py

Builds a throwaway workspace (train.py with the profile's constants + prepare.py + harness.py),
points it at a data dir (--data-dir, else $NIGHTLAB_DATA_DIR, else the offline `stdlib` corpus
prepared under --cache-dir) and prints: median step time and steady-state tokens/s (steps after
the 10 warm-up steps), MFU, total - training seconds split into start-up (process start to the
first timed step), scoring (the harness's scorer process, of which the eval loop), peak memory,
val_bpb and the attention backend. The compile caches live under --cache-dir, so a second call
with the same shapes starts warm (--cold: fresh caches).

--other PATH runs another train.py (e.g. upstream autoresearch's, fetched separately; never copy
it into this repository) in its own workspace next to our prepare.py, as `python train.py` with
the full data dir (it evaluates itself with prepare.evaluate_bpb), in the same call, and adds its
column and our/its ratio. Upstream's train.py loads FA3 through `kernels.get_kernel` at import;
unless --other-real-kernels, that run gets bench/kernels_shim first on its PYTHONPATH (SDPA causal
full attention, windows ignored), and the output says so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "trainer"
SHIM = Path(__file__).resolve().parent / "kernels_shim"
sys.path.insert(0, str(TRAINER))

from nightlab.loop.summary import parse_summary

import profiles  # trainer/profiles.py: no torch

# ours: "step 00012 (…) | loss 3.2 | lrm … | dt 313ms"; upstream's: "step 00012 (…) | loss: … | dt: 313ms", \r-separated
STEP_LINE = re.compile(r"step (\d+) \([\d.]+%\) \| loss:? [\d.]+ \| lrm:? [\d.]+ \| dt:? (\d+)ms")
WARMUP_STEPS = 10  # steps whose time neither trainer counts against its budget


def default_profile() -> str:
    try:
        import torch

        return "default" if torch.cuda.is_available() else "tiny"
    except ImportError:
        return "tiny"


def data_dir_for(args: argparse.Namespace) -> Path:
    """Absolute: the runs start in workspaces of their own."""
    if args.data_dir:
        return Path(args.data_dir).resolve()
    if os.environ.get("NIGHTLAB_DATA_DIR"):
        return Path(os.environ["NIGHTLAB_DATA_DIR"]).resolve()
    import prepare

    return prepare.prepare("stdlib", cache_dir=Path(args.cache_dir), tokenizer_max_chars=20_000_000)


def make_workspace(ws: Path, train_source: str) -> Path:
    ws.mkdir(parents=True)
    for name in ("prepare.py", "harness.py"):
        shutil.copy(TRAINER / name, ws / name)
    (ws / "train.py").write_text(train_source, encoding="utf-8")
    return ws


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=None,
                        help="wall-clock TIME_BUDGET in seconds (default: the profile's budget, steps for tiny)")
    parser.add_argument("--profile", default=None, help=f"one of {', '.join(profiles.PROFILES)} (default: tiny without a GPU)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nightlab-bench-cache"))
    parser.add_argument("--cold", action="store_true", help="fresh compile caches (a first experiment)")
    parser.add_argument("--other", default=None, help="another train.py to run in the same call, for a ratio")
    parser.add_argument("--other-real-kernels", action="store_true",
                        help="let --other import the real `kernels` package (needs it installed and its FA3 cached)")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces and print their paths")
    parser.add_argument("--log", default=None, help="also write our run's log here")
    return parser


def _run(command: list[str], ws: Path, env: dict[str, str]) -> tuple[int, str, float]:
    t0 = time.time()
    proc = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def figures(log: str, wall: float) -> dict[str, str]:
    """The table's figures from one run's log (ours or upstream's)."""
    m = parse_summary(log).metrics
    dts = [int(mt.group(2)) for piece in re.split(r"[\r\n]", log)
           if (mt := STEP_LINE.search(piece)) and int(mt.group(1)) >= WARMUP_STEPS]
    backend = re.search(r"^attention_backend: (\S+)", log, re.MULTILINE)
    device = re.search(r"^device: (.+)$", log, re.MULTILINE)
    mfu = re.search(r"^mfu_percent:\s+(\S+)", log, re.MULTILINE)
    total, training = m.get("total_seconds", wall), m.get("training_seconds", 0.0)
    median = statistics.median(dts) if dts else None
    tokens_per_sec = m.get("tokens_per_sec")
    if tokens_per_sec is None and median and m.get("num_steps"):  # upstream prints no tokens/s figure
        tokens_per_sec = m.get("total_tokens_M", 0.0) * 1e6 / m["num_steps"] / (median / 1000)
    return {
        "device": device.group(1) if device else "?",
        "attention backend": backend.group(1) if backend else "?",
        "steps": f"{m.get('num_steps', 0):.0f}",
        "step time median (ms)": f"{median:.0f}" if median else "n/a",
        "tokens/s (steady state)": f"{tokens_per_sec:,.0f}" if tokens_per_sec else "n/a",
        "MFU (%)": mfu.group(1) if mfu else "n/a",
        "training seconds": f"{training:.1f}",
        "total seconds": f"{total:.1f}",
        "overhead (total - training, s)": f"{total - training:.1f}",
        "  start-up (s)": f"{m['startup_seconds']:.1f}" if "startup_seconds" in m else "n/a",
        "  harness scoring (s)": f"{m['score_seconds']:.1f}" if "score_seconds" in m else "n/a (in-process eval)",
        "    of which eval loop (s)": f"{m['eval_seconds']:.1f}" if "eval_seconds" in m else "n/a",
        "process wall (s)": f"{wall:.1f}",
        "peak memory (MB)": f"{m.get('peak_vram_mb', 0):.1f}",
        "val_bpb": f"{m.get('val_bpb', float('nan')):.6f}",
    }


def _ratio(ours: str, other: str, higher_is_better: bool) -> str:
    try:
        a, b = float(ours.replace(",", "")), float(other.replace(",", ""))
    except ValueError:
        return ""
    if a == 0 or b == 0:
        return ""
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def measure(argv: list[str] | None = None) -> list[tuple[str, str]] | None:
    """Our run with the command line's options: the table's rows, None when it failed. With
    --other the rows carry both columns and the ratio as "ours | other | ratio"."""
    args = build_parser().parse_args(argv)
    profile = profiles.PROFILES[args.profile or default_profile()]
    data_dir = data_dir_for(args)
    root = Path(tempfile.mkdtemp(prefix="nightlab-bench-"))
    cache = Path(tempfile.mkdtemp(prefix="compile-", dir=root)) if args.cold else Path(args.cache_dir) / "compile"
    env = {**os.environ, **profile.harness_env, "NIGHTLAB_DATA_DIR": str(data_dir),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    if args.budget is not None:
        env["NIGHTLAB_TIME_BUDGET"] = str(args.budget)
        env.pop("NIGHTLAB_BUDGET_STEPS", None)
    budget = f"{env['NIGHTLAB_BUDGET_STEPS']} steps" if env.get("NIGHTLAB_BUDGET_STEPS") else f"{env.get('NIGHTLAB_TIME_BUDGET', 300)} s"
    try:
        ours_src = profiles.apply_constants((TRAINER / "train.py").read_text(encoding="utf-8"), profile.constants)
        ws = make_workspace(root / "ours", ours_src)
        print(f"bench: profile {profile.name}, budget {budget}, data {data_dir}, compile cache {cache}", flush=True)
        code, log, wall = _run([sys.executable, "prepare.py", "run"], ws, env)
        if args.log:
            Path(args.log).write_text(log, encoding="utf-8")
        if code != 0:
            print(log[-4000:])
            print(f"bench: our run exited {code}")
            return None
        ours = figures(log, wall)
        rows = [("profile", profile.name), ("budget", budget), *ours.items()]
        if args.other:
            other_ws = make_workspace(root / "other", Path(args.other).read_text(encoding="utf-8"))
            other_env = dict(env)
            if not args.other_real_kernels:
                other_env["PYTHONPATH"] = os.pathsep.join([str(SHIM), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
                sys.path.insert(0, str(SHIM))
                from kernels import SHIM_NOTE  # bench/kernels_shim: our own stand-in

                print(f"bench: --other runs with {SHIM} first on PYTHONPATH ({SHIM_NOTE})", flush=True)
            code, other_log, other_wall = _run([sys.executable, "train.py"], other_ws, other_env)
            if code != 0:
                print(other_log[-4000:])
                print(f"bench: --other {args.other} exited {code}")
                return None
            other = figures(other_log, other_wall)
            higher = {"tokens/s (steady state)": True, "step time median (ms)": False,
                      "overhead (total - training, s)": False, "MFU (%)": True}
            rows = [("profile", f"{profile.name} | {args.other}"), ("budget", budget)] + [
                (key, f"{value} | {other[key]} | {_ratio(value, other[key], higher[key]) if key in higher else ''}".rstrip(" |"))
                for key, value in ours.items()
            ]
        if args.keep:
            print(f"workspaces: {root}")
        return rows
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    rows = measure(argv)
    if rows is None:
        return 1
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 40))
    if any(" | " in value for _, value in rows[2:]):
        print(f"{'':<{width}}  ours | other | ours vs other")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
