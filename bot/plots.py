"""The progress chart researchers know from upstream's analysis notebook, as a PNG.

Discarded experiments grey, kept ones green, crashes as red crosses along the top edge, and the
running best as a step line labelled with the change that set each new best. The best is its
estimate (the mean of every measurement of its commit, as the decision rule uses it), drawn with
a band of ± the run-to-run noise once repeats have measured it: a result inside the band is not
distinguishable from the best by one run. matplotlib is
imported inside `progress_chart` only: the daemon starts faster and stays smaller until someone
asks for a chart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


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


def progress_chart(
    points: Sequence[Point], path: Path, metric_name: str = "val_bpb", direction: str = "minimize"
) -> Path:
    import matplotlib

    # Its first use on a machine builds a font cache and says so; not news for the journal.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    matplotlib.use("Agg")  # off-screen: the daemon has no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    measured = [p for p in points if p.metric is not None and p.status != "crash"]
    kept = [p for p in measured if p.status == "keep"]
    others = [p for p in measured if p.status != "keep"]
    crashes = [p for p in points if p.status == "crash" or p.metric is None]

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    try:
        ax.scatter([p.number for p in others], _metrics(others), c="#b0b0b0", s=18,
                   label=f"discarded ({len(others)})", zorder=2)
        ax.scatter([p.number for p in kept], _metrics(kept), c="#2ca02c", s=36,
                   edgecolors="black", linewidths=0.5, label=f"kept ({len(kept)})", zorder=3)
        if crashes:
            top = blended_transform_factory(ax.transData, ax.transAxes)
            ax.scatter([p.number for p in crashes], [0.97] * len(crashes), marker="x", c="#d62728",
                       s=30, transform=top, label=f"crashed ({len(crashes)})", zorder=3)
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("experiment #")
        ax.set_ylabel(f"{metric_name} ({'lower' if direction == 'minimize' else 'higher'} is better)")
        ax.set_title(f"{len(points)} experiments, {len(kept)} kept")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
