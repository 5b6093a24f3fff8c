"""The files a run leaves next to its log, shared by every backend.

The command runs under one small shell wrapper that touches `<log>.exit.start` when the command
starts and writes its exit status to `<log>.exit` when it ends; the handle is also written to
`<log>.handle`, so a restarted engine re-attaches or, if the run is gone, reads how it ended.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from nightlab.loop import hardware
from nightlab.loop.executors.base import RunHandle

# The start marker and the exit file are the state layer's (the views and the engine read them);
# the backends write them.
from nightlab.loop.state.ledger import exit_file, start_file

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
# The log's folder removed while the command ran (an agent's `git clean -x` of .nightlab): the folder
# is made again for the exit status, and the log written back from the file this shell still has
# open (a regular file only: a pipe would block; read as stdin, opened before stdout moves to the new
# file), so the run's result survives the cleaning.
_WRAPPER_END = (
    'code=$?\nlog="${NIGHTLAB_EXIT_FILE%.exit}"\nmkdir -p "${log%/*}"\n'
    'if [ ! -e "$log" ] && [ -f /proc/$$/fd/1 ]; then cat < /proc/$$/fd/1 > "$log"; fi\n'
    'printf "%s\\n" "$code" > "$NIGHTLAB_EXIT_FILE.tmp" '
    '&& mv -f "$NIGHTLAB_EXIT_FILE.tmp" "$NIGHTLAB_EXIT_FILE"\nexit $code\n'
)


def wrap(command: str) -> str:
    """The shell script that runs `command` under the exit-file protocol ($NIGHTLAB_EXIT_FILE)."""
    return f"{_WRAPPER_START}( {command}\n)\n{_WRAPPER_END}"


def handle_file(log_path: Path | str) -> Path:
    return Path(f"{log_path}.handle")


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
            return file_tail(f, tail_bytes)
    except OSError:
        return ""


def file_tail(f: BinaryIO, tail_bytes: int) -> str:
    """The last `tail_bytes` of an open file, decoded (a character cut in two is replaced)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - tail_bytes))
    return f.read().decode("utf-8", errors="replace")


def trim_log(path: Path | str, max_bytes: int) -> None:
    """Cut a finished run's log to its first and last `max_bytes` / 2, with a line saying what was
    cut; idempotent (a shorter log is left as it is), and atomic (a reader sees the old or the new)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes <= 0 or size <= max_bytes:
            return
        half = max_bytes // 2
        with open(path, "rb") as f:
            head = f.read(half)
            f.seek(size - half)
            tail = f.read()
        tmp = path.with_name(path.name + ".trim")
        cut = f"\n[nightlab: {size - 2 * half:,} bytes cut here once the experiment was decided (loop.decided_log_mb)]\n"
        tmp.write_bytes(head + cut.encode() + tail)
        os.replace(tmp, path)
    except OSError:  # gone, or a full disk: the log stays as it was
        return


# a shared filesystem's clock may run a little apart from ours
_HANDLE_CLOCK_SLACK_S = 5.0


def find_handle(log_path: Path | str, since: float) -> RunHandle | None:
    """The handle a launch left next to its log (a run launched just before a crash of ours), if it
    was written after `since` (the candidate's creation): an older one is another ledger's run of the
    same number (the ledger moved aside, the workspace's runs folder kept), whose result was adopted
    as a new run's though nothing ran."""
    path = handle_file(log_path)
    try:
        if path.stat().st_mtime < since - _HANDLE_CLOCK_SLACK_S:
            return None
        return RunHandle.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
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
