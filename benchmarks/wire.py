"""Client-side wire protocols of the load generator (no third-party imports).

Every server under test speaks JSON text frames, but not the same JSON. A *codec*
turns "send message ``msg_id`` with ``text`` to user ``to``" into the bytes a server
expects, and classifies each frame the load generator receives:

- ``DELIVERY``: a relayed message arrived at its recipient; ``key`` is the message's
  *token* (see below), used to find its send time and its sender's window;
- ``ACK``: the server acknowledged one of our sends; ``key`` is our message id;
- ``IGNORE``: a frame that needs no bookkeeping (an upstream Ack we do not count, ...);
- ``ERROR``: the server reported an error, or the frame made no sense; ``key`` says why.

A codec may also return ``reply``: bytes the client must send back at once (a
downstream Ack, in imkit's OnlyAck mode).

Tokens: every message text starts with ``"<token>|"`` and is padded to the configured
size, so a recipient finds the token whatever envelope the server wraps around the
text (servers pass the text through untouched, and may choose their own message ids).
"""

from __future__ import annotations

import json
from typing import Protocol

DELIVERY = 0
ACK = 1
IGNORE = 2
ERROR = 3

TOKEN_SEPARATOR = "|"

Decoded = tuple[int, str, "bytes | None"]
"""``(kind, key, reply)`` as returned by :meth:`WireCodec.decode`."""


class WireCodec(Protocol):
    """How the load generator talks to one server over a plain WebSocket client."""

    def url(self, base: str, user: str) -> str:
        """The WebSocket URL for ``user``, given ``ws://host:port``."""
        ...

    def encode(self, msg_id: str, to: str, text: str) -> bytes:
        """The text frame that sends ``text`` to user ``to``."""
        ...

    def decode(self, payload: bytes) -> Decoded:
        """Classify one received text frame."""
        ...


def make_text(token: str, size: int) -> str:
    """A message text of ``size`` characters (at least the token) starting with the token."""
    head = token + TOKEN_SEPARATOR
    return head + "x" * max(0, size - len(head))


def token_of(text: str) -> str:
    """The token a text made by :func:`make_text` starts with."""
    return text.partition(TOKEN_SEPARATOR)[0]


def dumps(obj: object) -> bytes:
    """Compact JSON, UTF-8 encoded (what every peer server also emits)."""
    return json.dumps(obj, separators=(",", ":")).encode()


class RelayJsonCodec:
    """The protocol of the plain peers (websockets, aiohttp, picows relays).

    - connect: ``ws://host:port/?user=<user>``
    - send: ``{"id": <msg id>, "to": <user>, "text": <text>}``
    - the recipient receives ``{"id": <msg id>, "from": <sender>, "text": <text>}``
    - in ack mode the sender receives ``{"ack": <msg id>}`` once the message was relayed
    """

    def url(self, base: str, user: str) -> str:
        return f"{base}/?user={user}"

    def encode(self, msg_id: str, to: str, text: str) -> bytes:
        return dumps({"id": msg_id, "to": to, "text": text})

    def decode(self, payload: bytes) -> Decoded:
        try:
            obj = json.loads(payload)
        except ValueError:
            return ERROR, f"not JSON: {payload[:80]!r}", None
        if not isinstance(obj, dict):
            return ERROR, f"not an object: {payload[:80]!r}", None
        ack = obj.get("ack")
        if ack is not None:
            return ACK, str(ack), None
        text = obj.get("text")
        if isinstance(text, str):
            return DELIVERY, token_of(text), None
        return ERROR, f"unexpected frame: {payload[:80]!r}", None
