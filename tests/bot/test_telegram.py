"""The Telegram channel end to end: python-telegram-bot's real client against the fake Bot API."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nightlab.bot.auth import REFUSAL_WINDOW_S, Refusals
from nightlab.bot.outbox import Tuning
from nightlab.bot.service import BotService
from nightlab.bot.telegram import TelegramChannel
from nightlab.loop.state import ledger, views
from nightlab.loop.state.config import Secret, Secrets
from nightlab.loop.state.store import Store

from tests.bot.conftest import CAPTION, a_night_to_plot, finished, finished_with_patch, running, settings, start_service
from tests.fakes.telegram_server import FakeTelegram
from tests.waiting import wait_until

OPERATOR, VIEWER, STRANGER, GROUP, OTHER_GROUP = 111, 222, 999, -1001, -2002


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with FakeTelegram() as fake:
        yield fake


def tg_settings(fake: FakeTelegram, **digest: object):  # type: ignore[no-untyped-def]
    table: dict[str, object] = {"telegram": {
        "operators": [OPERATOR], "viewers": [VIEWER], "chats": [GROUP], "api_base": fake.url,
    }}
    if digest:
        table["digest"] = digest
    return settings(**table)


@pytest.fixture
def bot(tg: FakeTelegram, workspace: Path) -> Iterator[BotService]:
    svc = start_service(tg_settings(tg), Secrets(telegram_token=Secret(tg.token)), workspace)
    yield svc
    assert svc.stop(10)


def ask(tg: FakeTelegram, text: str, user: int, chat: int | None = None, count: int = 1) -> list[str]:
    chat = user if chat is None else chat
    before = len(tg.messages(chat))
    tg.inject(text, user, chat)
    return [m.text for m in tg.wait_for(before + count, chat)[before:]]


def test_registers_commands_and_answers_read_only_commands(tg: FakeTelegram, bot: BotService, store: Store,
                                                             workspace: Path) -> None:
    assert tg.commands is not None and [c["command"] for c in tg.commands][:3] == ["help", "status", "best"]
    assert "deleteWebhook" in tg.methods  # long polling, no webhook
    finished(store, "keep", 0.99, description="if a<b & c: <b>bold?</b>")
    tg.wait_for(1, GROUP)
    assert ask(tg, "/status", VIEWER) == [views.status_text(workspace)]
    assert ask(tg, "/last 7", VIEWER) == [views.history_text(workspace, 7)]
    sent = tg.messages(VIEWER)[-1]
    assert sent.parse_mode == "HTML" and "a&lt;b &amp; c: &lt;b&gt;bold?&lt;/b&gt;" in sent.raw  # shown verbatim
    assert ask(tg, "/best", VIEWER) == [views.best_text(workspace)]
    assert "pause [now]" in ask(tg, "/help@nightlab_test_bot", OPERATOR)[0]


def test_diff_shows_what_an_experiment_changed(tg: FakeTelegram, bot: BotService, store: Store,
                                              workspace: Path) -> None:
    diff = "--- a/train.py\n+++ b/train.py\n@@ -20 +20 @@\n-MATRIX_LR = 0.04\n+MATRIX_LR = 0.05  # if a<b & c"
    number = finished_with_patch(store, diff, description="MATRIX_LR 0.04→0.05")
    tg.wait_for(1, GROUP)
    assert ask(tg, f"/diff {number}", VIEWER) == [f"#{number} keep: MATRIX_LR 0.04→0.05\nbase..c0ffee train.py +1 -1\n{diff}"]
    sent = tg.messages(VIEWER)[-1]
    assert sent.raw.startswith("<pre>") and "# if a&lt;b &amp; c" in sent.raw  # monospace, shown verbatim
    assert ask(tg, "/diff 9", VIEWER) == [f"⚠️ there is no experiment #9; the last recorded is #{number}"]


def test_operator_command_is_written_and_promised(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    number = running(store, started_ago_s=200)
    finished(store, "keep", 0.99, duration_s=320)
    # its digest first: sent while /focus was asked below, it was taken for the reply in the group
    tg.wait_for(1, GROUP)
    reply = ask(tg, "/pause", OPERATOR)[0]
    assert reply.startswith(f"✔ pausing after #{number} finishes, ~"), reply
    (cmd,) = store.pending_commands()
    assert (cmd.name, cmd.args, cmd.sender) == ("pause", "", f"telegram:{OPERATOR}")
    assert ask(tg, "/focus Attention", OPERATOR, GROUP)[0].startswith("✔ focusing on attention")
    assert [c.name for c in store.pending_commands()] == ["pause", "focus"]


class _Checkpoint:
    """The engine's side of applying commands, with nothing in flight (the engine is not under test)."""

    def running_numbers(self) -> list[int]:
        return []

    def kill(self, number: int, reason: str) -> bool:
        raise AssertionError("nothing is running to kill")


def _group_after_apply(tg: FakeTelegram, store: Store, marker: str) -> list[str]:
    """Apply the pending commands as the engine's checkpoint does, then everything the group got up
    to a marker event behind them (a destination's messages go out in order)."""
    from nightlab.loop.state.steering import apply_pending

    apply_pending(store, _Checkpoint())
    store.emit("alert", text=marker)
    wait_until(lambda: any(marker in m.text for m in tg.messages(GROUP)), what=f"the group to get {marker!r}")
    return [m.text for m in tg.messages(GROUP)]


def test_a_focus_gets_one_answer(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    # Sent in the group: the promise is the one answer there (it was three: the promise, the
    # focus line and the command's done line).
    reply = ask(tg, "/focus attention", OPERATOR, GROUP)
    assert reply[0].startswith("✔ focusing on attention from the next proposal")
    assert _group_after_apply(tg, store, "first") == [reply[0], "🚨 first"]
    assert store.get("loop.focus") == "attention"
    # Sent privately: the answer goes there, and the group hears of it once.
    assert ask(tg, "/focus off", OPERATOR)[0].startswith("✔ focus off from the next proposal")
    assert _group_after_apply(tg, store, "second")[2:] == [f"🎯 focus → off by telegram:{OPERATOR}", "🚨 second"]
    assert len(tg.messages(OPERATOR)) == 1 and store.get("loop.focus") is None


def test_a_pause_sent_twice_is_said_once(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    # A double tap on the phone: the second /pause is answered, not queued (applied twice, the
    # group heard "paused" twice).
    assert ask(tg, "/pause", OPERATOR)[0].startswith("✔ pausing")
    assert ask(tg, "/pause", OPERATOR) == ["⚠️ the same pause is queued already (sent twice?); nothing changed"]
    note = "/note " + "a long thought " * 60
    ask(tg, note, OPERATOR)
    assert ask(tg, note, OPERATOR) == ["⚠️ the same note is queued already (sent twice?); nothing changed"]
    assert [c.name for c in store.pending_commands()] == ["pause", "note"]
    # Sent again once applied: the same, in the pause's own words.
    group = _group_after_apply(tg, store, "applied")
    assert ask(tg, "/pause", OPERATOR) == ["⚠️ already paused; nothing changed (resume undoes it)"]
    assert not store.pending_commands()
    assert [t for t in group if t.startswith(("⏸", "📝"))] == [f"⏸ paused by telegram:{OPERATOR}",
                                                             f"📝 note by telegram:{OPERATOR}: {note[6:].strip()}"]


def test_a_pause_of_the_run_hours_is_taken_over(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    # Paused by the run hours, the owner's /pause is no repeat: it keeps the loop paused past their start.
    ledger.set_paused(store, "the run hours 22:00-08:00", "pause", None)
    assert ask(tg, "/pause", OPERATOR)[0].startswith("✔ pausing")
    assert [c.name for c in store.pending_commands()] == ["pause"]


def test_resume_says_whether_there_is_anything_to_resume(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    # Not paused: said, and nothing queued (the group got "↳ resume from …: not paused" once applied).
    assert ask(tg, "/resume", OPERATOR) == ["⚠️ the loop is not paused; nothing to resume"]
    assert not store.pending_commands()
    # A /pause the engine has not applied yet counts: /pause then /resume sent at once resumes
    # (the answer was "nothing to resume", and the loop resumed).
    ask(tg, "/pause", OPERATOR)
    assert ask(tg, "/resume", OPERATOR)[0].startswith("✔ resuming")
    _group_after_apply(tg, store, "applied")
    assert ledger.paused(store) is None


def test_a_focus_already_in_force_is_answered_not_queued(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    # "/focus off" with no focus set was queued, and the group heard "🎯 focus → off" for nothing.
    assert ask(tg, "/focus off", OPERATOR) == ["⚠️ the focus is off already; nothing changed"]
    ask(tg, "/focus attention", OPERATOR)
    _group_after_apply(tg, store, "applied")
    assert ask(tg, "/focus Attention", OPERATOR) == ["⚠️ the focus is attention already; nothing changed"]
    assert not store.pending_commands()
    # Another focus on its way: the one sent last is what the next proposal gets.
    ask(tg, "/focus optimizer", OPERATOR)
    assert ask(tg, "/focus attention", OPERATOR)[0].startswith("✔ focusing on attention")


def test_viewer_cannot_steer_and_bad_input_gets_usage(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    assert "only operators" in ask(tg, "/pause", VIEWER)[0]
    assert "unknown command" in ask(tg, "/frobnicate", OPERATOR)[0]
    assert "usage: last [N]" in ask(tg, "/last many", OPERATOR)[0]
    assert "unknown area 'gpu'" in ask(tg, "/focus gpu", OPERATOR)[0]
    assert "too long" in ask(tg, "/note " + "x" * 1500, OPERATOR)[0]
    assert "nothing is running" in ask(tg, "/kill 7", OPERATOR)[0]
    assert store.pending_commands() == []  # nothing reached the loop


def test_strangers_are_refused_privately_and_ignored_in_groups(tg: FakeTelegram, bot: BotService, store: Store,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    assert "Not authorised" in ask(tg, "/pause", STRANGER)[0]
    tg.inject("/pause", STRANGER, GROUP)  # a stranger in the allowed group
    tg.inject("/status", OPERATOR, OTHER_GROUP)  # an operator in a group that is not allowed
    tg.inject("chatter without a slash", OPERATOR, GROUP)
    assert ask(tg, "/best", OPERATOR, GROUP) == ["no result yet"]  # processed in order, after those
    assert len(tg.messages(GROUP)) == 1 and tg.messages(OTHER_GROUP) == []
    assert store.pending_commands() == []
    assert sum("refused telegram:999" in r.getMessage() for r in caplog.records) == 2


def test_a_stranger_is_refused_once_per_window_and_the_owner_is_never_held_back(
        tg: FakeTelegram, workspace: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # Each of a stranger's messages got its refusal: one who kept writing spent our rate limit on
    # them, and the 429s delayed the owner's digests.
    now = [0.0]
    svc = start_service(tg_settings(tg), Secrets(telegram_token=Secret(tg.token)), workspace,
                        refusals=Refusals(clock=lambda: now[0]))

    def refusals_queued() -> int:  # what will be sent to the stranger, whether sent yet or not
        return store.connection().execute("SELECT COUNT(*) FROM outbox WHERE destination = ?",
                                          (str(STRANGER),)).fetchone()[0]

    try:
        for _ in range(5):
            tg.inject("/pause", STRANGER)
        # Updates are handled in order: with the owner's answers here, the stranger's were handled.
        assert [ask(tg, "/best", OPERATOR) for _ in range(3)] == [["no result yet"]] * 3
        assert refusals_queued() == 1 and "Not authorised" in tg.wait_for(1, STRANGER)[0].text
        now[0] += REFUSAL_WINDOW_S - 1
        tg.inject("/pause", STRANGER)
        assert ask(tg, "/best", OPERATOR) == ["no result yet"] and refusals_queued() == 1
        now[0] += 1  # the window is over: told once more
        assert "Not authorised" in ask(tg, "/pause", STRANGER)[0] and refusals_queued() == 2
    finally:
        assert svc.stop(10)
    refused = [r for r in caplog.records if "refused telegram:999" in r.getMessage()]
    assert len(refused) == 2 and all(r.levelno == logging.WARNING for r in refused)


def test_commands_addressed_to_another_bot_are_ignored(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    number = running(store, started_ago_s=30)
    tg.inject("/kill@otherbot", OPERATOR, GROUP)
    tg.inject("/status@OtherBot", OPERATOR, GROUP)
    tg.inject("/kill@otherbot", OPERATOR)  # in private too: it names someone else
    tg.inject("/start", OPERATOR, GROUP)  # an unaddressed unknown command in a group: another bot's
    assert "unknown command '/frobnicate'" in ask(tg, "/frobnicate@nightlab_test_bot", OPERATOR, GROUP)[0]
    assert "unknown command" in ask(tg, "/frobnicate", OPERATOR)[0]  # in private it can only be for us
    # The app's own first message to a bot: answered with the commands (it was "unknown command").
    assert ask(tg, "/start", OPERATOR)[0].startswith("nightlab commands\nhelp ")
    assert store.pending_commands() == []
    assert ask(tg, "/kill@NightLab_Test_Bot", OPERATOR, GROUP)[0].startswith(f"✔ killing #{number}")
    assert len(tg.messages(GROUP)) == 2 and len(tg.messages(OPERATOR)) == 2  # nothing else answered
    assert [(c.name, c.args) for c in store.pending_commands()] == [("kill", str(number))]


def test_digest_per_experiment_and_new_best(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    finished(store, "discard", 1.01, delta=0.02, previous_best=0.99, description="WARMUP 0→0.1")
    finished(store, "keep", 0.98, delta=-0.01, previous_best=0.99, new_best=True, description="MATRIX_LR 0.04→0.05")
    finished(store, "crash", None, log_tail="\n".join(f"line {i}" for i in range(40)) + "\nCUDA out of memory")
    digests = [m for m in tg.wait_for(3, GROUP)]
    assert digests[0].text.startswith("❌ #1 discard · val_bpb 1.0100 (worse by 0.0200 than 0.9900)")
    assert digests[1].text.startswith("🏆 #2 keep") and "NEW BEST" in digests[1].text
    assert "<b>" in digests[1].raw and "MATRIX_LR 0.04→0.05" in digests[1].text
    crash = digests[2]
    assert crash.text.startswith("💥 #3 crash") and "<pre>" in crash.raw
    assert crash.text.rstrip().endswith("CUDA out of memory") and "line 20" not in crash.text  # last 15 lines


def test_long_messages_are_split_at_4096(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    store.emit("alert", text="<&>" * 3000)  # 9000 visible characters that escape to 27000
    parts = tg.wait_for(3, GROUP)
    assert [len(p.text) for p in parts][:2] == [4095, 4096]  # 4096 UTF-16 units; the 🚨 counts 2
    assert len(parts) == 3 and all(len(p.raw) > 4096 for p in parts[:2])  # the escapes do not count
    assert "".join(p.text for p in parts) == "🚨 " + "<&>" * 3000


def test_429_is_honoured(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    tg.fail("429", times=1, retry_after=1)
    store.emit("alert", text="first")
    store.emit("alert", text="second")
    got = tg.wait_for(2, GROUP)
    assert [m.text for m in got] == ["🚨 first", "🚨 second"]
    tries = [t for m, t in tg.attempts if m == "sendMessage"]
    assert tries[1] - tries[0] >= 0.95  # waited the retry_after second, not our 0.1 s backoff


def test_plot_sends_a_png_that_says_how_the_night_went(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    """Its caption said "7 experiments", what the chart's title says already; a glance at a phone wants
    how many were kept, the best, how far runs vary and what it gained over the baseline."""
    a_night_to_plot(store)
    tg.wait_for(7, GROUP)  # the digests
    tg.inject("/plot", VIEWER)
    (photo,) = tg.wait_for(1, VIEWER, timeout=20)
    assert photo.method == "sendPhoto" and photo.photo.startswith(b"\x89PNG")
    assert photo.caption == CAPTION  # within Telegram's 1024 characters of a caption


def test_outage_queues_then_delivers_everything_in_order(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    store.emit("alert", text="before")
    # Delivered as far as the bot knows, not just received: an outage that cuts the reply off is
    # one the bot must send it again after (at least once), and it came twice.
    wait_until(lambda: store.connection().execute("SELECT COUNT(*) FROM outbox WHERE status = 'sent'").fetchone()[0],
               "'before' marked sent")
    tg.down()
    for i in range(10):
        store.emit("alert", text=f"during {i}")
    wait_until(lambda: len(bot_waiting(store)) >= 10, "ten messages waiting in the outbox")
    tg.up()
    got = tg.wait_for(11, GROUP, timeout=30)
    assert [m.text for m in got] == ["🚨 before", *(f"🚨 during {i}" for i in range(10))]


def bot_waiting(store: Store) -> list[object]:
    return store.connection().execute("SELECT id FROM outbox WHERE status = 'pending'").fetchall()


def test_an_outage_is_two_lines_in_the_journal_and_the_queue_goes_out_when_it_is_back(
        tg: FakeTelegram, workspace: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # Our backoff alone would wait ten minutes: only seeing Telegram answer again can flush now.
    # "Back" shows when a long poll returns: 1 s polls instead of the default 10 s let it show sooner.
    s = tg_settings(tg)
    assert s.telegram is not None
    svc = start_service(s, Secrets(), workspace, tuning=Tuning(backoff_base_s=600, backoff_max_s=600),
                        channels=[TelegramChannel(s.telegram, Secret(tg.token), poll_timeout_s=1.0)])
    caplog.set_level(logging.DEBUG, logger="nightlab")
    tg.down()
    store.emit("alert", text="while down")
    wait_until(lambda: store.connection().execute("SELECT COALESCE(MAX(attempts), 0) FROM outbox").fetchone()[0],
               "a failed delivery attempt")
    wait_until(lambda: sum("polling" in r.getMessage() for r in caplog.records) >= 1, "polling errors in the log",
               timeout=15)
    tg.up()
    assert [m.text for m in tg.wait_for(1, GROUP, timeout=30)] == ["🚨 while down"]
    tg.down()  # and stopped while it is down again
    assert svc.stop(15)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    lost = [m for _, m in lines if m.startswith("telegram: connection lost")]
    back = [m for _, m in lines if m.startswith("telegram: connected again")]
    assert len(lost) == 2 and len(back) == 1 and len(lines) == 3, lines  # one per outage, one when back
    assert not [r for r in caplog.records if r.name.startswith("telegram") and r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


def test_what_waits_for_the_first_connect_goes_out_without_an_outage_in_the_journal(
        tg: FakeTelegram, workspace: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon says its start before the chats have connected: each start logged 'connection
    lost (… telegram is not connected yet)' and 'connected again after 0s', up to three times."""
    secrets = Secrets(telegram_token=Secret(tg.token))
    assert start_service(tg_settings(tg), secrets, workspace).stop(10)  # the outbox's cursor is set
    store.emit("alert", text="said before the connect")
    caplog.set_level(logging.DEBUG, logger="nightlab")
    svc = start_service(tg_settings(tg), secrets, workspace)
    assert [m.text for m in tg.wait_for(1, GROUP)] == ["🚨 said before the connect"]
    assert svc.stop(10)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_steering_written_while_nightlab_was_down_is_said_not_applied(tg: FakeTelegram, bot: BotService,
                                                                     store: Store) -> None:
    """Telegram hands a restarted daemon the last day's messages: a /kill written at 3 am, while
    nightlab was down, stopped whatever ran when it came back."""
    number = running(store, started_ago_s=60)
    before = len(tg.messages(OPERATOR))
    tg.inject("/kill", OPERATOR, date=int(time.time()) - 3 * 3600 - 5 * 60)
    (reply,) = [m.text for m in tg.wait_for(before + 1, OPERATOR)[before:]]
    assert reply == ("⚠️ not applied: your /kill was written 3h05m ago and reached nightlab only now (it was not"
                     " running, or offline); send it again if you still mean it")
    assert store.pending_commands() == []
    assert ask(tg, "/kill", OPERATOR)[0].startswith(f"✔ killing #{number}")  # written now: applied


def test_a_second_program_polling_the_same_bot_is_named_once(
        tg: FakeTelegram, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two daemons (two boxes, or two workspaces) with one bot token: Telegram ends each one's poll
    with 409 Conflict whenever the other polls. That read "connection lost ... connected again",
    two warnings every few seconds all night, and nothing of the cause."""
    caplog.set_level(logging.WARNING, logger="nightlab")
    other = tmp_path / "other"
    other.mkdir()
    secrets = Secrets(telegram_token=Secret(tg.token))
    first = start_service(tg_settings(tg), secrets, workspace)
    second = start_service(tg_settings(tg), secrets, other)
    try:
        wait_until(lambda: tg.conflicts >= 4, "four polls ended by the other's", timeout=60)
    finally:
        assert first.stop(10) and second.stop(10)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    named = [line for line in lines if "another program polls this bot's token" in line]
    assert len(named) == 2 and not [line for line in lines if "connection lost" in line], lines  # once each


def test_only_a_command_the_sender_writes_now_is_one(tg: FakeTelegram, bot: BotService, store: Store) -> None:
    # Each of these carries "/kill" from an operator in the allowed group, yet none is the operator
    # asking now: an edit of an old message (it would run again), a channel post, a forward (someone
    # else's words), an inline bot's text, a caption, a command answering another bot's message.
    running(store, started_ago_s=30)
    other_bot = {"id": 777, "is_bot": True, "first_name": "Deploy", "username": "deploybot"}
    tg.inject("/kill", OPERATOR, GROUP, kind="edited_message")
    tg.inject("/kill", OPERATOR, GROUP, chat_type="channel", kind="channel_post")
    tg.inject("/kill", OPERATOR, GROUP, forward_origin={
        "type": "user", "date": 1, "sender_user": {"id": STRANGER, "is_bot": False, "first_name": "S"}})
    tg.inject("/kill", OPERATOR, GROUP, via_bot=other_bot)
    tg.inject("/kill", OPERATOR, GROUP, field="caption")
    tg.inject("/kill", OPERATOR, GROUP, reply_to_message={
        "message_id": 5, "date": 1, "chat": {"id": GROUP, "type": "group", "title": "lab"},
        "from": other_bot, "text": "deploy #12 done"})
    assert ask(tg, "/best", OPERATOR, GROUP) == ["no result yet"]  # processed in order, after those
    assert store.pending_commands() == [] and len(tg.messages(GROUP)) == 1
    # Addressed to us by name, or answering our own message, a reply is ours.
    ours = {"message_id": 6, "date": 1, "chat": {"id": GROUP, "type": "group", "title": "lab"},
            "from": {"id": 4242, "is_bot": True, "first_name": "nightlab", "username": "nightlab_test_bot"},
            "text": "✔ ..."}
    tg.inject("/best", OPERATOR, GROUP, reply_to_message=ours)
    tg.inject("/best@nightlab_test_bot", OPERATOR, GROUP, reply_to_message={**ours, "from": other_bot})
    # In a forum topic another bot opened, every message "replies" to the topic's first message.
    topic = {**ours, "from": other_bot, "forum_topic_created": {"name": "runs", "icon_color": 0}}
    del topic["text"]
    tg.inject("/best", OPERATOR, GROUP, chat_type="supergroup", is_topic_message=True, message_thread_id=6,
              reply_to_message=topic)
    assert [m.text for m in tg.wait_for(4, GROUP)][1:] == ["no result yet"] * 3


def test_text_that_is_not_valid_unicode_does_not_stop_the_digests(tg: FakeTelegram, bot: BotService,
                                                                    store: Store) -> None:
    # A lone surrogate (a JSON "\udcff" in an agent's proposal.json, a path decoded with
    # surrogateescape) used to make every render raise: the outbox stopped for good.
    store.emit("alert", text="bad byte \udcff in /data/r\udce9sultats")
    store.emit("alert", text="after")
    assert [m.text for m in tg.wait_for(2, GROUP)] == ["🚨 bad byte \ufffd in /data/r\ufffdsultats", "🚨 after"]


def test_a_group_that_became_a_supergroup_is_named_not_retried_forever(
        tg: FakeTelegram, bot: BotService, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # Telegram answers sends to the old id with its new one; that was taken for a network error,
    # so the group's digests were retried (and the channel reported down) for ever.
    tg.migrate(GROUP, -100777)
    store.emit("alert", text="first")
    store.emit("alert", text="second")
    wait_until(lambda: store.connection().execute(
        "SELECT COUNT(*) FROM outbox WHERE status = 'failed'").fetchone()[0] == 2, "both messages given up")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("-100777" in e and "telegram.chats" in e for e in errors), errors


def test_echoed_markup_is_shown_as_text_and_never_fails_a_send(tg: FakeTelegram, bot: BotService,
                                                                store: Store) -> None:
    # A note, an agent's description, a crash's log: written by others, shown as is, sent for sure.
    bait = '</pre><a href="https://evil.example">click</a> <b>&amp; *bold* [x](https://evil.example)'
    store.emit("note_added", by="telegram:111", text=bait)
    finished(store, "crash", None, description=bait, log_tail=f"Traceback\n{bait}")
    note, crash = tg.wait_for(2, GROUP)
    assert note.text == f"📝 note by telegram:111: {bait}" and "<a" not in note.raw
    assert crash.text.count(bait) == 2 and crash.raw.count("<pre>") == 1


def test_other_secrets_in_the_environment_stay_out_of_a_crash_digest(
        tg: FakeTelegram, workspace: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # The runs inherit the daemon's environment less the chat tokens: a train.py an agent edited to
    # print it would post the agent's API key, or a hub token, to the group.
    key, hub = "sk-ant-api03-abcdefghijklmnop", "hf_abcdefghijklmnopqrstu"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    monkeypatch.setenv("HF_TOKEN", hub)
    monkeypatch.setenv("NIGHTLAB_NOTES_DIR", "/srv/notes")  # not a secret by its name: shown
    svc = start_service(tg_settings(tg), Secrets(telegram_token=Secret(tg.token)), workspace)
    try:
        finished(store, "crash", None, log_tail=f"ANTHROPIC_API_KEY={key}\nHF_TOKEN={hub}\n"
                                                "NIGHTLAB_NOTES_DIR=/srv/notes\nKeyError")
        (crash,) = tg.wait_for(1, GROUP)
        assert "ANTHROPIC_API_KEY=***\nHF_TOKEN=***\nNIGHTLAB_NOTES_DIR=/srv/notes" in crash.text, crash.text
    finally:
        assert svc.stop(10)


def test_terminal_control_sequences_in_a_crash_log_are_dropped(tg: FakeTelegram, bot: BotService,
                                                                store: Store) -> None:
    # Colours showed as "[31m" litter, and on the console an OSC 52 sequence would have written
    # the reader's clipboard (a train.py an agent edited prints what it likes).
    tail = "\x1b[1;31mRuntimeError\x1b[0m: boom\x07\n\x1b]52;c;cm0gLXJmIH4=\x07done\x00\x1b]0;title\x1b\\"
    finished(store, "crash", None, log_tail=tail)
    (crash,) = tg.wait_for(1, GROUP)
    assert crash.text.endswith("RuntimeError: boom\ndone"), repr(crash.text)


def test_bidi_controls_cannot_make_a_digest_show_other_than_it_says(tg: FakeTelegram, bot: BotService,
                                                                     store: Store) -> None:
    # "Trojan source": a right-to-left override in an agent's description shows the rest of the
    # line backwards, an isolate hides a span's place, a mark reorders the numbers next to it.
    rlo, pdf, rli, pdi, rlm, lrm, alm = "\u202e", "\u202c", "\u2067", "\u2069", "\u200f", "\u200e", "\u061c"
    store.emit("note_added", by="telegram:111", text=f"keep {rlo}0.98 < 1.02{pdf} {rlm}1 2")
    finished(store, "crash", None, description=f"safe {rli}change{pdi} {lrm}x{alm}",
             log_tail=f"loss {rlo}nan{pdf}\n{rlm}1 2")
    note, crash = tg.wait_for(2, GROUP)
    assert note.text == "📝 note by telegram:111: keep 0.98 < 1.02 1 2"
    assert "safe change x" in crash.text and crash.text.endswith("loss nan\n1 2"), repr(crash.text)
    assert not any(c in crash.raw + note.raw for c in (rlo, pdf, rli, pdi, rlm, lrm, alm))
