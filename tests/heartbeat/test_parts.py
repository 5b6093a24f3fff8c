"""The heartbeat's small parts in-process: sd_notify, the restart window, host health, logging,
the systemd unit."""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nightlab.heartbeat.engine_child import EngineProcess
from nightlab.heartbeat.health import free_disk_gb
from nightlab.heartbeat.jobs import Heartbeat, RestartWindow, exit_reason, fmt_duration
from nightlab.heartbeat.logsetup import DaemonFormatter
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.heartbeat.service import install_unit, render_unit
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger
from nightlab.loop.state.config import (
    HeartbeatSettings,
    Secret,
    load_settings,
    settings_from_table,
)
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import Store


def test_durations_read_like_the_kill_reasons() -> None:
    assert fmt_duration(600) == "10m00s"
    assert fmt_duration(180) == "3m00s"
    assert fmt_duration(3.2) == "0m03s"


def test_an_engine_killed_by_a_signal_is_said_by_its_name() -> None:
    assert exit_reason(3) == "engine exited with code 3"
    assert exit_reason(-9) == "engine killed by SIGKILL (the out-of-memory killer, or kill -9)"  # was "code -9"
    assert exit_reason(-15) == "engine killed by SIGTERM"


def test_restart_window_forgets_restarts_older_than_an_hour() -> None:
    window = RestartWindow()
    assert window.add(0.0) == 1 and window.add(1800.0) == 2
    assert window.count(3600.5) == 1


@pytest.mark.parametrize("abstract", [True, False])
def test_notifier_sends_datagrams_to_path_and_abstract_sockets(abstract: bool) -> None:
    folder = tempfile.mkdtemp(dir="/tmp")  # AF_UNIX paths are limited to 108 bytes
    try:
        name = f"@nightlab-parts-{os.getpid()}" if abstract else f"{folder}/notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name[1:] if abstract else name)
            env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
            notifier = Notifier.from_environ(env)
            assert env == {}  # children must not inherit them
            assert notifier.watchdog_interval == 30.0
            assert notifier.ready("up")
            assert notifier.status("exp #1\nrunning", watchdog=True)
            assert notifier.stopping("bye")
            got = [sock.recv(1024).decode() for _ in range(3)]
        assert got == ["READY=1\nSTATUS=up", "STATUS=exp #1 running\nWATCHDOG=1", "STOPPING=1\nSTATUS=bye"]
    finally:
        shutil.rmtree(folder)


def test_status_and_watchdog_pings_come_only_between_ready_and_stopping() -> None:
    # The beats run on the scheduler's threads: the first one sent STATUS before READY=1, and one in
    # flight when the daemon began to stop sent STATUS and WATCHDOG=1 after STOPPING=1 (systemd
    # showed a running status again while the daemon stopped).
    name = f"@nightlab-parts-order-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": name})
        assert not notifier.status("too early", watchdog=True)
        assert notifier.ready("up") and notifier.stopping("bye")
        assert not notifier.status("too late", watchdog=True)
        assert notifier.send(STATUS="marker")  # datagrams arrive in order: all sent before it are queued
        got = [sock.recv(1024).decode() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=up", "STOPPING=1\nSTATUS=bye", "STATUS=marker"]


def test_notifier_is_silent_outside_systemd_and_ignores_a_watchdog_meant_for_another_pid() -> None:
    assert not Notifier.from_environ({}).send(READY="1")
    other = Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None


def test_low_disk_pauses_and_alerts_once_saying_what_of_ours_uses_the_space(tmp_path: Path) -> None:
    base = settings_from_table({"data": {"cache_dir": str(tmp_path / "cache")}})
    # before: only "free some space": not which of nightlab's folders holds it, nor what may go
    (tmp_path / ".nightlab" / "compile-cache").mkdir(parents=True)
    (tmp_path / ".nightlab" / "compile-cache" / "kernel.so").write_bytes(b"k" * 3 * 2**20)
    (tmp_path / ".nightlab" / "runs").mkdir()
    (tmp_path / ".nightlab" / "runs" / "1.log").write_bytes(b"step\n" * 2**20)
    settings = dataclasses.replace(base, heartbeat=HeartbeatSettings(min_free_disk_gb=1e9))
    store = Store.for_workspace(tmp_path)
    beat = Heartbeat(settings, tmp_path, store, LocalExecutor(), EngineProcess(["true"]),
                     Notifier(None), on_engine_stopped=lambda why, code: None)
    assert free_disk_gb(tmp_path / "cache" / "not-yet") > 0  # measured on the nearest parent
    beat.check_host()
    beat.check_host()
    alerts = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert"]
    assert len(alerts) == 1 and alerts[0].startswith("low disk: ")
    assert alerts[0].endswith(
        f"nightlab's files there: {tmp_path}/.nightlab/runs 5 MB (run logs: old ones may be deleted, the ledger keeps"
        f" every result); {tmp_path}/.nightlab/compile-cache 3 MB (torch's compile caches: safe to delete, the next"
        " run of a shape compiles again; the engine keeps them under [loop] compile_cache_gb)"), alerts[0]
    paused = ledger.paused(store)
    assert paused is not None and paused.by == "heartbeat"


def test_low_disk_watches_the_data_cache_only_for_the_built_in_trainer(tmp_path: Path) -> None:
    """A project's own run command reads nothing there: its loop was paused for a full home disk
    ("~/.cache/nightlab has 1.2 GB free") while its workspace on /data had room."""
    low = HeartbeatSettings(min_free_disk_gb=1e9)
    for project, watched in (({"run_command": "python fit.py"}, [tmp_path]), ({}, [tmp_path, tmp_path / "cache"])):
        settings = dataclasses.replace(settings_from_table({"data": {"cache_dir": str(tmp_path / "cache")},
                                                            "project": project}), heartbeat=low)
        store = Store.for_workspace(tmp_path)
        Heartbeat(settings, tmp_path, store, LocalExecutor(), EngineProcess(["true"]), Notifier(None),
                  on_engine_stopped=lambda why, code: None).check_host()
        [alert] = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert"]
        assert re.findall(r"(\S+) has [\d.]+ GB free", alert) == [str(p) for p in watched], alert
        (tmp_path / ".nightlab" / "state.db").unlink()


def test_log_lines_never_show_a_secret_and_carry_journald_priorities() -> None:
    token = Secret("123456:SECRET-TOKEN")
    formatter = DaemonFormatter(journal=True, secrets=[token])
    try:
        raise RuntimeError(f"POST https://api.telegram.org/bot{token.reveal()}/getUpdates failed")
    except RuntimeError:
        record = logging.LogRecord("nightlab.bot", logging.WARNING, __file__, 1,
                                   "url %s", (f"/bot{token.reveal()}/x",), sys.exc_info())
    text = formatter.format(record)
    assert "SECRET-TOKEN" not in text and "/bot***/x" in text
    assert all(line.startswith("<4>") for line in text.splitlines())


def test_a_reinstall_keeps_a_unit_edited_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    config = tmp_path / "nightlab.toml"
    config.write_text("")
    unit, backup = home / ".config/systemd/user/nightlab.service", home / ".config/systemd/user/nightlab.service.bak"
    assert install_unit(config, user=True, dry_run=False).startswith(f"wrote {unit}\n")
    written = unit.read_text()
    assert install_unit(config, user=True, dry_run=False).startswith(f"wrote {unit}\n")  # the same: no backup
    assert not backup.exists()
    edited = written.replace("[Service]\n", "[Service]\nEnvironment=CUDA_VISIBLE_DEVICES=1\n")
    unit.write_text(edited)
    said = install_unit(config, user=True, dry_run=False)
    assert said.startswith(f"wrote {unit} (the unit it replaces, which differed: {backup})\n")
    # `enable --now` left a running service on the old unit
    assert "  systemctl --user restart nightlab   # if it runs: the new unit applies (no experiment is lost)" \
        in said.splitlines()
    assert (unit.read_text(), backup.read_text()) == (written, edited)
    monkeypatch.setenv("HOME", str(config))  # a file: no unit folder can be made below it
    with pytest.raises(UserError) as err:
        install_unit(config, user=True, dry_run=False)
    assert str(err.value) == (f"cannot write {config}/.config/systemd/user/nightlab.service: Not a directory; run it"
                              " with sudo, or --user for a user unit (--print shows the unit)")


def test_a_system_unit_runs_as_the_user_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: `sudo nightlab service install ... --run-as nightlab` for a system user of its own.
    Before, User= was whoever ran sudo, and `sudo -u nightlab` could not write the unit."""
    config = tmp_path / "nightlab.toml"
    config.write_text("")
    service_user = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("SUDO_USER", "the-admin")
    unit = install_unit(config, user=False, dry_run=True, run_as=service_user)
    assert f"User={service_user}" in unit.splitlines() and "User=the-admin" not in unit
    with pytest.raises(UserError) as err:
        install_unit(config, user=False, dry_run=True, run_as="no-such-user-here")
    assert str(err.value) == ("--run-as no-such-user-here: no such user on this machine; create it first"
                              " (sudo useradd --system --create-home no-such-user-here)")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can try a command as another user")
def test_a_system_unit_whose_user_cannot_start_nightlab_is_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """README's `sudo .venv/bin/nightlab service install ... --run-as nightlab` from a clone in a home
    folder closed to others (mode 700/750) wrote a unit that failed at every start (203/EXEC)."""
    top = Path(tempfile.mkdtemp(prefix="nightlab-unit-"))
    try:
        top.chmod(0o755)
        (top / "closed").mkdir(mode=0o700)
        (top / "bin").mkdir(mode=0o755)
        for folder in ("closed", "bin"):  # this installation's console script, beside its Python
            script = top / folder / "nightlab"
            script.write_text("#!/bin/sh\nexit 0\n")
            script.chmod(0o755)
        config, hidden = top / "nightlab.toml", top / "closed" / "nightlab.toml"
        for path in (config, hidden):
            path.write_text("")
            path.chmod(0o644)
        monkeypatch.setattr(sys, "executable", str(top / "bin" / "python"))
        assert "User=nobody" in install_unit(config, user=False, dry_run=True, run_as="nobody").splitlines()
        with pytest.raises(UserError) as err:
            install_unit(hidden, user=False, dry_run=True, run_as="nobody")
        assert str(err.value).startswith(f"--run-as nobody: nobody cannot read {hidden}; put the config where")
        monkeypatch.setattr(sys, "executable", str(top / "closed" / "python"))
        with pytest.raises(UserError) as err:
            install_unit(config, user=False, dry_run=True, run_as="nobody")
        assert str(err.value).startswith(f"--run-as nobody: nobody cannot start {top}/closed/nightlab (a folder")
    finally:
        shutil.rmtree(top)


def test_the_env_file_for_the_tokens_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made by hand, nightlab.env gets the umask's 644: a chat token any user of the box can read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "nightlab.toml"
    config.write_text('[telegram]\ntoken = { env = "NIGHTLAB_TELEGRAM_TOKEN" }\noperators = [1]\n')
    env_file = tmp_path / ".config/nightlab/nightlab.env"
    said = install_unit(config, user=True, dry_run=False).splitlines()
    assert said[1:3] == [f"made {env_file} (readable by you only)",
                         f"  write the value after NIGHTLAB_TELEGRAM_TOKEN= in {env_file} (and remove its #)"]
    assert (env_file.read_text(), stat.S_IMODE(env_file.stat().st_mode)) == ("#NIGHTLAB_TELEGRAM_TOKEN=\n", 0o600)
    env_file.write_text("NIGHTLAB_TELEGRAM_TOKEN=123:abc\n")
    env_file.chmod(0o644)  # a reinstall over one the user made readable
    said = install_unit(config, user=True, dry_run=False).splitlines()
    assert said[1] == f"{env_file} was readable by others (mode 644); now 600"
    assert not any("write the value" in line for line in said)  # the token is in; its value is left alone
    assert (env_file.read_text(), stat.S_IMODE(env_file.stat().st_mode)) == ("NIGHTLAB_TELEGRAM_TOKEN=123:abc\n", 0o600)


@pytest.mark.parametrize("user", [False, True])
def test_the_unit_matches_the_reattach_design(tmp_path: Path, user: bool) -> None:
    config = tmp_path / "nightlab.toml"
    config.write_text(
        '[telegram]\ntoken = { file = "$CREDENTIALS_DIRECTORY/telegram" }\noperators = [1]\n'
    )
    load_settings(config)  # a valid config
    unit = render_unit(config, user=user, run_as="alice", executable=["/opt/venv/bin/nightlab"])
    lines = set(unit.splitlines())
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60", "Restart=on-failure",
                 "KillMode=process", f"ExecStart=/opt/venv/bin/nightlab run --config {config}",
                 f"WorkingDirectory={tmp_path}", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in lines, line
    assert ("User=alice" in lines) is not user
    assert any(line.startswith("LoadCredential=telegram:") for line in lines)
    assert ("WantedBy=default.target" if user else "WantedBy=multi-user.target") in lines
    verify = shutil.which("systemd-analyze")
    if verify and not user:
        path = tmp_path / "nightlab.service"
        path.write_text(unit.replace("/opt/venv/bin/nightlab", "/bin/true"))
        out = subprocess.run([verify, "verify", str(path)], capture_output=True, text=True, check=False)
        assert "nightlab.service:" not in out.stderr, out.stderr


ON_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from nightlab.heartbeat.engine_child import EngineProcess
from nightlab.heartbeat.jobs import Heartbeat
from nightlab.heartbeat.sdnotify import Notifier
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state.config import settings_from_table
from nightlab.loop.state.store import Store
from tests.waiting import wait_until

store = Store.for_workspace(Path(sys.argv[1]))
stopped = []
beat = Heartbeat(settings_from_table({}), Path(sys.argv[1]), store, LocalExecutor(),
                 EngineProcess([sys.executable, "-c", "raise SystemExit(2)"]), Notifier(None),
                 on_engine_stopped=lambda why, code: stopped.append((why, code)))
beat.start_engine()
wait_until(lambda: beat.engine.poll() is not None, "the engine to stop on its problem")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # from here no write succeeds: the disk is full
beat.check_engine()
print(stopped)
"""


def test_an_engine_stopped_on_a_full_disk_stops_the_daemon_though_chat_cannot_be_told(tmp_path: Path) -> None:
    """The engine stops (exit 2) because the ledger cannot be written; the daemon's alert cannot be
    stored either. The daemon logged that failure at every beat and never stopped."""
    out = subprocess.run([sys.executable, "-c", ON_A_FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert out.stdout == "[('a problem to fix first', 2)]\n", out.stderr
    assert "nightlab stopped: see the daemon's log" in out.stderr
    assert "could not be stored for chat (disk I/O error)" in out.stderr
