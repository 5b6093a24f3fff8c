"""The Slurm backend: the cluster's own scheduler, driven by its command line.

No queue, scheduler or node agent of ours and no extra Python dependency: `sbatch --parsable`
submits a generated job script, one `squeue` call per poll reads every job we track, `scancel`
cancels. The job script runs the command under the same exit-file protocol as a local run
(`runfiles.wrap`), on the shared filesystem, so the exit status is known without slurmdbd
and after any restart of ours. Jobs are submitted with `--requeue`: after a node failure or a
preemption Slurm runs the SAME job id again, which the loop sees as the same candidate going back
to `pending` (the wrapper clears the old attempt's exit file and restarts the start marker).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from nightlab.loop.executors.base import RunHandle, RunSpec, RunStatus, Slot
from nightlab.loop.executors.runfiles import (
    clear_run_files,
    exit_file,
    read_exit_code,
    read_tail,
    save_handle,
    wrap,
)
from nightlab.loop.state.config import ConfigError, Settings, SlurmSettings
from nightlab.loop.state.errors import UserError

COMMANDS = ("sbatch", "squeue", "scancel")
_CALL_TIMEOUT_S = 60.0

# Slurm job states (squeue %T) -> the loop's. A requeued job goes back to pending under the same
# id; SUSPENDED counts as running (the heartbeat's limits keep running, --time does not).
_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
            "RESIZING", "POWER_UP_NODE"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED"}
_DONE = {"COMPLETED", "FAILED", "OUT_OF_MEMORY"}  # the job's own end: the exit file says how
# Ends imposed by Slurm: recorded as crashes with this reason ({} = the time limit).
_IMPOSED = {
    "TIMEOUT": "timeout: the Slurm time limit ({}) was reached",
    "NODE_FAIL": "node failure: the job's node stopped responding (not requeued)",
    "PREEMPTED": "preempted by Slurm (not requeued)",
    "BOOT_FAIL": "the node failed to boot",
    "DEADLINE": "the Slurm deadline passed",
    "OUT_OF_MEMORY": "OOM: Slurm's memory limit killed the job",
}


@dataclass(frozen=True)
class JobState:
    state: str  # squeue %T, e.g. RUNNING
    node: str  # squeue %N ("" while pending)


def map_state(job: JobState | None, exit_code: int | None, time_limit: str) -> RunStatus:
    """One job's status from squeue's view (None: no longer listed) and its exit file."""
    if job is None:  # purged from the controller (MinJobAge) or never known: only the file is left
        if exit_code is not None:
            return RunStatus("exited", exit_code)
        return RunStatus("lost", reason="the job is gone from Slurm without an exit status")
    where = job.node
    if job.state in _PENDING:
        return RunStatus("pending", where=where)
    imposed = _IMPOSED.get(job.state)
    if imposed is not None:
        return RunStatus("exited" if exit_code is not None else "lost", exit_code,
                         imposed.format(time_limit), where)
    if exit_code is not None:  # written last by the wrapper: the command is over
        return RunStatus("exited", exit_code, where=where)
    if job.state in _RUNNING:
        return RunStatus("running", where=where)
    if job.state == "CANCELLED":
        # nightlab's own cancels carry their kill_reason already; this names anyone else's
        return RunStatus("lost", reason="cancelled in Slurm (scancel)", where=where)
    if job.state in _DONE:
        return RunStatus("lost", reason=f"Slurm says {job.state} but the job wrote no exit status", where=where)
    return RunStatus("lost", reason=f"Slurm state {job.state}", where=where)


def slurm_time(seconds: float) -> str:
    """sbatch --time in minutes:seconds (Slurm rounds a limit up to its own check period)."""
    total = max(60, math.ceil(seconds))
    return f"{total // 60}:{total % 60:02d}"


class SlurmExecutor:
    """Submits each run as one batch job; `jobs` slots = jobs in flight at once."""

    backend = "slurm"

    def __init__(self, conf: SlurmSettings, run_timeout: float, env: dict[str, str] | None = None) -> None:
        self.conf = conf
        self.shared_dir: Path | None = conf.shared_path
        self.apply_run_timeout(run_timeout)
        self.env = env  # the environment of the Slurm commands (None: ours; tests set SLURM_CONF)
        self._snapshot: dict[str, JobState] = {}
        self._snapshot_at = -math.inf
        self.squeue_calls = 0  # the tests check that polls are batched (bench/scale.py counts its own)

    @classmethod
    def from_settings(cls, settings: Settings) -> SlurmExecutor:
        missing = [c for c in COMMANDS if shutil.which(c) is None]
        if missing:
            raise ConfigError(
                f"{settings.origin}: executor.kind = 'slurm': {', '.join(missing)} not found on PATH;"
                " install the Slurm client (slurm-client) or run nightlab on a login node"
            )
        return cls(settings.executor.slurm, settings.heartbeat.run_timeout)

    def apply_run_timeout(self, run_timeout: float) -> None:
        """--time of the jobs submitted from now on (a SIGHUP reload changes run_timeout)."""
        self.time_limit = slurm_time(run_timeout + self.conf.time_margin)

    def slots(self) -> list[Slot]:
        return [Slot(f"slurm{i}") for i in range(self.conf.jobs)]

    # -- launch --------------------------------------------------------------------------------
    def job_script(self, spec: RunSpec) -> str:
        """A self-contained script: cd into the run's snapshot, its environment, the wrapper.
        CUDA_VISIBLE_DEVICES is Slurm's (from --gres), never ours."""
        env = {**spec.env, "PYTHONUNBUFFERED": "1", "NIGHTLAB_EXIT_FILE": str(exit_file(spec.log_path))}
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
        command = f"cd {shlex.quote(str(spec.cwd))} || exit 1\n{spec.command}"
        return f"#!/bin/sh\n# written by nightlab: one experiment run\n{exports}{wrap(command)}"

    def sbatch_args(self, spec: RunSpec, script: Path) -> list[str]:
        c = self.conf
        args = ["sbatch", "--parsable", f"--job-name=nightlab-{spec.log_path.stem}",
                f"--output={spec.log_path}", "--open-mode=truncate", f"--chdir={spec.cwd}",
                f"--time={self.time_limit}", "--requeue"]
        args += [f"--gres={c.gres}"] if c.gres else []
        args += [f"--partition={c.partition}"] if c.partition else []
        args += [f"--account={c.account}"] if c.account else []
        # after extra_args: a pinned run (a confirm, a baseline for a class) must land on its node
        pinned = [f"--nodelist={spec.node}"] if spec.node else []
        return [*args, *c.extra_args, *pinned, str(script)]

    def launch(self, spec: RunSpec) -> RunHandle:
        clear_run_files(spec.log_path)
        script = Path(f"{spec.log_path}.sbatch")
        script.write_text(self.job_script(spec))
        script.chmod(0o755)
        out = self._call(self.sbatch_args(spec, script))
        if out.returncode != 0:
            raise UserError(f"sbatch failed (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        job_id = out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        if not job_id.isdigit():
            raise UserError(f"sbatch printed no job id: {out.stdout.strip()!r}")
        handle = RunHandle(self.backend, 0, 0.0, str(spec.log_path), spec.slot.name, job_id=job_id)
        save_handle(handle)
        self._snapshot_at = -math.inf  # the next poll must see the new job
        return handle

    # -- poll ------------------------------------------------------------------------------------
    def poll(self, handles: list[RunHandle]) -> dict[str, RunStatus]:
        codes = {h.key: read_exit_code(h.log_path) for h in handles}
        # A job whose exit file exists needs squeue only to tell a Slurm-imposed end; one squeue
        # call (at most every poll_interval) covers every job of the batch.
        if handles:
            self._refresh([h.job_id for h in handles])
        return {h.key: map_state(self._snapshot.get(h.job_id), codes[h.key], self.time_limit) for h in handles}

    def _refresh(self, job_ids: list[str]) -> None:
        now = time.monotonic()
        if now - self._snapshot_at < self.conf.poll_interval and all(j in self._snapshot for j in job_ids):
            return
        out = self._call(["squeue", "-h", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(job_ids)])
        if out.returncode != 0 and "Invalid job id" in out.stderr:
            # squeue refuses a list naming a purged job; all of ours, filtered, is still one call
            out = self._call(["squeue", "-h", "--states=all", "-o", "%i|%T|%N", "-u", _user()])
        if out.returncode != 0:
            return  # the controller is unreachable: keep the last view rather than declare runs lost
        snapshot: dict[str, JobState] = {}
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                snapshot[parts[0]] = JobState(parts[1].split()[0], parts[2])
        self._snapshot, self._snapshot_at = snapshot, now

    # -- cancel / logs -----------------------------------------------------------------------------
    def cancel(self, handle: RunHandle, grace_s: float = 10.0) -> None:
        """scancel: Slurm sends SIGTERM to every process of the job, SIGKILL after KillWait.
        Returns at once (the heartbeat calls it again each beat until the job is gone)."""
        self._call(["scancel", handle.job_id])
        self._snapshot_at = -math.inf

    def read_log(self, handle: RunHandle, tail_bytes: int = 8192) -> str:
        return read_tail(handle.log_path, tail_bytes)

    def _call(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        if args[0] == "squeue":
            self.squeue_calls += 1
        try:
            return subprocess.run(args, capture_output=True, text=True, env=self.env,
                                  timeout=_CALL_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(args, 255, "", str(exc))


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
