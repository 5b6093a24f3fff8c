"""A fake Hugging Face file server for the download code: real HTTP on 127.0.0.1.

Serves `files` under HF's dataset path and plays scripted faults per file, one per
request, before serving it normally:

    "500"      answer 500 Internal Server Error
    "truncate" announce the full Content-Length, send half the body, close the connection

A file that is not in `files` gets a 404. Every request path is logged in `requests`.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

PREFIX = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main"


class FakeHF:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{PREFIX}"

    def fail(self, name: str, *faults: str) -> None:
        """Queue faults for the next requests of `name`."""
        with self._lock:
            self.faults[name].extend(faults)

    def requested(self, name: str) -> int:
        with self._lock:
            return sum(1 for path in self.requests if path.endswith("/" + name))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                with fake._lock:
                    fake.requests.append(self.path)
                    fault = fake.faults[name].popleft() if fake.faults[name] else None
                    body = fake.files.get(name) if self.path.startswith(PREFIX + "/") else None
                if body is None:
                    self.send_error(404, "Entry not found")
                elif fault == "500":
                    self.send_error(500, "Internal Server Error")
                elif fault == "truncate":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        return Handler
