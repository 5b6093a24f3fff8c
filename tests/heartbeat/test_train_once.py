"""`nightlab train` in a terminal: the run it started ends with it, however it is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.tagged import tagged
from tests.waiting import wait_until

# The run: says it started, then trains "forever" (until it is killed), printing a step now and then.
# Found by its argument, the workspace's path (tests/fakes/tagged.py): its pid is its sandbox's own.
HANG = ("import pathlib, time\npathlib.Path('run.started').write_text('yes')\n"
        "for step in range(3000):\n    print('step', step, flush=True)\n    time.sleep(0.2)\n")


def _train(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """`nightlab train` of a project whose run is HANG, its stdout a pipe; the workspace."""
    config, ws = _project(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "nightlab.heartbeat.cli", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ws


def _project(tmp_path: Path) -> tuple[Path, Path]:
    """A project whose run is HANG: its config and its workspace."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hang.py").write_text(HANG)
    git = ["git", "-C", str(ws), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "initial"], check=True)
    config = tmp_path / "nightlab.toml"
    config.write_text(f'[workspace]\npath = "{ws}"\n[project]\nrun_command = "{sys.executable} hang.py {ws}"\n'
                      'editable = ["hang.py"]\nprotected = []\n')
    return config, ws


def _run_tag(proc: subprocess.Popen[str], ws: Path) -> str:
    """The run's tag, once it has started (and is found by it)."""
    wait_until(lambda: (ws / "run.started").is_file() and tagged(str(ws)), "the run to start",
               abort=lambda: None if proc.poll() is None else f"nightlab exited {proc.returncode}")
    return str(ws)


def _end_all(proc: subprocess.Popen[str], ws: Path) -> None:
    """A failed test leaves nothing running."""
    proc.kill()
    proc.wait(30)
    for left in tagged(str(ws)):
        left.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # `kill`, a closed terminal
def test_a_stopped_train_ends_its_run(tmp_path: Path, sig: signal.Signals) -> None:
    proc, ws = _train(tmp_path)
    try:
        tag = _run_tag(proc, ws)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and err.rstrip().endswith("nightlab: interrupted"), err
        wait_until(lambda: not tagged(tag), "the run to end with nightlab train")
    finally:
        _end_all(proc, ws)


def test_a_train_whose_reader_closed_the_pipe_ends_its_run(tmp_path: Path) -> None:
    """`nightlab train | head`: head exits after its lines, nightlab's next write failed and it
    exited, leaving the run training on in its own session (on a GPU box, holding the GPU)."""
    proc, ws = _train(tmp_path)
    try:
        tag = _run_tag(proc, ws)
        assert proc.stdout is not None
        wait_until(lambda: proc.stdout.readline().startswith("step"), "a step of the run on nightlab's stdout")
        proc.stdout.close()  # the reader is gone
        assert proc.wait(timeout=60) == 141, proc.stderr.read() if proc.stderr else ""
        wait_until(lambda: not tagged(tag), "the run to end with nightlab train")
    finally:
        _end_all(proc, ws)


def test_a_train_beside_a_running_daemon_is_refused_saying_to_stop_it_even_paused(tmp_path: Path) -> None:
    """Only the engine's lock was asked: a train started while the daemon was up but its engine was
    not (restarting) ran beside it, and one refused told to "pause or stop" a loop already paused,
    which the engine still holds. The daemon's lock is asked too, and the way out is to stop it."""
    from nightlab.heartbeat.lock import DaemonLock

    config, ws = _project(tmp_path)
    cli = [sys.executable, "-m", "nightlab.heartbeat.cli"]
    subprocess.run([*cli, "init", "--config", str(config)], check=True, capture_output=True)
    daemon = DaemonLock(ws)
    daemon.acquire()  # this test's process is the daemon
    proc = subprocess.Popen([*cli, "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and not (ws / "run.started").exists(), err
        assert err == (f"nightlab: nightlab (pid {os.getpid()}) is running in {ws}; stop it before `nightlab train`"
                       " (`systemctl stop nightlab` or kill that pid: a paused loop still owns the workspace)\n")
    finally:
        daemon.release()
        _end_all(proc, ws)
