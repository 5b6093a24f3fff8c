"""A compile cache laid out as inductor and triton lay theirs out, in plain files with set ages:
the pruning policy's tests (and the engine's) run on it in milliseconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

DAY = 86400.0

# entry -> (its files, days since made, days since read; None: never read since)
LAYOUT: dict[str, tuple[tuple[str, ...], float, float | None]] = {
    # a triton kernel: made first, but read half a day ago (a hit writes nothing)
    "triton/kernel-hot": (("triton/kernel-hot/k.cubin", "triton/kernel-hot/k.json", "triton/kernel-hot/__grp__k.json"),
                          6, 0.5),
    "code cab1": (("inductor/ab/cab1.cpp", "inductor/ab/cab1.so"), 5, None),  # a C++ kernel and its library
    "fxgraph": (("inductor/fxgraph/fb/fbkey/entry1", "inductor/fxgraph/fb/fbkey/entry2"), 4, None),
    "aotautograd": (("inductor/aotautograd/akey/entry",), 3, None),
    "triton/kernel-cold": (("triton/kernel-cold/k.cubin", "triton/kernel-cold/__grp__k.json"), 2, None),
    "code cab2": (("inductor/ab/cab2.py", "inductor/ab/cab2.best_config"), 1, None),  # same bucket, another kernel
    "locks": (("inductor/locks/cab1.lock",), 0, None),
}
# the order a prune takes them in: least recently used (read or made) first
LRU = ["code cab1", "fxgraph", "aotautograd", "triton/kernel-cold", "code cab2", "triton/kernel-hot", "locks"]
SIZE = 1000  # bytes per file


def plant(root: Path) -> dict[str, list[Path]]:
    """LAYOUT under `root`; each entry's files."""
    now = time.time()
    planted = {}
    for name, (rels, made, read) in LAYOUT.items():
        paths = [root / rel for rel in rels]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * SIZE)
            mtime = now - made * DAY
            os.utime(path, (now - read * DAY if read is not None else mtime, mtime))
        planted[name] = paths
    return planted


def size(entry: list[Path]) -> int:
    return SIZE * len(entry)
