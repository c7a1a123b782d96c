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
import os
import re
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import attrs

from imkit.core._framing import load_speedups

__all__ = (
    "FINAL_ERROR_CODES",
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


FINAL_ERROR_CODES = frozenset(
    {
        ErrorCode.UNKNOWN_METHOD,
        ErrorCode.FORBIDDEN,
        ErrorCode.BAD_FRAME,
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_REQUEST,
        ErrorCode.TOO_LARGE,
        ErrorCode.HANDLER_ERROR,
        ErrorCode.UNKNOWN_FRAME_TYPE,
    }
)
"""``Err`` codes after which sending the same message again cannot succeed; the others
(``rate_limited``, ``overloaded``, ``store_unavailable``, ``expired``) ask for a resend."""


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


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The ``__set__`` of each slot of the attrs class ``cls``, whose fields are ``names``.

    attrs' frozen ``__init__`` sets every field through a bound ``object.__setattr__``; the
    slot descriptors set the same slots for half the cost. An object made with them (and
    ``object.__new__``) is the one ``cls(*values)`` makes: every slot set, still frozen.
    """
    fields = tuple(field.name for field in attrs.fields(cls))
    if fields != names:  # pragma: no cover - a field was added or renamed: update the caller
        raise AssertionError(f"{cls.__name__} has the fields {fields}, not {names}")
    return tuple(cls.__dict__[name].__set__ for name in names)


_FIELDS = ("frame_type", "id", "ack_seq", "method", "form_id", "transpond_uid", "data", "reply_to")
_new = object.__new__
(
    _set_frame_type,
    _set_id,
    _set_ack_seq,
    _set_method,
    _set_form_id,
    _set_transpond_uid,
    _set_data,
    _set_reply_to,
) = _slot_setters(Frame, _FIELDS)


def py_new_frame(
    frame_type: FrameType,
    message_id: str,
    ack_seq: int,
    method: str,
    form_id: str,
    transpond_uid: str,
    data: Any,
    reply_to: str,
) -> Frame:
    """``Frame(frame_type, message_id, ...)``, every field given, for half the cost."""
    frame: Frame = _new(Frame)
    _set_frame_type(frame, frame_type)
    _set_id(frame, message_id)
    _set_ack_seq(frame, ack_seq)
    _set_method(frame, method)
    _set_form_id(frame, form_id)
    _set_transpond_uid(frame, transpond_uid)
    _set_data(frame, data)
    _set_reply_to(frame, reply_to)
    return frame


@attrs.frozen(slots=True)
class DecodeError:
    """Why a text message could not be decoded; ``id`` is the frame's id where it was readable."""

    code: str
    message: str
    id: str = ""


# One encoder for every message: json.dumps with options builds a new one per call.
# allow_nan=False: NaN and Infinity are not JSON; no other client could read them.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_encode_general = _ENCODER.encode
# JSONEncoder.encode builds a C encoder (and a closure) on every call; this one is built
# once, with the same options. Without markers it has no cycle check: a cycle (or data
# nested too deep) ends in RecursionError, and the general encoder says which it was.
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encoder: Any = (
    _make_c_encoder(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if _make_c_encoder is not None
    else None
)


def _encode_json(value: Any) -> str:
    """``_ENCODER.encode(value)``: the same text, or the same exception."""
    if _c_encoder is None:  # pragma: no cover - CPython without its _json module
        return _encode_general(value)
    try:
        return "".join(_c_encoder(value, 0))
    except RecursionError:
        return _encode_general(value)


# The string encoder _ENCODER itself uses (ensure_ascii=False): quotes and escapes a str.
_quote = json.encoder.encode_basestring


_speedups: Any = load_speedups(os.environ)
"""imkit._speedups when it is built and not switched off, else ``None``."""


def _slot_maker(
    cls: type, names: tuple[str, ...], speedups: Any = _speedups
) -> Callable[..., Any] | None:
    """The extension's maker of ``cls`` objects (``slot_maker``): one call, given the values
    of the fields ``names`` (all of the attrs class's, in order), makes what ``cls(*values)``
    makes; ``None`` without the extension (``speedups``)."""
    _slot_setters(cls, names)  # (checks the names)
    if speedups is None:
        return None
    maker: Callable[..., Any] = speedups.slot_maker(
        cls, tuple(cls.__dict__[name] for name in names)
    )
    return maker


_new_frame: Callable[[FrameType, str, int, str, str, str, Any, str], Frame] = (
    _slot_maker(Frame, _FIELDS) or py_new_frame
)

# Its encoder: the same text for the frames the server itself makes (str, 64-bit int,
# bool, None, dicts with str keys, lists); None for any other, which the Python encoder
# writes.
_c_encode_frame: Any = getattr(_speedups, "encode_frame", None)


def _encode_frame_c(frame: Frame) -> str:
    """Encode ``frame`` as one JSON text message (every easy-chat field is always
    present): in C, and in Python (:func:`py_encode_frame`) what the C encoder declines."""
    text: str | None = _c_encode_frame(
        frame.frame_type,
        frame.id,
        frame.ack_seq,
        frame.method,
        frame.form_id,
        frame.transpond_uid,
        frame.data,
        frame.reply_to,
    )
    if text is not None:
        return text
    return py_encode_frame(frame)


def py_encode_frame(frame: Frame) -> str:
    """Encode ``frame`` as one JSON text message (every easy-chat field is always
    present), in Python alone: what :func:`encode_frame` writes, or raises."""
    # The envelope is written directly; only ``data`` goes through the JSON encoder. The
    # output is byte for byte that of _ENCODER on the dict of the fields (tests prove it).
    frame_type = int(frame.frame_type)
    ack_seq = frame.ack_seq
    if type(ack_seq) is not int:  # a bool or a float: the general encoder says what it is
        return _encode_dict(frame, frame_type)
    try:
        head = (
            f'{{"frameType":{frame_type},"id":{_quote(frame.id)},"ackSeq":{ack_seq},'
            f'"method":{_quote(frame.method)},"formId":{_quote(frame.form_id)},'
            f'"transpondUid":{_quote(frame.transpond_uid)},"data":'
        )
        reply_to = frame.reply_to
        tail = f',"replyTo":{_quote(reply_to)}}}' if reply_to else "}"
    except TypeError:  # a field that is not a str: encode it as the general encoder does
        return _encode_dict(frame, frame_type)
    data = frame.data
    return head + ("null" if data is None else _encode_json(data)) + tail


def _encode_dict(frame: Frame, frame_type: int) -> str:
    obj: dict[str, Any] = {
        "frameType": frame_type,
        "id": frame.id,
        "ackSeq": frame.ack_seq,
        "method": frame.method,
        "formId": frame.form_id,
        "transpondUid": frame.transpond_uid,
        "data": frame.data,
    }
    if frame.reply_to:
        obj["replyTo"] = frame.reply_to
    return _encode_json(obj)


encode_frame: Callable[[Frame], str] = (
    py_encode_frame if _c_encode_frame is None else _encode_frame_c
)
"""Encode a :class:`Frame` as one JSON text message (every easy-chat field is always
present): ``encode_frame(frame) -> str``. With the C extension, in C and in Python what it
declines (:func:`py_encode_frame`, the same text); without it, in Python."""


def _encode_ping(message_id: str) -> str:
    """Encode ``Ping{message_id}``: what ``encode_frame`` writes for that frame."""
    return (
        f'{{"frameType":1,"id":{_quote(message_id)},"ackSeq":0,'
        '"method":"","formId":"","transpondUid":"","data":null}'
    )


def _encode_ack(message_id: str, ack_seq: int) -> str:
    """Encode ``Ack{message_id, ack_seq}``: what ``encode_frame`` writes for that frame."""
    return (
        f'{{"frameType":2,"id":{_quote(message_id)},"ackSeq":{ack_seq},'
        '"method":"","formId":"","transpondUid":"","data":null}'
    )


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
# What JSONDecoder.raw_decode calls (it only turns StopIteration into "Expecting value").
_scan_once: Any = _DECODER.scan_once  # type: ignore[attr-defined]
_decode = _DECODER.decode


# "\ud800".."\udfff": a UTF-16 surrogate escape; paired ones decode to one code point.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

_FRAME_TYPE_OF: dict[int, FrameType] = {int(t): t for t in FrameType}
_DATA, _NO_ACK = FrameType.DATA, FrameType.NO_ACK  # cheaper to read than the enum's

# An Ack or a Ping exactly as imkit writes them (_encode_ack, _encode_ping; imkit's
# clients and its chat page send them so), or with only its first three fields (the
# others are their defaults), with an id that has no escape: half of what a server
# reads. Its fields are read off the text, without the JSON decoder; any other text
# (other spacing or order, an escape, a number JSON would refuse or parse otherwise) goes
# through it. The two give the same fields (a Hypothesis test compares them).
_CONTROL_TEXT = re.compile(
    r'\{"frameType":([12]),"id":"([^"\\\x00-\x1f]*)","ackSeq":(0|[1-9][0-9]{0,17})'
    r'(?:,"method":"","formId":"","transpondUid":"","data":null)?\}'
)
_control_text = _CONTROL_TEXT.fullmatch
_CONTROL_DIGITS = ("1", "2")  # the text's 14th character, where the frame type is
_ACK_TYPE, _PING_TYPE = FrameType.ACK, FrameType.PING


_Fields = tuple[FrameType, str, int, str, str, str, Any, str]
"""A decoded frame's fields, in the order of :class:`Frame`'s."""


def py_read_control(text: str, ack: Any, ping: Any) -> _Fields | None:
    """The fields of an Ack or Ping written exactly as imkit writes it (``_CONTROL_TEXT``),
    with ``ack`` or ``ping`` as its type; ``None`` for any other text."""
    control = _control_text(text)
    if control is None:
        return None
    kind, message_id, ack_seq = control.groups()
    # (Neither is a Data or NoAck frame: a server's data_form_id does not apply.)
    return (ack if kind == "2" else ping, message_id, int(ack_seq), "", "", "", None, "")


# The C readings (the extension's read_control, the same reading as py_read_control,
# and read_frame: a whole frame of the JSON clients commonly write, no floats, no
# surrogate escapes, see its source, in an envelope py_decode_fields takes as it is;
# anything else is None, and py_decode_fields reads it; Hypothesis tests compare them)
# are given the frame types by value and, as bits, those whose formId the server sets.
_FRAME_TYPES: tuple[FrameType | None, ...] = tuple(
    _FRAME_TYPE_OF.get(n) for n in range(max(_FRAME_TYPE_OF) + 1)
)
_FORM_TYPES = (1 << FrameType.DATA) | (1 << FrameType.NO_ACK)
# Both C readings in one call (imkit._speedups.read_fields) when the extension is chosen:
# read_control when the text's 14th character is a control frame's type and it takes the
# text, else read_frame.
_read_fields: Any = getattr(_speedups, "read_fields", None)


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
    return _decode_frame(text, None)


def _decode_frame(text: str | bytes, data_form_id: str | None) -> Frame | DecodeError:
    """:func:`decode_frame`; a ``Data`` or ``NoAck`` frame gets ``formId = data_form_id``
    unless that is ``None`` (a server sets the sender it authenticated).
    """
    fields = _decode_fields(text, data_form_id)
    if isinstance(fields, DecodeError):
        return fields
    return _new_frame(*fields)


def _decode_fields_c(text: str | bytes, data_form_id: str | None) -> _Fields | DecodeError:
    """:func:`py_decode_fields`, read in C when the C readings take the text (an Ack or
    Ping as imkit writes it; a frame of the JSON clients commonly write): one call of
    ``imkit._speedups.read_fields`` (:class:`~imkit.core.peer.Peer` makes that call
    itself, without this function around it)."""
    fields = _read_fields(text, data_form_id, _FRAME_TYPES, _FORM_TYPES, _ACK_TYPE, _PING_TYPE)
    if fields is not None:
        return fields  # type: ignore[no-any-return]
    return py_decode_fields(text, data_form_id)


def py_decode_fields(text: str | bytes, data_form_id: str | None) -> _Fields | DecodeError:
    """:func:`_decode_frame`, up to the frame, in Python: its fields (``_new_frame(*fields)``
    is the frame), for a caller that needs only some of them. The reference for the C
    reading (and what reads every frame without the C extension)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if (
            text[13:14] in _CONTROL_DIGITS
            and (control := py_read_control(text, _ACK_TYPE, _PING_TYPE)) is not None
        ):
            return control
        # _DECODER.decode(text): one value from the start; a message that is exactly one
        # value with no surrounding whitespace (what every client writes) needs nothing
        # more. Anything else, an error included, goes through decode(), which says what
        # is wrong (or parses what is around the whitespace).
        try:
            obj, end = _scan_once(text, 0)
        except (StopIteration, ValueError, RecursionError):
            obj = _decode(text)
        else:
            if end != len(text):
                obj = _decode(text)
    except (ValueError, RecursionError) as exc:
        return DecodeError(ErrorCode.BAD_JSON, f"message is not valid JSON: {exc}")
    if type(obj) is not dict:  # the decoder makes plain dicts, never a subclass
        return DecodeError(ErrorCode.BAD_JSON, "message is not a JSON object")
    get = obj.get
    frame_type = get("frameType", 0)
    message_id = get("id", "")
    ack_seq = get("ackSeq", 0)
    method = get("method", "")
    form_id = get("formId", "")
    transpond_uid = get("transpondUid", "")
    reply_to = get("replyTo", "")
    # (Every surrogate escape starts with a backslash; most messages have none.)
    if "\\" in text and _SURROGATE_ESCAPE.search(text) is not None and not _encodable(obj):
        frame_id = message_id if type(message_id) is str else ""
        return DecodeError(
            ErrorCode.BAD_JSON,
            "message contains a lone UTF-16 surrogate",
            frame_id if _encodable(frame_id) else "",
        )
    if not (
        type(frame_type) is int
        and type(message_id) is str
        and type(ack_seq) is int
        and type(method) is str
        and type(form_id) is str
        and type(transpond_uid) is str
        and type(reply_to) is str
    ):
        # A null (the default), or a wrong type: check the fields one by one, in order.
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
            frame_id = message_id if type(message_id) is str else ""
            return DecodeError(ErrorCode.BAD_FRAME, f"field {bad.name!r} must be {kind}", frame_id)
    known_type = _FRAME_TYPE_OF.get(frame_type)
    if known_type is None:
        return DecodeError(
            ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frameType {frame_type}", message_id
        )
    if ack_seq < 0:
        return DecodeError(ErrorCode.BAD_FRAME, "field 'ackSeq' must not be negative", message_id)
    if data_form_id is not None and (known_type is _DATA or known_type is _NO_ACK):
        form_id = data_form_id
    return known_type, message_id, ack_seq, method, form_id, transpond_uid, get("data"), reply_to


# The reading chosen at import: in C first with the extension, else in Python.
_decode_fields: Callable[[str | bytes, str | None], _Fields | DecodeError] = (
    _decode_fields_c if _read_fields is not None else py_decode_fields
)


def error_frame(code: str, message: str, frame_id: str = "", **extra: Any) -> Frame:
    """Build an ``Err`` frame answering the frame ``frame_id``; ``extra`` goes into ``data``."""
    data: dict[str, Any] = {"code": code, "message": message}
    data.update(extra)
    return Frame(frame_type=FrameType.ERR, id=frame_id, data=data)
