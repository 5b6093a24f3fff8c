"""The daemon process: one per workspace, signals, a clean end after --max-experiments."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nightlab.heartbeat import lifecycle
from nightlab.loop.executors import RunHandle
from nightlab.loop.state import ledger
from nightlab.loop.state.config import LIVE_HEARTBEAT_KEY
from nightlab.loop.state.lock import holder
from nightlab.loop.state.store import Store

from tests.fakes.loop_workspace import git_out
from tests.heartbeat.conftest import FAKES, DaemonRun, Harness, gone, write_config
from tests.waiting import wait_until


def test_second_daemon_is_refused_and_the_first_ends_after_max_experiments(
    harness: Harness, tmp_path: Path
) -> None:
    # The engine finishes once the second daemon was refused: on a timer, a slow start of the
    # second could come after the first had ended, and find the workspace free.
    finish = tmp_path / "finish"
    first = harness.start("--finish-when", str(finish), max_experiments=1)
    wait_until(lambda: first.store.get("engine.tick"), what="the engine to tick")

    second = subprocess.run(
        [sys.executable, "-m", "nightlab.heartbeat.cli", "run",
         "--config", str(write_config(tmp_path / "second.toml")), "--workspace", str(first.workspace)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert second.returncode != 0
    assert f"nightlab is already running for {first.workspace} (pid {first.proc.pid})" in second.stderr

    finish.touch()
    assert first.proc.wait(timeout=30) == 0  # the engine finished: the daemon stops by itself
    assert "engine finished" in first.log()
    assert first.store.get("fake_engine.max_experiments") == 1


def test_sigterm_stops_within_the_bound_and_leaves_the_run_running(
    harness: Harness, tmp_path: Path
) -> None:
    pidfile = tmp_path / "trainer.pids"
    trainer = f"{sys.executable} {FAKES / 'fake_trainer.py'} hang {pidfile}"
    daemon = harness.start("--launch-run", trainer)
    wait_until(pidfile.exists, what="the run to start")
    run_pids = [int(p) for p in pidfile.read_text().split()]
    harness.cleanup_pids.extend(run_pids)
    engine_pid = daemon.store.get("fake_engine.starts")[0]

    # SIGHUP first: the heartbeat limits are reloaded live
    write_config(tmp_path / "daemon.toml", run_timeout=500.0)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded heartbeat.run_timeout 600.0 -> 500.0" in daemon.log(), what="reload")
    assert daemon.store.get(LIVE_HEARTBEAT_KEY)["run_timeout"] == 500.0  # for the engine's next checkpoint

    started = time.monotonic()
    assert daemon.stop(timeout=30) == 0
    assert time.monotonic() - started < 25  # bot + engine bounds (10 s each) plus slack
    assert "stopping: SIGTERM" in daemon.log()
    wait_until(lambda: gone(engine_pid), what="the engine to be gone")
    # the run goes on, unmarked, for the next start to re-attach
    assert not any(gone(p) for p in run_pids)
    run = ledger.get_run(daemon.store, 1)
    assert (run.state, run.kill_reason) == ("running", None)


def test_the_engine_starts_while_the_doctor_still_waits_on_a_chat_api(harness: Harness) -> None:
    """The start's doctor findings held the engine back until every check was done: the torch
    probe (~2 s every start) and a chat API that does not answer (its 10 s timeout). They now come
    in the log while the night runs, and a stop soon after the start still waits for them."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections queue, never answered
        chat = (f'[telegram]\ntoken = {{ env = "NIGHTLAB_TEST_TG" }}\noperators = [1]\n'
                f'api_base = "http://127.0.0.1:{silent.getsockname()[1]}/"\n')
        daemon = harness.start(env={"NIGHTLAB_TEST_TG": "123:abc"}, extra_config=chat)
        wait_until(lambda: daemon.store.get("engine.tick"), what="the engine to tick")
        assert "channels  telegram" not in daemon.log()
    assert daemon.stop() == 0  # closed: the check fails at once, and its finding is logged before the stop
    assert "FAIL channels  telegram: not reachable" in daemon.log()
    assert daemon.log().index("channels  telegram") < daemon.log().index("nightlab daemon stopped")


def test_an_engine_left_over_by_a_previous_daemon_is_stopped_first(harness: Harness, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    leftover = subprocess.Popen([sys.executable, str(FAKES / "fake_engine.py"), "--config", "unused",
                                 "--workspace", str(workspace)])
    harness.cleanup_pids.append(leftover.pid)
    store = Store.for_workspace(workspace)
    wait_until(lambda: store.get("engine.tick"), what="the leftover engine to hold the lock")

    daemon = harness.start()
    assert leftover.wait(timeout=20) is not None
    wait_until(lambda: len(store.get("fake_engine.starts", [])) == 2, what="the daemon's own engine")
    assert f"stopping an engine left over by a previous daemon (pid {leftover.pid})" in daemon.log()
    assert daemon.stop() == 0


STUB_TRAIN = """\
import os
import pathlib
import time

LEARNING_RATE = 0.1
hold = os.environ.get("NIGHTLAB_TEST_HOLD")  # a test's gate: the run goes on while this file exists
step = 0
while step < 25 or (hold and pathlib.Path(hold).exists()):
    print(f"step {step}", flush=True)
    time.sleep(0.1)
    step += 1
print("---")
print(f"val_bpb: {1.0 + abs(LEARNING_RATE - 0.05):.6f}")
"""


def _stub_project(tmp_path: Path) -> tuple[Path, str]:
    """A workspace whose train.py is STUB_TRAIN, and the config lines that run it."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(STUB_TRAIN)
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    return workspace, (f'[project]\nrun_command = "{sys.executable} train.py"\nprotected = []\n'
                       '[loop]\ncheckpoint_interval = 0.2\n')


def test_the_next_start_reattaches_to_the_run_a_sigterm_left_running(
    harness: Harness, tmp_path: Path
) -> None:
    workspace, project = _stub_project(tmp_path)
    # The baseline runs until the second engine has ticked: on its own 2.5 s, a stop slowed by a
    # loaded box saw it end before the daemon was gone, and no run was left to re-attach to.
    hold = tmp_path / "hold"
    hold.touch()
    env = {"NIGHTLAB_TEST_HOLD": str(hold)}
    first = harness.start(real_engine=True, extra_config=project, max_experiments=2, env=env)
    store = first.store
    run = wait_until(lambda: (ledger.running_runs(store) or [None])[0], timeout=60, what="the baseline run")
    handle = RunHandle.from_json(run.handle)
    harness.cleanup_pids.append(handle.pid)
    assert first.stop() == 0
    assert not gone(handle.pid)  # the run outlived the daemon and its engine
    stopped = time.time()

    second = harness.start(real_engine=True, extra_config=project, max_experiments=2, name="second", env=env)
    wait_until(lambda: store.get("engine.tick", 0) > stopped, timeout=60, what="the second engine to tick",
               abort=lambda: second.proc.poll() is not None and second.log())
    hold.unlink()
    assert second.proc.wait(timeout=90) == 0, second.log()
    again = ledger.get_run(store, run.id)
    assert (again.state, again.exit_code, again.kill_reason) == ("exited", 0, None)
    numbers = [e.number for e in ledger.experiments(store)]
    assert numbers == [1, 2]  # the re-attached baseline recorded once, then one more experiment
    assert len(store.connection().execute("SELECT id FROM runs").fetchall()) == 2


def test_an_engine_restarted_after_an_edit_nobody_reloaded_runs_with_the_daemons_config(
    harness: Harness, tmp_path: Path
) -> None:
    """The config file saved half-edited while the night runs (no reload), then the engine dies
    (say, the OOM killer): the heartbeat's restart must bring back an engine with the config the
    daemon loaded, as the README promises (an edit applies on a reload or a restart). It used to
    read the file again, exit 2 on every restart and leave the loop paused for "3 restarts"."""
    workspace, project = _stub_project(tmp_path)
    daemon = harness.start(real_engine=True, extra_config=project)
    first = wait_until(lambda: holder(workspace), timeout=60, what="the engine to take its lock")
    config = tmp_path / "daemon.toml"
    config.write_text(config.read_text() + "[loop\n")  # saved mid-edit
    os.kill(first, signal.SIGKILL)
    killed = time.time()
    wait_until(lambda: (holder(workspace) or first) != first and daemon.store.get("engine.tick", 0) > killed,
               timeout=60, what="a restarted engine to tick", abort=lambda: "exited with code 2" in daemon.log()
               and daemon.log())
    assert len(daemon.events("engine_restarted")) == 1 and ledger.paused(daemon.store) is None
    assert daemon.stop() == 0


def test_an_edit_of_the_config_is_said_in_the_log(harness: Harness, tmp_path: Path) -> None:
    """An edited config changes nothing until a reload or a restart; the log says so once, so
    nobody waits for a change that is not coming (it said nothing)."""
    daemon = harness.start()
    wait_until(lambda: daemon.store.get("engine.tick"), what="the engine to tick")
    config = write_config(tmp_path / "daemon.toml", run_timeout=500.0)
    said = f"{config} was edited; it applies on `systemctl reload nightlab`"
    wait_until(lambda: said in daemon.log(), what="the edit to be said")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded heartbeat.run_timeout 600.0 -> 500.0" in daemon.log(), what="reload")
    assert daemon.log().count(said) == 1
    assert daemon.stop() == 0


def test_the_chat_token_stays_in_the_daemon(harness: Harness, tmp_path: Path, telegram) -> None:
    """Only the bot needs the chat token: the engine, and every run, agent and check it starts, get
    an environment without it, so an edited train.py cannot print it into a crash's digest."""
    dump = tmp_path / "run-env.txt"
    chat = f'[telegram]\ntoken = {{ env = "NIGHTLAB_TEST_TG" }}\noperators = [1]\napi_base = "{telegram.url}"\n'
    run = harness.start("--launch-run", f"env > {dump}.tmp && mv {dump}.tmp {dump}",
                        env={"NIGHTLAB_TEST_TG": telegram.token}, extra_config=chat)
    wait_until(dump.is_file, what="the run to write its environment")
    seen = dump.read_text()
    assert "PATH=" in seen and "NIGHTLAB_TEST_TG" not in seen and telegram.token not in seen
    assert run.proc.poll() is None, run.log()  # the daemon itself had the token: its bot is up


def _agent_night(project: str, mode: str, telegram_url: str, chat_id: int) -> str:
    """A config: one baseline, then tests/fakes/agent_misbehave.py in `mode` as the proposer, and
    Telegram (its token from NIGHTLAB_TEST_TG)."""
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} {mode}"
    return (f'{project}baseline_runs = 1\nremeasure_every = 0\n[proposer]\nkind = "agent"\n'
            f'[proposer.agent]\ncommand = "{agent}"\n'
            f'[telegram]\ntoken = {{ env = "NIGHTLAB_TEST_TG" }}\noperators = [1]\nchats = [{chat_id}]\n'
            f'api_base = "{telegram_url}"\n')


def test_a_chat_token_an_agent_reads_in_the_daemons_environ_is_starred_wherever_it_is_stored(
    harness: Harness, tmp_path: Path, telegram
) -> None:
    """The engine never had the token, so it could not star it out: an agent (the same user) read it
    in the daemon's /proc/<pid>/environ and the ledger, the exports, the commit message and the
    engine's log lines kept it as written. Now the daemon hands the engine the value on stdin."""
    workspace, project = _stub_project(tmp_path)
    chat_id = -100
    config = _agent_night(project, "steal-token NIGHTLAB_TEST_TG", telegram.url, chat_id)
    token = telegram.token
    daemon = harness.start(real_engine=True, extra_config=config, max_experiments=2, channels=True,
                           # where the kernel refuses the agent's sandbox, which hides the daemon from it
                           env={"NIGHTLAB_TEST_TG": token, "NIGHTLAB_SANDBOX": "0"})
    assert daemon.proc.wait(timeout=120) == 0, daemon.log()
    two = ledger.experiments(daemon.store)[1]
    assert (two.status, two.description) == ("crash", "tell the chat (token ***)"), daemon.log()
    assert token in git_out(workspace, "show", f"{two.commit}:train.py")  # the agent did get it
    nightlab = workspace / ".nightlab"
    said = {
        "state.db": b"".join(f.read_bytes() for f in nightlab.glob("state.db*")),
        "results.tsv": (workspace / "results.tsv").read_bytes(),
        "autoresearch.jsonl": (workspace / "autoresearch.jsonl").read_bytes(),
        "commit message": git_out(workspace, "log", "-1", "--format=%B", two.commit).encode(),
        "daemon and engine log": daemon.log_path.read_bytes(),
        "chat": "\n".join(f"{m.text}\n{m.raw}" for m in telegram.sent).encode(),
    }
    assert "*** reaches the bot" in said["commit message"].decode() and "401 bad token ***" in said["chat"].decode()
    assert [name for name, text in said.items() if token.encode() in text] == []


def test_an_engine_that_stops_on_a_problem_to_fix_stops_the_daemon_and_says_why(
    harness: Harness, tmp_path: Path
) -> None:
    """A user's edit left in train.py: restarting the engine three times and pausing with "check the
    logs, then /resume" helped nobody (a resume met the same edit). The chat hears the engine's own
    words, once, and the daemon ends with 2, which the systemd unit does not restart."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(STUB_TRAIN)
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    project = f'[project]\nrun_command = "{sys.executable} train.py"\nprotected = []\n'
    assert harness.start(real_engine=True, extra_config=project, max_experiments=1).proc.wait(timeout=90) == 0
    (workspace / "train.py").write_text(STUB_TRAIN + "# mine\n")

    second = harness.start(real_engine=True, extra_config=project, name="second")
    assert second.proc.wait(timeout=90) == 2, second.log()
    problem = (f"{workspace} has changes nightlab did not make: train.py; commit them (git -C {workspace} add -A &&"
               f" git -C {workspace} commit -m ...) or put them aside (git -C {workspace} stash -u; `git stash pop`"
               " brings them back), then start again")
    assert [a["text"] for a in second.events("alert")] == [f"nightlab stopped: {problem}"]
    assert second.events("engine_restarted") == [] and second.events("self_paused") == []
    assert (workspace / "train.py").read_text().endswith("# mine\n")  # nothing of the user's undone


def test_a_ledger_damaged_inside_stops_the_daemon_at_its_start(harness: Harness, tmp_path: Path) -> None:
    """Opening reads the schema only: a damaged table showed first in the middle of the night, as
    engine restarts and a pause that said "check the logs"."""
    from tests.heartbeat.test_history_cli import damage_table

    workspace = tmp_path / "ws"
    store = Store.for_workspace(workspace)
    for number in range(1, 40):
        store.emit("experiment_finished", number=number, text="x" * 200)
    store.close()
    db = workspace / ".nightlab" / "state.db"
    damage_table(db, "events")
    daemon = harness.start()
    assert daemon.proc.wait(timeout=60) == 2, daemon.log()
    assert (f"nightlab: {db} is not a readable nightlab state database (database disk image is malformed);"
            " restore it from a backup, or move it aside to start this workspace's ledger afresh") in daemon.log()
    assert Store.for_workspace(workspace).get("fake_engine.starts") is None  # no engine started


def test_the_start_is_said_before_anything_the_engine_says(harness: Harness) -> None:
    """The start was said once the daemon saw its engine tick, up to a poll later: an engine quick to
    start its first experiment had the console show "▶ #1 started" before "🟢 nightlab started"."""
    daemon = harness.start("--start-experiment", channels=True)  # no chat configured: the console
    wait_until(lambda: "▶ #1" in daemon.log() and "🟢 nightlab started" in daemon.log(),
               what="the start and the first experiment on the console")
    assert daemon.stop() == 0
    log = daemon.log()
    assert 0 <= log.find("🟢 nightlab started") < log.find("▶ #1"), log


def test_a_start_after_the_data_folder_moved_names_the_data_dir_left_for_its_old_place(
        harness: Harness, tmp_path: Path) -> None:
    """`[data] source` edited to the folder's new place and the daemon restarted: no `nightlab prepare`
    run by hand said the old place's data dir left in the cache; the daemon's own preparation says it."""
    from nightlab.trainer import prepare

    from tests.heartbeat.test_cli import text_folder

    old, new, cache = text_folder(tmp_path / "old"), tmp_path / "new", tmp_path / "cache"
    left = prepare.prepare(str(old), -1, cache, progress=lambda _: None)
    old.rename(new)
    daemon = harness.start(real_engine=True, extra_config=f'[data]\nsource = "{new}"\ncache_dir = "{cache}"\n',
                           max_experiments=0)  # prepared, then done: no run
    assert daemon.proc.wait(timeout=60) == 0, daemon.log()
    assert (f"data: {left} (" in daemon.log() and f"holds these files as prepared at {old}, which is gone"
            in daemon.log()), daemon.log()
    assert left.is_dir()


def test_chat_hears_each_start_and_stop_but_not_each_turn_of_a_crash_loop(
    harness: Harness, tmp_path: Path, telegram
) -> None:
    """A restart at 3 am showed only in later digests. Now the chat hears the daemon come up (and what
    it found) and a clean stop (and why); a daemon killed a second time within the hour starts silently."""
    chat_id = -100
    chat = (f'[telegram]\ntoken = {{ env = "NIGHTLAB_TEST_TG" }}\noperators = [1]\nchats = [{chat_id}]\n'
            f'api_base = "{telegram.url}"\n')

    def start(name: str) -> DaemonRun:
        return harness.start(env={"NIGHTLAB_TEST_TG": telegram.token}, extra_config=chat, channels=True, name=name)

    def texts() -> list[str]:
        return [m.text for m in telegram.messages(chat_id)]

    first = start("first")
    wait_until(lambda: first.events("daemon_started"), what="the first start to be said")
    first.proc.kill()  # the OOM killer: no shutdown
    first.proc.wait(10)
    ledger.set_paused(first.store, "telegram:1", "checking the GPU", None)

    second = start("second")
    said = ("🟢 nightlab started; the daemon before it did not stop cleanly (killed, crashed, or the machine went"
            " down); the loop is paused by telegram:1: checking the GPU")
    wait_until(lambda: said in texts(), what="the second start in chat", abort=lambda: second.proc.poll() is not None
               and second.log())
    assert second.stop() == 0
    stopped = "⏹ nightlab stopped: SIGTERM (systemctl stop or restart, or a kill)"
    assert stopped in texts()  # sent before the daemon exited

    def unsent(store: Store) -> int:
        return store.connection().execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0]

    third = start("third")
    # Killed once its bot has marked the start sent: killed between the send and the mark, the
    # next daemon's bot sends it again (at least once, by design), and chat would show it twice.
    wait_until(lambda: texts()[-1].startswith("🟢 nightlab started") and not unsent(third.store),
               what="the start after a stop in chat, marked sent")
    third.proc.kill()
    third.proc.wait(10)
    fourth = start("fourth")
    # its chat connected too: the start is counted before the engine starts, and a stop before the
    # chat connects leaves its line in the outbox for the next start
    wait_until(lambda: fourth.store.get(lifecycle.LIFECYCLE_KEY)["unsaid"] == 1 and "telegram: polling as" in fourth.log(),
               what="the fourth start counted, its chat connected")
    assert fourth.stop() == 0
    back = "🟢 nightlab started; the loop is paused by telegram:1: checking the GPU"
    assert texts()[texts().index(said):] == [said, stopped, back, stopped]


def test_after_an_agent_removed_the_ledger_the_next_start_is_honest(harness: Harness, tmp_path: Path, telegram) -> None:
    """`git clean -fdx` by an agent: the engine wrote the ledger back and stopped, but the daemon and
    its bot went on in the removed file: the stop and the sent marks went there, so the next start
    said the daemon before it "did not stop cleanly" and sent the digests of the night again."""
    workspace, project = _stub_project(tmp_path)
    chat_id = -100
    config = _agent_night(project, "clean-all", telegram.url, chat_id)
    env = {"NIGHTLAB_TEST_TG": telegram.token, "NIGHTLAB_SANDBOX": "0"}  # unconfined: sandboxed, it cannot clean

    def texts() -> list[str]:
        return [m.text for m in telegram.messages(chat_id)]

    telegram.hold("#1 keep", accepted=True)  # the baseline's digest is in flight while the agent cleans
    first = harness.start(real_engine=True, extra_config=config, channels=True, env=env)
    assert telegram.holding.wait(60), first.log()
    wait_until(lambda: "nightlab stopped: the proposer removed the night's ledger" in first.log(),
               timeout=60, what="the engine to write the ledger back and stop")
    telegram.release()  # sent now, after the write-back
    assert first.proc.wait(timeout=60) == 2, first.log()
    alert = [t for t in texts() if t.startswith("🚨 nightlab stopped: the proposer removed the night's ledger")]
    assert len(alert) == 1

    said = len(texts())
    # an agent that takes its time: the second night is up (said in chat) before anything ends it
    waits = _agent_night(project, "asks", telegram.url, chat_id)
    second = harness.start(real_engine=True, extra_config=waits, channels=True, env=env, name="second")
    wait_until(lambda: any(t.startswith("🟢") for t in texts()[said:]), timeout=60, what="the second start in chat",
               abort=lambda: second.proc.poll() is not None and second.log())
    assert [t for t in texts()[said:] if t.startswith("🟢")] == ["🟢 nightlab started"]  # the stop was stored
    assert [t for t in texts() if t.startswith("🏆 #1 keep")] == [texts()[1]]  # not sent again
    assert second.stop() == 0


def test_a_daemon_whose_lock_file_was_removed_still_refuses_a_second(harness: Harness, tmp_path: Path) -> None:
    """`rm -rf .nightlab` (or an agent's `git clean -fdx`) removed daemon.lock: the first daemon held
    its lock on the removed file, so a second `nightlab run` started on the same workspace beside it."""
    first = harness.start()
    wait_until(lambda: first.store.get("engine.tick"), what="the engine to tick")
    lock = first.workspace / ".nightlab" / "daemon.lock"
    lock.unlink()
    wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(first.proc.pid),
               what="the daemon to put its lock file back")
    second = subprocess.run(
        [sys.executable, "-m", "nightlab.heartbeat.cli", "run",
         "--config", str(write_config(tmp_path / "second.toml")), "--workspace", str(first.workspace)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert f"nightlab is already running for {first.workspace} (pid {first.proc.pid})" in second.stderr
    assert first.proc.poll() is None and first.stop() == 0


def cleaning_night(tmp_path: Path) -> tuple[Path, str, Path]:
    """A night whose agent runs `git clean -fdx` in the workspace (the ledger with it) after the
    baseline, then works on until the gate file exists: (the workspace, the config, the gate)."""
    workspace, project = _stub_project(tmp_path)
    gate = tmp_path / "gate"
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} clean-all {gate}"
    return workspace, (f'{project}baseline_runs = 1\nremeasure_every = 0\n[proposer]\nkind = "agent"\n'
                       f'[proposer.agent]\ncommand = "{agent}"\n'), gate


def test_checks_while_an_agent_has_removed_the_ledger_say_one_line_not_a_traceback(
        harness: Harness, tmp_path: Path) -> None:
    """Between an agent's `git clean -fdx` and the engine writing the ledger back, a heartbeat check
    on a scheduler thread that had not opened the ledger yet failed to open it: a traceback in the
    daemon's log at every beat. The beats begin only in that window here (a SIGHUP shortens them),
    so every thread that runs them opens the ledger there."""
    workspace, config, gate = cleaning_night(tmp_path)
    daemon = harness.start(real_engine=True, extra_config=config, check_interval=3600.0,
                           env={"NIGHTLAB_SANDBOX": "0"})  # unconfined: sandboxed, the agent cannot clean
    wait_until(lambda: not (workspace / ".nightlab" / "state.db").exists(), timeout=60, what="the agent to clean",
               abort=lambda: daemon.proc.poll() is not None and daemon.log())
    write_config(tmp_path / "daemon.toml", config)  # the beats as the tests have them
    daemon.proc.send_signal(signal.SIGHUP)
    waiting = "was removed (an agent's `git clean -x`, or `rm`) and is not back yet; the checks wait for the engine"
    wait_until(lambda: waiting in daemon.log() or "Traceback" in daemon.log(), timeout=60,
               what="a check in the cleaned workspace")
    gate.touch()  # the agent ends: the engine writes the ledger back and stops for the user
    assert daemon.proc.wait(timeout=60) == 2, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log and log.count(waiting) == 1, log
    assert "nightlab stopped: the proposer removed the night's ledger" in log
