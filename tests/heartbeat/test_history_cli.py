"""`nightlab history` filters: --kept-only, --status, --top N (best first), through the CLI."""

from __future__ import annotations

import resource
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from nightlab.heartbeat import cli
from nightlab.loop.state.store import Store

from tests.bot.conftest import finished, finished_with_patch


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store.for_workspace(ws)
    for status, metric in [("keep", 1.0), ("discard", 1.2), ("keep", 0.9), ("crash", None),
                           ("discard", 0.95), ("keep", 0.85), ("crash", None)]:
        finished(store, status, metric, description=f"{status} {metric}")
    store.close()
    return ws


def history(workspace: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert cli.main(["history", "--workspace", str(workspace), *args]) == 0
    return [line.split()[0] + " " + line.split()[1] for line in capsys.readouterr().out.strip().splitlines()]


def test_filters(workspace: Path, capsys) -> None:
    assert history(workspace, capsys, "-n", "3") == ["#5 discard", "#6 keep", "#7 crash"]
    assert history(workspace, capsys, "--kept-only") == ["#1 keep", "#3 keep", "#6 keep"]
    assert history(workspace, capsys, "--kept-only", "-n", "2") == ["#3 keep", "#6 keep"]
    assert history(workspace, capsys, "--status", "crash") == ["#4 crash", "#7 crash"]
    assert history(workspace, capsys, "--top", "3") == ["#6 keep", "#3 keep", "#5 discard"]  # best first
    assert history(workspace, capsys, "--top", "2", "--kept-only") == ["#6 keep", "#3 keep"]
    assert cli.main(["history", "--workspace", str(workspace), "--status", "checks_failed"]) == 0
    assert capsys.readouterr().out.strip() == "no checks_failed experiments yet"


def test_top_ranks_within_the_current_setting(tmp_path: Path, capsys) -> None:
    """After a budget, data or metric change, a result of before ranks against nothing: the old
    setting's 0.85 topped a list of the new one's (a metric change even mixed two metrics)."""
    store = Store.for_workspace(tmp_path)
    for metric, setting in [(1.0, "s300"), (0.85, "s300"), (None, "s300"), (1.3, "s600"), (1.25, "s600")]:
        finished(store, "keep" if metric else "crash", metric, setting=setting)
    store.close()
    assert cli.main(["history", "--workspace", str(tmp_path), "--top", "3"]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in said[:-1]] == ["#5", "#4"]
    assert said[-1] == "(ranked within the current setting; 2 results of an earlier one left out)"


def test_the_columns_stay_aligned_past_9(workspace: Path, capsys) -> None:
    store = Store.for_workspace(workspace)
    for _ in range(3):  # #8 .. #10
        finished(store, "discard", 1.1, description="d")
    store.close()
    assert cli.main(["history", "--workspace", str(workspace), "-n", "3"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("#8  discard ") and said[2].startswith("#10 discard ")
    assert len({line.index("1.100000") for line in said}) == 1  # the numbers in one column


def test_bigger_is_better_and_bad_input(workspace: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "max.toml"
    config.write_text(f'[workspace]\npath = "{workspace}"\n[project]\ndirection = "maximize"\n')
    assert cli.main(["history", "--config", str(config), "--top", "2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["#2", "#1"]
    for bad in (["--top", "0"], ["--status", "kept"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["history", "--workspace", str(workspace), *bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "expected a whole number from 1 to 999999999, got '0'" in err or "invalid choice: 'kept'" in err


@pytest.mark.parametrize(("args", "said"), [
    (["--kept-only", "--status", "crash"], "nightlab history: error: argument --status: not allowed with argument --kept-only"),
    (["--top", "3", "--status", "crash"], "nightlab: --top ranks results and a crash has none; leave out --top to list the crashes"),
    # -n was ignored: the 3 best were listed
    (["--top", "3", "-n", "1"], "nightlab history: error: argument -n: not allowed with argument --top"),
    (["-n", "20", "--top", "3"], "nightlab history: error: argument --top: not allowed with argument -n"),  # -n's default
])
def test_filters_that_contradict_are_refused_in_one_line(workspace: Path, capsys, args: list[str], said: str) -> None:
    # were answered as if half of it was not asked: the kept ones, or "no crash experiments yet"
    try:
        code = cli.main(["history", "--workspace", str(workspace), *args])
    except SystemExit as exit_:  # the parser's own refusal
        code = exit_.code
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == said


def test_diff_prints_all_the_ledger_holds_and_ctl_diff_the_chat_s_cut(workspace: Path, capsys) -> None:
    store = Store.for_workspace(workspace)
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1,0 +1,400 @@\n" + "".join(f"+# line {i}\n" for i in range(400))
    number = finished_with_patch(store, diff, description="a long comment")
    store.close()
    assert cli.main(["diff", str(number), "--workspace", str(workspace)]) == 0
    assert capsys.readouterr().out == f"#{number} keep: a long comment\nbase..c0ffee train.py +400 -0\n{diff}"
    assert cli.main(["ctl", "diff", str(number), "--workspace", str(workspace)]) == 0  # as a chat gets it
    assert capsys.readouterr().out.rstrip().endswith(f"lines not shown; all of it: git -C {workspace.resolve()} diff base c0ffee")
    assert cli.main(["diff", "99", "--workspace", str(workspace)]) == 2
    assert capsys.readouterr().err == f"nightlab: there is no experiment #99; the last recorded is #{number}\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["diff", "best", "--workspace", str(workspace)])
    assert exit_.value.code == 2 and "expected a whole number from 1 to 999999999, got 'best'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "said"), [
    # past SQLite's INTEGER: an OverflowError's traceback
    (["history", "-n", "99999999999999999999"], "argument -n: expected a whole number from 1 to 999999999,"
                                                " got '99999999999999999999'"),
    (["history", "-n", "9" * 5000], "argument -n: expected a whole number from 1 to 999999999"),  # int(): 4300 digits
    (["history", "--top", "99999999999999999999"], "argument --top: expected a whole number from 1 to 999999999"),
    (["diff", "99999999999999999999"], "argument N: expected a whole number from 1 to 999999999"),
    (["history", "-n", "²"], "argument -n: expected a whole number from 1 to 999999999, got '²'"),
    (["ctl", "diff", "99999999999999999999"], "nightlab: diff takes an experiment number from 1 to 999999999,"
                                              " got '99999999999999999999'; usage: diff [N]"),
    (["ctl", "diff", "²"], "nightlab: diff takes an experiment number from 1 to 999999999, got '²'; usage: diff [N]"),
])
def test_a_number_too_big_or_not_ascii_is_refused_in_one_line(workspace: Path, capsys, argv: list[str],
                                                               said: str) -> None:
    try:
        code = cli.main([*argv, "--workspace", str(workspace)])
    except SystemExit as exit_:  # the parser's own refusal
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert said in err.strip().splitlines()[-1]


def _disk_full() -> None:
    """In the child: no file may grow (a full disk, as far as this process can tell)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an error instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_a_state_database_on_a_full_disk_is_said_with_what_to_do(workspace: Path) -> None:
    """Opening the ledger writes (its WAL files): on a full disk `nightlab history` was a traceback."""
    out = subprocess.run([sys.executable, "-m", "nightlab.heartbeat.cli", "history", "--workspace", str(workspace)],
                         preexec_fn=_disk_full, capture_output=True, text=True, check=False)
    db = workspace / ".nightlab" / "state.db"
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (f"nightlab: cannot write the state database {db} (disk I/O error): is its disk full"
                          f" (`df -h {db.parent}`), or the folder not writable by this user? Free space or fix the"
                          " permissions, then start again\n")


def damage_table(db: Path, table: str) -> None:
    """Overwrite a page of `table`'s rows: the schema still opens, a query of the table fails."""
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file, none left in the WAL
        page_size, page = conn.execute(
            "SELECT pgsize, max(pageno) FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,)).fetchone()
    data = bytearray(db.read_bytes())
    data[(page - 1) * page_size : page * page_size] = b"\x0d" + b"\xff" * (page_size - 1)
    db.write_bytes(bytes(data))


def test_a_ledger_damaged_inside_is_said_with_what_to_do(workspace: Path, capsys) -> None:
    db = workspace / ".nightlab" / "state.db"
    damage_table(db, "experiments")
    assert cli.main(["history", "--workspace", str(workspace)]) == 2  # was sqlite's traceback
    assert capsys.readouterr().err == (f"nightlab: {db} is not a readable nightlab state database (database disk"
                                       " image is malformed); restore it from a backup, or move it aside to start"
                                       " this workspace's ledger afresh\n")


def test_top_ranks_in_the_direction_the_ledger_judged_in(workspace: Path, tmp_path: Path, capsys) -> None:
    """The config turned to maximize after a night judged lower-is-better: --top ranked 1.2 first while
    `best` and the report still named the night's lowest."""
    from nightlab.loop.state.stats import DIRECTION_KEY

    with closing(Store.for_workspace(workspace)) as store:
        store.set(DIRECTION_KEY, "minimize")
    config = tmp_path / "max.toml"
    config.write_text(f'[workspace]\npath = "{workspace}"\n[project]\ndirection = "maximize"\n')
    assert cli.main(["history", "--config", str(config), "--top", "2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["#6", "#3"]
