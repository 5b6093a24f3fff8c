"""A real single-node Slurm for the executor tests (tests/fakes/slurm_cluster.py), started once
per module that asks for it and stopped after; skipped, saying why, where Slurm is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.engine_thread import EngineThread
from tests.fakes.loop_workspace import Gates, StubData
from tests.fakes.slurm_cluster import SlurmCluster, missing_binaries


@pytest.fixture(autouse=True)
def _engines_end_with_their_test() -> Iterator[None]:
    yield
    EngineThread.end_all()


@pytest.fixture
def gates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gates:
    """The stub trainer's gates, for every run started from this test (runs inherit the variable)."""
    g = Gates(tmp_path / "gates")
    monkeypatch.setenv("NIGHTLAB_STUB_GATES", str(g.folder))
    return g


@pytest.fixture
def stub_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StubData:
    """The stub trainer's data dir, good until the test damages it (runs inherit the variable)."""
    data = StubData(tmp_path / "data")
    monkeypatch.setenv("NIGHTLAB_STUB_DATA", str(data.folder))
    return data


def _cluster(tmp_path_factory: pytest.TempPathFactory, name: str, gpus: int) -> Iterator[SlurmCluster]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing: {', '.join(missing)}); the README's test command installs it")
    cluster = SlurmCluster(Path(tmp_path_factory.mktemp(name)), gpus=gpus, batch_sched_delay=0,
                           message_timeout=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two fake GPUs: two one-GPU jobs run at once, a third waits."""
    yield from _cluster(tmp_path_factory, "slurm", gpus=2)


@pytest.fixture(scope="module")
def slurm_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A second cluster, so a slow event (a one-minute time limit) overlaps a node failure."""
    yield from _cluster(tmp_path_factory, "slurm_b", gpus=1)
