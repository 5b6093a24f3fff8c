"""Host health: free disk where we write."""

from __future__ import annotations

import shutil
from pathlib import Path

GIB = 1024**3


def free_disk_gb(path: Path) -> float:
    """Free space for unprivileged writes on the filesystem of `path` (or its nearest parent that
    exists: the cache dir may not have been created yet)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / GIB
