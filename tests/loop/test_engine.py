"""Whole sessions with the stub trainer and the scripted proposer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.executors import RunHandle
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.executors.runfiles import read_exit_code
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import Settings
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.lock import EngineLock, LockHeld
from nightlab.loop.state.steering import send_command
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import init_workspace

from tests.fakes.engine_thread import EngineThread
from tests.fakes.loop_workspace import HARNESS, STUB, Gates, StubData, git_out, make_stub_workspace, stub_settings
from tests.fakes.scripted_proposer import ScriptedProposer
from tests.fakes.tagged import tagged
from tests.waiting import wait_until

FAKES = Path(__file__).resolve().parents[1] / "fakes"


def _statuses(store: Store) -> list[str]:
    return [e.status for e in ledger.experiments(store)]


def assert_consistent(settings: Settings, in_order: bool = True) -> None:
    """Ledger, exports and git agree; nothing recorded twice, nothing left in flight.
    `in_order`: recorded in number order (the asynchronous mode records as runs end)."""
    repo = settings.workspace_path
    store = Store.for_workspace(repo)
    rows = ledger.experiments(store)
    assert [e.number for e in rows] == list(range(1, len(rows) + 1))
    assert ledger.running_runs(store) == []
    finished = [e for e in store.events_after(0, limit=10_000) if e.kind == "experiment_finished"]
    numbers = [e.payload["number"] for e in finished]
    assert (numbers if in_order else sorted(numbers)) == [e.number for e in rows]
    tsv = (repo / "results.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[3] for line in tsv] == [ledger.tsv_status(e) for e in rows]
    jsonl = [json.loads(x) for x in (repo / "autoresearch.jsonl").read_text().splitlines()[1:]]
    assert [(j["run"], j["asi"]["status"], j["metric"]) for j in jsonl] == [(e.number, e.status, e.metric or 0) for e in rows]
    keeps = [e for e in rows if e.status == "keep"]
    assert git_out(repo, "rev-parse", "HEAD") == keeps[-1].commit
    assert git_out(repo, "status", "--porcelain") == ""
    for e in rows:
        if e.kind == "proposal" and e.commit != ledger.get_candidate(store, e.number).base_commit:
            assert git_out(repo, "rev-parse", f"refs/nightlab/exp/{e.number}") == e.commit


def test_a_session_keeps_discards_crashes_rejects(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([
        {"set": {"VAL_BPB": [0.9]}},
        {"set": {"VAL_BPB": [0.95]}},
        {"set": {"MODE": "crash"}},
        {"write": {"prepare.py": "harness edited"}},
        {"noop": True},
        {"raise": "the agent timed out"},
        {"set": {"VAL_BPB": [0.8]}},
    ])
    assert run_engine(settings, 8, proposer=proposer) == 0
    store = Store.for_workspace(settings.workspace_path)
    rows = ledger.experiments(store)
    assert _statuses(store) == ["keep", "keep", "discard", "crash", "crash", "discard", "crash", "keep"]
    assert [e.kind for e in rows][:2] == ["baseline", "proposal"]
    assert rows[3].reason == "exit code 3"
    assert rows[4].reason.startswith("rejected: changed the protected prepare.py")
    assert rows[5].reason == "the proposal changed nothing" and rows[6].reason == "proposer failed: the agent timed out"
    assert rows[7].best == 0.8 and rows[7].lines_added == 1 and rows[7].lines_removed == 1
    assert (settings.workspace_path / "prepare.py").read_text().startswith("# the fixed harness")
    assert [c.consecutive_failures for c in proposer.contexts] == [0, 0, 1, 2, 3, 4, 5]
    # the proposer sees each decision's words and the night's noise (an agent aims above it)
    last = proposer.contexts[-1]
    assert [h.reason for h in last.history][3] == "exit code 3"
    assert last.noise is not None and last.noise.sd > 0 and last.keep_z == settings.loop.keep_z
    assert store.get("engine.finished") is True
    started = [e.payload for e in store.events_after(0) if e.kind == "experiment_started"]
    assert [p["number"] for p in started] == [1, 2, 3, 4, 8] and started[0]["kind"] == "baseline"
    finished = [e.payload for e in store.events_after(0) if e.kind == "experiment_finished"]
    assert finished[1]["new_best"] and finished[1]["delta"] == pytest.approx(-0.1)
    assert not finished[2]["new_best"] and finished[2]["delta"] == pytest.approx(0.05)  # 0.95 vs 0.9
    assert finished[3]["log_tail"].endswith("RuntimeError: boom") and finished[2]["log_tail"] == ""
    assert finished[7]["peak_vram_mb"] == 1024.0 and finished[7]["slot"] == "cpu0"
    assert_consistent(settings)
    assert "best val_bpb: 0.800000 (#8" in views.status_text(settings.workspace_path)
    assert views.status_line(settings.workspace_path) == "idle · best 0.800000"
    report = views.report_markdown(settings.workspace_path)
    assert "| 2 |" in report and "#4 crash: step 2: MODE=crash — exit code 3" in report
    # one sign convention: the summary's gain and the table's are both positive (issue 14, item 13)
    assert "- gain: +0.200000 ± 0.003394 (+20.00%, n = 1 vs 1; ± from loop.noise_prior: no run repeated yet to measure the noise; not confirmed yet" in report and "| 0.100000 |" in report


def test_the_engines_own_figures_a_run_names_itself_are_not_recorded(tmp_path: Path) -> None:
    """`heldout_gain` is the second opinion's (a keep is SUSPECT when it vanishes): a run whose log
    named one (a line train.py wrote into the log file itself, past the harness's prefix) had it
    recorded as its own, shown in the report's table and /best for a keep that got no second opinion.
    The overtime (a keep SUSPECT of training past the budget) is the engine's likewise."""
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.5], "MODE": "engine"}}])) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert rows[1].status == "keep" and rows[1].metric == 0.5, rows[1]
    assert "heldout_gain" not in rows[1].metrics and "overtime_seconds" not in rows[1].metrics, rows[1]
    assert "SUSPECT" not in views.history_text(settings.workspace_path)


def test_a_keep_that_trained_past_the_budget_is_suspect(tmp_path: Path) -> None:
    """The budget is counted by train.py's own loop, so an edit could train longer and win by it;
    the harness times the training command from outside (`training_command_seconds`), and a keep
    whose run took longer than the replaced commit's slowest by more than max(10 %, 30 s) is marked
    SUSPECT where people look. Within the allowance (start-up differs by change) it is not."""
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([
        {"set": {"VAL_BPB": [0.9], "WALL": [100.0]}},  # the baseline has no figure: nothing to compare with
        {"set": {"VAL_BPB": [0.8], "WALL": [125.0]}},  # 25 s longer: within 30 s
        {"set": {"VAL_BPB": [0.7], "WALL": [170.0]}},  # 45 s longer
    ])
    assert run_engine(settings, 4, proposer=proposer) == 0
    ws = settings.workspace_path
    store = Store.for_workspace(ws)
    rows = ledger.experiments(store)
    assert [e.status for e in rows] == ["keep"] * 4
    assert "SUSPECT" not in rows[1].reason + rows[2].reason and "overtime_seconds" not in rows[2].metrics
    assert rows[3].metrics["overtime_seconds"] == 45.0 and rows[3].metrics["training_command_seconds"] == 170.0
    assert rows[3].reason.endswith("; SUSPECT: its training command ran 45 s longer than the best's slowest run"
                                   " (170 s vs 125 s, start-up included): training past the budget?"), rows[3].reason
    finished = [e.payload for e in store.events_after(0) if e.kind == "experiment_finished"]
    assert "SUSPECT: its training command ran 45 s longer" in finished[3]["reason"]  # the digest's reason line
    history = views.history_text(ws).splitlines()
    assert history[3].endswith("(SUSPECT: it trained 45 s longer than the commit it replaced (past the budget?))"), history
    assert "SUSPECT" not in "\n".join(history[:3])
    assert "\nSUSPECT: it trained 45 s longer than the commit it replaced (past the budget?)" in views.best_text(ws)
    row4 = next(line for line in views.report_markdown(ws).splitlines() if line.startswith("| 4 |"))
    assert row4.endswith(" (SUSPECT: it trained 45 s longer than the commit it replaced (past the budget?)) |"), row4


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        ({"MODE": "nan"}, "val_bpb is nan"),
        ({"MODE": "oom"}, "OOM (exit code 1): torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ({"MODE": "nosummary"}, "no val_bpb in the log; the run must print a line `---`, then `val_bpb: <value>`, or a line `METRIC val_bpb=<value>`"),
    ],
)
def test_runs_without_a_usable_metric_are_crashes(tmp_path: Path, step: dict[str, Any], reason: str) -> None:
    settings = make_stub_workspace(tmp_path)
    run_engine(settings, 2, proposer=ScriptedProposer([{"set": step}]))
    exp = ledger.experiments(Store.for_workspace(settings.workspace_path))[-1]
    assert (exp.status, exp.reason, exp.metric) == ("crash", reason, None)
    assert_consistent(settings)


def test_undecided_gains_are_re_run_until_the_rule_decides(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path, loop={"baseline_runs": 3, "keep_z": 2.0, "max_runs": 3})
    (settings.workspace_path / "train.py").chmod(0o644)
    proposer = ScriptedProposer([
        {"set": {"VAL_BPB": [0.99, 0.985]}},  # within noise, holds up when re-run -> kept on its 3rd run
        {"set": {"VAL_BPB": [0.984, 1.5]}},  # within the noise, a fluke -> discarded on its re-run
        {"set": {"VAL_BPB": [0.5]}},  # far beyond noise -> kept at once
    ])
    # three baselines of the same file: the stub prints 1.0, 1.01, 0.99
    train = settings.workspace_path / "train.py"
    train.write_text(train.read_text().replace("VAL_BPB = [1.0]", "VAL_BPB = [1.0, 1.01, 0.99]"))
    git_out(settings.workspace_path, "commit", "-qam", "noisy baseline")
    run_engine(settings, 12, proposer=proposer)
    store = Store.for_workspace(settings.workspace_path)
    rows = ledger.experiments(store)
    assert [(e.kind, e.status) for e in rows] == [
        ("baseline", "keep"), ("baseline", "keep"), ("baseline", "keep"),
        ("proposal", "discard"), ("confirm", "discard"), ("confirm", "keep"),
        ("baseline", "keep"), ("baseline", "keep"), ("baseline", "keep"),  # the new best, measured afresh
        ("proposal", "discard"), ("confirm", "discard"),
        ("proposal", "keep"),
    ]
    assert rows[2].best == pytest.approx(1.0)  # the mean of the baselines
    assert rows[3].reason.startswith("re-running to decide: better by 0.0100 ± ")
    assert [r.confirm_of for r in rows[4:6]] == [4, 4] and rows[5].commit == rows[3].commit
    assert rows[5].best == pytest.approx((0.99 + 0.985 + 0.985) / 3)  # the mean of its three runs
    assert rows[5].reason.startswith("better by 0.0133 ± ") and rows[5].reason.endswith("(n = 3 vs 3)")
    assert [r.description for r in rows[6:9]] == [f"re-measure the best on {rows[0].hardware}"] * 3
    assert rows[8].best == pytest.approx((0.99 + 0.985 * 5) / 6) and rows[8].commit == rows[5].commit
    # its reason says what it was: it read "baseline: mean of 6 runs", as if the baseline had run again
    assert rows[8].reason.startswith(f"re-measured the best: mean of 6 runs {rows[8].best:.6f}; run-to-run noise")
    assert rows[2].reason.startswith("baseline: mean of 3 runs 1.000000; run-to-run noise")
    assert rows[10].reason.startswith("not better: worse by") and rows[10].best == rows[8].best
    assert rows[11].confidence is not None and rows[11].confidence > 2
    assert [c.consecutive_failures for c in proposer.contexts] == [0, 0, 1]  # a re-run result is no failure
    finished = [e.payload for e in store.events_after(0, 1000) if e.kind == "experiment_finished"]
    assert [p["number"] for p in finished if p["rerun"]] == [4, 5, 10]  # the digest: undecided, runs again
    assert_consistent(settings)


def test_failing_checks_reset_the_commit(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path, project={"checks_command": "echo lint error; exit 4"})
    run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.5]}}]))
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert rows[0].status == "checks_failed" and rows[0].kind == "baseline"  # the baseline is checked too
    assert rows[1].status == "checks_failed" and rows[1].reason == "checks failed (exit 4): lint error"
    assert git_out(settings.workspace_path, "rev-parse", "HEAD") == rows[0].commit


def test_checks_that_fail_without_a_word_say_so(tmp_path: Path) -> None:
    """The reason ended in an empty "checks failed (exit 1): "."""
    settings = make_stub_workspace(tmp_path, project={"checks_command": "exit 4"})
    run_engine(settings, 1, proposer=ScriptedProposer([]))
    first = ledger.experiments(Store.for_workspace(settings.workspace_path))[0]
    assert first.reason == "checks failed (exit 4, no output)"


def test_a_baseline_that_fails_its_checks_twice_pauses_the_loop_as_a_crashing_one_does(tmp_path: Path) -> None:
    """Checks that fail on the commit the night starts from: the baseline ran again and again, to
    pause_after_failures (15), where a crashing one pauses at its second."""
    settings = make_stub_workspace(tmp_path, project={"checks_command": "echo lint error; exit 4"},
                                   loop={"checkpoint_interval": 0.05})
    engine = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}]), limit=6)
    engine.wait_for(lambda: ledger.paused(engine.store), "the loop to pause itself")
    engine.ticks()  # paused: the baseline is not run again
    assert [(e.kind, e.status) for e in ledger.experiments(engine.store)] == [("baseline", "checks_failed")] * 2
    reason = ledger.paused(engine.store).reason
    assert reason.startswith("#2: the baseline failed its checks again (checks failed (exit 4): lint error):"), reason
    # not "2 (2 baseline)": the baseline measured nothing
    assert "experiments: 2 (2 baseline (2 checks_failed))" in views.status_text(settings.workspace_path)
    engine.join(stop=True)


def test_the_loop_pauses_itself_after_repeated_failures(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path, loop={"pause_after_failures": 3, "checkpoint_interval": 0.05})
    proposer = ScriptedProposer([{"set": {"MODE": "crash"}}])
    engine = EngineThread(settings, proposer)
    engine.wait_for(lambda: ledger.paused(engine.store), "the loop to pause itself")
    engine.ticks()  # paused: no new experiment starts
    assert _statuses(engine.store) == ["keep", "crash", "crash", "crash"]
    self_paused = next(e.payload for e in engine.store.events_after(0) if e.kind == "self_paused")
    assert self_paused["reason"].startswith("3 failed experiments in a row")
    assert "paused by nightlab" in views.status_text(settings.workspace_path)
    send_command(settings.workspace_path, "resume", "cli:test")  # the count starts again after a resume
    engine.wait_for(lambda: len(_statuses(engine.store)) == 7, "seven experiments")
    engine.join(stop=True)
    assert [c.consecutive_failures for c in proposer.contexts[:6]] == [0, 1, 2, 0, 1, 2]


def test_a_data_problem_pauses_the_loop_at_its_first_crash(tmp_path: Path) -> None:
    """A shard that went bad fails every run alike: the loop went on for pause_after_failures (15)
    proposals, each recorded as a crash of its own change."""
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    engine = EngineThread(settings, ScriptedProposer([{"set": {"MODE": "datafail"}}]))
    engine.wait_for(lambda: ledger.paused(engine.store), "the loop to pause itself")
    engine.ticks()  # paused: no new experiment starts
    assert _statuses(engine.store) == ["keep", "crash"]
    reason = "data problem: /data/shard_00003.parquet is damaged (ZSTD decompression failed); replace it"
    assert ledger.experiments(engine.store)[1].reason == reason
    self_paused = [e.payload for e in engine.store.events_after(0) if e.kind == "self_paused"]
    assert self_paused == [{"reason": f"#2: {reason}; /resume once it is fixed, and #2 runs again"}]
    engine.join(stop=True)


def test_a_change_of_the_scorers_python_pauses_the_loop_until_a_person_has_looked(tmp_path: Path) -> None:
    """A file that appeared in site-packages since the change began (a package a person installed, or
    a .pth file the run or the agent wrote, which runs in every scorer after) is said by the harness,
    which scores nothing: the loop pauses for a person, and the change runs again after /resume; a
    re-run that changes it again is its crash. Each run is held to its own change's start."""
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    ws = settings.workspace_path
    started = time.time()
    engine = EngineThread(settings, ScriptedProposer([{"set": {"MODE": "python"}}]), limit=3)
    engine.wait_for(lambda: ledger.paused(engine.store), "the loop to pause itself")
    engine.ticks()  # paused: the re-run waits for /resume
    said = "(/venv/site-packages/zz.pth): remove what you did not install"
    second = ledger.experiments(engine.store)[1]
    assert re.fullmatch(rf"python changed: the Python environment the scorer runs in changed since [0-9.]+ {re.escape(said)}",
                        second.reason) and second.status == "crash"
    self_paused = [e.payload["reason"] for e in engine.store.events_after(0) if e.kind == "self_paused"]
    assert self_paused == [f"#2: {second.reason}; /resume once you have checked them, and #2 runs again"]
    send_command(ws, "resume", "cli:test")
    engine.wait_for(lambda: len(ledger.experiments(engine.store)) == 3, "#2's re-run")
    third = ledger.experiments(engine.store)[2]
    assert (third.kind, third.confirm_of, third.status) == ("confirm", 2, "crash")
    assert third.reason.startswith("python changed again: ") and third.reason.endswith(
        "its run before changed it too, so it counts as this change's crash (the change is what writes there)")
    since = [float(re.search(r"since ([0-9.]+) ", e.reason).group(1)) for e in (second, third)]  # type: ignore[union-attr]
    assert started - 1 < since[0] < since[1] < time.time()  # the re-run's own start, made after #2 ended
    assert "experiments: 3 (1 baseline, 1 crash, 1 python changed)" in views.status_text(ws)
    engine.join(stop=True)


def test_a_baseline_that_crashes_twice_pauses_the_loop_and_runs_again_once_fixed(tmp_path: Path) -> None:
    """The user's committed train.py crashed as the baseline, and the loop ran the same crash
    pause_after_failures (15) times, then paused saying "resume when you have looked (focus,
    note)": on a GPU, 15 runs of a crash late in training. Every experiment branches from that
    commit, so its second crash pauses, saying what to fix (the first may be the box's, another
    process holding the GPU's memory, and a pause would idle the night); the fix is measured."""
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    ws = settings.workspace_path
    train = ws / "train.py"
    train.chmod(0o644)
    train.write_text(train.read_text().replace('MODE = "ok"', 'MODE = "crash"'))
    git_out(ws, "commit", "-qam", "my edit, which crashes")
    broken = git_out(ws, "rev-parse", "HEAD")
    engine = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}]), limit=4)
    engine.wait_for(lambda: ledger.paused(engine.store), "the loop to pause itself")
    engine.ticks()  # paused: the crash is not run again
    assert [(e.kind, e.status, e.reason) for e in ledger.experiments(engine.store)] == [
        ("baseline", "crash", "exit code 3")] * 2
    self_paused = [e.payload["reason"] for e in engine.store.events_after(0) if e.kind == "self_paused"]
    assert self_paused == [f"#2: the baseline crashed again (exit code 3): {broken[:7]}, the commit the night starts"
                           f" from, does not run, and every experiment branches from it; fix it, commit the fix in"
                           f" {ws} and /resume (the fix is measured as the baseline)"]
    # `/status` says it last, out of parentheses: in them it ended "(the fix is measured as the baseline)) 3 s ago"
    assert re.search(r"^paused by nightlab .* ago: #2: the baseline crashed again .* as the baseline\)$",
                     views.status_text(ws), re.M)
    train.write_text(train.read_text().replace('MODE = "crash"', 'MODE = "ok"'))
    git_out(ws, "commit", "-qam", "fixed")
    send_command(ws, "resume", "cli:test")
    assert engine.join() == 0
    rows = ledger.experiments(engine.store)
    assert [(e.kind, e.status) for e in rows] == [("baseline", "crash")] * 2 + [("baseline", "keep"), ("proposal", "keep")]
    assert rows[2].commit == git_out(ws, "rev-parse", "HEAD~1") != broken


def _night_the_data_fails_at_2(settings: Settings, proposer: ScriptedProposer, gates: Gates,
                               stub_data: StubData) -> EngineThread:
    """A night of 4 whose data is damaged while #2 runs: returned paused by the engine."""
    engine = EngineThread(settings, proposer, limit=4)
    gates.open(1)
    engine.running(2)
    stub_data.damage()
    gates.open(2, 3)
    engine.wait_for(lambda: ledger.paused(engine.store), "the loop to pause itself")
    return engine


def test_a_change_the_data_failed_is_not_blamed_and_runs_again_once_the_data_is_fixed(
    tmp_path: Path, gates: Gates, stub_data: StubData
) -> None:
    """A shard damaged mid-night: the run that met it was recorded as its change's crash (the
    digest, the counts, the report's "What did not work", the proposer's history and last crash
    log) and the change was never run again. Now it is undecided: after /resume the same commit
    runs again, judged as usual once the data is fixed."""
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    ws = settings.workspace_path
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])
    engine = _night_the_data_fails_at_2(settings, proposer, gates, stub_data)
    engine.ticks()  # paused: the change's re-run waits for /resume
    rows = ledger.experiments(engine.store)
    reason = f"data problem: {stub_data.shard} is damaged (ZSTD decompression failed); replace it"
    assert [(e.kind, e.status, e.reason) for e in rows[1:]] == [("proposal", "crash", reason)]
    again = ledger.open_candidates(engine.store)
    assert [(c.number, c.kind, c.commit, c.phase) for c in again] == [(3, "confirm", rows[1].commit, "committed")]
    assert ledger.running_runs(engine.store) == []
    finished = [e.payload for e in engine.store.events_after(0) if e.kind == "experiment_finished"]
    assert finished[-1]["rerun"]  # the digest: the data failed it, it runs again
    status = views.status_text(ws)
    assert re.search(f"paused by nightlab .* ago: #2: {re.escape(reason)}; /resume once it is fixed, and #2 runs again$", status, re.M)
    assert "experiments: 2 (1 baseline, 1 bad data)" in status and "  #2 undecided " in status
    assert views.report_markdown(ws).endswith("## What did not work\n\n- nothing failed")
    assert len(proposer.contexts) == 1  # no proposal spent on bad data
    stub_data.repair()
    send_command(ws, "resume", "cli:test")
    gates.open(3, 4)
    assert engine.join() == 0
    rows = ledger.experiments(engine.store)
    assert [(e.number, e.kind) for e in rows[2:]] == [(3, "confirm"), (4, "proposal")]
    assert rows[2].commit == rows[1].commit and rows[2].confirm_of == 2
    assert (rows[2].status, rows[2].reason) == ("keep", "better by 0.1000 ± 0.0042 (n = 1 vs 1)")  # as a first run
    # the next proposal (#4) learns nothing from the run the data failed
    learned = proposer.contexts[1]
    assert [e.number for e in learned.history] == [1, 3] and learned.last_crash_log == ""
    assert learned.consecutive_failures == 0
    # (#4: the script's one step again, which changes nothing on the best now: a discard)
    assert "experiments: 4 (1 baseline, 1 keep, 1 discard, 1 bad data)" in views.status_text(ws)
    assert views.history_text(ws, status="crash") == "no crash experiments yet"
    assert_consistent(settings)


def _scored_project(tmp_path: Path) -> Settings:
    """The stub workspace whose runs take the harness's two steps (`prepare.run`): the training command,
    the check that the protected prepare.py is as it was, then the score command (the stub's summary)."""
    python = shlex.quote(sys.executable)
    return make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05}, project={
        "run_command": f'{python} train.py | tee "$NIGHTLAB_ARTIFACT_DIR/out"',
        "score_command": 'cat "$NIGHTLAB_ARTIFACT_DIR/out"'})


HARNESS_CHANGED = ("prepare.py changed while the run trained in the workspace: a person's edit, or the run's own"
                   " write (nothing tells which as it happens); put back as recorded (an edit of yours is kept in"
                   " `git stash list`)")


def test_a_persons_edit_of_the_harness_while_a_run_trains_is_not_the_changes_crash(tmp_path: Path, gates: Gates) -> None:
    """One slot runs in the workspace: a person's edit of prepare.py while #2 trained was recorded as
    #2's crash, the harness saying "the training command changed the code that scores it". Nothing
    tells a person's edit from the run's own write as it happens, so it is said as either; the harness
    is put back and the change runs again at once (no pause: a train.py writing it stalls no night)."""
    settings = _scored_project(tmp_path)
    ws = settings.workspace_path
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])
    engine = EngineThread(settings, proposer, limit=3)
    gates.open(1)
    log = Path(engine.running(2).log_path)
    engine.wait_for(lambda: "step 00001" in log.read_text(), "#2 to train")
    harness = ws / "prepare.py"
    harness.chmod(0o644)
    harness.write_text("# my edit\n")
    gates.open(2, 3)
    assert engine.join() == 0
    assert ledger.paused(engine.store) is None
    second = ledger.experiments(engine.store)[1]
    assert (second.status, second.reason) == ("crash", f"harness changed: {HARNESS_CHANGED}")
    assert harness.read_text() == HARNESS and "+# my edit" in git_out(ws, "stash", "show", "-p")
    alerts = [e.payload["text"] for e in engine.store.events_after(0) if e.kind == "alert"]
    # not "to have them tried: … stash pop, commit them": a committed edit of the harness stops the next start
    assert alerts == [f"edits nightlab did not make were in prepare.py at #2: the loop owns the workspace's files while"
                      f" it runs, so they were not run; kept in `git -C {ws} stash list`. prepare.py: the protected"
                      f" harness, which no run uses edited; keep it as recorded (`git -C {ws} checkout -- prepare.py`"
                      " after a stash pop; `nightlab doctor` says more)"]
    status = views.status_text(ws)
    assert "experiments: 3 (1 baseline, 1 keep, 1 harness edited)" in status and "  #2 undecided " in status
    third = ledger.experiments(engine.store)[2]
    assert (third.kind, third.confirm_of, third.commit, third.status) == ("confirm", 2, second.commit, "keep")
    assert len(proposer.contexts) == 1  # no proposal spent on it
    assert_consistent(settings)


def test_a_change_that_writes_the_harness_is_its_crash_at_its_re_run(tmp_path: Path, gates: Gates,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side: a train.py that writes prepare.py reads as a person's edit the first time (the
    same words); its re-run writes it again, and that is the change's crash. The night never pauses.
    Unconfined (NIGHTLAB_SANDBOX=0): in the run's sandbox its write fails as it is made (below)."""
    monkeypatch.setenv("NIGHTLAB_SANDBOX", "0")
    settings = _scored_project(tmp_path)
    ws = settings.workspace_path
    engine = EngineThread(settings, ScriptedProposer([{"set": {"MODE": "harness"}}]), limit=3)
    gates.open(1, 2, 3)
    assert engine.join() == 0
    assert not [e for e in engine.store.events_after(0) if e.kind == "self_paused"]
    third = ledger.experiments(engine.store)[2]
    assert (third.kind, third.confirm_of, third.status) == ("confirm", 2, "crash")
    assert third.reason == (f"harness changed again: {HARNESS_CHANGED}; its run before changed it too, so it counts"
                            " as this change's crash (a person's edit twice, each during one of its runs, is unlikely:"
                            " the change is what writes it)")
    assert "experiments: 3 (1 baseline, 1 crash, 1 harness edited)" in views.status_text(ws)
    assert (ws / "prepare.py").read_text() == HARNESS


def test_in_the_runs_sandbox_a_change_that_writes_the_harness_is_its_crash_at_once(tmp_path: Path, gates: Gates) -> None:
    """The harness starts the training command in a sandbox where the protected files are read-only
    (prepare.read_only_to): the write fails, so it is the change's crash at its first run, and no
    person's edit is put aside for it."""
    from nightlab.loop.executors.sandbox import probe

    if probe():
        pytest.skip(f"the kernel refuses the run sandbox here: {probe()}")
    settings = _scored_project(tmp_path)
    ws = settings.workspace_path
    engine = EngineThread(settings, ScriptedProposer([{"set": {"MODE": "harness"}}]), limit=2)
    gates.open(1, 2)
    assert engine.join() == 0
    second = ledger.experiments(engine.store)[1]
    assert (second.kind, second.status) == ("proposal", "crash")
    assert "OSError: [Errno 30] Read-only file system: 'prepare.py'" in (ws / ".nightlab" / "runs" / "2.log").read_text()
    assert (ws / "prepare.py").read_text() == HARNESS and not git_out(ws, "stash", "list")


def test_a_change_the_data_fails_again_on_its_re_run_is_its_crash_not_run_forever(
    tmp_path: Path, gates: Gates, stub_data: StubData
) -> None:
    """A change whose re-run the data fails too (resumed with the data still bad, or a change that
    breaks loading: an agent's train.py can print the harness's line) ran again at every /resume,
    pausing each time, with no way past it. Its second data failure is its crash; the loop pauses."""
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    ws = settings.workspace_path
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}, {"set": {"VAL_BPB": [0.8]}}])
    engine = _night_the_data_fails_at_2(settings, proposer, gates, stub_data)
    send_command(ws, "resume", "cli:test")  # the data is still bad
    engine.wait_for(lambda: len(_statuses(engine.store)) == 3 and ledger.paused(engine.store), "#3, paused again")
    engine.ticks()
    third = ledger.experiments(engine.store)[2]
    assert (third.kind, third.confirm_of, third.status) == ("confirm", 2, "crash")
    assert third.reason == (f"data problem again: {stub_data.shard} is damaged (ZSTD decompression failed); replace"
                            " it; its run before met it too, so it counts as this change's crash (if the data is"
                            " fine, the change is what fails it)")
    assert ledger.paused(engine.store) is not None and "runs again" not in views.status_text(ws)
    assert "experiments: 3 (1 baseline, 1 crash, 1 bad data)" in views.status_text(ws)
    stub_data.repair()
    send_command(ws, "resume", "cli:test")
    gates.open(4)
    assert engine.join() == 0
    fourth = ledger.experiments(engine.store)[3]
    assert (fourth.kind, fourth.confirm_of, fourth.status) == ("proposal", None, "keep")  # the night goes on
    assert_consistent(settings)


def test_steering_while_runs_are_in_flight(tmp_path: Path, gates: Gates) -> None:
    gates.open(1)
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    ws = settings.workspace_path
    proposer = ScriptedProposer([
        {"set": {"MODE": "hang"}},  # #2 killed by the user
        {"set": {"VAL_BPB": [0.9]}},  # #3 pause after it (it ends once the pause is sent: its gate)
        {"set": {"MODE": "spawn"}},  # #4 stopped by the heartbeat's timeout, child and all
        {"set": {"MODE": "hang"}, "area": "arch"},  # #5 pause now
        {"set": {"VAL_BPB": [0.8]}},  # #6 after resume
    ])
    engine = EngineThread(settings, proposer, limit=6)
    engine.running(2)
    assert send_command(ws, "focus lr", "telegram:7") == "focusing on lr from the next proposal"
    assert send_command(ws, "note try a smaller lr", "telegram:7") == "note queued: it goes into the next proposal"
    assert send_command(ws, "kill 2", "telegram:7") == "killing #2 within ~2 s; it will be recorded as discarded"
    engine.running(3)
    assert proposer.contexts[1].focus == "lr" and proposer.contexts[1].notes == ("try a smaller lr",)
    assert send_command(ws, "/pause", "slack:U1").startswith("pausing after #3 finishes")
    gates.open(3, 6)
    engine.wait_for(lambda: ledger.paused(engine.store) and len(_statuses(engine.store)) == 3, "the pause after #3")
    engine.ticks()  # paused: nothing more starts
    assert len(_statuses(engine.store)) == 3 and not ledger.open_candidates(engine.store)
    send_command(ws, "resume", "slack:U1")
    run = engine.running(4)
    tag = engine.wait_for(lambda: "child " in Path(run.log_path).read_text() and Path(run.log_path).read_text(),
                          "the child's tag in the log").split("child ")[1].split()[0]
    assert tagged(tag)
    assert ledger.mark_kill(engine.store, run.id, "timeout after 0m01s")  # what the heartbeat does
    LocalExecutor().cancel(RunHandle.from_json(run.handle), grace_s=2)
    engine.running(5)
    assert not tagged(tag)
    assert send_command(ws, "pause now", "cli:me") == "cancelling #5 and pausing within ~2 s"
    engine.wait_for(lambda: len(_statuses(engine.store)) == 5 and ledger.paused(engine.store), "#5 cancelled, paused")
    send_command(ws, "focus off", "cli:me")
    send_command(ws, "resume", "cli:me")
    assert engine.join() == 0
    rows = ledger.experiments(engine.store)
    assert [(e.status, e.reason) for e in rows[1:5]] == [
        ("discard", "killed by telegram:7"),
        ("keep", "better by 0.1000 ± 0.0042 (n = 1 vs 1)"),
        ("crash", "timeout after 0m01s"),
        ("discard", "killed by cli:me (pause now)"),
    ]
    assert rows[5].status == "keep" and proposer.contexts[-1].focus is None
    assert proposer.contexts[2].notes == ()  # a note is delivered once
    kinds = [e.kind for e in engine.store.events_after(0)]
    for kind in ("focus_changed", "note_added", "paused", "resumed", "command_done"):
        assert kind in kinds
    paused = [e.payload for e in engine.store.events_after(0) if e.kind == "paused"]
    assert paused[0]["after"] == 3 and paused[1]["after"] is None
    assert all(c.status == "done" for c in map(engine.store.command, range(1, 10)) if c)
    assert_consistent(settings)


def test_an_edit_the_user_commits_between_nights_is_the_best_the_views_show(tmp_path: Path) -> None:
    """README: edit train.py and commit it before `nightlab run`. After a night with a keep, the
    loop measures that commit and goes on from it, and its digest said so (best 0.95); `best`,
    `status`, the report and `diff` went on showing the keep before it (0.9) as the best."""
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])) == 0
    ws = settings.workspace_path
    train = ws / "train.py"
    train.write_text(train.read_text().replace("VAL_BPB = [0.9]", "VAL_BPB = [0.95]"))
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "mine: 0.95"], check=True)
    assert run_engine(settings, 3, proposer=ScriptedProposer([])) == 0
    store = Store.for_workspace(ws)
    rows = ledger.experiments(store)
    assert [(e.kind, e.status, e.metric) for e in rows] == [("baseline", "keep", 1.0), ("proposal", "keep", 0.9),
                                                             ("baseline", "keep", 0.95)]
    assert views.best_text(ws).startswith(f"best val_bpb: 0.950000 — #3 {rows[2].commit[:7]}")
    assert "best val_bpb: 0.950000 (#3" in views.status_text(ws)
    assert "- best val_bpb: 0.950000 (#3" in views.report_markdown(ws)
    shown = views.diff_text(ws)  # the night's change: the keep and the user's edit together
    assert shown.startswith("the best, #3, against the baseline, #1") and "+VAL_BPB = [0.95]" in shown


def test_after_a_budget_change_the_views_show_the_new_settings_best(tmp_path: Path) -> None:
    """README: results are compared only between runs with the same budget. After [trainer]
    time_budget changed, the loop measured the best again in the new setting, while best, status
    and the report showed the old setting's keep and gain, and `per hardware` listed the one CPU
    twice (one class per setting)."""
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.9, 0.92]}}])) == 0
    changed = dataclasses.replace(settings, trainer=dataclasses.replace(settings.trainer, time_budget=5))
    assert run_engine(changed, 3, proposer=ScriptedProposer([])) == 0
    ws = settings.workspace_path
    rows = ledger.experiments(Store.for_workspace(ws))
    assert [(e.kind, e.metric) for e in rows] == [("baseline", 1.0), ("proposal", 0.9), ("baseline", 0.92)]
    assert rows[2].setting != rows[1].setting and rows[2].commit == rows[1].commit
    status = views.status_text(ws)
    assert "best val_bpb: 0.920000 (#3" in status and "per hardware" not in status
    assert views.best_text(ws).startswith("best val_bpb: 0.920000 — #3")
    assert "- gain: none yet, the best is the baseline" in views.report_markdown(ws)
    # the code is still #2's change: /diff said "no change has been kept yet"
    shown = views.diff_text(ws)
    assert shown.startswith("the best, #3, against the baseline, #1") and "+VAL_BPB = [0.9, 0.92]" in shown


def test_bad_commands_get_clear_errors(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    run_engine(settings, 1, proposer=ScriptedProposer([{"noop": True}]))  # the engine publishes its areas
    ws = settings.workspace_path
    for text, message in (
        ("", "empty command"),
        ("dance", "unknown command 'dance'"),
        ("focus", "focus needs an area or 'off'"),
        ("focus attention", "unknown area 'attention'; areas: lr, arch, off"),
        ("note", "note needs some text"),
        ("pause later", "pause takes nothing or 'now'"),
        ("kill abc", "kill takes an experiment number"),
        ("kill", "nothing is running"),
        ("resume now", "resume takes no arguments"),
    ):
        with pytest.raises(UserError, match=message):
            send_command(ws, text, "cli:t")
    with pytest.raises(UserError, match="not a nightlab workspace"):
        send_command(tmp_path / "nowhere", "pause", "cli:t")
    # no engine: no "within ~2 s" beside "not running" (it acts whenever the loop starts)
    # one parenthesis: it was "pausing (nothing is running) (the loop is not running right now: …)"
    assert send_command(ws, "pause", "cli:t") == "pausing (the loop is not running right now: it acts on this when it starts)"
    with EngineLock(ws):  # an engine that acts within a checkpoint says why nothing is waited for
        assert send_command(ws, "pause", "cli:u") == "pausing within ~2 s (nothing is running)"
    assert send_command(ws, "status", "cli:t").startswith("nightlab · autoresearch/test")
    assert "pause [now]" in send_command(ws, "help", "cli:t")


def test_restart_reattaches_to_a_live_run_and_reads_a_finished_one(tmp_path: Path, gates: Gates) -> None:
    gates.open(1)
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}, {"set": {"VAL_BPB": [0.8]}}])
    first = EngineThread(settings, proposer, limit=3)
    run = first.running(2)
    first.join(stop=True)  # the daemon stops; the run goes on
    handle = RunHandle.from_json(run.handle)
    assert LocalExecutor().poll([handle])[handle.key].state == "running"
    second = EngineThread(settings, proposer, limit=3)  # re-attaches to the live #2
    gates.open(2)
    run3 = second.running(3)
    second.join(stop=True)
    h3 = RunHandle.from_json(run3.handle)
    gates.open(3)  # #3 ends while no engine runs: its log and exit file decide
    wait_until(lambda: LocalExecutor().poll([h3])[h3.key].state != "running", "#3 to end")
    assert run_engine(settings, 3, proposer=proposer) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [(e.number, e.status, e.metric) for e in rows] == [(1, "keep", 1.0), (2, "keep", 0.9), (3, "keep", 0.8)]
    assert_consistent(settings)


def _committed_while_2_was_left_in_flight(tmp_path: Path, gates: Gates, value: float,
                                         limit: int = 3) -> tuple[Settings, str, Store]:
    """A night stopped (systemctl stop) with #2 (its change's VAL_BPB `value`) left in flight, an
    edit of train.py the user committed then, and the next start's night of `limit`: (settings,
    that commit, the store)."""
    gates.open(1)
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    ws = settings.workspace_path
    first = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [value]}}]), limit=3)
    first.running(2)
    first.join(stop=True)  # the daemon stops; #2 goes on
    train = ws / "train.py"
    train.write_text(train.read_text().replace("SLEEP = 0.0", "SLEEP = 0.01"))
    git_out(ws, "commit", "-qam", "mine: sleep a little")
    mine = git_out(ws, "rev-parse", "HEAD")
    second = EngineThread(settings, ScriptedProposer([]), limit=limit)
    gates.open(2, 3)
    assert second.join() == 0
    return settings, mine, second.store


def test_a_commit_made_while_a_run_was_left_in_flight_is_measured_after_it_not_reset_away(
    tmp_path: Path, gates: Gates
) -> None:
    """nightlab stopped (systemctl stop) leaves the run in flight; the user then commits an edit
    of train.py, as the README says, and starts nightlab. Recording the run it re-attached reset
    the branch to that run's commit: the user's commit was gone from the branch (the reflog
    only), never measured, and nothing said so. Now it is kept and measured as the next baseline."""
    settings, mine, store = _committed_while_2_was_left_in_flight(tmp_path, gates, 0.9)
    ws = settings.workspace_path
    rows = ledger.experiments(store)
    assert [(e.kind, e.status, e.metric) for e in rows] == [("baseline", "keep", 1.0), ("proposal", "keep", 0.9),
                                                             ("baseline", "keep", 0.9)]
    assert rows[2].commit == mine == git_out(ws, "rev-parse", "HEAD")
    alerts = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert"]
    assert f"your commit {mine[:7]} (mine: sleep a little) came while #2 was open" in " ".join(alerts), alerts
    assert_consistent(settings)


def test_a_commit_made_while_a_run_was_open_stays_on_the_branch_when_the_night_ends_before_measuring_it(
    tmp_path: Path, gates: Gates
) -> None:
    """The night ended (--max-experiments) with the person's commit not measured yet: the branch was
    left at #2's commit, theirs off it (the reflog only, until a next start), though the alert said
    "kept". The stop leaves the branch on it, and the next start measures it."""
    settings, mine, store = _committed_while_2_was_left_in_flight(tmp_path, gates, 0.9, limit=2)
    ws = settings.workspace_path
    assert git_out(ws, "rev-parse", "HEAD") == mine and git_out(ws, "status", "--porcelain") == ""
    assert run_engine(settings, 3, proposer=ScriptedProposer([])) == 0
    third = ledger.experiments(store)[2]
    assert (third.kind, third.commit, third.metric) == ("baseline", mine, 0.9)


def test_a_commit_made_on_an_experiments_tree_is_said_to_hold_its_change(tmp_path: Path, gates: Gates) -> None:
    """A stop leaves a proposal in flight in the workspace's tree, so an edit committed then is
    made on that proposal's commit and holds its change too, which its run may then discard:
    measured next as the user's, nothing said the change was in it."""
    settings, mine, store = _committed_while_2_was_left_in_flight(tmp_path, gates, 1.5)
    ws = settings.workspace_path
    rows = ledger.experiments(store)
    assert [(e.kind, e.status, e.metric) for e in rows] == [("baseline", "keep", 1.0), ("proposal", "discard", 1.5),
                                                             ("baseline", "keep", 1.5)]
    [said] = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert" and "your commit" in
              e.payload["text"]]
    assert said.endswith(f"; it is made on #2's commit, so it holds #2's change too (`git -C {ws} diff"
                         f" {rows[0].commit[:7]} {mine[:7]}` shows all it changes)"), said


def test_an_engine_its_test_left_running_is_ended_with_its_run(tmp_path: Path) -> None:
    # What tests/loop/conftest.py does after every test: the engine of a test that failed half-way
    # went on launching runs (a hang here) beside the tests after it, and outlived the suite.
    engine = EngineThread(make_stub_workspace(tmp_path), ScriptedProposer([{"set": {"MODE": "hang"}}]))
    handle = RunHandle.from_json(engine.running(2).handle)
    EngineThread.end_all()
    assert not engine.thread.is_alive() and EngineThread.started == []
    assert LocalExecutor().poll([handle])[handle.key].state != "running"


def test_a_second_engine_is_refused_and_a_dirty_tree_is_explained_or_refused(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([{"set": {"MODE": "hang"}}])
    engine = EngineThread(settings, proposer)
    engine.running(2)
    with pytest.raises(UserError, match=r"another nightlab engine \(pid \d+\) is running"):
        run_engine(settings, 1, proposer=proposer)
    send_command(settings.workspace_path, "pause now", "cli:t")
    engine.wait_for(lambda: len(_statuses(engine.store)) == 2, "#2 cancelled")
    engine.join(stop=True)
    (settings.workspace_path / "train.py").write_text("# edited by hand\n")
    with pytest.raises(UserError, match="has changes nightlab did not make: train.py"):
        run_engine(settings, 3, proposer=proposer)


def test_an_edit_made_by_hand_while_a_run_is_in_flight_is_kept_not_reset_away(tmp_path: Path, gates: Gates) -> None:
    """A person edits train.py while #2 runs in the workspace: the ratchet's reset after the run
    used to remove the edit without a word. It is kept as a git stash entry and said in chat."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    gates.open(1)
    engine = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [1.1]}}]), limit=2)
    run = engine.running(2)
    engine.wait_for(lambda: "step 00001" in Path(run.log_path).read_text(), "#2's trainer to have read train.py")
    edited = (ws / "train.py").read_text().replace("GAIN = 0.0", "GAIN = 0.5  # tried by hand")
    (ws / "train.py").write_text(edited)
    gates.open(2)
    engine.join()
    assert [e.status for e in ledger.experiments(engine.store)] == ["keep", "discard"]
    alerts = [e.payload["text"] for e in engine.store.events_after(0) if e.kind == "alert"]
    assert alerts == [f"edits nightlab did not make were in train.py at #2: the loop owns the workspace's files while"
                      f" it runs, so they were not run; kept in `git -C {ws} stash list`. To have them tried:"
                      f" `nightlab ctl pause`, then `git -C {ws} stash pop`, commit them, and resume"]
    assert "GAIN = 0.0" in (ws / "train.py").read_text()  # the tree is the kept commit's
    subprocess.run(["git", "-C", str(ws), "stash", "pop", "-q"], check=True)  # the edit, on the best
    assert (ws / "train.py").read_text() == edited.replace("VAL_BPB = [1.1]", "VAL_BPB = [1.0]")


def test_a_file_added_by_hand_while_a_run_is_in_flight_is_kept_not_cleaned_away(tmp_path: Path, gates: Gates) -> None:
    """A person drops notes into the workspace while #2 runs there: the ratchet's reset (`git clean`)
    deleted the new file without a word. It goes into the stash with the edits, and chat says so."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    gates.open(1)
    engine = EngineThread(settings, ScriptedProposer([{"set": {"VAL_BPB": [1.1]}}]), limit=2)
    engine.running(2)
    (ws / "ideas").mkdir()
    (ws / "ideas" / "notes.md").write_text("try a wider MLP\n")
    gates.open(2)
    engine.join()
    assert not (ws / "ideas").exists()  # the tree is the kept commit's
    alerts = [e.payload["text"] for e in engine.store.events_after(0) if e.kind == "alert"]
    assert alerts == [f"edits nightlab did not make were in ideas/notes.md (new) at #2: the loop owns the workspace's"
                      f" files while it runs, so they were not run; kept in `git -C {ws} stash list`. To have them"
                      f" tried: `nightlab ctl pause`, then `git -C {ws} stash pop`, commit them, and resume. Files your"
                      " runs write belong in .gitignore (or .git/info/exclude): the loop leaves ignored files where"
                      " they are"]
    subprocess.run(["git", "-C", str(ws), "stash", "pop", "-q"], check=True)
    assert (ws / "ideas" / "notes.md").read_text() == "try a wider MLP\n"


def test_a_kill_sent_while_nightlab_was_stopped_leaves_a_run_that_had_ended_as_measured(
    tmp_path: Path, gates: Gates
) -> None:
    """`nightlab ctl kill 2` while nightlab was stopped: #2 had finished meanwhile, its val_bpb in its log,
    and the next start recorded it as "discard (killed by cli:…)", its result thrown away. The runs that
    ended are seen before a command is applied: #2 is recorded as measured, and the kill finds nothing."""
    settings = make_stub_workspace(tmp_path)
    gates.open(1)
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])
    engine = EngineThread(settings, proposer, limit=2)
    run = engine.running(2)
    engine.join(stop=True)  # the run goes on: the next start re-attaches it
    gates.open(2)
    wait_until(lambda: read_exit_code(Path(run.log_path)) == 0, "#2 to end while nightlab is stopped")
    assert send_command(settings.workspace_path, "kill 2", "cli:t") == (
        "killing #2; it will be recorded as discarded unless it has ended by then (the loop is not running right now:"
        " it acts on this when it starts)")
    EngineThread(settings, proposer, limit=2).join()
    second = ledger.experiments(engine.store)[1]
    assert (second.status, second.metric) == ("keep", 0.9), second.reason
    done = [(e.payload["name"], e.payload["result"]) for e in engine.store.events_after(0) if e.kind == "command_done"]
    assert done == [("kill", "nothing is running; there is no experiment to kill")]


def test_a_checkout_by_hand_while_a_run_is_in_flight_stops_the_engine_with_what_to_do(
    tmp_path: Path, gates: Gates
) -> None:
    """Someone checks out an old commit to look at it while #2 runs: the night's next commits went
    onto that detached HEAD, off the session branch, unseen until the next start refused it."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    gates.open(1)
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}, {"set": {"VAL_BPB": [0.8]}}])
    engine = EngineThread(settings, proposer, limit=3)
    run = engine.running(2)
    engine.wait_for(lambda: "step 00001" in Path(run.log_path).read_text(), "#2's trainer to have read train.py")
    first = ledger.experiments(engine.store)[0].commit
    subprocess.run(["git", "-C", str(ws), "checkout", "-q", first], check=True)
    gates.open(2, 3)
    with pytest.raises(UserError) as err:
        engine.join()
    assert str(err.value) == (
        f"{ws} was switched to a detached HEAD while the loop ran (it owns the workspace's git; to look at an old"
        f" commit use `git -C {ws} show <commit>:train.py`); run `git -C {ws} checkout autoresearch/test` and start"
        " nightlab again: nothing recorded is lost")
    subprocess.run(["git", "-C", str(ws), "checkout", "-q", "autoresearch/test"], check=True)
    assert run_engine(settings, 3, proposer=proposer) == 0
    rows = ledger.experiments(engine.store)
    assert [(e.number, e.status, e.metric) for e in rows] == [(1, "keep", 1.0), (2, "keep", 0.9), (3, "keep", 0.8)]
    assert git_out(ws, "rev-parse", "autoresearch/test") == rows[2].commit  # the night's keeps on the branch
    assert_consistent(settings)


def test_a_commit_gone_from_under_an_open_experiment_is_said_not_a_git_traceback(tmp_path: Path, gates: Gates) -> None:
    """The branch rewritten and cleaned (reset, refs removed, gc) while #2 was open: git's 'Could not
    parse object' traceback at every restart of the engine."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    gates.open(1)
    proposer = ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])
    engine = EngineThread(settings, proposer, limit=2)
    run = engine.running(2)
    engine.wait_for(lambda: "step 00001" in Path(run.log_path).read_text(), "#2's trainer to have read train.py")
    engine.join(stop=True)
    first = ledger.experiments(engine.store)[0].commit
    gone = ledger.get_candidate(engine.store, run.candidate_id).commit
    git = ["git", "-C", str(ws)]
    subprocess.run([*git, "reset", "-q", "--hard", first], check=True)
    subprocess.run([*git, "update-ref", "-d", "refs/nightlab/exp/2"], check=True)
    subprocess.run([*git, "reflog", "expire", "--expire=now", "--all"], check=True)
    subprocess.run([*git, "gc", "-q", "--prune=now"], check=True)
    gates.open(2)
    with pytest.raises(UserError) as err:
        run_engine(settings, 2, proposer=proposer)
    assert str(err.value) == (
        f"commit {gone[:7]}, which #2 needs, is no longer in {ws}: its history was rewritten or cleaned (git gc)"
        f" under the loop. Put it back if a backup or `git -C {ws} fsck --lost-found` has it, then start nightlab"
        " again; rewrite the session branch only while nightlab is stopped and no experiment is open")


KILL_POINTS = [("proposed", 2), ("launched", 2), ("running", 2), ("finished", 2), ("recorded", 2),
               ("finished", 3), ("running", 4)]


@pytest.mark.parametrize(("point", "number"), KILL_POINTS)
def test_kill_9_anywhere_loses_nothing_and_records_nothing_twice(tmp_path: Path, point: str, number: int) -> None:
    settings = make_stub_workspace(tmp_path)
    steps = [
        {"set": {"VAL_BPB": [0.9], "SLEEP": 0.3}},  # #2 keep
        {"set": {"VAL_BPB": [0.95]}},  # #3 discard
        {"set": {"MODE": "crash", "SLEEP": 0.3}},  # #4 crash
        {"set": {"VAL_BPB": [0.85]}},  # #5 keep
    ]
    script = tmp_path / "steps.json"
    script.write_text(json.dumps(steps))
    cmd = [sys.executable, str(FAKES / "engine_main.py"), str(settings.workspace_path), str(script), "5"]
    killed = subprocess.run([*cmd, point, str(number)], check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = Store.for_workspace(settings.workspace_path)
    assert ledger.last_number(store) < 5
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = ledger.experiments(store)
    assert [(e.number, e.status, e.metric) for e in rows] == [
        (1, "keep", 1.0), (2, "keep", 0.9), (3, "discard", 0.95), (4, "crash", None), (5, "keep", 0.85)]
    starts = [e.payload["number"] for e in store.events_after(0) if e.kind == "experiment_started"]
    assert starts == [1, 2, 3, 4, 5]
    assert_consistent(settings)
    # every stub run left its counter file: each commit ran exactly once (a re-attach, never a re-run)
    counters = [int(p.read_text()) for p in (settings.workspace_path / ".stub").glob("stub-*")]
    assert sorted(counters) == [1, 1, 1, 1, 1]


def _engine_config(tmp_path: Path) -> Path:
    """A stub workspace and the config file `python -m nightlab.loop.engine` runs it with."""
    settings = make_stub_workspace(tmp_path)
    config = tmp_path / "nightlab.toml"
    config.write_text(
        f'[workspace]\npath = "{settings.workspace_path}"\n[project]\nrun_command = "{sys.executable} train.py"\n'
        '[proposer]\nkind = "agent"\n[proposer.agent]\ncommand = "true"\n'
    )
    return config


def test_engine_module_exits_cleanly_with_max_experiments(tmp_path: Path) -> None:
    config = _engine_config(tmp_path)
    bad = subprocess.run([sys.executable, "-m", "nightlab.loop.engine", "--config", str(tmp_path / "missing.toml")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "nightlab.loop.engine", "--config", str(config), "--max-experiments", "1"],
                        check=False, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(FAKES.parents[1])})
    if "No module named 'nightlab.loop.proposers.agent'" in ok.stderr:
        pytest.skip("the agent proposer is not written yet")
    assert ok.returncode == 0, ok.stderr
    assert Store.for_workspace(tmp_path / "ws").get("engine.finished") is True


@pytest.mark.parametrize("flags", [[], ["--secrets-on-stdin"]])
def test_only_an_engine_the_daemon_started_reads_its_stdin_and_bad_content_is_said(
        tmp_path: Path, flags: list[str]) -> None:
    """An engine started by hand or by a test must not wait on a terminal; the daemon's (its flag)
    reads the chat tokens there, and content it cannot read is one line, not a stop."""
    config = _engine_config(tmp_path)
    given = tmp_path / "stdin"
    given.write_text('{"telegram": "123456:not-a-list"}')
    with given.open("rb") as stdin:  # a file, not a pipe: its offset, shared with the engine, says what it read
        done = subprocess.run([sys.executable, "-m", "nightlab.loop.engine", "--config", str(config),
                               "--max-experiments", "1", *flags], stdin=stdin, check=False, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert stdin.tell() == (given.stat().st_size if flags else 0)
    said = [line.partition("nightlab engine: ")[2] for line in done.stderr.splitlines() if "stdin" in line]
    assert said == (["the chat tokens the daemon hands over on stdin could not be read (not a JSON list of strings);"
                     " the engine runs on, but a chat token an agent or a run writes back is not starred out: restart"
                     " nightlab if this is said again"] if flags else [])


def test_a_change_beside_the_editable_files_is_refused_saying_what_each_file_was(tmp_path: Path) -> None:
    """All three read "changed files outside project.editable … (restored)": the harness as if a
    config could allow it, a module the proposer added (train.py importing it) as if it had been there."""
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([
        {"write": {"prepare.py": "harness edited"}},
        {"write": {"helper.py": "BONUS = 0.1\n", "program.md": "be lazy\n"}},
    ])
    assert run_engine(settings, 3, proposer=proposer) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [e.reason for e in rows[1:]] == [
        "rejected: changed the protected prepare.py (the harness that measures every run; restored)",
        "rejected: changed files outside project.editable: program.md (restored); added helper.py outside"
        " project.editable (removed: a change lives in train.py)",
    ]
    assert not (settings.workspace_path / "helper.py").exists()


def test_an_agent_command_whose_program_is_not_installed_stops_the_engine_at_its_start(tmp_path: Path) -> None:
    """It was a crash per proposal ("the shell found no such program"), a digest each, until the
    loop paused itself after 15 of them: now one message at the start, naming the key to fix."""
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": "claude-not-here -p"}})
    with pytest.raises(UserError, match=r"^\[proposer.agent\] command starts 'claude-not-here', which is not on PATH"
                                        r" .*; install the agent, or fix \[proposer.agent\] command in <test>$"):
        run_engine(settings, 3)
    assert ledger.experiments(Store.for_workspace(settings.workspace_path)) == []


def test_a_project_command_whose_program_is_not_installed_stops_the_engine_at_its_start(tmp_path: Path) -> None:
    """A run command's was a crash per experiment, a checks command's a checks_failed per keep (the
    baseline's first), until the loop paused itself after 15: now one message at the start."""
    settings = make_stub_workspace(tmp_path, project={"run_command": "nosuch-train train.py",
                                                      "checks_command": "./lint.sh"})
    with pytest.raises(UserError) as err:
        run_engine(settings, 3)
    assert str(err.value).startswith(
        "project.run_command starts 'nosuch-train', which is not on PATH; project.checks_command starts"
        " './lint.sh', which is not an executable file (")
    assert str(err.value).endswith("; install it, or fix [project] in <test>")
    assert ledger.experiments(Store.for_workspace(settings.workspace_path)) == []


def test_a_project_file_git_ignores_stops_a_night_on_several_slots_at_its_start(tmp_path: Path) -> None:
    """Each run's snapshot lacked it: every run was "rejected: protected files changed: data.csv"."""
    repo = tmp_path / "ws"
    repo.mkdir()
    shutil.copyfile(STUB, repo / "train.py")
    (repo / "data.csv").write_text("1,2,3\n")
    (repo / ".gitignore").write_text("data.csv\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "initial"], check=True)
    settings = stub_settings(repo, project={"protected": ["data.csv"]}, executor={"cpu_slots": 2})
    init_workspace(repo, "test", settings, say=lambda _: None)
    with pytest.raises(UserError, match=r"^git ignores data.csv, named in \[project\]: runs on several slots"):
        run_engine(settings, 2)
    assert ledger.experiments(Store.for_workspace(repo)) == []
    one_slot = stub_settings(repo, project={"protected": ["data.csv"]})
    assert run_engine(one_slot, 1) == 0  # in place: the file is there


def test_a_metric_the_config_changed_is_a_new_setting_said_once(tmp_path: Path) -> None:
    """`project.metric` changed between two nights (or its direction): the next proposal's
    peak_vram_mb 1024 was compared with the best's val_bpb 1.0 and kept, "better by 1023.0000"."""
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 1) == 0
    other = dataclasses.replace(settings, project=dataclasses.replace(settings.project, metric="peak_vram_mb",
                                                                      direction="maximize"))
    assert run_engine(other, 3, proposer=ScriptedProposer([{"set": {"GAIN": 0.5}}])) == 0
    store = Store.for_workspace(settings.workspace_path)
    one, two, three = ledger.experiments(store)
    assert (two.kind, two.commit, two.setting != one.setting) == ("baseline", one.commit, True)
    assert three.reason.startswith("not better")  # compared with the best's peak_vram_mb, measured again
    [alert] = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert"]
    assert alert.startswith("the metric val_bpb minimize -> peak_vram_mb maximize since the last run, so runs from")


def test_an_api_key_an_agent_prints_stays_out_of_the_engines_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """The engine's lines go to the daemon's journal as they are: a failed proposal's reason quoted
    the agent's stderr there, key and all, while the chat and the daemon's own lines starred it out."""
    key = "sk-ant-api03-abcdefghijklmnop"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} leak-key"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    assert run_engine(settings, 2) == 0
    log = capfd.readouterr().err
    assert "#2 crash" in log and "invalid x-api-key ***" in log and key not in log


def test_a_key_an_agent_writes_in_its_words_its_code_and_its_runs_output_is_stored_nowhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the chat and the journal starred it out: the ledger, the exports, the commit message,
    the report, /diff and the next agent's prompt had the key as the agent and its run wrote it."""
    from nightlab.bot.digest import describe

    key = "sk-proj-abcdefghijklmnop0123"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} write-key"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    assert run_engine(settings, 3) == 0  # #3: the same code again, refused, after its prompt was written
    ws = settings.workspace_path
    store = Store.for_workspace(ws)
    two = ledger.experiments(store)[1]
    assert (two.status, two.description, two.hypothesis) == ("crash", "use the API (key ***)", "*** lets the model ask GPT")
    (crashed,) = [e for e in store.events_after(0) if e.kind == "experiment_finished" and e.payload["number"] == 2]
    assert "401 invalid key ***" in crashed.payload["log_tail"]
    commit_message = git_out(ws, "log", "-1", "--format=%B", two.commit)
    assert commit_message == "#2: use the API (key ***)\n\n*** lets the model ask GPT"
    assert key in git_out(ws, "show", f"{two.commit}:train.py")  # the code as the agent wrote it: the user's
    said = [
        b"".join(f.read_bytes() for f in (ws / ".nightlab").glob("state.db*")).decode("utf-8", "replace"),
        (ws / "results.tsv").read_text(), (ws / "autoresearch.jsonl").read_text(),
        commit_message, views.report_markdown(ws), views.history_text(ws), views.diff_text(ws, 2),
        (ws / ".nightlab" / "agent" / "prompt.md").read_text(),
        repr([describe(e, settings.digest) for e in store.events_after(0)]),  # what the chat is given
    ]
    assert [key in text for text in said] == [False] * len(said)
    assert 'API_KEY = "***"' in views.diff_text(ws, 2)


def test_a_proposer_bugs_traceback_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    """traceback.print_exc() wrote the bug's message, key and all, into the daemon's journal."""
    key = "hf_abcdefghijklmnopqrstu"
    monkeypatch.setenv("HF_TOKEN", key)
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"bug": f"bad token {key}"}])) == 0
    log = capfd.readouterr().err
    assert "Traceback (most recent call last)" in log and "RuntimeError: bad token ***" in log and key not in log
    reason = ledger.experiments(Store.for_workspace(settings.workspace_path))[1].reason
    assert reason == "proposer error: RuntimeError: bad token ***"


def test_an_agent_that_removes_the_ledger_stops_the_loop_with_the_ledger_written_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`git clean -fdx` took .nightlab/state.db: the night went on in the removed file and the next
    start found an empty ledger, every experiment forgotten."""
    monkeypatch.setenv("NIGHTLAB_SANDBOX", "0")  # unconfined: in its sandbox an agent cannot (tests/loop/test_sandbox.py)
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} clean-all"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    with pytest.raises(UserError, match=r"^the proposer removed the night's ledger \(.*state.db: an agent's"
                                        r" `git clean -x` or `rm`\); written back, and the loop stopped"):
        run_engine(settings, 3)
    store = Store.for_workspace(settings.workspace_path)
    assert [e.status for e in ledger.experiments(store)] == ["keep"]  # the baseline, as it was
    assert store.get("engine.user_error").startswith("the proposer removed the night's ledger")


def test_an_engine_whose_lock_file_an_agent_removed_still_refuses_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's `git clean -fdx` removed engine.lock: the engine held its lock on the removed file,
    so a second engine on the workspace took a new one while the agent worked on."""
    monkeypatch.setenv("NIGHTLAB_SANDBOX", "0")  # unconfined: in its sandbox an agent cannot (tests/loop/test_sandbox.py)
    gate = tmp_path / "gate"
    agent = f"{shlex.quote(sys.executable)} {FAKES / 'agent_misbehave.py'} clean-all {gate}"
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": agent}})
    lock = settings.workspace_path / ".nightlab" / "engine.lock"
    ended: list[BaseException | int] = []

    def engine() -> None:
        try:
            ended.append(run_engine(settings, 3))
        except BaseException as exc:  # noqa: BLE001 -- asserted below
            ended.append(exc)

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()
    try:
        wait_until(lambda: not (settings.workspace_path / ".nightlab" / "state.db").exists(), what="the agent to clean")
        wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(os.getpid()),
                   what="the engine to put its lock file back", abort=lambda: ended and f"the engine ended: {ended}")
        with pytest.raises(LockHeld, match=f"another nightlab engine \\(pid {os.getpid()}\\) is running"):
            EngineLock(settings.workspace_path).acquire()
    finally:
        gate.touch()
        thread.join(60)
    assert isinstance(ended[0], UserError) and str(ended[0]).startswith("the proposer removed the night's ledger")


def test_an_engine_on_a_damaged_ledger_stops_with_what_to_do(tmp_path: Path) -> None:
    """A table damaged past the schema failed in the engine's first read: a traceback, and the
    daemon restarted it until it paused the loop. Exit 2 (a person must act) and the words to act on."""
    from tests.heartbeat.test_history_cli import damage_table

    settings = make_stub_workspace(tmp_path)
    config = tmp_path / "nightlab.toml"
    config.write_text(f'[workspace]\npath = "{settings.workspace_path}"\n[project]\nrun_command = "true"\n')
    db = settings.workspace_path / ".nightlab" / "state.db"
    damage_table(db, "experiments")
    out = subprocess.run([sys.executable, "-m", "nightlab.loop.engine", "--config", str(config)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (2, f"nightlab: {db} is not a readable nightlab state database (database"
                                               " disk image is malformed); restore it from a backup, or move it aside"
                                               " to start this workspace's ledger afresh\n")


def test_a_ledger_moved_aside_starts_afresh_without_adopting_the_old_ledgers_runs(tmp_path: Path) -> None:
    """What the damaged-ledger message says to do: move it aside. The next night's #1 found the old
    night's #1 handle and exit file beside its log, adopted that run and recorded its val_bpb, though
    nothing ran: a result never measured, of another commit."""
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])) == 0
    state = settings.workspace_path / ".nightlab"
    old_night = time.time() - 3600
    for path in (state / "runs").iterdir():
        os.utime(path, (old_night, old_night))
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (state / name).exists():
            (state / name).rename(tmp_path / name)
    init_workspace(settings.workspace_path, "test", settings, say=lambda _: None)
    assert run_engine(settings, 1, proposer=ScriptedProposer([])) == 0
    first = ledger.experiments(Store.for_workspace(settings.workspace_path))[0]
    assert (first.kind, first.metric) == ("baseline", 0.9)  # the kept #2's train.py, run; not the old #1's 1.0


def test_a_best_of_zero_keeps_the_noise_prior_at_its_absolute_size(tmp_path: Path) -> None:
    """A metric whose baseline is 0: the prior's scale skipped the best (0) for the run's own value,
    4e-6, so the noise was ± 0.0000 and a jitter of 4e-6 was kept ("the same to 4 decimals", 235 SE)."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    (ws / "train.py").write_text((ws / "train.py").read_text().replace("VAL_BPB = [1.0]", "VAL_BPB = [0.0]"))
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "a metric that starts at 0"], check=True)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [-4e-6]}}])) == 0
    second = ledger.experiments(Store.for_workspace(ws))[1]
    assert second.status == "discard", second.reason


def test_a_proposer_failing_again_and_again_is_asked_again_later_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent rate-limited by its provider failed 15 times in two seconds, and the night paused
    itself for what minutes would have mended. The first failure is retried at once, then it rests,
    twice as long each time; a proposal that works ends the rest."""
    from nightlab.loop.engine import proposing

    monkeypatch.setattr(proposing, "PROPOSER_REST_S", 0.2)
    settings = make_stub_workspace(tmp_path, loop={"checkpoint_interval": 0.05})
    steps: list[dict[str, Any]] = [{"raise": "rate limited"}] * 3 + [{"set": {"VAL_BPB": [0.9]}}]
    assert run_engine(settings, 5, proposer=ScriptedProposer(steps)) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [e.status for e in rows] == ["keep", "crash", "crash", "crash", "keep"]
    said = capsys.readouterr().err
    assert "the proposer failed 2 times in a row; the next proposal in 0 s" in said
    assert "the proposer failed 3 times in a row" in said and "failed 1 times" not in said
    # the rests, between the failures' records: none after the first, 0.2 s after the second, 0.4 s after the third
    assert rows[3].finished_at - rows[2].finished_at >= 0.2 and rows[4].started_at - rows[3].finished_at >= 0.4


def test_a_run_without_a_keep_is_said_as_the_agents_prompt_answers_it(tmp_path: Path) -> None:
    """With an agent proposing, the alert said "the search widens its moves", which no search does."""
    command = shlex.join([sys.executable, "-c", "import time; open('train.py', 'a').write('# %r\\n' % time.time())"])
    settings = make_stub_workspace(tmp_path, proposer={"kind": "agent", "agent": {"command": command}},
                                   loop={"pause_after_failures": 2})
    assert run_engine(settings, 3) == 0
    alerts = [e.payload["text"] for e in Store.for_workspace(settings.workspace_path).events_after(0)
              if e.kind == "alert"]
    assert alerts == ["2 experiments in a row without a keep: the agent's prompt asks it for a clearly different idea"
                      " or area; the loop goes on (only failures pause it)"]


def test_a_note_waits_for_a_proposal_that_runs(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    send_command(settings.workspace_path, "note try rope", "telegram:7")
    proposer = ScriptedProposer([
        {"raise": "the agent timed out"},  # #2: no proposal at all
        {"noop": True},  # #3: changed nothing
        {"write": {"prepare.py": "harness edited"}},  # #4: rejected
        {"set": {"VAL_BPB": [0.9]}},  # #5: runs, with the note
        {"set": {"VAL_BPB": [0.8]}},
    ])
    assert run_engine(settings, 6, proposer=proposer) == 0
    store = Store.for_workspace(settings.workspace_path)
    assert _statuses(store)[1:5] == ["crash", "discard", "crash", "keep"]
    assert [c.notes for c in proposer.contexts] == [("try rope",)] * 4 + [()]
    (note,) = [c for c in map(store.command, range(1, 5)) if c and c.name == "note"]
    assert note.result == "delivered with #5"


def test_a_kept_focus_the_proposer_does_not_know_is_turned_off_at_start(tmp_path: Path) -> None:
    """A focus kept from another proposer's night would fail every proposal ("unknown focus area"):
    the engine turns it off when it starts, says so once, and the night goes on."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    (ws / "train.py").chmod(0o644)
    store = Store.for_workspace(ws)
    ledger.set_focus(store, "attention sinks")  # the agent proposer's free text
    run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [1.1]}, "area": "lr"}]))
    assert [e.status for e in ledger.experiments(store)] == ["keep", "discard"]
    assert ledger.focus(store) is None
    alerts = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert"]
    assert alerts == ["focus 'attention sinks' is not an area of this proposer (lr, arch); focus is off."
                      " `focus <area>` to steer"]


def test_a_focus_with_nothing_left_is_said_once_in_chat_and_the_loop_goes_on(tmp_path: Path) -> None:
    """The search widens beyond an exhausted focus (its proposals name another area): the engine
    says so once, records no crash, and the night goes on."""
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    (ws / "train.py").chmod(0o644)
    send_command(ws, "focus lr", "cli:test")  # applied at the first checkpoint
    run_engine(settings, 4, proposer=ScriptedProposer([{"set": {"VAL_BPB": [1.1 + k / 100]}, "area": "arch"}
                                                       for k in range(3)]))
    store = Store.for_workspace(ws)
    assert [e.status for e in ledger.experiments(store)] == ["keep", "discard", "discard", "discard"]
    alerts = [e.payload["text"] for e in store.events_after(0) if e.kind == "alert"]
    assert alerts == [("focus lr: nothing left to try there; the search widens to other areas (#2: arch)."
                       " `focus off` or another focus to steer")]


def test_a_decided_experiments_log_is_cut_to_its_head_and_tail(tmp_path: Path) -> None:
    # before: every run's log stayed whole for good: a night of runs killed at heartbeat.max_log_mb kept
    # a gigabyte each. The result is read first; what stays is the start and the end (the summary).
    chatty = shlex.join([sys.executable, "-c", "for i in range(2000): print(f'step {i:05d} | loss 3.4', 'x' * 60)"])
    settings = make_stub_workspace(tmp_path, project={"run_command": f"{chatty} && {sys.executable} train.py"},
                                   loop={"decided_log_mb": 0.05})
    run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}]))
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [(e.status, e.metric) for e in rows] == [("keep", 1.0), ("keep", 0.9)]
    for number in (1, 2):
        log = (settings.workspace_path / ".nightlab" / "runs" / f"{number}.log").read_text()
        assert len(log) < 0.06 * 2**20 and log.startswith("step 00000")
        assert "bytes cut here once the experiment was decided (loop.decided_log_mb)" in log
        assert "val_bpb:" in log[-400:]
    assert_consistent(settings)


def test_a_crash_before_the_last_keep_is_not_in_the_proposers_context(tmp_path: Path) -> None:
    """#2's traceback was in every agent prompt for the rest of the night, "the last crash", long
    after #3 was kept and the best no longer held its code."""
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([{"set": {"MODE": "crash"}}, {"set": {"VAL_BPB": [0.9]}}, {"set": {"VAL_BPB": [0.95]}}])
    run_engine(settings, 4, proposer=proposer)
    assert _statuses(Store.for_workspace(settings.workspace_path)) == ["keep", "crash", "keep", "discard"]
    after_crash, after_keep = proposer.contexts[1:]
    assert after_crash.last_crash == 2 and after_crash.last_crash_log.endswith("RuntimeError: boom\n")
    assert (after_keep.last_crash, after_keep.last_crash_log) == (0, "")
    assert (after_crash.best_runs, after_keep.best_runs) == ((1.0,), (0.9,))  # what the keep rule compares with


def test_a_night_that_ends_before_an_undecided_result_is_re_run_leaves_the_branch_at_the_best(tmp_path: Path) -> None:
    """Git follows a result that is to be re-run at its own commit; a `--max-experiments` end just then left
    the session branch (and train.py) at that undecided change, not the best that status and best name.
    The next start checks it out again for its re-run."""
    settings = make_stub_workspace(tmp_path, loop={"baseline_runs": 3, "keep_z": 2.0, "max_runs": 3})
    train = settings.workspace_path / "train.py"
    train.chmod(0o644)
    train.write_text(train.read_text().replace("VAL_BPB = [1.0]", "VAL_BPB = [1.0, 1.01, 0.99]"))
    git_out(settings.workspace_path, "commit", "-qam", "noisy baseline")
    run_engine(settings, 4, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.99, 0.985]}}]))
    store = Store.for_workspace(settings.workspace_path)
    rows = ledger.experiments(store)
    assert rows[3].reason.startswith("re-running to decide")
    assert git_out(settings.workspace_path, "rev-parse", "HEAD") == rows[2].commit != rows[3].commit
    run_engine(settings, 6, proposer=ScriptedProposer([]))
    rows = ledger.experiments(store)
    assert [(e.kind, e.status, e.commit) for e in rows[4:]] == [("confirm", "discard", rows[3].commit),
                                                                ("confirm", "keep", rows[3].commit)]
    assert git_out(settings.workspace_path, "rev-parse", "HEAD") == rows[3].commit
    assert_consistent(settings)


def test_the_stop_says_how_many_experiments_are_recorded_when_a_wave_went_past_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wave ends whole: an undecided result's re-run with the best's re-measurement is two experiments,
    and a limit reached after the first still records both. The stop said the limit ('3 experiments
    recorded') where 4 were."""
    settings = make_stub_workspace(tmp_path, loop={"baseline_runs": 1})
    run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.997]}}]))  # within the noise
    run_engine(settings, 3, proposer=ScriptedProposer([]))
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [e.kind for e in rows] == ["baseline", "proposal", "baseline", "confirm"]
    assert "nightlab engine: 4 experiments recorded; stopping" in capsys.readouterr().err


def test_a_sigterm_while_an_undecided_result_waits_for_its_re_run_leaves_the_branch_at_the_best(
        tmp_path: Path, gates: Gates) -> None:
    """`systemctl stop` (the engine's SIGTERM) while a result to be re-run waits for its run, here behind a
    pause: HEAD and train.py stayed at that unkept change while status and best named the best. Every stop
    leaves the branch as a --max-experiments end does; the next start checks the change out again."""
    settings = make_stub_workspace(tmp_path, loop={"baseline_runs": 3, "keep_z": 2.0, "max_runs": 3})
    ws, train = settings.workspace_path, settings.workspace_path / "train.py"
    train.chmod(0o644)
    train.write_text(train.read_text().replace("VAL_BPB = [1.0]", "VAL_BPB = [1.0, 1.01, 0.99]"))
    git_out(ws, "commit", "-qam", "noisy baseline")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"set": {"VAL_BPB": "[0.99, 0.985]"}, "describe": "VAL_BPB lower"}]))
    agent = shlex.join([sys.executable, str(FAKES / "agent_plan.py"), str(plan)])
    config = tmp_path / "nightlab.toml"
    config.write_text(
        f'[workspace]\npath = "{ws}"\ntag = "test"\n[project]\nrun_command = "{sys.executable} train.py"\n'
        "[loop]\ncheckpoint_interval = 0.1\nbaseline_runs = 3\nkeep_z = 2.0\nmax_runs = 3\nremeasure_every = 0\n"
        f'[proposer]\nkind = "agent"\n[proposer.agent]\ncommand = {json.dumps(agent)}\n')
    engine = [sys.executable, "-m", "nightlab.loop.engine", "--config", str(config)]
    store = Store.for_workspace(ws)
    with open(tmp_path / "engine.log", "w") as log:
        first = subprocess.Popen(engine, stdout=log, stderr=subprocess.STDOUT)
        try:
            gates.open(1, 2, 3)
            wait_until(lambda: [c for c, _ in ledger.in_flight(store) if c.number == 4], "#4 to run",
                       abort=first.poll)
            send_command(ws, "pause", "cli:test")  # after #4: its re-run waits
            gates.open(4)
            wait_until(lambda: ledger.experiment_count(store) == 4 and [
                c for c in ledger.open_candidates(store) if c.kind == "confirm" and c.phase == "committed"],
                "#4's re-run to wait behind the pause", abort=first.poll)
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 0
        finally:
            first.kill()
    rows = ledger.experiments(store)
    assert rows[3].reason.startswith("re-running to decide")
    assert git_out(ws, "rev-parse", "HEAD") == rows[2].commit != rows[3].commit
    assert "VAL_BPB = [1.0, 1.01, 0.99]" in train.read_text() and git_out(ws, "status", "--porcelain") == ""
    send_command(ws, "resume", "cli:test")
    gates.open(5, 6)
    assert subprocess.run([*engine, "--max-experiments", "6"], capture_output=True, timeout=120).returncode == 0
    rows = ledger.experiments(store)
    assert [(e.kind, e.status, e.commit) for e in rows[4:]] == [("confirm", "discard", rows[3].commit),
                                                                ("confirm", "keep", rows[3].commit)]
    assert_consistent(settings)


def test_a_sigterm_while_the_agent_proposes_is_no_crash_and_the_next_start_proposes_again(tmp_path: Path) -> None:
    """`systemctl stop` or `restart` while the coding agent works (most of an agent night's time): the stop
    ended the proposal as 'proposer failed: the engine is stopping', recorded at the next start as a
    crash of its own (a 💥 digest, a failure in a row towards the self-pause). Nothing was proposed:
    the next start asks the agent again."""
    settings = make_stub_workspace(tmp_path)
    ws, pids = settings.workspace_path, tmp_path / "agent.pids"
    config = tmp_path / "nightlab.toml"

    def agent(*argv: str) -> None:
        config.write_text(
            f'[workspace]\npath = "{ws}"\ntag = "test"\n[project]\nrun_command = "{sys.executable} train.py"\n'
            "[loop]\ncheckpoint_interval = 0.1\nbaseline_runs = 1\nremeasure_every = 0\n[proposer]\nkind ="
            f' "agent"\n[proposer.agent]\ncommand = {json.dumps(shlex.join([sys.executable, *argv]))}\n')

    agent(str(FAKES / "agent_hang.py"), str(pids))
    engine = [sys.executable, "-m", "nightlab.loop.engine", "--config", str(config)]
    store = Store.for_workspace(ws)
    with open(tmp_path / "engine.log", "w") as log:
        first = subprocess.Popen(engine, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(pids.exists, "the agent to work on #2", abort=first.poll)
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 0
        finally:
            first.kill()
    assert [(c.number, c.phase) for c in ledger.open_candidates(store)] == [(2, "proposing")]
    assert git_out(ws, "status", "--porcelain") == ""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"set": {"VAL_BPB": "[0.9]"}, "describe": "VAL_BPB lower"}]))
    agent(str(FAKES / "agent_plan.py"), str(plan))
    assert subprocess.run([*engine, "--max-experiments", "2"], capture_output=True, timeout=120).returncode == 0
    assert [(e.number, e.status, e.description) for e in ledger.experiments(store)] == [
        (1, "keep", "baseline"), (2, "keep", "VAL_BPB lower")]
    assert_consistent(settings)
