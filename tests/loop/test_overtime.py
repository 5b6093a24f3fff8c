"""The overtime rule on plain numbers (loop/overtime.py): a keep's fastest run against the replaced
commit's slowest, past max(10 %, 30 s) of it."""

from __future__ import annotations

from nightlab.loop.overtime import overtime


def test_a_keep_is_suspect_only_past_the_allowance() -> None:
    assert overtime([331.0], [300.0]) is not None  # 31 s: the 30 s floor
    assert overtime([330.0], [300.0]) is None
    assert overtime([441.0], [400.0]) is not None  # 41 s: a tenth of 400 s
    assert overtime([440.0], [400.0]) is None


def test_the_changes_fastest_run_against_the_replaced_commits_slowest() -> None:
    """A cold compile cache makes a run start slower: the change's first run is usually cold, the
    best's repeats warm. Its fastest run against the best's slowest (its own cold first run) keeps
    an honest change clear of the flag."""
    assert overtime([380.0, 320.0], [300.0, 290.0]) is None
    found = overtime([380.0, 370.0], [300.0, 320.0])
    assert found is not None and (found.fastest, found.slowest, found.seconds) == (370.0, 320.0, 50.0)
    assert found.text() == ("SUSPECT: its training command ran 50 s longer than the best's slowest run (370 s vs"
                            " 320 s, start-up included): training past the budget?")


def test_no_figure_no_verdict() -> None:
    """An older harness, or a project's run command that is not the harness's, times nothing."""
    assert overtime([], [300.0]) is None and overtime([900.0], []) is None
