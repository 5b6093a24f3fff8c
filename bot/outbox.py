"""The outbox: every message the bot will send, durable in the state store, delivered in order.

Filling: events are read after a per-channel cursor (`kv['bot.cursor.<channel>']`), rendered and
split for that channel, and inserted as one row per message and destination in the SAME
transaction that moves the cursor, so a crash at any point neither loses nor repeats a message.
Replies to commands are inserted directly; the event a command leaves when the engine applies it
is not rendered again for the chat whose reply already answered it (`answered_in`).

Delivery: per destination, strictly oldest first. A failure blocks that destination only (order
is kept) and is retried with exponential backoff (capped, so a channel that is back is found
soon), or when the platform said (Telegram 429 retry_after, Slack Retry-After). As soon as the
channel is seen working again (a send succeeded, or a message came in) every destination of it
is retried at once. After a long outage a destination with more than `fold_limit` waiting
digests gets the oldest folded into one summary that says so; the newest few still go out in
full. Replies to commands never count towards that limit: the replies that waited out an
outage are folded into one line, but the newest per chat, and so is any reply that waited longer
than `reply_stale_s` (a /status from long ago is out of date). In hourly digest mode experiment digests wait as 'batched' rows and go out
as one message per hour. The engine never waits on any of this: it only writes events.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.bot import digest
from nightlab.bot.channel import Channel, DeliveryError
from nightlab.bot.format import Outgoing, Photo, Span
from nightlab.bot.outage import Outage
from nightlab.loop.state.config import DigestSettings, Secret, scrub
from nightlab.loop.state.store import Store

log = logging.getLogger("nightlab.bot")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,   -- delivery order
    channel         TEXT NOT NULL,
    destination     TEXT NOT NULL,
    kind            TEXT NOT NULL,                       -- text | photo
    body            TEXT NOT NULL,                       -- rendered text, or JSON {path, caption}
    title           TEXT NOT NULL DEFAULT '',            -- plain one-liner for folded summaries
    status          TEXT NOT NULL DEFAULT 'pending',     -- pending | batched | sent | folded | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at      REAL NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    reply           INTEGER NOT NULL DEFAULT 0           -- 1: a reply to a command, 0: from an event
);
CREATE INDEX IF NOT EXISTS outbox_waiting ON outbox(channel, destination, id)
    WHERE status IN ('pending', 'batched');
"""


def _cursor_key(channel: Channel) -> str:
    return f"bot.cursor.{channel.name}"


@dataclass(frozen=True)
class Tuning:
    backoff_base_s: float = 2.0
    backoff_max_s: float = 30.0  # also how late a channel that came back may be noticed
    fold_limit: int = 30  # more waiting digests than this for one destination -> fold
    fold_keep: int = 5  # the newest messages still delivered in full after a fold
    batch_period_s: float = 3600.0  # hourly digest mode
    reply_stale_s: float = 20.0  # a reply still waiting after this long is out of date
    events_per_fill: int = 200
    keep_sent_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Row:
    id: int
    channel: str
    destination: str
    kind: str
    body: str
    title: str
    attempts: int
    next_attempt_at: float
    created_at: float


class Outbox:
    def __init__(
        self,
        store: Store,
        channels: Sequence[Channel],
        digest_settings: DigestSettings,
        tuning: Tuning = Tuning(),
        clock: Callable[[], float] = time.time,
        secrets: Sequence[Secret] = (),
    ) -> None:
        self.store = store
        # a token that reached a message (a crash's log tail, a note) is not sent, nor kept in state.db
        self._secrets = list(secrets)
        self.channels = {c.name: c for c in channels}
        self.digest = digest_settings
        self.tuning = tuning
        self.clock = clock
        self._down_since: dict[str, float] = {}  # channel -> first failure of the current outage
        self._throttled_until: dict[str, float] = {}  # channel -> the platform's retry-after
        db = store.connection()
        db.executescript(_SCHEMA)
        if "reply" not in {r["name"] for r in db.execute("PRAGMA table_info(outbox)")}:
            db.execute("ALTER TABLE outbox ADD COLUMN reply INTEGER NOT NULL DEFAULT 0")  # older state.db
        # First start on this workspace: begin with what happens from now on rather than replaying
        # a whole history into the chat. Now, not at the first fill: what the engine writes after
        # the bot has started is never history, however late the bot's first pass comes.
        with store.transaction():
            for channel in self.channels.values():
                if store.get(_cursor_key(channel)) is None:
                    store.set(_cursor_key(channel), store.last_event_id())

    # -- filling -----------------------------------------------------------------------------
    def fill(self) -> int:
        """Turn new events into rows for every channel; returns the number of events read."""
        read = 0
        for channel in self.channels.values():
            key = _cursor_key(channel)
            with self.store.transaction():
                events = self.store.events_after(self.store.get(key), self.tuning.events_per_fill)
                for event in events:
                    if not digest.wanted(event, self.digest):
                        continue
                    batched = self.digest.mode == "hourly" and event.kind == "experiment_finished"
                    for destination in channel.destinations():
                        if event.payload.get("answered_in") == f"{channel.name}:{destination}":
                            continue  # that chat has its answer: the command's reply said it
                        messages = digest.describe(event, self.digest, progress=channel.progress)
                        self._insert(channel, destination, messages, batched)
                if events:
                    self.store.set(key, events[-1].id)
                read += len(events)
        return read

    def enqueue(self, channel_name: str, destination: str, messages: Sequence[Outgoing]) -> None:
        """Replies to a command, queued behind what that destination is already waiting for."""
        with self.store.transaction():
            self._insert(self.channels[channel_name], destination, messages, batched=False, reply=True)

    def _insert(self, channel: Channel, destination: str, messages: Sequence[Outgoing], batched: bool,
                reply: bool = False) -> None:
        now = self.clock()
        status = "batched" if batched else "pending"
        db = self.store.connection()
        for msg in messages:
            if isinstance(msg, Photo):
                caption = scrub(msg.caption, self._secrets)
                rows = [("photo", json.dumps({"path": str(msg.path), "caption": caption}), caption)]
            else:  # redacted before the split, which could cut a token in two, and in the title
                spans = [Span(scrub(s.text, self._secrets), s.style) for s in msg.spans]
                title = scrub(msg.title, self._secrets)
                rows = [("text", body, title) for body in channel.flavour.render(spans)]
            for kind, body, title in rows:
                db.execute(
                    "INSERT INTO outbox(channel, destination, kind, body, title, status,"
                    " next_attempt_at, created_at, reply) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (channel.name, destination, kind, body, title, status, now, now, int(reply)),
                )

    # -- delivery ----------------------------------------------------------------------------
    def waiting(self) -> list[Row]:
        """Rows not yet delivered (pending and batched), oldest first."""
        rows = self.store.connection().execute(
            "SELECT * FROM outbox WHERE status IN ('pending', 'batched') ORDER BY id")
        return [_row(r) for r in rows]

    def destinations_waiting(self) -> list[tuple[str, str]]:
        rows = self.store.connection().execute(
            "SELECT DISTINCT channel, destination FROM outbox WHERE status IN ('pending', 'batched')"
        )
        return [(r["channel"], r["destination"]) for r in rows if r["channel"] in self.channels]

    def has_due(self, within_s: float) -> bool:
        """Is any message of a configured channel due to be sent within `within_s` seconds?
        (Hourly batches are not: they wait for their hour.)"""
        rows = self.store.connection().execute(
            "SELECT DISTINCT channel FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?",
            (self.clock() + within_s,),
        )
        return any(r["channel"] in self.channels for r in rows)

    async def deliver(self, channel_name: str, destination: str) -> None:
        """Send what is due for one destination, oldest first, until it is empty or must wait."""
        channel = self.channels[channel_name]
        self._release_batch(channel, destination)
        self._fold(channel, destination)
        self._fold_stale_replies(channel, destination, self.clock() - self.tuning.reply_stale_s)
        while (row := self._head(channel_name, destination)) and row.next_attempt_at <= self.clock():
            try:
                if row.kind == "photo":
                    photo = json.loads(row.body)
                    path = Path(photo["path"])
                    if not path.is_file():
                        raise DeliveryError(f"chart {path} is gone", permanent=True)
                    await channel.send_photo(destination, path, photo["caption"])
                else:
                    await channel.send_text(destination, row.body)
            except DeliveryError as exc:
                self._failed(row, exc)
                if not exc.permanent:
                    return  # keep the order: nothing behind it goes before it
                continue  # a message that can never go out must not block the ones behind it
            except Exception as exc:  # an adapter bug or an unexpected library error: retry
                log.exception("%s delivery to %s raised", channel_name, destination)
                self._failed(row, DeliveryError(repr(exc)))
                return
            self._set(row.id, status="sent", attempts=row.attempts + 1, last_error="")
            self.channel_works(channel_name)

    def channel_works(self, channel_name: str) -> None:
        """The channel was seen working (a send went through, a message came in): after an
        outage, every destination waiting on a retry is due now, not at the end of its backoff."""
        since = self._down_since.pop(channel_name, None)
        if since is None:
            return
        waiting = self.store.connection().execute(
            "SELECT COUNT(*) FROM outbox WHERE channel = ? AND status = 'pending'", (channel_name,)).fetchone()[0]
        outage = self._outage(channel_name)
        if outage is not None:
            outage.back()  # its WARNING says it; this line is detail
        log.log(logging.INFO if outage else logging.WARNING, "%s: delivering again after %.0fs; %d messages waiting",
                channel_name, self.clock() - since, waiting)
        due = max(self.clock(), self._throttled_until.get(channel_name, 0.0))
        with self.store.transaction() as db:
            db.execute("UPDATE outbox SET next_attempt_at = ? WHERE channel = ? AND status = 'pending'"
                       " AND next_attempt_at > ?", (due, channel_name, due))
            # Replies that waited out the outage: the newest per chat still answers the last
            # question asked; the ones before it are folded into one line.
            for (destination,) in db.execute("SELECT DISTINCT destination FROM outbox WHERE channel = ?"
                                             " AND status = 'pending' AND reply = 1", (channel_name,)).fetchall():
                self._fold_stale_replies(self.channels[channel_name], destination, self.clock(), keep_newest=True)

    def _head(self, channel: str, destination: str) -> Row | None:
        r = self.store.connection().execute(
            "SELECT * FROM outbox WHERE channel = ? AND destination = ? AND status = 'pending'"
            " ORDER BY id LIMIT 1", (channel, destination),
        ).fetchone()
        return None if r is None else _row(r)

    def _failed(self, row: Row, exc: DeliveryError) -> None:
        attempts = row.attempts + 1
        if exc.permanent:
            log.error("dropping %s message #%d to %s: %s", row.channel, row.id, row.destination, exc)
            self._set(row.id, status="failed", attempts=attempts, last_error=str(exc)[:500])
            return
        if exc.retry_after is not None:
            delay = exc.retry_after  # the platform's word beats our guess
            self._throttled_until[row.channel] = self.clock() + delay
        else:
            delay = min(self.tuning.backoff_base_s * 2 ** row.attempts, self.tuning.backoff_max_s)
        # One warning per outage (and one when it is back), not one per attempt: the channel's
        # own connection state says it when it has one.
        first = row.channel not in self._down_since
        self._down_since.setdefault(row.channel, self.clock())
        outage = self._outage(row.channel)
        if outage is not None:
            outage.lost(f"delivery to {row.destination} failed: {exc}")
        log.log(logging.WARNING if first and outage is None else logging.DEBUG,
                "%s: delivery to %s failed (attempt %d, retrying every %.0fs at most): %s",
                row.channel, row.destination, attempts, self.tuning.backoff_max_s, exc)
        self._set(row.id, attempts=attempts, next_attempt_at=self.clock() + delay,
                  last_error=str(exc)[:500])

    def _outage(self, channel_name: str) -> Outage | None:
        return getattr(self.channels.get(channel_name), "outage", None)  # the console has none

    def _set(self, row_id: int, **fields: Any) -> None:
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.store.transaction() as db:
            db.execute(f"UPDATE outbox SET {assignments} WHERE id = ?", (*fields.values(), row_id))

    def _fold(self, channel: Channel, destination: str) -> None:
        """Past the limit, replace the oldest waiting messages by one summary in the first's place."""
        with self.store.transaction() as db:
            rows = [_row(r) for r in db.execute(
                "SELECT * FROM outbox WHERE channel = ? AND destination = ? AND status = 'pending'"
                " AND reply = 0 ORDER BY id", (channel.name, destination))]
            if len(rows) <= self.tuning.fold_limit:
                return
            folded = rows[: len(rows) - self.tuning.fold_keep]
            since = time.strftime("%H:%M", time.localtime(folded[0].created_at))
            head = (f"📦 Delivery was interrupted since {since}; {len(folded)} messages are folded"
                    f" into this summary (the newest {self.tuning.fold_keep} follow in full):\n")
            body = channel.flavour.render_summary(head, [r.title or r.kind for r in folded])
            db.execute(
                "UPDATE outbox SET kind = 'text', body = ?, title = 'summary', attempts = 0 WHERE id = ?",
                (body, folded[0].id),
            )
            db.executemany("UPDATE outbox SET status = 'folded' WHERE id = ?", [(r.id,) for r in folded[1:]])
            log.warning("folded %d messages for %s:%s into a summary", len(folded), channel.name, destination)

    def _fold_stale_replies(self, channel: Channel, destination: str, before: float,
                            keep_newest: bool = False) -> None:
        """Replies made before `before` answer questions that are no longer current: one line in
        the first one's place says what they were; the digests keep their turn in full."""
        with self.store.transaction() as db:
            rows = [_row(r) for r in db.execute(
                "SELECT * FROM outbox WHERE channel = ? AND destination = ? AND status = 'pending'"
                " AND reply = 1 AND title != 'stale replies' AND created_at <= ? ORDER BY id",
                (channel.name, destination, before))]
            rows = rows[:-1] if keep_newest else rows
            if not rows:
                return
            head = (f"⌛ {len(rows)} out-of-date {'reply' if len(rows) == 1 else 'replies'} (held up while"
                    f" {channel.name} was unreachable), not sent; ask again:\n")
            body = channel.flavour.render_summary(head, [r.title or r.kind for r in rows])
            db.execute("UPDATE outbox SET kind = 'text', body = ?, title = 'stale replies' WHERE id = ?",
                       (body, rows[0].id))
            db.executemany("UPDATE outbox SET status = 'folded' WHERE id = ?", [(r.id,) for r in rows[1:]])

    def _release_batch(self, channel: Channel, destination: str) -> None:
        """Hourly mode: once the oldest batched digest is a period old, send them all as one."""
        due = self._next_batch_at(channel.name, destination)
        if due is None or due > self.clock():
            return
        with self.store.transaction() as db:
            rows = [_row(r) for r in db.execute(
                "SELECT * FROM outbox WHERE channel = ? AND destination = ? AND status = 'batched'"
                " ORDER BY id", (channel.name, destination))]
            # A long digest is split into several rows that share its title ("#12 keep · ...").
            experiments = len(dict.fromkeys(r.title for r in rows))
            head = channel.flavour.escape(f"🕐 {experiments} experiments in the last hour")
            now = self.clock()
            for body in channel.flavour.pack([head, *(r.body for r in rows)]):
                db.execute(
                    "INSERT INTO outbox(channel, destination, kind, body, title, next_attempt_at, created_at)"
                    " VALUES(?, ?, 'text', ?, 'hourly digest', ?, ?)",
                    (channel.name, destination, body, now, now),
                )
            db.executemany("UPDATE outbox SET status = 'folded' WHERE id = ?", [(r.id,) for r in rows])

    def _next_batch_at(self, channel: str, destination: str) -> float | None:
        r = self.store.connection().execute(
            "SELECT MIN(created_at) AS t FROM outbox WHERE channel = ? AND destination = ?"
            " AND status = 'batched'", (channel, destination),
        ).fetchone()
        return None if r["t"] is None else r["t"] + self.tuning.batch_period_s

    def prune(self) -> None:
        cutoff = self.clock() - self.tuning.keep_sent_s
        with self.store.transaction() as db:
            db.execute("DELETE FROM outbox WHERE status IN ('sent', 'folded', 'failed') AND created_at < ?",
                       (cutoff,))


def _row(r: Any) -> Row:
    return Row(r["id"], r["channel"], r["destination"], r["kind"], r["body"], r["title"],
               r["attempts"], r["next_attempt_at"], r["created_at"])

