"""systemd's notify protocol without a dependency: one datagram to $NOTIFY_SOCKET per message.

The protocol (sd_notify(3)) is newline-separated `KEY=value` lines in a single AF_UNIX datagram.
An address starting with '@' is a Linux abstract socket (the '@' stands for a leading NUL byte).
Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon never has to ask.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import MutableMapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Variables systemd hands to the main process only; children must not inherit them, or a child
# could ping the watchdog on the daemon's behalf (NotifyAccess=main would also drop it, noisily).
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class Notifier:
    address: str | None  # None: not under systemd, every message is dropped
    watchdog_usec: int | None = None  # None: no WatchdogSec= in the unit
    # STATUS/WATCHDOG=1 only between READY=1 and STOPPING=1: the beats run on the scheduler's
    # threads, so the first can come before the daemon has said READY=1, and one in flight (its
    # status line read while the daemon began to stop) after STOPPING=1, showing systemd a running
    # status while we stop.
    _ready: bool = field(default=False, init=False)
    _stopping: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read the socket and watchdog settings, and remove them so children don't see them."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw_usec, raw_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a different pid means we
        # inherited the variables by accident and must not ping.
        if raw_usec.isdigit() and int(raw_usec) > 0 and (not raw_pid or raw_pid == str(os.getpid())):
            usec = int(raw_usec)
        for name in _SYSTEMD_VARS:
            env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, **fields: str) -> bool:
        """Send one message, e.g. send(READY="1", STATUS="up"); False when not sent (never raises)."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, target)
        except OSError as exc:
            # A lost notification must not take the daemon down; systemd will notice the silence.
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        with self._lock:
            self._ready = True
            return self.send(READY="1", STATUS=status)

    def status(self, text: str, watchdog: bool) -> bool:
        """STATUS (and WATCHDOG=1); False, sending nothing, before ready() or after stopping()."""
        fields = {"STATUS": _one_line(text)}
        if watchdog:
            fields["WATCHDOG"] = "1"
        with self._lock:
            return self._ready and not self._stopping and self.send(**fields)

    def stopping(self, status: str) -> bool:
        with self._lock:
            self._stopping = True
            return self.send(STOPPING="1", STATUS=_one_line(status))


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value line in the datagram.
    return " ".join(text.split())
