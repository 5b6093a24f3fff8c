"""Bot latency and memory, against the fake Telegram and Slack servers (no network).

    .venv/bin/python bench/bot_latency.py [--n 50]

A child process runs BotService with both channels up, as the daemon would; this process plays
Telegram, Slack and the engine (writing experiments into the same state store). Measured:
- command -> reply: a "/status" injected at the fake Telegram until the reply arrives there;
- experiment end -> digest: an experiment recorded (its event emitted) until its digest arrives;
- the child's resident memory with both channels connected (before any chart is drawn).
Targets from issue 6: p95 command reply <= 1 s, digest <= 2 s, RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPERATOR, CHAT = 111, -1001


def child(config: dict[str, str]) -> None:
    """The daemon's side: only what `nightlab run` would import for the bot."""
    from nightlab.bot.service import BotService
    from nightlab.loop.state.config import Secret, Secrets, settings_from_table

    settings = settings_from_table({
        "telegram": {"operators": [OPERATOR], "chats": [CHAT], "api_base": config["telegram"]},
        "slack": {"operators": ["UOP"], "channels": ["CLAB"], "api_base": config["slack"]},
    })
    secrets = Secrets(Secret(config["tg_token"]), Secret(config["bot_token"]), Secret(config["app_token"]))
    svc = BotService(settings, secrets, Path(config["workspace"]))
    svc.start()
    if not svc.ready.wait(30):
        sys.exit("bot did not connect")
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    svc.stop(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(n: int = 50) -> dict[str, object]:
    """Seconds per sample of command -> reply and experiment end -> digest, and the bot's RSS (MB)."""
    import psutil
    from nightlab.loop.state.store import Store

    from tests.bot.conftest import finished
    from tests.fakes.slack_server import FakeSlack
    from tests.fakes.telegram_server import FakeTelegram

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(name, None)  # slack-sdk ignores NO_PROXY
    workspace = Path(tempfile.mkdtemp(prefix="nightlab-bench-"))
    store = Store.for_workspace(workspace)
    with FakeTelegram() as tg, FakeSlack() as slack:
        config = {"telegram": tg.url, "slack": slack.api_url, "tg_token": tg.token,
                  "bot_token": slack.bot_token, "app_token": slack.app_token, "workspace": str(workspace)}
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            rss_mb = psutil.Process(proc.pid).memory_info().rss / 2**20

            replies = []
            for _ in range(n):
                before = len(tg.messages(OPERATOR))
                t0 = time.monotonic()
                tg.inject("/status", OPERATOR)
                sent = tg.wait_for(before + 1, OPERATOR)[before]
                replies.append(sent.at - t0)

            digests = []
            for i in range(n):
                before = len(tg.messages(CHAT))
                t0 = time.monotonic()
                finished(store, "discard", 1.0 + i / 1000)
                sent = tg.wait_for(before + 1, CHAT)[before]
                digests.append(sent.at - t0)
            rss_after_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(30)
    return {"replies": replies, "digests": digests, "rss_mb": rss_mb, "rss_after_mb": rss_after_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="samples per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    m = measure(args.n)
    replies, digests, rss_mb, rss_after_mb = m["replies"], m["digests"], m["rss_mb"], m["rss_after_mb"]
    print(f"{'measurement':<38} {'p50':>8} {'p95':>8} {'max':>8}   target")
    for name, values, target in (("command -> reply (Telegram /status)", replies, "p95 <= 1 s"),
                                 ("experiment end -> digest (Telegram)", digests, "<= 2 s")):
        print(f"{name:<38} {statistics.median(values) * 1000:>6.0f}ms {percentile(values, 0.95) * 1000:>6.0f}ms"
              f" {max(values) * 1000:>6.0f}ms   {target}")
    print(f"{'RSS, both channels up (after runs)':<38} {rss_mb:>6.0f}MB ({rss_after_mb:.0f}MB){'':>9}   <= 150 MB")


if __name__ == "__main__":
    main()
