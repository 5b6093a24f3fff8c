"""A local run's sandbox (Linux): the run command sees the workspace's state read-only and no
process outside its own tree.

The run command (train.py, and what it starts) runs as your user. Without this it could write
`.nightlab/state.db` (the ledger the keep rule reads: the best's recorded val_bpb raised, and any
change wins), the kept models and their held-out scores, another run's log, or the engine itself
through `/proc/<pid>/root`. Here it runs in user, mount and PID namespaces of its own (no privilege
needed): the paths given as read-only are bind-mounted read-only, the writable ones inside them
(the run's own folder, the compile caches) bound back over them, and a fresh `/proc` shows the
run's own processes only. The mounts are made in one user namespace and the command runs in a
second one, nested, so they are locked (the kernel refuses to unmount or remount them from there,
even to a command that runs as root).

Run as a script with the interpreter's -I -S (stdlib only, no site: a fraction of a Python start):
    python -I -S sandbox.py --read-only PATH ... --writable PATH ... -- COMMAND ...
Where the kernel refuses (no user namespaces, or a distribution that restricts them: Ubuntu's
AppArmor setting `kernel.apparmor_restrict_unprivileged_userns`), the command runs unconfined and
the run's log says why in one line; `NIGHTLAB_SANDBOX=0` turns it off (and the scorer's too).
A whole sandbox hands its command the launcher (NIGHTLAB_SANDBOX_LAUNCHER): the built-in trainer's
harness starts its training command in a nested one, where the data and the code that scores are
read-only too (trainer/prepare.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

ENV_SANDBOX = "NIGHTLAB_SANDBOX"  # prepare.ENV_SANDBOX: one switch for the run's and the scorer's
ENV_LAUNCHER = "NIGHTLAB_SANDBOX_LAUNCHER"  # prepare.ENV_SANDBOX_LAUNCHER: set in a whole sandbox only
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
# a bind mount's remount must keep the flags the kernel locked on it (statvfs -> mount flags)
_KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SAID = "Run sandbox:"  # a line in the run's log, only where the sandbox is not whole


def launcher() -> list[str]:
    """The launcher's command, before its paths and the command it runs."""
    return [sys.executable, "-I", "-S", str(Path(__file__).resolve())]


def command_line(command: str, read_only: Sequence[Path], writable: Sequence[Path]) -> str:
    """The shell command line that runs `command` (a shell command line) in the sandbox."""
    args = launcher() + [a for p in read_only for a in ("--read-only", str(p))]
    args += [a for p in writable for a in ("--writable", str(p))]
    return shlex.join([*args, "--", "/bin/sh", "-c", command])


def probe() -> str:
    """'' where a run here gets the whole sandbox; else what it says instead (its log's line)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "written")
        try:
            done = subprocess.run(["/bin/sh", "-c", command_line(f"touch {shlex.quote(target)} 2>/dev/null", [Path(tmp)], [])],
                                  capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{SAID} could not be tried ({exc})"
        said = " ".join(line for line in done.stderr.splitlines() if line.startswith(SAID))
        if not said and os.path.exists(target):
            return f"{SAID} a read-only folder was written"
        return said


class Refused(Exception):
    """The kernel would not make the sandbox: why, in words."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise Refused(f"{what}: {os.strerror(err)}")


def _own_ids(uid: int, gid: int) -> None:
    """This user namespace maps the user's ids to themselves (files and caches keep their owner)."""
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError as exc:
        raise Refused(f"mapping the user's ids: {exc.strerror}") from None


def _kept_flags(path: str) -> int:
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEPT_FLAGS if flags & st)


def enter(read_only: Sequence[str], writable: Sequence[str]) -> None:
    """Put this process in namespaces of its own: the mounts (read-only ones, writable ones bound
    back inside them), a PID namespace for its next child. Raises Refused, maybe half-way."""
    if not sys.platform.startswith("linux"):
        raise Refused("only Linux has the namespaces it needs")
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    for path in writable:  # made while it still can be (the folder a run saves its model in)
        with contextlib.suppress(OSError):
            os.makedirs(path, exist_ok=True)
    _call("unshare (user namespaces)", libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
    _own_ids(uid, gid)
    _call("making the mounts private", libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
    protected = [os.path.realpath(p) for p in read_only if os.path.exists(p)]  # folders or files
    # a writable path that is (or holds) a protected one would undo it: a link planted as the artifact folder
    opened = [w for w in (os.path.realpath(p) for p in writable if os.path.isdir(p))
              if not any(p == w or p.startswith(w + os.sep) for p in protected)]
    for path in [*protected, *opened]:
        _call(f"binding {path}", libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None))
    for path in protected:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | _kept_flags(path)
        _call(f"making {path} read-only", libc.mount(None, path.encode(), None, flags, None))
    _call("unshare (a PID namespace)", libc.unshare(CLONE_NEWPID))


def _status(wait_status: int) -> int:
    """A waited-for child's status as a shell says it (128 + the signal that killed it)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _forward_to(pid: int) -> None:
    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)


def _init(command: list[str], cwd: str) -> int:
    """PID 1 of the run's namespace: its own /proc, the mounts locked under a nested user
    namespace, the command started and waited for (signals passed on, orphans reaped); the
    namespace's other processes are killed by the kernel when this returns. A step the kernel
    refuses here is said, and the run goes on with the rest (a run the sandbox stopped would
    stop every night on such a machine)."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    try:  # refused where /proc has parts hidden (a container's masked paths)
        _call("mounting its own /proc", libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None))
    except Refused as exc:
        print(f"{SAID} but it sees every process ({exc})", file=sys.stderr, flush=True)
    try:
        _call("unshare (locking the mounts)", libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        _own_ids(uid, gid)
    except Refused as exc:
        print(f"{SAID} but its mounts are not locked ({exc})", file=sys.stderr, flush=True)
    os.chdir(cwd)  # looked up again: through the new mounts
    os.environ[ENV_LAUNCHER] = shlex.join(launcher())  # a nested sandbox adds read-only paths (the harness's)
    child = os.fork()
    if child == 0:
        _exec(command)
    _forward_to(child)
    while True:
        pid, wait_status = os.wait()
        if pid == child:
            return _status(wait_status)


def _exec(command: list[str]) -> None:
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"cannot start {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
    os._exit(127)


def run(read_only: Sequence[str], writable: Sequence[str], command: list[str]) -> int:
    """Run `command` sandboxed (or, where the kernel refuses, unconfined, saying why); its exit status."""
    # offered to the command by a whole sandbox only (_init); set here, this one is nested in it (the harness's)
    nested = os.environ.pop(ENV_LAUNCHER, None) is not None
    if os.environ.get(ENV_SANDBOX, "1").strip() == "0":
        print(f"{SAID} none ({ENV_SANDBOX}=0)", file=sys.stderr, flush=True)
        _exec(command)
    cwd = os.getcwd()
    # The namespaces are made in a child: one refused half-way (ids unmapped: files made as nobody)
    # must not be the one the command runs in unconfined.
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        try:
            enter(read_only, writable)
        except Refused as exc:
            os.write(writer, str(exc).encode())
            os._exit(0)
        os.close(writer)
        init = os.fork()
        if init == 0:
            os._exit(_init(command, cwd))
        _forward_to(init)
        os._exit(_status(os.waitpid(init, 0)[1]))
    os.close(writer)
    with os.fdopen(reader, "rb") as said:
        refused = said.read().decode(errors="replace")
    if refused:
        os.waitpid(child, 0)
        print(f"{SAID} none for the training command, the kernel refused it ({refused}); the run's own sandbox"
              " stands, and the data and the code that scores are checked after the training instead" if nested else
              f"{SAID} none, the kernel refused it ({refused}); the run can write what it should only read"
              " (the workspace's state, its data; `nightlab doctor` says how to allow it)", file=sys.stderr, flush=True)
        _exec(command)
    _forward_to(child)
    return _status(os.waitpid(child, 0)[1])


def main(argv: list[str]) -> int:
    paths: dict[str, list[str]] = {"--read-only": [], "--writable": []}
    command: list[str] = []
    rest = iter(argv)
    for arg in rest:
        if arg == "--":
            command = list(rest)
        elif arg in paths:
            paths[arg].append(next(rest, ""))
        else:
            break
    if not command or "" in paths["--read-only"] + paths["--writable"]:
        print("usage: sandbox.py [--read-only PATH] [--writable PATH] ... -- COMMAND ...", file=sys.stderr)
        return 2
    return run(paths["--read-only"], paths["--writable"], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
