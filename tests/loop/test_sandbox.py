"""A local run's sandbox (loop/executors/sandbox.py): the run command cannot write the workspace's
state nor undo that, sees no process outside its own tree, and leaves none behind; where the
kernel refuses, it runs unconfined and says so."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.executors.sandbox import ENV_LAUNCHER, ENV_SANDBOX, SAID, command_line, launcher, probe
from nightlab.loop.state import ledger
from nightlab.loop.state.config import Settings
from nightlab.loop.state.store import Store

from tests.fakes.loop_workspace import make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.fakes.tagged import tagged

REFUSED = probe()
needs_sandbox = pytest.mark.skipif(bool(REFUSED), reason=f"the kernel refuses the run sandbox here: {REFUSED}")


def _sandboxed(cwd: Path, script: str, read_only: Sequence[Path], writable: Sequence[Path] = (),
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", command_line(script, read_only, writable)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "ws" / ".nightlab"
    state.mkdir(parents=True)
    (state / "state.db").write_text("the ledger")
    return state


@needs_sandbox
def test_a_run_writes_its_own_folders_but_not_the_state_and_its_status_comes_back(tmp_path: Path) -> None:
    state = _state(tmp_path)
    own, caches = state / "worktrees" / "3", state / "compile-cache"  # the caches' folder is made for it
    own.mkdir(parents=True)
    done = _sandboxed(tmp_path / "ws", (
        "echo forged > .nightlab/state.db || echo state refused;"
        " touch .nightlab/new || echo new refused;"
        " echo trained > .nightlab/worktrees/3/model && mkdir .nightlab/compile-cache/triton && echo own written;"
        " exit 7"), [state], [own, caches])
    assert done.returncode == 7, done.stderr
    assert done.stdout.split("\n")[:3] == ["state refused", "new refused", "own written"]
    assert "Read-only file system" in done.stderr and SAID not in done.stderr
    assert (state / "state.db").read_text() == "the ledger" and not (state / "new").exists()
    assert (own / "model").read_text() == "trained\n" and (caches / "triton").is_dir()
    assert (own / "model").stat().st_uid == Path(tmp_path).stat().st_uid  # the user's files, as before


TRY_TO_UNDO = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
state = sys.argv[1]
tried = {
    "umount": libc.umount2(state.encode(), 2),
    "remount": libc.mount(None, state.encode(), None, 32 | 4096, None),  # MS_REMOUNT | MS_BIND: read-write again
    "proc": libc.mount(b"proc", b"/mnt", b"proc", 0, None),  # a /proc of the machine's processes
}
for path in (f"/proc/1/root{state}/state.db", f"{state}/state.db"):
    try:
        with open(path, "w") as f:
            f.write("forged")
        tried[path] = 0
    except OSError:
        tried[path] = -1
print(sorted(tried.values()), len([p for p in os.listdir("/proc") if p.isdigit()]))
"""


@needs_sandbox
def test_a_run_cannot_undo_the_sandbox_nor_see_the_processes_outside_it(tmp_path: Path) -> None:
    """Even as root (CI): the mounts are locked (made in one user namespace, the run in a nested
    one), and the run's /proc is its own (the engine's /proc/<pid>/root reached the state unprotected)."""
    state = _state(tmp_path)
    script = tmp_path / "undo.py"
    script.write_text(TRY_TO_UNDO)
    done = _sandboxed(tmp_path, f"{sys.executable} {script} {state}", [state])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:5] == ["[-1,", "-1,", "-1,", "-1,", "-1]"], done.stdout
    # its init, the shell and python, of the machine's many (this test's among them)
    assert int(done.stdout.split()[-1]) <= 4 < len(psutil.pids())
    assert (state / "state.db").read_text() == "the ledger"


@needs_sandbox
def test_signals_reach_the_command_and_what_it_leaves_running_ends_with_it(tmp_path: Path) -> None:
    state = _state(tmp_path)
    tag = f"left-running-{tmp_path.name}"
    script = (f"{sys.executable} -c 'import time; time.sleep(300)' {tag} & "
              "trap 'echo stopped; exit 0' TERM; echo ready; while :; do sleep 0.05; done")
    proc = subprocess.Popen(["/bin/sh", "-c", f"exec {command_line(script, [state], [])}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)  # the sandbox's launcher only, as a person's `kill` would
    assert proc.wait(timeout=30) == 0 and proc.stdout.read() == "stopped\n"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert tag not in ps  # the kernel ends the namespace's processes with its first


@needs_sandbox
def test_a_writable_folder_that_links_to_the_state_does_not_open_it(tmp_path: Path) -> None:
    """The artifact folder a run saves in is bound writable: a link planted there to the state
    folder would have made the whole state writable again."""
    state = _state(tmp_path)
    (tmp_path / "artifact").symlink_to(state)
    done = _sandboxed(tmp_path, "echo forged > artifact/state.db", [state], [tmp_path / "artifact"])
    assert done.returncode != 0 and (state / "state.db").read_text() == "the ledger"


@needs_sandbox
def test_a_whole_sandbox_offers_its_command_the_launcher_to_nest_one_with_more_read_only(tmp_path: Path) -> None:
    """The harness nests one around its training command (trainer/prepare.py `read_only_to`): the
    data and the code that scores are read-only there, the run's own folders still writable."""
    state, data = _state(tmp_path), tmp_path / "data"
    own = state / "artifact"
    data.mkdir()
    script = tmp_path / "train.sh"
    script.write_text("echo forged > ../data/shard || echo data refused; echo model > .nightlab/artifact/m\n")
    done = _sandboxed(tmp_path / "ws", f"${ENV_LAUNCHER} --read-only {data} -- /bin/sh {script}", [state], [own])
    assert done.returncode == 0 and done.stdout == "data refused\n", done.stderr
    assert not (data / "shard").exists() and (own / "m").read_text() == "model\n"


def test_a_sandbox_turned_off_or_refused_offers_no_launcher(tmp_path: Path) -> None:
    state = _state(tmp_path)
    env = {"PATH": "/usr/bin:/bin", ENV_SANDBOX: "0", ENV_LAUNCHER: "inherited"}
    done = _sandboxed(tmp_path, f'echo "[${ENV_LAUNCHER}]"', [state], env=env)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr


def test_turned_off_or_refused_by_the_kernel_the_run_goes_on_unconfined_saying_so(tmp_path: Path) -> None:
    state = _state(tmp_path)
    done = _sandboxed(tmp_path / "ws", "echo one > .nightlab/state.db", [state],
                      env={"PATH": "/usr/bin:/bin", ENV_SANDBOX: "0"})
    assert done.returncode == 0 and done.stderr == f"{SAID} none ({ENV_SANDBOX}=0)\n"
    assert (state / "state.db").read_text() == "one\n"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "--map-root-user", "true"]).returncode:
        pytest.skip("no `unshare` to make a user namespace that allows no more")
    # a user namespace that allows no nested one: the kernel's own refusal (ENOSPC)
    line = command_line("echo two > .nightlab/state.db", [state], [])
    done = subprocess.run(["unshare", "--user", "--map-root-user", "/bin/sh", "-c",
                           f"echo 0 > /proc/sys/user/max_user_namespaces && {line}"],
                          cwd=tmp_path / "ws", capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"{SAID} none, the kernel refused it (unshare (user namespaces): No space left")
    assert (state / "state.db").read_text() == "two\n"
    # refused to the harness's nested one (the run's sandbox offered it the launcher): said as that one
    done = subprocess.run(["unshare", "--user", "--map-root-user", "/bin/sh", "-c",
                           f"echo 0 > /proc/sys/user/max_user_namespaces && {line}"],
                          cwd=tmp_path / "ws", capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", ENV_LAUNCHER: shlex.join(launcher())})
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"{SAID} none for the training command, the kernel refused it (unshare"), done.stderr
    assert done.stderr.rstrip().endswith("the data and the code that scores are checked after the training instead")


@pytest.mark.parametrize("sandbox", ["1", "0"])
def test_a_change_that_raises_the_best_in_the_ledger_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  sandbox: str) -> None:
    """The trick: a training command that writes 9.0 as the best's recorded val_bpb, then scores
    worse than it (1.5 against 1.0). Unconfined (NIGHTLAB_SANDBOX=0) it is kept as a gain of 7.5;
    sandboxed, its write is refused and it is judged against the best's real 1.0."""
    if sandbox == "1" and REFUSED:
        pytest.skip(f"the kernel refuses the run sandbox here: {REFUSED}")
    monkeypatch.setenv(ENV_SANDBOX, sandbox)
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [1.5], "MODE": "ledger"}}])
    assert run_engine(settings, 2, proposer=proposer) == 0
    first, second = ledger.experiments(Store.for_workspace(settings.workspace_path))
    log = (settings.workspace_path / ".nightlab" / "runs" / "2.log").read_text()
    if sandbox == "1":
        assert "ledger: refused (attempt to write a readonly database)" in log
        assert (first.metric, second.status, second.metric) == (1.0, "discard", 1.5)
    else:
        assert "ledger: written" in log
        assert (first.metric, second.status) == (9.0, "keep")


FAKES = Path(__file__).resolve().parents[1] / "fakes"


@pytest.mark.parametrize("sandbox", ["1", "0"])
def test_an_agent_that_raises_the_best_in_the_ledger_does_not_get_its_change_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: str) -> None:
    """The coding agent runs in the same sandbox as a run, its own folder (.nightlab/agent) writable:
    its change scores 1.5 against the best's 1.0, and it wrote 9.0 as the best's val_bpb."""
    if sandbox == "1" and REFUSED:
        pytest.skip(f"the kernel refuses the sandbox here: {REFUSED}")
    monkeypatch.setenv(ENV_SANDBOX, sandbox)
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} write-ledger"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    assert run_engine(settings, 2) == 0
    first, second = ledger.experiments(Store.for_workspace(settings.workspace_path))
    said = (settings.workspace_path / ".nightlab" / "agent" / "stdout.log").read_text()
    if sandbox == "1":
        assert said == "ledger: refused (attempt to write a readonly database)\n"
        assert (first.metric, second.status, second.metric) == (1.0, "discard", 1.5)
    else:
        assert said == "ledger: written\n" and (first.metric, second.status) == (9.0, "keep")


def _with_a_data_dir(settings: Settings, tmp_path: Path) -> Path:
    """The built-in trainer's data dir in the runs' environment (runenv.data_dir), for a stub workspace."""
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    for name in ("shard_00000.parquet", "shard_00001.parquet", "tokenizer/tokenizer.json"):
        (data / name).write_text(name)
    store = Store.for_workspace(settings.workspace_path)
    store.set("workspace.harness_env", {"NIGHTLAB_DATA_DIR": str(data)})
    store.close()
    return data


@pytest.mark.parametrize("sandbox", ["1", "0"])
def test_an_agent_cannot_write_the_data_runs_are_scored_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           sandbox: str) -> None:
    """The agent runs before its change's run: rows it wrote into the data dir's scored rows' cache
    were what that run was scored on (2.86 -> 0.19: the harness makes the cache only where it is
    missing). The data dir is read-only to the agent too."""
    if sandbox == "1" and REFUSED:
        pytest.skip(f"the kernel refuses the sandbox here: {REFUSED}")
    monkeypatch.setenv(ENV_SANDBOX, sandbox)
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": "true"}})
    data = _with_a_data_dir(settings, tmp_path)
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} write-data {data}"
    settings = dataclasses.replace(settings, proposer=dataclasses.replace(
        settings.proposer, agent=dataclasses.replace(settings.proposer.agent, command=agent)))
    assert run_engine(settings, 2) == 0
    said = (settings.workspace_path / ".nightlab" / "agent" / "stdout.log").read_text()
    if sandbox == "1":
        assert said == "data: refused (Read-only file system)\n" and not (data / "eval-cache").exists()
    else:
        assert said == "data: written\n" and (data / "eval-cache" / "rows.pt").is_file()


@needs_sandbox
def test_an_agent_cannot_plant_a_pth_file_in_the_scorers_python(tmp_path: Path) -> None:
    """Found after it by the run of its change, which the night then pauses on for a person: the
    scorer's Python is read-only to the agent of the built-in trainer. (Sandboxed only: unconfined,
    the file would land in the Python this suite runs in.)"""
    import site

    planted = Path(site.getsitepackages()[0], f"zz_nightlab_{tmp_path.name}.pth")
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} plant-pth {planted.name}"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    _with_a_data_dir(settings, tmp_path)
    try:
        assert run_engine(settings, 2) == 0
        said = (settings.workspace_path / ".nightlab" / "agent" / "stdout.log").read_text()
        assert said == "python: refused (Read-only file system)\n" and not planted.exists()
    finally:
        planted.unlink(missing_ok=True)


@needs_sandbox
def test_an_agent_cannot_see_the_daemon_whose_environment_holds_the_chat_tokens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unconfined, an agent read the daemon's /proc/<pid>/environ (its pid in .nightlab/daemon.lock)
    and put the chat token in train.py (tests/heartbeat/test_daemon.py: redacted wherever nightlab
    says it). In its sandbox the daemon is not there to read."""
    secret = f"123:{tmp_path.name}"
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} steal-token NIGHTLAB_TEST_SECRET"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", tmp_path.name],
                              env={**os.environ, "NIGHTLAB_TEST_SECRET": secret})
    try:
        (settings.workspace_path / ".nightlab" / "daemon.lock").write_text(str(daemon.pid))
        assert run_engine(settings, 2) == 0
    finally:
        daemon.kill()
        daemon.wait()
    second = ledger.experiments(Store.for_workspace(settings.workspace_path))[1]
    assert second.status == "crash" and "No such file or directory" in second.reason, second.reason
    assert secret not in (settings.workspace_path / "train.py").read_text() and not tagged(tmp_path.name)


@needs_sandbox
def test_the_projects_checks_run_in_the_sandbox_too(tmp_path: Path) -> None:
    """The checks command runs the change's code (tests that import train.py): unconfined, it could
    write the ledger as a run could."""
    forge = ("import sqlite3; db = sqlite3.connect('.nightlab/state.db');"
             " db.execute('UPDATE experiments SET metric = 9.0'); db.commit()")
    settings = make_stub_workspace(tmp_path, project={"checks_command": f'{sys.executable} -c "{forge}"'})
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.5]}}])) == 0
    first, second = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert first.metric == 1.0 and second.status == "checks_failed"
    assert second.reason == "checks failed (exit 1): sqlite3.OperationalError: attempt to write a readonly database"


@needs_sandbox
def test_the_projects_checks_cannot_write_the_data_runs_are_scored_on(tmp_path: Path) -> None:
    """They run after a run, before the next: rows written into the scored rows' cache would score it."""
    write = "import os; open(os.environ['NIGHTLAB_DATA_DIR'] + '/tokenizer/tokenizer.json', 'w')"
    settings = make_stub_workspace(tmp_path, project={"checks_command": f'{sys.executable} -c "{write}"'})
    data = _with_a_data_dir(settings, tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.5]}}])) == 0
    second = ledger.experiments(Store.for_workspace(settings.workspace_path))[1]
    assert second.status == "checks_failed" and second.reason.endswith("OSError: [Errno 30] Read-only file system:"
                                                                       f" '{data}/tokenizer/tokenizer.json'")
    assert (data / "tokenizer" / "tokenizer.json").read_text() == "tokenizer/tokenizer.json"
