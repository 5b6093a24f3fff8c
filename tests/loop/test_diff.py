"""/diff's ledger side: the engine records each change as a patch where it commits it (and a kept
one against the baseline), and the view shows it as git does, cut with the command for the rest."""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
from pathlib import Path

import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.state import ledger, views
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.steering import send_command
from nightlab.loop.state.store import Store

from tests.fakes.loop_workspace import git_out, make_stub_workspace
from tests.fakes.scripted_proposer import ScriptedProposer


def git_diff(ws: Path, *revs: str) -> str:
    """git's own diff, but for its last line end (git_out would strip a blank context line's space too)."""
    out = subprocess.run(["git", "-C", str(ws), "diff", *revs], capture_output=True, text=True, check=True).stdout
    return out.removesuffix("\n")


def _shown(text: str) -> str:
    """The diff a view shows: what follows its head line and its stat line."""
    return text.split("\n", 2)[2]


def test_a_night_s_changes_are_shown_as_git_shows_them(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    proposer = ScriptedProposer([
        {"set": {"VAL_BPB": [0.9]}},
        {"set": {"VAL_BPB": [0.95], "SLEEP": 0.01}},
        {"noop": True},
        {"set": {"VAL_BPB": [0.8], "PEAK_VRAM_MB": 2048.0}},
        {"write": {"prepare.py": "harness edited"}},
    ])
    assert run_engine(settings, 6, proposer=proposer) == 0
    ws = settings.workspace_path
    store = Store.for_workspace(ws)
    rows = ledger.experiments(store)
    assert [e.status for e in rows] == ["keep", "keep", "discard", "discard", "keep", "crash"]
    commit = {e.number: e.commit for e in rows}

    two = views.diff_text(ws, 2)
    assert two.split("\n")[:2] == ["#2 keep: step 0: VAL_BPB=[0.9]", f"{commit[1][:7]}..{commit[2][:7]} train.py +1 -1"]
    assert _shown(two) == git_diff(ws, commit[1], commit[2])
    three = views.diff_text(ws, 3)  # a discard: against the commit it was made on, the best then
    assert three.startswith("#3 discard: ") and "train.py +2 -2" in three
    assert _shown(three) == git_diff(ws, commit[2], commit[3])
    # the default: the best against the night's baseline, every kept change in it
    best = views.diff_text(ws)
    assert best.startswith("the best, #5, against the baseline, #1: step 3: ")
    assert _shown(best) == git_diff(ws, commit[1], commit[5])
    assert "VAL_BPB = [0.8]" in best and "PEAK_VRAM_MB = 2048.0" in best and "VAL_BPB = [0.9]" not in _shown(best)
    # runs without a change of their own say why there is nothing to show
    assert views.diff_text(ws, 1).endswith("\nno change: a baseline runs the code as it is")
    assert views.diff_text(ws, 4).endswith("\nno change: the proposal changed nothing")
    assert "\nno change: rejected: changed the protected prepare.py" in views.diff_text(ws, 6)
    with pytest.raises(UserError, match="^there is no experiment #7; the last recorded is #6$"):
        views.diff_text(ws, 7)


def test_a_diff_too_long_for_a_chat_message_is_cut_with_the_command_for_the_rest(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    long = "".join(f"# a long comment line {i} that an agent wrote into train.py\n" for i in range(200))
    train = (settings.workspace_path / "train.py").read_text()
    proposer = ScriptedProposer([{"write": {"train.py": long + train.replace("[1.0]", "[0.9]")}}])
    assert run_engine(settings, 2, proposer=proposer) == 0
    ws = settings.workspace_path
    whole = git_diff(ws, "HEAD~1", "HEAD")
    answer = send_command(ws, "diff 2", sender="cli:me")  # `nightlab ctl diff 2`: the chat's answer
    assert len(answer) <= views.CHAT_DIFF_CHARS
    *shown, note = _shown(answer).split("\n")
    assert whole.startswith("\n".join(shown) + "\n")
    total = len(whole.split("\n"))
    assert note.startswith(f"… {total - len(shown)} of {total} lines not shown; all of it: git -C ")
    command = note.split("all of it: ", 1)[1]
    rest = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True).stdout
    assert rest.rstrip("\n") == whole  # the command gives all of it
    assert _shown(views.diff_text(ws, 2)) == whole  # a terminal: all the ledger holds


def test_the_ledger_keeps_a_long_patch_s_first_lines_and_counts_them_all() -> None:
    diff = "".join(f"+line {i:05d} é\n" for i in range(3000))  # 15 bytes a line, 45 KB
    patch = ledger.make_patch("a" * 40, "b" * 40, {"train.py": (3000, 0)}, diff)
    assert patch.lines == 3000 and diff.startswith(patch.text) and patch.text.endswith("\n")
    assert ledger.PATCH_CAP_BYTES - 15 < len(patch.text.encode()) <= ledger.PATCH_CAP_BYTES
    assert ledger.split_lines("a\nb") == ["a\n", "b"] and ledger.split_lines("a\x0cb\n") == ["a\x0cb\n"]


def test_an_experiment_recorded_before_patches_were_kept_says_how_to_see_it(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    assert run_engine(settings, 2, proposer=ScriptedProposer([{"set": {"VAL_BPB": [0.9]}}])) == 0
    ws = settings.workspace_path
    db = sqlite3.connect(ws / ".nightlab" / "state.db")
    db.execute("DROP TABLE patches")  # the ledger as an older nightlab left it
    db.commit()
    db.close()
    store = Store.for_workspace(ws)  # opened by this nightlab: the table is back, empty
    assert store.connection().execute("SELECT COUNT(*) FROM patches").fetchone()[0] == 0
    assert store.connection().execute("PRAGMA user_version").fetchone()[0] == 1  # an older one reads it still
    base, commit = git_out(ws, "rev-parse", "HEAD~1"), git_out(ws, "rev-parse", "HEAD")
    said = f"no patch in the ledger (recorded by an older nightlab); on the workspace's machine: git -C {ws.resolve()} diff {base} {commit}"
    assert views.diff_text(ws, 2) == f"#2 keep: step 0: VAL_BPB=[0.9]\n{said}"
    assert views.diff_text(ws) == f"the best, #2, against the baseline, #1: step 0: VAL_BPB=[0.9]\n{said}"


def test_a_change_in_flight_is_shown_before_its_result(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    ledger.new_candidate(store, "baseline", "a" * 40, commit="a" * 40, phase="running", description="baseline")
    proposing = ledger.new_candidate(store, "proposal", "a" * 40, description="")
    running = ledger.new_candidate(store, "proposal", "a" * 40, commit="b" * 40, phase="running",
                                   description="raise the warmup")
    ledger.record_patch(store, ledger.make_patch("a" * 40, "b" * 40, {"train.py": (1, 1)}, "-WARMUP = 0\n+WARMUP = 0.1\n"))
    assert views.diff_text(tmp_path, running.number) == "#3 in flight: raise the warmup\naaaaaaa..bbbbbbb train.py +1 -1\n-WARMUP = 0\n+WARMUP = 0.1"
    assert views.diff_text(tmp_path, proposing.number) == "#2 in flight: proposal\nno change yet: its proposal is being made"
    assert views.diff_text(tmp_path, 1) == "#1 in flight: baseline\nno change: a baseline runs the code as it is"
    assert views.diff_text(tmp_path) == "no result yet"
