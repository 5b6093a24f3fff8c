"""The session report as files: the loop's markdown report and the bot's progress chart.

Used by the daily report job (the event carries both, the bot sends them) and by the demo.
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
    points = ledger.experiments(store)
    chart = (progress_chart(points, folder / f"progress-{stamp}.png", project.metric, project.direction)
             if points else None)
    return Report(markdown, views.report_markdown(workspace, since=since, chat=True), markdown_path, chart)
