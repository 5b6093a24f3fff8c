"""A clean stop must not strand the last digests in the outbox.

`nightlab run --max-experiments N` (and `nightlab demo`, which is that) stops as soon as the
engine reports it is finished; the last experiment's digest was written a moment before. Here
the fake Telegram takes 1.5 s to accept that digest (a slow network, well within the daemon's
10 s bot stop budget): a daemon that stops cleanly must still deliver it before it exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from nightlab.loop.state.store import Store

from tests.e2e.invariants import DIGEST
from tests.fakes.daemon_config import write_daemon_config
from tests.fakes.loop_workspace import make_stub_workspace
from tests.fakes.telegram_server import FakeTelegram

OPERATOR, CHAT = 111, -1001



def test_max_experiments_stop_delivers_the_last_digest(tmp_path: Path) -> None:
    settings = make_stub_workspace(tmp_path)
    ws = settings.workspace_path
    with FakeTelegram() as tg:
        config = write_daemon_config(
            tmp_path / "nightlab.toml", ws, telegram=(tg, OPERATOR, CHAT), loop={"checkpoint_interval": 0.1},
            heartbeat={"check_interval": 0.3, "min_free_disk_gb": 0.0, "report_time": ""},
        )
        tg.hold("#1 keep · ", accepted=False)

        def slow_network() -> None:
            if tg.holding.wait(60):
                threading.Timer(1.5, tg.release).start()

        threading.Thread(target=slow_network, daemon=True).start()
        done = subprocess.run(
            [sys.executable, "-m", "nightlab.heartbeat.cli", "run", "--config", str(config), "--max-experiments", "1"],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "NIGHTLAB_TELEGRAM_TOKEN": tg.token},
        )
        tg.release()
        assert done.returncode == 0, done.stderr
        digests = [int(m.group(1)) for s in tg.messages(CHAT) if (m := DIGEST.search(s.text))]
        waiting = Store.for_workspace(ws).connection().execute(
            "SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0]
        assert (digests, waiting) == ([1], 0)
