"""Who may do what: deny by default, two roles, allowlists from the config.

A user must be listed (as operator or viewer) AND speak where the bot listens: their own private
chat with the bot, or an allowed group chat / Slack channel. Being in an allowed channel grants
nothing by itself, so a colleague who joins #ml-night cannot pause the loop.
"""

from __future__ import annotations

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
