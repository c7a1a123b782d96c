"""The C codec functions of ``imkit._speedups`` against the Python ones.

The frame encoder (``encode_frame``) first, then the reading of Acks and Pings
(``read_control``).

``encode_frame`` asks the C encoder first and writes in Python only what it declines
(it answers ``None``). So two things must hold: for the data the server's own frames
carry (str, 64-bit int, bool, None, dicts with str keys, lists, tuples) the C encoder
writes, and writes exactly the Python text; for anything else it declines, and the
frame is still written (or refused) as the Python encoder does.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tests.core.helpers import speedups
from tests.core.test_frames import control_texts

from imkit.core import _framing, frames
from imkit.core.frames import (
    Frame,
    FrameType,
    _decode_fields,
    encode_frame,
    py_encode_frame,
    py_read_control,
)


def c_encode(frame: Frame) -> str | None:
    """What the C encoder makes of ``frame``'s fields (in their order): text or None."""
    return speedups().encode_frame(*attrs.astuple(frame, recurse=False))  # type: ignore[no-any-return]


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Every kind of str: ASCII, Latin-1, BMP, astral, escapes, lone surrogates.
texts = st.text(max_size=12) | st.sampled_from(
    ["", "é", "ÿ\x7f", "中文", "\U0001f600", "\ud800", 'q"\\/', "\x00\x1f\n\r\t\b\f\x0b", "\u2028"]
)
# What the C encoder writes.
supported = st.recursive(
    st.none() | st.booleans() | INT64 | texts,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(texts, inner, max_size=4)
    ),
    max_leaves=12,
)
frame_types = st.sampled_from(FrameType) | st.integers(-3, 300)


@given(
    frame_type=frame_types,
    message_id=texts,
    ack_seq=INT64,
    method=texts,
    form_id=texts,
    transpond_uid=texts,
    data=supported,
    reply_to=texts,
)
def test_the_c_encoder_writes_the_servers_frames_as_python_does(
    frame_type: int,
    message_id: str,
    ack_seq: int,
    method: str,
    form_id: str,
    transpond_uid: str,
    data: Any,
    reply_to: str,
) -> None:
    frame = Frame(frame_type, message_id, ack_seq, method, form_id, transpond_uid, data, reply_to)
    text = c_encode(frame)
    assert text is not None  # written in C, not handed back
    assert text == py_encode_frame(frame)
    assert encode_frame(frame) == text
    assert json.loads(text)["data"] == json.loads(json.dumps(data))


def test_a_chat_push_is_written_in_c() -> None:
    wire = {
        "conversationId": "p:alice:bob",
        "seq": 12,
        "sendId": "alice",
        "recvId": "bob",
        "msgId": "m1",
        "chatType": 1,
        "sendTime": 1764000000000,
        "msg": {"mType": 0, "content": "héllo \U0001f600\n"},
    }
    frame = Frame(FrameType.DATA, "s1", 3, "push", "alice", "", wire)
    assert (
        c_encode(frame)
        == py_encode_frame(frame)
        == (
            '{"frameType":0,"id":"s1","ackSeq":3,"method":"push","formId":"alice",'
            '"transpondUid":"","data":{"conversationId":"p:alice:bob","seq":12,'
            '"sendId":"alice","recvId":"bob","msgId":"m1","chatType":1,'
            '"sendTime":1764000000000,"msg":{"mType":0,"content":"héllo \U0001f600\\n"}}}'
        )
    )


def test_the_output_takes_the_widest_character_of_any_part() -> None:
    # The head is ASCII, the data one-, two- and four-byte strs: one str of the widest.
    for data in (["ÿ"], ["ÿ", "中"], {"中": "\U0001f600"}, ["a" * 70000, "é"]):
        frame = Frame(method="m", data=data)
        text = c_encode(frame)
        assert text == py_encode_frame(frame)
        assert text is not None and max(map(ord, text)) == max(
            max(map(ord, s)) for s in (data if isinstance(data, list) else [*data, *data.values()])
        )


class Kind(IntEnum):
    A = 1


class Text(str):
    pass


class OwnInt(int):
    """An int whose int() is another number: the Python encoder writes that one."""

    def __int__(self) -> int:
        return 7


class Number(int):
    pass


DECLINED = [
    1.5,
    float("nan"),
    2**63,
    -(2**63) - 1,
    10**30,
    Text("x"),
    Number(3),
    Kind.A,
    {1: "int key"},
    {Text("k"): 1},
    b"bytes",
    {"a": [1, 2, {"deep": 1.0}]},
    {"a": set()},
]


@pytest.mark.parametrize("data", DECLINED, ids=repr)
def test_what_the_c_encoder_declines_python_writes_or_refuses(data: Any) -> None:
    frame = Frame(method="m", data=data)
    assert c_encode(frame) is None
    try:
        expected = py_encode_frame(frame)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc), match=str(exc)):
            encode_frame(frame)
    else:
        assert encode_frame(frame) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"id": Text("x")},
        {"ack_seq": True},
        {"ack_seq": 2**64},
        {"ack_seq": 1.0},
        {"method": None},
        {"reply_to": 7},
        {"frame_type": "0"},
        {"frame_type": 2**70},
        {"frame_type": OwnInt(0)},
    ],
    ids=repr,
)
def test_odd_envelope_fields_are_left_to_python(fields: dict[str, Any]) -> None:
    frame = Frame(**fields)
    assert c_encode(frame) is None
    try:
        expected = py_encode_frame(frame)
    except (TypeError, ValueError):
        return  # (a frame_type of "0" cannot be written at all; encode_frame agrees below)
    assert encode_frame(frame) == expected


def test_nesting_deeper_than_the_c_limit_is_written_in_python() -> None:
    shallow: Any = "x"
    for _ in range(32):
        shallow = [shallow]
    assert c_encode(Frame(data=shallow)) is not None
    deep = [shallow]
    assert c_encode(Frame(data=deep)) is None
    assert encode_frame(Frame(data=deep)) == py_encode_frame(Frame(data=deep))


def test_a_cycle_is_refused_as_python_refuses_it() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert c_encode(Frame(data=loop)) is None
    with pytest.raises(ValueError, match="Circular reference"):
        encode_frame(Frame(data=loop))


def test_the_c_encoder_checks_its_arguments() -> None:
    c = speedups()
    with pytest.raises(TypeError, match="8 positional arguments"):
        c.encode_frame(0, "", 0)


def test_the_encoder_follows_the_framing_choice() -> None:
    # One decision for all of the extension: IMKIT_NO_SPEEDUPS switches it all off.
    if _framing.SPEEDUPS:
        assert frames._c_encode_frame is speedups().encode_frame
        assert frames.encode_frame is frames._encode_frame_c
        assert _framing.load_speedups({}) is speedups()
    else:
        assert frames._c_encode_frame is None
        assert frames.encode_frame is py_encode_frame
    assert _framing.load_speedups({"IMKIT_NO_SPEEDUPS": "1"}) is None


# ------------------------------------------------------------------ read_control
ACK, PING = FrameType.ACK, FrameType.PING
REST = ',"method":"","formId":"","transpondUid":"","data":null}'


def mangled(text: str, data: st.DataObject) -> str:
    """``text`` with a character dropped, doubled or replaced somewhere."""
    if not text:
        return text
    at = data.draw(st.integers(0, len(text) - 1))
    how = data.draw(st.sampled_from(["drop", "double", "replace"]))
    if how == "drop":
        return text[:at] + text[at + 1 :]
    if how == "double":
        return text[:at] + text[at] + text[at:]
    return text[:at] + data.draw(st.sampled_from('0129"\\}{ ,:\x00a')) + text[at + 1 :]


@given(text=control_texts(), data=st.data())
@example(text='{"frameType":2,"id":"s-7","ackSeq":1}', data=None)
@example(text='{"frameType":1,"id":"","ackSeq":0' + REST, data=None)
@example(text='{"frameType":2,"id":"é中\U0001f600\ud800","ackSeq":999999999999999999}', data=None)
@example(text='{"frameType":2,"id":"s","ackSeq":1000000000000000000}', data=None)
@example(text='{"frameType":2,"id":"s","ackSeq":00}', data=None)
@example(text='{"frameType":2,"id":"s","ackSeq":}', data=None)
@example(text='{"frameType":2,"id":"s","ackSeq":1' + REST[:-1], data=None)
@example(text='{"frameType":2,"id":"s","ackSeq":1' + REST + "}", data=None)
@example(text='{"frameType":2,"id":"s', data=None)
@example(text='{"frameType":2', data=None)
def test_the_c_reading_of_acks_and_pings_is_the_regular_expressions(
    text: str, data: st.DataObject | None
) -> None:
    texts = [text] if data is None else [text, mangled(text, data)]
    for candidate in texts:
        expected = py_read_control(candidate, ACK, PING)
        got = speedups().read_control(candidate, ACK, PING)
        assert got == expected
        if got is not None:
            assert got[0] is expected[0]  # type: ignore[index]
            assert type(got[1]) is str and type(got[2]) is int


def control(kind: FrameType, message_id: str, ack_seq: int) -> tuple[Any, ...]:
    """The fields of an Ack or Ping, as both readings give them."""
    return (kind, message_id, ack_seq, "", "", "", None, "")


def test_what_imkit_writes_is_read_in_c() -> None:
    c = speedups()
    ack = frames._encode_ack("s-7", 1)
    assert c.read_control(ack, ACK, PING) == control(ACK, "s-7", 1)
    assert c.read_control(frames._encode_ping("p:9"), ACK, PING) == control(PING, "p:9", 0)
    # A data frame is never a control frame; the decoder reads it.
    assert c.read_control(encode_frame(Frame(id="d", method="m")), ACK, PING) is None
    assert _decode_fields(ack, "alice") == control(ACK, "s-7", 1)


def test_the_c_reading_checks_its_arguments() -> None:
    c = speedups()
    with pytest.raises(TypeError, match="3 positional arguments"):
        c.read_control("x")
    with pytest.raises(TypeError, match="text must be a str"):
        c.read_control(b'{"frameType":2,"id":"s","ackSeq":1}', ACK, PING)


def test_the_reading_follows_the_choice() -> None:
    if _framing.SPEEDUPS:
        assert frames._read_control is speedups().read_control
    else:
        assert frames._read_control is py_read_control
