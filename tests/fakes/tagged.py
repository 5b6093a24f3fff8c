"""Processes found by a tag in their command line. A run's pids are its sandbox's own (a PID
namespace: loop/executors/sandbox.py), so a fake trainer names the processes it starts by a tag,
an argument of theirs, rather than by the pids it sees."""

from __future__ import annotations

import contextlib

import psutil


def tagged(tag: str) -> list[psutil.Process]:
    """The live processes (zombies are dead) that have `tag` as one of their arguments."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if tag in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found
