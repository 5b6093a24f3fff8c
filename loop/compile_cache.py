"""The compile caches every run of the built-in trainer shares (TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR under <workspace>/.nightlab/compile-cache), kept under `[loop] compile_cache_gb`:
every architecture an experiment tries compiles graphs and kernels of its own, and without a bound
the folder grows for as long as nightlab runs.

What an entry is, as inductor and triton lay them out (an entry goes whole or not at all):
- a folder without folders in it: triton's `<hash>/` (a kernel's files and the group file naming
  them), inductor's `fxgraph/<xx>/<key>/` and `aotautograd/<key>/` (a graph's cached variants),
  its `locks/`;
- in inductor's code-cache buckets (`<xx>/`, two characters of the hash: `c<hash>.cpp`, `.so`,
  `.py`, `.best_config`), and beside folders, the files that share a name up to its first dot.
A graph entry whose kernels were pruned (or the other way round) is a miss torch compiles again
(tests/loop/test_compile_cache.py checks that with the real torch).

When an entry was last used: the newest access or modification time of its files. A cache hit
reads an entry and writes nothing, so modification times alone only say when an entry was made,
and the baseline's graphs, hit by every experiment, would look the oldest. Linux's default
`relatime` moves a file's access time at its first read after a write and then at most once a
day: a day's precision, plenty for an order over weeks. Under `noatime` access times stay at the
creation and this is the modification time (least recently made goes first).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nightlab.loop.state.disk import folders
from nightlab.loop.state.store import state_dir

COMPILE_CACHE_DIRNAME = "compile-cache"  # torch inductor + triton, shared by every experiment
# Pruned down to this share of the bound: one prune makes room for many new graphs, not for one (in
# the asynchronous mode each prune waits for every run in flight to end).
PRUNE_TO = 0.75
# Entries are moved in here and then deleted: a prune cut short leaves whole entries behind, never
# a kernel folder half gone; the next prune empties it.
_PRUNING = ".pruning"


def cache_dir(workspace: Path) -> Path:
    return state_dir(workspace) / COMPILE_CACHE_DIRNAME


@dataclass(frozen=True)
class Entry:
    paths: tuple[Path, ...]  # a folder, or a bucket's files of one name
    size: int
    used: float  # the newest access or modification time of its files


@dataclass(frozen=True)
class Pruned:
    entries: int  # removed
    freed: int  # their bytes
    left: int  # bytes in the caches after


def entries(root: Path) -> list[Entry]:
    """The cache's entries, from one walk of its files."""
    found = []
    for folder in folders(root):
        parts = os.path.relpath(folder.path, root).split(os.sep)
        if not folder.files or parts[0] == _PRUNING:
            continue
        # the root and the caches' own folders (inductor/, triton/) are never one entry
        if len(parts) >= 2 and not folder.subfolders and len(parts[-1]) != 2:
            found.append(_entry(folder.path, [], folder.files))
            continue
        groups: dict[str, list[tuple[str, os.stat_result]]] = {}
        for name, st in folder.files:
            groups.setdefault(name.split(".", 1)[0], []).append((name, st))
        found += [_entry(folder.path, sorted(n for n, _ in members), members) for members in groups.values()]
    return found


def _entry(folder: str, names: list[str], files: Iterable[tuple[str, os.stat_result]]) -> Entry:
    """A whole folder (no `names`), or the files of one name in it."""
    stats = [st for _, st in files]
    paths = tuple(Path(folder, n) for n in names) if names else (Path(folder),)
    return Entry(paths, sum(st.st_size for st in stats), max(max(st.st_atime, st.st_mtime) for st in stats))


def prune(root: Path, bound: int) -> Pruned:
    """Past `bound` bytes: the least recently used entries removed, whole, down to PRUNE_TO of it.
    Only while nothing compiles or reads the caches (no run in flight): the caller's to know."""
    shutil.rmtree(root / _PRUNING, ignore_errors=True)  # a prune cut short: its entries are whole
    found = entries(root)
    total = sum(e.size for e in found)
    if total <= bound:
        return Pruned(0, 0, total)
    trash = root / _PRUNING
    try:
        trash.mkdir(exist_ok=True)
    except OSError:  # a cache we may not write to: nothing can go
        return Pruned(0, 0, total)
    removed = freed = 0
    emptied: set[Path] = set()
    for entry in sorted(found, key=lambda e: e.used):
        if total - freed <= bound * PRUNE_TO:
            break
        try:
            for path in entry.paths:  # a rename: a folder is gone from the cache at once, whole
                path.rename(trash / f"{removed}-{path.name}")
        except OSError:  # removed by hand meanwhile: what is left of it goes with the next prune
            continue
        removed += 1
        freed += entry.size
        emptied.update(path.parent for path in entry.paths)
    shutil.rmtree(trash, ignore_errors=True)
    _drop_empty_folders(root, emptied)
    return Pruned(removed, freed, total - freed)


def _drop_empty_folders(root: Path, candidates: set[Path]) -> None:
    """Buckets and key folders a prune emptied, and their parents emptied so (torch makes them
    again when it needs them)."""
    for folder in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone already)
                break
            folder = folder.parent
