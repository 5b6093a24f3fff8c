"""Hardware classes: results are compared only within one GPU model and setting, with a
baseline per class. The machine's GPUs are faked by tests/fakes/bin/nvidia-smi (the `fake_gpus`
fixture) and the stub trainer scores worse on the slower model ($NIGHTLAB_STUB_OFFSETS)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.executors import RunSpec, Slot
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.executors.slurm import SlurmExecutor
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import SlurmSettings
from nightlab.loop.state.ledger import AUTORESEARCH_JSONL
from nightlab.loop.state.store import Store

from tests.fakes.loop_workspace import git_out, make_stub_workspace
from tests.loop.test_engine import assert_consistent
from tests.loop.test_waves import WaveProposer

H100 = "NVIDIA H100 80GB HBM3"
RTX = "NVIDIA GeForce RTX 4090"


@pytest.fixture
def mixed_box(fake_gpus, monkeypatch: pytest.MonkeyPatch):
    def install(names: list[str]) -> None:
        fake_gpus(names)
        monkeypatch.setenv("NIGHTLAB_STUB_OFFSETS", json.dumps({RTX: 0.5}))  # the 4090 scores 0.5 worse

    return install


def _table(rows: list[ledger.Experiment]) -> list[tuple[Any, ...]]:
    return [(e.number, e.kind, e.status, e.metric, e.hardware) for e in rows]


def test_each_class_gets_a_baseline_and_results_are_judged_within_their_class(tmp_path: Path, mixed_box) -> None:
    mixed_box([H100, H100, RTX])
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1, 2]})
    repo = settings.workspace_path
    steps = [{"set": {"VAL_BPB": [v], "SLEEP": 1.0}} for v in (0.95, 0.9, 0.97, 0.85, 1.2)]
    assert run_engine(settings, 8, proposer=WaveProposer(steps)) == 0
    store = Store.for_workspace(repo)
    rows = ledger.experiments(store)
    assert _table(rows) == [
        (1, "baseline", "keep", 1.0, H100),  # the first class's baseline ...
        (2, "baseline", "keep", 1.5, RTX),  # ... and one on the other class, in the same wave
        (3, "proposal", "discard", 0.95, H100),
        (4, "proposal", "keep", 0.9, H100),  # the largest gain over its own class's baseline
        # 1.47 is worse than the H100 best but better than the 4090's 1.5: a contender, beaten
        (5, "proposal", "discard", 1.47, RTX),
        (6, "baseline", "keep", 1.4, RTX),  # the new best commit re-measured on the 4090 first
        (7, "proposal", "keep", 0.85, H100),
        (8, "proposal", "discard", 1.2, H100),
    ]
    assert rows[4].reason == "beaten in its wave by #4 (0.900000)" and rows[4].best == 1.5
    assert [e.slot for e in rows[:2]] == ["gpu0", "gpu2"] and rows[5].slot == "gpu2"
    assert rows[1].description == f"baseline on {RTX}" and rows[5].commit == rows[3].commit
    assert [e.best for e in rows] == [1.0, 1.5, 1.0, 0.9, 1.5, 1.4, 0.85, 0.85]
    finished = {e.payload["number"]: e.payload for e in store.events_after(0, 10_000) if e.kind == "experiment_finished"}
    assert finished[6]["new_best"] is False and finished[6]["hardware"] == RTX  # a reference, not a gain
    assert finished[4]["new_best"] is True and finished[4]["previous_best"] == 1.0
    # the export keeps the classes apart: autoresearch.jsonl's segment is the class
    lines = [json.loads(line) for line in (repo / AUTORESEARCH_JSONL).read_text().splitlines()[1:]]
    assert [r["segment"] for r in lines] == [0, 1, 0, 0, 1, 1, 0, 0]
    assert lines[0]["asi"]["hardware"] == H100
    assert len({e.setting for e in rows}) == 1 and rows[0].setting
    # what people read: the best on its class, and every class's best commit as measured there
    assert views.best_text(repo).splitlines()[0].startswith("best val_bpb: 0.850000 — #7")
    assert f"measured on: {H100}" in views.best_text(repo)
    assert f"per hardware: {RTX} 1.400000 ({rows[3].commit[:7]}) · {H100} 0.850000 ({rows[6].commit[:7]})" \
        in views.status_text(repo)
    # a gain is positive when better (issue 14, item 13), with its standard error
    assert "vs baseline +0.150000 ± 0.003606 (+15.00%, n = 1 vs 1; ± from loop.noise_prior: no run repeated yet to measure the noise; not confirmed yet" in views.status_text(repo)
    assert git_out(repo, "rev-list", "--first-parent", "HEAD").splitlines()[:3] == [
        rows[6].commit, rows[3].commit, rows[0].commit]
    assert_consistent(settings)


class UnprobedExecutor(LocalExecutor):
    """Slots whose hardware is known only once a run reports it, as on a cluster."""

    def slots(self) -> list[Slot]:
        return [Slot("gpu1", 1), Slot("gpu0", 0)]


def test_a_result_on_a_class_without_a_baseline_is_not_compared_and_a_baseline_follows(
        tmp_path: Path, mixed_box) -> None:
    mixed_box([H100, RTX])
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1]})
    steps = [{"set": {"VAL_BPB": [v], "SLEEP": 1.0}} for v in (0.95, 0.9, 0.97)]
    assert run_engine(settings, 5, proposer=WaveProposer(steps), executor=UnprobedExecutor()) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert _table(rows) == [
        (1, "baseline", "keep", 1.5, RTX),
        (2, "proposal", "keep", 1.45, RTX),
        (3, "proposal", "discard", 0.9, H100),  # far below 1.5, but measured on another GPU model
        (4, "baseline", "keep", 0.95, H100),  # the best commit measured where #3 ran (learned: gpu0)
        (5, "proposal", "discard", 1.47, RTX),
    ]
    assert rows[2].reason.startswith(f"not compared: {H100} has no measurement of {rows[0].commit[:7]} (it has nothing yet)")
    assert "measuring the best commit there first" in rows[2].reason and rows[2].best is None
    assert rows[3].description == f"baseline on {H100}" and rows[3].slot == "gpu0"
    assert rows[4].reason.startswith("not better: worse by 0.0200 ± ")
    assert_consistent(settings)


def test_a_confirm_run_is_pinned_to_the_class_of_the_result_it_repeats(
        tmp_path: Path, mixed_box, monkeypatch: pytest.MonkeyPatch) -> None:
    mixed_box([H100, RTX])
    monkeypatch.setenv("NIGHTLAB_STUB_COUNTS", str(tmp_path))  # the n-th run of a content, in any snapshot
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1]}, loop={"baseline_runs": 2})
    steps = [{"set": {"VAL_BPB": [1.005, 0.99], "SLEEP": 0.2}}, {"set": {"VAL_BPB": [1.3]}}]
    # the baseline repeats give 1.0 and 1.02 (noise ~0.015): a 0.005 gain must be confirmed
    (settings.workspace_path / "train.py").write_text(
        (settings.workspace_path / "train.py").read_text().replace("VAL_BPB = [1.0]", "VAL_BPB = [1.0, 1.02]"))
    git_out(settings.workspace_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "noisy")
    assert run_engine(settings, 7, proposer=WaveProposer(steps)) == 0
    store = Store.for_workspace(settings.workspace_path)
    rows = ledger.experiments(store)
    confirms = [e for e in rows if e.kind == "confirm"]
    original = next(e for e in rows if e.number == confirms[0].confirm_of)
    assert [e.hardware for e in rows if e.kind == "baseline"][:2] == [H100, H100]  # repeats on one class
    assert original.reason.startswith("re-running to decide: better by 0.0050 ± ")
    assert {e.hardware for e in confirms} == {original.hardware} == {H100}
    assert all(ledger.get_candidate(store, e.number).pin == {"hardware": H100, "node": ""} for e in confirms)
    # n = 2 vs 2 and still undecided: the best is re-measured too, on the same class, before the 3rd run
    remeasure = next(e for e in rows if e.description == f"re-measure the best for #{original.number}")
    assert remeasure.hardware == H100 and remeasure.number < confirms[-1].number
    assert confirms[-1].status == "keep" and confirms[-1].reason.startswith("better by 0.0183 ± ")
    assert confirms[-1].reason.endswith("(n = 3 vs 3)")


def test_a_pinned_slurm_run_asks_for_its_node_after_the_users_flags(tmp_path: Path) -> None:
    ex = SlurmExecutor(SlurmSettings(shared_dir=str(tmp_path), extra_args=("--nodelist=a",)), 600)
    spec = RunSpec("true", tmp_path, tmp_path / "1.log", Slot("slurm0"), {}, node="gpu-node-7")
    args = ex.sbatch_args(spec, tmp_path / "1.sbatch")
    assert args[-3:] == ["--nodelist=a", "--nodelist=gpu-node-7", str(tmp_path / "1.sbatch")]
    unpinned = ex.sbatch_args(RunSpec("true", tmp_path, tmp_path / "2.log", Slot("slurm0")), tmp_path / "2.sbatch")
    assert [a for a in unpinned if a.startswith("--nodelist")] == ["--nodelist=a"]


def test_a_moved_workspace_keeps_its_setting(tmp_path: Path) -> None:
    """The compile caches live in the workspace and the data dir in the data cache: moving either
    changed the setting's digest, so every result after a move was judged as another setting (the
    best re-measured, the night's noise and history split in two)."""
    from nightlab.loop.hardware import record_setting

    store = Store.for_workspace(tmp_path)

    def env(workspace: str, cache: str, budget: str = "300") -> dict[str, str]:
        return {"TORCHINDUCTOR_CACHE_DIR": f"{workspace}/.nightlab/compile-cache/inductor",
                "TRITON_CACHE_DIR": f"{workspace}/.nightlab/compile-cache/triton",
                "NIGHTLAB_DATA_DIR": f"{cache}/climbmix-10", "NIGHTLAB_TIME_BUDGET": budget}

    before = record_setting(store, "python prepare.py run", env("/home/a/ws", "/home/a/.cache/nightlab"))
    assert record_setting(store, "python prepare.py run", env("/data/ws", "/data/cache")) == before
    assert record_setting(store, "python prepare.py run", env("/data/ws", "/data/cache", budget="600")) != before
    other_data = {**env("/data/ws", "/data/cache"), "NIGHTLAB_DATA_DIR": "/data/cache/stdlib-1"}
    assert record_setting(store, "python prepare.py run", other_data) != before


def test_the_harness_score_version_is_a_setting_but_leaves_older_digests_as_they_were(tmp_path: Path) -> None:
    """A workspace whose harness declares no SCORE_VERSION (every copy an older nightlab made) keeps
    the digest its experiments were recorded with: a new nightlab re-classes nothing that did not
    change. A declared version is part of the setting, also for a moved workspace."""
    from nightlab.loop.hardware import record_setting, scorer_of, setting_of

    env = {"NIGHTLAB_TIME_BUDGET": "300"}
    assert setting_of("python prepare.py run", env) == "715e920b"  # as an older nightlab computed it
    store = Store.for_workspace(tmp_path)
    legacy = record_setting(store, "python prepare.py run", env)
    assert legacy == "715e920b" and scorer_of(store, legacy) == ""
    declared = record_setting(store, "python prepare.py run", env, "1")
    assert declared != legacy and scorer_of(store, declared) == "1"
    assert record_setting(store, "python prepare.py run", env, "2") not in (legacy, declared)


def test_the_metric_is_a_setting_and_one_recorded_before_it_counted_takes_the_configs(tmp_path: Path) -> None:
    """The default metric leaves the digest as it was; another is a new setting. A setting an older
    nightlab recorded (no goal) takes the config's as its own: upgrading re-measures nothing, and a
    later change of the metric is still a new setting."""
    from nightlab.loop.hardware import SETTING_KEY, goal_of, record_setting, setting_changes, setting_of

    env = {"NIGHTLAB_TIME_BUDGET": "300"}
    assert setting_of("python prepare.py run", env, goal=goal_of("val_bpb", "minimize")) == "715e920b"
    store = Store.for_workspace(tmp_path)
    legacy = setting_of("python fit.py", env)
    store.set(SETTING_KEY + legacy, {"command": "python fit.py", "env": env})  # as an older nightlab wrote it
    accuracy = goal_of("accuracy", "maximize")
    assert record_setting(store, "python fit.py", env, goal=accuracy) == legacy
    assert record_setting(store, "python fit.py", env, goal=accuracy) == legacy
    loss = record_setting(store, "python fit.py", env, goal=goal_of("loss", "minimize"))
    assert loss != legacy
    assert setting_changes(store, legacy, loss) == ["the metric accuracy maximize -> loss minimize"]


def test_a_class_baseline_recorded_after_a_keep_does_not_take_the_best_back(tmp_path: Path) -> None:
    """Results are recorded as they end (the asynchronous mode): a second class's baseline of the
    commit before a keep can be recorded after the keep; it re-measures that commit there, it is not
    a commit of the user's the loop goes on from, so the best stays the keep."""
    store = Store.for_workspace(tmp_path)

    def record(kind: str, commit: str, metric: float, hw: str) -> None:
        cand = ledger.new_candidate(store, kind, "a", commit=commit, description=f"{kind} {commit}")
        ledger.record_experiment(store, cand.id, ledger.Experiment(
            number=cand.number, kind=kind, confirm_of=None, commit=commit, status="keep", metric=metric,
            metrics={}, best=metric, confidence=None, description=f"{kind} {commit}", hypothesis="", area="",
            hardware=hw, setting="s1"), {"number": cand.number})

    record("baseline", "a", 1.0, H100)
    record("proposal", "x", 0.9, H100)
    record("baseline", "a", 1.1, "NVIDIA A100-SXM4-80GB")  # in flight on the other class during the keep
    assert views.best_text(tmp_path).startswith("best val_bpb: 0.900000 — #2 x: proposal x")


def test_a_changed_run_command_is_said_with_both_commands(tmp_path: Path) -> None:
    """The built-in trainer's run command is the interpreter nightlab runs under: a virtualenv made
    again elsewhere changes it with no edit of the config, and 'the run command changed' left the owner
    wondering which (they never set one)."""
    from nightlab.loop.hardware import record_setting, setting_changes

    store = Store.for_workspace(tmp_path)
    old = record_setting(store, "/old/venv/bin/python3 prepare.py run", {})
    new = record_setting(store, "/new/venv/bin/python3 prepare.py run", {})
    assert setting_changes(store, old, new) == [
        "the run command `/old/venv/bin/python3 prepare.py run` -> `/new/venv/bin/python3 prepare.py run`"]


def test_a_tiny_night_given_seconds_is_said_as_its_budget_changing_from_steps_to_seconds(tmp_path: Path) -> None:
    """`trainer.time_budget = 5` on the tiny profile was said as "budget_steps 40 -> default,
    time_budget 15 -> 5": a 15 s budget nobody set or saw (the profile's, not in force under its 40
    steps), and "default" for no step budget at all. The budget in force before and after is said."""
    from nightlab.loop.hardware import record_setting, setting_changes

    store = Store.for_workspace(tmp_path)
    steps = record_setting(store, "python prepare.py run", {"NIGHTLAB_BUDGET_STEPS": "40", "NIGHTLAB_TIME_BUDGET": "15"})
    seconds = record_setting(store, "python prepare.py run", {"NIGHTLAB_TIME_BUDGET": "5"})
    assert setting_changes(store, steps, seconds) == ["the budget 40 steps -> 5 s"]
    assert setting_changes(store, seconds, steps) == ["the budget 5 s -> 40 steps"]
    more = record_setting(store, "python prepare.py run", {"NIGHTLAB_BUDGET_STEPS": "80", "NIGHTLAB_TIME_BUDGET": "15"})
    assert setting_changes(store, steps, more) == ["budget_steps 40 -> 80"]


def test_the_first_baselines_run_on_every_slot_of_the_first_class_not_on_baseline_runs_of_them(
        tmp_path: Path, mixed_box) -> None:
    """Four H100s and baseline_runs = 2: the first wave ran two baselines while two GPUs waited for
    them; it now runs one on each (more runs of the noise in the same time), then proposals."""
    mixed_box([H100, H100, H100, H100])
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1, 2, 3]}, loop={"baseline_runs": 2})
    steps = [{"set": {"VAL_BPB": [v]}} for v in (0.95, 0.97, 0.99, 1.2)]
    assert run_engine(settings, 6, proposer=WaveProposer(steps)) == 0
    rows = ledger.experiments(Store.for_workspace(settings.workspace_path))
    assert [(e.kind, e.hardware) for e in rows[:4]] == [("baseline", H100)] * 4
    assert sorted(e.description for e in rows[:4]) == [f"baseline {n}/4" for n in range(1, 5)]
    assert {e.slot for e in rows[:4]} == {"gpu0", "gpu1", "gpu2", "gpu3"}  # at once, one on each
    assert [e.kind for e in rows[4:]] == ["proposal", "proposal"]
    assert_consistent(settings)
