"""A stub trainer: copied into test workspaces as train.py, so its behaviour is its content.

The scripted proposer rewrites the UPPER_CASE constants below, exactly like the search proposer
rewrites the real train.py's. VAL_BPB is a list: the n-th run of the same file content prints the
n-th value (the last one repeats), so repeated baselines and confirm runs see realistic noise.

With $NIGHTLAB_STUB_GATES set to a folder, the run of experiment N prints its summary only once
the file <folder>/N exists (tests/fakes/loop_workspace.Gates): the test decides the order in
which runs end, not the lengths of their sleeps.
"""

import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

# A blank line between constants: changes to different ones merge cleanly (git needs an unchanged
# line between two changes), as a re-made (rebased) change must.
VAL_BPB = [1.0]

MODE = "ok"  # ok | crash | nan | oom | datafail | nosummary | hang | spawn (hang with a child process) | engine (names the engine's own figures) | harness (writes prepare.py) | python (the harness finds the scorer's Python changed) | ledger (raises the best's recorded val_bpb in the workspace's state.db)

SLEEP = 0.0  # seconds of "training" before the summary

PEAK_VRAM_MB = 1024.0

GAIN = 0.0  # subtracted from val_bpb: a better result that leaves VAL_BPB alone

WALL = []  # the seconds the harness timed the training command for (its METRIC), by run as VAL_BPB; [] none

here = pathlib.Path(__file__).resolve()
# per content, in the run's own directory (a wave's snapshots count apart; not .nightlab, which is
# read-only to a run) or one shared folder
counts = pathlib.Path(os.environ.get("NIGHTLAB_STUB_COUNTS", here.parent / ".stub"))
counter = counts / ("stub-" + hashlib.sha1(here.read_bytes()).hexdigest()[:12])
counter.parent.mkdir(exist_ok=True)
(counts / ".gitignore").write_text("*\n")  # not the workspace's change: git ignores the folder
with open(counts / "stub.lock", "w") as lock:  # runs of a wave may start at the same moment
    fcntl.flock(lock, fcntl.LOCK_EX)
    seen = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(seen + 1))
value = VAL_BPB[min(seen, len(VAL_BPB) - 1)]
# A slower hardware class: $NIGHTLAB_STUB_OFFSETS = {"<GPU model>": added to val_bpb}, the model
# being this run's GPU as the fake nvidia-smi names it ($NIGHTLAB_FAKE_GPUS, by index).
gpus = os.environ.get("NIGHTLAB_FAKE_GPUS", "").split(",")
device = os.environ.get("CUDA_VISIBLE_DEVICES", "")
model = gpus[int(device)] if device.isdigit() and int(device) < len(gpus) else ""
value -= GAIN
value += json.loads(os.environ.get("NIGHTLAB_STUB_OFFSETS", "{}")).get(model, 0.0)

print(f"step 00001 | loss 4.2 | cuda={os.environ.get('CUDA_VISIBLE_DEVICES')!r} | budget={os.environ.get('NIGHTLAB_TIME_BUDGET')!r}", flush=True)
if MODE in ("hang", "spawn"):
    if MODE == "spawn":
        # named by a tag, not its pid: the run's pids are its sandbox's own (a PID namespace)
        tag = f"stub-child-{time.time_ns()}"
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", tag])
        print(f"child {tag}", flush=True)
    while True:
        time.sleep(0.05)
time.sleep(SLEEP)
if os.environ.get("NIGHTLAB_STUB_GATES"):
    number = pathlib.Path(os.environ["NIGHTLAB_EXIT_FILE"]).name.split(".")[0]  # runs/N.log.exit
    gate = pathlib.Path(os.environ["NIGHTLAB_STUB_GATES"]) / number
    given_up = time.monotonic() + 300  # a failed test never opens it: do not outlive the suite
    while not gate.exists():
        if time.monotonic() > given_up:
            print(f"the gate {gate} never opened", flush=True)
            sys.exit(5)
        time.sleep(0.02)
if MODE == "harness":  # a change that writes the harness where it runs (the workspace: one slot)
    harness = pathlib.Path("prepare.py")
    harness.chmod(0o644)
    harness.write_text(harness.read_text() + "VALUE = 0\n")
if MODE == "python":  # the harness's words for a file that appeared in site-packages since the change began
    print(f"REJECTED: the Python environment the scorer runs in changed since {os.environ.get('NIGHTLAB_PYTHON_SINCE')}"
          " (/venv/site-packages/zz.pth): remove what you did not install", flush=True)
    sys.exit(3)
if MODE == "ledger":  # the trick: the best's recorded val_bpb raised where the keep rule reads it
    import sqlite3

    ledger = pathlib.Path(os.environ["NIGHTLAB_EXIT_FILE"]).parent.parent / "state.db"  # .nightlab/runs/N.log.exit
    try:
        with sqlite3.connect(ledger, timeout=30) as db:
            db.execute("UPDATE experiments SET metric = 9.0, best = 9.0")
        print("ledger: written", flush=True)
    except sqlite3.Error as e:
        print(f"ledger: refused ({e})", flush=True)
if MODE == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom", flush=True)
    sys.exit(3)
if MODE == "oom":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(1)
# $NIGHTLAB_STUB_DATA: a data dir whose shard a test damages and repairs during a night
# (tests/fakes/loop_workspace.StubData); a good shard ends with parquet's footer magic
data = os.environ.get("NIGHTLAB_STUB_DATA")
shard = pathlib.Path(data or "/data") / "shard_00003.parquet"
if MODE == "datafail" or (data and not shard.read_bytes().endswith(b"PAR1")):
    # the harness's words for a shard that went bad during the night
    print(f"FAIL: data: {shard} is damaged (ZSTD decompression failed); replace it", flush=True)
    sys.exit(1)
if MODE == "nosummary":
    sys.exit(0)
print("---")
print(f"val_bpb:          {'nan' if MODE == 'nan' else f'{value:.6f}'}")
print("training_seconds: 0.1")
print(f"peak_vram_mb:     {PEAK_VRAM_MB:.1f}")
print("mfu_percent:      1.00")
print("depth:            2")
if WALL:
    print(f"METRIC training_command_seconds={WALL[min(seen, len(WALL) - 1)]}")
if MODE == "engine":  # the engine's own figures, as lines train.py wrote into the log itself
    print("METRIC heldout_gain=0.5\nMETRIC overtime_seconds=99")
