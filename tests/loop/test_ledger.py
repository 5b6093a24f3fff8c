from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from nightlab.loop.state import ledger
from nightlab.loop.state.ledger import Experiment
from nightlab.loop.state.store import Store


def _exp(number: int, status: str, metric: float | None, best: float | None, reason: str = "") -> Experiment:
    return Experiment(
        number=number, kind="proposal", confirm_of=None, commit="abcdef1234567890", status=status,
        metric=metric, metrics={} if metric is None else {"val_bpb": metric, "peak_vram_mb": 2048.0},
        best=best, confidence=None, description=f"try\t{number}\nthing", hypothesis="h", area="lr",
        finished_at=1700000000.5, reason=reason,
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
    assert lines[1]["asi"]["hypothesis"] == "h" and lines[2]["metric"] == 0
    assert not list(tmp_path.glob(".*.tmp"))


# -- readers written from the formats (not from our writer) ---------------------------------------
def read_results_tsv(path: Path) -> list[dict[str, Any]]:
    """Upstream's results.tsv as its analysis notebook reads it: five tab-separated columns, status
    keep | discard | crash; every row that is not a crash is plotted as a measurement. program.md:
    a crash row has val_bpb 0.000000 and memory_gb 0.0."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        assert list(row) == ["commit", "val_bpb", "memory_gb", "status", "description"]
        assert row["status"] in ("keep", "discard", "crash"), row
        row["val_bpb"], row["memory_gb"] = float(row["val_bpb"]), float(row["memory_gb"])
        if row["status"] == "crash":
            assert (row["val_bpb"], row["memory_gb"]) == (0.0, 0.0), row
    return rows


def read_autoresearch_jsonl(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """autoresearch.jsonl as the plugins read it (pi-autoresearch's jsonl.ts): a config header,
    then run entries with a numeric `metric` ("0 for crashes"), status keep | discard | crash |
    checks_failed, numeric secondary metrics, confidence a number or null."""
    entries = [json.loads(line) for line in path.read_text().splitlines() if line]
    header, runs = entries[0], entries[1:]
    assert header["type"] == "config" and header["bestDirection"] in ("lower", "higher")
    for run in runs:
        assert isinstance(run["run"], int) and isinstance(run["commit"], str)
        assert type(run["metric"]) in (int, float), run  # null is not a metric
        assert run["status"] in ("keep", "discard", "crash", "checks_failed"), run
        assert all(type(v) in (int, float) for v in run["metrics"].values())
        assert run["confidence"] is None or type(run["confidence"]) in (int, float)
        if run["status"] == "crash":
            assert run["metric"] == 0, run
    return header, runs


def test_runs_without_a_metric_never_read_as_measurements(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    night = [
        _exp(0, "keep", 0.9979, 0.9979),
        _exp(0, "discard", None, 0.9979, reason="killed by telegram:7"),  # a user's kill
        _exp(0, "crash", None, 0.9979, reason="exit code 1"),
        _exp(0, "discard", None, 0.9979, reason="the proposal changed nothing"),
        _exp(0, "checks_failed", 0.9901, 0.9979, reason="checks failed"),
        _exp(0, "discard", 1.0102, 0.9979, reason="worse"),
    ]
    for e in night:
        cand = ledger.new_candidate(store, "proposal", "base")
        ledger.record_experiment(store, cand.id, dataclasses.replace(e, number=cand.number), {})
    ledger.write_exports(tmp_path, store, "val_bpb", "minimize", "autoresearch/nov23")

    rows = read_results_tsv(tmp_path / "results.tsv")
    assert [r["status"] for r in rows] == ["keep", "crash", "crash", "crash", "discard", "discard"]
    measured = [r["val_bpb"] for r in rows if r["status"] != "crash"]  # the notebook's `valid`
    assert measured == [0.9979, 0.9901, 1.0102]
    assert rows[1]["description"] == "try 0 thing (killed by telegram:7)"

    _, runs = read_autoresearch_jsonl(tmp_path / "autoresearch.jsonl")
    assert [(r["status"], r["metric"]) for r in runs] == [
        ("keep", 0.9979), ("crash", 0), ("crash", 0), ("crash", 0), ("checks_failed", 0.9901), ("discard", 1.0102)]
    assert [r["asi"]["status"] for r in runs][:2] == ["keep", "discard"]  # what nightlab decided
    assert runs[1]["asi"]["reason"] == "killed by telegram:7"
