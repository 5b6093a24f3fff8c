"""A metric an agent cannot fake (issue 18): a night with the real tiny trainer where a fake agent
tries each trick; the harness scores every run itself, so none is kept, each with a clear reason,
and an honest run scores exactly what the old in-process evaluate_bpb gives."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from nightlab.loop.engine import run_engine
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import settings_from_table
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import init_workspace

from tests.fakes.trick_agent import TrickAgent

ORDER = ["fake_print", "skip_eval", "targets_in_forward", "non_causal", "read_val_shard", "honest", "memorise_val"]
STEPS = 4  # enough for the baseline to learn more than a model trained on a leaked target
# every test reads the one night: under pytest-xdist they run on one worker, which runs the night once
pytestmark = pytest.mark.xdist_group("integrity-night")


@pytest.fixture(scope="module")
def night(tmp_path_factory, stdlib_data):
    root = tmp_path_factory.mktemp("integrity")
    settings = settings_from_table({
        "workspace": {"path": str(root / "ws"), "tag": "tricks"},
        "data": {"source": "stdlib", "cache_dir": str(stdlib_data[0])},  # prepared already: used as it is
        "trainer": {"profile": "tiny"},
        # two runs at a time, each trick decided as it ends: most of a tiny run is one core's work
        # (starting Python and torch, loading data, scoring)
        "executor": {"cpu_slots": 2},
        # one run per trick: this night is about scoring; a run's end is noticed within 0.1 s
        "loop": {"mode": "async", "baseline_runs": 1, "remeasure_every": 0, "checkpoint_interval": 0.1},
    })
    ws = init_workspace(settings.workspace_path, "tricks", settings, say=lambda _: None)
    ws.store.set("workspace.harness_env", {**ws.harness_env, "NIGHTLAB_BUDGET_STEPS": str(STEPS),
                                           "NIGHTLAB_EVAL_TOKENS": "2048"})
    assert run_engine(settings, 1 + len(ORDER), proposer=TrickAgent(ORDER)) == 0
    experiments = ledger.experiments(Store.for_workspace(ws.path))
    by_trick = {e.description.removeprefix("trick "): e for e in experiments if e.kind != "baseline"}
    baseline = next(e for e in experiments if e.kind == "baseline")
    return ws, baseline, by_trick, settings


def log_of(ws, number: int) -> str:
    return (ws.path / ".nightlab" / "runs" / f"{number}.log").read_text()


@pytest.mark.slow
def test_no_trick_is_kept(night):
    _, baseline, by_trick, _ = night
    assert baseline.status == "keep" and baseline.metric is not None
    assert sorted(by_trick) == sorted(ORDER)
    # memorising the scored rows does win on them: the second opinion is what shows it (below)
    assert [name for name, e in by_trick.items() if e.status == "keep"] == ["memorise_val"]


@pytest.mark.slow
def test_a_keep_whose_gain_vanishes_on_held_out_rows_is_suspect(night):
    ws, baseline, by_trick, _ = night
    e = by_trick["memorise_val"]
    assert e.metric < baseline.metric  # it trained on the validation rows
    assert "held-out slice 0:" in e.reason and "SUSPECT: the gain vanishes there" in e.reason, e.reason
    assert e.metrics["heldout_gain"] <= 0  # and so the report's table and /best say SUSPECT
    assert f"| {e.number} |" in views.report_markdown(ws.path) and " SUSPECT |" in views.report_markdown(ws.path)
    assert "SUSPECT" in views.best_text(ws.path)
    kept = ws.path / ".nightlab" / "artifacts"
    assert {p.name for p in kept.iterdir()} == {baseline.commit, e.commit}  # the models compared


@pytest.mark.slow
def test_a_printed_val_bpb_is_ignored_and_shown_beside(night):
    ws, baseline, by_trick, _ = night
    e = by_trick["fake_print"]
    assert e.metric == baseline.metric  # the harness's score of the same training, not 0.1
    assert e.metrics["claimed_val_bpb"] == pytest.approx(0.1)
    assert "train.py printed val_bpb 0.100000; ignored (DIFFERS" in log_of(ws, e.number)


@pytest.mark.slow
def test_skipping_the_save_is_rejected(night):
    e = night[2]["skip_eval"]
    assert e.status == "crash" and e.metric is None
    assert e.reason.startswith("rejected by the harness: train.py saved no trained model"), e.reason


@pytest.mark.slow
def test_a_forward_that_reads_targets_gains_nothing(night):
    _, baseline, by_trick, _ = night
    e = by_trick["targets_in_forward"]  # the harness never passes targets: the leak trained a worse model
    assert e.status == "discard" and e.metric > baseline.metric, (e.metric, baseline.metric)


@pytest.mark.slow
def test_a_model_that_looks_ahead_is_rejected(night):
    e = night[2]["non_causal"]
    assert e.status == "crash" and e.metric is None
    assert e.reason.startswith("rejected by the harness: not causal: changing the tokens after position"), e.reason


@pytest.mark.slow
def test_train_py_has_no_validation_data(night):
    ws, _, by_trick, _ = night
    e = by_trick["read_val_shard"]
    assert e.status == "crash" and e.metric is None
    assert "holds no validation data: train.py runs without it" in log_of(ws, e.number)


@pytest.mark.slow
def test_an_honest_run_scores_what_evaluate_bpb_gives(night, monkeypatch):
    """The harness's score of the honest run = the old in-process evaluate_bpb on the same weights."""
    ws, baseline, by_trick, settings = night
    e = by_trick["honest"]
    assert e.status == "discard" and e.metric == baseline.metric  # same training, same score
    from nightlab.trainer import prepare

    data_dir = prepare.prepare("stdlib", 1, settings.cache_path, progress=lambda _: None)
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 2048)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 256)
    artifact = ws.path / ".nightlab" / "artifacts" / baseline.commit  # the same training as the honest run
    monkeypatch.setitem(sys.modules, "prepare", prepare)
    spec = importlib.util.spec_from_file_location("harness", ws.path / "harness.py")
    harness = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "harness", harness)
    spec.loader.exec_module(harness)
    spec = importlib.util.spec_from_file_location("honest_train", artifact / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    import json

    harness.use_backend("sdpa")
    model = train.build_model(json.loads((artifact / "meta.json").read_text())["config"], torch.device("cpu"))
    model.load_state_dict(torch.load(artifact / "model.pt", weights_only=True))
    model.eval()
    tokenizer = prepare.Tokenizer.from_directory(data_dir / "tokenizer")
    old = prepare.evaluate_bpb(model, tokenizer, 4)
    assert old == pytest.approx(e.metric, abs=2e-6)
