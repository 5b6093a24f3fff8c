"""One writer for the daemon configs the end-to-end tests and benches start `nightlab run` with:
a stub-trainer workspace, optionally the fake Telegram and the fake Slack as its chats; and one
way for the benches to stop such a daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fakes.slack_server import FakeSlack
from tests.fakes.telegram_server import FakeTelegram


def write_daemon_config(
    path: Path,
    workspace: Path,
    *,
    telegram: tuple[FakeTelegram, int, int] | None = None,  # (server, operator id, chat id)
    slack: tuple[FakeSlack, str, str] | None = None,  # (server, operator id, channel id)
    **tables: dict[str, Any],  # more sections, e.g. heartbeat={"check_interval": 0.3}
) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "workspace": {"path": str(workspace), "tag": "test"},
        "project": {"run_command": f"{sys.executable} train.py"},
        **tables,
        # the daemon's mechanics, one baseline (as tests/fakes/loop_workspace.py's stub settings)
        "loop": {"baseline_runs": 1, "remeasure_every": 0, **tables.get("loop", {})},
    }
    if telegram is not None:
        server, operator, chat = telegram
        sections["telegram"] = {"operators": [operator], "chats": [chat], "api_base": server.url}
    if slack is not None:
        server, operator, channel = slack
        sections["slack"] = {"operators": [operator], "channels": [channel], "api_base": server.api_url}
    # JSON strings, numbers and lists are valid TOML values.
    path.write_text("".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for name, table in sections.items()
    ))
    return path


def stop_daemon(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM (as systemd stops it), SIGKILL after `grace_s`; its exit code. Harmless when the
    daemon has already exited."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
