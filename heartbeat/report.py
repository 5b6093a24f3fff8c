"""The session report as files: the loop's markdown report and the bot's progress chart.

Used by the daily report job (the event carries both, the bot sends them), by the demo, and by
`nightlab ctl plot` (a console night's chart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nightlab.bot.plots import progress_chart
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import ProjectSettings
from nightlab.loop.state.store import Store, state_dir


@dataclass(frozen=True)
class Report:
    markdown: str
    text: str  # the same for a chat (no markdown marks, no table)
    markdown_path: Path
    chart_path: Path | None  # None until there is an experiment to plot


def write_report(workspace: Path, store: Store, project: ProjectSettings, since: float | None = None) -> Report:
    """`since`: the last report's time, so this one says what happened after it."""
    folder = state_dir(workspace) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    markdown = views.report_markdown(workspace, since=since)
    markdown_path = folder / f"report-{stamp}.md"
    markdown_path.write_text(markdown + "\n")  # a text file ends with a newline
    chart = write_chart(workspace, store, project, stamp)
    return Report(markdown, views.report_markdown(workspace, since=since, chat=True), markdown_path, chart)


def write_chart(workspace: Path, store: Store, project: ProjectSettings, stamp: str | None = None) -> Path | None:
    """The progress chart as a PNG beside the reports; None when there is no experiment to plot."""
    points = ledger.experiments(store)
    if not points:
        return None
    name = f"progress-{stamp or time.strftime('%Y%m%d-%H%M%S')}.png"
    return progress_chart(points, state_dir(workspace) / "reports" / name, project.metric, project.direction)
