"""The lean framing path of an open connection against wsproto's.

A connection frames whole text messages itself and takes incoming frames that are
complete, unfragmented, valid UTF-8 text within the limits without wsproto's machinery;
everything else goes to wsproto in order. The property: whatever bytes arrive, split
anywhere, the events and the bytes written are those of the same connection with the
lean path switched off (``_lean = False``, wsproto for all framing). Then each fallback
condition on its own, the tracker that says when wsproto is idle, and the frames written.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from imkit.core import _framing, _wsconn
from imkit.core.ack import AckMode
from imkit.core.conn import ClientConn, ConnLimits, ConnState, ServerConn
from imkit.core.events import Closed, Event, RawMessageReceived
from imkit.core.frames import Frame
from imkit.core.interfaces import Identity
from imkit.core.peer import PeerOptions

from .helpers import WireClient, kinds, naive_mask, quiet_options, speedups, upgrade_request

KEY = b"\x37\xfa\x21\x3d"


@pytest.fixture(autouse=True, scope="module", params=["c", "python"])
def framing(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs twice: the connection framing with the C functions
    (``imkit._speedups``) and with the Python ones (``imkit.core._framing.py_*``)."""
    if request.param == "c":
        c = speedups()
        chosen = (c.read_text, c.frame_texts)
    else:
        chosen = (_framing.py_read_text, _framing.py_frame_texts)
    with pytest.MonkeyPatch.context() as patch:
        for name, function in zip(("_read_text", "_frame_texts"), chosen, strict=True):
            patch.setattr(_wsconn, name, function)
        yield request.param


LIMITS = ConnLimits(max_message_size=300, max_fragments=4, ping_interval=None)


def frame(
    first: int,
    payload: bytes,
    *,
    key: bytes | None = KEY,
    length: int | None = None,
    encoding: str = "",
) -> bytes:
    """One raw frame. ``first`` is FIN/RSV/opcode; ``key=None`` leaves it unmasked;
    ``length`` overrides the announced length; ``encoding`` ("16" or "64") forces a
    longer length encoding than needed."""
    n = len(payload) if length is None else length
    bit = 0 if key is None else 0x80
    if encoding == "64" or (not encoding and n >= 2**16):
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    elif encoding == "16" or (not encoding and n >= 126):
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | n])
    if key is None:
        return head + payload
    return head + key + naive_mask(payload, key)


def text(payload: str, **kw: Any) -> bytes:
    """A whole masked text frame: the lean path's case."""
    return frame(0x81, payload.encode(), **kw)


def message(frame_id: str, body: str = "x") -> str:
    return json.dumps(
        {"frameType": 0, "id": frame_id, "method": "m", "data": body}, ensure_ascii=False
    )


def open_server(
    *, lean: bool = True, raw: bool = False, limits: ConnLimits = LIMITS, early: bytes = b""
) -> ServerConn:
    conn = ServerConn(now=0.0, limits=limits, raw=raw)
    conn._lean = lean
    conn.receive_data(upgrade_request() + early, 0.0)
    conn.events()
    options = quiet_options(max_strikes=2)
    conn.accept(Identity("alice"), 0.0, options=options)
    conn.data_to_send()
    return conn


def spy(conn: ServerConn | ClientConn) -> list[bytes]:
    """Record every chunk of bytes the connection hands to wsproto."""
    got: list[bytes] = []
    ws = conn._ws
    assert ws is not None
    original = ws.receive_data

    def receive(data: bytes | None) -> None:
        assert data is not None
        got.append(bytes(data))
        original(data)

    ws.receive_data = receive  # type: ignore[method-assign]
    return got


def read_frames(data: bytes) -> list[Frame]:
    """The imkit frames a server wrote."""
    return WireClient().read_frames(data)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


def run_both(
    make: Callable[[bool], ServerConn | ClientConn],
    chunks: list[bytes],
    written: Callable[[bytes], Any] = lambda data: data,
) -> None:
    """Feed ``chunks`` to a lean connection and to one on wsproto alone, then the end of
    the stream; after every call both must give the same events and bytes."""
    lean, plain = make(True), make(False)
    assert written(lean.data_to_send()) == written(plain.data_to_send())
    assert lean.events() == plain.events()
    for chunk in [*chunks, None]:
        lean.receive_data(chunk, 1.0)
        plain.receive_data(chunk, 1.0)
        assert lean.events() == plain.events()
        assert written(lean.data_to_send()) == written(plain.data_to_send())
        assert lean.state is plain.state


# ---------------------------------------------------------------------- frames a client sends
keys = st.one_of(st.just(b"\0\0\0\0"), st.binary(min_size=4, max_size=4))
texts = st.one_of(
    st.builds(message, st.text("abcdefgh", min_size=1, max_size=2), st.text(max_size=150)),
    st.builds(message, st.text("abcdefgh", min_size=1, max_size=2), st.text(max_size=150)),
    st.text(max_size=140),  # mostly not an IM frame: an Err and a strike
)
# Mostly what a well-behaved client sends, so that faults do not end every example early.
KINDS = ["text"] * 20 + ["fragmented"] * 5 + ["ping"] * 3 + ["pong", "binary", "big"]
KINDS += ["bad-utf8", "long-encoding", "rsv", "unmasked", "close", "continuation", "huge"]
KINDS += ["opcode", "unfinished"]


@st.composite
def client_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(KINDS))
    key = draw(keys)
    body = draw(texts)
    if kind == "text":
        return text(body, key=key)
    if kind == "unfinished":  # a message's first fragment; what follows may not fit
        return frame(draw(st.sampled_from([0x01, 0x02])), body.encode()[:50], key=key)
    if kind == "big":  # over max_message_size
        return text("x" * draw(st.sampled_from([301, 70000])), key=key)
    if kind == "fragmented":
        raw = body.encode()
        cuts = sorted(draw(st.lists(st.integers(0, len(raw)), min_size=1, max_size=4)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        wire = b""
        for i, piece in enumerate(pieces):
            first = (0x01 if i == 0 else 0x00) | (0x80 if i == len(pieces) - 1 else 0)
            wire += frame(first, piece, key=key)
            if draw(st.booleans()):
                wire += frame(0x89, b"p", key=key)
        return wire
    if kind in ("ping", "pong"):
        return frame(0x89 if kind == "ping" else 0x8A, draw(st.binary(max_size=8)), key=key)
    if kind == "binary":
        return frame(draw(st.sampled_from([0x82, 0x02])), draw(st.binary(max_size=20)), key=key)
    if kind == "bad-utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"]))
        return frame(0x81, body.encode()[:20] + bad, key=key)
    if kind == "long-encoding":
        return text(body, key=key, encoding=draw(st.sampled_from(["16", "64"])))
    if kind == "rsv":
        return frame(draw(st.sampled_from([0xC1, 0xA1, 0x91])), body.encode(), key=key)
    if kind == "unmasked":
        return text(body, key=None)
    if kind == "close":
        return frame(0x88, draw(st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye", b"\x03"])))
    if kind == "continuation":
        return frame(draw(st.sampled_from([0x80, 0x00])), b"x", key=key)
    if kind == "huge":  # a header announcing more than the limit, then a little payload
        return frame(0x81, b"", length=draw(st.sampled_from([301, 70000, 2**40])))[:14] + b"ab"
    return frame(draw(st.sampled_from([0x83, 0x8B, 0x09])), b"", key=key)


@given(
    st.lists(client_frames(), max_size=8),
    st.one_of(st.none(), st.lists(st.integers(0, 5000), max_size=6)),
    st.booleans(),
)
def test_a_server_gives_what_wsproto_alone_gives(
    frames: list[bytes], cuts: list[int] | None, raw: bool
) -> None:
    """``cuts=None``: one read per frame (a frame boundary at every read's start)."""
    chunks = frames if cuts is None else chunked(b"".join(frames), cuts)
    run_both(lambda lean: open_server(lean=lean, raw=raw), chunks)


@given(
    st.lists(client_frames(), max_size=5),
    st.lists(st.integers(0, 5000), max_size=4),
    st.integers(0, 200),
)
def test_bytes_sent_with_the_request_are_the_same_either_way(
    frames: list[bytes], cuts: list[int], early: int
) -> None:
    wire = b"".join(frames)
    early = min(early, len(wire))
    chunks = chunked(wire[early:], cuts)
    run_both(lambda lean: open_server(lean=lean, early=wire[:early]), chunks)


# ---------------------------------------------------------------------- frames a server sends
@st.composite
def server_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text", "text", "ping", "fragmented", "masked", "close"]))
    body = draw(texts)
    if kind == "text":
        return text(body, key=None)
    if kind == "ping":
        return frame(0x89, b"k", key=None)
    if kind == "fragmented":
        raw = body.encode()
        half = len(raw) // 2
        return frame(0x01, raw[:half], key=None) + frame(0x80, raw[half:], key=None)
    if kind == "masked":  # a client must refuse masked frames
        return text(body)
    return frame(0x88, b"\x03\xe8", key=None)


def open_client(lean: bool) -> ClientConn:
    client = ClientConn(
        host="h", target="/ws", now=0.0, limits=LIMITS, options=quiet_options(max_strikes=2)
    )
    client._lean = lean
    return client


def accept_response(client: ClientConn) -> bytes:
    """The server's 101 answer to ``client``'s request."""
    server = ServerConn(now=0.0, limits=LIMITS)
    server.receive_data(client.data_to_send(), 0.0)
    server.events()
    server.accept(Identity("alice"), 0.0, options=quiet_options())
    return server.data_to_send()


def unmasked(data: bytes) -> list[tuple[Opcode, Any, bool]]:
    """What a server reads from a client's (masked, randomly keyed) bytes."""
    reader = FrameProtocol(client=False, extensions=[])
    reader.receive_bytes(data)
    return [(f.opcode, f.payload, f.message_finished) for f in reader.received_frames()]


@given(st.lists(server_frames(), max_size=6), st.lists(st.integers(0, 5000), max_size=6))
def test_a_client_gives_what_wsproto_alone_gives(frames: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frames)
    lean, plain = open_client(True), open_client(False)
    # Both 101 answers have the same length, so the cuts fall at the same places; the
    # frames may come glued to it, as a server's first push can.
    head_lean, head_plain = accept_response(lean), accept_response(plain)
    assert len(head_lean) == len(head_plain)
    lean_chunks = chunked(head_lean + wire, cuts)
    plain_chunks = chunked(head_plain + wire, cuts)
    for lean_chunk, plain_chunk in zip([*lean_chunks, None], [*plain_chunks, None], strict=True):
        lean.receive_data(lean_chunk, 1.0)
        plain.receive_data(plain_chunk, 1.0)
        lean_events, plain_events = lean.events(), plain.events()
        assert lean_events == plain_events
        assert unmasked(lean.data_to_send()) == unmasked(plain.data_to_send())
        assert lean.state is plain.state


# ---------------------------------------------------------------------- each fallback
FALLBACKS = {
    "one byte": (text("x")[:1], LIMITS),
    "not FIN": (frame(0x01, b"{"), LIMITS),
    "binary": (frame(0x82, b"\0"), LIMITS),
    "continuation": (frame(0x80, b"x"), LIMITS),
    "ping": (frame(0x89, b"x"), LIMITS),
    "close": (frame(0x88, b"\x03\xe8"), LIMITS),
    "RSV1": (frame(0xC1, b"{}"), LIMITS),
    "RSV3": (frame(0x91, b"{}"), LIMITS),
    "unmasked": (text("{}", key=None), LIMITS),
    "16-bit length cut": (text("x" * 200)[:3], LIMITS),
    "16-bit length for 2 bytes": (text("{}", encoding="16"), LIMITS),
    "64-bit length cut": (text("x" * 70000)[:9], ConnLimits(max_message_size=2**17)),
    "64-bit length for 200 bytes": (text("x" * 200, encoding="64"), LIMITS),
    "64-bit length, top bit set": (
        frame(0x81, b"", length=2**63 + 5)[:14],
        ConnLimits(max_message_size=2**64),
    ),
    "over max_message_size": (text("x" * 301), LIMITS),
    "payload cut": (text(message("a"))[:-1], LIMITS),
    "mask key cut": (text("")[:4], LIMITS),
    "bad UTF-8": (frame(0x81, b"ok\xff"), LIMITS),
    "surrogate": (frame(0x81, b"\xed\xa0\x80"), LIMITS),
    "no fragments allowed": (text(message("a")), ConnLimits(max_fragments=0)),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_each_unusual_frame_goes_to_wsproto(name: str) -> None:
    wire, limits = FALLBACKS[name]
    conn = open_server(limits=limits)
    assert conn._lean_on
    assert conn._lean_frame(wire, 0, len(wire), 1.0) == 0
    assert conn.events() == [] and conn.data_to_send() == b""
    given = spy(conn)
    conn.receive_data(wire, 1.0)
    assert given == [wire]
    plain = open_server(lean=False, limits=limits)
    plain.receive_data(wire, 1.0)
    assert conn.events() == plain.events()
    assert conn.data_to_send() == plain.data_to_send()


def test_the_outcomes_of_unusual_frames_are_wsprotos() -> None:
    def closed(wire: bytes, limits: ConnLimits = LIMITS) -> tuple[int, str]:
        conn = open_server(limits=limits)
        conn.receive_data(wire, 1.0)
        (*_, last) = conn.events()
        assert isinstance(last, Closed)
        return last.code, last.reason

    assert closed(text("{}", key=None))[0] == 1002
    assert closed(text("{}", encoding="16"))[0] == 1002
    assert (
        closed(frame(0x81, b"", length=2**63 + 5)[:14], ConnLimits(max_message_size=2**64))[0]
        == 1002
    )
    assert closed(frame(0x81, b"ok\xff")) == (1007, "invalid UTF-8 in a text message")
    assert closed(frame(0x81, b"", length=2**40)[:14]) == (1009, "message too big")
    assert closed(frame(0x82, b"\0")) == (1003, "binary messages are not supported")
    assert closed(text(message("a")), ConnLimits(max_fragments=0)) == (
        1009,
        "too many fragments",
    )


def test_simple_frames_skip_wsproto() -> None:
    conn = open_server()
    given = spy(conn)
    conn.receive_data(text(message("a")) + text(message("b", "é" * 100)) + text(""), 1.0)
    assert given == []
    assert kinds(conn.events()) == ["MessageReceived", "MessageReceived"]
    assert [f.frame_type.name for f in read_frames(conn.data_to_send())] == ["ACK", "ACK", "ERR"]
    raw = open_server(raw=True, limits=ConnLimits(max_message_size=2**17))
    given = spy(raw)
    big = "ü" * 40000  # 80,000 bytes: a 64-bit length
    raw.receive_data(text("a" * 200) + text(big, key=b"\0\0\0\0") + text(big), 1.0)
    assert given == []
    assert raw.events() == [RawMessageReceived("a" * 200)] + [RawMessageReceived(big)] * 2


def test_wsproto_gets_whole_runs_and_the_lean_path_resumes_at_its_boundaries() -> None:
    conn = open_server()
    given = spy(conn)
    ping = frame(0x89, b"p")
    fragmented = frame(0x01, b'{"frameType":0,"id":"f",') + ping + frame(0x80, b'"method":"m"}')
    wire = ping + text(message("a")) + fragmented + text(message("b")) + frame(0x8A, b"")
    conn.receive_data(wire, 1.0)
    assert given == [ping, fragmented, frame(0x8A, b"")]
    plain = open_server(lean=False)
    plain.receive_data(wire, 1.0)
    assert conn.events() == plain.events()
    assert conn.data_to_send() == plain.data_to_send()


def test_a_frame_split_across_reads_goes_to_wsproto_until_it_ends() -> None:
    conn = open_server()
    given = spy(conn)
    a, b, c = text(message("a")), text(message("b", "y" * 150)), text(message("c"))
    assert b[1] & 0x7F == 126
    conn.receive_data(a + b[:1], 1.0)  # the first byte of b's header
    conn.receive_data(b[1:3], 1.0)  # its length code and half its 16-bit length
    conn.receive_data(b[3:40], 1.0)  # the rest of the header and some payload
    conn.receive_data(b[40:] + c, 1.0)
    assert given == [b[:1], b[1:3], b[3:40], b[40:]]
    assert kinds(conn.events()) == ["MessageReceived"] * 3


def test_our_close_mid_read_leaves_the_rest_to_wsproto() -> None:
    for trail in (b"", frame(0x89, b"p") + text(message("late")) + frame(0x88, b"\x03\xe8")):
        # Two bad frames strike out (max_strikes=2): our close frame goes out at once.
        wire = text("bad") + text("bad") + trail
        conn, plain = open_server(), open_server(lean=False)
        given = spy(conn)
        conn.receive_data(wire, 1.0)
        plain.receive_data(wire, 1.0)
        assert given == ([trail] if trail else [])
        assert conn.events() == plain.events()
        assert conn.data_to_send() == plain.data_to_send()
        assert conn.state is plain.state is (ConnState.CLOSED if trail else ConnState.CLOSING)
    # The same when the closing message came through wsproto.
    wire = frame(0x01, b"ba") + frame(0x80, b"d") + text("bad") + frame(0x89, b"p")
    conn, plain = open_server(), open_server(lean=False)
    given = spy(conn)
    conn.receive_data(wire, 1.0)
    plain.receive_data(wire, 1.0)
    assert given == [frame(0x01, b"ba") + frame(0x80, b"d"), frame(0x89, b"p")]
    assert conn.events() == plain.events() and conn.state is ConnState.CLOSING
    assert conn.data_to_send() == plain.data_to_send()


def test_the_frames_after_the_one_that_strikes_out_are_not_handled() -> None:
    # The lean frames of a read are pumped once at its end, except the one after which
    # the peer wants to close: our close frame goes out then, and what follows is ignored.
    wire = text("bad") + text("bad") + text(message("late")) + text(message("later"))
    conn, plain = open_server(), open_server(lean=False)
    conn.receive_data(wire, 1.0)
    plain.receive_data(wire, 1.0)
    events = conn.events()
    assert events == plain.events()
    assert "MessageReceived" not in kinds(events)
    assert conn.data_to_send() == plain.data_to_send()
    assert conn.state is plain.state is ConnState.CLOSING


def test_the_frames_of_one_read_give_what_they_give_one_read_each() -> None:
    wire = [text(message(str(i))) for i in range(5)] + [text("bad"), text(message("z"))]
    batched, single = open_server(), open_server()
    batched.receive_data(b"".join(wire), 1.0)
    for part in wire:
        single.receive_data(part, 1.0)
    assert batched.events() == single.events()
    assert batched.data_to_send() == single.data_to_send()
    assert batched.peer is not None and batched.peer._out == [] and batched.peer._events == []


def test_a_whole_text_frame_inside_a_fragmented_message_goes_to_wsproto() -> None:
    for raw, first in ((False, 0x01), (True, 0x01), (True, 0x02)):
        # Each read starts at a frame boundary, the message still in progress.
        reads = [frame(first, b"{")[:3], frame(first, b"{")[3:], frame(0x89, b""), text("}")]
        conn = open_server(raw=raw)
        given = spy(conn)
        for read in reads:
            conn.receive_data(read, 1.0)
        assert given == reads
        (closed,) = conn.events()
        assert isinstance(closed, Closed) and closed.code == 1002


def test_a_close_frame_ends_the_read() -> None:
    conn = open_server()
    conn.receive_data(frame(0x88, b"\x03\xe8") + text(message("after")), 1.0)
    assert conn.events() == [Closed(1000, "", True)]


# ---------------------------------------------------------------------- when wsproto is idle
def test_the_lean_path_waits_for_wsproto_to_be_idle_after_the_handshake() -> None:
    a, b, c, d = (text(message(name)) for name in "abcd")
    conn = open_server(early=a + b[:5])  # a frame cut short after the request
    assert not conn._lean_on
    given = spy(conn)
    conn.receive_data(b[5:] + c, 1.0)  # wsproto takes the whole read, ends idle
    assert given == [b[5:] + c] and conn._lean_on
    conn.receive_data(d, 1.0)
    assert len(given) == 1
    assert kinds(conn.events()) == ["MessageReceived"] * 4
    # A connection closing in the meantime stays on wsproto.
    conn = open_server(early=a[:5])
    conn.close(1000, "bye", 1.0)
    conn.receive_data(a[5:], 1.0)
    assert not conn._lean_on and conn.state is ConnState.CLOSING


@pytest.mark.parametrize(
    ("early", "rest", "idle"),
    [
        (text(message("a")), b"", True),
        (text(message("a"))[:5], text(message("a"))[5:], False),  # bytes buffered
        (text(message("a"))[:6], text(message("a"))[6:], False),  # a header, no payload
        (text(message("a"))[:9], text(message("a"))[9:], False),  # some payload
        (frame(0x01, b"{"), frame(0x80, b"}"), False),  # a message in progress
    ],
)
def test_wsprotos_state_after_the_handshake_decides(early: bytes, rest: bytes, idle: bool) -> None:
    conn = open_server(early=early)
    assert conn._lean_on is idle
    conn.receive_data(rest + text(message("b")), 1.0)
    assert conn._lean_on
    plain = open_server(lean=False, early=early)
    plain.receive_data(rest + text(message("b")), 1.0)
    assert conn.events() == plain.events()
    assert conn.data_to_send() == plain.data_to_send()


def test_wsprotos_private_state_unlike_expected_keeps_it_all_on_wsproto() -> None:
    conn = open_server(early=text("{")[:3])
    proto = conn._frame_protocol()  # a server keeps wsproto's Connection alone
    assert proto is not None
    proto._frame_decoder.buffer.buffer = b""
    conn.receive_data(text("{")[3:], 1.0)
    assert not conn._lean_on
    switched_off = open_server(lean=False)
    assert not switched_off._lean_on


def test_a_client_frames_through_the_lean_path_after_frames_glued_to_the_101() -> None:
    a, b, c, d = (
        text(json.dumps({"frameType": 0, "id": i, "ackSeq": 0, "method": "m"}), key=None)
        for i in "abcd"
    )
    client = open_client(True)
    head = accept_response(client)
    client.receive_data(head + a + b[:4], 0.0)
    assert not client._lean_on
    given = spy(client)
    client.receive_data(b[4:], 0.0)
    assert client._lean_on
    client.receive_data(c + d, 0.0)
    assert len(given) == 1
    assert kinds(client.events()) == ["Connected"] + ["MessageReceived"] * 4
    # Its acks are masked, each with a fresh key.
    out = client.data_to_send()
    assert unmasked(out)[0][0] is Opcode.TEXT and len(unmasked(out)) == 4
    frames, at = [], 0
    while at < len(out):
        n = out[at + 1] & 0x7F
        assert out[at + 1] & 0x80 and n < 126
        frames.append(out[at : at + 6 + n])
        at += 6 + n
    assert len({f[2:6] for f in frames}) == len(frames)


# ---------------------------------------------------------------------- frames written
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70001])
def test_frames_written_are_wsprotos(size: int) -> None:
    payload = "é" * (size // 2) + "a" * (size % 2)
    assert len(payload.encode()) == size
    conn = open_server(raw=True, limits=ConnLimits(max_message_size=2**17))
    conn.send_raw(payload)
    conn.send_raw(payload.encode())
    writer = FrameProtocol(client=False, extensions=[])
    expected = writer.send_data(payload, True) + writer.send_data(payload.encode(), True)
    assert conn.data_to_send() == expected
    plain = open_server(raw=True, lean=False)
    plain.send_raw(payload)
    plain.send_raw(payload.encode())
    assert plain.data_to_send() == expected
    # A client masks, with the same length encodings.
    client = open_client(True)
    client.receive_data(accept_response(client), 0.0)
    assert client.peer is not None
    client.peer._out.append(payload)
    client._flush_peer()
    out = client.data_to_send()
    assert unmasked(out) == [(Opcode.TEXT, payload, True)]
    assert len(out) == len(expected) // 2 + 4


def test_nothing_is_framed_by_a_connection_whose_wsproto_is_not_open() -> None:
    conn = open_server()
    conn.close(1000, "bye", 1.0)
    conn.data_to_send()
    assert conn.peer is not None
    conn.peer._out.append("late")
    conn._flush_peer()
    assert conn.data_to_send() == b""


def test_the_client_server_pair_still_talks() -> None:
    client = ClientConn(
        host="h",
        target="/ws",
        now=0.0,
        limits=LIMITS,
        options=PeerOptions(ack_mode=AckMode.ONLY, idle_timeout=None, rate_limit=None),
    )
    server = ServerConn(now=0.0, limits=LIMITS)
    server.receive_data(client.data_to_send(), 0.0)
    server.events()
    server.accept(Identity("alice"), 0.0, options=quiet_options())
    client.receive_data(server.data_to_send(), 0.0)
    events: list[Event] = list(client.events())
    client.send("m", {"n": 1}, 0.0)
    server.receive_data(client.data_to_send(), 0.0)
    assert kinds(server.events()) == ["MessageReceived"]
    client.receive_data(server.data_to_send(), 0.0)
    events += client.events()
    assert kinds(events) == ["Connected", "Delivered"]
