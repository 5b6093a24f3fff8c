"""The ledger: candidates (the cycle in flight), runs, experiments (the final record) and the
two export files kept in step with them.

Experiments are written exactly once: `record_experiment` inserts the row, emits its
`experiment_finished` event and moves the candidate to `recorded` in one transaction, and the
table's primary key on the number refuses a second row. `results.tsv` (upstream's format) and
`autoresearch.jsonl` (the autoresearch plugins' format) are regenerated from the table after
every write, through a temp file and a rename, so they always agree with it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightlab.loop.state.store import Store

RESULTS_TSV = "results.tsv"
AUTORESEARCH_JSONL = "autoresearch.jsonl"


@dataclass(frozen=True, order=True)
class HardwareClass:
    """Runs are comparable only within one class. `hardware` is readable ("NVIDIA H100 80GB HBM3",
    "2x NVIDIA A100-SXM4-80GB", "cpu: AMD EPYC 7B13"); `setting` is a short digest."""

    hardware: str
    setting: str


@dataclass(frozen=True)
class Candidate:
    id: int
    number: int
    kind: str  # baseline | proposal | confirm | rebase
    confirm_of: int | None
    phase: str
    base_commit: str
    commit: str | None
    description: str
    hypothesis: str
    area: str
    params: dict[str, Any]
    focus: str | None
    lines_added: int
    lines_removed: int
    outcome: dict[str, Any] | None
    created_at: float
    pin: dict[str, str] | None = None  # {hardware, node}: where it must run (a confirm, a class baseline)


@dataclass(frozen=True)
class RunRecord:
    id: int
    candidate_id: int
    handle: str  # executor JSON
    slot: str
    log_path: str
    started_at: float
    state: str  # running | exited
    exit_code: int | None
    kill_reason: str | None
    finished_at: float | None
    setting: str = ""  # the setting digest it started on ("": a run launched by an older nightlab)


@dataclass(frozen=True)
class Experiment:
    number: int
    kind: str
    confirm_of: int | None
    commit: str
    status: str
    metric: float | None
    metrics: dict[str, float]
    best: float | None
    confidence: float | None
    description: str
    hypothesis: str
    area: str
    params: dict[str, Any] = field(default_factory=dict)
    focus: str | None = None
    reason: str = ""
    lines_added: int = 0
    lines_removed: int = 0
    duration_s: float | None = None
    slot: str = ""
    started_at: float | None = None
    finished_at: float = 0.0
    hardware: str = ""  # what the run ran on ("" when there was no run)
    setting: str = ""  # digest of the run command + environment (loop/hardware.py)

    @property
    def hardware_class(self) -> HardwareClass:
        return HardwareClass(self.hardware, self.setting)


# -- candidates ----------------------------------------------------------------------------------
def _candidate(r: sqlite3.Row) -> Candidate:
    return Candidate(
        r["id"], r["number"], r["kind"], r["confirm_of"], r["phase"], r["base_commit"],
        r["commit_sha"], r["description"], r["hypothesis"], r["area"], json.loads(r["params"]),
        r["focus"], r["lines_added"], r["lines_removed"],
        None if r["outcome"] is None else json.loads(r["outcome"]), r["created_at"],
        None if r["pin"] is None else json.loads(r["pin"]),
    )


def new_candidate(
    store: Store,
    kind: str,
    base_commit: str,
    *,
    commit: str | None = None,
    phase: str = "proposing",
    confirm_of: int | None = None,
    description: str = "",
    hypothesis: str = "",
    area: str = "",
    params: dict[str, Any] | None = None,
    focus: str | None = None,
    pin: dict[str, str] | None = None,
) -> Candidate:
    """A new candidate with the next experiment number (joins an open transaction)."""
    now = time.time()
    with store.transaction() as db:
        number = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM candidates").fetchone()[0]
        cur = db.execute(
            "INSERT INTO candidates(number, kind, confirm_of, phase, base_commit, commit_sha,"
            " description, hypothesis, area, params, focus, pin, created_at, updated_at)"
            " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (number, kind, confirm_of, phase, base_commit, commit, description, hypothesis, area,
             json.dumps(params or {}), focus, None if pin is None else json.dumps(pin), now, now),
        )
        assert cur.lastrowid is not None  # every INSERT sets it
        return get_candidate(store, cur.lastrowid)


def get_candidate(store: Store, candidate_id: int) -> Candidate:
    row = store.connection().execute("SELECT * FROM candidates WHERE id = ?", (candidate_id,)).fetchone()
    return _candidate(row)


def candidate_numbered(store: Store, number: int) -> Candidate | None:
    row = store.connection().execute("SELECT * FROM candidates WHERE number = ?", (number,)).fetchone()
    return None if row is None else _candidate(row)


def made_by_the_loop(store: Store, sha: str) -> bool:
    """`sha` is a candidate's commit or the base one branched from: the loop made or measured it."""
    row = store.connection().execute(
        "SELECT 1 FROM candidates WHERE commit_sha = ? OR base_commit = ? LIMIT 1", (sha, sha)).fetchone()
    return row is not None


def number_of_commit(store: Store, sha: str) -> int | None:
    """The experiment whose commit `sha` is (a proposal's, a re-made one's), or None."""
    row = store.connection().execute(
        "SELECT number FROM candidates WHERE commit_sha = ? AND kind != 'baseline' LIMIT 1", (sha,)).fetchone()
    return None if row is None else int(row[0])


def open_candidates(store: Store) -> list[Candidate]:
    rows = store.connection().execute("SELECT * FROM candidates WHERE phase != 'done' ORDER BY number")
    return [_candidate(r) for r in rows]


_CANDIDATE_FIELDS = {
    "phase", "commit_sha", "description", "hypothesis", "area", "params", "focus",
    "lines_added", "lines_removed", "outcome",
}


def update_candidate(store: Store, candidate_id: int, **fields: Any) -> Candidate:
    """Set some fields (params/outcome as Python objects); joins an open transaction."""
    unknown = set(fields) - _CANDIDATE_FIELDS
    if unknown:
        raise ValueError(f"not candidate fields: {sorted(unknown)}")
    values = {k: json.dumps(v) if k in ("params", "outcome") and v is not None else v for k, v in fields.items()}
    assignments = ", ".join(f"{k} = ?" for k in values)
    with store.transaction() as db:
        db.execute(
            f"UPDATE candidates SET {assignments}, updated_at = ? WHERE id = ?",
            (*values.values(), time.time(), candidate_id),
        )
    return get_candidate(store, candidate_id)


# -- runs (shared with the heartbeat) --------------------------------------------------------------
def _run(r: sqlite3.Row) -> RunRecord:
    return RunRecord(
        r["id"], r["candidate_id"], r["handle"], r["slot"], r["log_path"], r["started_at"],
        r["state"], r["exit_code"], r["kill_reason"], r["finished_at"], r["setting"],
    )


def add_run(store: Store, candidate_id: int, handle: str, slot: str, log_path: str, setting: str = "") -> RunRecord:
    with store.transaction() as db:
        cur = db.execute(
            "INSERT INTO runs(candidate_id, handle, slot, log_path, started_at, setting) VALUES(?, ?, ?, ?, ?, ?)",
            (candidate_id, handle, slot, log_path, time.time(), setting),
        )
        return _run(db.execute("SELECT * FROM runs WHERE id = ?", (cur.lastrowid,)).fetchone())


def run_for_candidate(store: Store, candidate_id: int) -> RunRecord | None:
    row = store.connection().execute(
        "SELECT * FROM runs WHERE candidate_id = ? ORDER BY id DESC LIMIT 1", (candidate_id,)
    ).fetchone()
    return None if row is None else _run(row)


def running_runs(store: Store) -> list[RunRecord]:
    """Every run whose process the engine has not yet seen end (for the heartbeat's checks)."""
    rows = store.connection().execute("SELECT * FROM runs WHERE state = 'running' ORDER BY id")
    return [_run(r) for r in rows]


def running_numbers(store: Store) -> list[int]:
    """The experiment numbers of the runs still running (what a daemon's start and stop say)."""
    rows = store.connection().execute(
        "SELECT c.number FROM runs r JOIN candidates c ON c.id = r.candidate_id WHERE r.state = 'running'"
        " ORDER BY c.number")
    return [int(r["number"]) for r in rows]


def in_flight(store: Store) -> list[tuple[Candidate, RunRecord]]:
    """Every running run with its candidate, oldest first."""
    return [(get_candidate(store, r.candidate_id), r) for r in running_runs(store)]


USER_KILL_PREFIX = "killed by "  # kill_reason of a user's kill: recorded as discard, not crash
# the reason of a run the data failed (the harness's `FAIL: data:` line: a damaged shard, a tokenizer
# gone): it measured nothing of its change, which runs again once the data is fixed
DATA_PROBLEM_PREFIX = "data problem:"
# the reason of a change's re-run the data failed again: the change's crash (it may be what breaks
# the data, or an agent's train.py printing the harness's line), so no change runs again forever
DATA_AGAIN_PREFIX = "data problem again:"
# the reason of a run in the workspace that the harness refused because its own files changed while it
# trained: a person's edit as likely as the run's write (nothing tells them apart as it happens), so it
# is taken as the person's once: the change runs again, and a re-run that changes them too is its crash
HARNESS_CHANGED_PREFIX = "harness changed:"
HARNESS_AGAIN_PREFIX = "harness changed again:"
# the reason of a run that the harness refused because the scorer's Python (its standard library, its site
# dirs) changed since its change began: a package a person installed, or a file the run or the agent wrote
# there (a .pth file runs in the scorer as it starts). Nothing is scored until a person has looked: the
# loop pauses, and the change runs again after /resume; a re-run that changes it too is its crash
PYTHON_CHANGED_PREFIX = "python changed:"
PYTHON_AGAIN_PREFIX = "python changed again:"


# the reason of a run whose log and exit status were removed after it ended (an agent's `git clean -x`
# or `rm` of .nightlab): its result is lost, not its change's fault, and the change runs again
RESULT_LOST_PREFIX = "result lost:"


@dataclass(frozen=True)
class NotTheChange:
    """What failed a run besides its change, as the run's reason starts (loop/judge.py writes it): the
    change runs again, once (after /resume where the loop pauses for a person)."""

    prefix: str
    again: str  # the reason's start when the change's re-run met it too: then it is the change's crash
    words: str  # in the counts ("2 bad data")
    digest: str  # a digest's head, before "runs again" (" after /resume" where the loop pauses)
    resume: str | None  # what the loop's pause asks of a person; None: no pause (nothing for a person to fix)
    blame: str  # why a second time is the change's


NOT_THE_CHANGE = (
    NotTheChange(DATA_PROBLEM_PREFIX, DATA_AGAIN_PREFIX, "bad data", "bad data, not the change", "/resume once it is fixed",
                 "its run before met it too, so it counts as this change's crash (if the data is fine, the change is"
                 " what fails it)"),
    NotTheChange(HARNESS_CHANGED_PREFIX, HARNESS_AGAIN_PREFIX, "harness edited", "harness edited while it ran",
                 None,  # the engine puts the harness back: a train.py that writes it stalls no night
                 "its run before changed it too, so it counts as this change's crash (a person's edit twice, each"
                 " during one of its runs, is unlikely: the change is what writes it)"),
    NotTheChange(PYTHON_CHANGED_PREFIX, PYTHON_AGAIN_PREFIX, "python changed", "the scorer's Python changed",
                 "/resume once you have checked them",
                 "its run before changed it too, so it counts as this change's crash (the change is what writes"
                 " there)"),
)


def not_the_change(reason: str) -> NotTheChange | None:
    """What failed a run, when a run's reason says it was not its change: bad data, or the harness
    changed while it ran."""
    return next((kind for kind in NOT_THE_CHANGE if reason.startswith(kind.prefix)), None)


def measured_nothing(reason: str) -> bool:
    """A run that tells nothing of its change, which runs again: something besides the change failed it
    (`not_the_change`), or its result was lost."""
    return not_the_change(reason) is not None or reason.startswith(RESULT_LOST_PREFIX)


def mark_kill(store: Store, run_id: int, reason: str) -> bool:
    """Say why a run is being stopped, before cancelling it. False when it already ended or
    already has a reason (the first reason wins, so a timeout is not renamed by a later kill)."""
    with store.transaction() as db:
        cur = db.execute(
            "UPDATE runs SET kill_reason = ? WHERE id = ? AND state = 'running' AND kill_reason IS NULL",
            (reason, run_id),
        )
        return cur.rowcount == 1


def finish_run(store: Store, run_id: int, exit_code: int | None, reason: str = "") -> None:
    """The run's process is over. `reason`: why the backend ended it (e.g. a Slurm time limit),
    kept only when nobody gave a reason first."""
    with store.transaction() as db:
        db.execute(
            "UPDATE runs SET state = 'exited', exit_code = ?, finished_at = ?,"
            " kill_reason = COALESCE(kill_reason, ?) WHERE id = ? AND state = 'running'",
            (exit_code, time.time(), reason or None, run_id),
        )


def set_run_slot(store: Store, run_id: int, slot: str) -> None:
    """Where the run really is, once the backend says (a Slurm node)."""
    with store.transaction() as db:
        db.execute("UPDATE runs SET slot = ? WHERE id = ?", (slot, run_id))


def get_run(store: Store, run_id: int) -> RunRecord:
    return _run(store.connection().execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())


# A run's start marker and exit status, next to its log: the executors' wrapper touches the marker
# when the command really starts (a batch job may wait in a queue long after submission) and writes
# the status when it ends; the views, the heartbeat and the engine read them.
def start_file(log_path: Path | str) -> Path:
    return Path(f"{log_path}.exit.start")


def exit_file(log_path: Path | str) -> Path:
    return Path(f"{log_path}.exit")


def started_at(log_path: Path | str) -> float | None:
    """When the command really started (its wrapper's start marker), None if it has not yet."""
    try:
        return start_file(log_path).stat().st_mtime
    except OSError:
        return None


def ended_at(log_path: Path | str) -> float | None:
    """When the command ended (its exit file's mtime), None if it has not (or left no status)."""
    try:
        return exit_file(log_path).stat().st_mtime
    except OSError:
        return None


# -- experiments ---------------------------------------------------------------------------------
_EXPERIMENT_COLUMNS = (
    "number", "candidate_id", "kind", "confirm_of", "commit_sha", "status", "metric", "metrics",
    "best", "confidence", "description", "hypothesis", "area", "params", "focus", "reason",
    "lines_added", "lines_removed", "duration_s", "slot", "started_at", "finished_at", "hardware",
    "setting",
)


def _experiment(r: sqlite3.Row) -> Experiment:
    return Experiment(
        number=r["number"], kind=r["kind"], confirm_of=r["confirm_of"], commit=r["commit_sha"],
        status=r["status"], metric=r["metric"], metrics=json.loads(r["metrics"]), best=r["best"],
        confidence=r["confidence"], description=r["description"], hypothesis=r["hypothesis"],
        area=r["area"], params=json.loads(r["params"]), focus=r["focus"], reason=r["reason"],
        lines_added=r["lines_added"], lines_removed=r["lines_removed"], duration_s=r["duration_s"],
        slot=r["slot"], started_at=r["started_at"], finished_at=r["finished_at"],
        hardware=r["hardware"], setting=r["setting"],
    )


def record_experiment(store: Store, candidate_id: int, exp: Experiment, event: dict[str, Any]) -> bool:
    """Write the experiment, its event and the candidate's phase in one transaction (joins an
    open one, so a caller may add a follow-up candidate atomically).

    Returns False (and writes nothing) when the number is already recorded.
    """
    with store.transaction() as db:
        if db.execute("SELECT 1 FROM experiments WHERE number = ?", (exp.number,)).fetchone():
            return False
        row = {
            "number": exp.number, "candidate_id": candidate_id, "kind": exp.kind,
            "confirm_of": exp.confirm_of, "commit_sha": exp.commit, "status": exp.status,
            "metric": exp.metric, "metrics": json.dumps(exp.metrics), "best": exp.best,
            "confidence": exp.confidence, "description": exp.description,
            "hypothesis": exp.hypothesis, "area": exp.area, "params": json.dumps(exp.params),
            "focus": exp.focus, "reason": exp.reason, "lines_added": exp.lines_added,
            "lines_removed": exp.lines_removed, "duration_s": exp.duration_s, "slot": exp.slot,
            "started_at": exp.started_at, "finished_at": exp.finished_at,
            "hardware": exp.hardware, "setting": exp.setting,
        }
        db.execute(
            f"INSERT INTO experiments({', '.join(_EXPERIMENT_COLUMNS)})"
            f" VALUES({', '.join('?' for _ in _EXPERIMENT_COLUMNS)})",
            tuple(row[c] for c in _EXPERIMENT_COLUMNS),
        )
        store.emit("experiment_finished", **event)
        update_candidate(store, candidate_id, phase="recorded")
    return True


def experiments(store: Store, last: int | None = None) -> list[Experiment]:
    """All experiments oldest first, or the last `last` of them."""
    if last is None:
        rows = store.connection().execute("SELECT * FROM experiments ORDER BY number").fetchall()
    else:
        rows = store.connection().execute(
            "SELECT * FROM experiments ORDER BY number DESC LIMIT ?", (last,)
        ).fetchall()[::-1]
    return [_experiment(r) for r in rows]


def last_setting(rows: list[Experiment]) -> str | None:
    """The setting of the last experiment that ran (one that ended before a run, a proposal that
    failed, has none): what runs are measured under now, as far as the ledger knows; None before any."""
    return next((e.setting for e in reversed(rows) if e.setting), None)


def reference(rows: list[Experiment], cls: HardwareClass) -> Experiment | None:
    """The class's reference: its last keep (a baseline or a kept change), whose `best` is the
    measured metric of that commit on this class. Results are judged only against it, and only
    when it measured the commit they branched from."""
    return next((e for e in reversed(rows) if e.status == "keep" and e.hardware_class == cls), None)


def results(rows: list[Experiment], commit: str, cls: HardwareClass, figure: str | None = None) -> list[float]:
    """A commit's results on `cls`, oldest first (the views' and the judge's measurements of it);
    `figure`: another figure of the same runs (the harness's timing), where a run gave it."""
    return [e.metric if figure is None else e.metrics[figure] for e in rows if e.commit == commit
            and e.hardware_class == cls and e.metric is not None and (figure is None or figure in e.metrics)]


def repeat_groups(rows: list[Experiment], cls: HardwareClass) -> list[list[float]]:
    """Each commit's results on `cls`, in commit order: the groups the run-to-run noise is pooled over."""
    return [results(rows, c, cls) for c in sorted({e.commit for e in rows if e.hardware_class == cls
                                                   and e.metric is not None})]


def segments(rows: list[Experiment]) -> list[int]:
    """Each experiment's segment: its hardware class, numbered in order of first appearance (a row
    without a run continues the segment before it)."""
    seen: dict[HardwareClass, int] = {}
    out, current = [], 0
    for e in rows:
        if e.hardware:
            current = seen.setdefault(e.hardware_class, len(seen))
        out.append(current)
    return out


def experiment_count(store: Store) -> int:
    return int(store.connection().execute("SELECT COUNT(*) FROM experiments").fetchone()[0])


def last_number(store: Store) -> int:
    """The number of the last recorded experiment (0 when none)."""
    return int(store.connection().execute("SELECT COALESCE(MAX(number), 0) FROM experiments").fetchone()[0])


# -- patches: a change as text, for /diff (the bot cannot run git) ---------------------------------
PATCH_CAP_BYTES = 16 * 1024  # a diff's first lines kept; the view gives the git command for the rest


@dataclass(frozen=True)
class Patch:
    """`git diff base commit` as the ledger keeps it: `text` holds its first lines (up to
    PATCH_CAP_BYTES), `lines` counts them all, `files` is the whole change's (path, added, removed)."""

    base: str
    commit: str
    files: tuple[tuple[str, int, int], ...]
    text: str
    lines: int


def make_patch(base: str, commit: str, files: dict[str, tuple[int, int]], diff: str) -> Patch:
    """The patch of a whole diff, capped."""
    every = split_lines(diff)
    kept = first_lines(every, PATCH_CAP_BYTES, lambda line: len(line.encode()))
    return Patch(base, commit, tuple((path, a, r) for path, (a, r) in files.items()), "".join(kept), len(every))


def split_lines(text: str) -> list[str]:
    """Lines with their ends, at "\n" only (a form feed in code is no line end for git)."""
    *ended, last = text.split("\n")
    return [line + "\n" for line in ended] + ([last] if last else [])


def first_lines(lines: list[str], budget: int, size: Callable[[str], int] = len) -> list[str]:
    """The longest head of `lines` whose sizes add up to at most `budget`."""
    out: list[str] = []
    for line in lines:
        budget -= size(line)
        if budget < 0:
            break
        out.append(line)
    return out


def record_patch(store: Store, patch: Patch) -> None:
    """Keep a change's patch (joins an open transaction); the same change again replaces it."""
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO patches(base_commit, commit_sha, files, patch, lines) VALUES(?, ?, ?, ?, ?)",
            (patch.base, patch.commit, json.dumps(patch.files), patch.text, patch.lines),
        )


def recorded_patch(store: Store, base: str, commit: str) -> Patch | None:
    """The change from `base` to `commit`; None where none was recorded (an older nightlab's)."""
    row = store.connection().execute(
        "SELECT * FROM patches WHERE base_commit = ? AND commit_sha = ?", (base, commit)).fetchone()
    if row is None:
        return None
    return Patch(base, commit, tuple((p, a, r) for p, a, r in json.loads(row["files"])), row["patch"], row["lines"])


# -- notes: a note command stays 'queued' until a proposal receives it ------------------------------
NOTE_QUEUED = "queued for the next proposal"


def queued_notes(store: Store) -> list[tuple[int, str]]:
    rows = store.connection().execute(
        "SELECT id, args FROM commands WHERE name = 'note' AND status = 'done' AND result = ? ORDER BY id",
        (NOTE_QUEUED,),
    )
    return [(r["id"], r["args"]) for r in rows]


def mark_notes_delivered(store: Store, command_ids: list[int], number: int) -> None:
    with store.transaction() as db:
        db.executemany(
            "UPDATE commands SET result = ? WHERE id = ?",
            [(f"delivered with #{number}", cid) for cid in command_ids],
        )


# -- exports ---------------------------------------------------------------------------------------
def write_exports(workspace: Path, store: Store, metric_name: str, direction: str, name: str) -> None:
    """Regenerate results.tsv and autoresearch.jsonl from the experiments table."""
    rows = experiments(store)
    tsv = ["commit\t" + metric_name + "\tmemory_gb\tstatus\tdescription"]
    for e in rows:
        measured = e.metric is not None
        memory_gb = e.metrics.get("peak_vram_mb", 0.0) / 1024 if measured else 0.0
        # A row without a measurement says why in its description (e.g. "killed by telegram:7").
        why = f" ({e.reason})" if not measured and e.reason else ""
        tsv.append(
            f"{e.commit[:7]}\t{e.metric or 0.0:.6f}\t{memory_gb:.1f}\t{tsv_status(e)}\t"
            + _one_line(e.description + why)
        )
    header = {
        "type": "config", "name": name, "metricName": metric_name, "metricUnit": "",
        "bestDirection": "lower" if direction == "minimize" else "higher",
    }
    jsonl = [json.dumps(header)]
    for e, segment in zip(rows, segments(rows), strict=True):
        jsonl.append(json.dumps({
            "run": e.number, "commit": e.commit[:7], "metric": e.metric or 0, "metrics": e.metrics,
            "status": jsonl_status(e), "description": e.description, "timestamp": int(e.finished_at),
            "segment": segment, "confidence": e.confidence,
            "asi": {
                "hypothesis": e.hypothesis, "area": e.area, "kind": e.kind, "reason": e.reason,
                "status": e.status, "confirm_of": e.confirm_of, "params": e.params, "focus": e.focus,
                "lines_added": e.lines_added, "lines_removed": e.lines_removed,
                "duration_s": e.duration_s, "hardware": e.hardware, "slot": e.slot,
            },
        }))
    _atomic_write(workspace / RESULTS_TSV, "\n".join(tsv) + "\n")
    _atomic_write(workspace / AUTORESEARCH_JSONL, "\n".join(jsonl) + "\n")


def tsv_status(e: Experiment) -> str:
    """Upstream's statuses: keep | discard | crash. Its notebook plots every row that is not a
    crash as a measurement, so a row without a metric (a user's kill, a proposal that never ran)
    is a crash with val_bpb 0.000000, as upstream's program.md writes crashes; checks_failed was
    measured and not kept: a discard."""
    if e.metric is None:
        return "crash"
    return e.status if e.status in ("keep", "discard") else "discard"


def jsonl_status(e: Experiment) -> str:
    """The autoresearch plugins' statuses (keep | discard | crash | checks_failed); a run without
    a metric is logged as a crash with metric 0 (their log_experiment: "0 for crashes")."""
    return "crash" if e.metric is None else e.status


def _one_line(text: str) -> str:
    return " ".join(text.split())  # tabs and newlines would break the TSV


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- loop state in kv: survives restarts -----------------------------------------------------------
PAUSED_KEY = "loop.paused"  # {"by", "reason", "after", "since"} or absent
FOCUS_KEY = "loop.focus"  # an area, or absent
AREAS_KEY = "proposer.areas"  # the proposer's areas (a list), or null for free text
FAILURES_SINCE_KEY = "loop.failures_since"  # failures up to this number do not count (resume)


@dataclass(frozen=True)
class Paused:
    by: str
    reason: str
    after: int | None  # the experiment the pause waits for
    since: float


def paused(store: Store) -> Paused | None:
    value = store.get(PAUSED_KEY)
    return None if value is None else Paused(**value)


def set_paused(store: Store, by: str, reason: str, after: int | None) -> None:
    store.set(PAUSED_KEY, {"by": by, "reason": reason, "after": after, "since": time.time()})


def focus(store: Store) -> str | None:
    return store.get(FOCUS_KEY)


def set_focus(store: Store, area: str | None) -> None:
    """What `focus` reads: the /focus command writes it here (None: off)."""
    if area is None:
        store.delete(FOCUS_KEY)
    else:
        store.set(FOCUS_KEY, area)


def resume(store: Store) -> None:
    """Lift a pause; the failures before it no longer count towards pausing again."""
    with store.transaction():
        store.delete(PAUSED_KEY)
        store.set(FAILURES_SINCE_KEY, last_number(store))


def areas(store: Store) -> tuple[str, ...] | None:
    """The focus areas the proposer publishes; None: it takes any text."""
    value = store.get(AREAS_KEY)
    return None if value is None else tuple(value)
