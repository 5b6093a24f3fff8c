"""What must hold after any night, however it was interrupted: each check reads the real
artefacts (the state store, the export files, git, the process table, what the fake chat
servers received) and returns a Check instead of asserting, so the chaos suite can count and
tabulate them and the acceptance test can assert them all with their details."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
from nightlab.loop.state import ledger
from nightlab.loop.state.store import Store

# The head line of an experiment digest (bot/digest.py): "✅ #3 keep · val_bpb ...". Status
# replies list experiments as "#3 keep      1.0" (no " · "), so they never match.
DIGEST = re.compile(r"#(\d+) (keep|discard|crash|checks_failed) · ")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}{' - ' + self.detail if self.detail else ''}"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def ledger_once(store: Store, expected: int) -> Check:
    """Experiments 1..N, each once; every cycle closed; one finished event per experiment."""
    numbers = [e.number for e in ledger.experiments(store)]
    problems = []
    if numbers != list(range(1, expected + 1)):
        problems.append(f"numbers {numbers}, expected 1..{expected}")
    open_ = [(c.number, c.phase) for c in ledger.open_candidates(store)]
    if open_:
        problems.append(f"cycles left open: {open_}")
    if ledger.running_runs(store):
        problems.append(f"runs still marked running: {[r.id for r in ledger.running_runs(store)]}")
    events = store.events_after(0, 100_000)
    finished = Counter(e.payload["number"] for e in events if e.kind == "experiment_finished")
    started = Counter(e.payload["number"] for e in events if e.kind == "experiment_started")
    if sorted(finished) != numbers or any(c != 1 for c in finished.values()):
        problems.append(f"experiment_finished events per number: {dict(finished)}")
    if any(c != 1 for c in started.values()):
        problems.append(f"experiment_started twice: {[n for n, c in started.items() if c != 1]}")
    return Check("ledger: each experiment once", not problems, "; ".join(problems))


def exports_agree(workspace: Path, store: Store) -> Check:
    rows = ledger.experiments(store)
    try:
        tsv = (workspace / ledger.RESULTS_TSV).read_text().splitlines()
        jsonl = [json.loads(line) for line in (workspace / ledger.AUTORESEARCH_JSONL).read_text().splitlines()]
    except (OSError, ValueError) as exc:
        return Check("exports agree with the ledger", False, f"unreadable: {exc}")
    want_tsv = [(e.commit[:7], f"{e.metric or 0.0:.6f}", ledger.tsv_status(e)) for e in rows]
    got_tsv = [tuple(line.split("\t")[i] for i in (0, 1, 3)) for line in tsv[1:]]
    want_json = [(e.number, e.commit[:7], e.metric or 0, ledger.jsonl_status(e)) for e in rows]
    got_json = [(j["run"], j["commit"], j["metric"], j["status"]) for j in jsonl[1:]]
    problems = []
    if got_tsv != want_tsv:
        problems.append(f"results.tsv {got_tsv} != ledger {want_tsv}")
    if not jsonl or jsonl[0].get("type") != "config" or got_json != want_json:
        problems.append(f"autoresearch.jsonl {got_json} != ledger {want_json}")
    return Check("exports agree with the ledger", not problems, "; ".join(problems))


def git_at_best(workspace: Path, store: Store) -> Check:
    """HEAD is the last kept commit, on the session branch, with a clean tree and no stale lock."""
    keeps = [e for e in ledger.experiments(store) if e.status == "keep"]
    problems = []
    try:
        head = _git(workspace, "rev-parse", "HEAD")
        if not keeps or head != keeps[-1].commit:
            problems.append(f"HEAD {head[:7]} is not the best commit {keeps[-1].commit[:7] if keeps else None}")
        branch = _git(workspace, "symbolic-ref", "--short", "-q", "HEAD")
        if branch != store.get("workspace.branch"):
            problems.append(f"on {branch!r}, not {store.get('workspace.branch')!r}")
        dirty = _git(workspace, "status", "--porcelain")
        if dirty:
            problems.append(f"dirty tree: {dirty!r}")
    except subprocess.CalledProcessError as exc:
        problems.append(f"git failed: {exc.stderr.strip()}")
    if (workspace / ".git" / "index.lock").exists():
        problems.append(".git/index.lock left behind")
    return Check("git: HEAD = best, clean", not problems, "; ".join(problems))


def orphans(roots: Iterable[Path]) -> list[str]:
    """Processes whose working directory or command line is inside one of `roots`, other than
    this test process's own children (GitPython keeps `git cat-file` helpers per open Repo)."""
    roots = [str(Path(r).resolve()) for r in roots]
    me = psutil.Process()
    skip = {me.pid, *(c.pid for c in me.children(recursive=True))}
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        if proc.info["pid"] in skip or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            cwd = ""
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(cwd == r or cwd.startswith(r + "/") or r in cmdline for r in roots):
            found.append(f"pid {proc.info['pid']} (parent {proc.info['ppid']}): {cmdline[:120]}")
    return found


def no_orphans(roots: Iterable[Path]) -> Check:
    left = orphans(roots)
    return Check("no orphan processes", not left, "; ".join(left))


def runs_once(store: Store, launches: int | None = None) -> Check:
    """No candidate ran twice; `launches` (counted by the trainer itself) matches the runs table:
    a re-attached run was never started again."""
    runs = store.connection().execute("SELECT candidate_id, COUNT(*) AS n FROM runs GROUP BY candidate_id").fetchall()
    twice = [r["candidate_id"] for r in runs if r["n"] > 1]
    total = sum(r["n"] for r in runs)
    problems = [f"candidates with two runs: {twice}"] if twice else []
    if launches is not None and launches != total:
        problems.append(f"the trainer was started {launches} times for {total} recorded runs")
    return Check("each run launched once", not problems, "; ".join(problems))


def digests_in_order(chats: dict[str, list[str]], expected: int, in_flight: int | None = None) -> Check:
    """Every chat got the digest of every experiment, once, in order. `in_flight`: the digest
    whose reply was lost when the process died may come twice in a row (see outbox_exact)."""
    problems = []
    for chat, texts in chats.items():
        numbers = [int(m.group(1)) for t in texts if (m := DIGEST.search(t))]
        once = [n for i, n in enumerate(numbers) if not (n == in_flight and i and numbers[i - 1] == n)]
        if once != list(range(1, expected + 1)) or len(numbers) - len(once) > 1:
            problems.append(f"{chat} got digests {numbers}")
    return Check("every chat: every digest, in order", not problems, "; ".join(problems))


def outbox_exact(store: Store, received: dict[tuple[str, str], list[str]], in_flight: str = "") -> Check:
    """Nothing left waiting or dropped, and each destination received exactly the messages the
    outbox marked sent. `in_flight`: the one message whose reply was lost when the process died;
    Telegram and Slack have no idempotency key, so it may legitimately arrive twice (once)."""
    problems = []
    db = store.connection()
    waiting = db.execute("SELECT channel, destination, status, last_error FROM outbox"
                         " WHERE status NOT IN ('sent', 'folded')").fetchall()
    if waiting:
        problems.append(f"not delivered: {[tuple(r) for r in waiting]}")
    for (channel, destination), texts in received.items():
        sent = db.execute("SELECT COUNT(*) FROM outbox WHERE channel = ? AND destination = ? AND status = 'sent'",
                          (channel, destination)).fetchone()[0]
        repeated = [t for t, c in Counter(texts).items() if c > 1 and in_flight and in_flight in t]
        allowed = 1 if repeated else 0
        if len(texts) - sent != allowed:
            problems.append(f"{channel}:{destination} received {len(texts)} messages for {sent} sent rows")
    return Check("outbox: nothing lost or doubled", not problems, "; ".join(problems))


def commands_once(store: Store) -> Check:
    """Every steering command took effect once and left one event (its effect's, or command_done),
    and as many note/pause/focus events as such commands were applied."""
    events = store.events_after(0, 100_000)
    said = Counter(e.payload["command_id"] for e in events if "command_id" in e.payload)
    problems = [f"more than one event for command(s) {[c for c, n in said.items() if n > 1]}"] if any(
        n > 1 for n in said.values()) else []
    db = store.connection()
    handled = db.execute("SELECT COUNT(*) FROM commands WHERE status != 'pending'").fetchone()[0]
    if len(said) != handled:
        problems.append(f"{handled} command(s) applied or rejected, {len(said)} with an event")
    for name, kind in (("note", "note_added"), ("pause", "paused"), ("focus", "focus_changed")):
        applied = db.execute("SELECT COUNT(*) FROM commands WHERE name = ? AND status = 'done'", (name,)).fetchone()[0]
        emitted = sum(e.kind == kind for e in events)
        if emitted != applied:
            problems.append(f"{applied} {name} command(s) applied, {emitted} {kind} event(s)")
    pending = db.execute("SELECT COUNT(*) FROM commands WHERE status = 'pending'").fetchone()[0]
    if pending:
        problems.append(f"{pending} command(s) never applied")
    return Check("commands applied once", not problems, "; ".join(problems))
