"""The environment a run gets: the profile's harness values, the [trainer] overrides, and for the
built-in trainer the prepared data dir and the compile caches every experiment shares; and what
its sandbox lets it write (executors/sandbox.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from nightlab.loop.compile_cache import cache_dir
from nightlab.loop.state.config import Settings
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import state_dir
from nightlab.loop.workspace import Say, Workspace, to_stderr


def run_environment(ws: Workspace, settings: Settings, say: Say = to_stderr,
                    prepared: Path | None = None) -> dict[str, str]:
    """The environment every run gets: the profile's harness env with the [trainer] budget keys
    over it (TrainerSettings.harness_env) and, for the built-in trainer, NIGHTLAB_DATA_DIR (prepared here when missing, unless
    `prepared` names the data dir the daemon has just prepared)."""
    env = settings.trainer.harness_env(ws.harness_env)
    if ws.builtin_trainer:
        from nightlab.trainer import prepare

        try:
            data_dir = prepared or prepare.prepare(settings.data_source, settings.data.shards, settings.cache_path, say)
            prepare.training_view(data_dir)  # made once here, not by several slots at once
        except prepare.PrepareError as exc:
            raise UserError(str(exc)) from None
        env[prepare.ENV_DATA_DIR] = str(data_dir)
        # Compiled graphs and kernels outlive a run: the next experiment with the same shapes starts
        # warm (the engine keeps them under [loop] compile_cache_gb: loop/engine/caching.py).
        cache = cache_dir(ws.path)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    return env


def data_dir(env: Mapping[str, str]) -> Path | None:
    """The built-in trainer's data dir in a run's environment (`run_environment`); None for a project's."""
    from nightlab.trainer.prepare import ENV_DATA_DIR  # no torch

    return Path(env[ENV_DATA_DIR]) if env.get(ENV_DATA_DIR, "").strip() else None


def sandbox_paths(workspace: Path, run_dir: Path, data: Path | None = None) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(read-only, writable) for a run in `run_dir`: the workspace's state (the ledger the keep rule
    reads, the kept models and their held-out scores, the runs' logs and exit files) and its git
    are the engine's; a run writes its own folder (its snapshot, or in the workspace the folder it
    saves its model in; the agent's, .nightlab/agent) and the compile caches every run shares.
    `data`: the built-in trainer's data dir, for what no harness is around (the agent, the checks):
    it and the scorer's Python are read-only too. Rows written into its scored rows' cache between
    runs scored the next run on them (2.86 -> 0.19); a .pth file planted in site-packages runs in the
    scorer (the run finds it after, and the night pauses for a person). A run's harness makes that
    cache before its training, then starts it with both read-only (prepare.read_only_to)."""
    from nightlab.trainer.prepare import DEFAULT_ARTIFACT_DIR, data_paths, installed_python

    state = state_dir(workspace)
    own = run_dir if run_dir.is_relative_to(state) else run_dir / DEFAULT_ARTIFACT_DIR
    writable = (own, cache_dir(workspace))
    scored: list[Path] = []
    if data is not None:
        scored = [*data_paths(data), *installed_python(os.environ, [workspace, *writable])]
    return (state, workspace / ".git", *scored), writable
