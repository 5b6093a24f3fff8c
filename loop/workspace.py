"""The workspace: `nightlab init` and opening it, the trainer's profile, the protected files.

A workspace is a git repository on a branch `autoresearch/<tag>` (the ratchet moves it:
loop/ratchet.py). The state directory `.nightlab/` and the exports (results.tsv,
autoresearch.jsonl), and coding agents' session files, are listed in `.git/info/exclude`, so
they never dirty the tree and need no commit of their own. The protected files (the built-in trainer's harness, [project] protected) are
hashed at init; a run whose copy differs is refused. A copy of the built-in harness that is still the
one nightlab recorded, older than the installed nightlab's, is brought up to date by the engine
(loop/engine/upgrading.py, with the helpers here); an edited one never is.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from nightlab.loop.program import PROGRAM_MD, program_for
from nightlab.loop.ratchet import Git
from nightlab.loop.state.config import BRANCH_PREFIX, ProjectSettings, Settings, is_branch_name
from nightlab.loop.state.errors import UserError
from nightlab.loop.state.ledger import AUTORESEARCH_JSONL, RESULTS_TSV
from nightlab.loop.state.store import DB_FILENAME, STATE_DIRNAME, Store, state_dir

# Never part of an experiment: our state, the exports, and the bytecode `import prepare` leaves;
# and a coding agent's session files: aider writes `.aider*` and adds it and `.env` to .gitignore
# unless git ignores both already, and a changed .gitignore would reject every proposal.
_EXCLUDES = (f"/{STATE_DIRNAME}/", f"/{RESULTS_TSV}", f"/{AUTORESEARCH_JSONL}", "__pycache__/", ".aider*", ".env")
_BUILTIN = ("train.py", "prepare.py", "harness.py")
# The built-in trainer's fixed harness: protected whatever [project] protected says.
_HARNESS = ("prepare.py", "harness.py")
PROTECTED_KEY = "workspace.protected_sha256"  # kv: {file: sha256} of each protected file as recorded
_SCORE_VERSION = re.compile(rb"^SCORE_VERSION = (\d+)[ \t]*(?:#.*)?$", re.M)  # in prepare.py
_GIT_IDENTITY = {"user.name": "nightlab", "user.email": "nightlab@localhost"}

Say = Callable[[str], None]


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Workspace:
    path: Path
    branch: str
    profile: str  # tiny | default | custom (your own project)
    harness_env: dict[str, str]  # NIGHTLAB_* for every run (the profile's)
    editable: tuple[str, ...]
    protected: tuple[str, ...]
    run_command: str
    builtin_trainer: bool
    # the editable files each run executes (the built-in trainer's train.py, the ones a project's run_command
    # names): a proposal that deletes one is refused before it runs, not run to "can't open file" (exit code 2)
    run_files: tuple[str, ...] = ()

    @cached_property
    def store(self) -> Store:
        # One store (one connection per thread, the schema checked once) for the workspace's life:
        # the agent proposer's tick writes through it once a second.
        return Store.for_workspace(self.path)


# -- profiles ------------------------------------------------------------------------------------
def resolve_profile(name: str, say: Say, gpus: tuple[int, ...] = ()) -> Any:
    """The Profile for `trainer.profile` on this machine's GPUs (`gpus`: the executor's; () = all),
    said with the reason (trainer/profiles.py `choose`)."""
    from nightlab.loop import hardware
    from nightlab.trainer.profiles import choose  # no torch: safe in the daemon

    try:
        choice = choose(name, hardware.machine(gpus))
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    say(f"trainer.profile: {choice.reason}; using {choice.profile.name!r}")
    return choice.profile


# -- init ----------------------------------------------------------------------------------------
def default_tag(today: datetime.date | None = None) -> str:
    return (today or datetime.date.today()).strftime("%b%d").lower()  # e.g. nov23


def workspace_problem(path: Path) -> str | None:
    """Why `path` cannot become a workspace (None: it can, or it is one): what init refuses, for
    `nightlab doctor` to say before a night."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file; give a directory for the workspace"
    if not _fresh(path) and not (path / ".git").exists():
        return (f"{path} exists, is not empty and is not a git repository; pick a new or empty"
                " directory, or run `git init` there first to use your own project")
    return None


def _fresh(path: Path) -> bool:
    # Only our own state dir (the daemon's lock is taken before init) still counts as empty.
    return not path.exists() or all(p.name == STATE_DIRNAME for p in path.iterdir())


def init_workspace(path: Path, tag: str, settings: Settings, say: Say = to_stderr) -> Workspace:
    """Create (or adopt) the workspace repository; idempotent for an initialized workspace."""
    path = Path(path).expanduser().resolve()
    if (state_dir(path) / DB_FILENAME).exists() and Store.for_workspace(path).get("workspace.branch"):
        _ensure_excludes(path)  # a workspace made by an older nightlab gets the newer ones
        ws = open_workspace(path, settings)
        said = f"{path} is already a nightlab workspace (branch {ws.branch}, profile {ws.profile})"
        asked = tag or settings.workspace.tag
        if asked and BRANCH_PREFIX + asked != ws.branch:  # a new tag reads as a new session: it is not one
            said += (f"; its session goes on there, not on {BRANCH_PREFIX + asked}: a workspace holds one"
                     " session (its ledger); for a new one give another workspace path")
        say(said)
        return ws
    problem = workspace_problem(path)
    if problem:
        raise UserError(problem)
    branch = BRANCH_PREFIX + (tag or settings.workspace.tag or default_tag())
    if not is_branch_name(branch):  # before the folder becomes a repository nobody asked for
        raise UserError(f"tag {branch[len(BRANCH_PREFIX):]!r} does not make a valid git branch name ({branch}): use"
                        " letters, digits, '-', '_' or '.', e.g. 'nov23' (--tag, or [workspace] tag in the config)")
    fresh = _fresh(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # `nightlab init /data/ws` with /data missing or not ours
        raise UserError(f"cannot create the workspace {path}: {exc.strerror}; give a directory you can write to")\
            from None
    repo = Git.init(path) if fresh else Git(path)
    repo.default_identity(_GIT_IDENTITY)
    _ensure_excludes(path)
    if repo.has_commits() and repo.changed_files():
        raise UserError(_dirty_message(path, repo.changed_files()))

    project = settings.project
    builtin = not project.run_command
    # before anything is switched or written: a refusal that left program.md behind had the next
    # start refuse the user's repository as holding changes nightlab did not make
    missing = missing_project_files(path, project)
    if missing:
        raise UserError(f"{path}: {MISSING_FILES} {', '.join(missing)}; {MISSING_FILES_FIX}")
    if repo.branch() != branch:
        repo.switch_branch(branch)

    profile, harness_env = "custom", {}
    if builtin:
        chosen = resolve_profile(settings.trainer.profile, say, settings.executor.gpus)
        profile = chosen.name
        harness_env = dict(chosen.harness_env)
        _install_trainer(path, chosen, say)
    if not (path / PROGRAM_MD).exists():
        (path / PROGRAM_MD).write_text(program_for(project))
    protected = _protected_files(project.protected, builtin)
    _protect(path, protected)
    if repo.changed_files() or not repo.has_commits():
        repo.commit_all(f"nightlab baseline (profile {profile})")

    store = Store.for_workspace(path)
    with store.transaction():
        store.set("workspace.profile", profile)
        store.set("workspace.harness_env", harness_env)
        store.set(PROTECTED_KEY, {f: sha256_file(path / f) for f in protected})
        store.set("workspace.created_at", time.time())
        store.set("workspace.branch", branch)  # last: its presence means "initialized"
    say(f"workspace {path}: branch {branch}, baseline {repo.head()[:7]}, profile {profile}")
    return open_workspace(path, settings)


def _install_trainer(path: Path, profile: Any, say: Say) -> None:
    """Copy the built-in train.py/prepare.py when missing and write the profile into train.py."""
    from nightlab.trainer.profiles import apply_constants

    source = _trainer_source()
    copied = [name for name in _BUILTIN if not (path / name).exists()]
    for name in copied:
        if not (source / name).is_file():
            raise UserError(f"the built-in trainer's {name} is missing from {source}; reinstall nightlab")
        shutil.copyfile(source / name, path / name)
    if "train.py" in copied and profile.constants:
        train = path / "train.py"
        try:
            train.write_text(apply_constants(train.read_text(), profile.constants))
        except (KeyError, ValueError) as exc:
            raise UserError(f"cannot apply profile {profile.name!r} to {train}: {exc}") from None
        say(f"train.py: applied profile {profile.name!r} ({profile.description})")


def _trainer_source() -> Path:
    return Path(__import__("nightlab.trainer", fromlist=["__path__"]).__path__[0])


def _ensure_excludes(path: Path) -> None:
    exclude = path / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    missing = [e for e in _EXCLUDES if e not in lines]
    if missing:
        exclude.write_text("\n".join([*lines, "# nightlab", *missing]) + "\n")


def _dirty_message(path: Path, files: list[str]) -> str:
    shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    return (
        # new files too: `commit -am` left them out, and `clean -fd` deleted them
        f"{path} has changes nightlab did not make: {shown}; commit them (git -C {path} add -A && git -C {path}"
        f" commit -m ...) or put them aside (git -C {path} stash -u; `git stash pop` brings them back), then start"
        " again"
    )


def dirty_error(ws: Workspace, files: list[str]) -> UserError:
    return UserError(_dirty_message(ws.path, files))


def open_workspace(path: Path, settings: Settings) -> Workspace:
    """The initialized workspace at `path`; UserError when `nightlab init` has not run there."""
    path = Path(path).expanduser().resolve()
    store = Store.existing(path)
    branch = store.get("workspace.branch")
    if not branch:
        raise UserError(f"{path}: `nightlab init` did not finish; run `nightlab init {path}` again")
    project = settings.project
    builtin = not project.run_command
    return Workspace(
        path=path, branch=branch, profile=store.get("workspace.profile", "custom"),
        harness_env=dict(store.get("workspace.harness_env", {})), editable=project.editable,
        protected=_protected_files(project.protected, builtin), run_command=run_command(settings),
        builtin_trainer=builtin, run_files=_run_files(project),
    )


def _run_files(project: ProjectSettings) -> tuple[str, ...]:
    """The editable files a run executes: train.py under the built-in trainer (`prepare.py run` starts
    it), else the editable files named as words of [project] run_command (`python my_train.py --fast`)."""
    if not project.run_command:
        return tuple(f for f in project.editable if f == "train.py")
    try:
        words = {os.path.normpath(w) for w in shlex.split(project.run_command)}
    except ValueError:  # unbalanced quotes: the shell decides; nothing is named plainly
        return ()
    return tuple(f for f in project.editable if os.path.normpath(f) in words)


def _protected_files(protected: tuple[str, ...], builtin: bool) -> tuple[str, ...]:
    return (*protected, *(f for f in _HARNESS if builtin and f not in protected))


MISSING_FILES = "the files named in [project] editable/protected do not exist:"
MISSING_FILES_FIX = "fix the config or add them to the repository"


def missing_project_files(path: Path, project: ProjectSettings) -> list[str]:
    """The files [project] names that the repository at `path` lacks (`nightlab init` installs the
    built-in trainer's own)."""
    builtin = not project.run_command
    return [f for f in (*project.editable, *_protected_files(project.protected, builtin))
            if not (builtin and f in _BUILTIN) and not (path / f).is_file()]


def run_command(settings: Settings) -> str:
    """The command each experiment runs. Built-in trainer: `prepare.py run` trains with train.py,
    then the harness scores the saved model in its own process. A project with its own
    run_command and a score_command gets the same two steps through nightlab's own copy of the
    harness; with no score_command its run_command runs alone and its printed metric is trusted."""
    project = settings.project
    python = shlex.quote(sys.executable)
    if not project.run_command:
        return f"{python} prepare.py run"
    if not project.score_command:
        return project.run_command
    protect = "".join(f" --protect {shlex.quote(name)}" for name in project.protected)
    return (f"{python} -m nightlab.trainer.prepare run --command {shlex.quote(project.run_command)}"
            f" --score {shlex.quote(project.score_command)}{protect}")


def project_commands(settings: Settings, here: bool = False) -> list[tuple[str, str]]:
    """[project]'s commands, each with its key. here: only those this machine starts: the checks
    always (the engine runs them), the run and its scoring only on the local executor (a Slurm
    node's PATH is its own)."""
    p = settings.project
    commands = [("project.run_command", p.run_command), ("project.checks_command", p.checks_command),
                ("project.score_command", p.score_command)]
    if here and settings.executor.kind != "local":
        return [commands[1]]
    return commands


def missing_program(command: str, workspace: Path) -> str | None:
    """What is wrong with the program a configured command starts (it runs through /bin/sh in
    the workspace, with this process's PATH): "'claude', which is not on PATH"; None when it is
    there, is the shell's own (a builtin, a keyword) or the shell decides at run time (an
    assignment or an expansion first)."""
    program = _program(command)
    if program is None:
        return None
    if "/" in program:
        where = workspace / program  # an absolute path stays itself
        return None if where.is_file() and os.access(where, os.X_OK) else f"{program!r}, which is not an executable file"
    # /bin/sh runs the commands, and only it knows its own words: dash has `eval` and `ulimit` but no `source`
    found = subprocess.run(["/bin/sh", "-c", 'command -v -- "$1"', "sh", program], capture_output=True, check=False)
    if found.returncode == 0:
        return None
    if program == "source":
        return "'source', which /bin/sh (it runs the commands) does not have: write `. FILE` instead"
    return f"{program!r}, which is not on PATH"


def _program(command: str) -> str | None:
    """The program a shell command line starts, when that is plain to see; None otherwise
    (empty, an assignment or expansion first: the shell decides)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or any(c in words[0] for c in "=$`(){}<>|;&*?~"):
        return None
    return words[0]


def sha256_file(path: Path) -> str:
    return sha256(path.read_bytes())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _protect(path: Path, protected: tuple[str, ...]) -> None:
    """Read-only protected files: a reminder for people and agents; the hash is the real check."""
    for name in protected:
        p = path / name
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def protect(ws: Workspace) -> None:
    """Make the protected files read-only again (a restore by git rewrites them writable)."""
    _protect(ws.path, ws.protected)


def protected_mismatches(ws: Workspace, root: Path | None = None) -> list[str]:
    """Protected files whose content differs from the hash recorded at init, in the workspace or
    in a run's snapshot `root`."""
    recorded: dict[str, str] = ws.store.get(PROTECTED_KEY, {})
    bad = []
    for name in ws.protected:
        p = (root or ws.path) / name
        if name not in recorded or not p.is_file() or sha256_file(p) != recorded[name]:
            bad.append(name)
    return bad


def edited_message(ws: Workspace, bad: list[str]) -> str:
    """Why the loop does not start on protected files that differ from the recorded copies: it never
    runs them, nor installs a newer harness over them (the edit may be the owner's on purpose)."""
    return (f"protected files differ from the copies nightlab recorded: {', '.join(bad)}; no experiment runs with"
            " them and nightlab does not overwrite them (nor bring them up to a newer nightlab's). To go on: "
            + edited_fix(ws, bad))


def edited_fix(ws: Workspace, bad: list[str]) -> str:
    shown = " ".join(bad)
    text = (f"put the recorded ones back (`git -C {ws.path} log -p -- {shown}` shows the edit; `git -C {ws.path}"
            f" checkout <commit> -- {shown}` and commit)")
    ours = [name for name in bad if ws.builtin_trainer and name in _HARNESS]
    if ours:
        source = _trainer_source()
        text += (f", or take this nightlab's harness: `cp -f {' '.join(str(source / n) for n in ours)} {ws.path}/`"
                 " (the next start commits and records it)")
    return text + ", or init a new workspace"


# -- the built-in harness brought up to the installed nightlab's ------------------------------------
def installed_harness() -> dict[str, bytes]:
    """The installed nightlab's harness files by name. An engine reads them once, at its start: a
    `pip install -U` while it runs is taken up by the next engine, whose code goes with it."""
    source = _trainer_source()
    try:
        return {name: (source / name).read_bytes() for name in _HARNESS}
    except OSError as exc:
        raise UserError(f"the built-in trainer's harness cannot be read in {source} ({exc.strerror});"
                        " reinstall nightlab") from None


def score_version(prepare_text: bytes) -> str:
    """The SCORE_VERSION a copy of prepare.py declares; "" for a copy from before it was declared."""
    found = _SCORE_VERSION.search(prepare_text)
    return found.group(1).decode() if found else ""


def workspace_score_version(ws: Workspace) -> str:
    """What the workspace's harness copy measures, for the setting digest ("" for a project's own)."""
    copy = ws.path / "prepare.py"
    return score_version(copy.read_bytes()) if ws.builtin_trainer and copy.is_file() else ""


@dataclass(frozen=True)
class HarnessUpgrade:
    """What bringing the workspace's harness copy up to the installed one takes. A copy that is
    neither the recorded one nor the installed one was edited: it is in neither list, never
    overwritten (`protected_mismatches` names it)."""

    write: tuple[str, ...]  # still as recorded, and older than the installed copy
    record: tuple[str, ...]  # already the installed copy, not yet recorded (an upgrade cut short, a restore)

    def __bool__(self) -> bool:
        return bool(self.write or self.record)


def harness_upgrade(ws: Workspace, installed: dict[str, bytes]) -> HarnessUpgrade:
    recorded: dict[str, str] = ws.store.get(PROTECTED_KEY, {})
    write, record = [], []
    for name, text in installed.items():
        copy = ws.path / name
        if not copy.is_file():
            continue
        have, new = sha256_file(copy), sha256(text)
        if have == new and recorded.get(name) != new:
            record.append(name)
        elif have != new and have == recorded.get(name):
            write.append(name)
    return HarnessUpgrade(tuple(write), tuple(record))


def write_harness(ws: Workspace, installed: dict[str, bytes], upgrade: HarnessUpgrade, git: Git) -> dict[str, str]:
    """Replace the outdated copies with the installed ones and commit whichever of the upgrade's
    files differ from HEAD; their hashes, for the caller to record with its event in one
    transaction. Each file is replaced whole (a rename), so a kill leaves old or new, never half."""
    for name in upgrade.write:
        tmp = state_dir(ws.path) / f"{name}.upgrade"
        tmp.write_bytes(installed[name])
        os.replace(tmp, ws.path / name)
    files = [*upgrade.write, *upgrade.record]
    if set(files) & set(git.changed_files()):
        git.commit_files(f"nightlab: the harness brought up to the installed nightlab's ({', '.join(files)})", files)
    _protect(ws.path, tuple(files))
    return {name: sha256_file(ws.path / name) for name in files}
