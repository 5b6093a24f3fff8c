"""Launch, poll and cancel training runs: the one place that knows how a run is executed.

The `Executor` protocol is what the engine and the heartbeat use; `LocalExecutor` runs each
command in its own process session on this machine, one per slot (a GPU, or a CPU slot), and
`nightlab.loop.slurm.SlurmExecutor` submits it as a batch job. A run never depends on the process
that launched it: the command runs under one small shell wrapper (both backends) that touches
`<log>.start` when the command starts and writes its exit status to `<log>.exit` when it ends,
and the handle (local: pid + the process's create time, so a reused pid is never mistaken for
our run; Slurm: the job id) is JSON, stored in the database and in `<log>.handle`, so a
restarted engine re-attaches or, if the run is gone, reads how it ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol

import psutil
from nightlab.loop import hardware
from nightlab.loop.config import Settings
from nightlab.loop.errors import UserError

# The exit-file protocol, shared by every backend. A stale status is removed first (a requeued
# Slurm job runs this again); the start marker's mtime is when the command really started (a
# batch job may wait in a queue long after submission), and the hardware probe's lines follow in
# it (what the run ran on, see loop/hardware.py). `( cmd )` in a subshell so an `exit` inside the
# user's command still reaches the status line; the status is written to a temp file and
# renamed, so a reader never sees half a number.
_WRAPPER_START = (
    'rm -f "$NIGHTLAB_EXIT_FILE"\n: > "$NIGHTLAB_EXIT_FILE.start"\n'
    + hardware.PROBE + 'nightlab_probe >> "$NIGHTLAB_EXIT_FILE.start"\n'
)
_WRAPPER_END = (
    'code=$?\nprintf "%s\\n" "$code" > "$NIGHTLAB_EXIT_FILE.tmp" '
    '&& mv -f "$NIGHTLAB_EXIT_FILE.tmp" "$NIGHTLAB_EXIT_FILE"\nexit $code\n'
)


def wrap(command: str) -> str:
    """The shell script that runs `command` under the exit-file protocol ($NIGHTLAB_EXIT_FILE)."""
    return f"{_WRAPPER_START}( {command}\n)\n{_WRAPPER_END}"


_CREATE_TIME_TOLERANCE_S = 0.01


@dataclass(frozen=True)
class Slot:
    """Where a run may execute: one GPU (pinned with CUDA_VISIBLE_DEVICES) or the CPU."""

    name: str  # "gpu0", "cpu0"
    gpu: int | None = None
    hardware: str = ""  # what runs here run on (loop/hardware.py); "" = known only once a run starts


@dataclass(frozen=True)
class RunSpec:
    command: str  # shell command line, run with cwd
    cwd: Path
    log_path: Path  # stdout+stderr; the exit status goes to <log>.exit
    slot: Slot
    env: dict[str, str] = field(default_factory=dict)  # added to the daemon's environment
    node: str = ""  # run on this node (a cluster backend), e.g. to confirm a result on the same GPU type


@dataclass(frozen=True)
class RunHandle:
    """JSON-serialisable identity of a launched run, for any backend.

    local: pid + create_time (job_id ""); slurm: job_id (pid 0). The field order is the
    original local one, and unknown or missing keys are tolerated on load, so handles stored by
    an older nightlab still load.
    """

    backend: str
    pid: int
    create_time: float
    log_path: str
    slot: str
    job_id: str = ""

    @property
    def key(self) -> str:
        if self.job_id:
            return f"{self.backend}:{self.job_id}"
        return f"{self.backend}:{self.pid}:{self.create_time:.3f}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunHandle:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data.setdefault("pid", 0)
        data.setdefault("create_time", 0.0)
        return cls(**data)


@dataclass(frozen=True)
class RunStatus:
    # pending: submitted, not started (a batch queue; a requeued job is pending again);
    # running; exited (the wrapper wrote the exit code); lost (gone without an exit code: killed)
    state: Literal["pending", "running", "exited", "lost"]
    exit_code: int | None = None
    # why a backend ended it, for the record, e.g. "timeout: Slurm time limit (--time 11:00)";
    # the engine stores it as the run's kill_reason unless someone's reason came first.
    reason: str = ""
    where: str = ""  # the node it runs on, when the backend says (Slurm)


class Executor(Protocol):
    backend: str
    shared_dir: Path | None  # where run snapshots and logs must live (None: the state dir)

    def slots(self) -> list[Slot]: ...

    def launch(self, spec: RunSpec) -> RunHandle: ...

    def poll(self, handles: list[RunHandle]) -> dict[str, RunStatus]: ...

    def cancel(self, handle: RunHandle, grace_s: float = 10.0) -> None: ...

    def read_log(self, handle: RunHandle, tail_bytes: int = 8192) -> str: ...


def exit_file(log_path: Path | str) -> Path:
    return Path(f"{log_path}.exit")


def handle_file(log_path: Path | str) -> Path:
    return Path(f"{log_path}.handle")


def start_file(log_path: Path | str) -> Path:
    return Path(f"{log_path}.exit.start")


def started_at(log_path: Path | str) -> float | None:
    """When the command really started (its wrapper's start marker), None if it has not yet."""
    try:
        return start_file(log_path).stat().st_mtime
    except OSError:
        return None


def run_hardware(log_path: Path | str) -> str:
    """What the run ran on, from the probe lines in its start marker ("" before it started)."""
    try:
        return hardware.describe(start_file(log_path).read_text(errors="replace"))
    except OSError:
        return ""


def read_exit_code(log_path: Path | str) -> int | None:
    try:
        return int(exit_file(log_path).read_text().strip())
    except (OSError, ValueError):
        return None


def read_tail(path: Path | str, tail_bytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def find_handle(log_path: Path | str) -> RunHandle | None:
    """The handle a launch left next to its log (a run launched just before a crash of ours)."""
    try:
        return RunHandle.from_json(handle_file(log_path).read_text())
    except (OSError, ValueError, TypeError):
        return None


def visible_gpus() -> list[int]:
    """GPU indices on this machine, found without importing torch: nvidia-smi, else /proc."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
        if out.returncode == 0:
            return [i for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]
    except (OSError, subprocess.TimeoutExpired):
        pass
    gpus = Path("/proc/driver/nvidia/gpus")
    return list(range(len(list(gpus.iterdir())))) if gpus.is_dir() else []


def _identity(handle: RunHandle) -> psutil.Process | None:
    """The live process behind a handle, or None (gone, a zombie, or a reused pid)."""
    try:
        proc = psutil.Process(handle.pid)
        if abs(proc.create_time() - handle.create_time) > _CREATE_TIME_TOLERANCE_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def clear_run_files(log_path: Path) -> None:
    """Before a launch: the files a previous attempt of the same log left (all backends)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (exit_file(log_path), handle_file(log_path), start_file(log_path)):
        stale.unlink(missing_ok=True)


def save_handle(handle: RunHandle) -> None:
    """`<log>.handle`, written right after a launch, so a crash before the database write adopts it."""
    target = handle_file(handle.log_path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(handle.to_json())
    tmp.replace(target)


class LocalExecutor:
    """Runs on this machine, one process session per run, one run per slot.

    Slots: the GPUs given (or all visible ones), each run pinned with CUDA_VISIBLE_DEVICES; with
    no GPU, `cpu_slots` CPU slots (tests, demos) that see no GPU at all.
    """

    backend = "local"
    shared_dir: Path | None = None

    def __init__(self, gpus: tuple[int, ...] = (), cpu_slots: int = 1) -> None:
        self._gpus = list(gpus)
        self._cpu_slots = max(1, cpu_slots)
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # reaped in poll(): no zombies
        self._slots: list[Slot] | None = None

    def slots(self) -> list[Slot]:
        """Probed once: each slot's hardware is known before its first run (a baseline per class)."""
        if self._slots is None:
            gpus = self._gpus or visible_gpus()
            if gpus:
                self._slots = [Slot(f"gpu{g}", g, hardware.probe(str(g))) for g in gpus]
            else:
                cpu = hardware.probe("")
                self._slots = [Slot(f"cpu{i}", None, cpu) for i in range(self._cpu_slots)]
        return self._slots

    def launch(self, spec: RunSpec) -> RunHandle:
        clear_run_files(spec.log_path)
        env = {
            **os.environ,
            **spec.env,
            "PYTHONUNBUFFERED": "1",
            "NIGHTLAB_EXIT_FILE": str(exit_file(spec.log_path)),
            # an empty value hides every GPU from a CPU-slot run
            "CUDA_VISIBLE_DEVICES": "" if spec.slot.gpu is None else str(spec.slot.gpu),
        }
        with open(spec.log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", wrap(spec.command)],
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own session: a daemon restart leaves it running
                )
            except OSError as exc:
                raise UserError(f"cannot start {spec.command!r} in {spec.cwd}: {exc}") from None
        self._children[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:  # exited already; the wrapper's exit file tells how
            create_time = time.time()
        handle = RunHandle(self.backend, proc.pid, create_time, str(spec.log_path), spec.slot.name)
        save_handle(handle)
        return handle

    def poll(self, handles: list[RunHandle]) -> dict[str, RunStatus]:
        statuses: dict[str, RunStatus] = {}
        for handle in handles:
            child = self._children.get(handle.pid)
            if child is not None and child.poll() is not None:
                del self._children[handle.pid]
            # The exit file first: it is written last by the wrapper, so it is final.
            code = read_exit_code(handle.log_path)
            if code is not None:
                statuses[handle.key] = RunStatus("exited", code)
            elif _identity(handle) is not None:
                statuses[handle.key] = RunStatus("running")
            else:  # the wrapper may have finished between the two checks
                code = read_exit_code(handle.log_path)
                statuses[handle.key] = RunStatus("lost" if code is None else "exited", code)
        return statuses

    def cancel(self, handle: RunHandle, grace_s: float = 10.0) -> None:
        """SIGTERM the run's whole tree (its process group and every descendant), SIGKILL the rest."""
        procs: list[psutil.Process] = []
        leader = _identity(handle)
        if leader is not None:
            try:
                procs = [leader, *leader.children(recursive=True)]
            except psutil.NoSuchProcess:  # the tree changed while we walked it (a short-lived child)
                procs = [leader]
        # The group (pgid = pid, from start_new_session) also holds orphans whose parent died;
        # Linux never hands out a pid that is still in use as a process group id.
        self._signal_group(handle.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self._signal_group(handle.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        child = self._children.pop(handle.pid, None)
        if child is not None:
            child.wait(timeout=5)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def read_log(self, handle: RunHandle, tail_bytes: int = 8192) -> str:
        return read_tail(handle.log_path, tail_bytes)


def make_executor(settings: Settings) -> Executor:
    ex = settings.executor
    if ex.kind == "slurm":
        from nightlab.loop.slurm import SlurmExecutor

        return SlurmExecutor.from_settings(settings)
    return LocalExecutor(ex.gpus, ex.cpu_slots)
