"""Disk use of nightlab's folders: one walk for the heartbeat's low-disk messages and the engine's
bound on the compile caches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Folder:
    path: str
    subfolders: tuple[str, ...]  # names
    files: tuple[tuple[str, os.stat_result], ...]  # name, lstat (links not followed)


def folders(path: Path) -> Iterator[Folder]:
    """Every folder under `path` (itself first) with its files; a file removed while we walk is
    left out. Nothing for a path that does not exist. Strings, not Paths: a compile cache holds
    a hundred thousand files."""
    for root, subfolders, names in os.walk(path):
        found = []
        for name in names:
            try:
                found.append((name, os.lstat(os.path.join(root, name))))
            except OSError:  # removed while we walked
                pass
        yield Folder(root, tuple(subfolders), tuple(found))


def tree_size(path: Path) -> int:
    """Bytes in the files under `path`."""
    return sum(st.st_size for folder in folders(path) for _, st in folder.files)


def human_size(size: int) -> str:
    if size < MIB:  # a tokenizer without its eval cache: "0 MB" said nothing
        return f"{size / 1024:.0f} KB"
    return f"{size / GIB:.1f} GB" if size >= GIB else f"{size / MIB:.0f} MB"
