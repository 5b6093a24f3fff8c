"""The one formatter: a channel-neutral message (styled spans) rendered per channel and split.

Content is written once (digest.py, router.py) as `Span`s; each channel picks a `Flavour`
(Telegram HTML, Slack rich text, plain console text) that escapes, marks up and splits it. Splitting
works on spans, so every chunk is well-formed markup on its own: a <pre> block cut in two is
closed at the end of one chunk and opened again at the start of the next.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nightlab.loop.state.config import TERMINAL_CODES

Style = Literal["plain", "bold", "italic", "pre"]


@dataclass(frozen=True)
class Span:
    text: str
    style: Style = "plain"


def plain(text: str) -> Span:
    return Span(text)


def bold(text: str) -> Span:
    return Span(text, "bold")


def italic(text: str) -> Span:
    return Span(text, "italic")


def pre(text: str) -> Span:
    return Span(text, "pre")


@dataclass(frozen=True)
class Text:
    """A message to send: spans plus a one-line plain title (what an outage summary lists)."""

    spans: tuple[Span, ...]
    title: str


@dataclass(frozen=True)
class Photo:
    path: Path
    caption: str  # plain text; adapters send captions without markup


Outgoing = Text | Photo


def text_message(*spans: Span) -> Text:
    valid = tuple(Span(_valid(s.text), s.style) for s in spans)
    first_line = "".join(s.text for s in valid).strip().split("\n", 1)[0]
    return Text(valid, first_line[:200])


# Unicode's Bidi_Control characters: the embeddings and overrides (U+202A-U+202E), the isolates
# (U+2066-U+2069) and the marks (U+061C, U+200E, U+200F). An override shows a description
# backwards from what it says ("Trojan source"); a mark is no better: an RLM before "1 2" shows it
# as "2 1". All go: text from an agent or a log needs none, and right-to-left script displays
# readably without them (the bidi algorithm orders its letters; marks only place punctuation).
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _valid(text: str) -> str:
    # A lone surrogate (JSON's "\udcff", a path decoded with surrogateescape) can be neither
    # measured, stored nor sent: it becomes U+FFFD, and a split pair becomes its character again.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    # terminal codes and control characters: a run's log is written by code an agent edited
    return _BIDI.sub("", TERMINAL_CODES.sub("", text))


def utf16_len(s: str) -> int:
    # Telegram counts message length in UTF-16 code units (an emoji is 2); so do we, for both.
    return len(s.encode("utf-16-le")) // 2


@dataclass(frozen=True)
class Flavour:
    name: str
    limit: int  # the most characters one message may have
    escape: Callable[[str], str]
    marks: dict[str, tuple[str, str]]  # style -> (open, close)
    markup_counts: bool = True  # False: the limit applies to the text once markup is parsed (Telegram)

    def render(self, spans: Sequence[Span]) -> list[str]:
        """Render and split into messages within `limit`, at line ends when possible."""
        out: list[str] = []
        chunk, size, shown = "", 0, False  # shown: the chunk has text to see, not only blanks in marks
        for span in spans:
            start, end = self.marks.get(span.style, ("", ""))
            overhead = utf16_len(start + end) if self.markup_counts else 0
            body, body_size = "", 0
            for piece, cost in self._pieces(span.text, self.limit - overhead):
                if size + overhead + body_size + cost > self.limit:
                    if body:
                        chunk += start + body + end
                    if shown:
                        out.append(chunk)
                    chunk, size, shown, body, body_size = "", 0, False, "", 0
                body += piece
                body_size += cost
                shown = shown or bool(piece.strip())
            if body:
                chunk += start + body + end
                size += overhead + body_size
        if shown:
            out.append(chunk)
        return out

    def _cost(self, raw: str) -> int:
        return utf16_len(self.escape(raw) if self.markup_counts else raw)

    def _pieces(self, text: str, room: int) -> Iterator[tuple[str, int]]:
        """(escaped piece, cost): whole lines, and lines too long for one message cut by characters."""
        for line in text.splitlines(keepends=True):
            cost = self._cost(line)
            if cost <= room:
                yield self.escape(line), cost
                continue
            piece, piece_cost = "", 0
            for ch in line:  # escaped per character so an entity is never cut in half
                c = self._cost(ch)
                if piece_cost + c > room:
                    yield piece, piece_cost
                    piece, piece_cost = "", 0
                piece += self.escape(ch)
                piece_cost += c
            if piece:
                yield piece, piece_cost

    def pack(self, bodies: Sequence[str]) -> list[str]:
        """Join rendered messages into as few messages as fit, never cutting one in two."""
        out: list[str] = []
        current = ""
        for body in bodies:
            joined = f"{current}\n\n{body}" if current else body
            if current and utf16_len(joined) > self.limit:
                out.append(current)
                joined = body
            current = joined
        if current:
            out.append(current)
        return out

    def render_summary(self, head: str, lines: Sequence[str]) -> str:
        """One message: `head`, then a bullet per line, ending '… and N more' at the limit."""
        text = self.escape(head)
        for i, line in enumerate(lines):
            item = self.escape(f"• {line}\n")
            more = self.escape(f"… and {len(lines) - i} more\n")
            if utf16_len(text + item + more) > self.limit:
                return text + more
            text += item
        return text


TELEGRAM_HTML = Flavour(
    name="telegram-html",
    limit=4096,
    escape=lambda s: html.escape(s, quote=False),
    marks={"bold": ("<b>", "</b>"), "italic": ("<i>", "</i>"), "pre": ("<pre>", "</pre>")},
    markup_counts=False,  # "1-4096 characters after entities parsing"
)

# Slack gets a rich_text block (bot/slack.py): its text elements are shown as written, styles are
# flags beside them. Slack's mrkdwn has no escape for `*`, `_`, `~` or a backtick, so a note, a
# description or an error line holding them showed formatted there. A rendered body marks its
# spans with control characters, which `_valid` removes from every text, so none comes from
# outside; the outbox stores and joins bodies as text, and `slack_spans` reads them back.
_SLACK_MARKS: dict[str, tuple[str, str]] = {"bold": ("\x02", "\x03"), "italic": ("\x04", "\x05"), "pre": ("\x06", "\x07")}
_SLACK_STYLE: dict[str, Style] = {"\x02": "bold", "\x04": "italic", "\x06": "pre"}
_SLACK_MARKED = re.compile("([\x02\x04\x06])(.*?)[\x03\x05\x07]", re.S)

# 3000 characters a message, as a section block's text may hold (a rich_text block's limit is
# not documented): the limit that held before.
SLACK_RICH = Flavour(name="slack-rich-text", limit=3000, escape=lambda s: s, marks=_SLACK_MARKS)


def slack_spans(body: str) -> list[Span]:
    """A body SLACK_RICH rendered (or several joined), back as its spans."""
    spans, at = [], 0
    for m in _SLACK_MARKED.finditer(body):
        if m.start() > at:
            spans.append(plain(body[at:m.start()]))
        spans.append(Span(m.group(2), _SLACK_STYLE[m.group(1)]))
        at = m.end()
    if at < len(body):
        spans.append(plain(body[at:]))
    return spans


PLAIN = Flavour(name="plain", limit=1_000_000, escape=lambda s: s, marks={})
