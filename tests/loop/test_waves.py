"""N local slots: synchronous best-of-wave waves with the stub trainer.

Slots are "GPUs" 5, 6, 7 (this machine needs none: the executor only pins CUDA_VISIBLE_DEVICES),
so every run shows which slot it had."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from nightlab.loop.executors import RunHandle
from nightlab.loop.proposers.base import Proposal, ProposalContext
from nightlab.loop.state import ledger, views
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.steering import send_command
from nightlab.loop.state.store import Store

from tests.fakes.engine_thread import EngineThread
from tests.fakes.loop_workspace import Gates, StubData, git_out, make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.loop.test_engine import assert_consistent
from tests.waiting import wait_until

HERE = Path(__file__).resolve().parent


class WaveProposer(ScriptedProposer):
    """The scripted proposer, told what is in flight: member k of a wave takes the k-th next step
    (as the search proposer asks for N distinct trials)."""

    def propose(self, ctx: ProposalContext) -> Proposal:
        self.contexts.append(ctx)
        done = sum(1 for h in ctx.history if not h.description.startswith(("baseline", "confirm")))
        index = done + len(ctx.in_flight)
        proposal = ScriptedProposer([self.steps[min(index, len(self.steps) - 1)]]).propose(ctx)
        return Proposal(proposal.description.replace("step 0", f"step {index}"), proposal.hypothesis,
                        proposal.area, proposal.params)


def _settings(tmp_path: Path, slots: int = 3) -> Any:
    return make_stub_workspace(tmp_path, executor={"gpus": [5, 6, 7][:slots]})


def test_a_wave_runs_in_parallel_snapshots_and_keeps_only_its_winner(tmp_path: Path, gates: Gates) -> None:
    gates.open(1)
    settings = _settings(tmp_path)
    repo = settings.workspace_path
    steps = [{"set": {"VAL_BPB": [v]}} for v in (0.95, 0.9, 0.97, 0.85, 1.2, 0.99)]
    proposer = WaveProposer(steps)
    engine = EngineThread(settings, proposer, limit=7)
    store = engine.store
    for wave in ((2, 3, 4), (5, 6, 7)):  # each run of a wave ends only once all of them run
        engine.wait_for(lambda: {ledger.get_candidate(store, r.candidate_id).number
                                 for r in ledger.running_runs(store)} == set(wave), f"{wave} running at once")
        gates.open(*wave)
    assert engine.join() == 0
    rows = ledger.experiments(store)
    assert [(e.number, e.status, e.metric) for e in rows] == [
        (1, "keep", 1.0),  # one baseline (loop.baseline_runs = 1)
        (2, "discard", 0.95), (3, "keep", 0.9), (4, "discard", 0.97),  # wave 1: #3 wins
        (5, "keep", 0.85), (6, "discard", 1.2), (7, "discard", 0.99),  # wave 2 from #3: #5 wins
    ]
    assert rows[1].reason == "beaten in its wave by #3 (0.900000)"
    assert rows[5].reason.startswith("not better: worse by")
    assert [e.best for e in rows] == [1.0, 1.0, 0.9, 0.9, 0.85, 0.85, 0.85]
    # each member ran on its own slot, pinned, at the same time as the others
    assert sorted(e.slot for e in rows[1:4]) == ["gpu5", "gpu6", "gpu7"]
    for e in rows[1:]:
        log = (repo / ".nightlab" / "runs" / f"{e.number}.log").read_text()
        assert f"cuda='{e.slot[3:]}'" in log
    assert max(e.started_at for e in rows[1:4]) < min(e.finished_at for e in rows[1:4])  # type: ignore[type-var]
    # git: linear history baseline -> #3 -> #5; every candidate reachable; no worktree left behind
    assert git_out(repo, "rev-list", "--first-parent", "HEAD").splitlines()[:3] == [
        rows[4].commit, rows[2].commit, rows[0].commit]
    assert git_out(repo, "rev-list", "--merges", "HEAD") == ""
    for e in rows[1:]:
        assert git_out(repo, "rev-parse", f"refs/nightlab/exp/{e.number}") == e.commit
    assert ledger.get_candidate(store, 6).base_commit == rows[2].commit  # wave 2 branched from the winner
    assert git_out(repo, "worktree", "list").count("\n") == 0
    # members of a wave are proposed knowing what is already in flight
    assert [len(c.in_flight) for c in proposer.contexts] == [0, 1, 2, 0, 1, 2]
    assert_consistent(settings)


def test_a_member_the_data_failed_is_re_made_on_the_best_its_wave_kept(
    tmp_path: Path, gates: Gates, stub_data: StubData
) -> None:
    """A shard damaged while a wave ran: the member that met it was its change's crash, never run
    again. Its wave kept another member, so its change is re-made there (a rebase) and runs once
    the data is fixed and the loop resumed."""
    settings = _settings(tmp_path, slots=2)
    steps = [{"set": {"GAIN": 0.1}}, {"set": {"VAL_BPB": [0.95]}}]
    engine = EngineThread(settings, WaveProposer(steps), limit=4)
    store = engine.store
    gates.open(1)
    engine.wait_for(lambda: len(ledger.running_runs(store)) == 2, "#2 and #3 running")
    gates.open(2)
    engine.wait_for(lambda: ledger.run_for_candidate(store, 2).state == "exited", "#2 ended")  # type: ignore[union-attr]
    stub_data.damage()
    gates.open(3)
    engine.wait_for(lambda: ledger.paused(store), "the loop to pause itself")
    engine.ticks()  # paused: the re-made change waits for /resume
    rows = ledger.experiments(store)
    assert [(e.number, e.status) for e in rows] == [(1, "keep"), (2, "keep"), (3, "crash")]
    assert rows[2].reason.startswith("data problem: ")
    rebase = ledger.open_candidates(store)
    assert [(c.number, c.kind, c.confirm_of, c.base_commit, c.phase) for c in rebase] == [
        (4, "rebase", 3, rows[1].commit, "proposing")]
    stub_data.repair()
    send_command(settings.workspace_path, "resume", "cli:test")
    gates.open(4)
    assert engine.join() == 0
    last = ledger.experiments(store)[3]
    assert (last.kind, last.status, last.metric) == ("rebase", "keep", 0.85)  # both changes: 0.95 - 0.1
    assert last.description == f"rebase of #3: {rows[2].description}"
    assert_consistent(settings)


def test_kill_one_experiment_of_a_wave_and_pause_now_cancels_the_wave(tmp_path: Path, gates: Gates) -> None:
    gates.open(1)
    settings = _settings(tmp_path, slots=2)
    repo = settings.workspace_path
    # #3 ends once its gate opens, after the checks that need it running (it had 2 s of sleep)
    steps = [{"set": {"VAL_BPB": [0.9], "MODE": "hang"}}, {"set": {"VAL_BPB": [0.8]}},
             {"set": {"MODE": "hang"}}, {"set": {"MODE": "hang", "VAL_BPB": [0.7]}}]
    engine = EngineThread(settings, WaveProposer(steps))
    store = engine.store
    engine.wait_for(lambda: len(ledger.running_runs(store)) == 2, "wave 1: #2 and #3 running")
    status = views.status_text(repo).splitlines()
    assert status[1] == "now: 2 runs in flight on 2 slots"
    assert status[2].startswith("  gpu5: #2 proposal running ") and status[3].startswith("  gpu6: #3 proposal running ")
    assert views.status_line(repo).startswith("2 runs in flight (#2, #3)")
    with pytest.raises(UserError, match=r"2 experiments are running \(#2, #3\); say which: kill N"):
        send_command(repo, "kill", "cli:test")
    assert "killing #2" in send_command(repo, "kill 2", "cli:test")
    gates.open(3)
    engine.wait_for(lambda: ledger.experiment_count(store) == 3, "#2 and #3 recorded")
    rows = ledger.experiments(store)
    assert [(e.number, e.status) for e in rows] == [(1, "keep"), (2, "discard"), (3, "keep")]
    assert rows[1].reason == "killed by cli:test"
    engine.wait_for(lambda: len(ledger.running_runs(store)) == 2, "wave 2: #4 and #5 running")  # both hang
    send_command(repo, "pause now", "cli:test")
    engine.wait_for(lambda: ledger.experiment_count(store) == 5, "#4 and #5 cancelled")
    assert [e.status for e in ledger.experiments(store)][3:] == ["discard", "discard"]
    engine.ticks()  # paused: no new wave starts
    assert ledger.open_candidates(store) == [] and ledger.paused(store) is not None
    engine.join(stop=True)
    assert_consistent(settings)


def test_kill_9_mid_wave_reattaches_every_run_and_records_each_once(tmp_path: Path, gates: Gates) -> None:
    settings = _settings(tmp_path)
    repo = settings.workspace_path
    steps = [{"set": {"VAL_BPB": [v]}} for v in (0.95, 0.9, 0.97)]
    script = tmp_path / "steps.json"
    script.write_text(json.dumps(steps))
    cmd = [sys.executable, str(HERE / "wave_main.py"), str(repo), str(script), "4", "3"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    gates.open(1)
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    store = Store.for_workspace(repo)
    runs = wait_until(lambda: len(r := ledger.running_runs(store)) == 3 and r, "three runs in flight")
    first.send_signal(signal.SIGKILL)
    first.wait()
    pids = [RunHandle.from_json(r.handle).pid for r in runs]
    assert all(psutil.pid_exists(p) for p in pids)  # the runs outlive the engine
    gates.open(2, 3, 4)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = ledger.experiments(store)
    assert [(e.number, e.status, e.metric) for e in rows] == [
        (1, "keep", 1.0), (2, "discard", 0.95), (3, "keep", 0.9), (4, "discard", 0.97)]
    all_runs = store.connection().execute("SELECT candidate_id, handle FROM runs ORDER BY id").fetchall()
    assert len(all_runs) == 4  # no run launched twice
    assert {RunHandle.from_json(r["handle"]).pid for r in all_runs} >= set(pids)  # re-attached
    started = [e.payload["number"] for e in store.events_after(0, 10_000) if e.kind == "experiment_started"]
    assert sorted(started) == [1, 2, 3, 4]
    assert_consistent(settings)
