"""Caching: the compile caches every run shares, kept under `[loop] compile_cache_gb`
(loop/compile_cache.py: what an entry is, least recently used first).

Only while no run is in flight: a run reads and writes the caches while it compiles, and parallel
slots and runs re-attached after a restart share them, so an entry pruned under a run could be
half gone when it reads it. The cycle prunes where no candidate is open (between waves; with one
slot, between experiments). The asynchronous mode keeps its slots busy, so there a cache past its
bound starts no new candidate until the runs in flight have ended (as a harness upgrade does).
"""

from __future__ import annotations

import time

from nightlab.loop import compile_cache
from nightlab.loop.engine.context import Context, say
from nightlab.loop.state import ledger
from nightlab.loop.state.disk import GIB, human_size, tree_size

# The caches are walked at most this often: a month's cache (100,000 files) takes 1-2 s to walk,
# with the GPU idle between experiments meanwhile; what grows past the bound in 5 minutes is a few
# experiments' graphs.
MEASURE_EVERY_S = 300.0


def _bound(ctx: Context) -> int:
    return int(ctx.settings.loop.compile_cache_gb * GIB)


def _due(ctx: Context) -> bool:
    now = time.monotonic()
    if ctx.cache_measured is not None and now - ctx.cache_measured < MEASURE_EVERY_S:
        return False
    ctx.cache_measured = now
    return True


def prune_waiting(ctx: Context) -> bool:
    """Whether new candidates wait for a prune (asynchronous mode): measured when one would start,
    until the prune."""
    if not ctx.prune_waiting and _due(ctx):
        ctx.prune_waiting = tree_size(compile_cache.cache_dir(ctx.ws.path)) > _bound(ctx)
    return ctx.prune_waiting


def prune_compile_cache(ctx: Context) -> None:
    """The caches brought under their bound when no run is in flight (else nothing: a later call
    does it); what went is said in the log."""
    if ledger.running_runs(ctx.store) or not (ctx.prune_waiting or _due(ctx)):
        return
    ctx.prune_waiting = False
    done = compile_cache.prune(compile_cache.cache_dir(ctx.ws.path), _bound(ctx))
    if done.entries:
        say(f"compile caches past loop.compile_cache_gb = {ctx.settings.loop.compile_cache_gb:g}:"
            f" {done.entries} least recently used entries removed ({human_size(done.freed)}),"
            f" {human_size(done.left)} left")
