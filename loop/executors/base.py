"""What every executor shares: the run's description, its handle, its status and the protocol.

Plain data and a Protocol only, so the state layer (views, bot/) can name a run without loading
a backend (psutil for local, the Slurm client for slurm).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol


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
    # the local backend's sandbox (sandbox.py): folders the command may read but not write, and
    # folders inside them it may write (its own); none: unconfined
    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()


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
