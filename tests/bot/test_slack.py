"""The Slack channel end to end: slack-sdk's real WebClient and builtin Socket Mode client
against the fake Web API and a real WebSocket server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from nightlab.bot.outbox import Tuning
from nightlab.bot.service import BotService
from nightlab.loop.state import views
from nightlab.loop.state.config import Secret, Secrets
from nightlab.loop.state.store import Store
from slack_sdk.socket_mode.request import SocketModeRequest

from tests.bot.conftest import CAPTION, a_night_to_plot, finished, finished_with_patch, running, settings, start_service
from tests.fakes.slack_server import FakeSlack
from tests.waiting import wait_until

OPERATOR, VIEWER, STRANGER = "UOP", "UVIEW", "USTRANGER"
CHANNEL, OTHER_CHANNEL, DM = "CLAB", "CRANDOM", "DOP"


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


@pytest.fixture
def bot(slack: FakeSlack, workspace: Path) -> Iterator[BotService]:
    s = settings(slack={"operators": [OPERATOR], "viewers": [VIEWER], "channels": [CHANNEL],
                        "api_base": slack.api_url})
    svc = start_service(s, Secrets(slack_bot_token=Secret(slack.bot_token),
                                   slack_app_token=Secret(slack.app_token)), workspace)
    assert slack.connected()
    yield svc
    assert svc.stop(10)


def replies(slack: FakeSlack, channel: str, before: int, count: int = 1) -> list[str]:
    return [p.shown for p in slack.wait_for(before + count, channel)[before:]]


def test_slash_command_round_trip_with_ack(slack: FakeSlack, bot: BotService, workspace: Path) -> None:
    envelope = slack.slash_command("status", VIEWER, CHANNEL)
    assert slack.acked(envelope)
    assert replies(slack, CHANNEL, 0) == [views.status_text(workspace)]
    assert slack.posts[0].styled("pre") == [views.status_text(workspace)]  # a code block
    envelope = slack.slash_command("", VIEWER, CHANNEL)  # bare /nightlab: help
    assert "pause [now]" in replies(slack, CHANNEL, 1)[0]


def test_mentions_and_dms_steer_but_channel_membership_grants_nothing(
        slack: FakeSlack, bot: BotService, store: Store) -> None:
    number = running(store, started_ago_s=30)
    slack.event({"type": "app_mention", "user": OPERATOR, "channel": CHANNEL, "text": "<@UBOT> kill"})
    assert replies(slack, CHANNEL, 0)[0].startswith(f"✔ killing #{number}")
    # A mention that speaks to another bot (Telegram's /pause@otherbot) is not ours: silent.
    slack.event({"type": "app_mention", "user": OPERATOR, "channel": CHANNEL, "text": "<@UDEPLOY> pause, cc <@UBOT>"})
    slack.event({"type": "message", "channel_type": "im", "user": OPERATOR, "channel": DM, "text": "note try rope"})
    assert replies(slack, DM, 0)[0].startswith("✔ note queued")
    assert [(c.name, c.args, c.sender) for c in store.pending_commands()] == [
        ("kill", str(number), f"slack:{OPERATOR}"), ("note", "try rope", f"slack:{OPERATOR}")]
    # A stranger in the allowed channel, an operator in a channel that is not allowed, chatter,
    # our own bot's post: all silent. A stranger's DM gets a short refusal.
    slack.slash_command("pause", STRANGER, CHANNEL)
    slack.slash_command("pause", OPERATOR, OTHER_CHANNEL)
    slack.event({"type": "message", "channel_type": "channel", "user": OPERATOR, "channel": CHANNEL, "text": "pause"})
    slack.event({"type": "message", "channel_type": "im", "bot_id": "B1", "channel": DM, "text": "pause"})
    slack.slash_command("pause", STRANGER, "DSTRANGER")
    assert "Not authorised" in replies(slack, "DSTRANGER", 0)[0]
    slack.slash_command("pause", VIEWER, CHANNEL)
    assert "only operators" in replies(slack, CHANNEL, 1)[0]
    assert len(store.pending_commands()) == 2 and slack.wait_for(0, OTHER_CHANNEL, timeout=0) == []


def test_digest_429_retry_after_and_splitting(slack: FakeSlack, bot: BotService, store: Store) -> None:
    slack.fail("429", times=1, retry_after=1)
    finished(store, "keep", 0.98, new_best=True, delta=-0.01, previous_best=0.99, description="*bold* <b>")
    store.emit("alert", text="x" * 7000)
    posts = slack.wait_for(4, CHANNEL)
    assert posts[0].styled("bold")[0].startswith("🏆 #1 keep · val_bpb 0.9800") and "\n*bold* <b>\n" in posts[0].shown
    assert [len(p.shown) for p in posts[1:]] == [2999, 3000, 1003]  # 3000 UTF-16 units; 🚨 counts 2
    tries = [t for m, t in slack.attempts if m == "chat.postMessage"]
    assert tries[1] - tries[0] >= 0.95  # Slack's Retry-After, not our 0.1 s backoff


def test_plot_uploads_a_png_with_files_upload_v2_that_says_how_the_night_went(
        slack: FakeSlack, bot: BotService, store: Store) -> None:
    a_night_to_plot(store)
    slack.wait_for(7, CHANNEL)
    slack.slash_command("plot", OPERATOR, CHANNEL)
    upload = [p for p in slack.wait_for(8, CHANNEL, timeout=20) if p.method == "file"]
    assert upload and upload[0].data.startswith(b"\x89PNG")
    assert (upload[0].text, upload[0].title) == (CAPTION, CAPTION.split("\n")[0])  # the comment, a title of one line


def test_reconnects_after_disconnect(slack: FakeSlack, bot: BotService) -> None:
    assert slack.connections_opened == 1
    slack.disconnect()
    assert slack.connected(timeout=15)
    assert slack.connections_opened >= 2
    envelope = slack.slash_command("best", VIEWER, CHANNEL)
    assert slack.acked(envelope)
    assert replies(slack, CHANNEL, 0) == ["no result yet"]


def test_an_outage_is_two_lines_in_the_journal_and_the_queue_goes_out_when_it_is_back(
        slack: FakeSlack, workspace: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    s = settings(slack={"operators": [OPERATOR], "channels": [CHANNEL], "api_base": slack.api_url})
    # Our backoff alone would wait ten minutes: only seeing Slack answer again can flush now.
    svc = start_service(s, Secrets(slack_bot_token=Secret(slack.bot_token), slack_app_token=Secret(slack.app_token)),
                        workspace, tuning=Tuning(backoff_base_s=600, backoff_max_s=600))
    caplog.set_level(logging.DEBUG)
    slack.down()
    store.emit("alert", text="while down")
    wait_until(lambda: store.connection().execute("SELECT COALESCE(MAX(attempts), 0) FROM outbox").fetchone()[0],
               "a failed delivery attempt")
    wait_until(lambda: sum("Failed to check the current session" in r.getMessage() for r in caplog.records)
               + sum(r.getMessage().startswith("slack: connection lost") for r in caplog.records) >= 1,
               "the lost connection in the log", timeout=30)
    slack.up()
    assert [p.text for p in slack.wait_for(1, CHANNEL, timeout=30)] == ["🚨 while down"]
    assert svc.stop(10)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(m.startswith("slack: connection lost") for m in lines) == 1, lines
    assert sum(m.startswith("slack: connected again") for m in lines) == 1, lines
    assert not [r for r in caplog.records if r.name.startswith("slack_sdk") and r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines  # the deliveries that failed meanwhile are the same outage


def test_a_mention_of_a_bot_whose_id_starts_with_ours_is_not_for_us(slack: FakeSlack, bot: BotService,
                                                                    store: Store) -> None:
    # Slack ids differ in length: <@UBOT2> is another member whose id only starts with ours (UBOT).
    running(store, started_ago_s=30)
    slack.event({"type": "app_mention", "user": OPERATOR, "channel": CHANNEL, "text": "<@UBOT2> kill"})
    slack.slash_command("best", OPERATOR, CHANNEL)
    assert replies(slack, CHANNEL, 0) == ["no result yet"]  # processed in order, after that
    assert store.pending_commands() == []


def test_text_arrives_as_the_user_typed_it(slack: FakeSlack, bot: BotService, store: Store) -> None:
    # Slack escapes &, < and > in what it sends (as we do in what we post): a note said
    # "lr &lt; 1e-3" and the digest, escaping it again, showed "&amp;lt;".
    slack.event({"type": "message", "channel_type": "im", "user": OPERATOR, "channel": DM,
                 "text": "note lr &lt; 1e-3 &amp;&amp; wd &gt; 0"})
    replies(slack, DM, 0)
    slack.slash_command("note a&amp;b", OPERATOR, CHANNEL)
    replies(slack, CHANNEL, 0)
    assert [c.args for c in store.pending_commands()] == ["lr < 1e-3 && wd > 0", "a&b"]


def test_echoed_text_never_pings_links_or_previews(slack: FakeSlack, bot: BotService, store: Store) -> None:
    # A note, an agent's description and hypothesis, a crash's log: written by others, shown as is.
    bait = "<!channel> <!here> <@U123> <https://evil.example|click> https://evil.example/x.png"
    store.emit("note_added", by="slack:UOP", text=bait)
    finished(store, "crash", None, description=bait, log_tail=f"Traceback\n{bait}")
    posts = slack.wait_for(2, CHANNEL)
    # shown as written: a rich_text block's text elements ping and link nothing (those are elements
    # of their own); a notification's text has Slack's three reserved characters escaped
    assert bait in posts[0].shown and f"Traceback\n{bait}" in posts[1].styled("pre")
    assert all("<" not in p.text and ">" not in p.text for p in posts), [p.text for p in posts]
    assert "&lt;!channel&gt; &lt;!here&gt; &lt;@U123&gt; &lt;https://evil.example|click&gt;" in posts[0].text
    assert not any(p.unfurls for p in posts)  # an image URL would have put its picture in the channel


def test_edits_deletions_bot_posts_and_unlisted_channels_are_silent(slack: FakeSlack, bot: BotService,
                                                                    store: Store) -> None:
    running(store, started_ago_s=30)
    dm = {"type": "message", "channel_type": "im", "channel": DM}
    slack.event({**dm, "subtype": "message_changed", "message": {"user": OPERATOR, "text": "kill"}})
    slack.event({**dm, "subtype": "message_deleted", "previous_message": {"user": OPERATOR, "text": "kill"}})
    slack.event({**dm, "subtype": "bot_message", "bot_id": "B9", "text": "kill"})
    slack.event({**dm, "user": "UBOT", "bot_id": "B1", "text": "⚠️ unknown command 'x'"})  # our own reply
    slack.event({"type": "app_mention", "user": OPERATOR, "channel": OTHER_CHANNEL, "text": "<@UBOT> kill"})
    slack.event({**dm, "user": OPERATOR, "text": "best", "thread_ts": "1.0"})  # a thread is still a DM
    assert replies(slack, DM, 0) == ["no result yet"]
    assert store.pending_commands() == [] and slack.wait_for(0, OTHER_CHANNEL, timeout=0) == []


def test_a_redelivered_event_is_applied_once(slack: FakeSlack, bot: BotService, store: Store,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # Slack redelivers an event whose ack it did not see in time (the same event_id, retry_attempt
    # counting up), also on the new connection after a reconnect: a kill or a note ran twice.
    caplog.set_level(logging.INFO, logger="nightlab")
    number = running(store, started_ago_s=30)
    kill = slack.event({"type": "app_mention", "user": OPERATOR, "channel": CHANNEL, "text": "<@UBOT> kill"})
    assert replies(slack, CHANNEL, 0)[0].startswith(f"✔ killing #{number}")
    note = slack.event({"type": "message", "channel_type": "im", "user": OPERATOR, "channel": DM,
                        "text": "note try rope"})
    assert replies(slack, DM, 0)[0].startswith("✔ note queued")
    again = [slack.redeliver(kill), slack.redeliver(note)]
    # acknowledged all the same, or Slack keeps trying. Acked before the refresh: an envelope the
    # socket closes on unacked is Slack's to send again on the new connection (the copy below).
    assert all(slack.acked(e) for e in again)
    slack.disconnect()
    assert slack.connected(timeout=15)
    again.append(slack.redeliver(again[1], reason="connection_lost"))
    assert slack.acked(again[-1])
    # Each copy leaves a line once it is dropped: the point where it would have been acted on.
    wait_until(lambda: sum("handled already" in r.getMessage() for r in caplog.records) == 3,
               "three redeliveries dropped", abort=lambda: "a copy was answered" if len(slack.posts) > 2 else None)
    assert [(c.name, c.args) for c in store.pending_commands()] == [("kill", str(number)), ("note", "try rope")]
    assert len(slack.posts) == 2


def test_markup_characters_in_text_from_others_are_shown_as_written(slack: FakeSlack, bot: BotService,
                                                                     store: Store) -> None:
    """Slack's mrkdwn has no escape for `*`, `_`, `~` or a backtick: a note "try *two* heads"
    showed "two" bold, a description's `_x_` italic, a hypothesis holding `_` broke our own italic,
    and a log line "```" closed the crash's code block early. Messages are rich_text blocks: the
    text is shown as written, and only our own styles are styles."""
    note = "try *two* heads, ~maybe~ `n_head` = 2 & <b>"
    store.emit("note_added", by="slack:UOP", text=note)
    tail = "Traceback\n```\n*not bold* _nor italic_ ~nor struck~\nraise `x`"
    finished(store, "crash", None, description="fix ```the``` _bug_", hypothesis="a_b_c *d*", log_tail=tail)
    posts = slack.wait_for(2, CHANNEL)
    assert note in posts[0].shown and posts[0].styled("bold") == posts[0].styled("italic") == []
    assert "\nfix ```the``` _bug_\n" in posts[1].shown
    assert posts[1].styled("italic") == ["a_b_c *d*"] and posts[1].styled("pre") == [tail]  # the log, unchanged


def test_a_long_diff_is_one_message_cut_with_the_command_for_the_rest(slack: FakeSlack, bot: BotService,
                                                                       store: Store, workspace: Path) -> None:
    # Slack's messages are the shortest, and a diff's < > & each cost several characters escaped
    body = "".join(f"+    if step < warmup and lr > 0: lr = lr * (step + 1) / warmup  # {i}\n" for i in range(150))
    number = finished_with_patch(store, "--- a/train.py\n+++ b/train.py\n@@ -1,0 +1,150 @@\n" + body)
    slack.wait_for(1, CHANNEL)  # its digest
    slack.slash_command(f"diff {number}", VIEWER, CHANNEL)
    (diff,) = replies(slack, CHANNEL, 1)
    # Sent once the diff is answered: the next reply is best's, so the diff took one message.
    slack.slash_command("best", VIEWER, CHANNEL)
    best = replies(slack, CHANNEL, 2)[0]
    text = views.diff_text(workspace, number, views.CHAT_DIFF_CHARS)
    assert diff == text and slack.posts[1].styled("pre") == [text]
    assert text.endswith(f"of 153 lines not shown; all of it: git -C {workspace.resolve()} diff base c0ffee")
    assert best.startswith("best val_bpb")


def test_commands_sent_back_to_back_are_applied_in_the_order_slack_delivered_them(
        slack: FakeSlack, bot: BotService, store: Store) -> None:
    # The Socket Mode client ran its listeners in a pool of 10 threads, and each command was handled
    # as a task of its own: a /pause then a /resume sent at once could be applied resume first.
    # Telegram hands updates over one at a time; Slack now does the same.
    notes = [f"note {letter}" for letter in "ABCDEFGHIJKLMNOPQRST"]
    envelopes = [slack.slash_command(note, OPERATOR, CHANNEL) for note in notes]
    assert all(slack.acked(e) for e in envelopes)
    answered = replies(slack, CHANNEL, 0, len(notes))
    assert [c.args for c in store.pending_commands()] == [n.removeprefix("note ") for n in notes]
    assert all(a.startswith("✔ note queued") for a in answered)


def test_an_ack_lost_in_a_reconnect_is_one_warning_and_the_copy_is_handled(
        slack: FakeSlack, bot: BotService, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # A command comes in just as the connection goes: its ack cannot be sent, and Slack sends the
    # command again on the new connection. It was an ERROR with a traceback, for nothing lost.
    caplog.set_level(logging.INFO, logger="nightlab")
    (channel,) = bot.channels
    client = channel._socket  # type: ignore[attr-defined]  # slack-sdk's real client, connected to the fake
    client.disconnect()  # the connection goes; the client's monitor makes a new one in a few seconds
    payload = {"command": "/nightlab", "text": "note once", "user_id": OPERATOR, "channel_id": CHANNEL}
    channel._receive(client, SocketModeRequest(type="slash_commands", envelope_id="env-lost", payload=payload))  # type: ignore[attr-defined]
    wait_until(lambda: slack.sessions == 2, "the client's new connection", timeout=30)
    assert slack.acked(slack.slash_command("note once", OPERATOR, CHANNEL))  # Slack's copy
    assert replies(slack, CHANNEL, 0)[0].startswith("✔ note queued")
    assert [(c.name, c.args) for c in store.pending_commands()] == [("note", "once")]
    (line,) = [r for r in caplog.records if "could not acknowledge" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "slash_commands env-lost" in line.getMessage() and "Slack delivers it again" in line.getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
