"""Host health: free disk where we write, and the GPUs (through nvidia-ml-py when installed).

nvidia-ml-py (module `pynvml`) is optional: the daemon must run on a CPU box and must not pull
in a CUDA stack. Without it the GPU report says why it is unavailable instead of guessing.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3


def free_disk_gb(path: Path) -> float:
    """Free space for unprivileged writes on the filesystem of `path` (or its nearest parent that
    exists: the cache dir may not have been created yet)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / GIB


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_used_mb: int
    memory_total_mb: int
    temperature_c: int
    utilization_percent: int
    foreign_pids: tuple[int, ...]  # compute processes on this GPU that are not ours


def gpu_report(own_pids: Collection[int]) -> dict[str, Any]:
    """What kv['host.gpus'] holds for /status: {"available": bool, "reason"?, "gpus": [...]}."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed", "gpus": []}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML: {exc}", "gpus": []}
    try:
        gpus = [_gpu(pynvml, i, own_pids) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML: {exc}", "gpus": []}
    finally:
        pynvml.nvmlShutdown()
    return {"available": True, "gpus": [asdict(g) for g in gpus]}


def _gpu(nvml: Any, index: int, own_pids: Collection[int]) -> GpuInfo:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    name = nvml.nvmlDeviceGetName(h)
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    return GpuInfo(
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        memory_used_mb=int(mem.used) // 2**20,
        memory_total_mb=int(mem.total) // 2**20,
        temperature_c=int(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        utilization_percent=int(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
        foreign_pids=tuple(sorted(p.pid for p in procs if p.pid not in own_pids)),
    )
