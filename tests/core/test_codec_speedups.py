"""The C codec functions of ``imkit._speedups`` against the Python ones.

The frame encoder (``encode_frame``) first, then the reading of Acks and Pings
(``read_control``), then the reading of whole frames (``read_frame``), then the making of
frames and events in one call (``slot_maker``).

``encode_frame`` asks the C encoder first and writes in Python only what it declines
(it answers ``None``). So two things must hold: for the data the server's own frames
carry (str, 64-bit int, bool, None, dicts with str keys, lists, tuples) the C encoder
writes, and writes exactly the Python text; for anything else it declines, and the
frame is still written (or refused) as the Python encoder does.
"""

from __future__ import annotations

import gc
import json
from enum import IntEnum
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tests.core.helpers import speedups
from tests.core.test_frames import control_texts

from imkit.core import _framing, events, frames
from imkit.core.frames import (
    Frame,
    FrameType,
    _decode_fields,
    encode_frame,
    py_decode_fields,
    py_encode_frame,
    py_new_frame,
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
        assert frames._read_fields is speedups().read_fields
        assert frames._decode_fields is frames._decode_fields_c
    else:
        assert frames._read_fields is None
        assert frames._decode_fields is py_decode_fields


_TEXTS = st.one_of(
    st.builds(frames._encode_ack, st.text(max_size=8), st.integers(0, 3)),
    st.builds(frames._encode_ping, st.text(max_size=8)),
    st.builds(
        lambda t, i, s, d: encode_frame(Frame(t, i, s, "m", data=d)),
        st.sampled_from(list(FrameType)),
        st.text(max_size=8),
        st.integers(0, 3),
        st.one_of(st.none(), st.integers(), st.text(max_size=5)),
    ),
    st.text(max_size=40),
    st.binary(max_size=40),
)


@given(text=_TEXTS, form_id=st.one_of(st.none(), st.just("alice")))
def test_read_fields_is_read_control_then_read_frame(text: Any, form_id: Any) -> None:
    """``read_fields``: the control reading when the 14th character is a control frame's
    type and it takes the text, else the frame reading; None for what neither takes (not
    a str included); what the Python reader gives wherever it gives something."""
    c = speedups()
    args = (form_id, frames._FRAME_TYPES, frames._FORM_TYPES, ACK, PING)
    got = c.read_fields(text, *args)
    if not isinstance(text, str):
        assert got is None
        return
    expected = None
    if text[13:14] in ("1", "2"):
        expected = c.read_control(text, ACK, PING)
    if expected is None:
        expected = c.read_frame(text, form_id, frames._FRAME_TYPES, frames._FORM_TYPES)
    assert got == expected
    if got is not None:
        assert typed(got) == typed(py_decode_fields(text, form_id))
    with pytest.raises(TypeError, match="6 positional arguments"):
        c.read_fields(text, *args[:4])


# ------------------------------------------------------------------ read_frame
def c_read(text: str, form_id: str | None = "alice") -> Any:
    """What the C reader makes of ``text`` (as the server reads, formId ``form_id``)."""
    return speedups().read_frame(text, form_id, frames._FRAME_TYPES, frames._FORM_TYPES)


def typed(value: Any) -> Any:
    """``value`` with the type of every part spelled out: ``1``, ``1.0`` and ``True`` are
    equal in Python, not on the wire."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, FrameType):
        return ("FrameType", int(value))
    return (type(value).__name__, value)


def same_reading(text: str, form_id: str | None = "alice") -> Any:
    """The C reading of ``text``, checked against the Python one where C reads it."""
    got = c_read(text, form_id)
    if got is not None:
        expected = py_decode_fields(text, form_id)
        assert typed(got) == typed(expected), text
        assert got[0] is expected[0]  # type: ignore[index]
        assert frames._decode_fields(text, form_id) == got
    return got


# What clients write: ints within 18 digits, every kind of str (no lone surrogate: a
# client's UTF-8 cannot carry one), nested objects and arrays.
SMALL_INT = st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1)
client_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12
) | st.sampled_from(["", "é", "中文", "\U0001f600", 'q"\\/', "\x00\x1f\n\r\t\b\f", "\u2028"])
client_data = st.recursive(
    st.none() | st.booleans() | SMALL_INT | client_texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(client_texts, inner, max_size=4),
    max_leaves=12,
)
ENVELOPE = {
    "frameType": st.sampled_from([0, 1, 2, 3, 6, 9]),
    "id": client_texts,
    "ackSeq": st.integers(0, 10**18 - 1),
    "method": client_texts,
    "formId": client_texts,
    "transpondUid": client_texts,
    "data": client_data,
    "replyTo": client_texts,
}


@st.composite
def client_frames(draw: st.DrawFn) -> str:
    """A frame as a client may write it: any of the fields, in any order, with json's
    spacing or none, its non-ASCII characters escaped or not."""
    names = draw(st.lists(st.sampled_from(sorted(ENVELOPE)), unique=True))
    obj = {name: draw(ENVELOPE[name]) for name in names}
    spaced = draw(st.booleans())
    return json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=(", ", ": ") if spaced else (",", ":"),
        indent=draw(st.sampled_from([None, None, 1])),
    )


@given(text=client_frames())
@example(text='{"frameType":0,"id":"d1","method":"m","data":{"n":-0,"s":"\\u00e9\\u0000\\/"}}')
@example(text='{"data":["\\ud83d\\ude00", "\\udbff\\udfff", "\\ud800\\udc00"]}')
@example(text=' \t{"id":"x"}\r\n')
@example(text='{"id":"a","id":"b","other":[1,{"k":null}],"data":[],"data":{}}')
@example(text='{"frameType":3,"formId":"me","data":"x"}')
@example(text="{}")
def test_the_c_reader_reads_what_clients_write_as_python_does(text: str) -> None:
    assert same_reading(text) is not None  # read in C, not handed back
    assert same_reading(text, None) is not None


@given(text=client_frames(), data=st.data())
def test_a_mangled_frame_is_read_as_python_reads_it_or_left_to_python(
    text: str, data: st.DataObject
) -> None:
    same_reading(mangled(text, data))


LEFT_TO_PYTHON = [
    # not JSON, or more than one value
    "",
    "[]",
    '"text"',
    "{",
    '{"id":"a"',
    '{"id":"a",}',
    '{"id":"a"} {}',
    '{"id" "a"}',
    '{"data":[1,]}',
    '{"data":[1 2]}',
    '{"data":{"a" 1}}',
    '{"data":{"a":1,}}',
    '{"data":{1:2}}',
    '{"data":tru}',
    "{'id':'a'}",
    # numbers json reads otherwise, or refuses
    '{"data":1.5}',
    '{"data":1e5}',
    '{"data":1E5}',
    '{"data":-}',
    '{"data":01}',
    '{"data":-01}',
    '{"data":NaN}',
    '{"data":Infinity}',
    '{"data":-Infinity}',
    '{"data":1000000000000000000}',
    '{"data":-1000000000000000000}',
    # strings: a control character, an unknown or short escape, a surrogate escape
    '{"data":"a\x01b"}',
    '{"data":"a\\qb"}',
    '{"data":"a\\u12"}',
    '{"data":"a\\u12g4"}',
    '{"data":"\\udc00"}',
    '{"data":"\\ud83d"}',
    '{"data":"\\ud83dx"}',
    '{"data":"\\ud83d\\u0041"}',
    '{"data":"\\ud83d\\udbff"}',
    '{"data":"\\ud83d\\ude0"}',
    '{"data":"open',
    '{"data":"ends with a backslash\\',
    # a top-level key with an escape (json reads "\\u0069d" as "id")
    '{"\\u0069d":"x"}',
    '{"id\\n":"x"}',
    # envelopes the Python reader refuses or reads with its own defaults
    '{"frameType":null}',
    '{"frameType":true}',
    '{"frameType":"0"}',
    '{"frameType":4}',
    '{"frameType":-1}',
    '{"frameType":99999999999999999}',
    '{"id":null}',
    '{"id":5}',
    '{"ackSeq":-1}',
    '{"ackSeq":"1"}',
    '{"method":null}',
    '{"formId":[]}',
    '{"transpondUid":{}}',
    '{"replyTo":false}',
    # nesting past the C reader's limit
    '{"data":' + "[" * 40 + "]" * 40 + "}",
]


@pytest.mark.parametrize("text", LEFT_TO_PYTHON, ids=repr)
def test_what_the_c_reader_leaves_to_python_is_read_in_python(text: str) -> None:
    assert c_read(text) is None
    assert c_read(text, None) is None
    assert frames._decode_fields(text, "alice") == py_decode_fields(text, "alice")


def test_nesting_up_to_the_c_limit_is_read_in_c() -> None:
    deepest = '{"data":' + "[" * 32 + "]" * 32 + "}"
    assert same_reading(deepest) is not None
    assert c_read('{"data":' + "[" * 33 + "]" * 33 + "}") is None


def test_a_chat_message_is_read_in_c_with_the_servers_form_id() -> None:
    text = (
        '{"frameType":0,"id":"c-1","ackSeq":0,"method":"conversation.chat","formId":"mallory",'
        '"transpondUid":"","data":{"recvId":"bob","chatType":1,"msgId":"m-1",'
        '"msg":{"mType":1,"content":"héllo 中 \\ud83d"}}}'
    )
    assert c_read(text) is None  # (a surrogate escape: left to Python)
    text = text.replace("\\ud83d", "\U0001f600\\n")
    fields = same_reading(text)
    assert fields[:6] == (FrameType.DATA, "c-1", 0, "conversation.chat", "alice", "")
    assert fields[6]["msg"] == {"mType": 1, "content": "héllo 中 \U0001f600\n"}
    # Only Data and NoAck frames take the server's formId; a client's own reading keeps it.
    assert same_reading(text, None)[4] == "mallory"
    err = '{"frameType":9,"id":"e","formId":"x","data":{"code":"c","message":"m"}}'
    assert same_reading(err)[4] == "x"


def test_the_c_reader_checks_its_arguments() -> None:
    c = speedups()
    with pytest.raises(TypeError, match="4 positional arguments"):
        c.read_frame("{}")
    with pytest.raises(TypeError, match="takes"):
        c.read_frame(b"{}", None, frames._FRAME_TYPES, 0)
    with pytest.raises(TypeError, match="takes"):
        c.read_frame("{}", 1, frames._FRAME_TYPES, 0)
    with pytest.raises(TypeError, match="takes"):
        c.read_frame("{}", None, list(frames._FRAME_TYPES), 0)
    with pytest.raises(OverflowError):
        c.read_frame("{}", None, frames._FRAME_TYPES, 2**70)


def test_the_frame_reading_follows_the_choice() -> None:
    if _framing.SPEEDUPS:
        assert frames._decode_fields is frames._decode_fields_c
    else:
        assert frames._decode_fields is py_decode_fields


# ------------------------------------------------------------------ slot_maker
# (Frames and events made by the chosen makers and by the Python ones are held to the
# usual ones in test_core_differential.py.)
def test_a_c_made_frame_is_an_ordinary_frozen_frame() -> None:
    data = {"k": ["v"]}
    frame = frames._new_frame(FrameType.ACK, "a", 1, "m", "f", "t", data, "r")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        frame.id = "b"  # type: ignore[misc]
    assert attrs.evolve(frame, id="b").id == "b"
    assert data in gc.get_referents(frame)  # the collector sees what it holds
    assert gc.is_tracked(frame)


def test_the_core_events_are_made_by_the_chosen_makers() -> None:
    pairs = [
        (events._message_received, events._py_message_received),
        (events._delivered, events._py_delivered),
        (events._raw_message_received, events._py_raw_message_received),
    ]
    for chosen, python in pairs:
        if _framing.SPEEDUPS:
            assert type(chosen) is speedups().SlotMaker
        else:
            assert chosen is python


class Other:
    __slots__ = ("a",)


class Properties:
    id = property(lambda self: "")


def test_a_maker_takes_only_object_slots_of_its_class() -> None:
    c = speedups()
    slots = tuple(Frame.__dict__[name] for name in frames._FIELDS)
    with pytest.raises(TypeError, match="2 positional arguments"):
        c.slot_maker(Frame)
    for cls, wrong in (("Frame", slots), (Frame, ()), (Frame, slots + slots[:1]), (Frame, [])):
        with pytest.raises(TypeError, match="a class and a tuple of 1 to 8"):
            c.slot_maker(cls, wrong)
    with pytest.raises(TypeError, match="one of the class's"):
        c.slot_maker(Frame, (Other.__dict__["a"], *slots[1:]))
    with pytest.raises(TypeError, match="one of the class's"):
        c.slot_maker(Properties, (Properties.__dict__["id"],))
    with pytest.raises(TypeError, match="must hold an object"):  # a read-only Py_ssize_t
        c.slot_maker(type, (type.__dict__["__basicsize__"],))
    make = c.slot_maker(Frame, slots[:2])  # the other slots stay unset
    partial = make(FrameType.PING, "p")
    assert partial.id == "p"
    with pytest.raises(AttributeError):
        partial.method  # noqa: B018
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        make(FrameType.PING)
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        make(FrameType.PING, id="p")
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        make(FrameType.PING, "p", id="p")


def test_the_frame_making_follows_the_choice() -> None:
    assert frames._slot_maker(Frame, frames._FIELDS, None) is None
    if _framing.SPEEDUPS:
        assert type(frames._new_frame) is speedups().SlotMaker
    else:
        assert frames._new_frame is py_new_frame
