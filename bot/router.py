"""The one command router for every channel: who is asking, what they asked, what to answer.

Read-only commands are answered here from loop.state.views (and the chart). Commands that steer the
loop go through loop.state.steering.send_command, the same path as `nightlab ctl`: it validates them
(focus areas included), writes them to the store for the engine's next checkpoint and says what
will happen and when. Nothing a chat sends can raise out of here or reach the loop unparsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from nightlab.bot.auth import Allowlist, Role
from nightlab.bot.channel import Incoming
from nightlab.bot.format import Outgoing, Photo, bold, plain, pre, text_message
from nightlab.loop.state import ledger, steering, views
from nightlab.loop.state.commands import Command, CommandError, help_text, parse_command
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import Store, state_dir

log = logging.getLogger("nightlab.bot")

CHART_KEEP_S = 24 * 3600  # charts are kept a day: a queued photo must still find its file


class Router:
    def __init__(
        self,
        store: Store,
        workspace: Path,
        allowlists: dict[str, Allowlist],
        metric_name: str = "val_bpb",
        direction: str = "minimize",
    ) -> None:
        self.store = store
        self.workspace = workspace
        self.allowlists = allowlists
        self.metric_name = metric_name
        self.direction = direction

    async def handle(self, msg: Incoming) -> list[Outgoing]:
        """The replies to send back to `msg.chat` (empty: stay silent)."""
        if not msg.addressed:
            return []  # group chatter that is not a command
        allow = self.allowlists.get(msg.channel)
        role = allow.role(msg) if allow else None
        if role is None:
            log.warning("refused %s in %s (%s): %.80r", msg.sender, msg.chat,
                        "private" if msg.private else "group", msg.text)
            if not msg.private:
                return []  # strangers in groups get nothing, not even a sign the bot listens
            return [text_message(plain(f"⛔ Not authorised (your id: {msg.user}). Ask the owner to add it."))]
        try:
            cmd = parse_command(msg.text)  # areas are checked by steering, which knows them
        except CommandError as exc:
            return [text_message(plain(f"⚠️ {exc}"))]
        if cmd.operator and role is not Role.OPERATOR:
            log.warning("refused %s from viewer %s", cmd.name, msg.sender)
            return [text_message(plain(f"🔒 {cmd.name} changes the loop; only operators may send it."))]
        try:
            if cmd.operator:
                reply = await asyncio.to_thread(steering.send_command, self.workspace, cmd.text(), msg.sender)
                return [text_message(plain(f"✔ {reply}"))]
            return await self._answer(cmd)
        except UserError as exc:  # e.g. an unknown focus area, nothing running to kill
            return [text_message(plain(f"⚠️ {exc}"))]
        except Exception:
            log.exception("command %r from %s failed", cmd.text(), msg.sender)
            return [text_message(plain(f"⚠️ {cmd.name} failed on the server; the log has the details."))]

    # -- read-only ---------------------------------------------------------------------------
    async def _answer(self, cmd: Command) -> list[Outgoing]:
        ws = self.workspace
        if cmd.name == "help":
            return [text_message(bold("nightlab commands\n"), pre(help_text()))]
        if cmd.name == "status":
            return [_view(await asyncio.to_thread(views.status_text, ws))]
        if cmd.name == "best":
            return [_view(await asyncio.to_thread(views.best_text, ws))]
        if cmd.name == "last":
            return [_view(await asyncio.to_thread(views.history_text, ws, int(cmd.args or 5)))]
        if cmd.name == "plot":
            chart = await self.chart()
            return [chart] if chart else [text_message(plain("No finished experiments to plot yet."))]
        if cmd.name == "report":
            markdown = await asyncio.to_thread(views.report_markdown, ws)
            chart = await self.chart()
            return [text_message(plain(markdown)), *([chart] if chart else [])]
        raise AssertionError(f"no answer for {cmd.name}")  # SPECS and this method disagree

    async def chart(self) -> Photo | None:
        points = ledger.experiments(self.store)
        if not points:
            return None
        charts = state_dir(self.workspace) / "charts"
        path = charts / f"progress-{time.time_ns()}.png"
        await asyncio.to_thread(_prune, charts)
        from nightlab.bot.plots import progress_chart

        await asyncio.to_thread(progress_chart, points, path, self.metric_name, self.direction)
        return Photo(path, f"{len(points)} experiments")


def _view(text: str) -> Outgoing:
    return text_message(pre(text.rstrip() or "(nothing yet)"))


def _prune(charts: Path) -> None:
    cutoff = time.time() - CHART_KEEP_S
    for old in charts.glob("progress-*.png"):
        if old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
