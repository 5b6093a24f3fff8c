"""Shared fixtures. Tests never reach the network: proxies are cleared so the real client
libraries talk straight to the fake servers on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # No test writes into the user's real cache.
    monkeypatch.setenv("NIGHTLAB_CACHE", str(tmp_path / "cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")
