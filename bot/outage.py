"""What the journal says when a chat platform cannot be reached: one WARNING when the connection is
lost and one when it is back. The platform libraries retry on their own and log every failed
attempt (slack-sdk an ERROR line every few seconds, python-telegram-bot a warning per poll and a
chained traceback when stopped during an outage); those repeat the same fact, so they are folded
into the two lines here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("nightlab.bot")


class Outage:
    """The connection state of one channel, fed by its adapter and by library log records."""

    def __init__(self, channel: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = channel
        self._clock = clock
        self._since: float | None = None
        self._lock = threading.Lock()  # the libraries report from their own threads
        self.on_back: Callable[[], None] | None = None  # the bot service: deliver what waits, now

    @property
    def down(self) -> bool:
        return self._since is not None

    def lost(self, what: str) -> None:
        with self._lock:
            first = self._since is None
            if first:
                self._since = self._clock()
        if first:
            log.warning("%s: connection lost (%s); retrying quietly until it is back", self.channel, what)

    def back(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.warning("%s: connected again after %.0fs", self.channel, self._clock() - since)
            if self.on_back is not None:
                self.on_back()


class LibraryLog(logging.Filter):
    """On a library's logger: its warnings and errors about the connection become `Outage.lost`
    (and are dropped), a record containing `back_marker` becomes `Outage.back`. Records that
    contain one of `keep` (a bug in our own listener, say) pass through unchanged."""

    def __init__(self, outage: Outage, back_marker: str = "", keep: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.outage = outage
        self.back_marker = back_marker
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(k in message for k in self.keep):
            return True
        if self.back_marker and self.back_marker in message:
            self.outage.back()
        elif record.levelno >= logging.WARNING:
            self.outage.lost(message.splitlines()[0][:200] if message else record.levelname)
        return False
