"""One short session with the real built-in trainer (tiny CPU profile, offline stdlib data)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.state import ledger
from nightlab.loop.state.config import settings_from_table
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import init_workspace

from tests.fakes.loop_workspace import git_out
from tests.fakes.scripted_proposer import ScriptedProposer

TRAINER = Path(__file__).resolve().parents[2] / "trainer"


def test_baseline_with_the_real_tiny_trainer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            stdlib_data: tuple[Path, Path]) -> None:
    if not all((TRAINER / name).exists() for name in ("train.py", "prepare.py", "profiles.py")):
        pytest.skip("the built-in trainer (trainer/train.py, prepare.py, profiles.py) is not there yet")
    settings = settings_from_table({
        "workspace": {"path": str(tmp_path / "ws"), "tag": "tiny"},
        # the session's stdlib data (its tokenizer trained on less text): this night needs no other
        "data": {"source": "stdlib", "cache_dir": str(stdlib_data[0])},
        "trainer": {"profile": "tiny"},
    })
    ws = init_workspace(settings.workspace_path, "tiny", settings, say=lambda _: None)
    # Shorter than the tiny profile (40 steps, 8K eval tokens): this test proves the plumbing.
    ws.store.set("workspace.harness_env", {**ws.harness_env, "NIGHTLAB_BUDGET_STEPS": "5", "NIGHTLAB_EVAL_TOKENS": "2048"})
    from nightlab.trainer import prepare

    prepare.prepare("stdlib", 1, settings.cache_path, lambda _: None)  # as the daemon does before the engine
    capsys.readouterr()
    assert run_engine(settings, 1, proposer=ScriptedProposer([{"noop": True}])) == 0
    engine_lines = capsys.readouterr().err.splitlines()
    # The daemon says the data is there before it starts the engine: the engine does not repeat it.
    assert not [line for line in engine_lines if "present" in line], engine_lines
    # Its lines carry a time, like the daemon's log lines beside them.
    assert engine_lines and all(re.match(r"\d\d:\d\d:\d\d nightlab engine: ", line)
                                for line in engine_lines if "nightlab engine" in line), engine_lines
    (exp,) = ledger.experiments(Store.for_workspace(ws.path))
    assert exp.status == "keep", exp.reason
    assert exp.metric is not None and math.isfinite(exp.metric) and exp.metrics["depth"] == 2
    assert (ws.path / "results.tsv").read_text().splitlines()[1].split("\t")[3] == "keep"
    assert git_out(ws.path, "status", "--porcelain") == ""
