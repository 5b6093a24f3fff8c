"""The progress chart researchers know from upstream's analysis notebook, as a PNG.

Discarded experiments grey, kept changes green (the baseline's runs hollow green),
crashes as red crosses along the top edge (runs stopped before a result grey ones), and the
running best as a step line labelled with the change that set each new best. The best is its
estimate (the mean of every measurement of its commit, as the decision rule uses it), drawn with
a band of ± the run-to-run noise once repeats have measured it: a result inside the band is not
distinguishable from the best by one run. The axis spans the night's progress: a result far worse
than anything kept is an arrow on the edge with its value. matplotlib is
imported inside `progress_chart` only: the daemon starts faster and stays smaller until someone
asks for a chart.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_LABELLED_FAR = 12  # results off the chart that get their value written beside them


class Point(Protocol):
    """What the chart needs of an experiment (loop.state.ledger.Experiment, a frozen dataclass, has it)."""

    @property
    def number(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def metric(self) -> float | None: ...
    @property
    def description(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def commit(self) -> str: ...
    @property
    def best(self) -> float | None: ...


def noise_sd(points: Sequence[Point]) -> float:
    """The run-to-run noise pooled over commits measured more than once; 0.0 before any repeat."""
    from nightlab.loop.state.stats import pooled_noise

    groups: dict[str, list[float]] = {}
    for p in points:
        if p.metric is not None:
            groups.setdefault(p.commit, []).append(p.metric)
    return pooled_noise(groups.values(), prior_sd=0.0).sd


def _metrics(measured: Sequence[Point]) -> list[float]:
    return [p.metric for p in measured if p.metric is not None]


@dataclass(frozen=True)
class Groups:
    """The chart's markers. A baseline run (and a re-measurement of the best) is recorded as a
    keep, but it changed nothing: counted as kept, a night where nothing beat the baseline read
    "3 kept" (the views count them apart the same way). A run stopped before its result (a
    user's kill: a discard) is no crash."""

    kept: list[Point]  # kept changes (on their deciding run)
    measured: list[Point]  # the baseline's runs and the best's re-measurements
    discarded: list[Point]  # discarded, or a run the rule re-ran to decide
    crashed: list[Point]
    stopped: list[Point]  # no result, not a crash

    def title(self, total: int) -> str:
        return f"{total} experiments, {len(self.kept)} {'change' if len(self.kept) == 1 else 'changes'} kept"


def groups(points: Sequence[Point]) -> Groups:
    scored = [p for p in points if p.metric is not None and p.status != "crash"]
    keeps = [p for p in scored if p.status == "keep"]
    return Groups(
        kept=[p for p in keeps if p.kind != "baseline"],
        measured=[p for p in keeps if p.kind == "baseline"],
        discarded=[p for p in scored if p.status != "keep"],
        crashed=[p for p in points if p.status == "crash"],
        stopped=[p for p in points if p.metric is None and p.status != "crash"],
    )


def _worse_edge(kept: Sequence[Point], measured: Sequence[Point], direction: str) -> float | None:
    """Where the chart's worse side ends, or None to show everything. One bad run (a learning rate
    x4: 2.0 on a night that lives at 1.40) stretched the axis until the best's steps were a flat
    line. The edge leaves room past the worst estimate of the best (the span of the best's steps,
    at least 5 noise SDs and 1 % of the metric) and keeps every ordinary result: only one past
    Tukey's far fence (3 IQRs past the quartile) of the night's results is off the chart."""
    core = [v for p in kept for v in (p.best, p.metric) if v is not None]
    if not core:
        return None
    sign = 1 if direction == "minimize" else -1
    worst = sign * max(sign * v for v in core)
    pad = max(max(core) - min(core), 5 * noise_sd(measured), 0.01 * abs(worst))
    signed = [sign * v for v in _metrics(measured)]
    if len(signed) < 4:  # too few results to call one far out
        return None
    q1, _, q3 = statistics.quantiles(signed, n=4, method="inclusive")
    return sign * max(sign * worst + pad, q3 + 3 * (q3 - q1))


def _fold_worse(ax: Axes, measured: Sequence[Point], edge: float, direction: str) -> None:
    """Results past `edge` are drawn on the edge as arrows with their values, not dropped."""
    sign = 1 if direction == "minimize" else -1
    far = [p for p in measured if p.metric is not None and sign * (p.metric - edge) > 0]
    if not far:
        return
    values = [p.metric for p in measured if p.metric is not None and sign * (p.metric - edge) <= 0]
    near = min(values) if direction == "minimize" else max(values)
    margin = 0.04 * abs(edge - near) if values else 0.0
    ax.set_ylim(*sorted((near - sign * margin, edge)))
    ax.scatter([p.number for p in far], [edge] * len(far), marker="^" if sign > 0 else "v", c="#b0b0b0", s=30,
               clip_on=False, label=f"worse, off the chart ({len(far)})", zorder=3)
    if len(far) <= _LABELLED_FAR:
        for p in far:
            ax.annotate(f"{p.metric:.3f}", (p.number, edge), textcoords="offset points", xytext=(0, -9 * sign),
                        ha="center", va="center", fontsize=6, color="#808080", annotation_clip=False)


def progress_chart(
    points: Sequence[Point], path: Path, metric_name: str = "val_bpb", direction: str = "minimize"
) -> Path:
    fig = draw(points, metric_name, direction)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", bbox_inches="tight")  # "tight": the legend below, a late keep's label
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def draw(points: Sequence[Point], metric_name: str = "val_bpb", direction: str = "minimize") -> Figure:
    """The chart as a figure; the caller closes it (matplotlib.pyplot.close)."""
    import matplotlib

    # Its first use on a machine builds a font cache and says so; not news for the journal.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    matplotlib.use("Agg")  # off-screen: the daemon has no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    measured = [p for p in points if p.metric is not None and p.status != "crash"]
    kept = [p for p in measured if p.status == "keep"]  # every estimate of the best, for its line
    marks = groups(points)

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    try:
        ax.scatter([p.number for p in marks.discarded], _metrics(marks.discarded), c="#b0b0b0", s=18,
                   label=f"discarded or re-run ({len(marks.discarded)})", zorder=2)
        if marks.measured:
            ax.scatter([p.number for p in marks.measured], _metrics(marks.measured), c="white", s=30,
                       edgecolors="#2ca02c", linewidths=1.2,
                       label=f"baseline and re-measurements of the best ({len(marks.measured)})", zorder=3)
        ax.scatter([p.number for p in marks.kept], _metrics(marks.kept), c="#2ca02c", s=36,
                   edgecolors="black", linewidths=0.5, label=f"kept changes ({len(marks.kept)})", zorder=3)
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for failed, colour, label in ((marks.crashed, "#d62728", "crashed"),
                                      (marks.stopped, "#7f7f7f", "stopped, no result")):
            if failed:
                ax.scatter([p.number for p in failed], [0.97] * len(failed), marker="x", c=colour,
                           s=30, transform=top, label=f"{label} ({len(failed)})", zorder=3)
        if kept:
            xs: list[float] = []
            ys: list[float] = []
            for p in kept:  # the best's estimate moves at a keep and at each re-measurement
                value = p.best if p.best is not None else p.metric
                assert value is not None
                if p.kind != "baseline":
                    ax.annotate(p.description[:40], (p.number, value), textcoords="offset points",
                                xytext=(4, 6), fontsize=7, rotation=30, color="#1a6e1a")
                xs.append(p.number)
                ys.append(value)
            last = max(p.number for p in points)
            xs, ys = [*xs, last], [*ys, ys[-1]]
            ax.step(xs, ys, where="post", c="#2ca02c", lw=1.5, label="best (mean of its runs)", zorder=2)
            sd = noise_sd(measured)
            if sd > 0:
                ax.fill_between(xs, [y - sd for y in ys], [y + sd for y in ys], step="post", color="#2ca02c",
                                alpha=0.15, lw=0, label=f"± run-to-run noise ({sd:.4f})", zorder=1)
        edge = _worse_edge(kept, measured, direction)
        if edge is not None:
            _fold_worse(ax, measured, edge, direction)
        if points:  # the crosses sit on the axes' own height, so autoscaling left out a crash at either end
            numbers = [p.number for p in points]
            ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("experiment #")
        ax.set_ylabel(f"{metric_name} ({'lower' if direction == 'minimize' else 'higher'} is better)")
        ax.set_title(marks.title(len(points)))
        ax.grid(alpha=0.3)
        # below the plot: inside, "upper right" hid the points there (a late result, a fluke)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig
