"""Disk use of nightlab's folders: one walk for the heartbeat's low-disk messages and the engine's
bound on the compile caches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

GIB = 1024**3
MIB = 1024**2


def files(path: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file under `path` with its lstat (links not followed); one removed while we walk is
    left out. Nothing for a path that does not exist."""
    for root, _, names in os.walk(path):
        for name in names:
            full = Path(root, name)
            try:
                yield full, full.lstat()
            except OSError:  # removed while we walked
                pass


def tree_size(path: Path) -> int:
    """Bytes in the files under `path`."""
    return sum(st.st_size for _, st in files(path))


def human_size(size: int) -> str:
    return f"{size / GIB:.1f} GB" if size >= GIB else f"{size / MIB:.0f} MB"
