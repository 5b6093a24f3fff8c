"""A run command that misbehaves on chosen invocations and otherwise runs the real trainer.

    python flaky_train.py --counter FILE [--hang 3] [--crash 5] [--pidfile FILE]
                          [--gates DIR --hold 1 ...] -- python prepare.py run

Every start adds one to the number in FILE (kept outside the workspace, so `git clean` never
resets it) and is that invocation: 1 is the first run the loop launches. A re-attached run is
not started again, so the count is also the number of times the loop really launched a run.

- hang:  prints one line, starts a child (a stand-in for a dataloader worker) and then stays
         silent forever: only the heartbeat's stall check can end it, and only by killing the
         whole process tree. A line is appended to --pidfile, whose path is an argument of both
         processes (their tag: tests/fakes/tagged.py).
- crash: prints a few progress lines and a traceback, exits 1 (what an exception in train.py
         looks like to the loop).
- hold:  waits until the file DIR/<n> exists (tests/fakes/loop_workspace.py's `Gates` opens it),
         printing a line every half second so the heartbeat never takes it for stalled, and then
         runs the command: a test steering that run knows it is still in flight.
- otherwise: exec()s the command after `--` (same pid, so the executor's handle stays valid).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time


def bump(counter: str) -> int:
    # Locked read-modify-write: two runs never share an invocation number.
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        n = int(text or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(f"{n}\n")
        f.flush()
        os.fsync(f.fileno())
    return n


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--counter", required=True)
    p.add_argument("--hang", type=int, action="append", default=[])
    p.add_argument("--crash", type=int, action="append", default=[])
    p.add_argument("--pidfile", default="")
    p.add_argument("--hold", type=int, action="append", default=[])
    p.add_argument("--gates", default="")
    args, command = p.parse_args(argv[:split]), argv[split + 1:]
    n = bump(args.counter)
    if n in args.hang:
        # the pidfile's path tags the child too: pids seen in the run's sandbox are its own (tests/fakes/tagged.py)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", *([args.pidfile] if args.pidfile else [])])
        if args.pidfile:
            with open(args.pidfile, "a") as f:
                f.write("hung\n")
        print(f"flaky_train: invocation {n}: hanging (silent from now on)", flush=True)
        while True:
            time.sleep(1)
    if n in args.crash:
        for step in range(3):
            print(f"step {step:05d} | loss 9.0 | flaky_train invocation {n}", flush=True)
            time.sleep(0.1)
        print("Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\n"
              f"RuntimeError: injected crash (flaky_train invocation {n})", flush=True)
        sys.exit(1)
    if n in args.hold:
        gate = os.path.join(args.gates, str(n))
        while not os.path.exists(gate):
            print(f"flaky_train: invocation {n}: held until {gate} exists", flush=True)
            time.sleep(0.5)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
