from __future__ import annotations

import math

import pytest
from nightlab.loop.judge import Measurement, judge, noise
from nightlab.loop.summary import Summary


def _m(value: float | None = None, exit_code: int | None = 0, kill: str | None = None, tail: str = "") -> Measurement:
    metrics = {} if value is None else {"val_bpb": value}
    return Measurement(exit_code, kill, Summary(metrics, complete=bool(metrics)), tail)


def _judge(m: Measurement, kind: str = "proposal", best: float | None = 1.0, noise_sd: float = 0.0,
           confirm_of: float | None = None, direction: str = "minimize"):
    return judge(m, kind=kind, metric_name="val_bpb", direction=direction, best=best, baselines=[],
                 confirm_of_metric=confirm_of, noise_sd=noise_sd, confirm_k=2.0)


def test_noise_is_a_robust_sd_of_repeats() -> None:
    assert noise([[1.0], [0.5]]) == 0.0  # no repeats: unknown
    assert noise([[1.0, 1.02]]) == pytest.approx(1.4826 * 0.01)
    assert noise([[1.0, 1.0, 1.0, 5.0]]) == 0.0  # one outlier does not make it noisy


@pytest.mark.parametrize(
    ("m", "status", "reason"),
    [
        (_m(0.9), "keep", "better by 0.100000"),
        (_m(1.0), "discard", "equal to the best"),
        (_m(1.1), "discard", "worse than the best 1.000000"),
        (_m(float("nan")), "crash", "val_bpb is nan"),
        (_m(0.9, exit_code=3), "crash", "exit code 3"),
        (_m(None, exit_code=1, tail="torch.OutOfMemoryError: CUDA out of memory."), "crash", "OOM (exit code 1): torch.OutOfMemoryError: CUDA out of memory."),
        (_m(None), "crash", "no val_bpb in the log"),
        (_m(None, exit_code=None), "crash", "the run vanished without an exit status (killed?)"),
        (_m(0.9, exit_code=None), "keep", "better by 0.100000"),  # gone, but the log is complete
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
    base = judge(_m(1.02), kind="baseline", metric_name="val_bpb", direction="minimize", best=None,
                 baselines=[1.0], confirm_of_metric=None, noise_sd=0, confirm_k=2)
    assert base.status == "keep" and base.best_after == pytest.approx(1.01)


def test_small_gain_needs_a_confirm_run_and_the_mean_decides() -> None:
    first = _judge(_m(0.99), noise_sd=0.01)  # gain 0.01 < 2 x 0.01
    assert first.status == "discard" and first.needs_confirm and first.confidence == pytest.approx(1.0)
    kept = _judge(_m(0.994), kind="confirm", noise_sd=0.01, confirm_of=0.99)
    assert kept.status == "keep" and kept.best_after == pytest.approx(0.992) and not kept.needs_confirm
    lost = _judge(_m(1.02), kind="confirm", noise_sd=0.01, confirm_of=0.99)
    assert lost.status == "discard" and lost.reason.startswith("not confirmed")
    big = _judge(_m(0.9), noise_sd=0.01)
    assert big.status == "keep" and math.isclose(big.confidence or 0, 10.0)
