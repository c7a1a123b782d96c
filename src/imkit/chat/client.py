"""A private-chat client on :class:`imkit.Client`: send until stored, receive in order.

::

    async with imkit.connect(url, token=token) as client:
        chat = ChatClient(client, user_id="alice")
        answer = await chat.send("bob", "hello")     # {"conversationId", "seq", ...}
        async for message in chat.messages():        # each message once
            ...

:meth:`ChatClient.send` puts a message id (``msgId``) in the data and resends under that id
until the server answers with the stored seq; each attempt is a new frame, so a resend
after a lost answer reaches the handler again and the store's dedupe answers it with the
seq stored the first time. :meth:`ChatClient.messages` yields each message once: it drops
seqs it has already handed out, and pulls a gap it sees (a push whose seq is not the next
one) with ``conversation.sync`` before the push that revealed it. After a reconnect it also
pulls what may have been lost with the old connection (NoAck servers count a push as
delivered once it is handed to the socket).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

from imkit.exceptions import ConnectionClosed, DeliveryFailed, RequestFailed
from imkit.transport.client import Client

__all__ = ("ChatClient", "new_message_id")

_RETRYABLE = frozenset({"store_unavailable", "rate_limited", "overloaded", "expired"})
# Seqs remembered per conversation above its contiguous mark; older ones count as seen.
_MAX_TRACKED = 4096
_MAX_MY_IDS = 4096


class _Conversation:
    """What the client has handed out of one conversation.

    ``mark``: every seq up to it is seen; ``above``: seen seqs higher than ``mark``. When
    tracking starts at a push (``base`` set), the seqs up to ``base`` are assumed handed
    out before, except that one arriving late is still new once (``late``).
    """

    __slots__ = ("above", "base", "late", "mark")

    def __init__(self, mark: int, *, assumed: bool = False) -> None:
        self.mark = mark
        self.above: set[int] = set()
        self.base = mark if assumed else None
        self.late: set[int] = set()

    def has(self, seq: int) -> bool:
        if seq > self.mark:
            return seq in self.above
        if self.base is not None and seq <= self.base:
            return seq in self.late
        return True

    def add(self, seq: int) -> None:
        if self.base is not None and seq <= self.base:
            if len(self.late) < _MAX_TRACKED:
                self.late.add(seq)
            return
        if seq <= self.mark:
            return
        self.above.add(seq)
        while self.mark + 1 in self.above:
            self.mark += 1
            self.above.discard(self.mark)
        if len(self.above) > _MAX_TRACKED:  # a hole nobody fills: stop waiting on it
            self.mark = sorted(self.above)[len(self.above) - _MAX_TRACKED]
            self.above = {s for s in self.above if s > self.mark}


def new_message_id() -> str:
    """A fresh ``msgId``: 14 hex digits of the time in µs, then 16 random ones.

    Unique without coordination (64 random bits), and in the order of sending when
    compared as strings: a store keeps its index of ``(conversation, sender, msgId)``
    (the one that makes a resend idempotent) by appending near the end of a sender's
    ids, not at random places (random ids, such as UUID4s, make the SQLite store write
    about half as many index pages again per message)."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(8)}"


class ChatClient:
    """Chat over a connected :class:`~imkit.transport.client.Client`.

    ``seen`` (``{conversationId: seq}``) says what the application already has, for
    instance from a previous run; :attr:`seen` gives the current marks to save.
    """

    def __init__(
        self, client: Client, *, user_id: str = "", seen: Mapping[str, int] | None = None
    ) -> None:
        self.client = client
        self.user_id = user_id
        self._conversations = {c: _Conversation(s) for c, s in (seen or {}).items()}
        self._my_ids: OrderedDict[str, None] = OrderedDict()
        self._connections = client.connections

    @property
    def seen(self) -> dict[str, int]:
        """Per conversation, the seq up to which every message was handed out (or sent)."""
        return {c: state.mark for c, state in self._conversations.items()}

    # ------------------------------------------------------------------ sending
    async def send(
        self,
        to: str,
        content: str,
        *,
        m_type: int = 0,
        message_id: str | None = None,
        attempts: int = 20,
        attempt_timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Send a text to ``to``; return ``{conversationId, seq, sendTime, msgId}`` once the
        server has stored it.

        Resends under the same ``msgId`` after a timeout (``attempt_timeout`` seconds per
        attempt), a disconnect or a retryable error; raises
        :class:`~imkit.exceptions.RequestFailed` for a final refusal (``forbidden``,
        ``too_large``, ``bad_request``), or the last error after ``attempts`` tries.
        """
        message_id = message_id or new_message_id()
        self._my_ids[message_id] = None
        while len(self._my_ids) > _MAX_MY_IDS:
            self._my_ids.popitem(last=False)
        data = {
            "chatType": 2,
            "recvId": to,
            "msgId": message_id,
            "msg": {"mType": m_type, "content": content},
        }
        delay = 0.05
        for attempt in range(attempts):
            try:
                answer: dict[str, Any] = await self.client.request(
                    "conversation.chat", data, timeout=attempt_timeout
                )
            except RequestFailed as exc:
                if exc.code not in _RETRYABLE or attempt == attempts - 1:
                    raise
            except (TimeoutError, DeliveryFailed, ConnectionClosed):
                if attempt == attempts - 1:
                    raise
            else:
                self._state(answer["conversationId"], answer["seq"]).add(answer["seq"])
                return answer
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def mark_read(self, conversation_id: str, seq: int) -> int:
        """Mark the conversation read up to ``seq``; the resulting read watermark."""
        answer = await self.client.request(
            "conversation.markChat", {"conversationId": conversation_id, "seq": seq}
        )
        return int(answer["readSeq"])

    async def conversations(self) -> list[dict[str, Any]]:
        """The user's conversations with unread counts (``conversation.list``)."""
        answer = await self.client.request("conversation.list", {})
        result: list[dict[str, Any]] = answer["list"]
        return result

    # ------------------------------------------------------------------ receiving
    async def sync(
        self, conversation_id: str, after: int, *, until: int | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Pull the messages of ``conversation_id`` after seq ``after``, page by page: all
        of them, or (with ``until``) those below seq ``until``."""
        out: list[dict[str, Any]] = []
        while until is None or after + 1 < until:
            page = await self.client.request(
                "conversation.sync", {conversation_id: after, "limit": limit}
            )
            batch = page["messages"].get(conversation_id, [])
            out.extend(m for m in batch if until is None or m["seq"] < until)
            if not batch or not page["hasMore"].get(conversation_id):
                break
            after = batch[-1]["seq"]
        return out

    async def resync(self) -> list[dict[str, Any]]:
        """Pull, for every conversation this client tracks, what it has not seen yet;
        returns those messages (oldest first per conversation), now marked seen."""
        fresh: list[dict[str, Any]] = []
        for conversation_id, state in list(self._conversations.items()):
            for message in await self.sync(conversation_id, state.mark):
                if self._take(message):
                    fresh.append(message)
        return fresh

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Each chat message once, per conversation in seq order (gaps are pulled first).

        Messages this client sent itself are not yielded; those its user sent from another
        device are.
        """
        async for frame in self.client:
            if self.client.connections != self._connections:
                self._connections = self.client.connections
                for message in await self.resync():
                    yield message
            if frame.method != "push" or not isinstance(frame.data, dict):
                continue
            message = frame.data
            conversation, seq = message.get("conversationId"), message.get("seq")
            if not isinstance(conversation, str) or not isinstance(seq, int):
                continue
            state = self._conversations.get(conversation)
            if state is not None and not state.has(seq) and seq > state.mark + 1:
                # A gap: mark + 1 (at least) is missing. Pull it before this message.
                for pulled in await self.sync(conversation, state.mark, until=seq):
                    if self._take(pulled):
                        yield pulled
            if self._take(message):
                yield message

    def _state(self, conversation: str, seq: int) -> _Conversation:
        state = self._conversations.get(conversation)
        if state is None:
            # Tracking starts here: what came before was handed out earlier, or will come
            # as a late push and be taken then (see _take).
            state = self._conversations[conversation] = _Conversation(seq - 1, assumed=True)
        return state

    def _take(self, message: dict[str, Any]) -> bool:
        """Mark ``message`` seen; whether to hand it out (new, and not sent by this client)."""
        conversation, seq = message["conversationId"], message["seq"]
        state = self._state(conversation, seq)
        if state.has(seq):
            return False
        state.add(seq)
        mine = message.get("sendId") == self.user_id and message.get("msgId") in self._my_ids
        return not mine
