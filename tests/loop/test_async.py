"""The asynchronous mode (`loop.mode = "async"`): a freed slot starts the next candidate at once,
each result is decided as it ends, and a promising result from an older base is re-made on the
current best and re-run before it can be kept."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nightlab.loop.executors import RunHandle
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger
from nightlab.loop.state.config import Settings
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.ledger import started_at
from nightlab.loop.state.store import Store
from nightlab.trainer.profiles import apply_constants

from tests.fakes.engine_thread import EngineThread
from tests.fakes.loop_workspace import Gates, git_out, make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.loop.test_engine import assert_consistent
from tests.loop.test_waves import WaveProposer
from tests.waiting import wait_until

HERE = Path(__file__).resolve().parent


def _workspace(tmp_path: Path, baseline_runs: int = 1, **start: object) -> Settings:
    """Two slots; `start`: train.py's constants in the starting commit. Runs end when the test
    opens their gates (the `gates` fixture)."""
    loop = {"mode": "async", "baseline_runs": baseline_runs}
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1]}, loop=loop)
    if start:
        train = settings.workspace_path / "train.py"
        train.write_text(apply_constants(train.read_text(), start))
        git_out(settings.workspace_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "the start")
    return settings


# The session's story; the gates (tests/fakes/loop_workspace.Gates) end the runs in its order.
STEPS = [
    {"set": {"VAL_BPB": [0.9]}},  # #2: kept while #3 still runs
    {"set": {"GAIN": 0.15}},  # #3: better than its base, but the best moved on
    {"set": {"VAL_BPB": [0.95]}},  # #4: from #2's commit, the moment #2's slot freed
]


def _running(store: Store) -> set[int]:
    """The experiments whose runs are in flight and have started (their start file is written)."""
    return {ledger.get_candidate(store, r.candidate_id).number for r in ledger.running_runs(store)
            if started_at(r.log_path) is not None}


def _first_two_end(gates: Gates, store: Store, alive: Callable[[], str | None]) -> None:
    """#1 ends; #2 ends while #3 runs, and #4 takes #2's slot."""
    gates.open(1)
    wait_until(lambda: _running(store) == {2, 3}, "#2 and #3 running", 30, abort=alive)
    gates.open(2)
    wait_until(lambda: ledger.experiment_count(store) == 2 and _running(store) == {3, 4},
               "#2 recorded and #3, #4 running", 30, abort=alive)


def _after_the_kill(gates: Gates, store: Store, alive: Callable[[], str | None]) -> None:
    """#3 ends (stale: its rebase #5 takes its slot while #4 runs); #5 ends; #4 ends last."""
    gates.open(3)
    wait_until(lambda: _running(store) == {4, 5}, "#4 and the rebase #5 running", 30, abort=alive)
    gates.open(5)
    wait_until(lambda: ledger.experiment_count(store) == 4, "#5 recorded", 30, abort=alive)
    gates.open(4)


def test_a_freed_slot_starts_the_next_candidate_and_a_stale_winner_is_rebased_and_rerun(
        tmp_path: Path, gates: Gates) -> None:
    settings = _workspace(tmp_path)
    engine = EngineThread(settings, WaveProposer(STEPS), limit=5)
    _first_two_end(gates, engine.store, engine.ended)
    _after_the_kill(gates, engine.store, engine.ended)
    assert engine.join() == 0
    assert_consistent(settings, in_order=False)
    _assert_the_session(settings.workspace_path, ledger.experiments(engine.store))


def test_kill_9_of_the_engine_in_async_mode_reattaches_and_decides_the_same(tmp_path: Path, gates: Gates) -> None:
    settings = _workspace(tmp_path)
    repo = settings.workspace_path
    script = tmp_path / "steps.json"
    script.write_text(json.dumps(STEPS))
    cmd = [sys.executable, str(HERE / "wave_main.py"), str(repo), str(script), "5", "2", "async"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    store = Store.for_workspace(repo)
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    _first_two_end(gates, store, lambda: None if first.poll() is None else f"the engine exited ({first.returncode})")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _after_the_kill(gates, store, lambda: None if second.poll() is None else f"the engine exited ({second.returncode})")
        _, err = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert second.returncode == 0, err
    assert_consistent(settings, in_order=False)
    _assert_the_session(repo, ledger.experiments(store))
    assert store.connection().execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 5  # none launched twice


def _assert_the_session(repo: Path, rows: list[ledger.Experiment]) -> None:
    assert [(e.number, e.kind, e.status, e.metric) for e in rows] == [
        (1, "baseline", "keep", 1.0),
        (2, "proposal", "keep", 0.9),
        (3, "proposal", "discard", 0.85),
        (4, "proposal", "discard", 0.95),
        (5, "rebase", "keep", 0.75),  # #3's change on top of #2's: both gains
    ]
    c1, c2, c5 = rows[0].commit, rows[1].commit, rows[4].commit
    assert rows[2].reason == (f"rebased: better than its base {c1[:7]} by 0.150000, but the best moved on to"
                              f" {c2[:7]} while it ran: re-made there and re-run")
    assert rows[4].confirm_of == 3 and rows[4].description.startswith("rebase of #3: ")
    assert rows[4].reason.startswith("better by 0.1500 ± ")
    assert rows[3].reason.startswith("not better: worse by 0.0500 ± ") and rows[3].best == 0.75  # judged on its own base
    # no slot waited for the others: #4 started when #2 ended, #5 when #3 ended, #4 still running
    assert rows[3].started_at < rows[2].finished_at and rows[4].started_at < rows[3].finished_at  # type: ignore[operator]
    assert {rows[3].slot, rows[4].slot} == {"gpu0", "gpu1"}
    # linear history: baseline -> #2 -> #5 (#3's change re-made on #2)
    assert git_out(repo, "rev-list", "--first-parent", "HEAD").splitlines()[:3] == [c5, c2, c1]
    assert git_out(repo, "rev-list", "--merges", "HEAD") == ""
    assert "GAIN = 0.15" in git_out(repo, "show", "HEAD:train.py") and "VAL_BPB = [0.9]" in git_out(repo, "show", "HEAD:train.py")


def test_a_stale_result_whose_change_conflicts_with_the_new_best_is_not_re_run(tmp_path: Path, gates: Gates) -> None:
    steps = [
        {"set": {"VAL_BPB": [0.9]}},
        {"set": {"VAL_BPB": [0.8]}},  # the same line as #2's change
        {"set": {"VAL_BPB": [0.95]}},
    ]
    settings = _workspace(tmp_path)
    engine = EngineThread(settings, WaveProposer(steps), limit=5)
    _first_two_end(gates, engine.store, engine.ended)
    gates.open(3)  # better than its base, but the best moved on: its re-make conflicts
    engine.wait_for(lambda: any(e.kind == "rebase" for e in ledger.experiments(engine.store)), "the rebase decided")
    gates.open(*range(4, 6))
    assert engine.join() == 0
    assert_consistent(settings, in_order=False)
    rows = ledger.experiments(engine.store)
    rebase = next(e for e in rows if e.kind == "rebase")
    assert rows[2].reason.startswith("rebased: better than its base")
    assert rebase.status == "discard" and rebase.metric is None and rebase.confirm_of == 3
    assert rebase.reason == f"could not re-make #3 on {rows[1].commit[:7]}: its change conflicts with the best's in train.py"


def test_a_confirm_run_overtaken_by_a_new_best_is_rebased_too(
        tmp_path: Path, gates: Gates, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTLAB_STUB_COUNTS", str(tmp_path))  # the n-th run of a content, in any snapshot
    # two baselines 1.0 and 1.02 (noise ~0.015, so a gain under ~0.03 needs a confirm run)
    settings = _workspace(tmp_path, VAL_BPB=[1.0, 1.02], baseline_runs=2)
    steps = [
        {"set": {"VAL_BPB": [1.0, 0.99]}},  # #3: gain 0.01 -> confirm #5 (0.99; mean 0.995)
        {"set": {"GAIN": 0.1}},  # #4: kept while #5 runs
        {"set": {"VAL_BPB": [1.5]}},
    ]
    engine = EngineThread(settings, WaveProposer(steps), limit=7)
    store = engine.store
    gates.open(1, 2)
    engine.wait_for(lambda: _running(store) == {3, 4}, "#3 and #4 running")
    gates.open(3)
    engine.wait_for(lambda: _running(store) == {4, 5}, "#4 and the confirm run #5 running")
    gates.open(4)
    engine.wait_for(lambda: ledger.experiment_count(store) == 4, "#4 recorded")
    gates.open(*range(5, 8))
    assert engine.join() == 0
    rows = ledger.experiments(store)
    # the two baselines start together: which one prints 1.0 is a race
    assert sorted(e.metric for e in rows[:2]) == [1.0, 1.02]  # type: ignore[type-var]
    assert [(e.kind, e.status, e.metric) for e in rows[:5]] == [
        ("baseline", "keep", rows[0].metric), ("baseline", "keep", rows[1].metric), ("proposal", "discard", 1.0),
        ("proposal", "keep", 0.9), ("confirm", "discard", 0.99)]
    assert rows[2].reason.startswith("re-running to decide: better by 0.0100 ± ")
    assert rows[4].confirm_of == 3 and rows[4].reason.startswith("rebased: better than its base")
    rebase = next(e for e in rows if e.kind == "rebase")
    assert rebase.confirm_of == 5 and rebase.commit != rows[2].commit  # #3's change re-made on #4


def _cleaned_mid_run(settings: Settings, steps: list[dict[str, Any]], gates: Gates,
                     before: Callable[[Store], None] = lambda _: None) -> tuple[str, Store]:
    """A night whose second proposal (#3) runs `git clean -fdx` in the workspace while #2 is in
    flight (`before(store)` first, while #3's proposal waits); what the stopped engine said, and the
    ledger it wrote back."""
    first = EngineThread(settings, WaveProposer(steps))
    gates.open(1)
    wait_until(lambda: [c.number for c, _ in ledger.in_flight(first.store)] == [2], "#2 running", abort=first.ended)
    before(first.store)
    first.thread.join(60)
    [error] = first.result
    assert isinstance(error, UserError), error
    return str(error), Store.for_workspace(settings.workspace_path)  # the file written back


def test_a_run_training_while_an_agent_cleans_the_workspace_is_recorded_as_it_ran(tmp_path: Path, gates: Gates) -> None:
    """An agent's `git clean -fdx` took .nightlab while #2 trained: its log and exit file went with
    it, and the run, which trained fine, was recorded as vanished without an exit status (a crash)."""
    settings = _workspace(tmp_path)
    said, store = _cleaned_mid_run(settings, [{"set": {"VAL_BPB": [0.9]}}, {"clean": True}], gates)
    assert "Still training: #2, whose logs are written back when they end." in said
    [(_, run)] = ledger.in_flight(store)
    handle = RunHandle.from_json(run.handle)
    gates.open(2)
    wait_until(lambda: LocalExecutor().poll([handle])[handle.key].state != "running", "#2's run to end")
    second = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [0.95]}}]), limit=3)
    gates.open(3)
    second.thread.join(60)
    assert second.result == [0]
    two = ledger.experiments(store)[1]
    assert (two.number, two.status, two.metric) == (2, "keep", 0.9), two.reason
    assert "val_bpb:" in Path(run.log_path).read_text()


def test_a_run_that_ended_before_an_agent_cleaned_the_workspace_runs_again_and_is_no_crash(
        tmp_path: Path, gates: Gates) -> None:
    """#2 ended while #3's agent worked, and the agent's `git clean -fdx` took its log and exit
    file before the engine read them: the result cannot be known, and it was blamed on #2's change
    as a crash. Now it says so and the change runs again."""
    settings = _workspace(tmp_path)
    go = tmp_path / "go"

    def end_two(store: Store) -> None:
        gates.open(2)
        [(_, run)] = ledger.in_flight(store)
        wait_until(lambda: Path(f"{run.log_path}.exit").exists(), "#2's run to end")
        go.touch()

    steps = [{"set": {"VAL_BPB": [0.9]}}, {"wait": str(go), "clean": True}]
    said, store = _cleaned_mid_run(settings, steps, gates, end_two)
    assert "Lost with the cleaning: the results of #2, run again at the next start (no crash)." in said
    second = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [1.5]}}]), limit=4)  # #3: no new best
    gates.open(3, 4)
    second.thread.join(60)
    assert second.result == [0]
    _, two, _, four = ledger.experiments(store)
    assert (two.status, two.metric) == ("discard", None)
    assert two.reason.startswith("result lost: the run had ended when its log and exit status were removed with")
    assert (four.kind, four.confirm_of, four.status, four.metric) == ("confirm", 2, "keep", 0.9)


def test_a_run_whose_folder_an_agent_removed_is_stopped_and_runs_again(tmp_path: Path, gates: Gates) -> None:
    """`rm -rf .nightlab` took the folder #2 ran in (its worktree, which `git clean` leaves): its
    harness files gone, it could only fail, and the failure would be blamed on its change."""
    settings = _workspace(tmp_path)
    said, store = _cleaned_mid_run(settings, [{"set": {"VAL_BPB": [0.9]}}, {"remove": ".nightlab"}], gates)
    assert "Lost with the cleaning: the results of #2, run again at the next start (no crash)." in said
    assert ledger.in_flight(store) == []  # stopped, not left to fail
    second = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [1.5]}}]), limit=4)
    gates.open(2, 3, 4)
    second.thread.join(60)
    assert second.result == [0]
    _, two, _, four = ledger.experiments(store)
    assert (two.status, two.metric) == ("discard", None)
    assert two.reason.startswith("result lost: its folder ") and "was removed while it ran, so it was stopped" in two.reason
    assert (four.kind, four.confirm_of, four.status, four.metric) == ("confirm", 2, "keep", 0.9)


def test_a_result_ending_while_the_best_is_re_measured_on_its_own_setting_is_decided_at_once(
        tmp_path: Path, gates: Gates) -> None:
    """A re-measurement of the best (drift, or a new best's repeats) held every result of a change
    from that best that ended meanwhile, and its slot idle, until the re-measurement ended, though
    the best's own measurement on that setting was there to compare it with. Only a setting with
    nothing measured yet (new data) makes a result wait for its base's measurement."""
    settings = _workspace(tmp_path)
    settings = dataclasses.replace(settings, loop=dataclasses.replace(settings.loop, remeasure_every=1))
    engine = EngineThread(settings, WaveProposer([{"set": {"VAL_BPB": [1.5]}}]), limit=4)
    store = engine.store
    gates.open(1)
    engine.wait_for(lambda: _running(store) == {2, 3}, "#2 and #3 running")
    gates.open(2)  # recorded: the best is re-measured (remeasure_every = 1) in #2's slot
    engine.wait_for(lambda: _running(store) == {3, 4}, "#3 and the re-measurement #4 running")
    gates.open(3)
    engine.wait_for(lambda: ledger.experiment_count(store) == 3, "#3 decided while #4 runs")
    assert _running(store) == {4}
    gates.open(4)
    assert engine.join() == 0
    assert [(e.number, e.kind, e.status) for e in ledger.experiments(store)] == [
        (1, "baseline", "keep"), (2, "proposal", "discard"), (3, "proposal", "discard"), (4, "baseline", "keep")]


def test_a_result_from_another_class_than_the_new_best_s_is_rebased_not_kept_over_it(
        tmp_path: Path, gates: Gates, fake_gpus: Any) -> None:
    """Two classes (an H100 and an A100): #3 was kept while #4 ran on the other class. That class
    had not measured #3's commit yet, so its reference was still the commit #4 branched from, and
    #4 was kept too: the branch went to #4's commit and #3's kept change was gone from it (found on
    a 4-GPU night: `nightlab history` said keep for both, `git log` had only the second)."""
    fake_gpus(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
    settings = _workspace(tmp_path)
    steps = [{"set": {"VAL_BPB": [0.9]}}, {"set": {"GAIN": 0.15}}, {"set": {"VAL_BPB": [1.5]}}]
    engine = EngineThread(settings, WaveProposer(steps), limit=7)
    store = engine.store
    gates.open(1, 2)  # the starting commit measured on each class
    engine.wait_for(lambda: _running(store) == {3, 4}, "#3 and #4 running")
    gates.open(3)
    engine.wait_for(lambda: ledger.experiment_count(store) == 3, "#3 recorded")
    gates.open(4)
    engine.wait_for(lambda: ledger.experiment_count(store) == 4, "#4 recorded")
    gates.open(*range(5, 8))
    assert engine.join() == 0
    assert_consistent(settings, in_order=False)
    rows = ledger.experiments(store)
    three, four = rows[2], rows[3]
    assert (three.status, four.status, four.hardware != three.hardware) == ("keep", "discard", True)
    assert four.reason.startswith(f"rebased: better than its base {rows[0].commit[:7]} by 0.150000, but the best"
                                  f" moved on to {three.commit[:7]}")
    repo = settings.workspace_path
    assert three.commit in git_out(repo, "rev-list", "HEAD").splitlines()  # a keep stays on the branch


def test_a_result_is_not_held_back_by_its_base_s_measurement_on_another_class(
        tmp_path: Path, gates: Gates, fake_gpus: Any) -> None:
    """A result waits for its base's re-measurement only on its own class: on a box of two GPU
    models, the A100's re-measurement of a new best held back every H100 result from that best
    for a whole run, and its slot with it (51 of 78 waiting slot-seconds on a 4-GPU night)."""
    fake_gpus(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
    settings = _workspace(tmp_path)
    steps = [{"set": {"VAL_BPB": [0.9]}}, {"set": {"GAIN": 0.15}}, {"set": {"VAL_BPB": [1.5]}}]
    engine = EngineThread(settings, WaveProposer(steps), limit=8)
    store = engine.store
    gates.open(1, 2)
    engine.wait_for(lambda: _running(store) == {3, 4}, "#3 and #4 running")
    gates.open(3)  # kept: the A100 measures #3's commit next, once #4 frees it
    engine.wait_for(lambda: ledger.experiment_count(store) == 3, "#3 recorded")
    gates.open(4)  # its change re-made on #3's, on the H100
    engine.wait_for(lambda: _running(store) == {5, 6}, "#5 and #6 running")
    # which of the two is numbered first depends on which slot the engine fills first
    kinds = {ledger.get_candidate(store, r.candidate_id).kind: ledger.get_candidate(store, r.candidate_id).number
             for r in ledger.running_runs(store)}
    assert set(kinds) == {"baseline", "rebase"}
    gates.open(kinds["rebase"])
    engine.wait_for(lambda: kinds["rebase"] in {e.number for e in ledger.experiments(store)},
                    "the rebase recorded while the baseline runs")
    assert kinds["baseline"] in _running(store)
    gates.open(*range(5, 9))
    assert engine.join() == 0
    assert_consistent(settings, in_order=False)
    by_number = {e.number: e for e in ledger.experiments(store)}
    assert by_number[kinds["baseline"]].hardware != by_number[kinds["rebase"]].hardware


def test_a_stale_result_whose_change_the_best_holds_already_says_so(tmp_path: Path, gates: Gates) -> None:
    """#3 made the change #2 was kept with: its re-make on #2's commit changed nothing, and the
    rebase was recorded as "the proposal changed nothing", as if a proposer had failed to edit."""
    settings = _workspace(tmp_path)
    steps = [{"set": {"VAL_BPB": [0.9]}}, {"set": {"VAL_BPB": [0.9]}}, {"set": {"VAL_BPB": [0.95]}}]
    engine = EngineThread(settings, WaveProposer(steps), limit=5)
    _first_two_end(gates, engine.store, engine.ended)
    gates.open(3)
    engine.wait_for(lambda: any(e.kind == "rebase" for e in ledger.experiments(engine.store)), "the rebase decided")
    gates.open(*range(4, 6))
    assert engine.join() == 0
    rebase = next(e for e in ledger.experiments(engine.store) if e.kind == "rebase")
    assert (rebase.status, rebase.metric, rebase.confirm_of) == ("discard", None, 3)
    assert rebase.reason == "#3's change is in the best already: nothing to run"
