"""HTTP plumbing the fake platform servers share (the fakes differ only in what they answer)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up (a cancelled long poll, a stopping bot) is not news

    def serve_forever(self, poll_interval: float = 0.05) -> None:
        # shutdown() waits for the loop's next look at its flag: 0.5 s by default, on every teardown
        super().serve_forever(poll_interval)


def send_reply(
    handler: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)
