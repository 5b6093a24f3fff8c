"""The daemon process never imports torch: only trainer processes do (start-up time, RSS)."""

from __future__ import annotations

import subprocess
import sys


def test_daemon_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import nightlab.heartbeat.cli, nightlab.heartbeat.daemon, nightlab.loop.engine\n"
        "import nightlab.bot.service, nightlab.loop.proposers, nightlab.trainer.prepare\n"
        "import nightlab.trainer.profiles\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_engine_leaves_the_harness_data_libraries_to_the_runs() -> None:
    """pyarrow, tiktoken and numpy (through trainer/prepare.py) cost the engine child ~48 MB RSS;
    only the runs and the daemon's data preparation need them."""
    code = ("import sys\nimport nightlab.loop.engine.process\n"
            "print(sorted(m for m in ('pyarrow', 'tiktoken', 'nightlab.trainer.prepare') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
