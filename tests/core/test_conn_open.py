"""An open connection: frames in and out, limits, protocol faults, keepalive, closing."""

from __future__ import annotations

import struct

import pytest
from wsproto.frame_protocol import Opcode

from imkit.core.ack import AckMode, AckTimers
from imkit.core.conn import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    CLOSE_SESSION_REPLACED,
    CLOSE_UNSUPPORTED_DATA,
    ConnLimits,
    ConnState,
    ServerConn,
)
from imkit.core.events import Closed, DeliveryFailed, MessageReceived, RawMessageReceived
from imkit.core.frames import Frame, FrameType, decode_frame
from imkit.core.interfaces import Identity
from imkit.exceptions import LocalProtocolError

from .helpers import (
    WireClient,
    data,
    kinds,
    open_server,
    quiet_options,
    status_of,
    upgrade_request,
)


def masked(first: int, payload: bytes, *, mask: bool = True, length: int | None = None) -> bytes:
    """One raw frame: ``first`` is FIN/RSV/opcode; a zero mask key leaves payload as is."""
    n = len(payload) if length is None else length
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 2**16:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    return head + (b"\0\0\0\0" if mask else b"") + payload


def closed_with(conn: ServerConn, code: int) -> Closed:
    events = conn.events()
    assert events and isinstance(events[-1], Closed), events
    assert events[-1].code == code, events[-1]
    assert conn.closed and conn.next_deadline() is None
    return events[-1]


def test_messages_are_acked_and_dispatched() -> None:
    conn, client = open_server()
    conn.receive_data(client.frame(data("m1", payload={"x": 1})), 1.0)
    (event,) = conn.events()
    assert isinstance(event, MessageReceived) and event.frame.form_id == "alice"
    assert client.read_frames(conn.data_to_send()) == [Frame(FrameType.ACK, id="m1", ack_seq=1)]


def test_frames_sent_before_the_101_are_handled_after_accept() -> None:
    # Bug found: wsproto drops the bytes after the request head, so a client's first
    # message pipelined with its upgrade request (or sent while authentication was
    # pending) vanished silently.
    client = WireClient()
    conn = ServerConn(now=0.0)
    conn.receive_data(upgrade_request() + client.frame(data("early")), 0.0)
    conn.receive_data(client.frame(data("while-deciding")), 0.0)
    conn.events()
    conn.accept(Identity("alice"), 0.0, options=quiet_options())
    received = conn.events()
    assert [e.frame.id for e in received] == ["early", "while-deciding"]  # type: ignore[union-attr]
    response = conn.data_to_send()
    assert status_of(response) == 101
    acks = client.read_frames(response.split(b"\r\n\r\n", 1)[1])
    assert [f.id for f in acks] == ["early", "while-deciding"]


def test_fragmented_message_with_pings_in_between() -> None:
    conn, client = open_server()
    text = '{"frameType":0,"id":"f1","method":"m","data":"' + "é" * 50 + '"}'
    wire = client.text(text[:10], fin=False) + client.ping(b"p1")
    wire += client.proto.send_data(text[10:30], False) + client.pong(b"?")
    wire += client.proto.send_data(text[30:], True)
    conn.receive_data(wire, 0.0)
    (event,) = conn.events()
    assert isinstance(event, MessageReceived) and event.frame.data == "é" * 50
    frames = client.read(conn.data_to_send())
    assert (frames[0].opcode, frames[0].payload) == (Opcode.PONG, b"p1")  # answered at once
    assert frames[1].opcode is Opcode.TEXT


def test_send_and_errors_on_an_open_connection() -> None:
    conn, client = open_server()
    pushed = conn.send("push", {"n": 1}, 0.0)
    conn.send_frame(Frame(FrameType.PING, id="k"), 0.0)
    conn.send_error("bad_request", "no", "m1", 0.0, field="x")
    push, ping, err = client.read_frames(conn.data_to_send())
    assert push == pushed and ping.frame_type is FrameType.PING
    assert err.data == {"code": "bad_request", "message": "no", "field": "x"}
    assert conn.data_to_send() == b""


def test_sends_left_unflushed_go_out_together_at_flush_in_order() -> None:
    conn, client = open_server(options=quiet_options(timers=AckTimers(window=1), max_backlog=1))
    first = conn.send("push", {"n": 1}, 0.0, flush=False)
    second = conn.send("push", {"n": 2}, 0.0, acked=False, flush=False)
    assert conn.data_to_send() == b"" and conn.events() == []  # still with the peer
    conn.flush(0.0)
    assert client.read_frames(conn.data_to_send()) == [first, second]
    conn.flush(0.0)  # nothing left: nothing more
    assert conn.data_to_send() == b""
    # The peer's events and its close request wait for the flush too: past max_backlog
    # (a window of one: the first push still waits for its ack) the push fails and the
    # close starts then.
    conn.send("push", {"n": 3}, 0.0)  # flushed: waits in the backlog's one place
    overflow = conn.send("push", {"n": 4}, 0.0, flush=False)
    assert conn.state is ConnState.OPEN and conn.events() == []
    conn.flush(0.0)
    events = conn.events()
    assert [(type(e), e.frame) for e in events] == [(DeliveryFailed, overflow)]  # type: ignore[attr-defined]
    assert conn.state is ConnState.CLOSING
    assert client.read(conn.data_to_send())[-1].opcode is Opcode.CLOSE


def test_unflushed_sends_go_before_a_close_and_with_the_next_input() -> None:
    conn, client = open_server()
    pushed = conn.send("push", {"n": 1}, 0.0, flush=False)
    conn.close(CLOSE_NORMAL, "bye", 0.0)
    frames = client.read(conn.data_to_send())
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.CLOSE]
    assert decode_frame(frames[0].payload) == pushed
    conn, client = open_server()
    pushed = conn.send("push", {"n": 2}, 0.0, flush=False)
    conn.receive_data(client.frame(data("m1")), 0.0)  # moves the push first, then the ack
    push, ack = client.read_frames(conn.data_to_send())
    assert push == pushed and (ack.frame_type, ack.id) == (FrameType.ACK, "m1")


def test_flush_before_the_handshake_is_a_no_op() -> None:
    conn = ServerConn(now=0.0)
    conn.flush(0.0)
    assert conn.data_to_send() == b"" and conn.events() == []


def test_send_while_room_writes_its_frames_together() -> None:
    conn, client = open_server()
    items = iter([({"n": n}, "bob") for n in range(3)])
    frames = conn.send_while_room("push", items, 0.0, most=2)
    assert client.read_frames(conn.data_to_send()) == frames
    assert [f.data for f in frames] == [{"n": 0}, {"n": 1}] and next(items)[0] == {"n": 2}
    # A bad item raises; what came before it is on the way, what follows is left.
    items = iter([(1, ""), (float("nan"), ""), (3, "")])
    with pytest.raises(ValueError):
        conn.send_while_room("push", items, 0.0, most=9)
    assert [f.data for f in client.read_frames(conn.data_to_send())] == [1]
    assert next(items) == (3, "")
    conn.close(1000, "bye", 1.0)
    with pytest.raises(LocalProtocolError):
        conn.send_while_room("push", items, 1.0, most=9)


def test_binary_message_closes_with_1003() -> None:
    conn, client = open_server()
    conn.receive_data(client.binary(b"\x00\x01"), 0.0)
    closed = closed_with(conn, CLOSE_UNSUPPORTED_DATA)
    assert not closed.by_peer
    assert client.read_close(conn.data_to_send()) == (1003, "binary messages are not supported")


def test_oversized_message_closes_with_1009() -> None:
    limits = ConnLimits(max_message_size=100, ping_interval=None)
    # A header announcing more than the limit is refused before any payload arrives.
    conn, client = open_server(limits=limits)
    conn.receive_data(masked(0x81, b"", length=2**62)[:14], 0.0)
    closed_with(conn, CLOSE_MESSAGE_TOO_BIG)
    assert client.read_close(conn.data_to_send()) == (1009, "message too big")
    # Fragments that are each small but add up past the limit.
    conn, client = open_server(limits=limits)
    conn.receive_data(client.text("a" * 60, fin=False), 0.0)
    assert not conn.closed
    conn.receive_data(client.proto.send_data("é" * 21, False), 0.0)  # 42 bytes, 21 chars
    closed_with(conn, CLOSE_MESSAGE_TOO_BIG)
    # Exactly at the limit is fine.
    conn, client = open_server(limits=limits)
    exact = '{"id":"x","data":"' + "a" * 80 + '"}'
    assert len(exact) == 100
    conn.receive_data(client.text(exact), 0.0)
    assert kinds(conn.events()) == ["MessageReceived"]


def test_too_many_fragments_close_with_1009() -> None:
    conn, client = open_server(limits=ConnLimits(max_fragments=3, ping_interval=None))
    wire = client.text("{", fin=False) + client.proto.send_data("", False)
    wire += client.proto.send_data("", False)
    conn.receive_data(wire, 0.0)
    assert not conn.closed
    conn.receive_data(client.proto.send_data("}", False), 0.0)
    closed_with(conn, CLOSE_MESSAGE_TOO_BIG)
    assert client.read_close(conn.data_to_send()) == (1009, "too many fragments")


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (masked(0x81, b"hi", mask=False), 1002),  # an unmasked client frame (RFC 6455 §5.1)
        (masked(0xC1, b"hi"), 1002),  # RSV1 without an extension
        (masked(0x83, b""), 1002),  # reserved data opcode
        (masked(0x8B, b""), 1002),  # reserved control opcode
        (masked(0x09, b""), 1002),  # fragmented control frame
        (masked(0x89, b"x" * 126), 1002),  # control frame over 125 bytes
        (masked(0x80, b"x"), 1002),  # continuation with nothing to continue
        (masked(0x01, b"{") + masked(0x81, b"}"), 1002),  # new message mid-message
        (masked(0x81, b"\xff"), 1007),  # invalid UTF-8
        (masked(0x01, b"\xe2\x82") + masked(0x80, b"\x28"), 1007),  # split code point
        (masked(0x88, b"\x03"), 1002),  # close with a 1-byte payload
        (masked(0x88, struct.pack("!H", 1005)), 1002),  # a code never sent on the wire
        (masked(0x88, struct.pack("!H", 999)), 1002),
        (masked(0x88, struct.pack("!H", 1000) + b"\xff"), 1007),  # non-UTF-8 reason
    ],
)
def test_protocol_violations_close_with_their_code(wire: bytes, code: int) -> None:
    conn, client = open_server()
    conn.receive_data(wire, 0.0)
    closed = closed_with(conn, code)
    assert not closed.by_peer
    close = client.read_close(conn.data_to_send())
    assert close is not None and close[0] == code


def test_peer_initiated_close_is_echoed() -> None:
    conn, client = open_server()
    conn.receive_data(client.close(4001, "bye"), 0.0)
    assert conn.events() == [Closed(4001, "bye", True)]
    assert client.read_close(conn.data_to_send()) == (4001, "bye")
    conn.receive_data(client.frame(data("late")), 0.0)  # after close: ignored
    assert conn.events() == []
    # An empty close frame means "no status" (1005), echoed as an empty close.
    conn, client = open_server()
    conn.receive_data(client.close(None), 0.0)
    assert conn.events() == [Closed(1005, "", True)]


def test_our_close_waits_for_the_peer_then_ends() -> None:
    conn, client = open_server(limits=ConnLimits(ping_interval=None, close_timeout=5.0))
    pushed = conn.send("push", 1, 0.0)
    conn.close(CLOSE_GOING_AWAY, "server shutting down", 1.0)
    assert conn.state is ConnState.CLOSING and conn.next_deadline() == 6.0
    assert client.read_close(conn.data_to_send()) == (1001, "server shutting down")
    # Frames that arrive after our close are ignored, the message layer is silent.
    conn.receive_data(client.frame(data("late")) + client.binary(b"x"), 2.0)
    assert conn.events() == [] and conn.data_to_send() == b""
    conn.close(1000, "again", 2.0)  # a second close changes nothing
    with pytest.raises(LocalProtocolError):
        conn.send("x", 1, 2.0)
    conn.handle_timeout(3.0)
    assert not conn.closed
    conn.receive_data(client.close(1001), 3.0)
    assert conn.events() == [DeliveryFailed(pushed, "closed"), Closed(1001, "server shutting down")]


def test_our_close_ends_on_timeout_or_eof() -> None:
    conn, _client = open_server(limits=ConnLimits(ping_interval=None, close_timeout=5.0))
    conn.close(CLOSE_SESSION_REPLACED, "session replaced", 0.0)
    conn.handle_timeout(5.0)
    assert conn.events() == [Closed(4000, "session replaced")]
    conn.handle_timeout(50.0)  # nothing more
    conn, _client = open_server()
    conn.close(CLOSE_NORMAL, "bye", 0.0)
    conn.receive_data(None, 0.0)
    assert conn.events() == [Closed(1000, "bye")]


def test_eof_on_an_open_connection_fails_pushes_in_flight() -> None:
    conn, _client = open_server()
    pushed = conn.send("push", 1, 0.0)
    conn.data_to_send()
    conn.receive_data(None, 0.0)
    assert conn.events() == [
        DeliveryFailed(pushed, "closed"),
        Closed(1006, "connection lost", by_peer=True),
    ]
    conn.receive_data(b"\x81", 0.0)
    conn.handle_timeout(100.0)
    assert conn.events() == [] and conn.data_to_send() == b""


def test_keepalive_pings_and_times_out_with_1011() -> None:
    limits = ConnLimits(ping_interval=20.0, ping_timeout=10.0)
    conn, client = open_server(limits=limits)
    assert conn.next_deadline() == 20.0
    conn.handle_timeout(20.0)
    (ping,) = client.read(conn.data_to_send())
    assert ping.opcode is Opcode.PING and conn.next_deadline() == 30.0
    conn.receive_data(client.pong(bytes(ping.payload)), 25.0)
    assert conn.next_deadline() == 45.0  # the next ping, 20 s after the answer
    conn.handle_timeout(45.0)
    client.read(conn.data_to_send())
    conn.handle_timeout(55.0)  # no pong within ping_timeout
    closed_with(conn, CLOSE_INTERNAL_ERROR)
    assert client.read_close(conn.data_to_send()) == (1011, "keepalive ping timeout")


def test_idle_timeout_closes_with_1000() -> None:
    conn, client = open_server(options=quiet_options(idle_timeout=60.0))
    assert conn.next_deadline() == 60.0
    conn.handle_timeout(60.0)
    assert conn.state is ConnState.CLOSING
    assert client.read_close(conn.data_to_send()) == (1000, "idle timeout")


def test_strikes_close_with_1008_after_the_err_frames() -> None:
    conn, client = open_server(options=quiet_options(max_strikes=2))
    conn.receive_data(client.text("nope") + client.text("[]") + client.text("{}"), 0.0)
    frames = client.read(conn.data_to_send())
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.TEXT, Opcode.CLOSE]
    assert frames[2].payload == (1008, "too many bad messages (bad_json)")
    assert conn.state is ConnState.CLOSING
    assert conn.events() == []  # nothing dispatched, not even the valid third frame


def test_resends_are_driven_by_the_deadline() -> None:
    timers = AckTimers(resend_interval=1.0, ack_timeout=3.0, remember_for=10.0)
    conn, client = open_server(options=quiet_options(timers=timers, ack_mode=AckMode.ONLY))
    pushed = conn.send("push", 1, 0.0)
    client.read(conn.data_to_send())
    assert conn.next_deadline() == 1.0
    conn.handle_timeout(1.0)
    assert client.read_frames(conn.data_to_send()) == [pushed]
    conn.handle_timeout(3.0)
    assert conn.events() == [DeliveryFailed(pushed, "timeout")]


# ---------------------------------------------------------------------- raw mode
def open_raw(limits: ConnLimits | None = None) -> tuple[ServerConn, WireClient]:
    conn = ServerConn(now=0.0, raw=True, limits=limits or ConnLimits(ping_interval=None))
    conn.receive_data(upgrade_request(), 0.0)
    conn.events()
    conn.accept(Identity("alice"), 0.0)
    assert b"imkit-ack-mode" not in conn.data_to_send()
    return conn, WireClient()


def test_raw_mode_passes_whole_messages_through() -> None:
    conn, client = open_raw()
    wire = client.text("he", fin=False) + client.proto.send_data("llo", True)
    wire += client.proto.send_data(b"\x00", False) + client.proto.send_data(b"\x01", True)
    conn.receive_data(wire, 0.0)
    assert conn.events() == [RawMessageReceived("hello"), RawMessageReceived(b"\x00\x01")]
    conn.send_raw("text")
    conn.send_raw(b"bin")
    frames = client.read(conn.data_to_send())
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.TEXT, "text"),
        (Opcode.BINARY, b"bin"),
    ]
    conn.close(1000, "", 0.0)
    conn.send_raw("ignored once closing")
    assert client.read(conn.data_to_send()) != []
    conn.send_raw("still ignored")
    assert conn.data_to_send() == b""


def test_raw_mode_limits() -> None:
    conn, client = open_raw(ConnLimits(max_message_size=4, ping_interval=None))
    conn.receive_data(client.proto.send_data(b"abc", False), 0.0)
    conn.receive_data(client.proto.send_data(b"de", True), 0.0)
    closed_with(conn, CLOSE_MESSAGE_TOO_BIG)
    conn, client = open_raw(ConnLimits(max_fragments=1, ping_interval=None))
    wire = client.proto.send_data(b"a", False) + client.proto.send_data(b"b", False)
    conn.receive_data(wire, 0.0)
    closed_with(conn, CLOSE_MESSAGE_TOO_BIG)


def test_send_raw_needs_raw_mode() -> None:
    conn, _client = open_server()
    with pytest.raises(LocalProtocolError, match="raw mode"):
        conn.send_raw("x")
    assert status_of(b"HTTP/1.1 101 x") == 101


def test_a_frame_split_across_reads_is_put_together() -> None:
    conn, client = open_server(limits=ConnLimits(max_message_size=200, ping_interval=None))
    wire = client.frame(data("split", payload="x" * 50))
    conn.receive_data(wire[:20], 0.0)  # the header announces an allowed size: keep reading
    assert conn.events() == [] and not conn.closed
    conn.receive_data(wire[20:], 0.0)
    assert kinds(conn.events()) == ["MessageReceived"]


def test_after_our_close_pings_go_unanswered_and_faults_end_at_once() -> None:
    conn, client = open_server()
    conn.close(1000, "bye", 0.0)
    client.read(conn.data_to_send())
    conn.receive_data(client.ping(b"x"), 0.0)  # we may not send a pong any more
    assert conn.data_to_send() == b"" and not conn.closed
    conn.receive_data(masked(0x83, b""), 0.0)  # a protocol fault while closing
    # Ends at once, with the code of the close frame the client already got.
    assert conn.events() == [Closed(1000, "bye")]
    assert conn.data_to_send() == b""  # our close frame was already sent


def test_raw_mode_keepalive_and_split_frames() -> None:
    conn, client = open_raw(ConnLimits(ping_interval=5.0, ping_timeout=5.0))
    assert conn.next_deadline() == 5.0
    conn.handle_timeout(5.0)
    assert [f.opcode for f in client.read(conn.data_to_send())] == [Opcode.PING]
    wire = client.proto.send_data(b"abcdef", True)
    conn.receive_data(wire[:8], 6.0)
    conn.receive_data(wire[8:], 6.0)
    assert conn.events() == [RawMessageReceived(b"abcdef")]
    conn.handle_timeout(10.0)
    closed_with(conn, CLOSE_INTERNAL_ERROR)
