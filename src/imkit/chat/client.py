"""A private-chat client on :class:`imkit.Client`: send until stored, receive in order.

:meth:`ChatClient.send` resends the same message id until the server answers with the
stored seq (so a lost answer never duplicates a message); :meth:`ChatClient.messages`
yields each pushed message once, per conversation in seq order, pulling any gap it sees
with ``conversation.sync``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio

from imkit.exceptions import ConnectionClosed, DeliveryFailed, RequestFailed
from imkit.transport.client import Client

__all__ = ("ChatClient",)

_RETRYABLE = frozenset({"store_unavailable", "rate_limited", "overloaded", "expired"})


class ChatClient:
    """Chat over a connected :class:`~imkit.transport.client.Client`."""

    def __init__(self, client: Client, *, user_id: str = "") -> None:
        self.client = client
        self.user_id = user_id
        self.seen: dict[str, int] = {}
        """The highest seq handed out per conversation."""

    async def send(
        self,
        to: str,
        content: str,
        *,
        m_type: int = 0,
        message_id: str | None = None,
        attempts: int = 20,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Send a text to ``to``; return ``{conversationId, seq, sendTime, msgId}`` once stored.

        Retries with the same id after timeouts, disconnects and retryable errors.
        """
        message_id = message_id or uuid.uuid4().hex
        data = {"chatType": 2, "recvId": to, "msg": {"mType": m_type, "content": content}}
        delay = 0.05
        for attempt in range(attempts):
            try:
                answer: dict[str, Any] = await self.client.request(
                    "conversation.chat", data, message_id=message_id, timeout=timeout
                )
                return answer
            except RequestFailed as exc:
                if exc.code not in _RETRYABLE or attempt == attempts - 1:
                    raise
            except (TimeoutError, DeliveryFailed, ConnectionClosed):
                if attempt == attempts - 1:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def sync(
        self, conversation_id: str, after: int, *, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Pull every message of ``conversation_id`` after seq ``after``."""
        out: list[dict[str, Any]] = []
        while True:
            page = await self.client.request(
                "conversation.sync", {conversation_id: after, "limit": limit}
            )
            batch = page["messages"].get(conversation_id, [])
            out.extend(batch)
            if not batch or not page["hasMore"].get(conversation_id):
                return out
            after = batch[-1]["seq"]

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Each pushed chat message once, in seq order per conversation (gaps pulled)."""
        async for frame in self.client:
            if frame.method != "push" or not isinstance(frame.data, dict):
                continue
            message = frame.data
            conversation = message.get("conversationId")
            seq = message.get("seq")
            if not isinstance(conversation, str) or not isinstance(seq, int):
                continue
            last = self.seen.get(conversation)
            if last is not None and seq <= last:
                continue
            if last is not None and seq > last + 1:
                for missing in await self.sync(conversation, last):
                    if missing["seq"] < seq and missing["seq"] > self.seen.get(conversation, 0):
                        self.seen[conversation] = missing["seq"]
                        yield missing
            self.seen[conversation] = seq
            yield message
