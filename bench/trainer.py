"""Benchmark the built-in trainer: one short run of trainer/train.py under a profile.

    .venv/bin/python bench/trainer.py                    # tiny profile on CPU, default on GPU, 90 s
    .venv/bin/python bench/trainer.py --budget 30 --profile tiny --untrained

Builds a throwaway workspace (train.py with the profile's constants + prepare.py), points it
at a data dir (--data-dir, else $NIGHTLAB_DATA_DIR, else the offline `stdlib` corpus prepared
under --cache-dir), runs `python train.py` with the profile's harness env and TIME_BUDGET =
--budget, and prints: steady-state tokens/s, median step time, MFU, overhead (total -
training seconds), peak memory, val_bpb, attention backend. --untrained also scores the
freshly initialised model with the same evaluate_bpb, for comparison.
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
sys.path.insert(0, str(TRAINER))

import profiles  # trainer/profiles.py: no torch
from nightlab.loop.summary import parse_summary

STEP_LINE = re.compile(r"^step (\d+) \([\d.]+%\) \| loss [\d.]+ \| lrm [\d.]+ \| dt (\d+)ms")

UNTRAINED = """
import importlib.util, torch
spec = importlib.util.spec_from_file_location("train", "train.py")
train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)
from prepare import Tokenizer, evaluate_bpb, MAX_SEQ_LEN
torch.manual_seed(train.SEED)
tok = Tokenizer.from_directory()
model = train.GPT(train.build_model_config(train.DEPTH, tok.get_vocab_size(), MAX_SEQ_LEN, "sdpa"))
model.init_weights()
print(f"untrained_val_bpb={evaluate_bpb(model, tok, train.DEVICE_BATCH_SIZE):.6f}")
"""


def default_profile() -> str:
    try:
        import torch

        return "default" if torch.cuda.is_available() else "tiny"
    except ImportError:
        return "tiny"


def data_dir_for(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    if os.environ.get("NIGHTLAB_DATA_DIR"):
        return Path(os.environ["NIGHTLAB_DATA_DIR"])
    import prepare

    return prepare.prepare("stdlib", cache_dir=Path(args.cache_dir), tokenizer_max_chars=20_000_000)


def make_workspace(root: Path, profile: profiles.Profile) -> Path:
    ws = root / "workspace"
    ws.mkdir()
    shutil.copy(TRAINER / "prepare.py", ws / "prepare.py")
    source = (TRAINER / "train.py").read_text(encoding="utf-8")
    (ws / "train.py").write_text(profiles.apply_constants(source, profile.constants), encoding="utf-8")
    return ws


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=90, help="TIME_BUDGET in seconds (default 90)")
    parser.add_argument("--profile", default=None, help=f"one of {', '.join(profiles.PROFILES)} (default: tiny without a GPU)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nightlab-bench-cache"))
    parser.add_argument("--untrained", action="store_true", help="also evaluate the untrained model")
    parser.add_argument("--keep", action="store_true", help="keep the workspace and print its path")
    parser.add_argument("--log", default=None, help="also write the run's log here")
    return parser


def measure(argv: list[str] | None = None) -> list[tuple[str, str]] | None:
    """One benchmark run with the command line's options; the table's rows, None when train.py failed."""
    args = build_parser().parse_args(argv)

    profile = profiles.PROFILES[args.profile or default_profile()]
    data_dir = data_dir_for(args)
    root = Path(tempfile.mkdtemp(prefix="nightlab-bench-"))
    try:
        ws = make_workspace(root, profile)
        env = {**os.environ, **profile.harness_env, "NIGHTLAB_DATA_DIR": str(data_dir), "NIGHTLAB_TIME_BUDGET": str(args.budget)}
        untrained = None
        if args.untrained:
            out = subprocess.run([sys.executable, "-c", UNTRAINED], cwd=ws, env=env, capture_output=True, text=True, check=False)
            match = re.search(r"untrained_val_bpb=([\d.]+)", out.stdout)
            untrained = float(match.group(1)) if match else None
            if untrained is None:
                print(out.stdout + out.stderr, file=sys.stderr)
        print(f"bench: profile {profile.name}, budget {args.budget}s, data {data_dir}", flush=True)
        t0 = time.time()
        run = subprocess.run([sys.executable, "train.py"], cwd=ws, env=env, capture_output=True, text=True, check=False)
        wall = time.time() - t0
        log = run.stdout + run.stderr
        if args.log:
            Path(args.log).write_text(log, encoding="utf-8")
        if run.returncode != 0:
            print(log[-4000:])
            print(f"bench: train.py exited {run.returncode}")
            return None
        summary = parse_summary(run.stdout)
        m = summary.metrics
        untimed = int(profiles.read_constants((ws / "train.py").read_text(), ["UNTIMED_STEPS"])["UNTIMED_STEPS"])
        dts = [int(mt.group(2)) for line in run.stdout.splitlines() if (mt := STEP_LINE.match(line)) and int(mt.group(1)) >= untimed]
        backend = re.search(r"^attention_backend: (\S+)", run.stdout, re.MULTILINE)
        device = re.search(r"^device: (.+)$", run.stdout, re.MULTILINE)
        mfu = re.search(r"^mfu_percent:\s+(\S+)", run.stdout, re.MULTILINE)
        rows = [
            ("profile", profile.name),
            ("device", device.group(1) if device else "?"),
            ("attention backend", backend.group(1) if backend else "?"),
            ("time budget (s)", f"{args.budget}"),
            ("steps", f"{m.get('num_steps', 0):.0f}"),
            ("tokens/s (steady state)", f"{m.get('tokens_per_sec', 0):,.0f}"),
            ("step time median (ms)", f"{statistics.median(dts):.0f}" if dts else "n/a"),
            ("MFU (%)", mfu.group(1) if mfu else "n/a"),
            ("training seconds", f"{m.get('training_seconds', 0):.1f}"),
            ("total seconds", f"{m.get('total_seconds', 0):.1f}"),
            ("overhead (total - training, s)", f"{m.get('total_seconds', 0) - m.get('training_seconds', 0):.1f}"),
            ("  startup (s)", f"{m.get('startup_seconds', 0):.1f}"),
            ("  eval (s)", f"{m.get('eval_seconds', 0):.1f}"),
            ("process wall (s)", f"{wall:.1f}"),
            ("peak memory (MB)", f"{m.get('peak_vram_mb', 0):.1f}"),
            ("val_bpb", f"{m.get('val_bpb', float('nan')):.6f}"),
        ]
        if untrained is not None:
            rows.append(("val_bpb untrained", f"{untrained:.6f}"))
        if args.keep:
            print(f"workspace: {ws}")
        return rows
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    rows = measure(argv)
    if rows is None:
        return 1
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 20))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
