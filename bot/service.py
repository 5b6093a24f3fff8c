"""BotService: the chat side of the daemon, in one background thread with its own event loop.

The heartbeat daemon creates it with the settings, the resolved secrets and the workspace, calls
`start()` and, on shutdown, `stop(timeout)`. Inside: every configured channel (console when none
is), the router for incoming commands, and the outbox pump that turns the store's events into
messages. A channel that cannot connect is retried in the background; its messages wait in the
outbox. The engine is never blocked by any of it: it only writes events and reads commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from nightlab.bot.auth import Refusals, allowlists
from nightlab.bot.channel import Channel, Incoming, OnMessage
from nightlab.bot.outbox import Outbox, Tuning
from nightlab.bot.router import Router
from nightlab.loop.state.config import Redactor, Secrets, Settings, environment_secrets
from nightlab.loop.state.store import Store

log = logging.getLogger("nightlab.bot")

POLL_INTERVAL_S = 0.25  # how often new events are looked for: digests reach chats within ~1 s
RESTART_MAX_S = 60.0
DEFAULT_TUNING = Tuning()

def build_channels(settings: Settings, secrets: Secrets) -> list[Channel]:
    """The configured channels; the console when there are none. Adapters import their
    platform library only when configured (start-up time, memory)."""
    channels: list[Channel] = []
    if settings.telegram is not None and secrets.telegram_token is not None:
        from nightlab.bot.telegram import TelegramChannel

        channels.append(TelegramChannel(settings.telegram, secrets.telegram_token))
    if settings.slack is not None and secrets.slack_bot_token and secrets.slack_app_token:
        from nightlab.bot.slack import SlackChannel

        channels.append(SlackChannel(settings.slack, secrets.slack_bot_token, secrets.slack_app_token))
    if not channels:
        from nightlab.bot.console import ConsoleChannel

        channels.append(ConsoleChannel())
    return channels


class BotService:
    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        workspace: Path,
        *,
        channels: Sequence[Channel] | None = None,
        tuning: Tuning = DEFAULT_TUNING,
        refusals: Refusals | None = None,
    ) -> None:
        self.settings = settings
        self.workspace = Path(workspace)
        self.channels = list(channels) if channels is not None else build_channels(settings, secrets)
        self._secrets = [*secrets.values(), *environment_secrets()]
        self._tuning = tuning
        self._refusals = refusals
        self.ready = threading.Event()  # set once every channel is connected and the pump runs
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._drain_s = 0.0

    # -- the daemon's interface --------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("BotService already started")
        started = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(started,), name="nightlab-bot", daemon=True)
        self._thread.start()
        # The loop exists, so stop() can reach it, and the outbox's cursors are placed: every event
        # from now on (the daemon starts the engine next) reaches the chats.
        started.wait(10.0)

    def stop(self, timeout: float = 10.0) -> bool:
        """Send what is due (for up to half of `timeout`), disconnect and end the thread; True when
        it ended within `timeout`."""
        if self._thread is None:
            return True
        self._drain_s = timeout / 2
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- inside the thread -------------------------------------------------------------------
    def _main(self, started: threading.Event) -> None:
        try:
            asyncio.run(self._run(started))
        except Exception:
            log.exception("the bot thread ended with an error")

    async def _run(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            store = Store.for_workspace(self.workspace, follow=True)  # marks where the next start reads (the daemon's)
            outbox = Outbox(store, self.channels, self.settings.digest, self._tuning, secrets=self._secrets)
        finally:
            started.set()
        outbox.prune()
        router = Router(
            store, self.workspace, allowlists(self.settings), self.settings.project.metric, self.settings.project.direction,
            self._refusals, Redactor.of(self._secrets),
        )
        wake = asyncio.Event()

        def flush(name: str) -> None:
            """The channel is seen working again: what waits for it is due now."""
            outbox.channel_works(name)
            wake.set()

        async def on_message(msg: Incoming) -> None:
            try:
                flush(msg.channel)  # it delivered this message, so it is back
                replies = await router.handle(msg)
                if replies:
                    outbox.enqueue(msg.channel, msg.chat, replies)
                    wake.set()
            except Exception:  # never let one message take a channel's receiver down
                log.exception("handling a message from %s failed", msg.sender)

        for channel in self.channels:
            outage = getattr(channel, "outage", None)  # platform channels; the console has none
            if outage is not None:
                # Called from the library's threads: hop onto this loop.
                outage.on_back = lambda name=channel.name, loop=self._loop: loop.call_soon_threadsafe(flush, name)

        connected = [asyncio.Event() for _ in self.channels]
        starters = [asyncio.create_task(self._keep_starting(c, on_message, ev, wake))
                    for c, ev in zip(self.channels, connected)]
        pump = asyncio.create_task(self._pump(outbox, wake, connected))
        try:
            await self._stopping.wait()
            await self._drain(outbox, wake)
        finally:
            for task in (*starters, pump):
                task.cancel()
            await asyncio.gather(*starters, pump, return_exceptions=True)
            for channel in self.channels:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.stop(), 5.0)
            store.close()

    async def _drain(self, outbox: Outbox, wake: asyncio.Event) -> None:
        """On stop, give what is already due a bounded chance to go out: a session's last digest
        must not wait for the next start."""
        deadline = time.monotonic() + self._drain_s
        while time.monotonic() < deadline:
            outbox.fill()
            if not outbox.has_due(within_s=deadline - time.monotonic()):
                return
            wake.set()
            await asyncio.sleep(0.05)

    async def _keep_starting(self, channel: Channel, on_message: OnMessage, connected: asyncio.Event,
                             wake: asyncio.Event) -> None:
        delay = 1.0
        while True:
            try:
                await channel.start(on_message)
                connected.set()
                wake.set()  # what waited for the first connect goes out now
                return
            except Exception as exc:  # noqa: BLE001 - whatever the cause, try again later
                log.warning("%s: cannot connect (%s); retrying in %.0fs", channel.name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def _pump(self, outbox: Outbox, wake: asyncio.Event, connected: list[asyncio.Event]) -> None:
        deliveries: dict[tuple[str, str], asyncio.Task[None]] = {}
        try:
            await self._pump_forever(outbox, wake, connected, deliveries)
        finally:
            for task in deliveries.values():
                task.cancel()
            await asyncio.gather(*deliveries.values(), return_exceptions=True)

    async def _pump_forever(self, outbox: Outbox, wake: asyncio.Event, connected: list[asyncio.Event],
                            deliveries: dict[tuple[str, str], asyncio.Task[None]]) -> None:
        while True:
            try:
                outbox.fill()
                # a channel not connected yet is no outage: its messages wait, unsaid, for its first connect
                up = {c.name for c, ev in zip(self.channels, connected) if ev.is_set()}
                for key in outbox.destinations_waiting():
                    if key[0] not in up:
                        continue
                    task = deliveries.get(key)
                    if task is None or task.done():
                        # One task per destination: a slow chat never holds up another.
                        deliveries[key] = asyncio.create_task(outbox.deliver(*key))
            except Exception:
                log.exception("outbox pump")
            if not self.ready.is_set() and all(ev.is_set() for ev in connected):
                self.ready.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), POLL_INTERVAL_S)
            wake.clear()
