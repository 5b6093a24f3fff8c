from __future__ import annotations

import math

from nightlab.loop.summary import parse_summary

UPSTREAM_BLOCK = """step 00953 (100.0%) | loss 3.1 | remaining 0s
---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
"""


def test_upstream_block() -> None:
    summary = parse_summary(UPSTREAM_BLOCK)
    assert summary.complete
    assert summary.get("val_bpb") == 0.9979
    assert summary.get("num_steps") == 953
    assert summary.get("depth") == 8


def test_metric_lines_win_and_count() -> None:
    summary = parse_summary(UPSTREAM_BLOCK + "METRIC val_bpb=0.99785\nMETRIC tokens_per_sec=1650000\n")
    assert summary.get("val_bpb") == 0.99785
    assert summary.get("tokens_per_sec") == 1_650_000
    assert parse_summary(UPSTREAM_BLOCK + "METRIC val_bpb=n/a\n").get("val_bpb") == 0.9979  # not a figure


def test_metric_only_log_is_complete() -> None:
    summary = parse_summary("hello\nMETRIC accuracy=0.91\n")
    assert summary.complete and summary.get("accuracy") == 0.91


def test_truncated_log_has_no_figures() -> None:
    summary = parse_summary("step 00010 | loss 5.0\nTraceback (most recent call last):\n")
    assert not summary.complete and summary.get("val_bpb") is None


def test_non_numeric_and_nan() -> None:
    summary = parse_summary("---\nval_bpb: nan\nmfu_percent: n/a\n")
    assert "mfu_percent" not in summary.metrics
    assert math.isnan(summary.metrics["val_bpb"])  # kept: the judge says "val_bpb is nan" (test_judge)


def test_only_last_separator_counts() -> None:
    summary = parse_summary("---\nval_bpb: 5.0\nlater output\n---\nval_bpb: 1.0\n")
    assert summary.get("val_bpb") == 1.0


def test_a_rejection_by_the_harness_is_kept_with_its_reason() -> None:
    from nightlab.loop.judge import Measurement, failure_reason

    log = "train.py| REJECTED: by train.py itself\nstep 1\nREJECTED: not causal: the model looks ahead\n"
    summary = parse_summary(log)
    assert summary.rejected == "not causal: the model looks ahead" and not summary.complete
    assert failure_reason(Measurement(3, None, summary, log), "val_bpb") == (
        "rejected by the harness: not causal: the model looks ahead")
    # a project's own output that happens to say REJECTED while succeeding is not a rejection
    ok = parse_summary("REJECTED: a line of the user's\n---\nval_bpb: 1.0\n")
    assert failure_reason(Measurement(0, None, ok, ""), "val_bpb") is None


def test_a_summary_after_progress_ended_by_a_carriage_return_is_read() -> None:
    """`print(f"epoch {e} loss {l}", end="\\r")` then `print("---")`: a project's own run (no score
    command) printed its block on the progress line, and every run crashed "no accuracy in the log"."""
    summary = parse_summary("epoch 1 loss 0.3\repoch 2 loss 0.1\r---\naccuracy: 0.91\n")
    assert summary.get("accuracy") == 0.91


def test_a_decimal_comma_is_no_number_and_a_thousands_comma_is() -> None:
    """`val_bpb: 0,85` (a locale's print) was read as 85.0, `1_0` as 10.0: a wrong figure, unsaid."""
    summary = parse_summary("---\nval_bpb: 0,85\nsteps: 1_0\ntokens: 1,650,000\nflops: -2,000.5e3\n")
    assert summary.metrics == {"tokens": 1_650_000, "flops": -2_000_500.0}
    assert summary.unreadable == {"val_bpb": "0,85", "steps": "1_0"}  # said as "not a number" (test_judge)
    assert parse_summary("METRIC val_bpb=0,5\n").get("val_bpb") is None


def test_a_summary_line_without_a_space_after_the_colon_is_read() -> None:
    """Upstream's `grep "^val_bpb:"` reads `val_bpb:0.9`; it was "no val_bpb in the log"."""
    assert parse_summary("---\nval_bpb:0.9\n").get("val_bpb") == 0.9
