"""The git ratchet: every candidate is committed on the workspace's branch; a kept one stays,
anything else is undone with `reset --hard` to the last kept commit, and every candidate commit
stays reachable under `refs/nightlab/exp/<number>` so nothing tried is lost. Parallel runs each
get a detached worktree (a snapshot) of their commit, so the branch moves only by the ratchet.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import git
import psutil
from nightlab.loop.state.errors import UserError

EXP_REF_PREFIX = "refs/nightlab/exp/"


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

    def has_commit(self, sha: str) -> bool:
        try:
            self.g.cat_file("-e", f"{sha}^{{commit}}")
        except git.GitCommandError:
            return False
        return True

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
        # on stdin, not as an argument: one argument may hold 128 kB, a proposal's words more
        with tempfile.TemporaryFile() as text:
            text.write(message.encode("utf-8", "replace"))
            text.seek(0)
            self.g.commit("--no-verify", "--allow-empty", "-F", "-", istream=text)
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

    def stash_edits(self, message: str) -> list[str]:
        """Keep the tracked files' uncommitted changes as a git stash entry, the tree untouched
        (`git stash list` shows it, `git stash pop` brings it back); the files, [] when none."""
        files = [f for f in self.g.diff("--name-only", "-z", "HEAD").split("\0") if f]
        if files:
            self.g.stash("store", "-m", message, self.g.stash("create", message))
        return files

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
