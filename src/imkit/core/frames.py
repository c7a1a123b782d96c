"""The wire envelope and its JSON codec.

One JSON object per WebSocket text message, compatible with the Go project easy-chat::

    {"frameType": 0, "id": "m1", "ackSeq": 0, "method": "conversation.chat",
     "formId": "alice", "transpondUid": "", "data": {...}}

Unknown fields are ignored and absent ones take their defaults. imkit adds one optional
field, ``replyTo``, on the answers to requests; it is left out when empty, so easy-chat
clients never see it.

Decoding never raises: :func:`decode_frame` returns either a :class:`Frame` or a
:class:`DecodeError` that names a machine-readable :class:`ErrorCode` and, where it could be
read, the id of the offending frame. Only strict JSON is accepted: ``NaN``/``Infinity`` and
lone UTF-16 surrogates (``"\\ud800"``), which no UTF-8 text can carry on, are ``bad_json``.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum
from typing import Any

import attrs

__all__ = (
    "DecodeError",
    "ErrorCode",
    "Frame",
    "FrameType",
    "decode_frame",
    "encode_frame",
    "error_frame",
)


class FrameType(IntEnum):
    """The ``frameType`` values of the easy-chat wire format."""

    DATA = 0
    PING = 1
    ACK = 2
    NO_ACK = 3
    TRANSPOND = 6
    ERR = 9


class ErrorCode:
    """The ``code`` strings carried by ``Err`` frames (``data = {"code", "message"}``)."""

    BAD_JSON = "bad_json"
    """The text message is not a JSON object."""
    BAD_FRAME = "bad_frame"
    """A field has the wrong type (``id`` not a string, ``ackSeq`` not an int, ...)."""
    UNKNOWN_FRAME_TYPE = "unknown_frame_type"
    """``frameType`` is not one of 0, 1, 2, 3, 6, 9."""
    UNKNOWN_METHOD = "unknown_method"
    """No route is registered for ``method``."""
    FORBIDDEN = "forbidden"
    """The authenticated user may not do this (for example send ``Transpond`` frames)."""
    HANDLER_ERROR = "handler_error"
    """The route's handler raised; the server logged it."""
    BAD_REQUEST = "bad_request"
    """The route rejected the ``data`` payload."""
    TOO_LARGE = "too_large"
    """The payload is over an application limit."""
    RATE_LIMITED = "rate_limited"
    """The connection sends faster than its rate limit; ``retryAfter`` says when to retry."""
    OVERLOADED = "overloaded"
    """The server has too much in flight for this connection; retry later."""
    STORE_UNAVAILABLE = "store_unavailable"
    """The message store failed; nothing was stored; retry with the same id."""
    EXPIRED = "expired"
    """A RigorAck message was not confirmed before the ack timeout and was dropped."""


_FRAME_TYPES = frozenset(int(t) for t in FrameType)


@attrs.frozen(slots=True)
class Frame:
    """One message of the wire format.

    ``form_id`` keeps easy-chat's spelling of "from". A server always overwrites it
    with the authenticated user before a frame reaches a handler.
    """

    frame_type: FrameType = FrameType.DATA
    id: str = ""
    ack_seq: int = 0
    method: str = ""
    form_id: str = ""
    transpond_uid: str = ""
    data: Any = None
    reply_to: str = ""


@attrs.frozen(slots=True)
class DecodeError:
    """Why a text message could not be decoded; ``id`` is the frame's id where it was readable."""

    code: str
    message: str
    id: str = ""


def encode_frame(frame: Frame) -> str:
    """Encode ``frame`` as one JSON text message (every easy-chat field is always present)."""
    obj: dict[str, Any] = {
        "frameType": int(frame.frame_type),
        "id": frame.id,
        "ackSeq": frame.ack_seq,
        "method": frame.method,
        "formId": frame.form_id,
        "transpondUid": frame.transpond_uid,
        "data": frame.data,
    }
    if frame.reply_to:
        obj["replyTo"] = frame.reply_to
    # allow_nan=False: NaN and Infinity are not JSON; no other client could read them.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _field(obj: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = obj.get(name, default)
    if value is None:
        return default
    # bool is an int subclass in Python; JSON true is not a valid integer field.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadField(name, kind)
    return value


class _BadField(Exception):
    def __init__(self, name: str, kind: type) -> None:
        super().__init__(name)
        self.name = name
        self.kind = kind


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# One decoder for every message (json.loads with options would build one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


# "\ud800".."\udfff": a UTF-16 surrogate escape; paired ones decode to one code point.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value: Any) -> bool:
    """Whether ``value`` re-encodes as UTF-8 JSON (no lone surrogate anywhere in it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_frame(text: str | bytes) -> Frame | DecodeError:
    """Decode one text message (``bytes`` must be UTF-8). Never raises: bad input gives a
    :class:`DecodeError`.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        return DecodeError(ErrorCode.BAD_JSON, f"message is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return DecodeError(ErrorCode.BAD_JSON, "message is not a JSON object")
    raw_id = obj.get("id", "")
    frame_id = raw_id if isinstance(raw_id, str) else ""
    if _SURROGATE_ESCAPE.search(text) is not None and not _encodable(obj):
        return DecodeError(
            ErrorCode.BAD_JSON,
            "message contains a lone UTF-16 surrogate",
            frame_id if _encodable(frame_id) else "",
        )
    try:
        frame_type = _field(obj, "frameType", int, 0)
        message_id = _field(obj, "id", str, "")
        ack_seq = _field(obj, "ackSeq", int, 0)
        method = _field(obj, "method", str, "")
        form_id = _field(obj, "formId", str, "")
        transpond_uid = _field(obj, "transpondUid", str, "")
        reply_to = _field(obj, "replyTo", str, "")
    except _BadField as bad:
        kind = "an integer" if bad.kind is int else "a string"
        return DecodeError(ErrorCode.BAD_FRAME, f"field {bad.name!r} must be {kind}", frame_id)
    if frame_type not in _FRAME_TYPES:
        return DecodeError(
            ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frameType {frame_type}", message_id
        )
    if ack_seq < 0:
        return DecodeError(ErrorCode.BAD_FRAME, "field 'ackSeq' must not be negative", message_id)
    return Frame(
        frame_type=FrameType(frame_type),
        id=message_id,
        ack_seq=ack_seq,
        method=method,
        form_id=form_id,
        transpond_uid=transpond_uid,
        data=obj.get("data"),
        reply_to=reply_to,
    )


def error_frame(code: str, message: str, frame_id: str = "", **extra: Any) -> Frame:
    """Build an ``Err`` frame answering the frame ``frame_id``; ``extra`` goes into ``data``."""
    data: dict[str, Any] = {"code": code, "message": message}
    data.update(extra)
    return Frame(frame_type=FrameType.ERR, id=frame_id, data=data)
