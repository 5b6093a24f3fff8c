"""The one command router for every channel: who is asking, what they asked, the one answer.

The text is parsed once, against the registry (loop/state/commands.py) and the proposer's focus
areas; the typed command it gives carries the role it needs. A read-only command is answered here
from its view (and the chart); a steering command goes to loop.state.steering.queue, the same path
as `nightlab ctl`: written to the store for the engine's next checkpoint, and answered with what
will happen and when. Nothing a chat sends can raise out of here or reach the loop unparsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from nightlab.bot.auth import Allowlist, Refusals, Role
from nightlab.bot.channel import Incoming
from nightlab.bot.format import Outgoing, Photo, bold, plain, pre, text_message
from nightlab.loop.state import ledger, steering
from nightlab.loop.state.commands import Help, Plot, Steer, View, parse_command
from nightlab.loop.state.config import Redactor
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import Store, state_dir
from nightlab.loop.state.views import chart_caption, duration

log = logging.getLogger("nightlab.bot")

CHART_KEEP_S = 24 * 3600  # charts are kept a day: a queued photo must still find its file
# Telegram hands a restarted daemon the messages of the last day: a /kill written at 3 am while
# nightlab was down would stop whatever runs when it is back. Older steering is said, not applied.
STEER_STALE_S = 600.0


class Router:
    def __init__(
        self,
        store: Store,
        workspace: Path,
        allowlists: dict[str, Allowlist],
        metric_name: str = "val_bpb",
        direction: str = "minimize",
        refusals: Refusals | None = None,
        redact: Redactor = Redactor(),
    ) -> None:
        self.store = store
        self.redact = redact  # a token pasted into a note would be stored and put in the agent's prompt
        self.workspace = workspace
        self.allowlists = allowlists
        self.metric_name = metric_name
        self.direction = direction
        self.refusals = refusals or Refusals()

    async def handle(self, msg: Incoming) -> list[Outgoing]:
        """The replies to send back to `msg.chat` (empty: stay silent)."""
        if not msg.addressed:
            return []  # group chatter that is not a command
        allow = self.allowlists.get(msg.channel)
        role = allow.role(msg) if allow else None
        if role is None:
            if not msg.private:  # strangers in groups get nothing, not even a sign the bot listens
                log.warning("refused %s in %s (group): %.80r", msg.sender, msg.chat, msg.text)
                return []
            if not self.refusals.due(msg.sender):
                log.debug("dropped %s's message unanswered (refused already): %.80r", msg.sender, msg.text)
                return []
            log.warning("refused %s in %s (private): %.80r; its next messages for %.0f min go unanswered",
                        msg.sender, msg.chat, msg.text, self.refusals.window_s / 60)
            return [text_message(plain(f"⛔ Not authorised (your id: {msg.user}). Ask the owner to add it."))]
        try:
            cmd = parse_command(self.redact(msg.text), ledger.areas(self.store))
        except UserError as exc:
            return [text_message(plain(f"⚠️ {exc}"))]
        except Exception:  # a bug in reading it: the sender still gets an answer, the log the traceback
            log.exception("reading %.80r from %s failed", msg.text, msg.sender)
            return [_failed("that command")]
        if cmd.role is Role.OPERATOR and role is not Role.OPERATOR:
            log.warning("refused %s from viewer %s", cmd.name, msg.sender)
            return [text_message(plain(f"🔒 {cmd.name} changes the loop; only operators may send it."))]
        if isinstance(cmd, Steer) and msg.written_at is not None and time.time() - msg.written_at > STEER_STALE_S:
            log.warning("not applied: %s from %s, written %s ago", cmd.text(), msg.sender,
                        duration(time.time() - msg.written_at))
            return [text_message(plain(
                f"⚠️ not applied: your /{cmd.text()} was written {duration(time.time() - msg.written_at)} ago and"
                " reached nightlab only now (it was not running, or offline); send it again if you still mean it"))]
        try:
            if isinstance(cmd, Steer):
                reply = await asyncio.to_thread(steering.queue, self.store, self.workspace, cmd, msg.sender,
                                                f"{msg.channel}:{msg.chat}")
                return [text_message(plain(f"✔ {reply}"))]
            assert isinstance(cmd, View)  # every command is one or the other
            return await self._answer(cmd)
        except UserError as exc:  # e.g. nothing running to kill
            return [text_message(plain(f"⚠️ {exc}"))]
        except Exception:
            log.exception("command %r from %s failed", cmd.text(), msg.sender)
            return [_failed(cmd.name)]

    # -- read-only ---------------------------------------------------------------------------
    async def _answer(self, cmd: View) -> list[Outgoing]:
        if isinstance(cmd, Plot):  # the chart is the answer
            chart = await self.chart()
            return [chart] if chart else [text_message(plain("No finished experiments to plot yet."))]
        text = await asyncio.to_thread(cmd.answer, self.workspace)
        if isinstance(cmd, Help):
            return [text_message(bold("nightlab commands"), plain("\n"), pre(text))]
        if cmd.chart:  # the report: its text, then the chart
            chart = await self.chart()
            return [text_message(plain(text)), *([chart] if chart else [])]
        return [_view(text)]

    async def chart(self) -> Photo | None:
        points = ledger.experiments(self.store)
        if not points:
            return None
        charts = state_dir(self.workspace) / "charts"
        path = charts / f"progress-{time.time_ns()}.png"
        await asyncio.to_thread(_prune, charts)
        from nightlab.bot.plots import progress_chart

        await asyncio.to_thread(progress_chart, points, path, self.metric_name, self.direction)
        return Photo(path, await asyncio.to_thread(chart_caption, self.workspace))


def _failed(what: str) -> Outgoing:
    return text_message(plain(f"⚠️ {what} failed on the server; the log has the details."))


def _view(text: str) -> Outgoing:
    return text_message(pre(text.rstrip() or "(nothing yet)"))


def _prune(charts: Path) -> None:
    cutoff = time.time() - CHART_KEEP_S
    for old in charts.glob("progress-*.png"):
        if old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
