"""Stopping a process tree, for every tree the engine starts: a run the local executor cancels,
a coding agent at its timeout or its end (proposers/agent.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

import psutil

KILLED_WAIT_S = 5.0  # for SIGKILLed processes to be gone (a process in the kernel's D state takes a while)


def stop_tree(pgid: int, leader: psutil.Process | None, grace_s: float, also: Iterable[psutil.Process] = ()) -> None:
    """SIGTERM `leader`, every descendant of it, its process group `pgid` and `also`; SIGKILL
    what outlives `grace_s`, and return once that is gone.

    `leader`: the process that started the tree in its own session (pid = pgid), None when it is
    gone or its pid now names another process; then the group alone is signalled (Linux never
    hands out a pid still in use as a process group id). Descendants are listed before anything
    is signalled (once a parent dies its children are re-parented and no longer findable); the
    group also catches children orphaned earlier, the list those that started a session of their
    own, and `also` whatever the caller found besides (detached and orphaned before we looked).
    """
    procs: list[psutil.Process] = []
    if leader is not None:
        try:
            procs = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:  # the tree changed while we walked it (a short-lived child)
            procs = [leader]
    known = {p.pid for p in procs}
    procs += [p for p in also if p.pid not in known]
    _signal_group(pgid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    survivors = _wait_gone(procs, grace_s)
    for p in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _signal_group(pgid, signal.SIGKILL)
    _wait_gone(survivors, KILLED_WAIT_S)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive after up to `timeout` seconds. A zombie counts as gone: it is
    dead, and reaping an orphan is its new parent's job (psutil.wait_procs would wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
