from __future__ import annotations

import math
import random
import re

import pytest
from nightlab.loop.decision import Rule, decide
from nightlab.loop.judge import Measurement, failure_reason, judge
from nightlab.loop.state.config import ConfigError, settings_from_table
from nightlab.loop.state.stats import Noise, pooled_noise
from nightlab.loop.summary import Summary, parse_summary


def _m(value: float | None = None, exit_code: int | None = 0, kill: str | None = None, tail: str = "") -> Measurement:
    metrics = {} if value is None else {"val_bpb": value}
    return Measurement(exit_code, kill, Summary(metrics), tail)


NOISE = Noise(0.01, 4)
RULE = Rule(z=2.0, max_runs=3, prior_sd=0.01)


def _judge(m: Measurement, kind: str = "proposal", best: list[float] | None = None, earlier: list[float] | None = None,
           direction: str = "minimize", noise: Noise = NOISE):
    return judge(m, kind=kind, metric_name="val_bpb", direction=direction, earlier=earlier or [],
                 incumbent=[1.0] if best is None else best, noise=noise, rule=RULE)


@pytest.mark.parametrize(
    ("m", "status", "reason"),
    [
        (_m(0.9), "keep", "better by 0.1000 ± 0.0141 (n = 1 vs 1)"),
        (_m(1.0), "discard", "not better: the same to 4 decimals ± 0.0141 (n = 1 vs 1)"),
        (_m(1.1), "discard", "not better: worse by 0.1000 ± 0.0141 (n = 1 vs 1)"),
        (_m(float("nan")), "crash", "val_bpb is nan"),
        (_m(0.9, exit_code=3), "crash", "exit code 3"),
        (_m(None, exit_code=1, tail="torch.OutOfMemoryError: CUDA out of memory."), "crash", "OOM (exit code 1): torch.OutOfMemoryError: CUDA out of memory."),
        (_m(None, exit_code=1, tail="Traceback ...\nFAIL: data: /d/shard_00001.parquet is damaged (ZSTD ...); replace"
                                    " it\nFAIL: the training command exited with code 1"),
         "crash", "data problem: /d/shard_00001.parquet is damaged (ZSTD ...); replace it"),
        (_m(None), "crash", "no val_bpb in the log; the run must print a line `---`, then `val_bpb: <value>`, or a line `METRIC val_bpb=<value>`"),
        (_m(None, exit_code=None), "crash", "the run vanished without an exit status (killed?)"),
        (_m(0.9, exit_code=None), "keep", "better by 0.1000 ± 0.0141 (n = 1 vs 1)"),  # gone, but the log is complete
        (_m(0.9, kill="timeout after 10m00s"), "crash", "timeout after 10m00s"),
        (_m(None, exit_code=None, kill="killed by telegram:42"), "discard", "killed by telegram:42"),
    ],
)
def test_verdicts(m: Measurement, status: str, reason: str) -> None:
    verdict = _judge(m)
    assert (verdict.status, verdict.reason) == (status, reason)
    if status == "crash":
        assert verdict.metric is None and verdict.best_after == 1.0


def test_maximize_and_baseline_mean() -> None:
    assert _judge(_m(1.1), direction="maximize").status == "keep"
    base = _judge(_m(1.02), kind="baseline", earlier=[1.0], best=[])
    assert base.status == "keep" and base.best_after == pytest.approx(1.01)
    assert base.reason == "baseline: mean of 2 runs 1.010000; run-to-run noise ± 0.0100 (measured from 5+ repeats)"


def test_an_undecided_gain_is_re_run_and_the_means_decide() -> None:
    first = _judge(_m(0.99), best=[1.0, 1.0, 1.0])  # gain 0.01 < 2 x 0.0115
    assert first.status == "discard" and first.needs_confirm and not first.remeasure_best
    assert first.confidence == pytest.approx(0.01 / (0.01 * math.sqrt(1 + 1 / 3)))
    assert _judge(_m(0.99)).remeasure_best  # n = 1 vs 1: the best's own error is as large
    kept = _judge(_m(0.975), kind="confirm", earlier=[0.985, 0.98], best=[1.0, 1.0, 1.0])
    assert kept.status == "keep" and kept.best_after == pytest.approx(0.98) and not kept.needs_confirm
    lost = _judge(_m(1.02), kind="confirm", earlier=[0.99])
    assert lost.status == "discard" and lost.reason.startswith("not better") and lost.best_after == 1.0
    big = _judge(_m(0.9))
    assert big.status == "keep" and big.confidence == pytest.approx(0.1 / (0.01 * math.sqrt(2)))
    assert big.comparison is not None and big.comparison.text() == "better by 0.1000 ± 0.0141 (n = 1 vs 1)"


# -- the decision rule on plain numbers ----------------------------------------------------------
def test_the_noise_is_pooled_from_repeats_and_never_zero() -> None:
    assert pooled_noise([[1.0], [0.5]], prior_sd=0.003) == Noise(0.003, 0)  # no repeats: the prior
    assert pooled_noise([], prior_sd=0.0) == Noise(0.0, 0)  # no prior and nothing measured
    # one group 1.0, 1.02 (squares 0.0002, df 1) and the prior 0.003 weighing 2 df
    assert pooled_noise([[1.0, 1.02]], prior_sd=0.003).sd == pytest.approx(math.sqrt((2 * 0.003**2 + 0.0002) / 3))
    many = pooled_noise([[1.0, 1.02]] * 50, prior_sd=0.003)  # the measurements outweigh the prior
    assert many.df == 50 and many.sd == pytest.approx(math.sqrt(0.0002), rel=0.03)


@pytest.mark.parametrize(
    ("candidate", "incumbent", "action", "rerun_incumbent"),
    [
        ([0.97], [1.0, 1.0, 1.0], "keep", False),  # 0.03 > 2 x 0.01 x sqrt(1 + 1/3)
        ([0.98], [1.0, 1.0, 1.0], "rerun", False),  # 0.02 < 0.0231: the candidate again
        ([0.985, 0.985], [1.0, 1.0], "rerun", True),  # n 2 vs 2: the incumbent's half of the error is as large
        ([0.98, 0.985, 0.98], [1.0, 1.0, 1.0], "keep", False),  # 0.0183 > 0.0163 on the 3rd run
        ([0.99, 0.985, 0.99], [1.0, 1.0, 1.0], "discard", False),  # 0.0117: not shown in the 3 runs allowed
        ([1.0], [1.0, 1.0, 1.0], "discard", False),  # no better: one run is enough
        ([1.05], [1.0], "discard", False),  # clearly worse
    ],
)
def test_the_rule(candidate: list[float], incumbent: list[float], action: str, rerun_incumbent: bool) -> None:
    d = decide(candidate, incumbent, Noise(0.01, 10), "minimize", Rule(z=2.0, max_runs=3))
    se = 0.01 * math.sqrt(1 / len(candidate) + 1 / len(incumbent))
    assert d.comparison.se == pytest.approx(se)
    assert (d.action, d.rerun_incumbent) == (action, rerun_incumbent)


def test_the_winners_curse_the_incumbent_is_its_mean_not_its_luckiest_run() -> None:
    """A change kept on one lucky run (0.97) measures 1.0 twice when re-measured: its value is
    the mean 0.99, so a real 0.02 gain is found against it; against its luckiest run it is not."""
    noise, rule = Noise(0.01, 10), Rule(z=2.0, max_runs=3)
    assert decide([0.97], [0.97], noise, "minimize", rule).action == "discard"  # the lucky run
    assert decide([0.97], [0.97, 1.0, 1.0], noise, "minimize", rule).action == "rerun"
    assert decide([0.97, 0.97], [0.97, 1.0, 1.0], noise, "minimize", rule).action == "keep"


def _simulate(true_gain: float, rule: Rule, trials: int = 2000) -> float:
    """Share of candidates kept, each truly better than a 3-run incumbent by `true_gain` σ."""
    rng = random.Random(7)
    kept = 0
    for _ in range(trials):
        incumbent = [rng.gauss(0, 1) for _ in range(3)]
        runs: list[float] = []
        while True:
            runs.append(rng.gauss(-true_gain, 1))
            d = decide(runs, incumbent, Noise(1.0, 10), "minimize", rule)
            if d.action == "rerun" and d.rerun_incumbent:
                incumbent.append(rng.gauss(0, 1))
            if d.action != "rerun":
                kept += d.action == "keep"
                break
    return kept / trials


def test_the_rule_rarely_keeps_noise_and_keeps_a_3_sigma_gain() -> None:
    rule = Rule(z=2.0, max_runs=3)
    assert _simulate(0.0, rule) < 0.05  # no effect: kept a few times in a hundred at most
    assert _simulate(-1.0, rule) < 0.005  # truly worse by 1 σ: almost never
    assert _simulate(3.0, rule) > 0.95


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("keep_z", -1.0, "a number >= 0"), ("max_runs", 0, "at least 1"),
     ("noise_prior", 0.0, "a positive share"), ("remeasure_every", -5, "0 (never)")],
)
def test_the_rules_settings_are_checked_with_a_clear_message(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"loop\.{key} = {value}: expected {re.escape(expected)}"):
        settings_from_table({"loop": {key: value}}, source="c.toml")


def test_a_log_with_other_figures_names_what_was_read() -> None:
    """A user's project printing `score: 0.9` for a config expecting val_bpb: the reason shows the
    name it did print, so the mismatch is seen at once."""
    m = Measurement(0, None, Summary({"score": 0.9, "steps": 100.0}), "---\nscore: 0.9\nsteps: 100\n")
    assert failure_reason(m, "val_bpb") == ("no val_bpb in the log (read: score, steps); the run must print a"
                                            " line `---`, then `val_bpb: <value>`, or a line `METRIC val_bpb=<value>`")


def test_a_metric_printed_as_no_number_is_said_as_such_not_as_missing() -> None:
    """`val_bpb: abc` read as "no val_bpb in the log": the user looked for a missing line that was there."""
    log = "---\nval_bpb: abc\nsteps: 100\n"
    m = Measurement(0, None, parse_summary(log), log)
    assert failure_reason(m, "val_bpb") == ("val_bpb in the log is 'abc', not a number; the run must print a line"
                                            " `---`, then `val_bpb: <value>`, or a line `METRIC val_bpb=<value>`")


@pytest.mark.parametrize(("in_workspace", "reason"), [
    (True, "harness changed: prepare.py, harness.py changed while the run trained in the workspace: a person's edit, or"
           " the run's own write (nothing tells which as it happens); put back as recorded (an edit of yours is kept in"
           " `git stash list`)"),
    # a snapshot's harness is written only by its run
    (False, "rejected by the harness: the code that scores it changed while the training command ran (prepare.py,"
            " harness.py): the run wrote it, or a person edited it meanwhile"),
])
def test_a_harness_changed_during_a_run_in_the_workspace_is_not_said_to_be_the_runs_doing(
        in_workspace: bool, reason: str) -> None:
    said = ("the code that scores it changed while the training command ran (prepare.py, harness.py): the run wrote it,"
            " or a person edited it meanwhile")
    m = Measurement(3, None, Summary({}, rejected=said), f"REJECTED: {said}\n", in_workspace=in_workspace)
    assert failure_reason(m, "val_bpb") == reason
