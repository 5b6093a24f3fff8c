"""The git ratchet's commit, on a real repository."""

from __future__ import annotations

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
