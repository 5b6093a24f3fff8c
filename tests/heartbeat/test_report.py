"""`nightlab report` on the nights a user may wake up to: nothing yet, the baseline alone, crashes only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nightlab.heartbeat import cli
from nightlab.loop.state import ledger
from nightlab.loop.state.store import Store


def record(store: Store, kind: str, status: str, metric: float | None, reason: str) -> None:
    """One experiment as the engine records it (the fields the report reads)."""
    cand = ledger.new_candidate(store, kind, "base", description=kind)
    exp = ledger.Experiment(
        number=cand.number, kind=kind, confirm_of=None, commit="c0ffee", status=status, metric=metric,
        metrics={}, best=metric, confidence=None, description=kind, hypothesis="", area="", reason=reason,
        finished_at=time.time(),
    )
    ledger.record_experiment(store, cand.id, exp, {"number": cand.number, "status": status})


def report(tmp_path: Path, capsys: pytest.CaptureFixture[str], *rows: tuple[str, str, float | None, str]) -> str:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    for row in rows:
        record(store, *row)
    store.close()
    assert cli.main(["report", "--workspace", str(ws)]) == 0
    return capsys.readouterr().out


def test_an_empty_night(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report(tmp_path, capsys).splitlines()[-1] == "No experiments yet."


def test_a_night_of_crashes_says_there_is_no_result_and_what_to_run(tmp_path: Path, capsys) -> None:
    text = report(tmp_path, capsys, ("baseline", "crash", None, "exit code 2"),
                  ("baseline", "crash", None, "no val_bpb in the log"))
    # was a baseline, a best and a gain of "—", and "the baseline's runs ... measure the noise"
    assert "- no val_bpb yet: all 2 experiments failed before giving one (see What did not" \
           " work); `nightlab train --config FILE` runs one and shows all its output" in text
    assert "baseline val_bpb: —" not in text and "gain: —" not in text and "measure the noise" not in text
    assert "- #2 crash: baseline — no val_bpb in the log" in text


def test_the_baseline_alone_has_no_gain_yet(tmp_path: Path, capsys) -> None:
    text = report(tmp_path, capsys, ("baseline", "keep", 1.0, "baseline"))
    assert "- best val_bpb: 1.000000 (#1, `c0ffee`)" in text
    assert "- gain: none yet, the best is the baseline" in text  # was "+0.000000 ± 0.004243 (+0.00%, n = 1 vs 1)"
