"""A fake Slack on 127.0.0.1 for slack-sdk's real clients: the Web API over HTTP and Socket Mode
over a real WebSocket (the `websockets` server).

Web API: auth.test, apps.connections.open (hands out this fake's ws:// URL), chat.postMessage,
and the three steps of files_upload_v2 (files.getUploadURLExternal, the raw POST to the upload
URL, files.completeUploadExternal). `fail("429", retry_after=N)` answers the next posts with
HTTP 429 and a Retry-After header, as Slack does.

Socket Mode: every connection gets `hello`; `slash_command(...)` / `event(...)` send envelopes
and `acked(envelope_id)` says whether the client acknowledged one; `redeliver(envelope_id)` sends
one again as Slack's retry does (a new envelope, the same payload and event_id); `disconnect()` sends Slack's
`disconnect` message (refresh_requested) and closes, after which the client must reconnect
through apps.connections.open. `down()`/`up()`: an outage of both, the same ports after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import parse_qs

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.fakes.http_base import QuietServer, send_reply

BOT_USER_ID = "UBOT"


@dataclass
class Post:
    method: str  # chat.postMessage | file
    channel: str
    text: str = ""
    data: bytes = b""
    title: str = ""  # a file's
    unfurls: bool = False  # Slack would show a preview of a link or an image in it (its defaults)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)

    @property
    def shown(self) -> str:
        """What Slack shows of a message's rich_text blocks: each paragraph or code block on its
        own line, its text as written (the `text` field is only a notification's)."""
        return "\n".join("".join(part["text"] for part in element["elements"])
                         for block in self.blocks for element in block["elements"])

    def styled(self, style: str) -> list[str]:
        """The texts shown bold or italic, or ("pre") as code blocks."""
        return ["".join(part["text"] for part in element["elements"]) for block in self.blocks
                for element in block["elements"] if style == "pre" and element["type"] == "rich_text_preformatted"] + [
            part["text"] for block in self.blocks for element in block["elements"] for part in element["elements"]
            if (part.get("style") or {}).get(style)]


class FakeSlack:
    def __init__(self, bot_token: str = "xoxb-test", app_token: str = "xapp-test") -> None:
        self.bot_token, self.app_token = bot_token, app_token
        self.posts: list[Post] = []
        self.attempts: list[tuple[str, float]] = []
        self.acks: set[str] = set()
        self._sent: dict[str, dict[str, Any]] = {}  # envelope id -> the message, for redeliver
        self.connections_opened = 0
        self.sessions = 0  # WebSocket sessions begun (a dropped one may look open here for a moment)
        self._faults: deque[tuple[str, int]] = deque()
        self._uploads: dict[str, bytes] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._ws: ServerConnection | None = None
        self._http = QuietServer(("127.0.0.1", 0), self._handler())
        self._loop = asyncio.new_event_loop()
        self._threads = [threading.Thread(target=self._http.serve_forever, daemon=True),
                         threading.Thread(target=self._loop.run_forever, daemon=True)]
        self._ws_server: Any = None
        self._ports = (0, 0)  # (HTTP, WebSocket) while down

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/api/"

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        self._ws_server = self._run(self._serve())
        return self

    def __exit__(self, *exc: object) -> None:
        self._ws_server.close()
        self._run(self._ws_server.wait_closed())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._threads[1].join(10)
        self._loop.close()  # left to the garbage collector, its close raised "Invalid file descriptor"
        self._http.shutdown()
        self._http.server_close()

    async def _serve(self, port: int = 0) -> Any:
        return await serve(self._session, "127.0.0.1", port)  # must start inside the running loop

    def down(self) -> None:
        """An outage: the socket drops and both ports refuse connections until `up()`."""
        self._ports = (self._http.server_address[1], self._ws_server.sockets[0].getsockname()[1])
        self._ws_server.close()  # closes the open connection too
        self._run(self._ws_server.wait_closed())
        with self._cond:
            self._ws = None
        self._http.shutdown()
        self._http.server_close()

    def up(self) -> None:
        http_port, ws_port = self._ports
        self._http = QuietServer(("127.0.0.1", http_port), self._handler())
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self._ws_server = self._run(self._serve(ws_port))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self._ws_server.sockets[0].getsockname()[1]}/link"

    # -- Socket Mode -------------------------------------------------------------------------
    async def _session(self, ws: ServerConnection) -> None:
        with self._cond:
            self._ws = ws
            self.sessions += 1
            self._cond.notify_all()
        await ws.send(json.dumps({"type": "hello", "num_connections": 1,
                                  "debug_info": {"host": "fake"}, "connection_info": {"app_id": "A1"}}))
        with contextlib.suppress(ConnectionClosed):  # clients may drop without a close frame
            async for raw in ws:
                message = json.loads(raw)
                if "envelope_id" in message:
                    with self._cond:
                        self.acks.add(message["envelope_id"])
                        self._cond.notify_all()

    def connected(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._ws is None or self._ws.state.name != "OPEN":
                if time.monotonic() >= deadline:
                    return False
                self._cond.wait(0.05)
        return True

    def _envelope(self, kind: str, payload: dict[str, Any]) -> str:
        assert self.connected(), "no socket mode connection"
        envelope_id = f"env-{next(self._ids)}"
        message = {"envelope_id": envelope_id, "type": kind, "payload": payload,
                   "accepts_response_payload": kind == "slash_commands", "retry_attempt": 0}
        return self._send(message)

    def _send(self, message: dict[str, Any]) -> str:
        assert self._ws is not None
        self._sent[message["envelope_id"]] = message
        self._run(self._ws.send(json.dumps(message)))
        return str(message["envelope_id"])

    def redeliver(self, envelope_id: str, reason: str = "timeout") -> str:
        """Slack's retry of an envelope it saw no ack for in time: the same payload (event_id and
        all) in a new envelope, with retry_attempt counting up and the reason."""
        assert self.connected(), "no socket mode connection"
        old = self._sent[envelope_id]
        return self._send({**old, "envelope_id": f"env-{next(self._ids)}",
                           "retry_attempt": old["retry_attempt"] + 1, "retry_reason": reason})

    def slash_command(self, text: str, user: str, channel: str) -> str:
        return self._envelope("slash_commands", {
            "command": "/nightlab", "text": text, "user_id": user, "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "lab",
            "team_id": "T1", "response_url": "http://127.0.0.1/unused", "trigger_id": "t",
        })

    def event(self, event: dict[str, Any]) -> str:
        return self._envelope("events_api", {"type": "event_callback", "team_id": "T1", "event": event,
                                             "event_id": f"Ev{next(self._ids)}"})

    def acked(self, envelope_id: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while envelope_id not in self.acks:
                if time.monotonic() >= deadline:
                    return False
                self._cond.wait(0.05)
        return True

    def disconnect(self) -> None:
        """Slack's periodic refresh: a `disconnect` message, then the socket closes."""
        ws = self._ws
        assert ws is not None
        with self._cond:
            self._ws = None
        self._run(ws.send(json.dumps({"type": "disconnect", "reason": "refresh_requested"})))
        self._run(ws.close())

    # -- Web API -----------------------------------------------------------------------------
    def fail(self, kind: str, times: int = 1, retry_after: int = 1) -> None:
        with self._cond:
            self._faults.extend([(kind, retry_after)] * times)

    def wait_for(self, count: int, channel: str | None = None, timeout: float = 30.0) -> list[Post]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [p for p in self.posts if channel is None or p.channel == channel]
                if len(got) >= count or time.monotonic() >= deadline:
                    return got
                self._cond.wait(0.05)

    def _api(self, method: str, token: str, params: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if token != expected:
            return 200, {"ok": False, "error": "invalid_auth"}, {}
        if method == "auth.test":
            return 200, {"ok": True, "user_id": BOT_USER_ID, "bot_id": "B1", "team_id": "T1"}, {}
        if method == "apps.connections.open":
            with self._cond:
                self.connections_opened += 1
            return 200, {"ok": True, "url": self.ws_url}, {}
        if method in ("chat.postMessage", "files.completeUploadExternal"):
            with self._cond:
                self.attempts.append((method, time.monotonic()))
                fault = self._faults.popleft() if self._faults else None
            if fault and fault[0] == "429":
                return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(fault[1])}
            if fault:
                return 500, {"ok": False, "error": "fatal_error"}, {}
        if method == "chat.postMessage":
            text = str(params.get("text", ""))
            if not text or len(text) > 40000:
                return 200, {"ok": False, "error": "msg_too_long" if text else "no_text"}, {}
            blocks = params.get("blocks") or []
            blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
            if any(not part.get("text") for block in blocks for element in block.get("elements", [])
                   for part in element.get("elements", [])):  # Slack refuses an empty text element
                return 200, {"ok": False, "error": "invalid_blocks"}, {}
            unfurls = _flag(params.get("unfurl_links"), False) or _flag(params.get("unfurl_media"), True)
            self._record(Post(method, str(params["channel"]), text=text, unfurls=unfurls, blocks=blocks))
            return 200, {"ok": True, "channel": params["channel"], "ts": f"{time.time():.6f}"}, {}
        if method == "files.getUploadURLExternal":
            file_id = f"F{next(self._ids)}"
            base = self.api_url.removesuffix("/api/")
            return 200, {"ok": True, "upload_url": f"{base}/upload/{file_id}", "file_id": file_id}, {}
        if method == "files.completeUploadExternal":
            files = json.loads(params["files"]) if isinstance(params["files"], str) else params["files"]
            for f in files:
                self._record(Post("file", str(params.get("channel_id", "")),
                                  text=str(params.get("initial_comment", "")), data=self._uploads.get(f["id"], b""),
                                  title=str(f.get("title", ""))))
            return 200, {"ok": True, "files": [{"id": f["id"], "title": f.get("title", "")} for f in files]}, {}
        return 200, {"ok": False, "error": "unknown_method"}, {}

    def _record(self, post: Post) -> None:
        with self._cond:
            self.posts.append(post)
            self._cond.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/upload/"):
                    fake._uploads[self.path.removeprefix("/upload/")] = body
                    self._reply(200, b"OK - uploaded", "text/plain", {})
                    return
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("application/json"):
                    params = json.loads(body or b"{}")
                else:
                    params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                token = token or str(params.get("token", ""))
                status, payload, headers = fake._api(self.path.removeprefix("/api/").split("?")[0], token, params)
                self._reply(status, json.dumps(payload).encode(), "application/json", headers)

            do_GET = do_POST

            def _reply(self, status: int, data: bytes, ctype: str, headers: dict[str, str]) -> None:
                send_reply(self, status, data, ctype, headers)

        return Handler


def _flag(value: Any, default: bool) -> bool:
    """A boolean parameter as Slack reads it: JSON true/false or a form's "true"/"1"."""
    if value is None:
        return default
    return value is True or str(value).lower() in ("true", "1")
