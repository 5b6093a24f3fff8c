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
from dataclasses import dataclass
from pathlib import Path

from nightlab.loop.state.disk import files
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
    found = [(path, st) for path, st in files(root) if _PRUNING not in path.relative_to(root).parts]
    # folders holding a folder (the files' folders' parents): their own files are entries by name
    outer = {d for folder in {path.parent for path, _ in found} for d in folder.parents}
    groups: dict[tuple[Path, str], list[tuple[Path, os.stat_result]]] = {}
    for path, st in found:
        folder = path.parent
        # a folder directly under the root is a cache's own (inductor/, triton/): never one entry
        whole = folder.parent not in (root, *root.parents) and folder not in outer and len(folder.name) != 2
        key = (folder, "") if whole else (folder, path.name.split(".", 1)[0])
        groups.setdefault(key, []).append((path, st))
    return [
        Entry((folder,) if not stem else tuple(sorted(p for p, _ in members)), sum(st.st_size for _, st in members),
              max(max(st.st_atime, st.st_mtime) for _, st in members))
        for (folder, stem), members in groups.items()
    ]


def prune(root: Path, bound: int) -> Pruned:
    """Past `bound` bytes: the least recently used entries removed, whole, down to PRUNE_TO of it.
    Only while nothing compiles or reads the caches (no run in flight): the caller's to know."""
    shutil.rmtree(root / _PRUNING, ignore_errors=True)  # a prune cut short: its entries are whole
    found = entries(root)
    total = sum(e.size for e in found)
    if total <= bound:
        return Pruned(0, 0, total)
    trash = root / _PRUNING
    trash.mkdir()
    removed = freed = 0
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
    shutil.rmtree(trash, ignore_errors=True)
    _drop_empty_folders(root)
    return Pruned(removed, freed, total - freed)


def _drop_empty_folders(root: Path) -> None:
    """Buckets and key folders emptied by a prune (torch makes them again when it needs them)."""
    for folder, _, _ in sorted(os.walk(root), key=lambda w: len(w[0]), reverse=True):
        if Path(folder) != root:
            try:
                os.rmdir(folder)
            except OSError:  # not empty
                pass
