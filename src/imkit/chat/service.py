"""Private (1:1) chat and offline delivery, built on imkit's public API.

:class:`ChatService` installs easy-chat's routes on an :class:`~imkit.App`:

``conversation.chat``
    ``{conversationId?, chatType: 2, recvId, msg: {mType, content}}``. The server derives
    the conversation id from the two users, stores the message once (idempotent on sender
    and message id, so a resend is harmless) under the conversation's next seq, answers
    the sender with ``{conversationId, seq, sendTime, msgId}`` and pushes the stored
    message to the recipient's connections with the method ``push``.
``conversation.sync``
    ``{conversationId: lastSeq, ...}`` → ``{messages: {id: [...]}, hasMore: {id: bool}}``.
``conversation.getChatLog``
    ``{conversationId, startSeq?, endSeq?, startSendTime?, endSendTime?, count?,
    descending?}`` → ``{list: [...]}``, members only.
``conversation.markChat``
    ``{conversationId, seq}`` → ``{readSeq}``; the other member gets a
    ``conversation.read`` push ``{conversationId, userId, readSeq}``.
``conversation.list``
    → ``{list: [{conversationId, peerId, lastSeq, readSeq, unread, lastMessage}]}``.
``user.online``
    ``{userIds?: [...]}`` → ``{online: [...]}``, limited to the caller's conversation
    peers, so it never lists the whole directory.

Offline delivery: each device has a delivered watermark per conversation that moves only
when the device acknowledges a push. When a device connects, everything above its
watermarks is pushed, oldest first, paced by the ack window; live pushes wait until that
catch-up is out (the server holds fan-out until ``on_connect`` hooks finish), so the
order holds. See ``docs/chat.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from imkit.chat.ids import conversation_members, private_conversation_id
from imkit.chat.store import MessageStore, StoredMessage
from imkit.core.frames import ErrorCode, Frame
from imkit.core.server import App, Context, ServerAPI, Session
from imkit.exceptions import HandlerError, StoreError, StoreUnavailable

__all__ = (
    "CHAT_TYPE_PRIVATE",
    "DEFAULT_MAX_CONTENT_BYTES",
    "DEFAULT_PAGE_SIZE",
    "PUSH_METHOD",
    "READ_METHOD",
    "ChatService",
)

CHAT_TYPE_PRIVATE = 2
PUSH_METHOD = "push"
READ_METHOD = "conversation.read"
# Precedent: CASES.md §C23 (64 KB IM limit under the 1 MiB WebSocket limit).
DEFAULT_MAX_CONTENT_BYTES = 64 * 1024
DEFAULT_PAGE_SIZE = 200
_MAX_SYNC_CONVERSATIONS = 100


def _now_ms() -> int:
    return int(time.time() * 1000)


def _require(data: Any, key: str, kind: type, *, optional: bool = False) -> Any:
    value = data.get(key) if isinstance(data, dict) else None
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = "an integer" if kind is int else "a string" if kind is str else kind.__name__
        raise HandlerError(ErrorCode.BAD_REQUEST, f"{key!r} must be {name}")
    return value


class _Watermarks:
    """Acked seqs of one device, advanced contiguously and written behind, coalesced."""

    def __init__(self) -> None:
        self.level: dict[str, int] = {}
        self.acked: dict[str, set[int]] = {}
        self.writing: set[str] = set()


class ChatService:
    """Private chat with offline delivery on a :class:`MessageStore`.

    ``install(app)`` registers the routes and hooks. ``now_ms`` gives the server time in
    milliseconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
        page_size: int = DEFAULT_PAGE_SIZE,
        now_ms: Callable[[], int] = _now_ms,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.max_content_bytes = max_content_bytes
        self.page_size = page_size
        self.now_ms = now_ms
        self.logger = logger or logging.getLogger("imkit.chat")
        self._marks: dict[tuple[str, str], _Watermarks] = {}

    def install(self, app: App) -> None:
        """Register the chat routes and the delivery hooks on ``app``."""
        app.route("conversation.chat")(self.chat)
        app.route("conversation.sync")(self.sync)
        app.route("conversation.getChatLog")(self.get_chat_log)
        app.route("conversation.markChat")(self.mark_chat)
        app.route("conversation.list")(self.list_conversations)
        app.route("user.online")(self.online)
        app.on_connect(self.catch_up)
        app.on_delivered(self.delivered)
        app.on_disconnect(self.disconnected)
        app.on_startup(self._open)
        app.on_shutdown(self._close)

    async def _open(self, server: ServerAPI) -> None:
        await self.store.open()

    async def _close(self, server: ServerAPI) -> None:
        await self.store.close()

    # ------------------------------------------------------------------ routes
    async def chat(self, ctx: Context) -> None:
        """``conversation.chat``: store once, answer the sender, push to the recipient."""
        data = ctx.data
        chat_type = _require(data, "chatType", int)
        if chat_type != CHAT_TYPE_PRIVATE:
            raise HandlerError(ErrorCode.BAD_REQUEST, "only private chat (chatType 2) is supported")
        recv_id = _require(data, "recvId", str)
        if not recv_id or "\x00" in recv_id:
            raise HandlerError(ErrorCode.BAD_REQUEST, "'recvId' must be a non-empty user id")
        msg = _require(data, "msg", dict)
        content = _require(msg, "content", str)
        m_type = _require(msg, "mType", int, optional=True) or 0
        try:
            size = len(content.encode("utf-8"))
        except UnicodeEncodeError:
            raise HandlerError(ErrorCode.BAD_REQUEST, "'content' is not valid Unicode") from None
        if size > self.max_content_bytes:
            raise HandlerError(
                ErrorCode.TOO_LARGE,
                f"content is {size} bytes; the limit is {self.max_content_bytes}",
                limit=self.max_content_bytes,
            )
        sender = ctx.user_id
        conversation_id = private_conversation_id(sender, recv_id)
        claimed = _require(data, "conversationId", str, optional=True)
        if claimed and claimed != conversation_id:
            raise HandlerError(ErrorCode.FORBIDDEN, "that conversation is not yours")
        if not ctx.frame.id:
            raise HandlerError(ErrorCode.BAD_REQUEST, "a chat message needs an id")
        stored, _created = await self._store(
            conversation_id=conversation_id,
            sender_id=sender,
            recv_id=recv_id,
            msg_id=ctx.frame.id,
            chat_type=chat_type,
            m_type=m_type,
            content=content,
            send_time=self.now_ms(),
        )
        await ctx.reply(
            {
                "conversationId": stored.conversation_id,
                "seq": stored.seq,
                "sendTime": stored.send_time,
                "msgId": stored.msg_id,
            }
        )
        # Pushed again on a resend too: the first push may never have gone out. Clients
        # drop what they already have by (conversationId, seq).
        await ctx.server.send_to_users([recv_id], PUSH_METHOD, stored.to_wire(), form_id=sender)

    async def _store(self, **fields: Any) -> tuple[StoredMessage, bool]:
        try:
            return await self.store.append(**fields)
        except StoreUnavailable as exc:
            self.logger.warning("store unavailable, message not stored: %s", exc)
            raise HandlerError(
                ErrorCode.STORE_UNAVAILABLE,
                "the message store is unavailable; nothing was stored; resend with the same id",
            ) from None
        except ValueError as exc:
            raise HandlerError(ErrorCode.BAD_REQUEST, str(exc)) from None

    async def _member(self, ctx: Context, conversation_id: Any) -> str:
        if not isinstance(conversation_id, str) or not conversation_id:
            raise HandlerError(ErrorCode.BAD_REQUEST, "'conversationId' must be a string")
        try:
            members = conversation_members(conversation_id)
        except ValueError:
            members = ("", "")
        if ctx.user_id not in members:
            raise HandlerError(ErrorCode.FORBIDDEN, "you are not a member of that conversation")
        return conversation_id

    async def sync(self, ctx: Context) -> None:
        """``conversation.sync``: pull what follows each given seq, paged."""
        data = ctx.data
        if not isinstance(data, dict):
            raise HandlerError(ErrorCode.BAD_REQUEST, "data must be {conversationId: lastSeq}")
        wanted = {k: v for k, v in data.items() if k != "limit"}
        if len(wanted) > _MAX_SYNC_CONVERSATIONS:
            raise HandlerError(ErrorCode.TOO_LARGE, "too many conversations in one sync")
        limit = data.get("limit", self.page_size)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise HandlerError(ErrorCode.BAD_REQUEST, "'limit' must be a positive integer")
        limit = min(limit, self.page_size)
        messages: dict[str, list[dict[str, Any]]] = {}
        more: dict[str, bool] = {}
        for conversation_id, last_seq in wanted.items():
            await self._member(ctx, conversation_id)
            if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
                raise HandlerError(ErrorCode.BAD_REQUEST, "each lastSeq must be an integer >= 0")
            page = await self._read(
                self.store.read_after(conversation_id, last_seq, limit=limit + 1)
            )
            more[conversation_id] = len(page) > limit
            messages[conversation_id] = [m.to_wire() for m in page[:limit]]
        await ctx.reply({"messages": messages, "hasMore": more})

    async def _read(self, call: Any) -> Any:
        try:
            return await call
        except StoreUnavailable:
            raise HandlerError(
                ErrorCode.STORE_UNAVAILABLE, "the message store is unavailable; try again"
            ) from None
        except (StoreError, ValueError) as exc:
            raise HandlerError(ErrorCode.BAD_REQUEST, str(exc)) from None

    async def get_chat_log(self, ctx: Context) -> None:
        """``conversation.getChatLog``: history by seq or time range, paged."""
        data = ctx.data if isinstance(ctx.data, dict) else {}
        conversation_id = await self._member(ctx, data.get("conversationId"))
        count = _require(data, "count", int, optional=True) or 100
        page = await self._read(
            self.store.history(
                conversation_id,
                start_seq=_require(data, "startSeq", int, optional=True),
                end_seq=_require(data, "endSeq", int, optional=True),
                start_time=_require(data, "startSendTime", int, optional=True),
                end_time=_require(data, "endSendTime", int, optional=True),
                limit=max(1, min(count, self.page_size)),
                descending=bool(data.get("descending", False)),
            )
        )
        await ctx.reply({"list": [m.to_wire() for m in page]})

    async def mark_chat(self, ctx: Context) -> None:
        """``conversation.markChat``: move the read watermark, tell the other side."""
        data = ctx.data if isinstance(ctx.data, dict) else {}
        conversation_id = await self._member(ctx, data.get("conversationId"))
        seq = _require(data, "seq", int)
        read = await self._read(self.store.set_read(ctx.user_id, conversation_id, max(seq, 0)))
        await ctx.reply({"conversationId": conversation_id, "readSeq": read})
        a, b = conversation_members(conversation_id)
        peer = b if a == ctx.user_id else a
        await ctx.server.send_to_users(
            [peer],
            READ_METHOD,
            {"conversationId": conversation_id, "userId": ctx.user_id, "readSeq": read},
            form_id=ctx.user_id,
        )

    async def list_conversations(self, ctx: Context) -> None:
        """``conversation.list``: the caller's conversations with unread counts."""
        summaries = await self._read(self.store.conversations(ctx.user_id))
        await ctx.reply(
            {
                "list": [
                    {
                        "conversationId": s.conversation_id,
                        "peerId": s.peer_id,
                        "lastSeq": s.last_seq,
                        "readSeq": s.read_seq,
                        "unread": s.unread,
                        "lastMessage": s.last_message.to_wire() if s.last_message else None,
                    }
                    for s in summaries
                ]
            }
        )

    async def online(self, ctx: Context) -> None:
        """``user.online``: which of the caller's conversation peers are online."""
        data = ctx.data if isinstance(ctx.data, dict) else {}
        summaries = await self._read(self.store.conversations(ctx.user_id))
        peers = {s.peer_id for s in summaries}
        asked = data.get("userIds")
        if isinstance(asked, list):
            peers &= {u for u in asked if isinstance(u, str)}
        online = await ctx.server.online(sorted(peers))
        await ctx.reply({"online": sorted(online)})

    # ------------------------------------------------------------------ delivery
    async def catch_up(self, session: Session, server: ServerAPI) -> None:
        """On connect: push everything above the device's watermarks, oldest first, then
        release the live pushes held meanwhile (skipping those the catch-up covered)."""
        user, device = session.user_id, session.device_id
        covered: dict[str, int] = {}
        after: tuple[str, int] | None = None
        while True:
            try:
                page = await self.store.pending(user, device, limit=self.page_size, after=after)
            except StoreError as exc:
                self.logger.warning("catch-up for %r stopped: %s", user, exc)
                break
            for message in page:
                await session.push(PUSH_METHOD, message.to_wire(), form_id=message.sender_id)
                covered[message.conversation_id] = message.seq
            if len(page) < self.page_size:
                break
            after = (page[-1].conversation_id, page[-1].seq)

        def keep(frame: Frame) -> bool:
            if frame.method != PUSH_METHOD or not isinstance(frame.data, dict):
                return True
            seq = frame.data.get("seq")
            conversation = frame.data.get("conversationId")
            return not (isinstance(seq, int) and seq <= covered.get(str(conversation), 0))

        await session.release(keep)

    async def delivered(self, session: Session, frame: Frame) -> None:
        """A device acknowledged a push: advance its delivered watermark contiguously."""
        if frame.method != PUSH_METHOD or not isinstance(frame.data, dict):
            return
        conversation = frame.data.get("conversationId")
        seq = frame.data.get("seq")
        if not isinstance(conversation, str) or not isinstance(seq, int):
            return
        key = (session.user_id, session.device_id)
        marks = self._marks.get(key)
        if marks is None:
            marks = self._marks[key] = _Watermarks()
        if conversation not in marks.level:
            marks.level[conversation] = await self._read_mark(key, conversation)
        level = marks.level[conversation]
        if seq <= level:
            return
        acked = marks.acked.setdefault(conversation, set())
        acked.add(seq)
        while level + 1 in acked:
            level += 1
            acked.discard(level)
        if level == marks.level[conversation]:
            return
        marks.level[conversation] = level
        await self._write_mark(key, conversation, marks)

    async def _read_mark(self, key: tuple[str, str], conversation: str) -> int:
        try:
            return await self.store.get_delivered(key[0], key[1], conversation)
        except StoreError:
            return 0

    async def _write_mark(
        self, key: tuple[str, str], conversation: str, marks: _Watermarks
    ) -> None:
        # One writer per watermark: acks arriving meanwhile only raise the target.
        if conversation in marks.writing:
            return
        marks.writing.add(conversation)
        try:
            written = -1
            while written < marks.level[conversation]:
                target = marks.level[conversation]
                try:
                    await self.store.set_delivered(key[0], key[1], conversation, target)
                except StoreError as exc:
                    self.logger.warning("could not save a delivered watermark: %s", exc)
                    return  # the messages stay pending and come again: never lost
                written = target
        finally:
            marks.writing.discard(conversation)

    async def disconnected(self, session: Session, server: ServerAPI) -> None:
        """Forget the device's in-memory acks when its last connection is gone."""
        if not server.sessions(session.user_id):
            key = (session.user_id, session.device_id)
            marks = self._marks.get(key)
            if marks is not None and not any(marks.writing):
                del self._marks[key]
