"""The message store contract: what :mod:`imkit.chat` needs from a database.

A store keeps the messages of conversations, who belongs to each conversation, and two
per-user watermarks. Three implementations ship: :class:`~imkit.chat.memory.MemoryStore`
(tests), :class:`~imkit.chat.sqlite.SQLiteStore` (the embedded default) and
:class:`~imkit.integrations.postgres.PostgresStore` (many nodes). Each passes the same
contract test suite. The rules:

Sequence numbers
    Every conversation numbers its messages 1, 2, 3, ... with no gaps and no reuse, in
    the order :meth:`MessageStore.append` calls take effect, also when many tasks,
    processes or nodes append at once. A seq is assigned only together with the stored
    message, in one transaction: a failed append never burns a seq.

Idempotence
    ``(conversation_id, sender_id, msg_id)`` identifies a message. Appending it again
    (a client resending after a lost answer) returns the message stored the first time
    and ``created=False``: nothing is stored twice, whatever the second call carried.

Durability
    When ``append`` (or a watermark setter) returns, the change is committed. An error
    means it may or may not have been stored; the caller retries with the same
    ``msg_id`` and the store dedupes. No method reports success for something not stored.

Send times
    Within a conversation a message's ``send_time`` is never below the one of the
    message before it: ``append`` raises a lower ``send_time`` to the conversation's last
    (the clock of a node stepped back, or nodes disagree) and returns the message as
    stored. History by time can then be found along the seqs.

Membership
    ``append`` records the sender and the recipient as members of the conversation.
    :meth:`MessageStore.pending` and :meth:`MessageStore.conversations` cover exactly
    the conversations a user is a member of. Stores do not check membership anywhere
    else: the chat service does.

Watermarks
    ``delivered`` (per user, device and conversation) is the highest seq a device has
    acknowledged; ``read`` (per user and conversation) is the highest seq the user has
    read. Both only move forward, and never beyond the conversation's last seq (a
    client cannot mark future messages delivered or read); the setters return the
    resulting watermark. Unknown watermarks are 0.

Strings
    Ids are non-empty strings (``device_id`` may be empty) without NUL characters;
    ``content`` may hold anything, NUL included, and comes back byte-for-byte. Strings
    must be valid Unicode (no lone surrogates): anything else raises ``ValueError``
    before the store is touched, as do negative seqs and limits below 1. Ordering by
    ``conversation_id`` is by Unicode code point.

Errors
    A store raises :class:`~imkit.exceptions.StoreUnavailable` for failures worth a
    retry (a locked database, disk I/O errors, a refused or lost connection) and
    :class:`~imkit.exceptions.StoreError` for the rest; driver exceptions never escape.
    Using a store before :meth:`MessageStore.open` or after
    :meth:`MessageStore.close` raises ``StoreError``.

Queued appends (optional)
    A store that can take an append at once, behind every append queued before it, and
    report each result through a callback in call order (the memory and SQLite stores;
    not PostgreSQL's pool), also provides :class:`QueuedAppend`'s ``append_nowait``.
    The chat service then answers each message from that callback (``Context.defer``):
    a connection's next message starts while one waits for its commit, and no task is
    kept per message. A subclass that overrides ``append`` alone is still called
    through ``append``, one message at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import attrs

from imkit.core._framing import load_speedups

__all__ = (
    "SCHEMA_VERSION",
    "SQLITE_SCHEMA_VERSION",
    "AppendDone",
    "ConversationSummary",
    "MessageStore",
    "QueuedAppend",
    "StoredMessage",
)

_logger = logging.getLogger("imkit.chat.store")

#: The version of the persistent schema the PostgreSQL store creates and expects.
SCHEMA_VERSION = 1

#: The version of the SQLite store's file. 2: a new file has no index of messages by time
#: (send times never decrease within a conversation, so history by time is found along
#: the seqs); a file made at version 1 keeps its index, and is marked 2 when opened.
SQLITE_SCHEMA_VERSION = 2

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


class StoredMessage(NamedTuple):
    """A message as stored: its conversation, its seq there, and what was sent.

    ``send_time`` is in milliseconds since the epoch, set by the server.

    A named tuple (immutable, compared and hashed by its fields): the stores make one
    for every row they read, and a catch-up reads thousands; a tuple is made for a
    third of the cost of a frozen attrs class (``StoredMessage._make(row)`` from a row
    whose columns are in the order of the fields).
    """

    conversation_id: str
    seq: int
    sender_id: str
    recv_id: str
    msg_id: str
    chat_type: int
    m_type: int
    content: str
    send_time: int

    def to_wire(self) -> dict[str, Any]:
        """The message as easy-chat's JSON shape (camelCase keys)."""
        return {
            "conversationId": self.conversation_id,
            "seq": self.seq,
            "sendId": self.sender_id,
            "recvId": self.recv_id,
            "msgId": self.msg_id,
            "chatType": self.chat_type,
            "sendTime": self.send_time,
            "msg": {"mType": self.m_type, "content": self.content},
        }


@attrs.frozen(slots=True)
class ConversationSummary:
    """One conversation of a user, as :meth:`MessageStore.conversations` lists it.

    ``unread`` counts the messages above ``read_seq`` not sent by the user;
    ``last_message`` is the message with ``last_seq``.
    """

    conversation_id: str
    peer_id: str
    last_seq: int
    read_seq: int
    unread: int
    last_message: StoredMessage | None


@runtime_checkable
class MessageStore(Protocol):
    """Where private-chat messages and watermarks live. See the module docstring."""

    async def open(self) -> None:
        """Connect, and create the schema on first use. Idempotent."""
        ...

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""
        ...

    async def append(
        self,
        *,
        conversation_id: str,
        sender_id: str,
        recv_id: str,
        msg_id: str,
        chat_type: int,
        m_type: int,
        content: str,
        send_time: int,
    ) -> tuple[StoredMessage, bool]:
        """Store a message under the conversation's next seq; ``(message, created)``.

        A repeated ``(sender_id, msg_id)`` in the conversation returns the stored
        message and ``False``. A ``send_time`` below the one of the conversation's last
        message is stored (and returned) as that one.
        """
        ...

    async def read_after(
        self, conversation_id: str, after_seq: int, *, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with seq above ``after_seq``, ascending."""
        ...

    async def history(
        self,
        conversation_id: str,
        *,
        start_seq: int | None = None,
        end_seq: int | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> list[StoredMessage]:
        """Messages within the inclusive seq and time (ms) bounds, by seq.

        Ascending gives the oldest ``limit`` matches, descending the newest.
        """
        ...

    async def is_member(self, conversation_id: str, user_id: str) -> bool:
        """Whether ``user_id`` has sent or received a message in the conversation."""
        ...

    async def last_seq(self, conversation_id: str) -> int:
        """The conversation's highest seq (0 when it has no messages)."""
        ...

    async def get_delivered(self, user_id: str, device_id: str, conversation_id: str) -> int:
        """The device's delivered watermark in the conversation (0 when none)."""
        ...

    async def set_delivered(
        self, user_id: str, device_id: str, conversation_id: str, seq: int
    ) -> int:
        """Raise the delivered watermark to ``seq`` (never lowers it); the result."""
        ...

    async def pending(
        self,
        user_id: str,
        device_id: str,
        *,
        limit: int,
        after: tuple[str, int] | None = None,
    ) -> list[StoredMessage]:
        """Messages the device has not acknowledged, from the user's peers.

        Every message of every conversation the user is a member of, with seq above the
        device's delivered watermark there and a sender other than the user, ordered by
        ``(conversation_id, seq)``; at most ``limit`` of them. ``after`` continues
        from a ``(conversation_id, seq)`` cursor (the last message of the previous page)
        without waiting for acks.
        """
        ...

    async def get_read(self, user_id: str, conversation_id: str) -> int:
        """The user's read watermark in the conversation (0 when none)."""
        ...

    async def set_read(self, user_id: str, conversation_id: str, seq: int) -> int:
        """Raise the read watermark to ``seq`` (never lowers it); the result."""
        ...

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        """The user's conversations, the most recently active first."""
        ...


AppendDone = Callable[[tuple[StoredMessage, bool] | None, BaseException | None], None]
"""What :meth:`QueuedAppend.append_nowait` calls when an append is over:
``done((message, created), None)`` once stored (as :meth:`MessageStore.append` returns
it), or ``done(None, error)`` with the exception ``append`` would have raised."""


@runtime_checkable
class QueuedAppend(Protocol):
    """A store whose appends can be queued at once, their results reported in call order.

    :class:`~imkit.chat.service.ChatService` uses it to answer each chat message from
    the store's callback (``Context.defer``): a connection's next message starts while
    this one waits for its commit, the appends still take their seqs in the order the
    sender sent them, and the answers go out in that order. A store that cannot promise
    that order (one whose appends may overtake each other) does not provide it, and
    each connection's messages are then stored one after the other.
    """

    def append_nowait(
        self,
        *,
        conversation_id: str,
        sender_id: str,
        recv_id: str,
        msg_id: str,
        chat_type: int,
        m_type: int,
        content: str,
        send_time: int,
        done: AppendDone,
    ) -> None:
        """Queue :meth:`MessageStore.append` now, behind every append queued before; call
        ``done`` once with its outcome, on the event loop's thread; the appends it takes
        are answered in the order of the calls. ``done`` may run before this returns (a
        store that stores at once); it must not raise (what it raises is logged and
        dropped). Never raises at the call: an append refused there (a bad argument, a
        closed store) is answered at once, with the error ``append`` would raise."""
        ...


def report_append(
    done: AppendDone,
    result: tuple[StoredMessage, bool] | None,
    error: BaseException | None,
) -> None:
    """Call an :data:`AppendDone`; log what it raises (a store goes on with its queue)."""
    try:
        done(result, error)
    except Exception:
        _logger.exception("an append_nowait callback failed")


_S = TypeVar("_S", bound="StoreLifecycle")


class StoreLifecycle:
    """Mixin: ``async with store:`` opens the store and closes it at the end."""

    async def open(self) -> None:  # pragma: no cover - overridden
        """Open the store."""
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - overridden
        """Close the store."""
        raise NotImplementedError

    async def __aenter__(self: _S) -> _S:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- argument checks shared by the implementations ------------------------------------


def check_text(name: str, value: object, *, allow_empty: bool = False) -> str:
    """``value`` as an id string: non-empty (unless allowed), no NUL, valid Unicode."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must be non-empty")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL")
    check_unicode(name, value)
    return value


def check_unicode(name: str, value: str) -> None:
    """Reject strings that cannot be encoded as UTF-8 (lone surrogates)."""
    if value.isascii():  # no surrogate, and answered without reading the string
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (lone surrogate)") from None


def check_int(name: str, value: object, *, minimum: int | None = None, bits: int = 64) -> int:
    """``value`` as an int of at most ``bits`` bits, not below ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    lo, hi = _INT32 if bits == 32 else _INT64
    if minimum is not None:
        lo = max(lo, minimum)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, not {value}")
    return value


def check_limit(limit: object) -> int:
    """A page size: an int of at least 1."""
    return check_int("limit", limit, minimum=1)


def draft_message(
    *,
    conversation_id: str,
    sender_id: str,
    recv_id: str,
    msg_id: str,
    chat_type: int,
    m_type: int,
    content: str,
    send_time: int,
) -> StoredMessage:
    """Validate the arguments of :meth:`MessageStore.append`; the message with seq 0."""
    check_append(
        conversation_id=conversation_id,
        sender_id=sender_id,
        recv_id=recv_id,
        msg_id=msg_id,
        chat_type=chat_type,
        m_type=m_type,
        content=content,
        send_time=send_time,
    )
    return StoredMessage(
        conversation_id=conversation_id,
        seq=0,
        sender_id=sender_id,
        recv_id=recv_id,
        msg_id=msg_id,
        chat_type=chat_type,
        m_type=m_type,
        content=content,
        send_time=send_time,
    )


def _py_plain_append(
    conversation_id: object,
    sender_id: object,
    recv_id: object,
    msg_id: object,
    chat_type: object,
    m_type: object,
    content: object,
    send_time: object,
) -> bool:
    """Whether the arguments of :meth:`MessageStore.append` are of the common, valid
    kind: the four ids exact, non-empty, ASCII ``str`` without NUL, ``content`` an exact
    ASCII ``str``, ``chat_type`` and ``m_type`` exact 32-bit ints, ``send_time`` an exact
    64-bit int (the C extension's ``plain_append`` answers the same)."""
    return bool(
        type(conversation_id) is str
        and type(sender_id) is str
        and type(recv_id) is str
        and type(msg_id) is str
        and type(content) is str
        and type(chat_type) is int
        and type(m_type) is int
        and type(send_time) is int
        and conversation_id
        and sender_id
        and recv_id
        and msg_id
        and "\x00" not in conversation_id
        and "\x00" not in sender_id
        and "\x00" not in recv_id
        and "\x00" not in msg_id
        and conversation_id.isascii()
        and sender_id.isascii()
        and recv_id.isascii()
        and msg_id.isascii()
        and content.isascii()
        and _INT32[0] <= chat_type <= _INT32[1]
        and _INT32[0] <= m_type <= _INT32[1]
        and _INT64[0] <= send_time <= _INT64[1]
    )


plain_append: Callable[..., bool] = getattr(
    load_speedups(os.environ), "plain_append", _py_plain_append
)
"""``plain_append(conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content,
send_time)``: whether an append's arguments are the common case that
:func:`check_append` passes without a word (the C extension's, else Python's); ``False``
says only "ask :func:`check_append`"."""


def check_append(
    *,
    conversation_id: str,
    sender_id: str,
    recv_id: str,
    msg_id: str,
    chat_type: int,
    m_type: int,
    content: str,
    send_time: int,
) -> None:
    """Raise ``TypeError``/``ValueError`` for arguments :meth:`MessageStore.append` refuses."""
    check_append_args(
        conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
    )


def check_append_args(
    conversation_id: str,
    sender_id: str,
    recv_id: str,
    msg_id: str,
    chat_type: int,
    m_type: int,
    content: str,
    send_time: int,
    /,
) -> None:
    """:func:`check_append` with its arguments in order (a store's hot path makes one
    call, without eight keywords)."""
    # Nearly every call: ASCII ids and content, 32-bit types, a 64-bit time, answered by
    # one call; anything else goes through the checks that say what is wrong.
    if plain_append(
        conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
    ):
        return
    check_text("conversation_id", conversation_id)
    check_text("sender_id", sender_id)
    check_text("recv_id", recv_id)
    check_text("msg_id", msg_id)
    check_int("chat_type", chat_type, bits=32)
    check_int("m_type", m_type, bits=32)
    if not isinstance(content, str):
        raise TypeError(f"content must be a str, not {type(content).__name__}")
    check_unicode("content", content)
    check_int("send_time", send_time)


def check_history(
    *,
    start_seq: int | None,
    end_seq: int | None,
    start_time: int | None,
    end_time: int | None,
    limit: int,
) -> None:
    """Validate the bounds of :meth:`MessageStore.history`."""
    for name, value in (
        ("start_seq", start_seq),
        ("end_seq", end_seq),
        ("start_time", start_time),
        ("end_time", end_time),
    ):
        if value is not None:
            check_int(name, value)
    check_limit(limit)


def check_cursor(after: tuple[str, int] | None) -> tuple[str, int]:
    """A :meth:`MessageStore.pending` cursor; ``None`` means from the start."""
    if after is None:
        return ("", 0)
    if not isinstance(after, Sequence) or len(after) != 2:
        raise TypeError("after must be a (conversation_id, seq) pair")
    return (check_text("after[0]", after[0], allow_empty=True), check_int("after[1]", after[1]))
