"""Logging for the daemon: plain lines on stderr that journald stores well, secrets scrubbed.

Under systemd (JOURNAL_STREAM is set) journald adds its own timestamps and reads a `<N>` prefix
as the line's priority, so `journalctl -p warning` works; in a terminal lines carry a timestamp.
Secrets: the Secret type already prints as ***, but libraries may log a token inside a URL (the
Telegram Bot API puts it in the path), so the formatter replaces the values of the configured
secrets in every line it writes, and the chattiest HTTP loggers are kept at WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

from nightlab.loop.state.config import Secret, scrub

# syslog priorities for sd-daemon(3) prefixes
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_NOISY = ("httpx", "httpcore", "telegram", "slack_sdk", "urllib3", "rustbpe")
# APScheduler logs every job run and every skipped beat (normal while a check waits for a process
# tree to die); the heartbeat's own listener reports job failures and misses instead.
_QUIET = ("apscheduler",)


class DaemonFormatter(logging.Formatter):
    """Formats, then scrubs the secrets from the whole text (message and traceback alike)."""

    def __init__(self, journal: bool, secrets: Iterable[Secret] = ()) -> None:
        if journal:
            super().__init__("%(name)s: %(message)s")
        else:
            super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self._journal = journal
        self._secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        text = scrub(super().format(record), self._secrets)
        if self._journal:
            # Continuation lines (tracebacks) get the prefix too, or journald files them as info.
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            text = "\n".join(prefix + line for line in text.splitlines())
        return text


def setup_logging(secrets: Iterable[Secret]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DaemonFormatter(bool(os.environ.get("JOURNAL_STREAM")), secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
