"""The git ratchet's commit, on a real repository."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nightlab.loop.ratchet import Git


def test_a_commit_message_of_any_length_is_committed(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for key, value in (("user.name", "t"), ("user.email", "t@example.invalid")):
        subprocess.run(["git", "-C", str(tmp_path), "config", key, value], check=True)
    (tmp_path / "train.py").write_text("DEPTH = 8\n")
    message = "#3: deeper\n\n" + "because " * 40_000  # 320 kB: one argument to git may hold 128 kB
    sha = Git(tmp_path).commit_all(message)  # was OSError "Argument list too long": the engine died there
    body = subprocess.run(["git", "-C", str(tmp_path), "log", "-1", "--format=%B", sha],
                          check=True, capture_output=True, text=True).stdout
    assert body.strip() == message.strip()


def test_the_tree_of_a_file_changed_within_the_second_of_its_last_add_is_the_changed_one(tmp_path: Path) -> None:
    """A fast agent's edit of train.py, the same size, within the second git last saw it: the tree
    was hashed in a copy of the index whose new mtime told git its cache could be trusted, so the
    edit was missed and refused as "the code of #2 again" (git's racy-clean check needs the index's
    own mtime). The times are set, not waited for: the file and the index in one second."""
    git = ["git", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "config", "core.trustctime", "false"], check=True)  # the ctime can't be set
    train, index, second = tmp_path / "train.py", tmp_path / ".git" / "index", 1_700_000_000
    train.write_text("LR = 0.95\n")
    os.utime(train, (second, second))
    subprocess.run([*git, "add", "train.py"], check=True)
    os.utime(index, (second, second))
    train.write_text("LR = 0.97\n")  # the same size, in place, in the same second
    os.utime(train, (second, second))
    tree = Git(tmp_path).worktree_tree()
    listed = subprocess.run([*git, "ls-tree", tree, "train.py"], check=True, capture_output=True, text=True).stdout
    shown = subprocess.run([*git, "cat-file", "-p", listed.split()[2]], check=True, capture_output=True, text=True).stdout
    assert shown == "LR = 0.97\n"
