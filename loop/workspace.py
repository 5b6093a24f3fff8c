"""The workspace: `nightlab init`, the git ratchet and the protected-file hashes.

A workspace is a git repository on a branch `autoresearch/<tag>`. Every candidate is committed
on that branch; a kept one stays, anything else is undone with `reset --hard` to the last kept
commit, and every candidate commit stays reachable under `refs/nightlab/exp/<number>` so nothing
tried is lost. The state directory `.nightlab/` and the exports (results.tsv, autoresearch.jsonl)
are listed in `.git/info/exclude`, so they never dirty the tree and need no commit of their own.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import psutil
from nightlab.loop.config import Settings
from nightlab.loop.errors import UserError
from nightlab.loop.executors import RunSpec
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.executors.runfiles import read_tail
from nightlab.loop.ledger import AUTORESEARCH_JSONL, RESULTS_TSV
from nightlab.loop.lock import holder
from nightlab.loop.store import DB_FILENAME, STATE_DIRNAME, Store, state_dir
from nightlab.loop.summary import parse_summary

BRANCH_PREFIX = "autoresearch/"
EXP_REF_PREFIX = "refs/nightlab/exp/"
PROGRAM_MD = "program.md"
# Never part of an experiment: our state, the exports, and the bytecode `import prepare` leaves.
_EXCLUDES = (f"/{STATE_DIRNAME}/", f"/{RESULTS_TSV}", f"/{AUTORESEARCH_JSONL}", "__pycache__/")
_BUILTIN = ("train.py", "prepare.py", "harness.py")
# The built-in trainer's fixed harness: protected whatever [project] protected says.
_HARNESS = ("prepare.py", "harness.py")
ARTIFACTS_DIRNAME = "artifacts"  # kept models by commit, for held-out scoring
KEPT_ARTIFACTS = 3  # the newest kept models stay (a default-profile model is ~150 MB)
COMPILE_CACHE_DIRNAME = "compile-cache"  # torch inductor + triton, shared by every experiment
_GIT_IDENTITY = {"user.name": "nightlab", "user.email": "nightlab@localhost"}

Say = Callable[[str], None]


def _stderr(message: str) -> None:
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

    @property
    def store(self) -> Store:
        return Store.for_workspace(self.path)


# -- git -----------------------------------------------------------------------------------------
class Git:
    """The few git operations the ratchet needs (GitPython's command wrapper)."""

    def __init__(self, path: Path) -> None:
        try:
            self.repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise UserError(f"{path} is not a git repository; run `nightlab init {path}`") from None
        self.g = self.repo.git

    def head(self) -> str:
        return self.g.rev_parse("HEAD")

    def has_commits(self) -> bool:
        return self.repo.head.is_valid()

    def branch(self) -> str | None:
        try:
            return self.g.symbolic_ref("--short", "-q", "HEAD")
        except git.GitCommandError:
            return None  # detached

    def changed_files(self) -> list[str]:
        """Paths that differ from HEAD: modified, added, deleted, untracked (not ignored)."""
        out = self.g.status("--porcelain=v1", "-z", "--untracked-files=all")
        entries, paths = out.split("\0"), []
        i = 0
        while i < len(entries):
            entry = entries[i]
            i += 1
            if len(entry) < 4:
                continue
            paths.append(entry[3:])
            if entry[0] in "RC":  # a rename names its source in the next entry
                paths.append(entries[i])
                i += 1
        return sorted(set(paths))

    def commit_all(self, message: str) -> str:
        self.g.add("--all")
        self.g.commit("--no-verify", "--allow-empty", "-m", message)
        return self.head()

    def apply_change(self, commit: str) -> list[str]:
        """Re-make `commit`'s change (against its parent) in the working tree, uncommitted: a
        result from an older base brought onto the current one. The files in conflict ([] = it
        applied); on a conflict the caller resets the tree."""
        try:
            self.g.cherry_pick("--no-commit", commit)
        except git.GitCommandError:
            return self.g.diff("--name-only", "--diff-filter=U").split() or ["(the change does not apply)"]
        return []

    def keep_ref(self, number: int, sha: str) -> None:
        self.g.update_ref(f"{EXP_REF_PREFIX}{number}", sha)

    def reset_to(self, sha: str) -> None:
        """Make the tree exactly `sha`: tracked changes undone, untracked (non-ignored) files removed."""
        self.g.reset("--hard", "-q", sha)
        self.g.clean("-fdq")

    def snapshot(self, path: Path, sha: str) -> Path:
        """A clean detached worktree of `sha` at `path`: where a parallel run executes, so runs
        never share a working tree and the branch moves only by the ratchet. Idempotent: an
        existing worktree is reset to `sha` (call it only when no run is using it)."""
        path = Path(path)
        if (path / ".git").exists():
            wt = git.Repo(path).git
            wt.reset("--hard", "-q", sha)
            wt.clean("-fdxq")  # a snapshot holds exactly the commit, nothing a past run left
            return path
        shutil.rmtree(path, ignore_errors=True)  # a half-made one from a crash
        self.g.worktree("prune")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.g.worktree("add", "--detach", "--force", "-q", str(path), sha)
        return path

    def drop_snapshot(self, path: Path) -> None:
        """Remove a run's worktree (its log lives elsewhere); missing is fine."""
        if Path(path).exists():
            try:
                self.g.worktree("remove", "--force", str(path))
            except git.GitCommandError:
                shutil.rmtree(path, ignore_errors=True)
        self.g.worktree("prune")

    def numstat(self, base: str, commit: str) -> tuple[int, int]:
        added = removed = 0
        for line in self.g.diff("--numstat", base, commit).splitlines():
            a, r, _ = line.split("\t", 2)
            if a != "-":  # binary files count no lines
                added, removed = added + int(a), removed + int(r)
        return added, removed


def clear_stale_git_locks(path: Path) -> list[Path]:
    """Remove lock files a git process killed mid-operation left behind (index.lock, ref locks):
    otherwise every git command fails and the night stops. Only when no git process is working
    in this repository, so a user's `git` running right now is never disturbed."""
    root = Path(path).resolve()
    for proc in psutil.process_iter(["name", "cwd", "cmdline"]):
        info = proc.info
        # GitPython keeps read-only `git cat-file --batch` helpers alive; they never take locks.
        if info["name"] != "git" or "cat-file" in (info["cmdline"] or []) or not info["cwd"]:
            continue
        if Path(info["cwd"]).is_relative_to(root):
            return []
    gitdir = root / ".git"
    locks = [gitdir / name for name in ("index.lock", "HEAD.lock", "packed-refs.lock")]
    locks += list((gitdir / "refs").rglob("*.lock")) + list(gitdir.glob("worktrees/*/index.lock"))
    removed = [lock for lock in locks if lock.is_file()]
    for lock in removed:
        lock.unlink(missing_ok=True)
    return removed


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def init_workspace(path: Path, tag: str, settings: Settings, say: Say = _stderr) -> Workspace:
    """Create (or adopt) the workspace repository; idempotent for an initialized workspace."""
    path = Path(path).expanduser().resolve()
    if (state_dir(path) / DB_FILENAME).exists() and Store.for_workspace(path).get("workspace.branch"):
        ws = open_workspace(path, settings)
        say(f"{path} is already a nightlab workspace (branch {ws.branch}, profile {ws.profile})")
        return ws
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a directory for the workspace")
    # Only our own state dir (the daemon's lock is taken before init) still counts as empty.
    fresh = not path.exists() or all(p.name == STATE_DIRNAME for p in path.iterdir())
    if not fresh and not (path / ".git").exists():
        raise UserError(
            f"{path} exists, is not empty and is not a git repository; pick a new or empty"
            f" directory, or run `git init` there first to use your own project"
        )
    path.mkdir(parents=True, exist_ok=True)
    if fresh:
        git.Repo.init(path)
    repo = Git(path)
    _ensure_identity(repo)
    _ensure_excludes(path)
    if repo.has_commits() and repo.changed_files():
        raise UserError(_dirty_message(path, repo.changed_files()))

    project = settings.project
    builtin = not project.run_command
    branch = BRANCH_PREFIX + (tag or settings.workspace.tag or default_tag())
    try:
        repo.g.check_ref_format("--branch", branch)
    except git.GitCommandError:
        raise UserError(f"tag {branch[len(BRANCH_PREFIX):]!r} does not make a valid branch name") from None
    if repo.branch() != branch:
        if repo.has_commits() and branch in [h.name for h in repo.repo.heads]:
            repo.g.checkout(branch)
        else:
            repo.g.checkout("-b", branch)

    profile, harness_env = "custom", {}
    if builtin:
        chosen = resolve_profile(settings.trainer.profile, say, settings.executor.gpus)
        profile = chosen.name
        harness_env = dict(chosen.harness_env)
        _install_trainer(path, chosen, say)
    if not (path / PROGRAM_MD).exists():
        (path / PROGRAM_MD).write_text(DEFAULT_PROGRAM)
    protected = _protected_files(project.protected, builtin)
    missing = [f for f in (*project.editable, *protected) if not (path / f).is_file()]
    if missing:
        raise UserError(
            f"{path}: the files named in [project] editable/protected do not exist: {', '.join(missing)};"
            " fix the config or add them to the repository"
        )
    _protect(path, protected)
    if repo.changed_files() or not repo.has_commits():
        repo.commit_all(f"nightlab baseline (profile {profile})")

    store = Store.for_workspace(path)
    with store.transaction():
        store.set("workspace.profile", profile)
        store.set("workspace.harness_env", harness_env)
        store.set("workspace.protected_sha256", {f: sha256_file(path / f) for f in protected})
        store.set("workspace.created_at", time.time())
        store.set("workspace.branch", branch)  # last: its presence means "initialized"
    say(f"workspace {path}: branch {branch}, baseline {repo.head()[:7]}, profile {profile}")
    return open_workspace(path, settings)


def _install_trainer(path: Path, profile: Any, say: Say) -> None:
    """Copy the built-in train.py/prepare.py when missing and write the profile into train.py."""
    from nightlab.trainer.profiles import apply_constants

    source = Path(__import__("nightlab.trainer", fromlist=["__path__"]).__path__[0])
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


def _ensure_identity(repo: Git) -> None:
    """Commits must work on a bare CI box; a user's own identity always wins."""
    reader = repo.repo.config_reader()
    with repo.repo.config_writer() as writer:
        for key, value in _GIT_IDENTITY.items():
            section, option = key.split(".")
            if not reader.has_option(section, option):
                writer.set_value(section, option, value)


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
        f"{path} has changes nightlab did not make: {shown}; commit them (git -C {path} commit -am ...)"
        f" or discard them (git -C {path} checkout -- . && git -C {path} clean -fd), then start again"
    )


def dirty_error(ws: Workspace, files: list[str]) -> UserError:
    return UserError(_dirty_message(ws.path, files))


def open_workspace(path: Path, settings: Settings) -> Workspace:
    """The initialized workspace at `path`; UserError when `nightlab init` has not run there."""
    path = Path(path).expanduser().resolve()
    if not (state_dir(path) / DB_FILENAME).exists():
        raise UserError(f"{path} is not a nightlab workspace; run `nightlab init {path}` first")
    store = Store.for_workspace(path)
    branch = store.get("workspace.branch")
    if not branch:
        raise UserError(f"{path}: `nightlab init` did not finish; run `nightlab init {path}` again")
    project = settings.project
    builtin = not project.run_command
    return Workspace(
        path=path, branch=branch, profile=store.get("workspace.profile", "custom"),
        harness_env=dict(store.get("workspace.harness_env", {})), editable=project.editable,
        protected=_protected_files(project.protected, builtin), run_command=run_command(settings),
        builtin_trainer=builtin,
    )


def _protected_files(protected: tuple[str, ...], builtin: bool) -> tuple[str, ...]:
    return (*protected, *(f for f in _HARNESS if builtin and f not in protected))


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
    return (f"{python} -m nightlab.trainer.prepare run --command {shlex.quote(project.run_command)}"
            f" --score {shlex.quote(project.score_command)}")


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
    recorded: dict[str, str] = ws.store.get("workspace.protected_sha256", {})
    bad = []
    for name in ws.protected:
        p = (root or ws.path) / name
        if name not in recorded or not p.is_file() or sha256_file(p) != recorded[name]:
            bad.append(name)
    return bad


def run_environment(ws: Workspace, settings: Settings, say: Say = _stderr,
                    prepared: Path | None = None) -> dict[str, str]:
    """The environment every run gets: the profile's harness env with the [trainer] budget keys
    over it and, for the built-in trainer, NIGHTLAB_DATA_DIR (prepared here when missing, unless
    `prepared` names the data dir the daemon has just prepared)."""
    env = {**ws.harness_env, **settings.trainer.harness_overrides()}
    if ws.builtin_trainer:
        from nightlab.trainer import prepare

        try:
            data_dir = prepared or prepare.prepare(settings.data.source, settings.data.shards, settings.cache_path, say)
            prepare.training_view(data_dir)  # made once here, not by several slots at once
        except prepare.PrepareError as exc:
            raise UserError(str(exc)) from None
        env[prepare.ENV_DATA_DIR] = str(data_dir)
        # Compiled graphs and kernels outlive a run: the next experiment with the same shapes starts warm.
        cache = state_dir(ws.path) / COMPILE_CACHE_DIRNAME
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    return env


# -- a second opinion on keeps: the held-out slice ------------------------------------------------
def keep_artifact(ws: Workspace, run_dir: Path, commit: str) -> Path | None:
    """Keep a kept run's saved model (from its run dir) under the state dir by commit, so a later
    keep can be compared with it on a held-out slice; None when the run saved none."""
    from nightlab.trainer.prepare import DEFAULT_ARTIFACT_DIR  # no torch

    source = Path(run_dir) / DEFAULT_ARTIFACT_DIR
    if not (source / "model.pt").is_file():
        return None
    root = state_dir(ws.path) / ARTIFACTS_DIRNAME
    dest = root / commit
    if not (dest / "model.pt").is_file():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    # A model is needed until the next keep has been compared with it: a few, not a night's worth.
    kept = sorted((p for p in root.iterdir() if p.is_dir() and p != dest), key=lambda p: p.stat().st_mtime)
    for old in kept[: max(0, len(kept) - (KEPT_ARTIFACTS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class SecondOpinion:
    slice: int
    kept: float  # held-out bpb of the kept commit
    base: float  # held-out bpb of the commit it replaced
    direction: str = "minimize"

    @property
    def gain(self) -> float:
        return self.base - self.kept if self.direction == "minimize" else self.kept - self.base

    @property
    def suspect(self) -> bool:
        """The gain measured on the validation rows vanishes on rows no decision has seen."""
        return self.gain <= 0

    def text(self) -> str:
        verdict = "SUSPECT: the gain vanishes there" if self.suspect else "holds"
        return f"held-out slice {self.slice}: {self.kept:.6f} vs {self.base:.6f} ({self.gain:+.6f}), {verdict}"


def heldout_bpb(ws: Workspace, env: dict[str, str], commit: str, slice_index: int) -> float | None:
    """The held-out bpb of a kept commit's model (scored by the workspace's harness once, then
    cached beside the model); None when there is no model or the scorer failed."""
    import json
    import os
    import subprocess
    import tempfile

    artifact = state_dir(ws.path) / ARTIFACTS_DIRNAME / commit
    cached = artifact / f"heldout-{slice_index}.json"
    if cached.is_file():
        return float(json.loads(cached.read_text())["bpb"])
    if not (artifact / "model.pt").is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "harness.py", "score", "--split", "heldout", "--slice", str(slice_index),
               "--artifact", str(artifact), "--result", str(result)]
        subprocess.run(cmd, cwd=ws.path, env={**os.environ, **env}, capture_output=True, check=False)
        try:
            found = json.loads(result.read_text())
        except (OSError, ValueError):
            return None
    if "bpb" not in found:
        return None
    cached.write_text(json.dumps({"bpb": found["bpb"]}))
    return float(found["bpb"])


def second_opinion(ws: Workspace, env: dict[str, str], kept: str, base: str, slice_index: int,
                   direction: str = "minimize") -> SecondOpinion | None:
    """Score the kept commit and the one it replaced on held-out slice `slice_index` (rows after
    the validation rows, never used for a decision); None when either model is not there."""
    kept_bpb = heldout_bpb(ws, env, kept, slice_index)
    base_bpb = heldout_bpb(ws, env, base, slice_index) if kept_bpb is not None else None
    if kept_bpb is None or base_bpb is None:
        return None
    return SecondOpinion(slice_index, kept_bpb, base_bpb, direction)


# -- `nightlab train` ------------------------------------------------------------------------------
def train_once(settings: Settings, profile: str | None) -> int:
    """Run the workspace's train.py once through the executor, streaming its log; the exit code."""
    path = settings.workspace_path
    if profile:
        settings = dataclasses.replace(settings, trainer=dataclasses.replace(settings.trainer, profile=profile))
    if (state_dir(path) / DB_FILENAME).exists():
        ws = open_workspace(path, settings)
        if profile and profile != "auto" and profile != ws.profile:
            _stderr(f"note: {path} was set up with profile {ws.profile!r}; running it as it is")
    else:
        ws = init_workspace(path, settings.workspace.tag, settings)
    pid = holder(ws.path)
    if pid is not None:
        raise UserError(f"the loop (pid {pid}) is running in {ws.path}; pause or stop it before `nightlab train`")
    env = run_environment(ws, settings)
    executor = LocalExecutor(settings.executor.gpus, settings.executor.cpu_slots)
    log = state_dir(ws.path) / "runs" / f"train-{int(time.time())}.log"
    handle = executor.launch(RunSpec(ws.run_command, ws.path, log, executor.slots()[0], env))
    _stderr(f"running `{ws.run_command}` in {ws.path} (log {log})")
    offset = 0
    try:
        while True:
            state = executor.poll([handle])[handle.key]
            offset = _stream(log, offset)
            if state.state != "running":
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        executor.cancel(handle, grace_s=5)
        raise
    _stream(log, offset)
    summary = parse_summary(read_tail(log, 64 * 1024))
    code = state.exit_code if state.exit_code is not None else 1
    if summary.complete:
        print("\nsummary: " + ", ".join(f"{k}={v:g}" for k, v in summary.metrics.items()))
    print(f"exit code {code}" + ("" if summary.complete else "; no summary block in the log"))
    return code


def _stream(log: Path, offset: int) -> int:
    with open(log, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


DEFAULT_PROGRAM = """\
# program.md — research directives

This file is yours: edit it to steer the research. nightlab gives it to the proposer (the
coding agent reads it before every experiment) and never changes it.

## Setup
- `train.py` is the only file you change. Everything in it is fair game: the model, the
  optimizer, the hyperparameters, the schedule, the batch size.
- `prepare.py` and `harness.py` are the fixed harness (data, tokenizer, dataloader; device, dtype,
  attention backend, budget, scoring). Do not change them, and do not add dependencies.
- The harness scores every run itself: it rebuilds your model with `build_model(config, device,
  dtype)`, loads the weights the run saved (`rt.finish(...)` at the end of `main`), and computes
  val_bpb from `model(inputs)` logits. Keep those names; a model whose position t looks at later
  tokens is rejected. train.py has no validation data; printing a val_bpb changes nothing.
- Every run trains for a fixed budget, so results are comparable whatever you change.

## Goal
Get the lowest `val_bpb` (validation bits per byte; lower is better). The budget is fixed, so a
faster step is as good as a better step: more steps fit in the same time.

## The experiment loop
1. Form one hypothesis and make one focused change to train.py.
2. Say what you changed (one line) and why you expect it to help.
3. The run is measured; a better val_bpb is kept, anything else is reset.

## Rules of thumb
- Simplicity: a tiny gain that adds ugly complexity is not worth it; removing code for an equal
  result is a win. Prefer small diffs.
- VRAM is a soft constraint: some increase is fine for a real gain, not for noise.
- A crash costs a whole run: read the last crash's log before trying something similar.
- When several ideas in an area failed in a row, move to another area.
- Do not chase noise: a gain smaller than the run-to-run noise is re-run before it counts.

## Ideas worth trying
- Learning rates and warmup/warmdown fractions; weight decay; Adam betas.
- Model shape: depth vs width (aspect ratio), head dim, attention window pattern.
- Batch size vs number of steps within the budget.
"""
