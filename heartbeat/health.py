"""Host health: free disk where we write, and what of ours uses it."""

from __future__ import annotations

import shutil
from pathlib import Path

from nightlab.loop.state.disk import GIB, MIB, human_size, tree_size

# What nightlab writes, and what a person may do about each (folder names as the engine makes them:
# loop/engine/context.py, loop/compile_cache.py, loop/second_opinion.py, loop/proposers/agent.py).
_OURS = (
    (".nightlab/compile-cache", "torch's compile caches: safe to delete, the next run of a shape compiles again;"
                                " the engine keeps them under [loop] compile_cache_gb"),
    (".nightlab/runs", "run logs: old ones may be deleted, the ledger keeps every result"),
    (".nightlab/artifacts", "the newest kept models: the second opinion needs them, keep them"),
    (".nightlab/artifact", "the last run's model: replaced by the next run"),
    (".nightlab/worktrees", "snapshots of runs in flight: removed when their experiment is decided"),
    (".nightlab/agent", "the agent's last output: safe to delete"),
    (".git", "the experiments' commits: `git gc` packs them"),
)


def free_disk_gb(path: Path) -> float:
    """Free space for unprivileged writes on the filesystem of `path` (or its nearest parent that
    exists: the cache dir may not have been created yet)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / GIB


def space_used(workspace: Path, cache: Path) -> str:
    """What of nightlab's uses space, largest first, each with what may be removed (folders under
    1 MB left out); "" when nothing of ours is that big."""
    found = [(tree_size(workspace / rel), str(workspace / rel), what) for rel, what in _OURS]
    found.append((tree_size(cache), str(cache), "data shards and tokenizer: needed (`nightlab prepare` fetches them again)"))
    said = [f"{where} {human_size(size)} ({what})" for size, where, what in sorted(found, reverse=True) if size >= MIB]
    return "; ".join(said)
