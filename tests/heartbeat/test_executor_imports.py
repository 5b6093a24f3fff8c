"""The executors' layers hold: base types load no backend, and the bot's command path loads no psutil."""

from __future__ import annotations

import subprocess
import sys

_BACKENDS = ("nightlab.loop.executors.local", "nightlab.loop.executors.slurm")


def _loaded_after(imports: str, watched: tuple[str, ...]) -> list[str]:
    code = f"import sys\nimport {imports}\nprint(' '.join(m for m in {watched!r} if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_executor_base_and_run_files_import_no_backend() -> None:
    # the package itself too: importing base runs executors/__init__.py first
    assert _loaded_after("nightlab.loop.executors.base, nightlab.loop.executors.runfiles",
                         (*_BACKENDS, "psutil")) == []


def test_bot_router_loads_no_executor_backend_nor_psutil() -> None:
    assert _loaded_after("nightlab.bot.router", (*_BACKENDS, "psutil")) == []
