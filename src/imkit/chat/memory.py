"""An in-memory :class:`~imkit.chat.store.MessageStore` for tests and experiments.

Pure Python, no I/O, works under any anyio backend. Every operation runs without
awaiting in between (after one checkpoint), so each is atomic with respect to other
tasks. Data lives as long as the object: closing and reopening keeps it.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import anyio.lowlevel
import attrs

from imkit.chat.store import (
    AppendDone,
    ConversationSummary,
    StoredMessage,
    StoreLifecycle,
    check_append,
    check_cursor,
    check_history,
    check_int,
    check_limit,
    check_text,
    report_append,
)
from imkit.exceptions import StoreError

__all__ = ("MemoryStore",)

logger = logging.getLogger("imkit.chat.memory")


@attrs.define
class _Conversation:
    messages: list[StoredMessage] = attrs.field(factory=list)
    by_msg_id: dict[tuple[str, str], StoredMessage] = attrs.field(factory=dict)
    members: set[str] = attrs.field(factory=set)


class MemoryStore(StoreLifecycle):
    """A :class:`~imkit.chat.store.MessageStore` that keeps everything in dictionaries."""

    def __init__(self) -> None:
        self._open = False
        self._conversations: dict[str, _Conversation] = {}
        self._by_user: defaultdict[str, set[str]] = defaultdict(set)
        self._delivered: dict[tuple[str, str, str], int] = {}
        self._read: dict[tuple[str, str], int] = {}

    async def open(self) -> None:
        """Mark the store open (data from before a :meth:`close` is still there)."""
        await anyio.lowlevel.checkpoint()
        self._open = True

    async def close(self) -> None:
        """Mark the store closed; its data stays for a later :meth:`open`."""
        self._open = False
        await anyio.lowlevel.checkpoint()

    async def _enter(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._check_open()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the store is not open")

    def _last_seq(self, conversation_id: str) -> int:
        conv = self._conversations.get(conversation_id)
        return len(conv.messages) if conv else 0

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
        """Store a message under the next seq, or return the one stored before."""
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
        await self._enter()
        return self._append(
            conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
        )

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
        """Store the message now and call ``done`` with the outcome before returning
        (:class:`~imkit.chat.store.QueuedAppend`)."""
        try:
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
            self._check_open()
            result = self._append(
                conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
            )
        except Exception as exc:  # noqa: BLE001 - given to done, as promised
            report_append(done, None, exc)
        else:
            report_append(done, result, None)

    def _append(
        self,
        conversation_id: str,
        sender_id: str,
        recv_id: str,
        msg_id: str,
        chat_type: int,
        m_type: int,
        content: str,
        send_time: int,
    ) -> tuple[StoredMessage, bool]:
        """Store the checked message under the next seq, or return the one stored before."""
        conv = self._conversations.get(conversation_id)
        if conv is None:
            conv = self._conversations[conversation_id] = _Conversation()
        existing = conv.by_msg_id.get((sender_id, msg_id))
        if existing is not None:
            return existing, False
        if conv.messages and send_time < conv.messages[-1].send_time:
            send_time = conv.messages[-1].send_time  # never below the message before
        message = StoredMessage(
            conversation_id,
            len(conv.messages) + 1,
            sender_id,
            recv_id,
            msg_id,
            chat_type,
            m_type,
            content,
            send_time,
        )
        conv.messages.append(message)
        conv.by_msg_id[(sender_id, msg_id)] = message
        for user in (sender_id, recv_id):
            conv.members.add(user)
            self._by_user[user].add(conversation_id)
        return message, True

    async def read_after(
        self, conversation_id: str, after_seq: int, *, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with seq above ``after_seq``, ascending."""
        check_text("conversation_id", conversation_id)
        check_int("after_seq", after_seq)
        check_limit(limit)
        await self._enter()
        conv = self._conversations.get(conversation_id)
        if conv is None:
            return []
        start = max(after_seq, 0)
        return conv.messages[start : start + limit]

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
        """Messages within the inclusive seq and time bounds, by seq."""
        check_text("conversation_id", conversation_id)
        check_history(
            start_seq=start_seq,
            end_seq=end_seq,
            start_time=start_time,
            end_time=end_time,
            limit=limit,
        )
        await self._enter()
        conv = self._conversations.get(conversation_id)
        if conv is None:
            return []
        lo = 0 if start_seq is None else max(start_seq - 1, 0)
        hi = len(conv.messages) if end_seq is None else max(min(end_seq, len(conv.messages)), 0)
        window = conv.messages[lo:hi]
        if descending:
            window = window[::-1]
        out: list[StoredMessage] = []
        for message in window:
            if start_time is not None and message.send_time < start_time:
                continue
            if end_time is not None and message.send_time > end_time:
                continue
            out.append(message)
            if len(out) == limit:
                break
        return out

    async def is_member(self, conversation_id: str, user_id: str) -> bool:
        """Whether ``user_id`` has sent or received a message in the conversation."""
        check_text("conversation_id", conversation_id)
        check_text("user_id", user_id)
        await self._enter()
        conv = self._conversations.get(conversation_id)
        return conv is not None and user_id in conv.members

    async def last_seq(self, conversation_id: str) -> int:
        """The conversation's highest seq (0 when it has no messages)."""
        check_text("conversation_id", conversation_id)
        await self._enter()
        return self._last_seq(conversation_id)

    async def get_delivered(self, user_id: str, device_id: str, conversation_id: str) -> int:
        """The device's delivered watermark in the conversation (0 when none)."""
        key = (
            check_text("user_id", user_id),
            check_text("device_id", device_id, allow_empty=True),
            check_text("conversation_id", conversation_id),
        )
        await self._enter()
        return self._delivered.get(key, 0)

    async def set_delivered(
        self, user_id: str, device_id: str, conversation_id: str, seq: int
    ) -> int:
        """Raise the delivered watermark to ``seq`` (capped at the last seq); the result."""
        key = (
            check_text("user_id", user_id),
            check_text("device_id", device_id, allow_empty=True),
            check_text("conversation_id", conversation_id),
        )
        check_int("seq", seq, minimum=0)
        await self._enter()
        current = self._delivered.get(key, 0)
        new = max(current, min(seq, self._last_seq(conversation_id)))
        if new:
            self._delivered[key] = new
        return new

    async def pending(
        self,
        user_id: str,
        device_id: str,
        *,
        limit: int,
        after: tuple[str, int] | None = None,
    ) -> list[StoredMessage]:
        """The peers' messages the device has not acknowledged, by (conversation, seq)."""
        check_text("user_id", user_id)
        check_text("device_id", device_id, allow_empty=True)
        check_limit(limit)
        cursor = check_cursor(after)
        await self._enter()
        out: list[StoredMessage] = []
        for conversation_id in sorted(self._by_user.get(user_id, ())):
            if conversation_id < cursor[0]:
                continue
            conv = self._conversations[conversation_id]
            start = self._delivered.get((user_id, device_id, conversation_id), 0)
            if conversation_id == cursor[0]:
                start = max(start, cursor[1])
            for message in conv.messages[max(start, 0) :]:
                if message.sender_id == user_id:
                    continue
                out.append(message)
                if len(out) == limit:
                    return out
        return out

    async def get_read(self, user_id: str, conversation_id: str) -> int:
        """The user's read watermark in the conversation (0 when none)."""
        key = (check_text("user_id", user_id), check_text("conversation_id", conversation_id))
        await self._enter()
        return self._read.get(key, 0)

    async def set_read(self, user_id: str, conversation_id: str, seq: int) -> int:
        """Raise the read watermark to ``seq`` (capped at the last seq); the result."""
        key = (check_text("user_id", user_id), check_text("conversation_id", conversation_id))
        check_int("seq", seq, minimum=0)
        await self._enter()
        new = max(self._read.get(key, 0), min(seq, self._last_seq(conversation_id)))
        if new:
            self._read[key] = new
        return new

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        """The user's conversations, the most recently active first."""
        check_text("user_id", user_id)
        await self._enter()
        out: list[ConversationSummary] = []
        for conversation_id in self._by_user.get(user_id, ()):
            conv = self._conversations[conversation_id]
            others = sorted(conv.members - {user_id})
            read_seq = self._read.get((user_id, conversation_id), 0)
            unread = sum(1 for m in conv.messages[read_seq:] if m.sender_id != user_id)
            out.append(
                ConversationSummary(
                    conversation_id=conversation_id,
                    peer_id=others[0] if others else user_id,
                    last_seq=len(conv.messages),
                    read_seq=read_seq,
                    unread=unread,
                    last_message=conv.messages[-1] if conv.messages else None,
                )
            )
        out.sort(key=_summary_order)
        return out


def _summary_order(summary: ConversationSummary) -> tuple[int, str]:
    """Sort key: newest last message first, then conversation id."""
    last = summary.last_message
    return (-(last.send_time if last else 0), summary.conversation_id)
