"""The built-in harness of a workspace made by an older nightlab, brought up to the installed one
(loop/engine/upgrading.py): at engine start, once, said in the log and in chat; never over an edit;
never under a run in flight; a harness that measures differently is a new setting.

The workspaces are the built-in trainer's (its prepare.py and harness.py copied in by init), with
the stub trainer as train.py and as the run: what is tested is the harness copy, not a training."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from nightlab.bot.digest import describe
from nightlab.loop.engine import Engine
from nightlab.loop.engine.launching import launch
from nightlab.loop.engine.planning import new_wave
from nightlab.loop.engine.startup import startup
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.hardware import setting_of
from nightlab.loop.state import ledger
from nightlab.loop.state.config import DigestSettings, Settings, settings_from_table
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import Event, Store
from nightlab.loop.workspace import PROTECTED_KEY, init_workspace, open_workspace, sha256_file

from tests.fakes.loop_workspace import STUB, Gates, git_out
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.waiting import wait_until

INSTALLED = Path(__import__("nightlab.trainer", fromlist=["__path__"]).__path__[0])
# a line per run: the prepare.py it scored with (read after training ends)
RUN = f"{sys.executable} train.py && sha256sum prepare.py >> .stub/scored-with"  # .nightlab is read-only to a run


def _settings(path: Path, **loop: str) -> Settings:
    return settings_from_table({
        "workspace": {"path": str(path), "tag": "test"},
        "trainer": {"profile": "tiny"},
        "loop": {"checkpoint_interval": 0.1, "baseline_runs": 1, "remeasure_every": 0, **loop},
    }, source="<test>")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def _put(repo: Path, name: str, text: bytes) -> None:
    (repo / name).chmod(0o644)
    (repo / name).write_bytes(text)


@pytest.fixture(autouse=True)
def _two_gpus(fake_gpus: Any) -> None:
    """Slots the same on every machine: each test's executor takes GPU 0, or 0 and 1."""
    fake_gpus(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])


def _old_workspace(tmp_path: Path, declared: bool = False, **loop: str) -> Settings:
    """A workspace as an older nightlab left it: its prepare.py with a message worded otherwise, from
    before SCORE_VERSION was declared (`declared`: from after, measuring the same), recorded by that
    nightlab as the copy it wrote."""
    repo = tmp_path / "ws"
    settings = _settings(repo, **loop)
    init_workspace(repo, "test", settings, say=lambda _: None)
    old = (INSTALLED / "prepare.py").read_bytes().replace(b"FAIL: data: ", b"data problem: ")
    if not declared:
        old = old.replace(b"\nSCORE_VERSION = 1\n", b"\n")
    _put(repo, "prepare.py", old)
    shutil.copyfile(STUB, repo / "train.py")  # the stub trains: only the harness copy matters here
    _git(repo, "commit", "-qam", "an older nightlab's harness, and the stub trainer")
    store = Store.for_workspace(repo)
    store.set(PROTECTED_KEY, {**store.get(PROTECTED_KEY), "prepare.py": sha256_file(repo / "prepare.py")})
    return settings


def _engine(settings: Settings, stop: threading.Event | None = None, slots: int = 1, run: str = RUN) -> Engine:
    """The engine on the workspace, its runs the stub trainer's (one slot: in place, as on one GPU)."""
    ws = dataclasses.replace(open_workspace(settings.workspace_path, settings), run_command=run)
    executor = LocalExecutor(gpus=tuple(range(slots)))
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [1.5]}}])  # worse: discarded, the best stays
    return Engine(settings, ws, executor, proposer, {}, stop or threading.Event())


def _events(store: Store) -> list[Event]:
    return [e for e in store.events_after(0) if e.kind == "harness_upgraded"]


def _installed(repo: Path, name: str) -> bool:
    return (repo / name).read_bytes() == (INSTALLED / name).read_bytes()


def test_an_unedited_older_harness_is_brought_up_to_date_at_engine_start_once(tmp_path: Path) -> None:
    settings = _old_workspace(tmp_path)
    repo = settings.workspace_path
    old_head = git_out(repo, "rev-parse", "HEAD")
    engine = _engine(settings)
    startup(engine.ctx)
    assert _installed(repo, "prepare.py") and _installed(repo, "harness.py")
    assert not (repo / "prepare.py").stat().st_mode & stat.S_IWUSR  # protected again
    assert git_out(repo, "status", "--porcelain") == ""
    assert git_out(repo, "rev-parse", "HEAD~1") == old_head  # one commit on the session branch, the old copy in git
    assert git_out(repo, "log", "-1", "--format=%s") == \
        "nightlab: the harness brought up to the installed nightlab's (prepare.py)"
    assert engine.store.get(PROTECTED_KEY)["prepare.py"] == sha256_file(INSTALLED / "prepare.py")
    [event] = _events(engine.store)
    assert event.payload["files"] == ["prepare.py"] and event.payload["commit"] == git_out(repo, "rev-parse", "--short=7", "HEAD")
    [message] = describe(event, DigestSettings())  # what the chats get
    assert "🔧 the harness (prepare.py) is now the installed nightlab's, commit" in str(message)
    # a new engine (a restart) finds nothing to do: said once
    startup(_engine(settings).ctx)
    assert len(_events(engine.store)) == 1


@pytest.mark.parametrize("declared", [False, True], ids=["measures-differently", "messages-only"])
def test_a_run_in_flight_scores_with_its_copy_and_the_upgrade_comes_after_it(
    tmp_path: Path, gates: Gates, declared: bool
) -> None:
    settings = _old_workspace(tmp_path, declared)
    repo = settings.workspace_path
    old_sha = sha256_file(repo / "prepare.py")
    # the older nightlab's engine launched #1 and was stopped for the upgrade; its run goes on
    before = _engine(settings)
    new_wave(before.ctx)
    [first] = ledger.open_candidates(before.store)
    launch(before.ctx, first)
    stop = threading.Event()
    engine = _engine(settings, stop)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(engine.run(2)), daemon=True)
    thread.start()
    try:
        # past startup, where an upgrade at start happens: it waits, the run's copy untouched
        wait_until(lambda: engine.store.get("engine.pid"), "the engine's startup")
        assert _events(engine.store) == [] and sha256_file(repo / "prepare.py") == old_sha
        gates.open(1)
        [event] = wait_until(lambda: _events(engine.store), "the upgrade after #1")
        gates.open(2)
        thread.join(30)
    finally:
        stop.set()
        gates.open(1, 2)
        thread.join(30)
    assert result == [0]
    one, two = ledger.experiments(engine.store)
    assert one.status == "keep" and one.setting == setting_of(RUN, {}, "1" if declared else "")
    scored = [line.split()[0] for line in (repo / ".stub" / "scored-with").read_text().splitlines()]
    assert scored == [old_sha, sha256_file(INSTALLED / "prepare.py")]
    assert _installed(repo, "prepare.py") and event.payload["setting_changed"] is not declared
    # the best measured again at the upgrade's commit before anything is compared with it ...
    assert two.kind == "baseline" and two.commit == git_out(repo, "rev-parse", "HEAD") != one.commit
    assert two.setting == setting_of(RUN, {}, "1")
    if declared:  # ... in the same setting: the harness measures what it measured
        assert two.setting == one.setting and "what it measures is unchanged (score version 1)" in event.payload["text"]
    else:  # ... as a new setting: nothing compared with #1
        assert "score version not declared -> 1), so runs from here on are a new setting" in event.payload["text"]


def test_an_edited_harness_is_never_overwritten_and_the_message_says_what_to_do(tmp_path: Path) -> None:
    settings = _old_workspace(tmp_path)
    repo = settings.workspace_path
    edited = (repo / "prepare.py").read_bytes() + b"\nEVAL_TOKENS = 1024  # the owner's\n"
    _put(repo, "prepare.py", edited)
    _git(repo, "commit", "-qam", "the owner's own eval size")
    with pytest.raises(UserError) as err:
        startup(_engine(settings).ctx)
    assert (repo / "prepare.py").read_bytes() == edited and _events(Store.for_workspace(repo)) == []
    copy = f"cp -f {INSTALLED / 'prepare.py'} {repo}/"
    assert str(err.value) == (
        "protected files differ from the copies nightlab recorded: prepare.py; no experiment runs with them and"
        " nightlab does not overwrite them (nor bring them up to a newer nightlab's). To go on: put the recorded ones back"
        f" (`git -C {repo} log -p -- prepare.py` shows the edit; `git -C {repo} checkout <commit> -- prepare.py`"
        f" and commit), or take this nightlab's harness: `{copy}` (the next start commits and records it), or init"
        " a new workspace")
    # doing what it says: the next start commits the installed copy and records it
    subprocess.run(copy, shell=True, check=True)
    engine = _engine(settings)
    startup(engine.ctx)
    assert _installed(repo, "prepare.py") and git_out(repo, "status", "--porcelain") == ""
    assert engine.store.get(PROTECTED_KEY)["prepare.py"] == sha256_file(INSTALLED / "prepare.py")
    assert [e.payload["files"] for e in _events(engine.store)] == [["prepare.py"]]


def test_in_async_mode_no_new_candidate_starts_until_the_upgrade_is_done(tmp_path: Path, gates: Gates) -> None:
    """A freed slot would start the next candidate at once: while an upgrade waits for the runs in
    flight, none starts, or the workspace might never be without one."""
    settings = _old_workspace(tmp_path, mode="async")
    store = Store.for_workspace(settings.workspace_path)
    # the older nightlab's engine (no upgrade: it had none) measures the baseline and starts #2, #3
    older = _engine(settings, threading.Event(), slots=2)
    older.ctx.upgrade_waiting = False
    thread = threading.Thread(target=lambda: older.run(None), daemon=True)
    thread.start()
    try:
        gates.open(1)
        wait_until(lambda: len(ledger.running_runs(store)) == 2, "#2 and #3 running")
    finally:
        older.stop.set()
        thread.join(30)
    engine = _engine(settings, threading.Event(), slots=2)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(engine.run(4)), daemon=True)
    thread.start()
    try:
        gates.open(2)
        wait_until(lambda: len((settings.workspace_path / "results.tsv").read_text().splitlines()) == 3,
                   "#2 recorded and exported")
        for _ in range(2):  # past the step after the export, where a freed slot gets a candidate
            tick = store.get("engine.tick")
            wait_until(lambda: store.get("engine.tick") > tick, "the engine's next checkpoint")
        assert [c.number for c in ledger.open_candidates(store)] == [3] and _events(store) == []
        gates.open(3)
        [event] = wait_until(lambda: _events(store), "the upgrade after #3")
        gates.open(4)
        thread.join(30)
    finally:
        engine.stop.set()
        gates.open(2, 3, 4)
        thread.join(30)
    assert result == [0]
    four = ledger.experiments(store)[-1]
    assert four.kind == "baseline" and four.commit == git_out(settings.workspace_path, "rev-parse", "HEAD")
    assert event.payload["commit"] == four.commit[:7] and four.setting != ledger.experiments(store)[0].setting


def test_a_last_experiment_without_a_run_does_not_make_an_upgrade_of_messages_a_new_setting(tmp_path: Path) -> None:
    """What the upgrade compares with is the last experiment that ran: one that failed before its run
    has no setting, and read as 'score version not declared' it made an upgrade of messages say the
    setting changed."""
    settings = _old_workspace(tmp_path, declared=True)
    older = _engine(settings)
    older.ctx.upgrade_waiting = False  # the older nightlab had no upgrade to make
    older.ctx.proposer = ScriptedProposer([{"raise": "the agent found nothing to try"}])
    assert older.run(2) == 0
    assert [e.setting == "" for e in ledger.experiments(older.store)] == [False, True]
    engine = _engine(settings)
    startup(engine.ctx)
    [event] = _events(engine.store)
    assert not event.payload["setting_changed"] and "what it measures is unchanged (score version 1)" in event.payload["text"]


def test_a_new_setting_said_at_the_start_is_not_said_again_by_an_upgrade_that_waited_for_a_run(
    tmp_path: Path, gates: Gates
) -> None:
    """A start that changes the setting (here the run command: a new virtualenv's interpreter) says so
    at once; the upgrade that waited for the run in flight then says the harness only, not the same
    change a second time in chat."""
    settings = _old_workspace(tmp_path, declared=True)
    # the older nightlab measured the baseline, launched #2 and was stopped for the upgrade
    older = _engine(settings, threading.Event())
    older.ctx.upgrade_waiting = False
    thread = threading.Thread(target=lambda: older.run(None), daemon=True)
    thread.start()
    try:
        gates.open(1)
        wait_until(lambda: ledger.running_numbers(older.store) == [2], "#2 running")
    finally:
        older.stop.set()
        thread.join(30)
    engine = _engine(settings, threading.Event(), run=f"{RUN} && true")
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(engine.run(3)), daemon=True)
    thread.start()
    try:
        wait_until(lambda: engine.store.get("engine.pid"), "the engine's startup")
        gates.open(2)
        [event] = wait_until(lambda: _events(engine.store), "the upgrade after #2")
        gates.open(3)
        thread.join(30)
    finally:
        engine.stop.set()
        gates.open(2, 3)
        thread.join(30)
    assert result == [0]
    said = [e.payload["text"] for e in engine.store.events_after(0) if e.kind in ("alert", "harness_upgraded")]
    assert sum("the run command `" in text for text in said) == 1, said
    assert event.payload["setting_changed"]
    assert event.payload["text"].endswith("; what it measures is otherwise unchanged (score version 1): the new setting"
                                          " said above measures the best again at that commit")
    one, _, three = ledger.experiments(engine.store)
    assert three.kind == "baseline" and three.setting != one.setting
