"""Shared fixtures. Tests never reach the network: proxies are cleared so the real client
libraries talk straight to the fake servers on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # Under pytest-xdist each worker's torch, in the test process and in every run it starts (they
        # inherit the variable), gets its share of the cores: N workers on N cores, each torch taking
        # all N, would run N * N threads that wait on each other.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def pytest_collection_finish(session: pytest.Session) -> None:
    # The type check runs from now on, beside the tests (tests/test_types.py says why). Under
    # pytest-xdist every worker collects every test, so none starts it early: the worker that gets
    # the test runs it there, beside the other workers.
    from tests import test_types

    if "PYTEST_XDIST_WORKER" not in os.environ and any(item.nodeid == test_types.NODEID for item in session.items):
        test_types.start_mypy()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests import test_types

    test_types.stop_mypy()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from tests.e2e import chaos_table

    chaos_table.gather(report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.e2e.chaos_table import CHAOS_TABLE, chaos_table

    if CHAOS_TABLE:
        terminalreporter.write_sep("-", "chaos table")
        terminalreporter.write_line(chaos_table())


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # No test writes into the user's real cache.
    monkeypatch.setenv("NIGHTLAB_CACHE", str(tmp_path / "cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache dir, data dir) of the offline `stdlib` corpus: shards + tokenizer, built once for
    every night of real training (tests/e2e, tests/loop/test_integrity.py).

    The tokenizer is trained on 2M characters instead of the default: a CPU night in CI needs a
    working vocabulary, not a good one, and this saves most of the preparation time."""
    from nightlab.trainer import prepare

    cache = tmp_path_factory.mktemp("nightlab-cache")
    data = prepare.prepare("stdlib", 1, cache, progress=lambda _: None, tokenizer_max_chars=2_000_000)
    return cache, data


FAKE_NVIDIA_SMI_DIR = REPO / "tests" / "fakes" / "bin"


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """`fake_gpus(["NVIDIA H100 80GB HBM3", ...])`: this machine now has these GPUs, as far as
    nvidia-smi (tests/fakes/bin/nvidia-smi, first on PATH, also for runs we launch) can tell."""

    def install(names: list[str]) -> None:
        monkeypatch.setenv("PATH", f"{FAKE_NVIDIA_SMI_DIR}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("NIGHTLAB_FAKE_GPUS", ",".join(names))

    return install
