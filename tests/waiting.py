"""The one way a test waits: poll for the event it needs, and fail naming what never happened.

Tests wait on events (a row, a log line, a process gone), never on sleep lengths; a test that
shows something did *not* happen first waits for the event showing the system got past the
point where it would have acted (see each test's comment)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 60.0, *, every: float = 0.02,
               abort: Callable[[], str | None] = lambda: None) -> T:
    """The first truthy value `predicate` returns. Fails after `timeout` seconds, or at once when
    `abort` gives a reason to stop waiting (the process under test has died, say). The timeout
    only bounds a wait that fails: a passing test never reaches it, so it is generous (a daemon
    started on a box busy with other work took more than 20 s to tick)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        reason = abort()
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
