"""What the sans-IO core tells its driver.

A driver feeds bytes (or text messages) and the time into the core, then reads a list of
these events and acts on each one. Every failure surfaces as one of them; none is dropped
silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from imkit.core.frames import Frame, _new, _slot_maker, _slot_setters
from imkit.core.interfaces import HandshakeRequest

__all__ = (
    "Closed",
    "Connected",
    "Delivered",
    "DeliveryFailed",
    "ErrorReceived",
    "Event",
    "HandshakeRequested",
    "HttpRequested",
    "MessageExpired",
    "MessageReceived",
    "RawMessageReceived",
    "Rejected",
)


@attrs.frozen(slots=True)
class HandshakeRequested:
    """Server: a valid WebSocket upgrade arrived on an allowed path and origin.

    Decide it: call ``conn.accept(identity)`` or ``conn.reject(status, reason)``.
    """

    request: HandshakeRequest


@attrs.frozen(slots=True)
class HttpRequested:
    """Server: a plain HTTP request (no upgrade) arrived.

    Answer it with ``conn.respond(status, headers, body)``; a driver that serves no pages
    answers 426 Upgrade Required.
    """

    method: str
    request: HandshakeRequest


@attrs.frozen(slots=True)
class Connected:
    """Client: the server accepted the upgrade; ``headers`` are its response headers."""

    headers: Sequence[tuple[str, str]]


@attrs.frozen(slots=True)
class Rejected:
    """Client: the server refused the upgrade with an HTTP ``status``."""

    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes


@attrs.frozen(slots=True)
class MessageReceived:
    """A message passed its ack rules and must be handled now (exactly once per id).

    On a server ``frame.form_id`` is always the authenticated user.
    """

    frame: Frame


@attrs.frozen(slots=True)
class RawMessageReceived:
    """Raw mode (``ServerConn(raw=True)``): one whole WebSocket message, text or binary.

    No IM framing, acks or strikes apply; answer with ``conn.send_raw(data)`` if at all.
    """

    data: str | bytes


@attrs.frozen(slots=True)
class Delivered:
    """The peer acknowledged a message this end sent with acks."""

    frame: Frame


@attrs.frozen(slots=True)
class DeliveryFailed:
    """A message this end sent was not acknowledged, and is not resent.

    ``reason`` is ``"timeout"`` (the ack timeout passed), ``"closed"`` (the connection
    ended first), ``"overflow"`` (the send queue was full) or ``"refused"`` (the peer
    answered it with a final ``Err``, see :data:`~imkit.core.frames.FINAL_ERROR_CODES`).
    """

    frame: Frame
    reason: str = "timeout"


@attrs.frozen(slots=True)
class MessageExpired:
    """RigorAck: a received message was never confirmed and was dropped, undispatched."""

    frame: Frame


@attrs.frozen(slots=True)
class ErrorReceived:
    """The peer sent an ``Err`` frame (``frame.data`` holds ``code`` and ``message``)."""

    frame: Frame


@attrs.frozen(slots=True)
class Closed:
    """The connection is closed: stop reading, flush ``data_to_send()``, close the socket.

    ``code`` is the WebSocket close code (1006 when the socket went away without one);
    ``by_peer`` says which side closed first.
    """

    code: int
    reason: str = ""
    by_peer: bool = False


Event = (
    HandshakeRequested
    | HttpRequested
    | Connected
    | Rejected
    | MessageReceived
    | RawMessageReceived
    | Delivered
    | DeliveryFailed
    | MessageExpired
    | ErrorReceived
    | Closed
)


# The events of every message, made through their slots (see frames._slot_setters), or in
# one call by the C extension's makers (frames._slot_maker).
(_set_received_frame,) = _slot_setters(MessageReceived, ("frame",))
(_set_delivered_frame,) = _slot_setters(Delivered, ("frame",))
(_set_raw_data,) = _slot_setters(RawMessageReceived, ("data",))


def _py_message_received(frame: Frame) -> MessageReceived:
    """``MessageReceived(frame)``, for less."""
    event: MessageReceived = _new(MessageReceived)
    _set_received_frame(event, frame)
    return event


def _py_delivered(frame: Frame) -> Delivered:
    """``Delivered(frame)``, for less."""
    event: Delivered = _new(Delivered)
    _set_delivered_frame(event, frame)
    return event


def _py_raw_message_received(data: str | bytes) -> RawMessageReceived:
    """``RawMessageReceived(data)``, for less."""
    event: RawMessageReceived = _new(RawMessageReceived)
    _set_raw_data(event, data)
    return event


_message_received: Callable[[Frame], MessageReceived] = (
    _slot_maker(MessageReceived, ("frame",)) or _py_message_received
)
_delivered: Callable[[Frame], Delivered] = _slot_maker(Delivered, ("frame",)) or _py_delivered
_raw_message_received: Callable[[str | bytes], RawMessageReceived] = (
    _slot_maker(RawMessageReceived, ("data",)) or _py_raw_message_received
)
