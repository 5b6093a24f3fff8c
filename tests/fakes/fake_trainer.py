"""A trainer that misbehaves, for the heartbeat's tests.

    python fake_trainer.py hang   PIDFILE   # prints forever (never stalls), never finishes
    python fake_trainer.py silent PIDFILE   # one line, then nothing, never finishes
    python fake_trainer.py flood  PIDFILE   # prints as fast as it can, never finishes

Both first start a child of their own (a stand-in for a dataloader worker) and write
"<own pid> <child pid>" to PIDFILE, so a test can check that the whole tree was killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main() -> None:
    mode, pidfile = sys.argv[1], sys.argv[2]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}\n")
    os.replace(pidfile + ".tmp", pidfile)
    print("step 0: starting", flush=True)
    step = 0
    while mode == "flood":  # ~6 MB/s: a print in a tight loop, at a pace the test's disk does not mind
        sys.stdout.write(f"step {step}: loss nan\n" * 4000)
        step += 1
        time.sleep(0.01)
    while True:
        time.sleep(0.2)
        if mode == "hang":
            step += 1
            print(f"step {step}: still going", flush=True)


if __name__ == "__main__":
    main()
