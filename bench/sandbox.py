"""What the run sandbox (loop/executors/sandbox.py) adds to a run's start: a command that does
nothing, started as the local executor starts it (`/bin/sh -c <line>`), plain, through the
sandbox, in a sandbox nested in it (as the built-in trainer's harness starts its training
command: prepare.read_only_to), and through its launcher with the sandbox turned off
(NIGHTLAB_SANDBOX=0: the launcher's Python start alone). Alternated, `--repeat` times each; medians
and means. With `--cuda` (a GPU box: bench/gpu_checks.sh), also a CUDA matmul started in the
sandbox and in the nested one, which must print no `Run sandbox:` line.

    .venv/bin/python bench/sandbox.py [--repeat 30] [--cuda]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nightlab.loop.executors.sandbox import command_line, launcher, probe
from nightlab.trainer.prepare import ENV_SANDBOX_LAUNCHER, read_only_to


def started(line: str, env: dict[str, str]) -> float:
    begun = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", line], env=env, check=True, capture_output=True)
    return time.perf_counter() - begun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--cuda", action="store_true", help="also run a CUDA matmul in the sandbox")
    args = parser.parse_args()
    refused = probe()
    if refused:
        print(f"the kernel refuses the sandbox here ({refused}): the times below are the unconfined fallback's")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        (ws / ".nightlab" / "compile-cache").mkdir(parents=True)
        (ws / ".git").mkdir()
        (ws / "data").mkdir()
        protected, writable = [ws / ".nightlab", ws / ".git"], [ws / ".nightlab" / "compile-cache"]

        def nested(command: str) -> str:  # as the harness nests it, offered the launcher as a run's sandbox offers it
            return read_only_to(command, {ENV_SANDBOX_LAUNCHER: shlex.join(launcher())}, [ws / "data"])

        line = command_line("true", protected, writable)
        ways = {"plain": ("true", dict(os.environ)), "sandboxed": (line, dict(os.environ)),
                "nested in it": (command_line(nested("true"), protected, writable), dict(os.environ)),
                "launcher only (NIGHTLAB_SANDBOX=0)": (line, {**os.environ, "NIGHTLAB_SANDBOX": "0"})}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeat):
            for name, (command, env) in ways.items():
                times[name].append(started(command, env))
        if args.cuda:
            code = ("import torch; x = torch.randn(256, 256, device='cuda');"
                    " print('CUDA in the sandbox:', torch.cuda.get_device_name(), float((x @ x).sum()))")
            python = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
            cuda = command_line(f"{python} && {nested(python)}", protected, writable)
            done = subprocess.run(["/bin/sh", "-c", cuda], capture_output=True, text=True, timeout=300, check=False)
            print(f"{done.stdout}{done.stderr}exit {done.returncode}")
    print(f"| start of a run that does nothing ({args.repeat} each, alternated) | median | mean |")
    print("| --- | --- | --- |")
    for name, seen in times.items():
        print(f"| {name} | {statistics.median(seen) * 1000:.1f} ms | {statistics.fmean(seen) * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
