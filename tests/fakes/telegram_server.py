"""A fake Telegram Bot API on 127.0.0.1: real HTTP for python-telegram-bot's real client.

Speaks the subset nightlab uses: getMe, deleteWebhook, long-polling getUpdates (offset and
timeout honoured; a second poller ends the first with 409 Conflict, as Telegram does),
sendMessage (HTML checked and measured the way Telegram does: at most 4096 characters after the
markup is parsed), multipart sendPhoto, setMyCommands. Tests inject
incoming messages, read what the bot sent, and script failures: `fail(...)` queues 429s
(`{"ok":false,"error_code":429,"parameters":{"retry_after":N}}`) or 500s for the next sends,
and `down()`/`up()` close and reopen the port (connection refused in between).
`hold(...)` keeps one matching send waiting (the chaos suite kills the bot meanwhile): either
already accepted, so only the reply is late, or not yet, so a client gone by `release()` never
delivered it.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import parse_qs

from tests.fakes.http_base import QuietServer, send_reply

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "nightlab", "username": "nightlab_test_bot",
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
SENDS = ("sendMessage", "sendPhoto")


@dataclass
class Sent:
    method: str
    chat_id: int
    text: str = ""  # the text as the user sees it (markup parsed)
    raw: str = ""  # what the bot posted
    parse_mode: str | None = None
    photo: bytes = b""
    caption: str = ""
    at: float = field(default_factory=time.monotonic)


class FakeTelegram:
    def __init__(self, token: str = "123456:TEST-token") -> None:
        self.token = token
        self.sent: list[Sent] = []
        self.attempts: list[tuple[str, float]] = []  # (method, time) of every send, failed ones too
        self.commands: list[dict[str, str]] | None = None
        self.methods: list[str] = []
        self._updates: list[dict[str, Any]] = []
        self._next_update = 1
        self._faults: deque[tuple[str, int]] = deque()
        self._polls = 0  # getUpdates calls so far: a newer one ends the one waiting
        self.conflicts = 0  # polls ended that way (409)
        self._migrated: dict[int, int] = {}  # group id -> the supergroup it became
        self._hold: tuple[str, bool] | None = None
        self.holding = threading.Event()  # a held send is waiting
        self._released = threading.Event()
        self.settled = threading.Event()  # the held send, released, was delivered or refused
        self._cond = threading.Condition()
        self._port = 0
        self._server: QuietServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        server = QuietServer(("127.0.0.1", self._port), self._handler())
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None
        with self._cond:
            # A real outage also breaks the client's kept-alive connections.
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()
            self._cond.notify_all()  # long polls in flight return (empty) now

    # -- test controls -----------------------------------------------------------------------
    def fail(self, kind: str, times: int = 1, retry_after: int = 1) -> None:
        """The next `times` sends get `kind`: "429" (with retry_after) or "500"."""
        with self._cond:
            self._faults.extend([(kind, retry_after)] * times)

    def migrate(self, group: int, supergroup: int) -> None:
        """The group became a supergroup: sends to its old id get Telegram's 400 naming the new one."""
        with self._cond:
            self._migrated[group] = supergroup

    def hold(self, contains: str, accepted: bool) -> None:
        """The next sendMessage whose visible text contains `contains` waits until `release()`.
        accepted=True: it counts as delivered at once (Telegram has it; only the reply is late).
        accepted=False: it is delivered at release only if the client is still connected."""
        with self._cond:
            self._hold = (contains, accepted)
            self.holding.clear()
            self._released.clear()
            self.settled.clear()

    def release(self) -> None:
        self._released.set()

    def inject(self, text: str, user_id: int, chat_id: int | None = None, chat_type: str = "",
               kind: str = "message", field: str = "text", **extra: Any) -> int:
        """A user writes to the bot; chat_id defaults to the user's private chat. `kind`: the
        update's kind ("edited_message", "channel_post", ...: delivered whatever allowed_updates
        said, as Telegram does with updates made before the getUpdates call that set it);
        `field`: "caption" puts the text in a photo's caption; `extra`: more message fields
        (forward_origin, via_bot, reply_to_message, a bot's "from")."""
        chat_id = user_id if chat_id is None else chat_id
        chat_type = chat_type or ("private" if chat_id == user_id else "group")
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        chat.update({"first_name": "U"} if chat_type == "private" else {"title": "lab"})
        message: dict[str, Any] = {
            "message_id": int(time.time() * 1000) % 10**9, "date": int(time.time()), "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": "U"}, field: text,
        }
        if text.startswith("/"):
            entities = "entities" if field == "text" else f"{field}_entities"
            message[entities] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        if field == "caption":
            message["photo"] = [{"file_id": "p", "file_unique_id": "u", "width": 1, "height": 1}]
        if kind.startswith("edited"):
            message["edit_date"] = int(time.time())
        message.update(extra)
        with self._cond:
            update_id = self._next_update
            self._next_update += 1
            self._updates.append({"update_id": update_id, kind: message})
            self._cond.notify_all()
        return update_id

    def messages(self, chat_id: int | None = None) -> list[Sent]:
        with self._cond:
            return [s for s in self.sent if chat_id is None or s.chat_id == chat_id]

    def wait_for(self, count: int, chat_id: int | None = None, timeout: float = 30.0) -> list[Sent]:
        """Block until at least `count` messages went to `chat_id` (or anywhere)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [s for s in self.sent if chat_id is None or s.chat_id == chat_id]
                if len(got) >= count or time.monotonic() >= deadline:
                    return got
                self._cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))

    # -- the API -----------------------------------------------------------------------------
    def _call(self, method: str, params: dict[str, Any], files: dict[str, bytes],
              alive: Callable[[], bool] = lambda: True) -> tuple[int, dict[str, Any]]:
        with self._cond:
            self.methods.append(method)
        if method == "getMe":
            return _ok(BOT_USER)
        if method in ("deleteWebhook", "setMyCommands"):
            if method == "setMyCommands":
                self.commands = json.loads(params["commands"])
            return _ok(True)
        if method == "getUpdates":
            updates = self._get_updates(int(params.get("offset", 0) or 0), float(params.get("timeout", 0) or 0))
            if updates is None:
                with self._cond:
                    self.conflicts += 1
                return 409, {"ok": False, "error_code": 409, "description": "Conflict: terminated by other"
                             " getUpdates request; make sure that only one bot instance is running"}
            return _ok(updates)
        if method in SENDS:
            return self._send(method, params, files, alive)
        return 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}

    def _get_updates(self, offset: int, timeout: float) -> list[dict[str, Any]] | None:
        """The updates; None when a newer getUpdates ended this one (a second program polling the
        same token: Telegram answers the older one 409 Conflict)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._polls += 1
            mine = self._polls
            self._cond.notify_all()
            # Like Telegram: an offset confirms (forgets) every earlier update.
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while (not self._updates and time.monotonic() < deadline and self._server is not None
                   and self._polls == mine):
                self._cond.wait(deadline - time.monotonic())
            return list(self._updates) if self._polls == mine or self._updates else None

    def _send(self, method: str, params: dict[str, Any], files: dict[str, bytes],
              alive: Callable[[], bool] = lambda: True) -> tuple[int, dict[str, Any]]:
        with self._cond:
            self.attempts.append((method, time.monotonic()))
            fault = self._faults.popleft() if self._faults else None
        if fault and fault[0] == "429":
            return 429, {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {fault[1]}",
                         "parameters": {"retry_after": fault[1]}}
        if fault:
            return 500, {"ok": False, "error_code": 500, "description": "Internal Server Error"}
        chat_id = int(params["chat_id"])
        if chat_id in self._migrated:
            return 400, {"ok": False, "error_code": 400,
                         "description": "Bad Request: group chat was upgraded to a supergroup chat",
                         "parameters": {"migrate_to_chat_id": self._migrated[chat_id]}}
        sent = Sent(method, chat_id, parse_mode=params.get("parse_mode"))
        if method == "sendMessage":
            sent.raw = params["text"]
            try:
                sent.text = _visible(sent.raw) if sent.parse_mode == "HTML" else sent.raw
            except ValueError as exc:
                return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: can't parse entities: {exc}"}
            if len(sent.text.encode("utf-16-le")) // 2 > 4096:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"}
            if not sent.text.strip():
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message text is empty"}
        else:
            sent.photo = files.get("photo", b"")
            sent.caption = params.get("caption", "")
            if not sent.photo:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: there is no photo in the request"}
        with self._cond:
            held = self._hold if self._hold and self._hold[0] in sent.text else None
            if held:
                self._hold = None
        message_id = self._record(sent) if held and held[1] else 0
        if held:
            self.holding.set()
            self._released.wait(60)
            if not held[1] and not alive():
                self.settled.set()
                return 500, {"ok": False, "error_code": 500, "description": "client gone"}
        message_id = message_id or self._record(sent)
        if held:
            self.settled.set()
        result: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()), "from": BOT_USER,
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
        }
        if method == "sendMessage":
            result["text"] = sent.text
        else:
            result["photo"] = [{"file_id": f"p{message_id}", "file_unique_id": f"u{message_id}",
                                "width": 800, "height": 400, "file_size": len(sent.photo)}]
            result["caption"] = sent.caption
        return _ok(result)

    def _record(self, sent: Sent) -> int:
        with self._cond:
            self.sent.append(sent)
            self._cond.notify_all()
            return len(self.sent)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of Telegram

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with fake._cond:
                    fake._connections.add(self.connection)

            def finish(self) -> None:
                with fake._cond:
                    fake._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                prefix = f"/bot{fake.token}/"
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.startswith(prefix):
                    self._reply(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
                    return
                params, files = _parse(self.headers.get("Content-Type", ""), body)
                status, payload = fake._call(self.path[len(prefix):].split("?")[0], params, files, self._alive)
                self._reply(status, payload)

            def _alive(self) -> bool:
                # A peer that closed its end reads as "readable with nothing to read".
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
                except OSError:
                    return False

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                send_reply(self, status, json.dumps(payload).encode(), "application/json")

        return Handler



def _ok(result: Any) -> tuple[int, dict[str, Any]]:
    return 200, {"ok": True, "result": result}


def _parse(content_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Form, JSON or multipart parameters (the Bot API accepts all three)."""
    if content_type.startswith("application/json"):
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(body or b"{}").items()}, {}
    if content_type.startswith("multipart/form-data"):
        msg = email.message_from_bytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body, policy=email.policy.HTTP
        )
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if part.get_filename():
                files[str(name)] = data
            else:
                params[str(name)] = data.decode()
        return params, files
    return {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}, {}


class _HTMLText(HTMLParser):
    """Telegram's HTML subset: checks tags balance, returns the visible text."""

    ALLOWED = frozenset({"b", "strong", "i", "em", "u", "s", "code", "pre", "a", "tg-spoiler", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.ALLOWED:
            raise ValueError(f"unsupported start tag \"{tag}\"")
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            raise ValueError(f"unmatched end tag \"{tag}\"")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _visible(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    if parser.stack:
        raise ValueError(f"unclosed tag \"{parser.stack[-1]}\"")
    # A bare "&" or "<" that is not an entity/tag is an error at Telegram too.
    stripped = markup
    for entity in ("&lt;", "&gt;", "&amp;", "&quot;"):
        stripped = stripped.replace(entity, "")
    if "&" in stripped:
        raise ValueError("unescaped '&'")
    return "".join(parser.parts)
