"""Host health: free disk where we write, and what of ours uses it."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from nightlab.loop.state.config import Settings
from nightlab.loop.state.disk import GIB, MIB, human_size, tree_size
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import DB_FILENAME, state_dir

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


def watched_paths(settings: Settings, workspace: Path) -> dict[str, Path]:
    """Where the low-disk checks look, by what it holds: the workspace, and the data cache when the
    built-in trainer's runs read it (a project's own run command reads nothing there: a full home
    disk would pause its loop for nothing)."""
    return {"workspace": workspace, **({"data": settings.cache_path} if not settings.project.run_command else {})}


def space_used(workspace: Path, cache: Path) -> str:
    """What of nightlab's uses space, largest first, each with what may be removed (folders under
    1 MB left out); "" when nothing of ours is that big."""
    found = [(tree_size(workspace / rel), str(workspace / rel), what) for rel, what in _OURS]
    found.append((tree_size(cache), str(cache), "data shards and tokenizer: needed (`nightlab prepare` fetches them again)"))
    said = [f"{where} {human_size(size)} ({what})" for size, where, what in sorted(found, reverse=True) if size >= MIB]
    return "; ".join(said)


def check_data_source(settings: Settings) -> None:
    """UserError when the built-in trainer's data folder cannot give data (not there, bad files),
    asked before `nightlab run` or `nightlab train` makes a workspace: a refusal once it was made
    left it behind (a repository, its baseline commit, the ledger). A workspace made already is left
    to the start's own preparation, whose refusal the daemon also says in chat."""
    made = (state_dir(settings.workspace_path) / DB_FILENAME).exists()
    if settings.project.run_command or made:  # a custom project brings its own data
        return
    from nightlab.trainer import prepare  # pyarrow: not for every import of the jobs

    try:
        prepare.check_source(settings.data_source, settings.data.shards)
    except prepare.PrepareError as exc:
        raise UserError(str(exc)) from None


def left_data_dirs(data_dir: Path) -> list[str]:
    """The data dirs beside `data_dir` that nightlab prepared from the same files at another place, each
    with its size and how to free it. A local folder's data dir is named after its path, so a folder
    moved left its old one in the cache unsaid. Said, never removed: only the user knows which places
    their configs still name."""
    # pyarrow and tiktoken: not for every import of the jobs
    from nightlab.trainer.prepare import learnt_from, training_view_dir, viewed_data_dir

    mine = learnt_from(data_dir)
    if mine is None:
        return []
    said = []
    for other in sorted(p for p in data_dir.parent.iterdir() if p.is_dir() and p != data_dir):
        if viewed_data_dir(other) is not None or learnt_from(other) != mine:
            continue
        parts = [other] + [view for view in [training_view_dir(other)] if view.is_dir()]
        size = human_size(sum(tree_size(p) for p in parts))
        free = f"`rm -rf {' '.join(shlex.quote(str(p)) for p in parts)}` frees it"
        source = _linked_source(other)
        if source is not None and not source.exists():
            said.append(f"data: {other} ({size}) holds these files as prepared at {source}, which is gone: nothing"
                        f" uses it now; {free}")
        else:
            said.append(f"data: {other} ({size}) holds these files as prepared at {source or 'another place'}: if no"
                        f" config names that place any more, {free}")
    return said


def _linked_source(data_dir: Path) -> Path | None:
    """The folder a data dir's shards link to (a local source's); None for shards it holds itself."""
    from nightlab.trainer.prepare import SHARD_PATTERN

    for shard in sorted(data_dir.glob(SHARD_PATTERN)):
        if shard.is_symlink():
            return Path(os.readlink(shard)).parent
    return None
