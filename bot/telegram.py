"""The Telegram channel: python-telegram-bot 22's Application with long polling.

Long polling because a GPU box behind NAT has no public URL for a webhook. Text goes out as
HTML (rendered and split by format.TELEGRAM_HTML); errors become DeliveryError so the outbox
decides about retries: 429 carries Telegram's retry_after, a refused request (bad chat, bot
blocked) is permanent, anything on the network is retried.
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from pathlib import Path
from typing import Any

from nightlab.bot.channel import DeliveryError, Incoming, OnMessage
from nightlab.bot.format import TELEGRAM_HTML
from nightlab.bot.outage import LibraryLog, Outage
from nightlab.loop.state.commands import REGISTRY
from nightlab.loop.state.config import Secret, TelegramSettings
from telegram import BotCommand, MessageEntity, Update
from telegram.constants import ChatType, ParseMode
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    RetryAfter,
    TelegramError,
)
from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters
from telegram.request import HTTPXRequest

log = logging.getLogger("nightlab.bot")


class TelegramChannel:
    name = "telegram"
    flavour = TELEGRAM_HTML
    progress = False

    def __init__(self, settings: TelegramSettings, token: Secret, poll_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self._token = token
        self._poll_timeout = poll_timeout_s
        self._app: Application | None = None
        self._on_message: OnMessage | None = None
        self.outage = Outage(self.name)
        self._conflict_said = False  # another poller of this token: said once

    def destinations(self) -> list[str]:
        # Allowed chats get the digests; without any, every listed user in their private chat.
        ids = self.settings.chats or (*self.settings.operators, *self.settings.viewers)
        return [str(i) for i in dict.fromkeys(ids)]

    async def start(self, on_message: OnMessage) -> None:
        self._on_message = on_message
        builder = (Application.builder().token(self._token.reveal()).job_queue(None)
                   .request(_Request(self.outage)).get_updates_request(_Request(self.outage, connection_pool_size=1)))
        if self.settings.api_base:
            base = self.settings.api_base.rstrip("/")
            builder = builder.base_url(f"{base}/bot").base_file_url(f"{base}/file/bot")
        app = builder.build()
        # CommandHandler knows the bot's username (getMe) and matches "/cmd" and "/cmd@thisbot"
        # only: "/kill@otherbot" in a shared group is another bot's business.
        app.add_handler(CommandHandler(list(REGISTRY), self._command, filters=_WRITTEN_NOW))
        app.add_handler(MessageHandler(filters.TEXT & _WRITTEN_NOW, self._other))
        try:
            await app.initialize()  # getMe: fails fast on a bad token or no network
            await app.bot.set_my_commands([BotCommand(name, spec.help[:256]) for name, spec in REGISTRY.items()])
            await app.start()
            assert app.updater is not None
            await app.updater.start_polling(
                timeout=dt.timedelta(seconds=self._poll_timeout),
                allowed_updates=[Update.MESSAGE],
                error_callback=self._polling_failed,
            )
        except BaseException:
            await _shutdown(app, self.outage)
            raise
        self._app = app
        me = app.bot.username
        log.info("telegram: polling as @%s", me)

    def _polling_failed(self, exc: TelegramError) -> None:
        if not isinstance(exc, Conflict):
            self.outage.lost(f"polling: {exc}")
        elif not self._conflict_said:
            # Telegram answered: no outage. Said as "connection lost ... connected again", two
            # lines every few seconds all night, and nothing about the cause.
            self._conflict_said = True
            log.error("telegram: another program polls this bot's token (Telegram: %s); a second nightlab (another"
                      " box or workspace) with the same bot? A command sent to the bot reaches either one: give each"
                      " daemon its own bot (@BotFather /newbot)", exc)

    async def _command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        msg = update.effective_message
        if msg is None or msg.text is None or not msg.entities:
            return
        command = msg.entities[0]
        # In a forum topic every message "replies" to the topic's first message: not an answer.
        reply = msg.reply_to_message if msg.reply_to_message and not msg.reply_to_message.forum_topic_created else None
        replied = reply.from_user if reply else None
        if replied is not None and replied.is_bot and replied.id != context.bot.id \
                and "@" not in msg.parse_entity(command):
            return  # "/pause" answering another bot's message is that bot's command
        await self._deliver(update, addressed=True, text=_unaddressed(msg.text, command))

    async def _other(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Text that is not one of our commands: chatter, or an unknown "/command"."""
        msg, chat = update.effective_message, update.effective_chat
        if msg is None or chat is None:
            return
        private = chat.type == ChatType.PRIVATE
        entity = msg.entities[0] if msg.entities else None
        if entity is None or entity.type != MessageEntity.BOT_COMMAND or entity.offset != 0:
            await self._deliver(update, addressed=private, text=msg.text or "")  # group chatter: not for us
            return
        _, _, to = msg.parse_entity(entity).partition("@")
        if to and to.lower() != context.bot.username.lower():
            return  # addressed to another bot: silently not ours
        # An unknown command gets its usage where it can only be meant for us: a private chat,
        # or "/x@thisbot"; an unaddressed "/start" in a group may be another bot's.
        await self._deliver(update, addressed=private or bool(to), text=_unaddressed(msg.text or "", entity))

    async def _deliver(self, update: Update, addressed: bool, text: str) -> None:
        user, chat, msg = update.effective_user, update.effective_chat, update.effective_message
        if user is None or chat is None or self._on_message is None:
            return
        await self._on_message(Incoming(
            channel=self.name,
            user=str(user.id),
            chat=str(chat.id),
            private=chat.type == ChatType.PRIVATE,
            text=text,
            addressed=addressed,
            written_at=msg.date.timestamp() if msg is not None and msg.date else None,
        ))

    async def send_text(self, destination: str, body: str) -> None:
        bot = self._bot()
        await _call(bot.send_message(chat_id=int(destination), text=body, parse_mode=ParseMode.HTML,
                                     disable_web_page_preview=True))

    async def send_photo(self, destination: str, path: Path, caption: str) -> None:
        bot = self._bot()
        with path.open("rb") as f:
            await _call(bot.send_photo(chat_id=int(destination), photo=f, caption=caption[:1024]))

    def _bot(self):
        if self._app is None:
            raise DeliveryError("telegram is not connected yet")
        return self._app.bot

    async def stop(self) -> None:
        if self._app is not None:
            app, self._app = self._app, None
            await _shutdown(app, self.outage)


# A command is what the sender writes now: not an edit of an old message (it would run again),
# a channel post, a forward (someone else's words) or an inline bot's text. allowed_updates asks
# for new messages only, but Telegram still hands over updates queued before it was set.
_WRITTEN_NOW = filters.UpdateType.MESSAGE & ~filters.FORWARDED & ~filters.VIA_BOT


def _unaddressed(text: str, command: MessageEntity) -> str:
    """"/kill@thisbot 7" -> "/kill 7" (the entity is the leading command; its text is ASCII)."""
    end = command.offset + command.length
    return text[:end].partition("@")[0] + text[end:]


async def _call(request) -> None:
    try:
        await request
    except RetryAfter as exc:
        with warnings.catch_warnings():  # int vs timedelta deprecation: both are handled here
            warnings.simplefilter("ignore")
            after = exc.retry_after
        seconds = after.total_seconds() if isinstance(after, dt.timedelta) else float(after)
        raise DeliveryError(f"telegram 429: {exc}", retry_after=seconds) from None
    except ChatMigrated as exc:  # not a network error: every retry would get the same answer
        raise DeliveryError(f"telegram: the group is now the supergroup {exc.new_chat_id}; put that id in"
                            " telegram.chats (and restart) to send there", permanent=True) from None
    except (BadRequest, Forbidden, InvalidToken) as exc:
        raise DeliveryError(f"telegram refused: {exc}", permanent=True) from None
    except TelegramError as exc:  # NetworkError, TimedOut, 5xx: worth another try
        raise DeliveryError(f"telegram: {exc}") from None


class _Request(HTTPXRequest):
    """python-telegram-bot's HTTP client, telling the channel whenever Telegram answered: that is
    how a lost connection is seen to be back (polling has no callback for it)."""

    def __init__(self, outage: Outage, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._outage = outage

    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        code, payload = await super().do_request(*args, **kwargs)
        if code < 500:
            self._outage.back()
        return code, payload


async def _shutdown(app: Application, outage: Outage) -> None:
    # Stopped while Telegram is unreachable, the updater logs its last getUpdates failing as an
    # ERROR with a chained traceback: that is the outage again, one line at most.
    updater_log = logging.getLogger("telegram.ext.Updater")
    quiet = LibraryLog(outage)
    updater_log.addFilter(quiet)
    try:
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        await app.shutdown()
    except Exception as exc:  # noqa: BLE001 - stopping must not fail the daemon's shutdown
        log.warning("telegram: shutdown: %s", exc)
    finally:
        updater_log.removeFilter(quiet)
