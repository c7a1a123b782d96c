"""Private (1:1) chat and offline delivery, built on imkit's public API.

:class:`ChatService` installs easy-chat's routes on an :class:`~imkit.App` (payloads and
answers in ``docs/chat.md``):

``conversation.chat``
    ``{conversationId?, chatType: 2, recvId, msgId?, msg: {mType, content}}``. The server
    derives the conversation id from the two users, stores the message once (idempotent
    on sender and message id: ``msgId`` from the data, else the frame's id), answers the
    sender with ``{conversationId, seq, sendTime, msgId}`` and pushes the stored message
    (method ``push``) to the recipient's connections, and in ``"multi"`` login mode to the
    sender's too.
``conversation.sync``
    ``{conversationId: lastSeq, ..., limit?}`` → ``{messages: {id: [...]}, hasMore: {id: bool}}``.
``conversation.getChatLog``
    ``{conversationId, startSeq?, endSeq?, startSendTime?, endSendTime?, count?,
    descending?}`` → ``{list: [...], hasMore}``, members only.
``conversation.markChat``
    ``{conversationId, seq}`` → ``{conversationId, readSeq}``; the other member gets a
    ``conversation.read`` push ``{conversationId, userId, readSeq}``.
``conversation.list``
    → ``{list: [{conversationId, peerId, lastSeq, readSeq, unread, lastMessage}]}``.
``user.online``
    ``{userIds?: [...]}`` → ``{online: [...]}``, limited to the caller's conversation
    peers, so it never lists the whole directory.

Delivery. Each device (user id + device id) has, per conversation, a *delivered
watermark*: every message up to it was either acknowledged by the device (a ``push``, the
answer to its own ``conversation.chat``, or a ``conversation.sync`` answer carrying it) or
sent by the device's own user. Acks move it contiguously in memory; it is written to the
store every ``flush_every`` messages, when the device has acked all it was sent (at most
once per ``watermark_interval`` seconds while the acks keep coming: a busy conversation
costs one write per interval, not one per message), and when the device disconnects or
the server stops. A crash loses at most ``flush_every`` acknowledged messages per
conversation from the store: those are pushed again, and clients drop what they have.
When a device connects, the messages above it are pushed oldest first, paced by the ack
window, while live pushes for the device are held; the held ones the catch-up already
covered are dropped and the rest follow, so the stream a device sees rises. A NoAck server
has no acks: there a push counts as delivered once it is handed to the connection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import anyio

from imkit.chat.ids import conversation_members, private_conversation_id
from imkit.chat.store import MessageStore, QueuedAppend, StoredMessage
from imkit.core.ack import AckMode
from imkit.core.frames import ErrorCode, Frame
from imkit.core.server import App, Context, Deferred, LoginPolicy, ServerAPI, Session
from imkit.exceptions import HandlerError, StoreError, StoreUnavailable

__all__ = (
    "CHAT_METHOD",
    "CHAT_TYPE_PRIVATE",
    "DEFAULT_CATCH_UP_PAGE",
    "DEFAULT_FLUSH_EVERY",
    "DEFAULT_HANDOVER_TIMEOUT",
    "DEFAULT_MAX_CONTENT_BYTES",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_WATERMARK_INTERVAL",
    "PUSH_METHOD",
    "READ_METHOD",
    "SYNC_METHOD",
    "ChatService",
)

CHAT_TYPE_PRIVATE = 2
CHAT_METHOD = "conversation.chat"
SYNC_METHOD = "conversation.sync"
PUSH_METHOD = "push"
READ_METHOD = "conversation.read"
# Precedent: CASES.md §C23 (a 64 KB IM limit under the 1 MiB WebSocket limit).
DEFAULT_MAX_CONTENT_BYTES = 64 * 1024
DEFAULT_PAGE_SIZE = 200
# Messages the catch-up reads from the store at a time (one query each).
DEFAULT_CATCH_UP_PAGE = 1000
# Acked messages a watermark may run ahead of the store (what a crash may push again).
DEFAULT_FLUSH_EVERY = 64
# A device that keeps acknowledging everything it was sent has its watermark written at
# most once per this many seconds (and every DEFAULT_FLUSH_EVERY messages).
DEFAULT_WATERMARK_INTERVAL = 1.0
# How long a new connection waits for the device's previous one to finish closing.
DEFAULT_HANDOVER_TIMEOUT = 2.0
_MAX_SYNC_CONVERSATIONS = 100
_MAX_LOST_REPLIES = 256
_LOST_REPLY_TTL_MS = 300_000  # the ack machines' default ``remember_for``
_MAX_ID_CHARS = 256
_MAX_PAIRS = 65_536  # conversation ids remembered by (sender, recipient), then forgotten
# A push nobody acknowledged within the ack timeout: close, so the catch-up repairs it.
_CLOSE_UNACKED = 1011

Key = tuple[str, str]
"""A device: ``(user_id, device_id)``."""


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


def _queued_appends(store: MessageStore) -> QueuedAppend | None:
    """``store`` if its appends can be queued in call order (:class:`QueuedAppend`) and its
    ``append`` and ``append_nowait`` come from the same class: a subclass that changes
    ``append`` alone (a fault injector, a metrics wrapper) is called through ``append``."""
    if not isinstance(store, QueuedAppend):
        return None
    mro = type(store).__mro__
    append = next((c for c in mro if "append" in vars(c)), None)
    nowait = next((c for c in mro if "append_nowait" in vars(c)), None)
    return store if append is nowait else None


def _private(chat_type: int) -> int:
    if chat_type != CHAT_TYPE_PRIVATE:
        raise HandlerError(ErrorCode.BAD_REQUEST, "only private chat (chatType 2) is supported")
    return chat_type


def _user_id(value: str, name: str) -> str:
    if not value or "\x00" in value or len(value) > _MAX_ID_CHARS:
        raise HandlerError(
            ErrorCode.BAD_REQUEST, f"{name!r} must be 1 to {_MAX_ID_CHARS} characters, no NUL"
        )
    return value


def _carried(frame: Frame, user_id: str) -> list[tuple[str, int, bool]]:
    """``(conversation_id, seq, sent_by_user)`` of each stored message an acked frame carried."""
    data = frame.data
    if not isinstance(data, dict):
        return []
    if frame.method == PUSH_METHOD or (frame.method == CHAT_METHOD and frame.reply_to):
        conversation, seq = data.get("conversationId"), data.get("seq")
        own = frame.method == CHAT_METHOD or data.get("sendId") == user_id
        if isinstance(conversation, str) and isinstance(seq, int) and seq > 0:
            return [(conversation, seq, own)]
    elif frame.method == SYNC_METHOD and frame.reply_to:
        pages = data.get("messages")
        if isinstance(pages, dict):
            return [
                (conversation, message["seq"], message.get("sendId") == user_id)
                for conversation, page in pages.items()
                if isinstance(page, list)
                for message in page
                if isinstance(message, dict) and isinstance(message.get("seq"), int)
            ]
    return []


@runtime_checkable
class _Replier(Protocol):
    """A session that can send an answer (``replyTo``) outside a handler."""

    def send_now(
        self,
        method: str,
        data: Any,
        *,
        message_id: str | None = None,
        form_id: str = "",
        reply_to: str = "",
        acked: bool = True,
    ) -> Frame: ...


class _Device:
    """What the service remembers of one device while it is connected.

    Per conversation: ``level`` (the watermark), ``written`` (what the store has),
    ``written_at`` (when, on the service's monotonic clock), ``acked`` (acked seqs above a
    hole), ``own`` / ``peer`` (seqs above the watermark known
    to be sent by the device's user, or by the peer), ``expect`` (the highest seq this node
    has sent the device), ``dirty`` (watermarks that passed a peer's message since they
    were last written: only those matter to :meth:`MessageStore.pending`), ``writing``
    (watermarks being written now: none is due again until that write is done),
    ``queued`` (a write found due and handed to :meth:`ChatService._advance_slow`, which
    has not run yet: the acks read meanwhile queue no other).
    """

    __slots__ = (
        "acked",
        "changed",
        "dirty",
        "expect",
        "level",
        "live",
        "lock",
        "members",
        "own",
        "peer",
        "queued",
        "sessions",
        "writing",
        "written",
        "written_at",
    )

    def __init__(self) -> None:
        self.level: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.written_at: dict[str, float] = {}
        self.acked: dict[str, set[int]] = {}
        self.own: dict[str, set[int]] = {}
        self.peer: dict[str, set[int]] = {}
        self.expect: dict[str, int] = {}
        self.dirty: set[str] = set()
        self.writing: set[str] = set()
        self.queued: set[str] = set()
        self.members: set[str] = set()
        self.sessions: set[str] = set()
        self.live: set[str] = set()
        self.lock = anyio.Lock()
        self.changed = anyio.Event()

    def notify(self) -> None:
        """Wake whoever waits for a session of this device to finish."""
        self.changed.set()
        self.changed = anyio.Event()


class ChatService:
    """Private chat with offline delivery on a :class:`~imkit.chat.store.MessageStore`.

    ``install(app)`` registers the routes and hooks. ``now_ms`` gives the server time in
    milliseconds since the epoch (tests pass a fake one). ``echo_to_sender`` pushes each
    message to the sender's connections too (its other devices); by default it is on
    exactly when the app's login policy is ``"multi"``. ``page_size`` caps what one
    ``conversation.sync`` or ``getChatLog`` answer carries per conversation;
    ``catch_up_page`` is how many messages the catch-up reads from the store at a time.
    ``flush_every`` and ``watermark_interval`` say when delivered watermarks are written
    (see the module doc; ``watermark_interval=0`` writes as soon as the device has acked
    all it was sent); ``monotonic`` is the clock for that interval.
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
        page_size: int = DEFAULT_PAGE_SIZE,
        catch_up_page: int = DEFAULT_CATCH_UP_PAGE,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        handover_timeout: float = DEFAULT_HANDOVER_TIMEOUT,
        watermark_interval: float = DEFAULT_WATERMARK_INTERVAL,
        echo_to_sender: bool | None = None,
        now_ms: Callable[[], int] = _now_ms,
        monotonic: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_content_bytes < 0 or min(page_size, catch_up_page, flush_every) < 1:
            raise ValueError(
                "max_content_bytes >= 0; page_size, catch_up_page and flush_every >= 1"
            )
        if not watermark_interval >= 0:
            raise ValueError("watermark_interval must be >= 0")
        self.store = store
        self.max_content_bytes = max_content_bytes
        self.page_size = page_size
        self.catch_up_page = catch_up_page
        self.flush_every = flush_every
        self.watermark_interval = watermark_interval
        self.monotonic = monotonic
        self.handover_timeout = handover_timeout
        self.echo_to_sender = echo_to_sender
        self.now_ms = now_ms
        self.logger = logger or logging.getLogger("imkit.chat")
        self.no_ack = False
        self._devices: dict[Key, _Device] = {}
        self._lost: OrderedDict[Key, OrderedDict[str, tuple[int, Any]]] = OrderedDict()
        # A store that queues appends and reports them in call order: each message is
        # answered from its callback (Context.defer), not from a task kept waiting.
        self._queued = _queued_appends(store)
        self._pairs: dict[tuple[str, str], str] = {}  # (sender, recipient): conversation id

    def install(self, app: App) -> None:
        """Register the chat routes and the delivery hooks on ``app``."""
        self.no_ack = app.ack_mode is AckMode.NONE
        if self.echo_to_sender is None:
            self.echo_to_sender = app.login_policy is LoginPolicy.MULTI
        app.route(CHAT_METHOD)(self.chat)
        app.route(SYNC_METHOD)(self.sync)
        app.route("conversation.getChatLog")(self.get_chat_log)
        app.route("conversation.markChat")(self.mark_chat)
        app.route("conversation.list")(self.list_conversations)
        app.route("user.online")(self.online)
        app.on_connect(self.catch_up)
        app.on_delivered(self.delivered)
        app.on_delivery_failed(self.delivery_failed)
        app.on_disconnect(self.disconnected)
        app.on_startup(self._open)
        app.on_shutdown(self._close)

    async def _open(self, server: ServerAPI) -> None:
        await self.store.open()

    async def _close(self, server: ServerAPI) -> None:
        for key, device in list(self._devices.items()):
            await self._flush(key, device)
        await self.store.close()

    # ------------------------------------------------------------------ routes
    async def chat(self, ctx: Context) -> None:
        """``conversation.chat``: store once, answer the sender, push to the recipient."""
        data = ctx.data
        # The fields of a well-formed message in one test; any other goes through
        # _require, which says what is wrong.
        if not (
            type(data) is dict
            and type(chat_type := data.get("chatType")) is int
            and chat_type == CHAT_TYPE_PRIVATE
            and type(recv_id := data.get("recvId")) is str
            and type(msg := data.get("msg")) is dict
            and type(content := msg.get("content")) is str
            and type(m_type := msg.get("mType", 0)) is int
        ):
            chat_type = _private(_require(data, "chatType", int))
            recv_id = _require(data, "recvId", str)
            msg = _require(data, "msg", dict)
            content = _require(msg, "content", str)
            m_type = _require(msg, "mType", int, optional=True) or 0
        _user_id(recv_id, "recvId")
        if content.isascii():
            size = len(content)
        else:
            try:
                size = len(content.encode("utf-8"))
            except UnicodeEncodeError:
                raise HandlerError(
                    ErrorCode.BAD_REQUEST, "'content' is not valid Unicode"
                ) from None
        if size > self.max_content_bytes:
            raise HandlerError(
                ErrorCode.TOO_LARGE,
                f"content is {size} bytes; the limit is {self.max_content_bytes}",
                limit=self.max_content_bytes,
            )
        sender = ctx.user_id  # never a field of the data: the authenticated identity
        pair = (sender, recv_id)
        conversation_id = self._pairs.get(pair)
        if conversation_id is None:  # made once per pair (the id's escaping is not free)
            if len(self._pairs) >= _MAX_PAIRS:
                self._pairs.clear()
            conversation_id = self._pairs[pair] = private_conversation_id(sender, recv_id)
        # (Optional strings: _require says what is wrong with anything else.)
        claimed = data.get("conversationId")
        if claimed is not None and type(claimed) is not str:
            claimed = _require(data, "conversationId", str, optional=True)
        if claimed and claimed != conversation_id:
            raise HandlerError(ErrorCode.FORBIDDEN, "that conversation is not yours")
        given_id = data.get("msgId")
        if given_id is not None and type(given_id) is not str:
            given_id = _require(data, "msgId", str, optional=True)
        msg_id = given_id or ctx.frame.id
        if not msg_id or len(msg_id) > _MAX_ID_CHARS:
            raise HandlerError(ErrorCode.BAD_REQUEST, "a chat message needs an id (msgId)")
        send_time = self.now_ms()
        # A store that queues appends takes this one now, behind this connection's
        # earlier ones (its seq follows theirs), and answers in call order: the handler
        # returns, the next message starts, and the store's callback answers and pushes
        # (the answers and pushes of one commit go out together). On one node only:
        # pushes forwarded to other nodes must keep the order, which awaiting them one
        # message at a time does. Any other store is called through append, one message
        # of the connection at a time.
        queued = self._queued
        if queued is not None and ctx.server.single_node:
            deferred = ctx.defer()
            if deferred is not None:
                done = functools.partial(self._stored, ctx, deferred, recv_id, given_id)
                queued.append_nowait(
                    conversation_id=conversation_id,
                    sender_id=sender,
                    recv_id=recv_id,
                    msg_id=msg_id,
                    chat_type=chat_type,
                    m_type=m_type,
                    content=content,
                    send_time=send_time,
                    done=done,
                )
                return
        stored, _created = await self._store(
            self.store.append(
                conversation_id=conversation_id,
                sender_id=sender,
                recv_id=recv_id,
                msg_id=msg_id,
                chat_type=chat_type,
                m_type=m_type,
                content=content,
                send_time=send_time,
            )
        )
        # A client that names its message (msgId) resends it under that id until answered
        # (ChatClient, the page): its answer needs no ack, and a lost one is asked again.
        # Without msgId the frame id names it: the answer is acked, replayed if lost.
        acked = not given_id
        await ctx.reply(self._answer(ctx, stored), acked=acked)
        await _run_steps(self._deliver(ctx, stored, recv_id, acked))

    def _stored(
        self,
        ctx: Context,
        deferred: Deferred,
        recv_id: str,
        given_id: str | None,
        result: tuple[StoredMessage, bool] | None,
        error: BaseException | None,
    ) -> None:
        """The store's callback for a deferred chat message: answer, push, end it."""
        if result is None:
            deferred.fail(_store_failure(self.logger, error))
            deferred.end()
            return
        stored = result[0]
        acked = not given_id  # as in chat()
        try:
            deferred.reply(self._answer(ctx, stored), acked=acked)
            steps = self._deliver(ctx, stored, recv_id, acked)
        except Exception as exc:  # noqa: BLE001 - answered as a handler's failure
            deferred.fail(exc)
            steps = []
        deferred.end(functools.partial(_run_steps, steps) if steps else None)

    def _answer(self, ctx: Context, stored: StoredMessage) -> dict[str, Any]:
        """The answer to the sender of a stored chat message; notes its seq as the
        sender's own on each of the sender's devices here."""
        sender, conversation_id, seq = ctx.user_id, stored.conversation_id, stored.seq
        devices = self._devices
        for other in ctx.server.sessions(sender):  # for each device here, a seq to skip
            device = devices.get((sender, other.device_id))
            if device is not None:
                own = device.own.get(conversation_id)
                if own is None:
                    own = device.own[conversation_id] = set()
                own.add(seq)
        return {
            "conversationId": conversation_id,
            "seq": seq,
            "sendTime": stored.send_time,
            "msgId": stored.msg_id,
        }

    def _deliver(
        self, ctx: Context, stored: StoredMessage, recv_id: str, acked: bool
    ) -> list[_Step]:
        """After the answer: advance the sending device past its message when the answer
        carried it (NoAck, or an answer that needs no ack: a client that names its
        message resends it under that name until answered); push the message to this
        node's connections of its recipients. What must await (a watermark to write, the
        other nodes to reach) comes back as steps, to run in order."""
        sender, session = ctx.user_id, ctx.session
        conversation, seq = stored.conversation_id, stored.seq
        steps: list[_Step] = []
        if self.no_ack or not acked:
            self._advance_one_later(steps, (sender, session.device_id), conversation, seq, True)
        # Pushed again on a resend too: the first push may never have gone out. Clients
        # drop what they already have by (conversationId, seq).
        users = [recv_id] if recv_id == sender or not self.echo_to_sender else [recv_id, sender]
        server = ctx.server
        skip = session.epoch
        live: list[Key] = []
        for user in users:
            for other in server.sessions(user):
                device = self._devices.get((user, other.device_id))
                if device is None:
                    continue
                device.expect[conversation] = max(device.expect.get(conversation, 0), seq)
                if self.no_ack and other.epoch in device.live and other.epoch != skip:
                    live.append((user, other.device_id))
        wire = stored.to_wire()
        server.push_here(users, PUSH_METHOD, wire, form_id=sender)
        if not server.single_node:
            forward = server.send_to_users
            steps.append(
                functools.partial(forward, users, PUSH_METHOD, wire, form_id=sender, here=False)
            )
        for key in live:  # NoAck: handed to the connection counts as delivered
            self._advance_one_later(steps, key, conversation, seq, key[0] == sender)
        return steps

    def _advance_later(
        self, steps: list[_Step], key: Key, conversation: str, seqs: Iterable[tuple[int, bool]]
    ) -> None:
        """:meth:`_advance` without awaiting: what needs the store is added to ``steps``."""
        rest = self._advance_now(key, conversation, seqs)
        if rest is not None:
            steps.append(functools.partial(self._advance_slow, key, conversation, rest))

    def _advance_one_later(
        self, steps: list[_Step], key: Key, conversation: str, seq: int, is_own: bool
    ) -> None:
        """:meth:`_advance_later` for one seq (through :meth:`_advance_one`)."""
        rest = self._advance_one(key, conversation, seq, is_own)
        if rest is not None:
            steps.append(functools.partial(self._advance_slow, key, conversation, rest))

    async def _store(
        self, append: Awaitable[tuple[StoredMessage, bool]]
    ) -> tuple[StoredMessage, bool]:
        """Await a :meth:`MessageStore.append` call; its failures as :class:`HandlerError`."""
        try:
            return await append
        except (StoreError, ValueError, TypeError) as exc:
            raise _store_failure(self.logger, exc) from None

    @staticmethod
    def _member(ctx: Context, conversation_id: Any) -> str:
        if not isinstance(conversation_id, str) or not conversation_id:
            raise HandlerError(ErrorCode.BAD_REQUEST, "'conversationId' must be a string")
        try:
            members = conversation_members(conversation_id)
        except ValueError:
            members = ("", "")
        if ctx.user_id not in members:
            raise HandlerError(ErrorCode.FORBIDDEN, "you are not a member of that conversation")
        return conversation_id

    async def _read(self, call: Any) -> Any:
        try:
            return await call
        except StoreError as exc:
            self.logger.warning("the store failed a read: %s", exc)
            raise HandlerError(
                ErrorCode.STORE_UNAVAILABLE, "the message store is unavailable; try again"
            ) from None
        except (ValueError, TypeError) as exc:
            raise HandlerError(ErrorCode.BAD_REQUEST, str(exc)) from None

    async def sync(self, ctx: Context) -> None:
        """``conversation.sync``: pull what follows each given seq, paged."""
        data = ctx.data
        if not isinstance(data, dict):
            raise HandlerError(ErrorCode.BAD_REQUEST, "data must be {conversationId: lastSeq}")
        wanted = {k: v for k, v in data.items() if k != "limit"}
        if len(wanted) > _MAX_SYNC_CONVERSATIONS:
            raise HandlerError(
                ErrorCode.TOO_LARGE,
                f"at most {_MAX_SYNC_CONVERSATIONS} conversations in one sync",
                limit=_MAX_SYNC_CONVERSATIONS,
            )
        limit = data.get("limit", self.page_size)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise HandlerError(ErrorCode.BAD_REQUEST, "'limit' must be a positive integer")
        limit = min(limit, self.page_size)
        for conversation_id, last_seq in wanted.items():  # check everything before reading
            self._member(ctx, conversation_id)
            if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
                raise HandlerError(ErrorCode.BAD_REQUEST, "each lastSeq must be an integer >= 0")
        messages: dict[str, list[dict[str, Any]]] = {}
        more: dict[str, bool] = {}
        for conversation_id, last_seq in wanted.items():
            page = await self._read(
                self.store.read_after(conversation_id, last_seq, limit=limit + 1)
            )
            more[conversation_id] = len(page) > limit
            messages[conversation_id] = [m.to_wire() for m in page[:limit]]
        await ctx.reply({"messages": messages, "hasMore": more})

    async def get_chat_log(self, ctx: Context) -> None:
        """``conversation.getChatLog``: history by seq or time range, paged."""
        data = ctx.data if isinstance(ctx.data, dict) else {}
        conversation_id = self._member(ctx, data.get("conversationId"))
        count = _require(data, "count", int, optional=True) or 100
        limit = max(1, min(count, self.page_size))
        descending = data.get("descending", False)
        if not isinstance(descending, bool):
            raise HandlerError(ErrorCode.BAD_REQUEST, "'descending' must be a boolean")
        page = await self._read(
            self.store.history(
                conversation_id,
                start_seq=_require(data, "startSeq", int, optional=True),
                end_seq=_require(data, "endSeq", int, optional=True),
                start_time=_require(data, "startSendTime", int, optional=True),
                end_time=_require(data, "endSendTime", int, optional=True),
                limit=limit + 1,
                descending=descending,
            )
        )
        await ctx.reply({"list": [m.to_wire() for m in page[:limit]], "hasMore": len(page) > limit})

    async def mark_chat(self, ctx: Context) -> None:
        """``conversation.markChat``: move the read watermark, tell the other side."""
        data = ctx.data if isinstance(ctx.data, dict) else {}
        conversation_id = self._member(ctx, data.get("conversationId"))
        seq = _require(data, "seq", int)
        read = await self._read(self.store.set_read(ctx.user_id, conversation_id, max(seq, 0)))
        await ctx.reply({"conversationId": conversation_id, "readSeq": read})
        a, b = conversation_members(conversation_id)
        peer = b if a == ctx.user_id else a
        users = [peer] if peer == ctx.user_id or not self.echo_to_sender else [peer, ctx.user_id]
        await ctx.server.send_to_users(
            users,
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
        peers = {s.peer_id for s in summaries} - {ctx.user_id}
        asked = data.get("userIds")
        if isinstance(asked, list):
            peers &= {u for u in asked if isinstance(u, str)}
        online = await ctx.server.online(sorted(peers))
        await ctx.reply({"online": sorted(online)})

    # ------------------------------------------------------------------ catch-up
    async def catch_up(self, session: Session, server: ServerAPI) -> None:
        """On connect: push everything above the device's watermarks, oldest first, then
        release the live pushes held meanwhile (dropping those the catch-up covered)."""
        key = (session.user_id, session.device_id)
        device = self._devices.get(key)
        if device is None:
            device = self._devices[key] = _Device()
        with anyio.move_on_after(self.handover_timeout):
            while device.sessions - {session.epoch}:  # the previous connection is closing
                await device.changed.wait()
        if device.sessions:  # gave up waiting: forget connections the server no longer has
            device.sessions &= {s.epoch for s in server.sessions(key[0])}
        device.sessions.add(session.epoch)
        await self._flush(key, device)
        self._replay(key, session)
        covered: dict[str, int] = {}
        after: tuple[str, int] | None = None
        levels, acks, expect = device.level, device.acked, device.expect
        push, limit = session.push, self.catch_up_page
        while getattr(session, "is_open", True):
            try:
                page = await self.store.pending(key[0], key[1], limit=limit, after=after)
            except (StoreError, ValueError) as exc:
                self.logger.warning("catch-up for %r stopped (sent later): %s", key[0], exc)
                break
            for conversation in dict.fromkeys(message.conversation_id for message in page):
                if conversation not in levels:
                    # Its watermark is read before its first push, not at the first ack:
                    # else every ack read until that read is done would queue behind it.
                    async with _locked(device.lock):
                        await self._level(key, device, conversation)
            # The page goes out in order: as many as the window has room for at a time
            # (push_many, their bytes together), then one push that waits for room. A
            # message is looked at (has the device got it meanwhile?) only when it can go.
            taken: list[StoredMessage] = []
            items = _unseen(page, levels, acks, taken)
            while getattr(session, "is_open", True):
                session.push_many(PUSH_METHOD, items)
                await self._pushed(key, taken, covered, expect)
                if not getattr(session, "is_open", True):
                    break
                item = next(items, None)
                if item is None:
                    break
                await push(PUSH_METHOD, item[0], form_id=item[1])  # waits for room
                await self._pushed(key, taken, covered, expect)
            if len(page) < limit:
                break
            after = (page[-1].conversation_id, page[-1].seq)
        released: list[tuple[str, int, bool]] = []
        releasing = True

        def keep(frame: Frame) -> bool:
            if frame.method != PUSH_METHOD or not isinstance(frame.data, dict):
                return True
            seq, conversation = frame.data.get("seq"), frame.data.get("conversationId")
            if not isinstance(seq, int) or not isinstance(conversation, str):
                return True
            own = frame.data.get("sendId") == key[0]
            if not own and seq <= covered.get(conversation, 0):
                return False  # the catch-up sent it already
            if releasing:
                released.append((conversation, seq, own))
            return True

        # The filter stays on the session: a live push of a message this catch-up already
        # sent (stored just as the device connected) is dropped even after the release.
        # A catch-up that sent nothing leaves none (it would drop nothing, and under
        # OnlyAck / RigorAck note nothing): every later push skips it.
        if covered or self.no_ack:
            await session.release(keep)
        else:
            await session.release()
        releasing = False
        device.live.add(session.epoch)
        if self.no_ack:
            for conversation, seq, own in released:
                await self._advance(key, conversation, [(seq, own)])

    def _replay(self, key: Key, session: Session) -> None:
        """Send the device the chat answers its previous connection lost."""
        lost = self._lost.pop(key, None)
        if not lost or not isinstance(session, _Replier):
            return
        now = self.now_ms()
        for frame_id, (expires, data) in lost.items():
            if expires > now:
                session.send_now(CHAT_METHOD, data, reply_to=frame_id)

    # ------------------------------------------------------------------ watermarks
    def delivered(self, session: Session, frame: Frame) -> Awaitable[None] | None:
        """A device acknowledged a frame: advance its watermarks over what it carried.

        Called as the ack is read (a plain ``on_delivered`` hook): what needs no store is
        done at once; the rest (a watermark to read or write, a hole to read) comes back
        as a coroutine, which the connection awaits in order."""
        user = session.user_id
        key = (user, session.device_id)
        data, method = frame.data, frame.method
        # One message: a push, or the answer to the device's own chat (nearly every ack).
        if isinstance(data, dict) and (
            method == PUSH_METHOD or (method == CHAT_METHOD and frame.reply_to)
        ):
            conversation, seq = data.get("conversationId"), data.get("seq")
            if isinstance(conversation, str) and isinstance(seq, int) and seq > 0:
                if self._is_member(key, conversation):
                    own = method == CHAT_METHOD or data.get("sendId") == user
                    rest = self._advance_one(key, conversation, seq, own)
                    if rest is not None:
                        return self._advance_slow(key, conversation, rest)
            return None
        by_conversation: dict[str, list[tuple[int, bool]]] = {}
        for conversation, seq, own in _carried(frame, user):
            by_conversation.setdefault(conversation, []).append((seq, own))
        steps: list[_Step] = []
        for conversation, seqs in by_conversation.items():
            if self._is_member(key, conversation):
                self._advance_later(steps, key, conversation, seqs)
        return _run_steps(steps) if steps else None

    async def _pushed(
        self,
        key: Key,
        taken: list[StoredMessage],
        covered: dict[str, int],
        expect: dict[str, int],
    ) -> None:
        """Note the catch-up's pushes of ``taken`` (then empty it): the highest seq sent
        per conversation, in ``covered`` (the catch-up's) and ``expect`` (the device's);
        under NoAck, sent counts as delivered."""
        for message in taken:
            conversation, seq = message.conversation_id, message.seq
            covered[conversation] = seq
            if expect.get(conversation, 0) < seq:
                expect[conversation] = seq
            if self.no_ack:
                await self._advance(key, conversation, [(seq, False)])
        taken.clear()

    def _is_member(self, key: Key, conversation: str) -> bool:
        """Whether the device's user is a member of ``conversation`` (remembered per
        connected device: the id is parsed once, not on every ack)."""
        device = self._devices.get(key)
        if device is not None and conversation in device.members:
            return True
        if key[0] not in _members(conversation):
            return False
        if device is not None:
            device.members.add(conversation)
        return True

    async def delivery_failed(self, session: Session, frame: Frame, reason: str) -> None:
        """A frame was given up: keep a lost chat answer for the next connection; close a
        connection that let a push time out, so its catch-up sends the push again."""
        key = (session.user_id, session.device_id)
        if frame.method == CHAT_METHOD and frame.reply_to:
            lost = self._lost.setdefault(key, OrderedDict())
            lost[frame.reply_to] = (self.now_ms() + _LOST_REPLY_TTL_MS, frame.data)
            while len(lost) > _MAX_LOST_REPLIES:
                lost.popitem(last=False)
            self._lost.move_to_end(key)
            while len(self._lost) > 16 * _MAX_LOST_REPLIES:
                self._lost.popitem(last=False)
        elif frame.method == PUSH_METHOD and reason == "timeout":
            self.logger.info("a push to %r was not acknowledged in time; closing", key[0])
            await session.close(_CLOSE_UNACKED, "a push was not acknowledged in time; reconnect")

    async def _advance(self, key: Key, conversation: str, seqs: Iterable[tuple[int, bool]]) -> None:
        """Record that device ``key`` has the ``(seq, sent_by_its_user)`` of ``seqs``; raise
        its watermark over every contiguous seq it has or its user sent; write it when due:
        once the device has all this node sent it, or ``flush_every`` messages later."""
        rest = self._advance_now(key, conversation, seqs)
        if rest is not None:
            await self._advance_slow(key, conversation, rest)

    def _advance_now(
        self, key: Key, conversation: str, seqs: Iterable[tuple[int, bool]]
    ) -> Iterable[tuple[int, bool]] | None:
        """The part of :meth:`_advance` that needs no store: ``None`` when that was all,
        else the seqs :meth:`_advance_slow` must still note (maybe none)."""
        device = self._devices.get(key)
        if device is None:
            return None  # not connected here (any more): the store keeps the truth
        if device.lock.locked() or conversation not in device.level:
            return seqs
        # Nobody is reading the store for this device (a watermark, a hole), and its
        # watermark is known: note the seqs at once (no await, no checkpoint). Only a
        # hole to read (under the lock) or a watermark to write needs the store.
        level = self._note(device, conversation, device.level[conversation], seqs)
        # (Nearly always: nothing acked above a hole and nothing to write; both answered
        # without calling _hole or _due.)
        if device.acked.get(conversation) and self._hole(device, conversation, level):
            return ()
        if conversation in device.dirty and self._due(device, conversation, level):
            device.queued.add(conversation)
            return ()
        return None

    def _advance_one(
        self, key: Key, conversation: str, seq: int, is_own: bool
    ) -> Iterable[tuple[int, bool]] | None:
        """:meth:`_advance_now` for one seq (``is_own``: sent by the device's user).

        Nearly every call: the next seq of a conversation whose watermark is known, with
        nothing noted above the watermark but (for the sender's device) that seq as its
        own. That is done here in one call, with the outcome of :meth:`_note`'s loops (a
        test compares the two); anything else goes to :meth:`_advance_now`."""
        device = self._devices.get(key)
        if device is not None and not device.lock.locked():
            level = device.level.get(conversation)
            if (
                level is not None
                and not device.acked.get(conversation)
                and not device.peer.get(conversation)
            ):
                own = device.own.get(conversation)
                if not own:
                    if seq == level + 1:
                        device.level[conversation] = seq
                        if not is_own:
                            device.dirty.add(conversation)
                    elif seq > level:
                        return self._advance_now(key, conversation, ((seq, is_own),))
                elif seq == level + 1 and len(own) == 1 and seq in own:
                    own.clear()
                    device.level[conversation] = seq
                else:
                    return self._advance_now(key, conversation, ((seq, is_own),))
                # Noted, nothing acked above the watermark: () when a write is due.
                if conversation in device.dirty and self._due(
                    device, conversation, device.level[conversation]
                ):
                    device.queued.add(conversation)
                    return ()
                return None
        return self._advance_now(key, conversation, ((seq, is_own),))

    async def _advance_slow(
        self, key: Key, conversation: str, seqs: Iterable[tuple[int, bool]]
    ) -> None:
        """The part of :meth:`_advance` that needs the store: a watermark to read and a
        hole to climb under the device's lock, then a watermark write after it (acks
        read meanwhile are noted at once, not queued behind the write)."""
        device = self._devices.get(key)
        if device is None:
            return
        device.queued.discard(conversation)  # (this is the run a due write was queued for)
        async with _locked(device.lock):
            level = await self._level(key, device, conversation)
            level = self._note(device, conversation, level, seqs)
            if self._hole(device, conversation, level):
                level = await self._climb(key, device, conversation, level)
            if not self._due(device, conversation, level):
                return
        await self._write(key, device, conversation)

    @staticmethod
    def _note(
        device: _Device, conversation: str, level: int, seqs: Iterable[tuple[int, bool]]
    ) -> int:
        """Add ``seqs`` to what the device has, raise its watermark over the contiguous
        ones (without the store), and return the new watermark. ``level`` is the
        device's watermark in ``conversation``."""
        acked = device.acked.get(conversation)
        own = device.own.get(conversation)
        peer = device.peer.get(conversation)
        if acked is None:
            acked = device.acked[conversation] = set()
        if own is None:
            own = device.own[conversation] = set()
        for seq, is_own in seqs:
            if seq > level:
                (own if is_own else acked).add(seq)
        if peer and acked:
            peer.difference_update(acked)
        passed_peer = False
        while level + 1 in acked or level + 1 in own:
            level += 1
            if level in own:
                own.discard(level)
                acked.discard(level)
            else:
                passed_peer = True
                acked.discard(level)
        for seen in (own, peer):
            if seen:
                seen.difference_update([s for s in seen if s <= level])
        device.level[conversation] = level
        if passed_peer:
            device.dirty.add(conversation)
        return level

    @staticmethod
    def _hole(device: _Device, conversation: str, level: int) -> bool:
        """Whether acked seqs wait above a hole whose next seq is not known to be the
        peer's (who sent it must be read from the store)."""
        return bool(device.acked.get(conversation)) and level + 1 not in device.peer.get(
            conversation, ()
        )

    def _due(self, device: _Device, conversation: str, level: int) -> bool:
        """Whether the watermark must be written now: ``flush_every`` acked messages ahead
        of the store, or everything sent acked and the last write ``watermark_interval``
        ago (otherwise a later ack, the disconnect or the shutdown writes it)."""
        if (
            conversation not in device.dirty
            or conversation in device.writing
            or conversation in device.queued
        ):
            return False
        if level - device.written.get(conversation, 0) >= self.flush_every:
            return True
        if level < device.expect.get(conversation, 0):
            return False
        interval = self.watermark_interval
        if not interval:
            return True
        last = device.written_at.get(conversation)
        return last is None or self.monotonic() - last >= interval

    async def _level(self, key: Key, device: _Device, conversation: str) -> int:
        if conversation not in device.level:
            try:
                level = await self.store.get_delivered(key[0], key[1], conversation)
            except (StoreError, ValueError) as exc:
                self.logger.warning("could not read a delivered watermark: %s", exc)
                level = 0
            device.level.setdefault(conversation, level)
            device.written.setdefault(conversation, level)
        return device.level[conversation]

    async def _climb(self, key: Key, device: _Device, conversation: str, level: int) -> int:
        """Read who sent the seqs of the hole above ``level`` from the store, and raise the
        watermark over those the device's user sent (and what follows them); the result."""
        acked = device.acked[conversation]
        own = device.own.setdefault(conversation, set())
        peer = device.peer.setdefault(conversation, set())
        while acked and level + 1 not in peer:
            top = min(acked) - 1  # the hole is level+1 .. top
            try:
                page = await self.store.read_after(
                    conversation, level, limit=min(top - level, self.page_size)
                )
            except (StoreError, ValueError) as exc:
                self.logger.warning("could not read a hole above a watermark: %s", exc)
                break
            for message in page:
                if message.seq <= top:
                    (own if message.sender_id == key[0] else peer).add(message.seq)
            if level + 1 not in own:
                break
            level = self._note(device, conversation, level, ())
        return level

    async def _write(self, key: Key, device: _Device, conversation: str) -> None:
        """Write the device's watermark in ``conversation`` as it is now. Acks may be
        noted while it is written (a store never lowers a watermark, so two writes may
        overlap): it stays dirty unless nothing moved meanwhile."""
        target = device.level[conversation]
        device.writing.add(conversation)
        try:
            await self.store.set_delivered(key[0], key[1], conversation, target)
        except (StoreError, ValueError) as exc:
            self.logger.warning("could not save a delivered watermark: %s", exc)
            return  # the messages stay pending and come again: never lost
        finally:
            device.writing.discard(conversation)
        device.written[conversation] = max(device.written.get(conversation, 0), target)
        device.written_at[conversation] = self.monotonic()
        if device.level.get(conversation) == target:
            device.dirty.discard(conversation)

    async def _flush(self, key: Key, device: _Device) -> None:
        """Write every watermark of the device that is ahead of the store."""
        async with device.lock:
            for conversation, level in list(device.level.items()):
                if level > device.written.get(conversation, 0):
                    await self._write(key, device, conversation)
            # Written: a write queued by a connection that ended before it ran (its
            # messages' ends dropped) holds back no later one.
            device.queued.clear()

    async def disconnected(self, session: Session, server: ServerAPI) -> None:
        """Save the device's watermarks; forget it when its last connection is gone."""
        key = (session.user_id, session.device_id)
        device = self._devices.get(key)
        if device is None:
            return
        with anyio.CancelScope(shield=True):
            await self._flush(key, device)
        device.sessions.discard(session.epoch)
        device.live.discard(session.epoch)
        if not device.sessions and self._devices.get(key) is device:
            del self._devices[key]
        device.notify()


_Step = Callable[[], Awaitable[object]]
"""What is left of a chat message's delivery that must await (:meth:`ChatService._deliver`)."""


def _unseen(
    page: Sequence[StoredMessage],
    levels: dict[str, int],
    acks: dict[str, set[int]],
    taken: list[StoredMessage],
) -> Iterator[tuple[dict[str, Any], str]]:
    """The catch-up's pushes of ``page``, in order, as ``(data, form_id)``: each message
    the device has not got (above its watermark, not acked), looked at when it is asked
    for (the caller asks when it can send it), and added to ``taken``."""
    for message in page:
        conversation, seq = message.conversation_id, message.seq
        if seq <= levels.get(conversation, 0) or seq in acks.get(conversation, ()):
            continue
        taken.append(message)
        yield message.to_wire(), message.sender_id


async def _run_steps(steps: list[_Step]) -> None:
    for step in steps:
        await step()


def _store_failure(logger: logging.Logger, exc: BaseException | None) -> Exception:
    """The answer to a failed append: :class:`HandlerError` for what the store raises
    (logged), the exception itself for anything else (a bug: the handler's error)."""
    if isinstance(exc, StoreError):  # StoreUnavailable, or worse: either way not answered
        log = logger.warning if isinstance(exc, StoreUnavailable) else logger.error
        log("the store failed, message not stored: %s", exc)
        return HandlerError(
            ErrorCode.STORE_UNAVAILABLE,
            "the message store is unavailable; nothing was stored; resend with the same id",
        )
    if isinstance(exc, (ValueError, TypeError)):
        return HandlerError(ErrorCode.BAD_REQUEST, str(exc))
    if isinstance(exc, Exception):
        return exc
    return RuntimeError(f"the store gave no result and no error ({exc!r})")


@contextlib.asynccontextmanager
async def _locked(lock: anyio.Lock) -> AsyncIterator[None]:
    """Hold ``lock``; taken without a checkpoint when it is free (as it is for nearly every
    ack), so a run of acks does not cost an event-loop round trip each."""
    try:
        lock.acquire_nowait()
    except anyio.WouldBlock:
        await lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _members(conversation_id: str) -> tuple[str, ...]:
    try:
        return conversation_members(conversation_id)
    except ValueError:
        return ()
