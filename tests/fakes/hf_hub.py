"""A fake Hugging Face Hub for kernel repositories: real HTTP on 127.0.0.1, the endpoints that
huggingface_hub (and so the `kernels` library) calls to resolve and download a kernel:

    GET  /api/kernels/{repo}/refs                          branches (a kernel's version N is branch vN)
    GET  /api/kernels/{repo}/revision/{rev}                repo info: the commit sha of a revision
    GET  /api/kernels/{repo}/tree/{rev}[/{path}]           listing (?recursive=true), files and folders
    HEAD /kernels/{repo}/resolve/{rev}/{file}              file metadata (commit, etag, size)
    GET  /kernels/{repo}/resolve/{rev}/{file}              file content

A repository is {branch: {path: bytes}}; each branch is one commit whose sha is derived from its
files. Unknown repos, revisions and files get the Hub's 404s (with its X-Error-Code header).
Every request is logged in `requests` ("GET /api/..."), so a test can tell that nothing was asked.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fakes.http_base import QuietServer, send_reply

Repo = dict[str, dict[str, bytes]]  # branch -> path -> content

_API = re.compile(r"^/api/kernels/(?P<repo>[^/]+/[^/]+)/(?P<what>refs|revision|tree)(?:/(?P<rev>[^/]+)(?P<path>/.*)?)?$")
_RESOLVE = re.compile(r"^/kernels/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_id(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as its `oid` and etag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_sha(files: dict[str, bytes]) -> str:
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(f"{path}\0{git_blob_id(files[path])}\n".encode())
    return digest.hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = QuietServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering (a box that went offline); the port is closed, connections are refused."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    # -- the repository model ------------------------------------------------------------------
    def _commit(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        for files in self.repos[repo].values():
            sha = commit_sha(files)
            if rev == sha:
                return sha, files
        branch = self.repos[repo].get(rev)
        return None if branch is None else (commit_sha(branch), branch)

    @staticmethod
    def _tree(files: dict[str, bytes], under: str, recursive: bool) -> list[dict[str, object]]:
        prefix = f"{under}/" if under else ""
        entries: dict[str, dict[str, object]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        return list(entries.values())

    # -- HTTP ----------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _not_found(self, code: str) -> None:
                send_reply(self, 404, json.dumps({"error": code}).encode(), "application/json", {"X-Error-Code": code})

            def _json(self, value: object) -> None:
                send_reply(self, 200, json.dumps(value).encode(), "application/json")

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                url = urlsplit(self.path)
                with fake._lock:
                    fake.requests.append(f"{self.command} {url.path}")
                api, resolve = _API.match(url.path), _RESOLVE.match(url.path)
                match = api or resolve
                if match is None:
                    return self._not_found("EntryNotFound")
                repo = match["repo"]
                if repo not in fake.repos:
                    return self._not_found("RepoNotFound")
                if api and api["what"] == "refs":
                    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": commit_sha(files)}
                                for b, files in fake.repos[repo].items()]
                    return self._json({"branches": branches, "converts": [], "tags": []})
                found = fake._commit(repo, unquote(match["rev"] or "main"))
                if found is None:
                    return self._not_found("RevisionNotFound")
                sha, files = found
                if api and api["what"] == "revision":
                    siblings = [{"rfilename": path} for path in sorted(files)]
                    return self._json({"id": repo, "sha": sha, "private": False, "siblings": siblings})
                if api:  # tree
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                    return self._json(fake._tree(files, unquote(api["path"] or "/")[1:], recursive))
                data = files.get(unquote(match["path"]))
                if data is None:
                    return self._not_found("EntryNotFound")
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"'}
                if head:
                    self.send_response(200)
                    for key, value in {**headers, "Content-Length": str(len(data))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                else:
                    send_reply(self, 200, data, "application/octet-stream", headers)

        return Handler
