"""The README's test command (what .ci/run runs) sets up everything the whole suite needs, so a
newcomer's run skips nothing that a fresh Debian/Ubuntu machine can have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fakes.slurm_cluster import BINARIES

# Where each binary the Slurm tests start comes from (Debian/Ubuntu packages).
PACKAGE_OF = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "squeue": "slurm-client",
              "scancel": "slurm-client", "scontrol": "slurm-client", "sinfo": "slurm-client", "munged": "munge",
              "munge": "munge"}


def readme_test_command() -> str:
    """Extracted exactly as .ci/run extracts it."""
    awk = re.search(r"cmd=\$\(awk '([^']*)' README\.md\)", (REPO / ".ci" / "run").read_text())
    assert awk, ".ci/run no longer extracts the README's command with awk"
    return subprocess.run(["awk", awk.group(1), str(REPO / "README.md")], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_readme_test_command_installs_what_every_test_needs() -> None:
    cmd = readme_test_command()
    assert len(cmd.splitlines()) == 1, "one command"
    installs = re.search(r"apt-get install ([^&]*)", cmd)
    assert installs, cmd
    packages = set(installs.group(1).split())
    assert {PACKAGE_OF[b] for b in BINARIES} <= packages, f"Slurm packages missing from: {cmd}"
    pytest_args = cmd.rpartition(" -m pytest ")[2].split()
    # the whole suite, nothing deselected: quiet, on every core (pytest-xdist), and nothing else
    assert pytest_args == ["-q", "-n", "auto", "--dist", "loadgroup"], cmd


def test_the_tests_sharing_a_costly_fixture_stay_on_one_worker(request: pytest.FixtureRequest) -> None:
    """The command runs the suite on several workers (pytest-xdist); the tests that read one costly
    module fixture (a night of real training, a Slurm cluster) carry one xdist_group, so that one
    worker makes it once. pytest 9.2 with pytest-xdist 3.8 dropped every group without a word: each
    worker ran the night again."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("the suite runs on one process here (not the README's --dist loadgroup)")
    grouped = [item.nodeid for item in request.session.items if item.get_closest_marker("xdist_group")]
    assert all("@" in nodeid for nodeid in grouped), [nodeid for nodeid in grouped if "@" not in nodeid][:3]


def test_no_test_reads_data_from_outside_the_repository() -> None:
    for path in (REPO / "tests").rglob("*.py"):
        if path == Path(__file__):
            continue
        text = path.read_text()
        assert "REPO.parent" not in text and "../shared" not in text, f"{path} depends on data it does not make"


def test_every_toml_example_in_the_readme_is_a_valid_config(monkeypatch) -> None:
    """A newcomer pastes them into a config: each must pass `nightlab config check` as shown."""
    from nightlab.loop.state.config import settings_from_text

    monkeypatch.setenv("USER", "me")  # the Slurm example's shared_dir names $USER
    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    for block in blocks:
        settings_from_text(block, "README.md")
