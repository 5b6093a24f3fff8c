"""The outbox's own rules (cursor, order, folding, batching, filters) with an in-memory channel
that implements the bot's Channel protocol; the platform clients are covered against their
fake servers in test_telegram.py and test_slack.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nightlab.bot.channel import DeliveryError, OnMessage
from nightlab.bot.format import PLAIN, Flavour, plain, text_message
from nightlab.bot.outbox import Outbox, Tuning
from nightlab.loop.state.config import DigestSettings, Secret
from nightlab.loop.state.store import Store

from tests.bot.conftest import finished

SMALL = Flavour("small", 400, PLAIN.escape, {}, markup_counts=True)  # one digest, one message


class Inbox:
    """A destination that records texts and can be switched off (a platform outage) or throttle
    (`retry_after`: the next send gets a 429 saying to wait that long)."""

    name = "memo"
    flavour = SMALL
    progress = False

    def __init__(self) -> None:
        self.got: list[str] = []
        self.down = False
        self.retry_after: float | None = None

    def destinations(self) -> list[str]:
        return ["d1"]

    async def start(self, on_message: OnMessage) -> None: ...

    async def send_text(self, destination: str, body: str) -> None:
        if self.retry_after is not None:
            after, self.retry_after = self.retry_after, None
            raise DeliveryError("429", retry_after=after)
        if self.down:
            raise DeliveryError("down")
        if body.startswith("BAD"):
            raise DeliveryError("refused", permanent=True)
        self.got.append(body)

    async def send_photo(self, destination: str, path: Path, caption: str) -> None:
        self.got.append(f"photo {caption}")

    async def stop(self) -> None: ...


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outbox(store: Store, inbox: Inbox, mode: str = "every", clock: Clock | None = None,
           secrets: tuple[Secret, ...] = ()) -> Outbox:
    tuning = Tuning(backoff_base_s=1.0, backoff_max_s=8.0, fold_limit=30, fold_keep=5, batch_period_s=3600)
    return Outbox(store, [inbox], DigestSettings(mode=mode), tuning, clock or Clock(),  # type: ignore[list-item]
                  secrets=secrets)


def pump(box: Outbox) -> None:
    box.fill()
    asyncio.run(box.deliver("memo", "d1"))


def alerts_through_an_outage(store: Store, box: Outbox, inbox: Inbox, clock: Clock, texts: list[str]) -> None:
    """Alerts raised while the channel is down, then sent once it is back 10 s later."""
    inbox.down = True
    for text in texts:
        store.emit("alert", text=text)
    pump(box)
    inbox.down = False
    clock.now += 10
    pump(box)


def test_cursor_starts_now_and_survives_a_restart_exactly_once(store: Store) -> None:
    store.emit("alert", text="history before the first start")
    inbox = Inbox()
    pump(outbox(store, inbox))
    assert inbox.got == []  # the first start does not replay old events
    store.emit("alert", text="one")
    box = outbox(store, inbox)
    box.fill()
    # A crash after filling and before delivery: the next process neither loses nor repeats it.
    store.emit("alert", text="two")
    pump(outbox(store, inbox))
    pump(outbox(store, inbox))
    assert inbox.got == ["🚨 one", "🚨 two"]


def test_backoff_keeps_order_and_a_permanent_failure_does_not_block(store: Store) -> None:
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, clock=clock)
    box.fill()
    inbox.down = True
    for text in ("a", "b"):
        store.emit("alert", text=text)
    box.enqueue("memo", "d1", [])  # an empty reply queues nothing
    pump(box)
    pump(box)  # not due yet: no second attempt
    (head,) = [r for r in box.waiting() if r.attempts]
    assert (head.attempts, head.next_attempt_at) == (1, 1001.0)
    clock.now += 1
    pump(box)
    assert [r.next_attempt_at for r in box.waiting() if r.attempts] == [1003.0]  # 1 s, then 2 s
    inbox.down = False
    store.emit("note_added", text="x", by="cli")
    clock.now += 2
    pump(box)
    assert inbox.got == ["🚨 a", "🚨 b", "📝 note by cli: x"]


def test_a_long_outage_is_folded_into_one_summary(store: Store) -> None:
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, clock=clock)
    box.fill()
    alerts_through_an_outage(store, box, inbox, clock, [f"m{i}" for i in range(40)])
    summary, *rest = inbox.got
    assert summary.startswith("📦 Delivery was interrupted") and "35 messages are folded" in summary
    assert summary.rstrip().endswith("more")  # cut at the flavour's limit, saying so
    assert rest == [f"🚨 m{i}" for i in range(35, 40)]
    assert box.waiting() == []


def test_hourly_mode_batches_digests_but_not_other_messages(store: Store) -> None:
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, mode="hourly", clock=clock)
    box.fill()
    for metric in (1.0, 0.99):
        finished(store, "discard", metric)
    store.emit("alert", text="now")
    pump(box)
    assert inbox.got == ["🚨 now"]
    clock.now += 3600
    pump(box)
    assert inbox.got[1].startswith("🕐 2 experiments in the last hour")
    assert "#1 discard" in "".join(inbox.got[1:]) and "#2 discard" in "".join(inbox.got[1:])


def test_keeps_and_crashes_mode_skips_discards(store: Store) -> None:
    inbox = Inbox()
    box = outbox(store, inbox, mode="keeps_and_crashes")
    box.fill()
    finished(store, "discard", 1.0)
    finished(store, "keep", 0.9)
    finished(store, "crash", None)
    pump(box)
    assert [m.split(" ", 2)[1] for m in inbox.got] == ["#2", "#3"]


def test_a_token_in_a_crash_log_is_neither_sent_nor_kept(store: Store) -> None:
    """A run that prints its environment (an agent's edit, a debug line) must not post a chat token:
    the engine runs without them, and the outbox redacts any that reach a message all the same."""
    token = "123456:AAF-secret-token"
    inbox = Inbox()
    box = outbox(store, inbox, secrets=(Secret(token),))
    box.fill()
    finished(store, "crash", None, log_tail=f"Traceback ...\nNIGHTLAB_TELEGRAM_TOKEN={token}\nKeyError")
    store.emit("alert", text=f"note: {token}")
    pump(box)
    assert len(inbox.got) == 2 and all(token not in m for m in inbox.got), inbox.got
    assert "NIGHTLAB_TELEGRAM_TOKEN=***" in inbox.got[0]
    rows = store.connection().execute("SELECT body FROM outbox").fetchall()
    assert rows and all(token not in r["body"] for r in rows)


def test_a_token_is_redacted_where_a_message_is_split_and_in_a_folded_summary(store: Store) -> None:
    # Redacting the rendered pieces missed a token cut in two by the split, and the stored title
    # (a message's first line) kept it: a summary of folded messages, made of titles, sent it.
    token = "123456:AAF-secret-token"
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, clock=clock, secrets=(Secret(token),))
    box.fill()
    store.emit("alert", text="x" * 387 + token)  # "🚨 " and 387 x: the token straddles SMALL's 400
    pump(box)
    sent = len(inbox.got)
    assert token[:10] not in "".join(inbox.got) and token[-10:] not in "".join(inbox.got), inbox.got
    alerts_through_an_outage(store, box, inbox, clock, [f"m{i} {token}" for i in range(40)])
    assert len(inbox.got) == sent + 6 and "folded" in inbox.got[sent]
    assert all(token not in m for m in inbox.got), inbox.got
    rows = store.connection().execute("SELECT body, title FROM outbox").fetchall()
    assert all(token not in r["body"] and token not in r["title"] for r in rows)


def test_digests_are_never_folded_behind_replies_and_stale_replies_are(store: Store) -> None:
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, clock=clock)
    box.fill()
    inbox.down = True
    finished(store, "keep", 0.98, description="first")
    box.fill()
    for i in range(20):
        box.enqueue("memo", "d1", [text_message(plain(f"status {i}"))])
    finished(store, "discard", 0.99, description="second")
    box.fill()
    for i in range(20, 35):
        box.enqueue("memo", "d1", [text_message(plain(f"status {i}"))])
    pump(box)  # fails: the chat is down
    clock.now += 30  # the replies are out of date by the time it is back
    inbox.down = False
    box.enqueue("memo", "d1", [text_message(plain("asked just now"))])
    clock.now += 10
    pump(box)
    first, summary, second, fresh = inbox.got
    assert "#1 keep" in first and "#2 discard" in second  # both digests in full
    assert "memory 43.9 GB" in first and "VRAM" not in first  # a CPU run has no VRAM
    assert summary.startswith("⌛ 35 out-of-date replies (held up while memo was unreachable), not sent")
    assert "• status 0" in summary
    assert fresh == "asked just now" and box.waiting() == []


def test_backoff_is_capped_and_a_channel_seen_working_is_retried_at_once(store: Store) -> None:
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, clock=clock)
    box.fill()
    inbox.down = True
    store.emit("alert", text="during")
    for _ in range(8):  # 1, 2, 4, 8, 8, ... seconds: never past backoff_max_s
        pump(box)
        (row,) = box.waiting()
        assert row.next_attempt_at - clock.now <= 8.0
        clock.now = row.next_attempt_at
    clock.now -= 1  # the next retry is not due yet ...
    inbox.down = False
    box.channel_works("memo")  # ... but a message came in: the channel is back
    pump(box)
    assert inbox.got == ["🚨 during"]
    inbox.retry_after = 5.0  # a 429: the platform's word still holds when the channel is seen working
    store.emit("alert", text="throttled")
    pump(box)
    inbox.down = True
    store.emit("alert", text="x")
    box.channel_works("memo")
    assert [r.next_attempt_at for r in box.waiting()][0] == clock.now + 5.0


def test_after_a_short_outage_only_the_newest_reply_goes_out_in_full(store: Store) -> None:
    inbox, clock = Inbox(), Clock()
    box = outbox(store, inbox, clock=clock)
    box.fill()
    inbox.down = True
    for i in range(11):
        box.enqueue("memo", "d1", [text_message(plain(f"status {i}"))])
        clock.now += 0.5
    store.emit("alert", text="digest")
    pump(box)
    inbox.down = False
    box.channel_works("memo")  # a message came in: the chat is back after 6 s
    pump(box)
    summary, newest, digest = inbox.got
    assert summary.startswith("⌛ 10 out-of-date replies") and newest == "status 10" and digest == "🚨 digest"


def test_the_console_shows_a_start_after_the_digest_before_it(store: Store) -> None:
    """A start is a progress line in event order (the engine's own line used to beat the digest of
    the experiment before it to the terminal); a chat gets no such line."""
    console, chat = Inbox(), Inbox()
    console.progress, chat.name = True, "chat"
    box = Outbox(store, [console, chat], DigestSettings(), Tuning(), Clock())  # type: ignore[list-item]
    box.fill()
    finished(store, "keep", 0.9)
    store.emit("experiment_started", number=2, kind="proposal", description="MATRIX_LR 0.04→0.05", slot="cpu0")
    box.fill()
    for name in ("memo", "chat"):
        asyncio.run(box.deliver(name, "d1"))
    assert [m.split("\n")[0][:9] for m in console.got] == ["✅ #1 keep", "▶ #2 prop"]
    assert console.got[1] == "▶ #2 proposal started on cpu0: MATRIX_LR 0.04→0.05"
    assert [m.split(" ", 2)[1] for m in chat.got] == ["#1"]
