"""The progress chart researchers know from upstream's analysis notebook, as a PNG.

Discarded experiments grey, kept ones green, crashes as red crosses along the top edge, and the
running best as a step line labelled with the change that set each new best. matplotlib is
imported inside `progress_chart` only: the daemon starts faster and stays smaller until someone
asks for a chart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Point(Protocol):
    """What the chart needs of an experiment (loop.ledger.Experiment has it)."""

    number: int
    status: str
    metric: float | None
    description: str


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

    better = min if direction == "minimize" else max
    measured = [p for p in points if p.metric is not None and p.status != "crash"]
    kept = [p for p in measured if p.status == "keep"]
    others = [p for p in measured if p.status != "keep"]
    crashes = [p for p in points if p.status == "crash" or p.metric is None]

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    try:
        ax.scatter([p.number for p in others], [p.metric for p in others], c="#b0b0b0", s=18,
                   label=f"discarded ({len(others)})", zorder=2)
        ax.scatter([p.number for p in kept], [p.metric for p in kept], c="#2ca02c", s=36,
                   edgecolors="black", linewidths=0.5, label=f"kept ({len(kept)})", zorder=3)
        if crashes:
            top = blended_transform_factory(ax.transData, ax.transAxes)
            ax.scatter([p.number for p in crashes], [0.97] * len(crashes), marker="x", c="#d62728",
                       s=30, transform=top, label=f"crashed ({len(crashes)})", zorder=3)
        if kept:
            xs, ys, best = [], [], None
            for p in kept:  # the running best only moves at a kept experiment
                value = p.metric if best is None else better(best, p.metric)
                if value != best:
                    ax.annotate(p.description[:40], (p.number, value), textcoords="offset points",
                                xytext=(4, 6), fontsize=7, rotation=30, color="#1a6e1a")
                best = value
                xs.append(p.number)
                ys.append(best)
            last = max(p.number for p in points)
            ax.step([*xs, last], [*ys, ys[-1]], where="post", c="#2ca02c", lw=1.5,
                    label="running best", zorder=2)
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
