"""Bring-your-own-project test workspaces: a git repo with the stub trainer as train.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from nightlab.loop.state.config import Settings, settings_from_table
from nightlab.loop.workspace import init_workspace

STUB = Path(__file__).with_name("stub_train.py")
HARNESS = "# the fixed harness: never edited by a proposal\nVALUE = 42\n"


def stub_settings(path: Path, **sections: dict[str, Any]) -> Settings:
    table: dict[str, Any] = {
        "workspace": {"path": str(path), "tag": "test"},
        "project": {"run_command": f"{sys.executable} train.py"},
        # the engine's mechanics, one baseline: the decision rule's own tests set these themselves
        "loop": {"checkpoint_interval": 0.1, "baseline_runs": 1, "remeasure_every": 0},
    }
    for name, values in sections.items():
        table[name] = {**table.get(name, {}), **values}
    return settings_from_table(table, source="<test>")


def make_stub_workspace(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """A user's repository (train.py = the stub, prepare.py = a harness) adopted by nightlab."""
    repo = tmp_path / "ws"
    repo.mkdir()
    shutil.copyfile(STUB, repo / "train.py")
    (repo / "prepare.py").write_text(HARNESS)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "initial"], check=True)
    settings = stub_settings(repo, **sections)
    init_workspace(repo, "test", settings, say=lambda _: None)
    return settings


class Gates:
    """The stub trainer's gates: the run of #N ends once `open(N)` was called (and not before).
    Runs see them through $NIGHTLAB_STUB_GATES (tests/loop/conftest.py's `gates` sets it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def open(self, *numbers: int) -> None:
        for number in numbers:
            (self.folder / str(number)).touch()


class StubData:
    """The stub trainer's data dir, one shard in it: a test damages it mid-night and repairs it.
    Runs see it through $NIGHTLAB_STUB_DATA (tests/loop/conftest.py's `stub_data` sets it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shard = folder / "shard_00003.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        self.repair()

    def damage(self) -> None:
        """Cut short, its footer gone (a disk error, a copy interrupted)."""
        self.shard.write_bytes(b"PAR1 rows")

    def repair(self) -> None:
        self.shard.write_bytes(b"PAR1 rows PAR1")


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()
