"""The compile caches' bound (loop/compile_cache.py, loop/engine/caching.py): whole entries, least
recently used first, pruned only while no run is in flight; a pruned cache still compiles."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nightlab.loop import compile_cache
from nightlab.loop.compile_cache import Pruned, entries, prune
from nightlab.loop.engine import Engine, caching
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.state import ledger
from nightlab.loop.state.disk import GIB, tree_size
from nightlab.loop.state.store import Store
from nightlab.loop.workspace import open_workspace

from tests.fakes import compile_cache as fake
from tests.fakes.engine_thread import EngineThread
from tests.fakes.loop_workspace import Gates, make_stub_workspace
from tests.loop.test_waves import WaveProposer

TINY = Path(__file__).resolve().parents[1] / "fakes" / "compile_tiny.py"


def _all_or_none(planted: dict[str, list[Path]]) -> dict[str, bool]:
    """Each entry: still there (True) or gone (False); fails on an entry half gone."""
    there = {name: [p.exists() for p in paths] for name, paths in planted.items()}
    assert all(all(e) or not any(e) for e in there.values()), there
    return {name: all(e) for name, e in there.items()}


def test_entries_are_the_folders_and_files_inductor_and_triton_keep_together(tmp_path: Path) -> None:
    planted = fake.plant(tmp_path)
    found = {e.paths: e.size for e in entries(tmp_path)}
    folders = {name: (paths[0].parent,) for name, paths in planted.items() if not name.startswith("code")}
    kernels = {name: tuple(sorted(paths)) for name, paths in planted.items() if name.startswith("code")}
    assert found == {paths: fake.size(planted[name]) for name, paths in {**folders, **kernels}.items()}


def test_past_the_bound_the_least_recently_used_go_whole_down_to_three_quarters_of_it(tmp_path: Path) -> None:
    planted = fake.plant(tmp_path)
    total = sum(map(fake.size, planted.values()))
    bound = total - 4 * fake.SIZE
    gone = []  # the least recently used, until what is left is under 3/4 of the bound
    while total - sum(fake.size(planted[n]) for n in gone) > bound * compile_cache.PRUNE_TO:
        gone.append(fake.LRU[len(gone)])
    freed = sum(fake.size(planted[n]) for n in gone)
    assert prune(tmp_path, bound) == Pruned(len(gone), freed, total - freed)
    # the triton kernel made first but read half a day ago outlives ones made later and never read
    assert gone == ["code cab1", "fxgraph", "aotautograd", "triton/kernel-cold"]
    assert _all_or_none(planted) == {name: name not in gone for name in planted}
    assert sorted(p.name for p in (tmp_path / "inductor").iterdir()) == ["ab", "locks"]  # emptied folders gone
    assert tree_size(tmp_path) == total - freed


def test_under_the_bound_nothing_goes_and_an_entry_is_as_recent_as_its_newest_file(tmp_path: Path) -> None:
    planted = fake.plant(tmp_path)
    total = sum(map(fake.size, planted.values()))
    assert prune(tmp_path, total) == Pruned(0, 0, total)
    os.utime(planted["code cab1"][1])  # the oldest entry's library, written again just now
    assert prune(tmp_path, total - 1).entries == 3
    assert _all_or_none(planted) == {name: name not in ("fxgraph", "aotautograd", "triton/kernel-cold")
                                     for name in planted}


def test_a_prune_cut_short_is_finished_by_the_next(tmp_path: Path) -> None:
    planted = fake.plant(tmp_path)
    left = tmp_path / ".pruning" / "0-kernel"  # moved out whole, the engine killed before deleting it
    left.mkdir(parents=True)
    (left / "k.cubin").write_bytes(b"x" * 10**6)
    assert all(".pruning" not in e.paths[0].parts for e in entries(tmp_path))
    assert prune(tmp_path, 10**9).entries == 0
    assert not (tmp_path / ".pruning").exists()
    assert all(_all_or_none(planted).values())


def _compile(cache: Path, *names: str) -> list[str]:
    # No probe builds of the CPU's vector ISAs (a gcc run and a load each, cached as entries too) and
    # no pool of compile workers (a Python importing torch): f's and g's own kernels and graphs are
    # still compiled and cached, in about 15 s less on a 2-core box.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
           "TORCHINDUCTOR_VEC_ISA_OK": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    out = subprocess.run([sys.executable, str(TINY), *names], env=env, capture_output=True, text=True,
                         timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def test_the_real_torch_compiles_again_from_a_cache_pruned_in_part(tmp_path: Path) -> None:
    """What torch.compile left is pruned with a small bound; a fresh process compiles the same
    function and a new one. The ages make the prune take the compiled graph (its AOTAutograd entry,
    which names it, stays) and some of the kernels, the oldest half of them first."""
    cache = tmp_path / "compile-cache"
    _compile(cache, "f")
    found = entries(cache)

    def kind(entry: compile_cache.Entry) -> str:
        return entry.paths[0].relative_to(cache / "inductor").parts[0]

    now = time.time()
    for i, entry in enumerate(sorted(found, key=lambda e: e.paths)):
        days = {"fxgraph": 3, "aotautograd": 0}.get(kind(entry), 1 + i % 2)
        for path in entry.paths:
            for file in [path] if path.is_file() else path.iterdir():
                os.utime(file, (now - days * 86400,) * 2)
    total = sum(e.size for e in found)
    done = prune(cache, total // 2)
    assert 0 < done.entries < len(found) and done.left <= total // 2
    left = {kind(e) for e in entries(cache)}
    assert "fxgraph" not in left and "aotautograd" in left

    def kernels(found: list[compile_cache.Entry]) -> set[tuple[Path, ...]]:  # in the buckets: <xx>/c<hash>.*
        return {e.paths for e in found if len(kind(e)) == 2}

    assert 0 < len(kernels(entries(cache))) < len(kernels(found))
    assert _compile(cache, "f", "g") == ["f: compiled", "g: compiled"]


def _running(store: Store) -> set[int]:
    return {ledger.get_candidate(store, r.candidate_id).number for r in ledger.running_runs(store)}


def test_the_engine_prunes_only_once_no_run_is_in_flight(tmp_path: Path, gates: Gates, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Async, two slots: the caches pass their bound while #2 and #3 run; #3 ends, and its slot
    starts nothing until #2 has ended too, then the caches are pruned and #4 starts."""
    monkeypatch.setattr(caching, "MEASURE_EVERY_S", 0.0)  # walked whenever it could matter
    bound_gb = 6 * fake.SIZE / GIB
    settings = make_stub_workspace(tmp_path, executor={"gpus": [0, 1]},
                                   loop={"mode": "async", "compile_cache_gb": bound_gb})
    steps = [{"set": {"VAL_BPB": [v]}} for v in (1.1, 1.2, 1.3)]  # worse: no keeps, no rebases
    engine = EngineThread(settings, WaveProposer(steps), limit=4)
    store = engine.store
    gates.open(1)
    engine.wait_for(lambda: _running(store) == {2, 3}, "#2 and #3 running")
    planted = fake.plant(compile_cache.cache_dir(settings.workspace_path))
    gates.open(3)
    engine.wait_for(lambda: ledger.experiment_count(store) == 2, "#3 recorded")
    engine.ticks(3)  # rounds in which #3's slot would have started #4
    assert _running(store) == {2} and [c.number for c in ledger.open_candidates(store)] == [2]
    assert all(_all_or_none(planted).values())  # nothing pruned under #2
    gates.open(2)
    engine.wait_for(lambda: 4 in _running(store), "#4 running")
    assert _all_or_none(planted) == {name: name in ("triton/kernel-hot", "locks") for name in planted}
    said = f"compile caches past loop.compile_cache_gb = {bound_gb:g}: 5 least recently used entries removed"
    assert said in capsys.readouterr().err
    gates.open(4)
    assert engine.join() == 0


def test_the_caches_are_walked_at_most_every_few_minutes_unless_a_prune_waits(tmp_path: Path) -> None:
    """A month's cache takes seconds to walk, the GPU idle meanwhile: not before every experiment."""
    settings = make_stub_workspace(tmp_path, loop={"compile_cache_gb": 6 * fake.SIZE / GIB})
    ws = open_workspace(settings.workspace_path, settings)
    ctx = Engine(settings, ws, LocalExecutor(gpus=(0,)), WaveProposer([]), {}, threading.Event()).ctx
    planted = fake.plant(compile_cache.cache_dir(settings.workspace_path))
    ctx.cache_measured = time.monotonic()  # walked a moment ago
    caching.prune_compile_cache(ctx)
    assert all(_all_or_none(planted).values())  # not walked again yet: nothing pruned
    ctx.prune_waiting = True  # the asynchronous mode found it past the bound: pruned at once
    caching.prune_compile_cache(ctx)
    assert not all(_all_or_none(planted).values())
