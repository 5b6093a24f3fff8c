from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.store import LedgerGone, Store


def test_kv_events_commands_round_trip(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    assert store.get("paused", False) is False
    store.set("paused", True)
    assert Store.for_workspace(tmp_path).get("paused") is True
    first = store.emit("experiment_started", number=1)
    second = store.emit("experiment_finished", number=1, val_bpb=0.99)
    assert [e.id for e in store.events_after(0)] == [first, second]
    assert store.events_after(first)[0].payload == {"number": 1, "val_bpb": 0.99}
    cid = store.add_command("pause", "now", sender="telegram:1")
    assert [c.name for c in store.pending_commands()] == ["pause"]
    store.finish_command(cid, "done", "paused")
    assert store.pending_commands() == []
    assert store.command(cid).result == "paused"


def test_transaction_rolls_back(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    try:
        with store.transaction():
            store.emit("a")
            store.set("k", 1)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert store.last_event_id() == 0 and store.get("k") is None


def _writer(path: str, n: int) -> None:
    store = Store(Path(path))
    for i in range(n):
        store.emit("tick", i=i)


def test_several_processes_write_safely(tmp_path: Path) -> None:
    store = Store.for_workspace(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(store.path), 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert len(store.events_after(0, limit=1000)) == 150


def test_a_database_from_an_older_nightlab_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).connection().execute("INSERT INTO experiments(number, candidate_id, kind, commit_sha, status,"
                                     " finished_at) VALUES (1, 1, 'baseline', 'abc', 'keep', 0.0)")
    old = sqlite3.connect(path)  # the columns an older nightlab did not have
    for table, column in (("experiments", "hardware"), ("experiments", "setting"), ("candidates", "pin")):
        old.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    old.commit()
    old.close()
    store = Store(path)
    Store(path)  # a second opener finds them there
    columns = {r["name"] for r in store.connection().execute("PRAGMA table_info(experiments)")}
    assert {"hardware", "setting"} <= columns
    row = store.connection().execute("SELECT hardware, setting FROM experiments").fetchone()
    assert tuple(row) == ("", "")  # old results: no class recorded
    assert "pin" in {r["name"] for r in store.connection().execute("PRAGMA table_info(candidates)")}


def test_a_damaged_database_is_a_user_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"not sqlite, e.g. a half-copied file\n" * 10)
    with pytest.raises(UserError) as err:
        Store(path)
    assert str(err.value) == (f"{path} is not a readable nightlab state database (file is not a database); restore"
                              " it from a backup, or move it aside to start this workspace's ledger afresh")


def test_a_database_from_a_newer_nightlab_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).set("loop.paused", None)
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version = 99")
    newer.execute("ALTER TABLE experiments RENAME COLUMN metric TO value")  # a layout this one would misread
    newer.commit()
    newer.close()
    with pytest.raises(UserError) as err:
        Store(path)
    assert str(err.value) == (f"{path} was written by a newer nightlab (state schema 99; this one reads up to 1):"
                              " update this nightlab (`git pull` in its clone, then `pip install -e .`), or give"
                              " another workspace")
    columns = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(experiments)")}
    assert "metric" not in columns  # nothing was added to it


def test_a_new_database_carries_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1


def test_a_following_store_makes_no_empty_ledger_while_the_removed_one_is_not_written_back(tmp_path: Path) -> None:
    """The daemon's store follows the file the engine writes back after an agent's `git clean -fdx`;
    meanwhile a new thread of the daemon (a heartbeat job) made an empty database in the folder its
    lock file was put back in, and every thread followed that one, without tables, until then."""
    store = Store.for_workspace(tmp_path, follow=True)
    store.set("night", 1)
    shutil.rmtree(tmp_path / ".nightlab")
    (tmp_path / ".nightlab").mkdir()  # the daemon's lock file put back
    failed: list[BaseException] = []

    def job() -> None:
        try:
            store.get("night")
        except LedgerGone as exc:  # said in one line by the heartbeat (jobs.waiting_for_the_ledger)
            failed.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    db = tmp_path / ".nightlab" / "state.db"
    assert [str(e) for e in failed] == [f"the ledger {db} was removed (an agent's `git clean -x`, or `rm`) and is not"
                                        " back yet"]
    assert not (tmp_path / ".nightlab" / "state.db").exists()
    assert store.get("night") == 1  # this thread still reads the removed file, until it is written back
