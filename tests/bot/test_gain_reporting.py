"""A keep's digest and the chart state the gain with its uncertainty (issue 13): positive means
better, ± one standard error, n = runs of the change vs runs of the best it beat."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from nightlab.bot.digest import experiment_digest
from nightlab.bot.plots import draw, groups, noise_sd, progress_chart


def _text(message) -> str:  # type: ignore[no-untyped-def]
    return "".join(span.text for span in message.spans)


def test_a_keeps_digest_says_better_by_gain_plus_minus_its_error() -> None:
    payload = {"number": 9, "status": "keep", "metric_name": "val_bpb", "metric": 0.9951, "best": 0.9969,
               "previous_best": 1.0, "delta": -0.0049, "new_best": True, "gain": 0.0031, "se": 0.0012,
               "n": 3, "n_best": 5, "confidence": 2.58, "reason": "better by 0.0031 ± 0.0012 (n = 3 vs 5)"}
    text = _text(experiment_digest(payload, 10))
    assert "val_bpb 0.9951 (better by 0.0031 ± 0.0012, n = 3 vs 5)" in text
    assert "confidence 2.6 SE" in text and "Δ" not in text
    worse = _text(experiment_digest({**payload, "status": "discard", "new_best": False, "gain": -0.002}, 10))
    assert "(worse by 0.0020 ± 0.0012, n = 3 vs 5)" in worse
    # without a decision's gain (a baseline, a result with nothing to compare), the change from the best before, worded the same way (it was a
    # signed "Δ -0.0049", whose sign meant better for val_bpb and worse for a metric to maximise)
    unjudged = {**payload, "gain": None, "se": None}
    assert "(better by 0.0049 than 1.0000)" in _text(experiment_digest(unjudged, 10))
    assert "(worse by 0.0049 than 1.0000)" in _text(experiment_digest({**unjudged, "direction": "maximize"}, 10))
    assert "(the same as 1.0000)" in _text(experiment_digest({**unjudged, "delta": 0.0}, 10))


def test_a_change_from_the_best_that_rounds_to_nothing_is_the_same_not_worse_by_zero() -> None:
    """A project's second baseline read "✅ #2 keep · val_loss 0.0392 (worse by 0.0000 than
    0.0391)": a difference of 0.00003 shown to four decimals, as the decisions' words no longer do."""
    payload = {"number": 2, "status": "keep", "kind": "baseline", "metric_name": "val_loss", "metric": 0.03917,
               "best": 0.039155, "previous_best": 0.03914, "delta": 0.00003}
    assert "val_loss 0.0392 (the same to 4 decimals as 0.0391)" in _text(experiment_digest(payload, 10))


def test_a_run_the_rule_runs_again_to_decide_does_not_read_as_the_changes_end() -> None:
    payload = {"number": 4, "status": "discard", "metric_name": "val_bpb", "metric": 0.99, "best": 1.0,
               "gain": 0.01, "se": 0.0085, "n": 1, "n_best": 3, "rerun": True,
               "reason": "re-running to decide: better by 0.0100 ± 0.0085 (n = 1 vs 3), not yet 2 SE"}
    text = _text(experiment_digest(payload, 10))
    assert text.startswith("🔁 #4 undecided, runs again · val_bpb 0.9900 (better by 0.0100 ± 0.0085, n = 1 vs 3)")
    assert "discard" not in text.splitlines()[0]  # was "❌ #4 discard", then kept on its next run
    assert _text(experiment_digest({**payload, "rerun": False}, 10)).startswith("❌ #4 discard")


def test_a_change_the_data_failed_reads_as_the_datas_failure_and_runs_again() -> None:
    """It read "💥 #2 crash", the change's end, though a damaged shard failed it; it now runs again."""
    reason = "data problem: /data/shard_00003.parquet is damaged (ZSTD decompression failed); replace it"
    payload = {"number": 2, "status": "crash", "metric_name": "val_bpb", "metric": None, "rerun": True,
               "reason": reason, "log_tail": f"step 00001\nFAIL: {reason.removeprefix('data problem: ')}"}
    lines = _text(experiment_digest(payload, 10)).splitlines()
    assert lines[0] == "🔁 #2 bad data, not the change: runs again after /resume · val_bpb —"
    assert f"reason: {reason}" in lines


@dataclass(frozen=True)
class P:
    number: int
    status: str
    metric: float | None
    description: str
    kind: str
    commit: str
    best: float | None


def test_the_chart_draws_the_best_with_the_noise_band(tmp_path: Path) -> None:
    points = [P(1, "keep", 1.0, "baseline", "baseline", "a", 1.0), P(2, "keep", 1.02, "baseline", "baseline", "a", 1.01),
              P(3, "discard", 1.03, "x", "proposal", "b", 1.01), P(4, "keep", 0.95, "y", "proposal", "c", 0.95),
              P(5, "crash", None, "z", "proposal", "d", 0.95)]
    assert noise_sd(points) == pytest.approx(0.0141421, rel=1e-4)  # one repeat pair: 1.0, 1.02
    assert noise_sd(points[2:]) == 0.0  # no repeats: no band
    path = progress_chart(points, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_counts_kept_changes_not_baseline_runs_and_a_kill_is_no_crash() -> None:
    """A night that kept no change read "4 experiments, 3 kept" (the baseline's runs are recorded
    as keeps), and a run the user stopped was drawn as a crash."""
    night = [P(1, "keep", 1.0, "baseline", "baseline", "a", 1.0), P(2, "keep", 1.01, "baseline", "baseline", "a", 1.0),
             P(3, "keep", 0.99, "baseline", "baseline", "a", 1.0), P(4, "discard", 1.02, "x", "proposal", "b", 1.0),
             P(5, "discard", None, "y", "proposal", "c", 1.0)]  # killed by the user
    marks = groups(night)
    assert marks.title(len(night)) == "5 experiments, 0 changes kept"
    assert ([p.number for p in marks.measured], marks.crashed, [p.number for p in marks.stopped]) == ([1, 2, 3], [], [5])
    # a change the rule re-ran to decide, kept on its second run, and a crash
    night += [P(6, "discard", 0.98, "z", "proposal", "d", 1.0), P(7, "keep", 0.97, "confirm #6: z", "confirm", "d", 0.975),
              P(8, "crash", None, "w", "proposal", "e", 0.975)]
    marks = groups(night)
    assert marks.title(len(night)) == "8 experiments, 1 change kept"
    assert ([p.number for p in marks.kept], [p.number for p in marks.crashed]) == ([7], [8])


def test_the_legend_hides_no_point() -> None:
    import matplotlib.pyplot as plt

    fig = draw([P(1, "keep", 1.0, "baseline", "baseline", "a", 1.0), P(2, "discard", 1.5, "x", "proposal", "b", 1.0)])
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert legend is not None
        inside = legend.get_window_extent().overlaps(ax.get_window_extent())  # was "upper right", on the fluke
        assert not inside
    finally:
        plt.close(fig)


def test_crashes_at_either_end_are_on_the_chart() -> None:
    """Every run crashed: the x axis ran from -0.045 to 0.045 and no cross showed, the legend saying
    "crashed (2)"; a crash after the last result fell off its right edge the same way."""
    import matplotlib.pyplot as plt

    for night in ([P(1, "crash", None, "baseline", "baseline", "a", None), P(2, "crash", None, "b", "baseline", "a", None)],
                  [P(1, "keep", 1.0, "baseline", "baseline", "a", 1.0), P(2, "discard", 1.1, "x", "proposal", "b", 1.0),
                   P(9, "crash", None, "y", "proposal", "c", 1.0)]):
        fig = draw(night)
        try:
            low, high = fig.axes[0].get_xlim()
            assert low < night[0].number and night[-1].number < high, (low, high)
        finally:
            plt.close(fig)


def test_one_disastrous_run_does_not_flatten_the_best_it_is_an_arrow_on_the_edge() -> None:
    """A learning rate x4 scored 2.0 on a night at 1.40: the axis ran to 2.0 and the best's steps
    (0.01 apart) were one flat line."""
    import matplotlib.pyplot as plt

    night = [P(1, "keep", 1.40, "baseline", "baseline", "a", 1.40), P(2, "keep", 1.41, "baseline", "baseline", "a", 1.405),
             P(3, "discard", 2.0, "lr x4", "proposal", "b", 1.405), P(4, "discard", 1.42, "x", "proposal", "c", 1.405),
             P(5, "keep", 1.39, "y", "proposal", "d", 1.39)]
    fig = draw(night)
    try:
        ax = fig.axes[0]
        low, high = ax.get_ylim()
        assert low < 1.39 and 1.42 < high < 1.5  # every result but the disaster, and room for the steps
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "worse, off the chart (1)" in labels
        assert "2.000" in [t.get_text() for t in ax.texts]  # its value stays readable
    finally:
        plt.close(fig)
    maximize = [P(1, "keep", 0.60, "baseline", "baseline", "a", 0.60), P(2, "discard", 0.05, "broke", "proposal", "b", 0.60),
                P(3, "discard", 0.59, "x", "proposal", "c", 0.60), P(4, "discard", 0.61, "z", "proposal", "d", 0.60),
                P(5, "keep", 0.62, "y", "proposal", "e", 0.62)]
    fig = draw(maximize, "accuracy", "maximize")
    try:
        low, high = fig.axes[0].get_ylim()
        assert 0.05 < low < 0.60 and high > 0.62
    finally:
        plt.close(fig)
    for first in (night[:1], night[:3]):  # too few results to call one far out (and no error: the first report)
        plt.close(draw(first))
    fig = draw(night[:2] + night[3:])  # nothing far: the axis is matplotlib's own
    try:
        assert "worse, off the chart" not in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    finally:
        plt.close(fig)


def test_the_charts_caption_before_a_result_and_before_a_keep(workspace: Path, store) -> None:  # type: ignore[no-untyped-def]
    from nightlab.loop.state import views
    from nightlab.loop.state.stats import NOISE_PRIOR_KEY

    from tests.bot.conftest import finished

    finished(store, "crash", None, kind="baseline", commit="a", setting="s")
    assert views.chart_caption(workspace) == "1 experiment (1 baseline (1 crash))\nno val_bpb yet"  # as /status counts it
    store.set(NOISE_PRIOR_KEY, 0.002)  # [loop] noise_prior: 0.2 % of the metric until repeats measure it
    finished(store, "keep", 1.0, kind="baseline", commit="a", hardware="H200", setting="s")
    finished(store, "discard", 1.01, commit="b", hardware="H200", setting="s", best=1.0)
    assert views.chart_caption(workspace) == (
        "3 experiments (2 baseline (1 crash), 1 discard)\nbest val_bpb 1.000000 (#2), runs vary ± 0.0020 (assumed until repeats"
        " measure it)\nnothing beat the baseline yet")
