"""A real single-node Slurm (Debian's slurmctld + slurmd + munge) in a temp dir, for tests.

Not a fake of Slurm's behaviour: the real daemons run, started directly (no systemd), with
fake GPUs declared as gres on character devices we create, so `--gres=gpu:1` really pins
CUDA_VISIBLE_DEVICES. Everything lives under one folder and one pair of ports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.waiting import wait_until

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: the sockets stay bound until all are picked (one closed before
    the next was bound could be handed out twice, and slurmctld and slurmd would share a port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    gpus: int = 4
    cpus: int = 64
    slurmd_timeout: int = 10
    # Slurm holds a submitted batch job back this long before it schedules (its default: 3 s);
    # the executor tests set 0, the benchmark keeps a real cluster's pace
    batch_sched_delay: int = 3
    # How long slurmctld's RPCs wait, its ping of a node included: a dead slurmd is found out after
    # SlurmdTimeout plus about twice this (Slurm's default, 10 s, took ~28 s); the executor tests set 3
    message_timeout: int = 10
    env: dict[str, str] = field(default_factory=dict)
    _pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def start(self) -> None:
        for sub in ("state", "spool", "munge", "log", "dev", "shared"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        host = socket.gethostname().split(".")[0]
        for i in range(self.gpus):
            dev = self.root / "dev" / f"gpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o644 | 0o020000, os.makedev(1, 3))  # a char device like /dev/null
        r = self.root
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(
            f"""ClusterName=nightlabtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay={self.batch_sched_delay}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MpiDefault=none
SlurmdParameters=config_overrides
SlurmdTimeout={self.slurmd_timeout}
SlurmctldTimeout=10
MessageTimeout={self.message_timeout}
InactiveLimit=0
MinJobAge=600
KillWait=2
OverTimeLimit=0
NodeName={host} CPUs={self.cpus} RealMemory=2000 Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:{self.cpus}
"""
        )
        (r / "gres.conf").write_text(
            f"NodeName={host} Name=gpu File={r}/dev/gpu[0-{self.gpus - 1}]\n"
            if self.gpus > 1
            else f"NodeName={host} Name=gpu File={r}/dev/gpu0\n"
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        subprocess.run([_binary("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        self.start_slurmd()
        self._wait_idle()

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
            key.chmod(0o600)
        subprocess.run(
            [_binary("munged"), "--force", f"--key-file={key}", f"--socket={m}/munge.sock",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"],
            check=True,
        )

    def start_slurmd(self) -> None:
        subprocess.run([_binary("slurmd"), "-f", str(self.conf)], check=True, env=self.env)

    def kill_slurmd(self) -> None:
        self._kill_pidfile(self.root / "slurmd.pid", signal.SIGKILL)

    def _wait_idle(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            out = subprocess.run(
                [_binary("sinfo"), "-h", "-o", "%T"], check=False, capture_output=True, text=True, env=self.env
            ).stdout.strip()
            return out in ("idle", "mixed", "allocated")

        wait_until(up, f"the slurm node to come up (see {self.root}/log)", timeout, every=0.3)

    def _kill_pidfile(self, pidfile: Path, sig: int) -> None:
        try:
            os.kill(int(pidfile.read_text().strip()), sig)
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        subprocess.run([_binary("scancel"), "--full", "-u", "root"], check=False, env=self.env, capture_output=True)
        for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            self._kill_pidfile(self.root / name, signal.SIGTERM)
        time.sleep(0.5)
        for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            self._kill_pidfile(self.root / name, signal.SIGKILL)
