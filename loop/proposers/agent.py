"""The `agent` proposer: an external coding agent edits the editable files.

The daemon writes a prompt file (`.nightlab/agent/prompt.md`, see prompt.py), runs the
configured command through the shell in the workspace, in its own process session, with the
prompt file also on stdin, stdout/stderr into `.nightlab/agent/`, and `{prompt_file}` in the
command replaced by the prompt's path. At `[proposer.agent] timeout` the command's whole
process tree is killed (psutil, plus its process group for orphans), and when it ends, whatever
it left running, detached too (found by a token in its environment). The agent may write
`.nightlab/agent/proposal.json` {"description", "hypothesis"}; otherwise the description
comes from the diff ("edit train.py: +3 −1 lines (MATRIX_LR, WARMUP_RATIO)"). Non-zero exit,
timeout or no change → ProposalError. The engine, not this module, checks that only editable
files changed. An agent that commits anyway has its commits undone, its changes kept.

What an agent does to the workspace beyond its edit is undone here, and said: leaving the
branch (switched back, refused), changing git's own files (hooks, config, info/exclude: put
back, refused), files left where git ignores them (removed: the commit would not hold them).
A change whose code an earlier experiment already ran is refused with how that one went.
What it writes outside the workspace is not seen: run it in a sandbox that allows only the
workspace (Codex's workspace-write, Claude Code without --dangerously-skip-permissions).

Example commands (`[proposer.agent] command`); each runs one non-interactive turn and exits:

    # Claude Code: -p/--print is headless mode; acceptEdits lets it edit files without asking
    # (use --dangerously-skip-permissions only in a sandbox: it also allows any shell command)
    claude -p --permission-mode acceptEdits < {prompt_file}
    # Codex CLI: `exec` is the non-interactive mode; "-" reads the prompt from stdin; the
    # default sandbox is read-only, workspace-write allows edits in the workspace
    codex exec --sandbox workspace-write - < {prompt_file}
    # OpenCode: `run` is the non-interactive mode; --auto approves permission requests
    opencode run --auto "$(cat {prompt_file})"
    # Aider: --message-file sends the file and exits; it auto-commits unless told not to
    aider --yes-always --no-auto-commits --message-file {prompt_file} train.py
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil
from git import GitCommandError
from nightlab.loop.executors.runfiles import file_tail
from nightlab.loop.executors.sandbox import command_line
from nightlab.loop.processes import stop_tree
from nightlab.loop.proposers.base import Proposal, ProposalContext, ProposalError
from nightlab.loop.proposers.prompt import PROPOSAL_FILE, REASON_CHARS, build_prompt
from nightlab.loop.ratchet import Git
from nightlab.loop.runenv import sandbox_paths
from nightlab.loop.state.config import TERMINAL_CODES, AgentSettings

STATE_DIR = ".nightlab/agent"
RUN_TOKEN_ENV = "NIGHTLAB_AGENT_RUN"  # marks every process of one agent run, to find the ones left behind
KILL_GRACE_S = 3.0  # SIGTERM first so an agent can save its session, then SIGKILL
TAIL_CHARS = 8000  # of the agent's output kept: its closing paragraph (the hypothesis) and its last words
# A hypothesis goes into the commit message, the digest and every later prompt: a paragraph,
# not whatever a runaway agent wrote.
HYPOTHESIS_CHARS = 1000
PROPOSAL_BYTES = 1_000_000  # a bigger proposal.json is not a description; not read into memory
LAST_WORDS = (3, 300)  # lines, characters: where a CLI says why it stopped, on one line
# The shell's own statuses for a command it could not start: the config is what to fix.
_SHELL_HINTS = {
    126: "; the shell could not run it: make it executable or fix [proposer.agent] command",
    127: "; the shell found no such program: install the agent or fix [proposer.agent] command",
}
_ASSIGNED = re.compile(r"^[+-]\s*([A-Z_][A-Z0-9_]*)\s*=(?!=)")


@dataclass(frozen=True)
class _Run:
    returncode: int
    timed_out: bool
    seconds: float
    stdout: str  # tails
    stderr: str
    stdout_cut: bool  # longer than its tail: the tail starts in the middle of something
    too_much: bool = False  # its output passed max_output_mb: killed, and the files cut to the limit


class AgentProposer:
    areas: tuple[str, ...] | None = None  # the focus is free text in the prompt

    def __init__(
        self, settings: AgentSettings, switch_area_after: int = 5, tick: Callable[[], None] | None = None
    ) -> None:
        """`tick` is called about once a second while the agent runs (the engine writes its
        liveness there); if it raises, the agent's process tree is killed and the error
        propagates."""
        self.settings = settings
        self.switch_area_after = switch_area_after
        self.tick = tick

    def propose(self, ctx: ProposalContext) -> Proposal:
        try:
            return self._propose(ctx, Git(ctx.workspace))
        except GitCommandError as exc:  # the agent broke the repository: a failed proposal, said on one line
            said = " ".join(str(exc.stderr).split()).removeprefix("stderr: ").strip("'") or f"status {exc.status}"
            raise ProposalError(f"{' '.join(map(str, exc.command))} failed in {ctx.workspace}: {said}") from None

    def _propose(self, ctx: ProposalContext, git: Git) -> Proposal:
        ws = ctx.workspace
        state = ws / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        proposal_file = ws / PROPOSAL_FILE
        proposal_file.unlink(missing_ok=True)  # a stale one would describe an older edit
        program = ws / "program.md"
        prompt_file = state / "prompt.md"
        with _fresh(prompt_file) as f:
            f.write(build_prompt(ctx, program.read_text(encoding="utf-8") if program.is_file() else "",
                                 self.switch_area_after).encode("utf-8"))
        branch, head = git.branch(), git.head()

        ignored, git_files = git.ignored_files(_NOT_STATE), _git_files(ws)
        run = self._run(ws, state, prompt_file, proposal_file, ctx.data_dir)
        git_changed = _put_back(ws, git_files)
        hidden = _remove_new(ws, git.ignored_files(_NOT_STATE) - ignored) + _clear_own_folder(ws, state)
        if run.too_much:
            raise ProposalError(
                f"agent printed more than {self.settings.max_output_mb:g} MB and was killed with all its processes"
                f" (the first {self.settings.max_output_mb:g} MB are in {STATE_DIR}/stdout.log and stderr.log; raise"
                " [proposer.agent] max_output_mb if it must print that much); its last words:"
                f" {_last_words(run.stdout) or _last_words(run.stderr) or '(none)'}"
            )
        if run.timed_out:
            raise ProposalError(
                f"agent timed out after {self.settings.timeout:g}s and was killed with all its processes"
                " (raise [proposer.agent] timeout to give it longer); its last words:"
                f" {_last_words(run.stdout) or _last_words(run.stderr) or '(none)'}"
            )
        if run.returncode != 0:
            said = _last_words(run.stderr) or _last_words(run.stdout) or "(no output)"
            raise ProposalError(
                f"agent exited with status {run.returncode} after {run.seconds:.0f}s: {said}"
                f"{_SHELL_HINTS.get(run.returncode, '')} (all of it in {STATE_DIR}/stderr.log and stdout.log"
                " until the agent's next run)"
            )
        now = git.branch()
        if now != branch:
            # Back where the loop works: left on the agent's branch, the next experiment would be
            # committed there, and a restarted engine refuses a workspace off its branch.
            git.checkout(branch or head)
            raise ProposalError(
                f"agent left the branch {branch} for {now or 'a detached HEAD'}; switched back"
                + (f" (its commits stay on {now})" if now else "")
                + ". The loop owns git: tell the agent not to run git commands"
            )
        if git_changed:
            raise ProposalError(
                f"agent changed git's own files ({', '.join(git_changed)}); put back as they were. The loop"
                " owns git: tell the agent not to run git commands"
            )
        if git.head() != head:
            # It committed despite the rules (e.g. aider's auto-commit): keep the edit, drop the commits.
            git.uncommit(head)

        stats = _diff_stats(git, ws)
        if not stats:
            raise ProposalError(
                f"agent exited 0 after {run.seconds:.0f}s but changed nothing; its last words:"
                f" {_last_words(run.stdout) or _last_words(run.stderr) or '(none)'}; if it asked for permission to"
                " edit, give [proposer.agent] command the flag that allows edits (README, Proposers)"
            )
        # the engine commits the whole working tree: a tree an experiment's commit already holds ran before.
        # Only for a change the engine will run: hashing a tree stores its files in .git, and a
        # checkpoint the agent left beside train.py (refused by the engine) would stay there for weeks.
        tried = (git.experiment_with_tree(git.worktree_tree(_NOT_STATE))
                 if set(stats) <= set(ctx.editable) else None)
        if tried is not None:
            how = next((f"{e.status}: {e.reason[:REASON_CHARS]}" if e.reason else e.status
                        for e in ctx.history if e.number == tried), "in flight")
            raise ProposalError(f"agent proposed the code of #{tried} again ({how}); try something not tried yet")
        described, problem = _read_proposal_file(proposal_file)
        hypothesis = described.get("hypothesis") or _last_paragraph(run.stdout, run.stdout_cut) or "(the agent gave no hypothesis)"
        return Proposal(
            description=described.get("description") or _describe_diff(git, stats),
            hypothesis=hypothesis + _notes(problem, hidden),
            area=ctx.focus or "",
        )

    def _run(self, ws: Path, state: Path, prompt_file: Path, proposal_file: Path, data: Path | None) -> _Run:
        command = self.settings.command.replace("{prompt_file}", shlex.quote(str(prompt_file)))
        token = uuid.uuid4().hex  # every process the agent starts inherits it, detached or not
        env = {**os.environ, "NIGHTLAB_PROMPT_FILE": str(prompt_file), "NIGHTLAB_PROPOSAL_FILE": str(proposal_file),
               RUN_TOKEN_ENV: token}
        out_path, err_path = state / "stdout.log", state / "stderr.log"
        start = time.monotonic()
        # Files, not pipes: a backgrounded grandchild holding a pipe open cannot block us.
        # Sandboxed as a run is (executors/sandbox.py): the agent edits the workspace, but the ledger the
        # keep rule reads, git, the data runs are scored on and the daemon's processes (its environment
        # holds the chat tokens) are not its
        sandboxed = command_line(command, *sandbox_paths(ws, state, data))
        with prompt_file.open("rb") as stdin, _fresh(out_path) as out, _fresh(err_path) as err:
            proc = subprocess.Popen(
                sandboxed, shell=True, cwd=ws, env=env, stdin=stdin, stdout=out, stderr=err, start_new_session=True
            )
            timed_out = too_much = False
            limit = int(self.settings.max_output_mb * 2**20)
            try:
                while True:
                    left = self.settings.timeout - (time.monotonic() - start)
                    if left <= 0:
                        timed_out = True
                        break
                    try:
                        proc.wait(timeout=min(left, 1.0))
                        break
                    except subprocess.TimeoutExpired:
                        if _written(out) + _written(err) > limit:
                            too_much = True
                            break
                        if self.tick is not None:
                            self.tick()
            finally:
                # Always: on timeout, on a failing tick, and after a normal exit (leftover children).
                _kill_tree(proc, token)
                proc.wait()
            # from the open files: an agent that removed the state folder still has its words read
            stdout, stderr = (_printable(file_tail(f, TAIL_CHARS)).strip() for f in (out, err))
            cut = _written(out) > TAIL_CHARS  # the tail starts in the middle of something
            # what it wrote in its last second, or before it exited within the first, stays under the limit too
            for f in (out, err):
                if _written(f) > limit:
                    f.truncate(limit)
        return _Run(proc.returncode, timed_out, time.monotonic() - start, stdout, stderr, cut, too_much)


def _fresh(path: Path) -> BinaryIO:
    """`path` in the agent's folder as a new, empty file of ours, for writing and reading. The folder is
    the agent's to write: a link it left there in the file's place (stdout.log -> ../state.db) was
    followed, and the next proposal's output truncated the ledger through it."""
    with contextlib.suppress(FileNotFoundError):
        _remove(path)
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w+b")


def _regular(path: Path) -> BinaryIO:
    """`path` opened to read if it is a regular file; OSError if not: a link to /dev/zero was read
    for ever, a FIFO blocked the engine's open() until it was restarted, and again."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def _written(f: BinaryIO) -> int:
    """Bytes the agent wrote to `f` so far (its own descriptor moves the end, not ours)."""
    return os.fstat(f.fileno()).st_size


def _kill_tree(proc: subprocess.Popen[bytes], token: str) -> None:
    """Stop the agent's process tree (started in its own session) and every process whose
    environment holds `token`: one that left its session and was orphaned before we looked
    (`setsid python train.py &`, a training left running beside the experiments)."""
    leader = None
    if proc.poll() is None:  # not reaped: the pid is still our child's
        with contextlib.suppress(psutil.NoSuchProcess):
            leader = psutil.Process(proc.pid)
    stop_tree(proc.pid, leader, KILL_GRACE_S, also=_tagged(token))


def _tagged(token: str) -> list[psutil.Process]:
    """This user's processes whose environment holds the agent run's token."""
    found = []
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):  # gone, a zombie, or not ours to read
            uids = p.info["uids"]  # None when it may not be read
            if uids is not None and uids.real == os.getuid() and p.environ().get(RUN_TOKEN_ENV) == token:
                found.append(p)
    return found


# The state dir is git-ignored by `nightlab init`; excluded here too, so a workspace without
# that ignore rule never counts the prompt file as the agent's change.
_NOT_STATE = (".", ":(exclude).nightlab")


def _git_files(ws: Path) -> dict[str, tuple[bytes, int]]:
    """The files of git's own an agent could use against the loop, with their modes: a hook or
    the config (core.fsmonitor, core.hooksPath) runs its code in every later git command of the
    daemon's, and info/exclude hides files from the checks."""
    gitdir = ws / ".git"
    paths = [gitdir / "config", gitdir / "info" / "exclude"]
    if (gitdir / "hooks").is_dir():  # the samples git never runs are not worth a word
        paths += sorted(p for p in (gitdir / "hooks").iterdir() if p.suffix != ".sample")
    return {p.relative_to(gitdir).as_posix(): (p.read_bytes(), p.stat().st_mode) for p in paths if p.is_file()}


def _put_back(ws: Path, before: dict[str, tuple[bytes, int]]) -> list[str]:
    """Restore git's own files as they were before the agent ran; the ones it changed."""
    after = _git_files(ws)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    for name in changed:
        path = ws / ".git" / name
        if name in before:
            path.parent.mkdir(parents=True, exist_ok=True)  # the agent may have removed the folder
            path.write_bytes(before[name][0])
            path.chmod(before[name][1])
        else:
            path.unlink()
    return changed


def _notes(problem: str, hidden: list[str]) -> str:
    """Said after the hypothesis, where the user reads it: a proposal file the agent meant to
    write that could not be used, and the files it hid from git that were removed."""
    notes = f" [{PROPOSAL_FILE} ignored: {problem}]" if problem else ""
    shown = [p for p in hidden if not p.endswith(".pyc")]  # bytecode: any syntax check leaves it
    if shown:
        notes += (" [removed what the agent left where git ignores it, which the commit would not hold: "
                  + ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "") + "]")
    return notes


def _remove_new(ws: Path, paths: set[str]) -> list[str]:
    """Remove what the agent left where git ignores it (a helper train.py imports, a checkpoint):
    the commit would not hold it, so a run in this tree would see more than the commit has, and
    a run elsewhere would not. The ignored files that were there before stay (a run's outputs)."""
    removed = []
    for path in sorted(paths):
        with contextlib.suppress(OSError):  # a nested repository's folder, a file not ours to remove
            (ws / path).unlink()
            removed.append(path)
    return removed


_OWN_FILES = frozenset({"prompt.md", "stdout.log", "stderr.log", Path(PROPOSAL_FILE).name})


def _clear_own_folder(ws: Path, state: Path) -> list[str]:
    """Remove what the agent left in its own folder besides the files nightlab reads and writes there:
    the one place git never looks, so a module train.py imports from it ran without being in the
    commit (the same-code check dodged, the result not reproducible)."""
    removed = []
    for path in sorted(state.iterdir()) if state.is_dir() else []:
        if path.name in _OWN_FILES:
            continue
        with contextlib.suppress(OSError):
            _remove(path)
            removed.append(str(path.relative_to(ws)))
    return removed


def _remove(path: Path) -> None:
    """A file, a link (not what it names) or a folder with all it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _diff_stats(git: Git, ws: Path) -> dict[str, tuple[int, int]]:
    """{path: (lines added, lines removed)} against HEAD, untracked files included."""
    stats = git.file_numstat("HEAD", paths=_NOT_STATE)
    for path in git.untracked_files(_NOT_STATE):
        try:
            stats[path] = (_line_count(ws / path), 0)
        except OSError:
            stats[path] = (0, 0)
    return stats


def _line_count(path: Path) -> int:
    """Lines of a file, read a megabyte at a time: an agent may leave a checkpoint of gigabytes."""
    lines, last = 0, b"\n"
    with _regular(path) as f:
        while chunk := f.read(1 << 20):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")  # a last line without its newline counts too


def _describe_diff(git: Git, stats: dict[str, tuple[int, int]]) -> str:
    """ "edit train.py: +3 −1 lines (MATRIX_LR, WARMUP_RATIO)", "delete helper.py: ..." """
    added = sum(a for a, _ in stats.values())
    removed = sum(r for _, r in stats.values())
    diff = git.diff("HEAD", _NOT_STATE)
    names = dict.fromkeys(m.group(1) for line in diff.splitlines() if (m := _ASSIGNED.match(line)))
    deleted = set(git.diff_names("D", "HEAD", paths=_NOT_STATE))
    edited = sorted(set(stats) - deleted)
    verbs = [f"{verb} {', '.join(paths)}" for verb, paths in (("edit", edited), ("delete", sorted(deleted))) if paths]
    text = f"{', '.join(verbs)}: +{added} −{removed} lines"
    return text + (f" ({', '.join(names)})" if names else "")


def _read_proposal_file(path: Path) -> tuple[dict[str, str], str]:
    """The agent's own description and hypothesis, and why a file that is there could not be
    used ("" when it was, or when there is none: writing it is optional)."""
    try:
        with _regular(path) as f:
            raw = f.read(PROPOSAL_BYTES + 1)
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        return {}, f"unreadable: {exc.strerror}"
    if len(raw) > PROPOSAL_BYTES:
        return {}, f"over {PROPOSAL_BYTES // 1000} kB"
    try:
        data = json.loads(raw.decode("utf-8", "replace"))
    except ValueError as exc:
        return {}, f"not valid JSON: {exc}"
    if not isinstance(data, dict):
        return {}, 'not a JSON object {"description": ..., "hypothesis": ...}'
    # JSON may hold a lone surrogate ("\udcff") that no store, log or chat can encode: "?" instead
    found = {k: " ".join(_printable(data[k].encode("utf-8", "replace").decode("utf-8")).split())
             for k in ("description", "hypothesis") if isinstance(data.get(k), str)}
    if "description" in found:
        found["description"] = found["description"][:200]
    if "hypothesis" in found:
        found["hypothesis"] = found["hypothesis"][:HYPOTHESIS_CHARS]
    return found, ""


def _printable(text: str) -> str:
    """`text` without terminal codes and control bytes (no words for a commit, a digest or the next
    prompt); line breaks and tabs stay, a spinner's carriage returns go."""
    return TERMINAL_CODES.sub("", text.replace("\r\n", "\n")).replace("\r", "")


def _last_words(text: str) -> str:
    """The last lines of an agent's output joined into one line, cut from the front."""
    lines, chars = LAST_WORDS
    said = " | ".join([" ".join(line.split()) for line in text.splitlines() if line.strip()][-lines:])
    return said if len(said) <= chars else "…" + said[-chars:]


def _last_paragraph(text: str, cut: bool) -> str:
    """An agent's closing words usually say what it changed and why: a fair hypothesis. Not the
    front of a tail cut from longer output: a fragment of its progress lines, not a paragraph."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()][1 if cut else 0:]
    return " ".join(paragraphs[-1].split())[:HYPOTHESIS_CHARS] if paragraphs else ""
