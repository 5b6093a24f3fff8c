"""The wait helper every test uses (tests/waiting.py)."""

from __future__ import annotations

import pytest

from tests.waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", [], 7, 8])
    assert wait_until(lambda: next(values), "a value", 5, every=0) == 7


def test_a_timeout_names_what_never_happened() -> None:
    with pytest.raises(AssertionError, match=r"^timed out after 0\.05 s waiting for the moon$"):
        wait_until(lambda: False, "the moon", 0.05, every=0.01)


def test_gives_up_at_once_when_told_why() -> None:
    polls: list[int] = []
    with pytest.raises(AssertionError, match=r"^gave up waiting for the run: the engine ended$"):
        wait_until(lambda: polls.append(1), "the run", 600, abort=lambda: "the engine ended" if polls else None)
    assert len(polls) == 1
