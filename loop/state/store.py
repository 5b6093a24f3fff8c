"""The durable state store: one SQLite file (WAL) in the workspace's state directory.

Every part of nightlab talks through it: the engine writes experiments, runs and events and reads
commands; the bot reads events into its outbox and writes commands; the heartbeat reads runs and
the engine's tick. Any process may be killed at any moment and start again from here, so every
write that belongs together happens in one transaction.

Each thread gets its own connection (sqlite3 connections must not be shared across threads);
several processes may open the same file at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.loop.state.errors import UserError

STATE_DIRNAME = ".nightlab"
DB_FILENAME = "state.db"
# PRAGMA user_version of the database: raised with every change an older nightlab would misread
# (the columns in _ADDED_COLUMNS are read by every version, and a new table, `patches`, is never
# read by an older one, so they left it at 1)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                      -- JSON
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      REAL NOT NULL,
    kind    TEXT NOT NULL,
    payload TEXT NOT NULL                    -- JSON object
);
CREATE TABLE IF NOT EXISTS commands (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         REAL NOT NULL,
    sender     TEXT NOT NULL,                -- e.g. "telegram:123", "cli:alice"
    name       TEXT NOT NULL,
    args       TEXT NOT NULL DEFAULT '',     -- the arguments as text, for people (and notes)
    status     TEXT NOT NULL DEFAULT 'pending',   -- pending | done | rejected
    result     TEXT NOT NULL DEFAULT '',
    handled_at REAL,
    command    TEXT NOT NULL DEFAULT '',     -- the typed command (loop/state/commands.py) as JSON
    reply_to   TEXT NOT NULL DEFAULT ''      -- the chat that got the answer, e.g. "telegram:-1001"
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(status) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER NOT NULL,
    handle       TEXT NOT NULL,               -- JSON from the executor
    slot         TEXT NOT NULL DEFAULT '',
    log_path     TEXT NOT NULL,
    started_at   REAL NOT NULL,
    state        TEXT NOT NULL DEFAULT 'running',   -- running | exited
    exit_code    INTEGER,
    kill_reason  TEXT,                         -- why someone stopped it; the engine records it
    finished_at  REAL,
    setting      TEXT NOT NULL DEFAULT ''       -- the setting digest it started on ('': an older nightlab's)
);
CREATE INDEX IF NOT EXISTS runs_running ON runs(state) WHERE state = 'running';
-- The in-flight cycle, one row per experiment number. `phase` says how far the cycle got, so a
-- restarted engine resumes from it: proposing -> committed -> running -> finished -> recorded -> done.
CREATE TABLE IF NOT EXISTS candidates (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    number        INTEGER NOT NULL UNIQUE,      -- the experiment number people see (#42)
    kind          TEXT NOT NULL,                -- baseline | proposal | confirm | rebase
    confirm_of    INTEGER,                      -- the number a confirm run repeats
    phase         TEXT NOT NULL,
    base_commit   TEXT NOT NULL,                -- the last kept commit it branches from
    commit_sha    TEXT,                         -- the candidate's commit (= base for a baseline)
    description   TEXT NOT NULL DEFAULT '',
    hypothesis    TEXT NOT NULL DEFAULT '',
    area          TEXT NOT NULL DEFAULT '',
    params        TEXT NOT NULL DEFAULT '{}',   -- JSON
    focus         TEXT,
    lines_added   INTEGER NOT NULL DEFAULT 0,
    lines_removed INTEGER NOT NULL DEFAULT 0,
    outcome       TEXT,                         -- JSON verdict, set together with phase 'finished'
    pin           TEXT,                         -- JSON {hardware, node}: where it must run, or NULL
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS candidates_open ON candidates(phase) WHERE phase != 'done';
-- The final record: written exactly once per candidate, in the transaction that emits its
-- experiment_finished event and moves the candidate to 'recorded'.
CREATE TABLE IF NOT EXISTS experiments (
    number        INTEGER PRIMARY KEY,
    candidate_id  INTEGER NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    confirm_of    INTEGER,
    commit_sha    TEXT NOT NULL,
    status        TEXT NOT NULL,                -- keep | discard | crash | checks_failed
    metric        REAL,                         -- NULL for a crash
    metrics       TEXT NOT NULL DEFAULT '{}',   -- JSON: every figure the run printed
    best          REAL,                         -- the best metric after this experiment
    confidence    REAL,                         -- gain / noise; NULL when unknown
    description   TEXT NOT NULL DEFAULT '',
    hypothesis    TEXT NOT NULL DEFAULT '',
    area          TEXT NOT NULL DEFAULT '',
    params        TEXT NOT NULL DEFAULT '{}',
    focus         TEXT,
    reason        TEXT NOT NULL DEFAULT '',
    lines_added   INTEGER NOT NULL DEFAULT 0,
    lines_removed INTEGER NOT NULL DEFAULT 0,
    duration_s    REAL,
    slot          TEXT NOT NULL DEFAULT '',
    started_at    REAL,
    finished_at   REAL NOT NULL,
    hardware      TEXT NOT NULL DEFAULT '',     -- what it ran on, e.g. "NVIDIA H100 80GB HBM3"
    setting       TEXT NOT NULL DEFAULT ''      -- digest of the run command + environment
);
-- Changes as patches, for /diff (the bot cannot run git): the engine records a candidate's change
-- when it commits it (base = the commit it was made on) and a kept change's against the baseline.
-- Experiments recorded before this table have none; the view gives the git command instead.
CREATE TABLE IF NOT EXISTS patches (
    base_commit TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    files       TEXT NOT NULL,                -- JSON [[path, lines added, lines removed], ...]: the whole change
    patch       TEXT NOT NULL,                -- `git diff base commit`, its first lines up to a cap (ledger.py)
    lines       INTEGER NOT NULL,             -- lines of the whole diff (more than `patch` has when capped)
    PRIMARY KEY (base_commit, commit_sha)
);
"""


def unusable(path: Path, exc: OSError | sqlite3.DatabaseError) -> str:
    """What to do about a state database that failed: one that cannot be written (a full disk,
    mostly: sqlite's OperationalError), or one that is damaged (any other DatabaseError)."""
    if isinstance(exc, OSError | sqlite3.OperationalError):
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return (f"cannot write the state database {path} ({why}): is its disk full (`df -h {Path(path).parent}`),"
                " or the folder not writable by this user? Free space or fix the permissions, then start again")
    return (f"{path} is not a readable nightlab state database ({exc}); restore it from a backup, or move it"
            " aside to start this workspace's ledger afresh")


def state_dir(workspace: Path) -> Path:
    return Path(workspace) / STATE_DIRNAME


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class CommandRecord:
    id: int
    ts: float
    sender: str
    name: str
    args: str
    status: str
    result: str
    command: str  # JSON; what the engine applies
    reply_to: str

# Columns added after the first release: (table, column, definition as in _SCHEMA).
_ADDED_COLUMNS = (
    ("candidates", "pin", "TEXT"),
    ("experiments", "hardware", "TEXT NOT NULL DEFAULT ''"),
    ("experiments", "setting", "TEXT NOT NULL DEFAULT ''"),
    ("commands", "command", "TEXT NOT NULL DEFAULT ''"),
    ("commands", "reply_to", "TEXT NOT NULL DEFAULT ''"),
    ("runs", "setting", "TEXT NOT NULL DEFAULT ''"),
)


class LedgerGone(UserError):
    """A follower's thread found no ledger to open: removed under the daemon, before the engine
    writes it back (its threads with a connection read the removed file meanwhile)."""


class Store:
    """A handle on the state database. Cheap to create; safe to use from several threads.

    `follow`: each connection reopens at the path once the file there is another one (the engine
    wrote back a ledger an agent removed): the daemon and its bot then write where the next start
    reads, not into the removed file. The engine never follows: it is the one that writes it back."""

    def __init__(self, path: Path, follow: bool = False) -> None:
        self.path = Path(path)
        self.follow = follow
        self._made = False  # the file made (or found) and its schema in place
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._refuse_a_newer_schema()
            self.connection().executescript(_SCHEMA)  # idempotent; executescript commits by itself
            self._add_missing_columns()
            self.connection().execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._made = True
        except (OSError, sqlite3.DatabaseError) as exc:
            if "locked" in str(exc):  # another process's long write: transient, not the user's to fix
                raise
            raise UserError(unusable(self.path, exc)) from None

    def check(self) -> None:
        """Every page readable (PRAGMA quick_check, a pass over the file): opening reads only the
        schema, so a damaged table would first show in the middle of a night."""
        try:
            found = [r[0] for r in self.connection().execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise UserError(unusable(self.path, exc)) from None
        if found != ["ok"]:
            raise UserError(unusable(self.path, sqlite3.DatabaseError(f"damaged: {'; '.join(found[:3])}")))

    def _refuse_a_newer_schema(self) -> None:
        """Rows this version wrote into a newer layout would be misread by the nightlab that made it."""
        version = self.connection().execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"{self.path} was written by a newer nightlab (state schema {version}; this one"
                            f" reads up to {SCHEMA_VERSION}): update this nightlab (`git pull` in its clone, then"
                            " `pip install -e .`), or give another workspace")

    def _add_missing_columns(self) -> None:
        """A database made by an older nightlab gets the columns added since (with their defaults)."""
        db = self.connection()
        for table, column, ddl in _ADDED_COLUMNS:
            present = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                try:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise

    @classmethod
    def for_workspace(cls, workspace: Path, follow: bool = False) -> Store:
        return cls(state_dir(workspace) / DB_FILENAME, follow)

    @classmethod
    def existing(cls, workspace: Path) -> Store:
        """The store of a workspace `nightlab init` made; UserError where there is none (reading
        never makes one)."""
        workspace = Path(workspace)
        if not (state_dir(workspace) / DB_FILENAME).exists():
            raise UserError(f"{workspace} is not a nightlab workspace; run `nightlab init {workspace}` first")
        return cls.for_workspace(workspace)

    # -- connections -------------------------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is not None and self.follow and not db.in_transaction and self.file_id() not in (None, self._local.file):
            db.close()  # the path names another file now; none (removed, not yet written back): stay
            db = None
        if db is None:
            # isolation_level=None: we issue BEGIN ourselves, so a transaction is exactly the block.
            # a follower's thread never makes the file: an empty one made in the folder a lock put back,
            # before the engine writes the ledger back, would be followed by every thread until then
            where = f"{self.path.absolute().as_uri()}?mode=rw" if self.follow and self._made else str(self.path)
            try:
                db = sqlite3.connect(where, uri=True, timeout=30.0, isolation_level=None)
            except sqlite3.OperationalError:
                if self.follow and self.file_id() is None:  # a thread that had not opened it yet
                    raise LedgerGone(f"the ledger {self.path} was removed (an agent's `git clean -x`, or `rm`)"
                                     " and is not back yet") from None
                raise
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            self._local.file = self.file_id() if self.follow else None
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; nested use joins the outer transaction."""
        db = self.connection()
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def file_id(self) -> tuple[int, int] | None:
        """Which file the path names now (device, inode); None when it names none."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def write_back(self) -> None:
        """The open database written back to its path, whose file was removed under it (what a
        process still has open survives the removal; the next one to open the path would not)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.path, self.path.with_name(self.path.name + "-wal"),
                      self.path.with_name(self.path.name + "-shm")):
            stale.unlink(missing_ok=True)  # an empty database opened there meanwhile
        copy = sqlite3.connect(self.path)
        try:
            self.connection().backup(copy)
        finally:
            copy.close()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- key/value state (paused, focus, best commit, engine tick, ...) ------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self.connection().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def set(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO kv(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def with_prefix(self, prefix: str) -> dict[str, Any]:
        """Every key starting with `prefix` and its value, oldest first."""
        rows = self.connection().execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY rowid", (len(prefix), prefix))
        return {r["key"]: json.loads(r["value"]) for r in rows}

    def delete(self, key: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))

    # -- events: the loop's durable story, read by the bot -------------------------------------
    def emit(self, kind: str, /, **payload: Any) -> int:  # "kind" may be a payload key too
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO events(ts, kind, payload) VALUES(?, ?, ?)",
                (time.time(), kind, json.dumps(payload, default=str)),
            )
            assert cur.lastrowid is not None  # every INSERT sets it
            return cur.lastrowid

    def events_after(self, cursor: int, limit: int = 500) -> list[Event]:
        rows = self.connection().execute(
            "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        )
        return [Event(r["id"], r["ts"], r["kind"], json.loads(r["payload"])) for r in rows]

    def last_event_time(self, kind: str) -> float | None:
        row = self.connection().execute("SELECT MAX(ts) AS t FROM events WHERE kind = ?", (kind,)).fetchone()
        return None if row["t"] is None else float(row["t"])

    def last_event_id(self) -> int:
        row = self.connection().execute("SELECT MAX(id) AS m FROM events").fetchone()
        return int(row["m"] or 0)

    # -- commands: written by the bot and `nightlab ctl`, applied by the engine ----------------
    def add_command(self, name: str, args: str = "", sender: str = "cli", command: str = "", reply_to: str = "") -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO commands(ts, sender, name, args, command, reply_to) VALUES(?, ?, ?, ?, ?, ?)",
                (time.time(), sender, name, args, command, reply_to),
            )
            assert cur.lastrowid is not None  # every INSERT sets it
            return cur.lastrowid

    def pending_commands(self) -> list[CommandRecord]:
        rows = self.connection().execute(
            "SELECT * FROM commands WHERE status = 'pending' ORDER BY id"
        )
        return [_command(r) for r in rows]

    def finish_command(self, command_id: int, status: str, result: str = "") -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE commands SET status = ?, result = ?, handled_at = ? WHERE id = ?",
                (status, result, time.time(), command_id),
            )

    def command(self, command_id: int) -> CommandRecord | None:
        row = self.connection().execute(
            "SELECT * FROM commands WHERE id = ?", (command_id,)
        ).fetchone()
        return None if row is None else _command(row)


def _command(r: sqlite3.Row) -> CommandRecord:
    return CommandRecord(r["id"], r["ts"], r["sender"], r["name"], r["args"], r["status"], r["result"],
                         r["command"], r["reply_to"])
