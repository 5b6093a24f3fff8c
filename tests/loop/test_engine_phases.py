"""The engine's phases on their own: what a step reads, the settings a reload brings, the data the
daemon prepared, outcomes stored by an older nightlab, and a kill applied at a checkpoint."""

from __future__ import annotations

import dataclasses
import threading
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nightlab.heartbeat.daemon import Daemon, DaemonOptions
from nightlab.loop.engine import Engine, main
from nightlab.loop.engine.launching import free_slot
from nightlab.loop.engine.outcome import Outcome
from nightlab.loop.engine.proposing import best_for_proposers
from nightlab.loop.engine.startup import startup
from nightlab.loop.engine.steering import Control
from nightlab.loop.engine.streaks import without_a_keep
from nightlab.loop.executors import Slot
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.executors.slurm import SlurmExecutor, slurm_time
from nightlab.loop.proposers.base import ProposalContext
from nightlab.loop.proposers.search import SearchProposer
from nightlab.loop.state import ledger
from nightlab.loop.state.config import LIVE_HEARTBEAT_KEY, load_settings
from nightlab.loop.state.ledger import Experiment
from nightlab.loop.state.steering import send_command
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import open_workspace
from nightlab.trainer.prepare import source_id

from tests.fakes.loop_workspace import make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer


class _Unprobed(LocalExecutor):
    """Two local slots whose hardware is not probed ahead (as a cluster's): a pin to a class
    finds its slot by the runs recorded there."""

    def slots(self) -> list[Slot]:
        return [Slot("cpu0", None, ""), Slot("cpu1", None, "")]


def _engine(settings: Any, executor: Any) -> Engine:
    ws = open_workspace(settings.workspace_path, settings)
    return Engine(settings, ws, executor, ScriptedProposer([]), {}, threading.Event())


def _experiment(number: int, slot: str, hardware: str) -> Experiment:
    return Experiment(
        number=number, kind="baseline", confirm_of=None, commit="c" * 40, status="keep", metric=1.0, metrics={},
        best=1.0, confidence=None, description="baseline", hypothesis="", area="", params={}, focus=None,
        reason="", lines_added=0, lines_removed=0, duration_s=1.0, slot=slot, started_at=0.0, finished_at=1.0,
        hardware=hardware, setting="s",
    )


def test_a_pinned_candidate_finds_its_slot_without_reading_the_experiments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_stub_workspace(tmp_path)
    engine = _engine(settings, _Unprobed(gpus=(), cpu_slots=2))
    store = engine.store
    cand = ledger.new_candidate(store, "proposal", "b" * 40)
    ledger.record_experiment(store, cand.id, _experiment(cand.number, "cpu1", "H100"), {})
    engine.ctx.learn(ledger.experiments(store))  # as startup does, and each record after it
    pinned = ledger.new_candidate(store, "baseline", "b" * 40, commit="b" * 40, phase="committed",
                                  pin={"hardware": "H100", "node": ""})
    reads: list[int] = []
    real = ledger.experiments
    monkeypatch.setattr(ledger, "experiments", lambda *a, **k: reads.append(1) or real(*a, **k))
    for _ in range(3):  # a step while the pinned run waits for its slot, again and again
        slot = free_slot(engine.ctx, pinned)
    assert slot is not None and slot.name == "cpu1"
    assert reads == []


def test_a_sighup_reload_reaches_the_engine_and_slurms_time_limit(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path, heartbeat={"run_timeout": 600.0})
    slurm = SlurmExecutor(settings.executor.slurm, settings.heartbeat.run_timeout)
    engine = _engine(settings, slurm)
    margin = settings.executor.slurm.time_margin
    assert slurm.time_limit == slurm_time(600.0 + margin)
    # what the daemon publishes on SIGHUP (heartbeat/daemon.py); the engine applies it at a checkpoint
    live = dataclasses.replace(settings.heartbeat, run_timeout=1200.0)
    engine.store.set(LIVE_HEARTBEAT_KEY, dataclasses.asdict(live))
    engine.checkpoint()
    assert engine.ctx.settings.heartbeat.run_timeout == 1200.0  # the checks command's timeout too
    assert slurm.time_limit == slurm_time(1200.0 + margin)


def test_the_engine_uses_the_data_the_daemon_prepared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"  # a local source: two tiny parquet shards
    shards.mkdir()
    text = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(400)]
    for i in range(2):
        pq.write_table(pa.table({"text": text[i::2]}), shards / f"shard_{i:05d}.parquet")
    config = tmp_path / "night.toml"
    config.write_text(f'[data]\nsource = "{shards}"\nshards = 1\ncache_dir = "{tmp_path / "cache"}"\n'
                      f'[workspace]\npath = "{tmp_path / "ws"}"\ntag = "t"\n')
    daemon = Daemon(load_settings(config), DaemonOptions(max_experiments=0))
    status = types.SimpleNamespace(startup_status="")  # the heartbeat's only part these steps touch
    daemon._init_workspace(status)  # type: ignore[arg-type]
    assert daemon._prepare_data(status)  # type: ignore[arg-type]
    argv = daemon._engine_argv()
    assert argv[argv.index("--prepared-data") + 1] == str(tmp_path / "cache" / source_id(str(shards)))
    shards.rename(tmp_path / "gone")  # preparing the source again would fail now
    # standalone, the engine prepares the data itself
    assert main(["--config", str(config), "--max-experiments", "0"]) == 2
    assert f"data source {str(shards)!r} is not a directory" in capsys.readouterr().err
    # started by the daemon: the data dir it prepared is used as it is
    assert main(argv[argv.index("--config"):]) == 0


def test_an_outcome_stored_by_an_older_nightlab_reads_with_defaults() -> None:
    # the dict an older engine stored for a candidate that ended before any run, undecided
    old = {"status": "crash", "metric": None, "metrics": {}, "best_after": 1.0, "reason": "proposer failed: x",
           "confidence": None, "needs_confirm": False, "duration_s": None, "started_at": None,
           "finished_at": 5.0, "log_tail": "", "slot": "", "kind": "proposal"}
    out = Outcome.from_json(old)
    assert (out.status, out.hardware, out.compared, out.decided, out.moves_head) == ("crash", "", True, False, False)
    assert Outcome.from_json({**old, "head_after": "abc"}).decided
    assert Outcome.from_json(out.to_json()) == out


def test_a_run_the_data_failed_is_no_miss_of_the_search(tmp_path: Path) -> None:
    """Runs without a keep turn the search to other areas (and are said in chat): a change a damaged
    shard failed counted as one, though it runs again."""
    base = _experiment(1, "gpu0", "h")
    change = dataclasses.replace(base, kind="proposal", status="discard", description="x", reason="not better")
    rows = [base, dataclasses.replace(change, number=2),
            dataclasses.replace(change, number=3, status="crash", metric=None, reason="data problem: shard damaged")]
    assert without_a_keep(Store.for_workspace(tmp_path), rows) == 1


def test_a_kill_marks_the_run_of_that_number_only(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    first, second = (ledger.new_candidate(store, "proposal", "base") for _ in range(2))
    runs = [ledger.add_run(store, c.id, "{}", "cpu0", f"/{c.number}.log") for c in (first, second)]
    control = Control(store)
    assert control.running_numbers() == [first.number, second.number]
    assert control.kill(second.number, "killed by cli:me") and not control.kill(99, "killed by cli:me")
    assert [ledger.get_run(store, r.id).kill_reason for r in runs] == [None, "killed by cli:me"]


def test_a_loop_restarted_while_paused_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A loop that paused itself (failures, restarts) and is started again sits idle: the log says
    why and how to resume, instead of nothing at all."""
    settings = make_stub_workspace(tmp_path)
    engine = _engine(settings, LocalExecutor(gpus=(), cpu_slots=1))
    ledger.set_paused(engine.store, "engine", "3 restarts within an hour", None)
    startup(engine.ctx)
    err = capsys.readouterr().err
    assert "the loop is paused (since " in err and "by engine: 3 restarts within an hour); nothing new starts" in err
    assert f"`nightlab ctl --config {settings.origin} resume`" in err
    # `nightlab ctl resume` while it was down: applied next, so not "nothing new starts until resume"
    send_command(settings.workspace_path, "resume", "cli:me")
    startup(engine.ctx)
    assert "the loop is paused" not in capsys.readouterr().err


def test_the_proposers_best_is_the_current_best_s_value_on_its_own_gpu_and_setting(tmp_path: Path) -> None:
    """An H100 and an A100 (val_bpb 0.04 higher there): #3 was kept on the H100 and the A100
    re-measured its commit (#4). The search quoted the A100's value as the best to beat on the
    H100, "(val_bpb 1.01, #3)"; it is the H100's, and after a budget change the new setting's."""
    def run(number: int, kind: str, commit: str, metric: float, hardware: str, setting: str = "s") -> Experiment:
        return dataclasses.replace(_experiment(number, "gpu0", hardware), kind=kind, commit=commit * 40, metric=metric,
                                   best=metric, setting=setting, description="A 1.0→2.0" if kind == "proposal" else "")

    rows = [run(1, "baseline", "a", 0.98, "H100"), run(2, "baseline", "a", 1.02, "A100"),
            run(3, "proposal", "b", 0.97, "H100"), run(4, "baseline", "b", 1.01, "A100")]
    best = best_for_proposers(rows, "s")
    assert best is not None and (best.number, best.metric, best.group) == (3, 0.97, "H100|s")
    (tmp_path / "train.py").write_text("A = 2.0\nB = 1.0\n")
    ctx = ProposalContext(workspace=tmp_path, editable=("train.py",), metric_name="val_bpb", direction="minimize",
                          best=best, history=(), focus=None, notes=(),
                          consecutive_failures=0, last_crash_log="")
    assert "than the best (val_bpb 0.97, #3)" in SearchProposer().propose(ctx).hypothesis
    later = best_for_proposers([*rows, run(5, "baseline", "b", 0.95, "H100", setting="t")], "t")
    assert later is not None and (later.number, later.metric) == (5, 0.95)
    assert (best.hardware, best.older_setting, later.older_setting) == ("H100", False, False)
    # the budget changed at a start and nothing ran on it yet: the best quoted is the old setting's
    stale = best_for_proposers(rows, "t")
    assert stale is not None and stale.older_setting
