from __future__ import annotations

import dataclasses
from pathlib import Path

import psutil
from nightlab.loop import hardware
from nightlab.loop.executors import RunHandle, RunSpec, RunStatus, Slot
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.executors.runfiles import read_exit_code, run_hardware
from nightlab.loop.state.ledger import ended_at

from tests.waiting import wait_until


def _wait(executor: LocalExecutor, handle: RunHandle) -> RunStatus:
    return wait_until(lambda: (s := executor.poll([handle])[handle.key]).state != "running" and s, "the run to end")


CPU = Slot("cpu0")


def _spec(tmp_path: Path, command: str, slot: Slot = CPU) -> RunSpec:
    return RunSpec(command, tmp_path, tmp_path / "runs" / "1.log", slot, {"NIGHTLAB_TIME_BUDGET": "7"})


def test_exit_code_log_and_environment(tmp_path: Path) -> None:
    ex = LocalExecutor()
    cmd = 'echo "cuda=[$CUDA_VISIBLE_DEVICES] budget=$NIGHTLAB_TIME_BUDGET unbuf=$PYTHONUNBUFFERED"; echo err >&2; exit 7'
    handle = ex.launch(_spec(tmp_path, cmd))
    assert RunHandle.from_json(handle.to_json()) == handle
    assert _wait(ex, handle) == RunStatus("exited", 7)
    # the exit file's time ends an experiment's duration; none before the command has ended
    assert ended_at(handle.log_path) is not None and ended_at(tmp_path / "never.log") is None
    log = ex.read_log(handle)
    assert "cuda=[] budget=7 unbuf=1" in log and "err" in log
    assert read_exit_code(handle.log_path) == 7


def test_gpu_slot_pins_cuda_visible_devices_and_records_its_gpu(tmp_path: Path, fake_gpus) -> None:
    fake_gpus(["NVIDIA A100-SXM4-80GB"] * 3 + ["NVIDIA H100 80GB HBM3"])
    ex = LocalExecutor(gpus=(3,))
    assert ex.slots() == [Slot("gpu3", 3, "NVIDIA H100 80GB HBM3")]  # probed before any run
    handle = ex.launch(_spec(tmp_path, "echo cuda=$CUDA_VISIBLE_DEVICES", ex.slots()[0]))
    assert _wait(ex, handle).exit_code == 0
    assert "cuda=3" in ex.read_log(handle)
    assert run_hardware(handle.log_path) == "NVIDIA H100 80GB HBM3"  # probed by the run's wrapper


def test_all_visible_gpus_become_slots_each_with_its_model(fake_gpus) -> None:
    fake_gpus(["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"])
    assert [(s.name, s.gpu, s.hardware) for s in LocalExecutor().slots()] == [
        ("gpu0", 0, "NVIDIA H100 80GB HBM3"), ("gpu1", 1, "NVIDIA GeForce RTX 4090")]


def test_hardware_probe_without_nvidia_smi_names_the_cpu_or_an_unknown_gpu(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi here
    cpu = hardware.probe("")
    assert cpu.startswith("cpu") and hardware.probe(None) == cpu
    assert hardware.probe("0") == "unknown GPU"  # a GPU was given, nothing can tell its model
    ex = LocalExecutor(cpu_slots=2)
    assert [s.hardware for s in ex.slots()] == [cpu, cpu]
    handle = ex.launch(_spec(tmp_path, "true", ex.slots()[1]))
    _wait(ex, handle)
    assert run_hardware(handle.log_path) == cpu


def test_describe_hardware() -> None:
    assert hardware.describe("gpu: B\ngpu: A\ngpu: B\n") == "A + 2x B"
    assert hardware.describe("cpu: \n") == "cpu"
    assert hardware.describe("") == ""


def test_cancel_kills_the_whole_tree_and_reads_as_lost(tmp_path: Path) -> None:
    ex = LocalExecutor()
    handle = ex.launch(_spec(tmp_path, "sleep 600 & sleep 600 & wait"))
    wait_until(lambda: len(psutil.Process(handle.pid).children(recursive=True)) >= 2, "both sleeps to start")
    tree = [psutil.Process(handle.pid), *psutil.Process(handle.pid).children(recursive=True)]
    ex.cancel(handle, grace_s=2)
    assert ex.poll([handle])[handle.key] == RunStatus("lost")
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_new_executor_reattaches_by_handle(tmp_path: Path) -> None:
    first = LocalExecutor()
    gate = tmp_path / "gate"  # the run ends once it exists: after it was seen running, not 0.5 s in
    handle = first.launch(_spec(tmp_path, f"until [ -e {gate} ]; do sleep 0.02; done; exit 0"))
    again = LocalExecutor()  # a restarted daemon: the run is not its child
    handle = RunHandle.from_json(handle.to_json())
    assert again.poll([handle])[handle.key].state == "running"
    gate.touch()
    assert _wait(again, handle) == RunStatus("exited", 0)


def test_a_reused_pid_is_not_our_run(tmp_path: Path) -> None:
    ex = LocalExecutor()
    handle = ex.launch(_spec(tmp_path, "sleep 600"))
    impostor = dataclasses.replace(handle, create_time=handle.create_time - 100)
    assert ex.poll([impostor])[impostor.key] == RunStatus("lost")
    ex.cancel(handle, grace_s=1)


# a training command that writes the run's log file itself (through /proc, as the process whose
# stdout it is), past the harness's `train.py| ` prefix: padding, then a better val_bpb at its end
WRITES_THE_LOG = """
import os
open(os.path.join(os.environ["NIGHTLAB_ARTIFACT_DIR"], "model"), "w").close()
pid = os.getppid()
while not os.readlink(f"/proc/{pid}/fd/1").endswith("1.log"):
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
with open(f"/proc/{pid}/fd/1", "a") as log:
    log.write("#" * 4096 + "\\nMETRIC val_bpb=0.001\\n")
"""


def test_lines_a_run_writes_into_its_log_itself_come_before_the_harness_s(tmp_path: Path) -> None:
    """The log was opened without O_APPEND: a line the training command appended to it (through
    /proc) lay past the harness's offset, whose later lines (the summary) overwrote only its start,
    so a METRIC val_bpb at its end came after the harness's and was read instead (0.001 for 2.5).
    Every writer now appends: the harness's lines come after it."""
    import sys

    from nightlab.loop.summary import parse_summary

    (tmp_path / "inject.py").write_text(WRITES_THE_LOG)
    python = sys.executable
    cmd = (f"{python} -m nightlab.trainer.prepare run --command '{python} inject.py'"
           " --score 'echo METRIC val_bpb=2.5'")
    ex = LocalExecutor()
    handle = ex.launch(_spec(tmp_path, cmd))
    assert _wait(ex, handle) == RunStatus("exited", 0), ex.read_log(handle)
    assert parse_summary(ex.read_log(handle)).get("val_bpb") == 2.5


def test_a_new_attempt_of_a_run_starts_its_log_empty(tmp_path: Path) -> None:
    """Every writer appends to the log since be85187: a re-run of the same experiment (same log path)
    must still start from an empty file, or the earlier attempt's METRIC val_bpb, read last, would be
    the new attempt's when it prints none."""
    from nightlab.loop.summary import parse_summary

    ex = LocalExecutor()
    first = ex.launch(_spec(tmp_path, "echo METRIC val_bpb=0.5"))
    assert _wait(ex, first) == RunStatus("exited", 0)
    again = ex.launch(_spec(tmp_path, "echo no summary; exit 1"))
    assert _wait(ex, again) == RunStatus("exited", 1)
    assert ex.read_log(again) == "no summary\n" and parse_summary(ex.read_log(again)).get("val_bpb") is None
