"""The Slack channel: Socket Mode in, the Web API out (slack-sdk).

Socket Mode needs no public URL. We use slack-sdk's builtin Socket Mode client because it needs
no extra dependency (the aiohttp and websockets variants would add one to the daemon); it runs
in its own threads, so incoming requests are acknowledged there at once and handed to our event
loop. Commands are handled one at a time in the order Slack delivered them, as Telegram's are (a
/pause then a /resume sent at once must not be applied the other way round): the client's
listeners run on one thread (`concurrency=1`, its default is a pool of 10) and hand each message
to one task on our loop through a queue. The WebClient is synchronous and runs in a worker thread.
Its 429s are not retried inside slack-sdk: they come back as DeliveryError with the
Retry-After the server sent, and the outbox waits exactly that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket as sockets
from collections import OrderedDict
from pathlib import Path
from typing import Any

from nightlab.bot.channel import DeliveryError, Incoming, OnMessage
from nightlab.bot.format import SLACK_RICH, Span, slack_spans
from nightlab.bot.outage import LibraryLog, Outage
from nightlab.loop.state.config import Secret, SlackSettings
from slack_sdk.errors import SlackApiError, SlackClientNotConnectedError
from slack_sdk.models.blocks import (
    RichTextBlock,
    RichTextElementParts,
    RichTextPreformattedElement,
    RichTextSectionElement,
)
from slack_sdk.socket_mode import SocketModeClient
from slack_sdk.socket_mode.client import BaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web import WebClient

log = logging.getLogger("nightlab.bot")

SLASH_COMMAND = "/nightlab"
_MENTION = re.compile(r"<@[A-Z0-9]+(\|[^>]*)?>")
# Slack redelivers an event whose ack it did not see in time: at once, after ~1 min and ~5 min,
# also on the new connection after a reconnect, always with the same event_id. Only those few
# minutes matter, so the last few hundred ids cover them many times over at a chat's pace, and
# the memory stays the same size all night.
SEEN_EVENTS = 512


class SlackChannel:
    name = "slack"
    flavour = SLACK_RICH
    progress = False

    def __init__(self, settings: SlackSettings, bot_token: Secret, app_token: Secret) -> None:
        self.settings = settings
        self._bot_token = bot_token
        self._app_token = app_token
        self._web: WebClient | None = None
        self._socket: SocketModeClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[Incoming] | None = None  # in Slack's order, handled one at a time
        self._handler: asyncio.Task[None] | None = None
        self._me = ""  # the bot's own member id (auth.test)
        self._seen = _Seen(SEEN_EVENTS)
        self.outage = Outage(self.name)
        # slack-sdk logs through this logger (ours, not its own): an outage reads as two lines.
        # A logger of this channel's own (not in the global registry, so none accumulate filters),
        # under nightlab.bot for its handlers.
        self._library_log = logging.Logger("nightlab.bot.slack_sdk", logging.INFO)  # the reconnect is INFO
        self._library_log.parent = log
        self._library_log.addFilter(LibraryLog(self.outage, back_marker="A new session has been established",
                                               keep=("Failed to run a",)))

    def destinations(self) -> list[str]:
        # Allowed channels get the digests; without any, each listed user as a DM.
        ids = self.settings.channels or (*self.settings.operators, *self.settings.viewers)
        return list(dict.fromkeys(ids))

    async def start(self, on_message: OnMessage) -> None:
        self._loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {"base_url": self.settings.api_base} if self.settings.api_base else {}
        web = WebClient(token=self._bot_token.reveal(), timeout=10, logger=self._library_log, **kwargs)
        me = await asyncio.to_thread(web.auth_test)  # fails fast on a bad token or no network
        self._me = str(me.get("user_id", ""))
        socket = SocketModeClient(
            app_token=self._app_token.reveal(),
            web_client=web,  # apps.connections.open goes to the same base_url
            auto_reconnect_enabled=True,
            logger=self._library_log,
            concurrency=1,  # listeners in delivery order (see the module's docstring)
        )
        socket.socket_mode_request_listeners.append(self._receive)
        self._inbox = asyncio.Queue()  # before the first message can come
        self._handler = asyncio.create_task(self._handle_in_order(self._inbox, on_message))
        try:
            await asyncio.to_thread(socket.connect)
        except BaseException:
            self._handler.cancel()
            await asyncio.to_thread(_close, socket)
            raise
        self._web, self._socket = web, socket
        log.info("slack: socket mode connected")

    @staticmethod
    async def _handle_in_order(inbox: asyncio.Queue[Incoming], on_message: OnMessage) -> None:
        # on_message never raises (the service logs what a message's handling raised)
        while True:
            await on_message(await inbox.get())

    # -- incoming (runs in the Socket Mode client's threads) ----------------------------------
    def _receive(self, client: BaseSocketModeClient, req: SocketModeRequest) -> None:
        # Acknowledge first: Slack redelivers what is not acked within 3 s.
        try:
            client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
        except SlackClientNotConnectedError as exc:  # the connection went (a reconnect): nothing is lost
            # Not handled now: the copy Slack sends on the new connection is (a slash command has no
            # event id to tell the two apart).
            log.warning("slack: could not acknowledge %s %s (%s); Slack delivers it again after the reconnect",
                        req.type, req.envelope_id, exc)
            return
        event_id = str(req.payload.get("event_id") or "") if req.type == "events_api" else ""
        if event_id and not self._seen.first(event_id):  # a /note or /kill must not run twice
            log.info("slack: event %s came again (retry %s: %s); it was handled already", event_id,
                     req.retry_attempt, req.retry_reason)
            return
        msg = _incoming(req, self._me)
        if msg is not None and self._loop is not None and self._inbox is not None:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, msg)

    # -- outgoing ----------------------------------------------------------------------------
    async def send_text(self, destination: str, body: str) -> None:
        web = self._connected()
        spans = slack_spans(body)
        # No previews: an image URL in an agent's description would put its picture in the channel.
        # `text` is what a notification shows (mrkdwn: its three reserved characters escaped).
        await _call(web.chat_postMessage, channel=destination, text=_escape("".join(s.text for s in spans)),
                    blocks=[_rich_text(spans)], unfurl_links=False, unfurl_media=False)
        self.outage.back()

    async def send_photo(self, destination: str, path: Path, caption: str) -> None:
        web = self._connected()
        await _call(web.files_upload_v2, channel=destination, file=str(path), filename=path.name,
                    title=caption.split("\n", 1)[0], initial_comment=caption)  # a title of one line
        self.outage.back()

    def _connected(self) -> WebClient:
        if self._web is None:
            raise DeliveryError("slack is not connected yet")
        return self._web

    async def stop(self) -> None:
        if self._handler is not None:
            self._handler.cancel()
            self._handler = None
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await asyncio.to_thread(_close, socket)


class _Seen:
    """The most recent `size` event ids. Looked at by the one listener thread only (concurrency=1)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first(self, event_id: str) -> bool:
        """Whether this is the first time `event_id` is seen (it is remembered from now on)."""
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


def _close(client: SocketModeClient) -> None:
    """slack-sdk's close joins threads that each wait out a timeout before they notice: the
    receiver sits in a recv (3 s), the message processor in a queue get (1 s). Shutting the
    socket down and queueing an empty message wake them at once, so a stop takes milliseconds."""
    session = client.current_session
    sock = session.sock if session is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone: nothing to wake
            sock.shutdown(sockets.SHUT_RDWR)
    client.closed = True  # what close() sets first; the processor checks it once woken
    client.message_queue.put(None)  # an empty message: the processor skips it
    client.close()


def _incoming(req: SocketModeRequest, me: str) -> Incoming | None:
    p = req.payload
    if req.type == "slash_commands" and p.get("command") == SLASH_COMMAND:
        channel = str(p.get("channel_id", ""))
        return Incoming("slack", str(p.get("user_id", "")), channel, _is_dm(channel),
                        _unescape(str(p.get("text", ""))).strip() or "help")
    if req.type != "events_api":
        return None
    event = p.get("event", {})
    if event.get("bot_id") or event.get("subtype"):
        return None  # our own posts and edits/joins: never answer those
    channel = str(event.get("channel", ""))
    raw = str(event.get("text", "")).strip()
    text = _unescape(_MENTION.sub("", raw)).strip() or "help"
    if event.get("type") == "app_mention":
        # Slack's `/cmd@otherbot`: "@otherbot pause, cc @nightlab" mentions us but speaks to
        # another; only a message that starts by addressing this bot is a command for it (this
        # very id: <@UBOT2> is someone else).
        if not re.match(rf"<@{re.escape(me)}(\|[^>]*)?>", raw):
            return None
        return Incoming("slack", str(event.get("user", "")), channel, _is_dm(channel), text)
    if event.get("type") == "message" and event.get("channel_type") == "im":
        return Incoming("slack", str(event.get("user", "")), channel, True, text)
    return None  # channel chatter (a mention there also arrives as app_mention)


def _rich_text(spans: list[Span]) -> RichTextBlock:
    """The spans as one rich_text block: every text literal (a note's `*`, `_`, `~` or backtick, a
    `<!channel>` in a log, are shown as written), bold and italic as styles, a pre span a code block.
    A code block is a paragraph of its own: the line breaks at its edges would show as empty lines."""
    parts: list[tuple[str, str]] = []  # (style, text)
    for span in spans:
        text = span.text.strip("\n") if span.style == "pre" else span.text
        if parts and "pre" in (span.style, parts[-1][0]):  # the break between a paragraph and a code block
            parts[-1] = (parts[-1][0], parts[-1][1].rstrip("\n"))
            text = text.lstrip("\n")
        parts.append((span.style, text))
    elements: list[RichTextSectionElement | RichTextPreformattedElement] = []
    section: list[RichTextElementParts.Text] = []
    for style, text in parts:
        if style == "pre":
            if section:
                elements.append(RichTextSectionElement(elements=section))
                section = []
            if text:
                elements.append(RichTextPreformattedElement(elements=[RichTextElementParts.Text(text=text)]))
        elif text:
            flags = {style: True} if style in ("bold", "italic") else None
            section.append(RichTextElementParts.Text(text=text, style=flags))
    if section:
        elements.append(RichTextSectionElement(elements=section))
    return RichTextBlock(elements=elements)


def _escape(text: str) -> str:
    # the three characters Slack's mrkdwn reserves, as its docs say to escape them
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _unescape(text: str) -> str:
    # Slack sends &, < and > as these three entities (and only these); &amp; last, so a typed
    # "&lt;" (sent as "&amp;lt;") stays "&lt;".
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _is_dm(channel: str) -> bool:
    return channel.startswith("D")  # Slack's direct-message conversation ids


async def _call(method: Any, **kwargs: Any) -> None:
    try:
        await asyncio.to_thread(method, **kwargs)
    except SlackApiError as exc:
        status = exc.response.status_code
        if status == 429:
            after = float(exc.response.headers.get("Retry-After", exc.response.headers.get("retry-after", 1)))
            raise DeliveryError(f"slack 429 (retry after {after:g}s)", retry_after=after) from None
        error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
        raise DeliveryError(f"slack: {error or status}", permanent=status < 500 and bool(error)) from None
    except Exception as exc:  # noqa: BLE001 - URLError, timeouts, a closed connection: try again later
        raise DeliveryError(f"slack: {exc!r}") from None
