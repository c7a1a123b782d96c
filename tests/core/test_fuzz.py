"""Fuzzing ServerConn: any bytes, in any chunking, never raise and give the same events.

The only outcomes a client can provoke are: an HTTP error answer before the upgrade,
``Err`` frames, ``MessageReceived`` for valid frames (``ErrorReceived`` for its own valid
``Err`` frames), and a ``Closed`` event, last, with a protocol close code.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from imkit.core.conn import ConnLimits, ServerConn
from imkit.core.events import (
    Closed,
    ErrorReceived,
    Event,
    HandshakeRequested,
    HttpRequested,
    MessageReceived,
)
from imkit.core.frames import ErrorCode, Frame, FrameType, decode_frame
from imkit.core.interfaces import Identity

from .helpers import quiet_options, upgrade_request

LIMITS = ConnLimits(
    max_message_size=256, max_fragments=4, max_header_bytes=1024, max_headers=20, ping_interval=None
)
OUR_CLOSE_CODES = {1002, 1003, 1007, 1008, 1009}
HTTP_REFUSALS = {400, 403, 404, 405, 426, 431}
ERR_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}


def valid_close_code(code: int) -> bool:
    """A code a peer may put in a close frame (RFC 6455 §7.4), or 1005 for none."""
    return code in (1000, 1001, 1002, 1003, 1005, 1007, 1008, 1009, 1010, 1011) or (
        3000 <= code <= 4999
    )


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


# ---------------------------------------------------------------------- before the upgrade
header_names = st.sampled_from(
    ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Origin", "X"]
)
header_values = st.one_of(
    st.sampled_from(["websocket", "Upgrade", "13", "8", "dGhlIHNhbXBsZSBub25jZQ==", "null", ""]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
requests = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda method, path, headers: (
            f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        ).encode("latin-1"),
        st.sampled_from(["GET", "POST", "get", "PUT", "G\x00T"]),
        st.sampled_from(["/ws", "/", "/ws?token=x", "*", "/ws/../x", "ws"]),
        st.lists(st.tuples(header_names, header_values), max_size=8),
    ),
    st.builds(lambda cut: upgrade_request()[:cut], st.integers(0, 200)),
    st.builds(
        lambda method, path, version, key, origin, extra: upgrade_request(
            path, method=method, version=version, key=key, origin=origin, extra=extra
        ),
        st.sampled_from(["GET", "GET", "POST"]),
        st.sampled_from(["/ws", "/ws", "/ws?userId=a", "/other"]),
        st.sampled_from(["13", "13", "8", None]),
        st.sampled_from(["dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ==", "short", None]),
        st.sampled_from([None, None, "https://chat.example.com", "null", "https://evil"]),
        st.lists(st.tuples(st.just("X-Pad"), st.just("p" * 60)), max_size=25),
    ),
)


def feed_head(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    conn = ServerConn(now=0.0, limits=LIMITS)
    events: list[Event] = []
    out = b""
    for piece in chunked(data, cuts):
        conn.receive_data(piece, 0.0)
        events += conn.events()
        out += conn.data_to_send()
    return events, out


@given(data=requests, cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_any_bytes_before_the_upgrade(data: bytes, cuts: list[int]) -> None:
    events, out = feed_head(data, cuts)
    closed = [e for e in events if isinstance(e, Closed)]
    assert len(closed) <= 1 and (not closed or events[-1] is closed[0])
    for event in events:
        assert isinstance(event, (HandshakeRequested, HttpRequested, Closed)), event
    if out:
        # Refused before any upgrade: one HTTP error answer, then the end.
        assert out.startswith(b"HTTP/1.1 ") and int(out[9:12]) in HTTP_REFUSALS, out
        assert closed and closed[0].code == 1006
    elif closed:
        assert closed[0].code == 1006  # too much data while a decision was pending
    # The same bytes in one piece give the same result.
    assert feed_head(data, []) == (events, out)


# ---------------------------------------------------------------------- after the upgrade
def ws_frame(first: int, payload: bytes, key: bytes, *, masked: bool = True) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 2**16:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:  # pragma: no cover - the strategies stay small
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


# Interesting text messages, prebuilt (cheap to draw): every frame type, duplicates of
# the same ids, bad types, bad JSON, NaN, lone surrogates, deep nesting, a NoAck id-less one.
SAMPLES = [
    {"frameType": 0, "id": "a", "method": "m", "data": {"x": [1, None]}},
    {"frameType": 0, "id": "b", "method": "m", "formId": "mallory"},
    {"frameType": 0, "method": "m"},
    {"frameType": 3, "id": "n", "method": "m"},
    {"frameType": 3},
    {"frameType": 1, "id": "p"},
    {"frameType": 2, "id": "a", "ackSeq": 1},
    {"frameType": 2, "id": "a", "ackSeq": 2},
    {"frameType": 6, "id": "t", "transpondUid": "bob"},
    {"frameType": 9, "id": "e", "data": {"code": "x", "message": "y"}},
    {"frameType": 4},
    {"frameType": "0", "id": "a"},
    {"frameType": True},
    {"id": 5},
    {"ackSeq": -1, "id": "a"},
    {"ackSeq": 1.5},
    {"replyTo": [], "id": "a"},
    {},
    [],
    "text",
]
RAW_SAMPLES = [json.dumps(obj).encode() for obj in SAMPLES] + [
    b'{"id": "\\ud800"}',
    b'{"data": NaN}',
    b"[" * 2000,
    b"{",
    b"",
]
text_payloads = st.one_of(
    st.sampled_from(RAW_SAMPLES),
    st.sampled_from(RAW_SAMPLES),
    st.binary(max_size=40),
    st.dictionaries(
        st.sampled_from(["frameType", "id", "ackSeq", "method", "data", "x"]),
        st.one_of(st.none(), st.integers(-2, 12), st.text(max_size=4)),
        max_size=5,
    ).map(lambda obj: json.dumps(obj).encode()),
)
first_bytes = st.one_of(
    st.sampled_from([0x81, 0x01, 0x80, 0x00, 0x82, 0x89, 0x8A, 0x88]),
    st.integers(0, 255),
)
valid_text = st.builds(
    lambda p, k: ws_frame(0x81, p, k), text_payloads, st.binary(min_size=4, max_size=4)
)
frames = st.one_of(
    valid_text,
    valid_text,
    valid_text,
    st.builds(
        lambda p, k: ws_frame(0x01, p[:5], k) + ws_frame(0x80, p[5:], k),
        text_payloads,
        st.binary(min_size=4, max_size=4),
    ),
    st.builds(lambda p, k: ws_frame(0x89, p[:125], k), st.binary(max_size=8), st.just(b"abcd")),
    st.builds(
        lambda f, p, k, m: ws_frame(f, p, k, masked=m),
        first_bytes,
        text_payloads,
        st.binary(min_size=4, max_size=4),
        st.booleans(),
    ),
    st.builds(
        lambda code, k: ws_frame(0x88, struct.pack("!H", code), k),
        st.sampled_from([1000, 1001, 1005, 1006, 999, 3000, 4999, 5000]),
        st.binary(min_size=4, max_size=4),
    ),
    st.binary(max_size=12),
)


def open_conn() -> ServerConn:
    conn = ServerConn(now=0.0, limits=LIMITS)
    conn.receive_data(upgrade_request(), 0.0)
    conn.events()
    conn.accept(Identity("alice"), 0.0, options=quiet_options(max_strikes=4))
    conn.data_to_send()
    return conn


def feed_open(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    conn = open_conn()
    events: list[Event] = []
    out = b""
    for piece in chunked(data, cuts):
        conn.receive_data(piece, 1.0)
        events += conn.events()
        out += conn.data_to_send()
    return events, out


def check_output(out: bytes) -> int | None:
    """What the server wrote is valid: imkit frames with known Err codes, pongs, a close."""
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(out)
    close_code = None
    for frame in reader.received_frames():
        assert close_code is None, "nothing is written after a close frame"
        if frame.opcode is Opcode.TEXT:
            decoded = decode_frame(frame.payload)
            assert isinstance(decoded, Frame), decoded
            if decoded.frame_type is FrameType.ERR:
                assert decoded.data["code"] in ERR_CODES
            else:
                assert decoded.frame_type in (FrameType.ACK, FrameType.PING), decoded
        elif frame.opcode is Opcode.CLOSE:
            close_code = int(frame.payload[0])
        else:
            assert frame.opcode is Opcode.PONG
    return close_code


@given(parts=st.lists(frames, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 10**6)))
def test_any_bytes_after_the_upgrade(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    events, out = feed_open(data, cuts)
    closed = [e for e in events if isinstance(e, Closed)]
    assert len(closed) <= 1 and (not closed or events[-1] is closed[0])
    for event in events:
        if isinstance(event, MessageReceived):
            assert event.frame.form_id == "alice"  # never what the client claimed
            assert event.frame.frame_type in (FrameType.DATA, FrameType.NO_ACK)
        elif isinstance(event, Closed):
            if event.by_peer:
                assert valid_close_code(event.code), event
            else:
                assert event.code in OUR_CLOSE_CODES, event
        else:
            assert isinstance(event, ErrorReceived), event
    sent_close = check_output(out)
    if closed and not closed[0].by_peer:
        assert sent_close == closed[0].code
    # Same bytes, one piece: the same events and the same answer.
    assert feed_open(data, []) == (events, out)


@given(
    parts=st.lists(
        st.builds(lambda p, k: ws_frame(0x81, p, k), text_payloads, st.just(b"\x01\x02\x03\x04")),
        min_size=1,
        max_size=10,
    )
)
def test_text_messages_get_an_ack_an_err_or_a_close(parts: list[bytes]) -> None:
    events, out = feed_open(b"".join(parts), [])
    received = [e for e in events if isinstance(e, MessageReceived)]
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(out)
    answers: list[Any] = [
        decode_frame(f.payload) for f in reader.received_frames() if f.opcode is Opcode.TEXT
    ]
    acks = [a for a in answers if a.frame_type is FrameType.ACK]
    # Every ack names a message that arrived as an acked Data frame.
    data_ids = {e.frame.id for e in received if e.frame.frame_type is FrameType.DATA}
    assert {a.id for a in acks} <= data_ids


# ---------------------------------------------------------------------- the client side
responses = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda status, headers, body: (
            (
                f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
            ).encode("latin-1")
            + body
        ),
        st.sampled_from([101, 200, 302, 401, 403, 426, 503, 103]),
        st.lists(st.tuples(header_names, header_values), max_size=5),
        st.binary(max_size=30),
    ),
)


def feed_client(data: bytes, cuts: list[int], *, accepted: bool) -> list[Event]:
    from imkit.core.conn import ClientConn

    client = ClientConn(host="h", target="/ws", now=0.0, limits=LIMITS)
    events: list[Event] = []
    if accepted:
        server = ServerConn(now=0.0, limits=LIMITS)
        server.receive_data(client.data_to_send(), 0.0)
        server.accept(Identity("alice"), 0.0)
        client.receive_data(server.data_to_send(), 0.0)
        events += client.events()
    for piece in chunked(data, cuts):
        client.receive_data(piece, 0.0)
        client.data_to_send()
        events += client.events()
    client.receive_data(None, 0.0)
    return events + client.events()


server_frames = st.one_of(
    st.builds(lambda p: ws_frame(0x81, p, b"", masked=False), text_payloads),
    st.builds(lambda f, p: ws_frame(f, p, b"", masked=False), first_bytes, text_payloads),
    frames,
)


@given(
    data=responses | st.lists(server_frames, max_size=5).map(b"".join),
    cuts=st.lists(st.integers(0, 10**6), max_size=5),
    accepted=st.booleans(),
)
def test_any_bytes_from_a_server_never_crash_a_client(
    data: bytes, cuts: list[int], accepted: bool
) -> None:
    events = feed_client(data, cuts, accepted=accepted)
    closed = [e for e in events if isinstance(e, Closed)]
    assert len(closed) == 1 and events[-1] is closed[0]  # EOF always ends it, once
    assert feed_client(data, [], accepted=accepted) == events
