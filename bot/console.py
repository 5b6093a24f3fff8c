"""The console channel: digests on stdout when no chat platform is configured.

It receives nothing: on a terminal, commands go through `nightlab ctl`, which writes them to the
store like the chat channels do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from nightlab.bot.channel import OnMessage
from nightlab.bot.format import PLAIN


class ConsoleChannel:
    name = "console"
    flavour = PLAIN
    progress = True

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def destinations(self) -> list[str]:
        return ["stdout"]

    async def start(self, on_message: OnMessage) -> None:
        return None

    async def send_text(self, destination: str, body: str) -> None:
        out = self._stream or sys.stdout  # looked up late so pytest's capture sees it
        print(body, file=out, flush=True)

    async def send_photo(self, destination: str, path: Path, caption: str) -> None:
        out = self._stream or sys.stdout
        print(f"[chart] {caption}: {path}", file=out, flush=True)

    async def stop(self) -> None:
        return None
