from __future__ import annotations

import json
from pathlib import Path

from nightlab.loop import ledger
from nightlab.loop.ledger import Experiment
from nightlab.loop.store import Store


def _exp(number: int, status: str, metric: float | None, best: float | None) -> Experiment:
    return Experiment(
        number=number, kind="proposal", confirm_of=None, commit="abcdef1234567890", status=status,
        metric=metric, metrics={} if metric is None else {"val_bpb": metric, "peak_vram_mb": 2048.0},
        best=best, confidence=None, description=f"try\t{number}\nthing", hypothesis="h", area="lr",
        finished_at=1700000000.5,
    )


def test_experiment_is_recorded_exactly_once_with_its_event(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    cand = ledger.new_candidate(store, "proposal", "base")
    assert ledger.record_experiment(store, cand.id, _exp(cand.number, "keep", 0.9, 0.9), {"number": 1})
    assert not ledger.record_experiment(store, cand.id, _exp(cand.number, "keep", 0.9, 0.9), {"number": 1})
    assert [e.kind for e in store.events_after(0)] == ["experiment_finished"]
    assert ledger.get_candidate(store, cand.id).phase == "recorded"
    assert ledger.experiment_count(store) == 1


def test_kill_reason_first_one_wins_and_only_while_running(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    run = ledger.add_run(store, 1, "{}", "cpu0", "/x.log")
    assert [r.id for r in ledger.running_runs(store)] == [run.id]
    assert ledger.mark_kill(store, run.id, "timeout after 10m00s")
    assert not ledger.mark_kill(store, run.id, "killed by telegram:1")
    assert ledger.get_run(store, run.id).kill_reason == "timeout after 10m00s"
    ledger.finish_run(store, run.id, None)
    assert ledger.running_runs(store) == []
    assert not ledger.mark_kill(ledger.Store.for_workspace(tmp_path), run.id, "late")


def test_exports_follow_the_upstream_formats(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    for status, metric, best in (("keep", 0.9979, 0.9979), ("crash", None, 0.9979)):
        cand = ledger.new_candidate(store, "proposal", "base")
        ledger.record_experiment(store, cand.id, _exp(cand.number, status, metric, best), {})
    ledger.write_exports(tmp_path, store, "val_bpb", "minimize", "autoresearch/nov23")
    tsv = (tmp_path / "results.tsv").read_text().splitlines()
    assert tsv == [
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription",
        "abcdef1\t0.997900\t2.0\tkeep\ttry 1 thing",
        "abcdef1\t0.000000\t0.0\tcrash\ttry 2 thing",
    ]
    lines = [json.loads(x) for x in (tmp_path / "autoresearch.jsonl").read_text().splitlines()]
    assert lines[0] == {"type": "config", "name": "autoresearch/nov23", "metricName": "val_bpb",
                        "metricUnit": "", "bestDirection": "lower"}
    assert {k: lines[1][k] for k in ("run", "commit", "metric", "status", "timestamp", "segment")} == {
        "run": 1, "commit": "abcdef1", "metric": 0.9979, "status": "keep", "timestamp": 1700000000, "segment": 0}
    assert lines[1]["asi"]["hypothesis"] == "h" and lines[2]["metric"] is None
    assert not list(tmp_path.glob(".*.tmp"))
