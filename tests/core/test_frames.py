"""The wire codec: byte-compatible with easy-chat clients, strict about what it accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imkit.core.frames import (
    DecodeError,
    ErrorCode,
    Frame,
    FrameType,
    _control_text,
    _decode_fields,
    _encode_ack,
    _encode_ping,
    decode_frame,
    encode_frame,
    error_frame,
)

EASY_CHAT_FIELDS = ["frameType", "id", "ackSeq", "method", "formId", "transpondUid", "data"]


def decoded(obj: Any) -> Frame:
    result = decode_frame(json.dumps(obj))
    assert isinstance(result, Frame), result
    return result


def failed(text: str | bytes) -> DecodeError:
    result = decode_frame(text)
    assert isinstance(result, DecodeError), result
    return result


def test_frame_types_have_easy_chats_numbers() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "DATA": 0,
        "PING": 1,
        "ACK": 2,
        "NO_ACK": 3,
        "TRANSPOND": 6,
        "ERR": 9,
    }


def test_encode_writes_every_easy_chat_field_in_order() -> None:
    text = encode_frame(
        Frame(FrameType.DATA, id="m1", method="conversation.chat", form_id="u1", data={"a": 1})
    )
    obj = json.loads(text)
    assert list(obj) == EASY_CHAT_FIELDS
    assert obj == {
        "frameType": 0,
        "id": "m1",
        "ackSeq": 0,
        "method": "conversation.chat",
        "formId": "u1",
        "transpondUid": "",
        "data": {"a": 1},
    }
    # Compact separators, UTF-8 kept as is (what a Go client's encoding/json expects).
    assert text.startswith('{"frameType":0,"id":"m1"')
    assert "你好" in encode_frame(Frame(data="你好"))


def test_reply_to_is_written_only_when_set() -> None:
    assert "replyTo" not in encode_frame(Frame(id="a"))
    obj = json.loads(encode_frame(Frame(id="b", reply_to="a")))
    assert obj["replyTo"] == "a" and list(obj)[:7] == EASY_CHAT_FIELDS


def test_round_trip() -> None:
    frame = Frame(FrameType.TRANSPOND, "x", 2, "m", "f", "t", [1, {"k": None}], "r")
    assert decode_frame(encode_frame(frame)) == frame
    assert decode_frame(encode_frame(frame).encode()) == frame  # UTF-8 bytes work too


def test_absent_fields_take_defaults_and_unknown_fields_are_ignored() -> None:
    assert decoded({}) == Frame()
    frame = decoded({"id": "a", "extra": [1, 2], "frameType": 3, "Method": "ignored"})
    assert frame == Frame(FrameType.NO_ACK, id="a")
    # null is "absent" for every field (Go's encoding/json writes null for nil).
    assert decoded({"id": None, "ackSeq": None, "data": None}) == Frame()


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"id": 5}, "id"),
        ({"frameType": "0"}, "frameType"),
        ({"frameType": 0.0}, "frameType"),
        ({"ackSeq": 1.5}, "ackSeq"),
        ({"ackSeq": True}, "ackSeq"),  # bool is not an int on the wire
        ({"frameType": False}, "frameType"),
        ({"method": ["x"]}, "method"),
        ({"formId": {}}, "formId"),
        ({"transpondUid": 1}, "transpondUid"),
        ({"replyTo": 1}, "replyTo"),
    ],
)
def test_wrong_types_are_bad_frames(obj: dict[str, Any], field: str) -> None:
    error = failed(json.dumps({"id": "m7", **obj}))
    assert error.code == ErrorCode.BAD_FRAME
    assert repr(field) in error.message
    assert error.id == ("" if field == "id" else "m7")  # the id, where it was readable


def test_unknown_frame_type_and_negative_ack_seq() -> None:
    error = failed('{"frameType": 4, "id": "q"}')
    assert (error.code, error.id) == (ErrorCode.UNKNOWN_FRAME_TYPE, "q")
    assert "4" in error.message
    error = failed('{"ackSeq": -1, "id": "q"}')
    assert (error.code, error.id) == (ErrorCode.BAD_FRAME, "q")


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1, 2]", '"a string"', "42", "null", '{"id": "a"', b"\xff\xfe{}"],
)
def test_non_objects_are_bad_json(text: str | bytes) -> None:
    assert failed(text).code == ErrorCode.BAD_JSON


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    # Python's json accepts them; no other client could read them back.
    error = failed(f'{{"id": "a", "data": {constant}}}')
    assert error.code == ErrorCode.BAD_JSON and constant.lstrip("-") in error.message
    with pytest.raises(ValueError):
        encode_frame(Frame(data=float(constant)))


def test_huge_numbers() -> None:
    assert failed('{"ackSeq": 1e400}').code == ErrorCode.BAD_FRAME  # float inf, not an int
    assert failed('{"ackSeq": ' + "9" * 5000 + "}").code == ErrorCode.BAD_JSON
    assert decoded({"ackSeq": 2**70}).ack_seq == 2**70


def test_deep_nesting_is_bad_json_not_a_crash() -> None:
    assert failed("[" * 100_000 + "]" * 100_000).code == ErrorCode.BAD_JSON
    assert failed('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}").code == ErrorCode.BAD_JSON


def test_lone_surrogates_are_bad_json() -> None:
    # Bug found: '{"id": "\\ud800"}' decoded, and the Ack echoing that id then crashed
    # the connection with UnicodeEncodeError (no UTF-8 text can carry a lone surrogate).
    error = failed('{"id": "\\ud800", "frameType": 0}')
    assert (error.code, error.id) == (ErrorCode.BAD_JSON, "")
    error = failed('{"id": "ok", "data": {"k": ["\\udc00"]}}')
    assert (error.code, error.id) == (ErrorCode.BAD_JSON, "ok")
    # A proper surrogate pair (an escaped emoji) is one code point and is fine.
    assert decoded({"data": "\U0001f600"}).data == "\U0001f600"
    assert decode_frame('{"data": "\\ud83d\\ude00"}') == Frame(data="\U0001f600")
    # An escaped backslash followed by "ud800" is plain text.
    assert decode_frame('{"data": "\\\\ud800"}') == Frame(data="\\ud800")


def test_error_frame_shape() -> None:
    frame = error_frame(ErrorCode.RATE_LIMITED, "slow down", "m1", retryAfter=0.5)
    assert frame == Frame(
        FrameType.ERR,
        id="m1",
        data={"code": "rate_limited", "message": "slow down", "retryAfter": 0.5},
    )
    assert json.loads(encode_frame(frame))["data"]["code"] == "rate_limited"


def test_error_codes_are_distinct_strings() -> None:
    codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert len(codes) == 12 and all(isinstance(c, str) and c == c.lower() for c in codes)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=max(10, settings().max_examples // 2))
@given(
    obj=st.dictionaries(
        st.sampled_from([*EASY_CHAT_FIELDS, "replyTo", "x"]), json_values, max_size=8
    )
)
def test_decode_never_raises_and_round_trips_what_it_accepts(obj: dict[str, Any]) -> None:
    result = decode_frame(json.dumps(obj))
    if isinstance(result, Frame):
        assert decode_frame(encode_frame(result)) == result
    else:
        assert result.code in (ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_FRAME_TYPE)


@given(st.binary(max_size=64) | st.text(max_size=64))
def test_decode_never_raises_on_garbage(text: str | bytes) -> None:
    result = decode_frame(text)
    assert isinstance(result, (Frame, DecodeError))


# -- Acks and Pings as imkit writes them: read off the text, as the JSON decoder reads them

_ID_CHARS = st.characters(codec=None, categories=None)  # any code point, surrogates too


@st.composite
def control_texts(draw: st.DrawFn) -> str:
    """A text shaped like _encode_ack / _encode_ping, each part either as imkit writes it
    or something near it that the JSON decoder reads otherwise (or refuses)."""
    # (Each part is imkit's more often than not: then most texts differ in one part.)
    frame_type = draw(
        st.sampled_from(["1", "2"]) | st.sampled_from(["0", "3", "12", "02", "2.0", "-2", " 2"])
    )
    message_id = draw(
        st.text(alphabet="ab-_09:é\U0001f600", max_size=12)  # what imkit's ids look like
        | st.text('a"\\/\x00\n\x1f\x7f\ud800\udfff', max_size=4)  # the awkward ones
        | st.text(_ID_CHARS, max_size=6)
        | st.builds(lambda s: json.dumps(s)[1:-1], st.text(_ID_CHARS, max_size=6))  # escaped
    )
    ack_seq = draw(
        st.integers(0, 10**25).map(str)
        | st.sampled_from(["-1", "-0", "01", "00", "007", "1.0", "1e2", "2 ", "", "true", "null"])
    )
    rest = draw(
        st.sampled_from(["", ',"method":"","formId":"","transpondUid":"","data":null'])
        | st.sampled_from(
            [
                ',"method":"x","formId":"","transpondUid":"","data":null',
                ',"method":"","formId":"","transpondUid":"","data":{}',
                ',"method":"","formId":"","transpondUid":"","data":null,"replyTo":""',
                ',"method":"","formId":"","transpondUid":"","data":null,"frameType":0',
                ',"method":""',
                ',"data":null',
                ',"frameType":0',
                ",",
            ]
        )
    )
    return f'{{"frameType":{frame_type},"id":"{message_id}","ackSeq":{ack_seq}{rest}}}'


_CANONICAL_REST = ',"method":"","formId":"","transpondUid":"","data":null}'


@settings(max_examples=max(200, settings().max_examples * 2))
@given(text=control_texts(), form_id=st.none() | st.just("alice"))
# What a reading off the text could get wrong, each once for certain:
@example(text='{"frameType":2,"id":"a"b","ackSeq":1' + _CANONICAL_REST, form_id=None)
@example(text='{"frameType":2,"id":"a\\"b","ackSeq":1' + _CANONICAL_REST, form_id=None)
@example(text='{"frameType":2,"id":"a\\u0041","ackSeq":1' + _CANONICAL_REST, form_id=None)
@example(text='{"frameType":2,"id":"a\x01","ackSeq":1' + _CANONICAL_REST, form_id=None)
@example(text='{"frameType":2,"id":"a","ackSeq":01' + _CANONICAL_REST, form_id=None)
@example(text='{"frameType":1,"id":"a","ackSeq":-0' + _CANONICAL_REST, form_id="alice")
@example(text='{"frameType":0,"id":"a","ackSeq":0' + _CANONICAL_REST, form_id="alice")
def test_acks_and_pings_as_imkit_writes_them_decode_as_the_json_decoder_reads_them(
    text: str, form_id: str | None
) -> None:
    """The fast reading of an Ack or Ping gives what the JSON decoder gives. The text with
    a space after it never takes the fast reading (it is not exactly imkit's shape), and
    the decoder reads the same value from it: that is the reference."""
    fast = _decode_fields(text, form_id)
    reference = _decode_fields(text + " ", form_id)
    assert fast == reference
    assert decode_frame(text.encode("utf-8", "surrogatepass")) == decode_frame(
        (text + " ").encode("utf-8", "surrogatepass")
    )


def test_the_fast_reading_is_taken_for_what_imkit_writes() -> None:
    """What _encode_ack and _encode_ping write, and an Ack of only its first three fields,
    are read without the JSON decoder; other spacing is not (and both read the same)."""
    for text, kind, seq in (
        (_encode_ack("s-7", 1), FrameType.ACK, 1),
        (_encode_ack("s-7", 2), FrameType.ACK, 2),
        (_encode_ping("p:9"), FrameType.PING, 0),
        ('{"frameType":2,"id":"s-7","ackSeq":1}', FrameType.ACK, 1),
    ):
        assert _control_text(text) is not None
        assert _decode_fields(text, "alice") == (kind, text[21:24], seq, "", "", "", None, "")
        assert _control_text(text + " ") is None
        assert _decode_fields(text + " ", "alice") == _decode_fields(text, "alice")
