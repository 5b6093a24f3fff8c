"""The git ratchet: every candidate is committed on the workspace's branch; a kept one stays,
anything else is undone with `reset --hard` to the last kept commit, and every candidate commit
stays reachable under `refs/nightlab/exp/<number>` so nothing tried is lost. Parallel runs each
get a detached worktree (a snapshot) of their commit, so the branch moves only by the ratchet.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import git
import psutil
from nightlab.loop.state.errors import UserError

EXP_REF_PREFIX = "refs/nightlab/exp/"


class Git:
    """Every git operation of the loop: the ratchet's, the workspace's set-up and the agent
    proposer's checks (GitPython's command wrapper). `paths`: pathspecs a listing is limited to."""

    def __init__(self, path: Path) -> None:
        try:
            self.repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise UserError(f"{path} is not a git repository; run `nightlab init {path}`") from None
        self.g = self.repo.git

    @classmethod
    def init(cls, path: Path) -> Git:
        """A new repository at `path` (an existing one is left as it is)."""
        git.Repo.init(path)
        return cls(path)

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

    def switch_branch(self, branch: str) -> None:
        """HEAD on `branch`: checked out where it exists, else made where HEAD is."""
        if self.has_commits() and branch in [h.name for h in self.repo.heads]:
            self.g.checkout(branch)
        else:
            self.g.checkout("-b", branch)

    def default_identity(self, identity: dict[str, str]) -> None:
        """Set the config keys of `identity` ("user.name": ...) that no git config gives yet: commits
        must work on a bare CI box, and a user's own identity always wins."""
        reader = self.repo.config_reader()
        with self.repo.config_writer() as writer:
            for key, value in identity.items():
                section, option = key.split(".")
                if not reader.has_option(section, option):
                    writer.set_value(section, option, value)

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

    def untracked_files(self, paths: Sequence[str] = ()) -> list[str]:
        """Files git does not track and does not ignore: what `commit_all` adds besides changes."""
        return self.g.ls_files("--others", "--exclude-standard", "--", *paths).splitlines()

    def ignored_files(self, paths: Sequence[str] = ()) -> set[str]:
        """Files git ignores: what a commit leaves out."""
        out = self.g.ls_files("-z", "--others", "--ignored", "--exclude-standard", "--", *paths,
                              stdout_as_string=False)
        return {os.fsdecode(p) for p in out.split(b"\0") if p}

    def worktree_tree(self, paths: Sequence[str] = ()) -> str:
        """The tree a commit of the working tree (`commit_all`) would have, made in a copy of the
        index so the real one is not touched."""
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index"
            if (Path(self.repo.git_dir) / "index").is_file():  # its stat cache: no file is hashed twice
                # with its mtime: git trusts the cache for a file changed in the second of the index's
                # write only when the index's mtime says so (a copy's own, later, hid an agent's fast edit)
                shutil.copy2(Path(self.repo.git_dir) / "index", index)
            env = {"GIT_INDEX_FILE": str(index)}
            # Status 1, everything added, when `paths` excludes a folder git ignores anyway.
            self.g.add("--all", "--", *paths, env=env, with_exceptions=False)
            return self.g.write_tree(env=env)

    def commit_all(self, message: str) -> str:
        self.g.add("--all")
        # on stdin, not as an argument: one argument may hold 128 kB, a proposal's words more
        with tempfile.TemporaryFile() as text:
            text.write(message.encode("utf-8", "replace"))
            text.seek(0)
            self.g.commit("--no-verify", "--allow-empty", "-F", "-", istream=text)
        return self.head()

    def commit_files(self, message: str, paths: Sequence[str]) -> str:
        """Commit `paths` as they are in the tree, and nothing else that may be changed."""
        self.g.commit("--no-verify", "-q", "-m", message, "--", *paths)
        return self.head()

    def apply_change(self, commit: str) -> list[str]:
        """Re-make `commit`'s change (against its parent) in the working tree, uncommitted: a
        result from an older base brought onto the current one. The files in conflict ([] = it
        applied); on a conflict the caller resets the tree."""
        try:
            self.g.cherry_pick("--no-commit", commit)
        except git.GitCommandError:
            return self.diff_names("U") or ["(the change does not apply)"]
        return []

    def keep_ref(self, number: int, sha: str) -> None:
        self.g.update_ref(f"{EXP_REF_PREFIX}{number}", sha)

    def experiment_with_tree(self, tree: str) -> int | None:
        """The first experiment whose commit holds exactly `tree` (each one's ref: `keep_ref`)."""
        numbers = []
        for line in self.g.for_each_ref("--format=%(tree) %(refname:lstrip=3)", EXP_REF_PREFIX).splitlines():
            ref_tree, number = line.split(" ", 1)
            if ref_tree == tree and number.isdigit():
                numbers.append(int(number))
        return min(numbers, default=None)

    def checkout(self, ref: str) -> None:
        """HEAD and the tree at `ref` (a branch, or a commit: detached), local changes discarded."""
        self.g.checkout("-q", "-f", ref)

    def uncommit(self, sha: str) -> None:
        """The branch back at `sha`, the working tree as it is: the commits since are undone,
        their changes kept uncommitted."""
        self.g.reset("-q", "--mixed", sha)

    def stash_edits(self, message: str) -> tuple[list[str], list[str]]:
        """Keep the uncommitted changes, new files too, as a git stash entry (`git stash list` shows
        it, `git stash pop` brings it back) and leave the tree at HEAD; ignored files stay where they
        are. (edited, new) files, both [] when none: a person's new file was removed unsaid."""
        edited = [f for f in self.g.diff("--name-only", "-z", "HEAD").split("\0") if f]
        new = self.untracked_files()
        if edited or new:
            self.g.stash("push", "--include-untracked", "-q", "-m", message)
        return edited, new

    def commits_between(self, since: str, until: str) -> list[str]:
        """The commits `until` has and `since` has not (git's since..until), newest first."""
        return str(self.g.rev_list(f"{since}..{until}")).split()

    def subject(self, sha: str) -> str:
        """The first line of `sha`'s commit message."""
        return str(self.g.log("-1", "--format=%s", sha))

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

    def file_numstat(self, base: str, commit: str | None = None, paths: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
        """{path: (lines added, lines removed)} from `base` to `commit` (None: the working
        tree's tracked files). A binary file counts no lines; a file's mode alone (`chmod +x`)
        is no change: its code would run as it did."""
        stats: dict[str, tuple[int, int]] = {}
        revs = [base] if commit is None else [base, commit]
        for line in self.g(c="core.fileMode=false").diff("--numstat", *revs, "--", *paths).splitlines():
            added, removed, path = line.split("\t", 2)
            stats[path] = (int(added) if added.isdigit() else 0, int(removed) if removed.isdigit() else 0)
        return stats

    def patch(self, base: str, commit: str) -> str:
        """`git diff base commit` as a person's git shows it, uncoloured (a file's mode alone is
        no change, as in `file_numstat`); bytes that are not UTF-8 become U+FFFD."""
        out = self.g(c="core.fileMode=false").diff("--no-color", "--no-ext-diff", base, commit,
                                                   stdout_as_string=False)
        return bytes(out).decode("utf-8", "replace")

    def diff_names(self, diff_filter: str, *revs: str, paths: Sequence[str] = ()) -> list[str]:
        """The paths of a diff (`git diff REVS`) with a status in `diff_filter` (D: deleted, U: in conflict)."""
        return self.g.diff("--name-only", f"--diff-filter={diff_filter}", *revs, "--", *paths).splitlines()

    def diff(self, base: str, paths: Sequence[str] = ()) -> str:
        """The working tree's change against `base` as a patch without context lines."""
        return str(self.g.diff("-U0", base, "--", *paths))


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


