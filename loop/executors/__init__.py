"""Launch, poll and cancel training runs: the one place that knows how a run is executed.

The engine and the heartbeat use the `Executor` protocol (base.py); `make_executor` picks the
backend: `local.LocalExecutor` runs each command in its own process session on this machine,
`slurm.SlurmExecutor` submits it as a batch job. Both run it under the same wrapper and leave
the same files next to its log (runfiles.py). The backends are imported only by the factory or
by name, so the state layer (views, bot/) never loads psutil or the Slurm code.
"""

from __future__ import annotations

from nightlab.loop.executors.base import Executor, RunHandle, RunSpec, RunStatus, Slot
from nightlab.loop.state.config import Settings

__all__ = ["Executor", "RunHandle", "RunSpec", "RunStatus", "Slot", "make_executor"]


def make_executor(settings: Settings) -> Executor:
    ex = settings.executor
    if ex.kind == "slurm":
        from nightlab.loop.executors.slurm import SlurmExecutor

        return SlurmExecutor.from_settings(settings)
    from nightlab.loop.executors.local import LocalExecutor

    return LocalExecutor(ex.gpus, ex.cpu_slots)
