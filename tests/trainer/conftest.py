"""Fixtures of the trainer's tests: the harness and train.py imported as a workspace sees them, and
a small data dir of stdlib text."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nightlab.trainer import prepare

from tests.conftest import REPO

TRAINER = REPO / "trainer"


@pytest.fixture(scope="module")
def H():
    """trainer/harness.py imported from its path, as train.py sees it (`harness`, `prepare`)."""
    saved = {name: sys.modules.get(name) for name in ("prepare", "harness")}
    sys.modules["prepare"] = prepare
    try:
        spec = importlib.util.spec_from_file_location("harness", TRAINER / "harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["harness"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.fixture(scope="module")
def T(H):
    """trainer/train.py imported from its path (importing it does not train)."""
    spec = importlib.util.spec_from_file_location("nightlab_train_under_test", TRAINER / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.harness.use_backend("sdpa")
    return module


def _documents(limit_chars: int) -> list[str]:
    """Stdlib sources cut at blank lines into documents of up to ~2,000 characters."""
    docs, current, total = [], "", 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            current += para + "\n\n"
            if len(current) >= 2000:
                docs.append(current)
                total += len(current)
                current = ""
        if total >= limit_chars:
            break
    return docs


@pytest.fixture(scope="session")  # prepared once for every trainer test: the tokenizer takes a while
def data_dir(tmp_path_factory):
    source = tmp_path_factory.mktemp("corpus")
    docs = _documents(1_500_000)
    for i in range(4):  # 3 training shards + the validation shard (the last by name)
        pq.write_table(pa.table({"text": docs[i::4]}), source / f"part_{i}.parquet")
    return prepare.prepare(str(source), shards=-1, cache_dir=tmp_path_factory.mktemp("cache"), progress=lambda _: None)
