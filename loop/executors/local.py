"""The local backend: each run in its own process session on this machine, one per slot.

A run never depends on the process that launched it: it runs under the run-file wrapper
(runfiles.py), and its handle is pid + the process's create time, so a reused pid is never
mistaken for our run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
from nightlab.loop import hardware
from nightlab.loop.executors.base import RunHandle, RunSpec, RunStatus, Slot
from nightlab.loop.executors.runfiles import (
    clear_run_files,
    exit_file,
    read_exit_code,
    read_tail,
    save_handle,
    wrap,
)
from nightlab.loop.executors.sandbox import command_line
from nightlab.loop.processes import stop_tree
from nightlab.loop.state.errors import UserError

_CREATE_TIME_TOLERANCE_S = 0.01


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
        # appended to by every writer: a line a run wrote into the file itself (through /proc, past the
        # harness's prefix) lay past the harness's offset, its start overwritten by the summary and its
        # end (a METRIC val_bpb) read after it; appended, the harness's lines come after it
        fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        with open(fd, "wb") as log:
            try:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", wrap(command_line(spec.command, spec.read_only, spec.writable)
                                           if spec.read_only else spec.command)],
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
        stop_tree(handle.pid, _identity(handle), grace_s)  # pgid = pid, from start_new_session
        child = self._children.pop(handle.pid, None)
        if child is not None:
            child.wait(timeout=5)

    def read_log(self, handle: RunHandle, tail_bytes: int = 8192) -> str:
        return read_tail(handle.log_path, tail_bytes)
