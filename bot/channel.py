"""The contract between the bot's core (router, outbox) and a chat platform adapter.

An adapter turns the platform's incoming messages into `Incoming` and delivers already rendered
text or a photo to one destination, raising `DeliveryError` to say whether and when to retry.
Everything else (who may do what, what to say, retries, order) lives outside the adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nightlab.bot.format import Flavour


@dataclass(frozen=True)
class Incoming:
    channel: str  # "telegram" | "slack"
    user: str  # platform user id, as text
    chat: str  # where it was said, and where the reply goes
    private: bool  # a one-to-one chat (strangers there get a short refusal)
    text: str
    addressed: bool = True  # an explicit command (Telegram "/x", Slack slash or mention)
    written_at: float | None = None  # when the sender wrote it (Telegram keeps a day of them), if known

    @property
    def sender(self) -> str:
        return f"{self.channel}:{self.user}"


OnMessage = Callable[[Incoming], Coroutine[Any, Any, None]]  # a coroutine: Slack schedules it from its threads


class DeliveryError(Exception):
    """Sending failed. `retry_after`: the platform said when to try again; `permanent`: never retry."""

    def __init__(self, message: str, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


class Channel(Protocol):
    name: str
    flavour: Flavour
    # Also show progress lines (an experiment started): the console, where a person watches the
    # night go by; a chat gets only what the digest mode sends.
    progress: bool

    def destinations(self) -> list[str]:
        """Where digests go."""
        ...

    async def start(self, on_message: OnMessage) -> None:
        """Connect and start receiving; raises when the platform cannot be reached (retried)."""
        ...

    async def send_text(self, destination: str, body: str) -> None: ...

    async def send_photo(self, destination: str, path: Path, caption: str) -> None: ...

    async def stop(self) -> None: ...
