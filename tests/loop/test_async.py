"""The asynchronous mode (`loop.mode = "async"`): a freed slot starts the next candidate at once,
each result is decided as it ends, and a promising result from an older base is re-made on the
current best and re-run before it can be kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nightlab.loop.engine import run_engine
from nightlab.loop.state import ledger
from nightlab.loop.state.config import Settings
from nightlab.loop.state.store import Store
from nightlab.trainer.profiles import apply_constants

from tests.fakes.loop_workspace import git_out, make_stub_workspace
from tests.loop.test_engine import assert_consistent
from tests.loop.test_waves import WaveProposer

HERE = Path(__file__).resolve().parent


def _workspace(tmp_path: Path, **start: object) -> Settings:
    """Two slots; every run of the session's train.py takes at least 1 s (SLEEP = 1.0 in the
    starting commit), so a proposal's change need not touch SLEEP to overlap with the next one."""
    loop = {"mode": "async", "baseline_runs": start.pop("baseline_runs", 1)}
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1]}, loop=loop)
    train = settings.workspace_path / "train.py"
    train.write_text(apply_constants(train.read_text(), {"SLEEP": 1.0, **start}))
    git_out(settings.workspace_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "runs take 1 s")
    return settings


def _run(tmp_path: Path, steps: list[dict], count: int) -> tuple[Path, list[ledger.Experiment]]:
    settings = _workspace(tmp_path)
    assert run_engine(settings, count, proposer=WaveProposer(steps)) == 0
    assert_consistent(settings, in_order=False)
    return settings.workspace_path, ledger.experiments(Store.for_workspace(settings.workspace_path))


STEPS = [
    {"set": {"VAL_BPB": [0.9]}},  # #2: kept while #3 still runs
    {"set": {"SLEEP": 3.0, "GAIN": 0.15}},  # #3: better than its base, but the best moved on
    {"set": {"VAL_BPB": [0.95], "SLEEP": 8.0}},  # #4: from #2's commit, the moment #2's slot freed
]


def test_a_freed_slot_starts_the_next_candidate_and_a_stale_winner_is_rebased_and_rerun(tmp_path: Path) -> None:
    repo, rows = _run(tmp_path, STEPS, 5)
    _assert_the_session(repo, rows)


def test_kill_9_of_the_engine_in_async_mode_reattaches_and_decides_the_same(tmp_path: Path) -> None:
    settings = _workspace(tmp_path)
    repo = settings.workspace_path
    script = tmp_path / "steps.json"
    script.write_text(json.dumps(STEPS))
    cmd = [sys.executable, str(HERE / "wave_main.py"), str(repo), str(script), "5", "2", "async"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    store = Store.for_workspace(repo)
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30  # kill it once #2 is recorded and #3, #4 run
    while not (ledger.experiment_count(store) == 2 and len(ledger.running_runs(store)) == 2):
        assert time.monotonic() < deadline, "the session did not get to #3 and #4 running"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
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


def test_a_stale_result_whose_change_conflicts_with_the_new_best_is_not_re_run(tmp_path: Path) -> None:
    steps = [
        {"set": {"VAL_BPB": [0.9]}},
        {"set": {"VAL_BPB": [0.8], "SLEEP": 3.0}},  # the same line as #2's change
        {"set": {"VAL_BPB": [0.95], "SLEEP": 6.0}},
    ]
    _, rows = _run(tmp_path, steps, 5)
    rebase = next(e for e in rows if e.kind == "rebase")
    assert rows[2].reason.startswith("rebased: better than its base")
    assert rebase.status == "discard" and rebase.metric is None and rebase.confirm_of == 3
    assert rebase.reason == f"could not re-make #3 on {rows[1].commit[:7]}: its change conflicts with the best's in train.py"


def test_a_confirm_run_overtaken_by_a_new_best_is_rebased_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NIGHTLAB_STUB_COUNTS", str(tmp_path))  # the n-th run of a content, in any snapshot
    # two baselines 1.0 and 1.02 (noise ~0.015, so a gain under ~0.03 needs a confirm run); runs take 2 s
    settings = _workspace(tmp_path, SLEEP=2.0, VAL_BPB=[1.0, 1.02], baseline_runs=2)
    steps = [
        {"set": {"VAL_BPB": [1.0, 0.99]}},  # #3: gain 0.01 -> confirm #5 (0.99; mean 0.995)
        {"set": {"GAIN": 0.1, "SLEEP": 3.0}},  # #4: kept while #5 runs
        {"set": {"VAL_BPB": [1.5]}},
    ]
    assert run_engine(settings, 7, proposer=WaveProposer(steps)) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    # the two baselines start together: which one prints 1.0 is a race
    assert sorted(e.metric for e in rows[:2]) == [1.0, 1.02]  # type: ignore[type-var]
    assert [(e.kind, e.status, e.metric) for e in rows[:5]] == [
        ("baseline", "keep", rows[0].metric), ("baseline", "keep", rows[1].metric), ("proposal", "discard", 1.0),
        ("proposal", "keep", 0.9), ("confirm", "discard", 0.99)]
    assert rows[2].reason.startswith("re-running to decide: better by 0.0100 ± ")
    assert rows[4].confirm_of == 3 and rows[4].reason.startswith("rebased: better than its base")
    rebase = next(e for e in rows if e.kind == "rebase")
    assert rebase.confirm_of == 5 and rebase.commit != rows[2].commit  # #3's change re-made on #4
