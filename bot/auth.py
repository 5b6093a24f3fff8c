"""Who may do what: deny by default, two roles, allowlists from the config.

A user must be listed (as operator or viewer) AND speak where the bot listens: their own private
chat with the bot, or an allowed group chat / Slack channel. Being in an allowed channel grants
nothing by itself, so a colleague who joins #ml-night cannot pause the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nightlab.bot.channel import Incoming
from nightlab.loop.state.commands import Role  # what each command needs: its spec says
from nightlab.loop.state.config import Settings


@dataclass(frozen=True)
class Allowlist:
    operators: frozenset[str]
    viewers: frozenset[str]
    chats: frozenset[str]

    def role(self, msg: Incoming) -> Role | None:
        if msg.private:
            # Telegram: a private chat's id is the user's id; Slack DMs are checked by the adapter.
            if msg.channel == "telegram" and msg.chat != msg.user:
                return None
        elif msg.chat not in self.chats:
            return None
        if msg.user in self.operators:
            return Role.OPERATOR
        if msg.user in self.viewers:
            return Role.VIEWER
        return None


REFUSAL_WINDOW_S = 600.0


class Refusals:
    """Whether a stranger is told "not authorised" now: once per window each. One who keeps
    writing would otherwise spend our rate limit on refusals, and the 429s delay the owner's
    digests. Monotonic time, so a clock change cannot reopen the window; injectable for tests."""

    def __init__(self, window_s: float = REFUSAL_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._told: dict[str, float] = {}  # sender -> when told; oldest first, as inserted

    def due(self, sender: str) -> bool:
        now = self._clock()
        # Forget windows that are over, oldest first: only one window's strangers are remembered.
        while self._told:
            oldest = next(iter(self._told))
            if now - self._told[oldest] < self.window_s:
                break
            del self._told[oldest]
        if sender in self._told:
            return False
        self._told[sender] = now
        return True


def allowlists(settings: Settings) -> dict[str, Allowlist]:
    lists: dict[str, Allowlist] = {}
    if settings.telegram is not None:
        t = settings.telegram
        lists["telegram"] = Allowlist(_ids(t.operators), _ids(t.viewers), _ids(t.chats))
    if settings.slack is not None:
        s = settings.slack
        lists["slack"] = Allowlist(_ids(s.operators), _ids(s.viewers), _ids(s.channels))
    return lists


def _ids(values: tuple[int, ...] | tuple[str, ...]) -> frozenset[str]:
    return frozenset(str(v) for v in values)
