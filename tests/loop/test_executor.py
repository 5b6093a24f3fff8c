from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import psutil
from nightlab.loop.executor import (
    LocalExecutor,
    RunHandle,
    RunSpec,
    RunStatus,
    Slot,
    read_exit_code,
)


def _wait(executor: LocalExecutor, handle: RunHandle, timeout: float = 20.0) -> RunStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.poll([handle])[handle.key]
        if status.state != "running":
            return status
        time.sleep(0.02)
    raise AssertionError("the run did not end")


CPU = Slot("cpu0")


def _spec(tmp_path: Path, command: str, slot: Slot = CPU) -> RunSpec:
    return RunSpec(command, tmp_path, tmp_path / "runs" / "1.log", slot, {"NIGHTLAB_TIME_BUDGET": "7"})


def test_exit_code_log_and_environment(tmp_path: Path) -> None:
    ex = LocalExecutor()
    cmd = 'echo "cuda=[$CUDA_VISIBLE_DEVICES] budget=$NIGHTLAB_TIME_BUDGET unbuf=$PYTHONUNBUFFERED"; echo err >&2; exit 7'
    handle = ex.launch(_spec(tmp_path, cmd))
    assert RunHandle.from_json(handle.to_json()) == handle
    assert _wait(ex, handle) == RunStatus("exited", 7)
    log = ex.read_log(handle)
    assert "cuda=[] budget=7 unbuf=1" in log and "err" in log
    assert read_exit_code(handle.log_path) == 7


def test_gpu_slot_pins_cuda_visible_devices(tmp_path: Path) -> None:
    ex = LocalExecutor(gpus=(3,))
    assert ex.slots() == [Slot("gpu3", 3)]
    handle = ex.launch(_spec(tmp_path, "echo cuda=$CUDA_VISIBLE_DEVICES", ex.slots()[0]))
    assert _wait(ex, handle).exit_code == 0
    assert "cuda=3" in ex.read_log(handle)


def test_cancel_kills_the_whole_tree_and_reads_as_lost(tmp_path: Path) -> None:
    ex = LocalExecutor()
    handle = ex.launch(_spec(tmp_path, "sleep 600 & sleep 600 & wait"))
    deadline = time.monotonic() + 10
    while len(psutil.Process(handle.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = [psutil.Process(handle.pid), *psutil.Process(handle.pid).children(recursive=True)]
    ex.cancel(handle, grace_s=2)
    assert ex.poll([handle])[handle.key] == RunStatus("lost")
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_new_executor_reattaches_by_handle(tmp_path: Path) -> None:
    first = LocalExecutor()
    handle = first.launch(_spec(tmp_path, "sleep 0.5; exit 0"))
    again = LocalExecutor()  # a restarted daemon: the run is not its child
    handle = RunHandle.from_json(handle.to_json())
    assert again.poll([handle])[handle.key].state == "running"
    assert _wait(again, handle) == RunStatus("exited", 0)


def test_a_reused_pid_is_not_our_run(tmp_path: Path) -> None:
    ex = LocalExecutor()
    handle = ex.launch(_spec(tmp_path, "sleep 600"))
    impostor = dataclasses.replace(handle, create_time=handle.create_time - 100)
    assert ex.poll([impostor])[impostor.key] == RunStatus("lost")
    ex.cancel(handle, grace_s=1)
