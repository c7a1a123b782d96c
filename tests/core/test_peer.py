"""The message layer of one connection, as a client sees the server's Peer answer it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from imkit.core.ack import AckMode, AckTimers, Receiver, Sender
from imkit.core.events import (
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    MessageExpired,
    MessageReceived,
)
from imkit.core.frames import ErrorCode, Frame, FrameType, decode_frame, encode_frame
from imkit.core.peer import (
    CLOSE_IDLE,
    CLOSE_POLICY,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_STRIKES,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_LIMIT,
    DEFAULT_STRIKE_WINDOW,
    Peer,
    PeerOptions,
)
from imkit.exceptions import LocalProtocolError

from .helpers import kinds, quiet_options


def server(options: PeerOptions | None = None, **kw: Any) -> Peer:
    return Peer(options or quiet_options(), server=True, now=0.0, user_id="alice", **kw)


def client(options: PeerOptions | None = None, **kw: Any) -> Peer:
    return Peer(options or quiet_options(), server=False, now=0.0, **kw)


def text(**fields: Any) -> str:
    return json.dumps(fields)


def out(peer: Peer) -> list[Frame]:
    frames = []
    for t in peer.outgoing():
        frame = decode_frame(t)
        assert isinstance(frame, Frame)
        frames.append(frame)
    return frames


def test_defaults() -> None:
    options = PeerOptions()
    assert options.ack_mode is AckMode.ONLY and options.timers == AckTimers()
    assert options.idle_timeout == DEFAULT_IDLE_TIMEOUT == 300.0
    assert (options.max_strikes, options.strike_window) == (DEFAULT_MAX_STRIKES, 60.0)
    assert DEFAULT_STRIKE_WINDOW == 60.0
    assert (options.rate_limit, options.rate_burst) == (DEFAULT_RATE_LIMIT, DEFAULT_RATE_BURST)
    assert options.max_backlog == DEFAULT_MAX_BACKLOG
    assert (CLOSE_IDLE, CLOSE_POLICY) == (1000, 1008)


def test_data_is_acked_then_dispatched_with_form_id_set_by_the_server() -> None:
    peer = server()
    peer.receive_text(text(frameType=0, id="m1", method="chat", formId="mallory", data=1), 0.0)
    assert out(peer) == [Frame(FrameType.ACK, id="m1", ack_seq=1)]
    (event,) = peer.events()
    assert isinstance(event, MessageReceived)
    # The client's own formId is never trusted: the authenticated user is written in.
    assert event.frame.form_id == "alice" and event.frame.data == 1
    peer.receive_text(text(frameType=0, id="m2", method="chat"), 0.0)  # empty formId too
    assert peer.events()[0].frame.form_id == "alice"  # type: ignore[union-attr]
    peer.receive_text(text(frameType=0, id="m3", method="chat", formId="alice"), 0.0)
    assert peer.events()[0].frame.form_id == "alice"  # type: ignore[union-attr]


def test_a_client_keeps_the_servers_form_id() -> None:
    peer = client()
    peer.receive_text(text(frameType=0, id="p1", method="push", formId="bob"), 0.0)
    assert peer.events()[0].frame.form_id == "bob"  # type: ignore[union-attr]


def test_noack_frames_are_dispatched_without_ack() -> None:
    peer = server()
    peer.receive_text(text(frameType=3, id="n1", method="typing"), 0.0)
    assert out(peer) == [] and kinds(peer.events()) == ["MessageReceived"]


def test_acked_data_without_an_id_is_refused() -> None:
    # Nothing could ack it, and two such messages would be taken for one (RigorAck used
    # to merge them and drop the second silently).
    peer = server(quiet_options(ack_mode=AckMode.RIGOR))
    peer.receive_text(text(frameType=0, method="chat", data=1), 0.0)
    (err,) = out(peer)
    assert err.frame_type is FrameType.ERR and err.data["code"] == ErrorCode.BAD_FRAME
    assert peer.events() == []
    # Under NoAck nothing is acked, so an id-less message is fine.
    noack = server(quiet_options(ack_mode=AckMode.NONE))
    noack.receive_text(text(frameType=0, method="chat"), 0.0)
    assert kinds(noack.events()) == ["MessageReceived"] and out(noack) == []


def test_unknown_method_gets_err_and_no_ack() -> None:
    peer = server(accepts_method=lambda method: method == "chat")
    peer.receive_text(text(frameType=0, id="m1", method="nope"), 0.0)
    (err,) = out(peer)
    assert err.frame_type is FrameType.ERR and err.id == "m1"
    assert err.data == {"code": "unknown_method", "message": "unknown method 'nope'"}
    assert peer.events() == [] and peer.receiver.state_of("m1").value == "new"
    for _ in range(DEFAULT_MAX_STRIKES + 1):  # a client bug, not an attack: no strikes
        peer.receive_text(text(frameType=0, id="m1", method="nope"), 0.0)
    assert peer.close_request is None
    peer.receive_text(text(frameType=0, id="m2", method="chat"), 0.0)
    assert kinds(peer.events()) == ["MessageReceived"]


def test_app_ping_is_answered_by_the_server_only() -> None:
    peer = server()
    peer.receive_text(text(frameType=1, id="p"), 0.0)
    assert out(peer) == [Frame(FrameType.PING, id="p")]
    other = client()
    other.receive_text(text(frameType=1), 0.0)
    assert out(other) == [] and other.events() == []


def test_transpond_from_a_client_is_forbidden() -> None:
    peer = server()
    peer.receive_text(text(frameType=6, id="t1", transpondUid="bob", data="x"), 0.0)
    (err,) = out(peer)
    assert (err.id, err.data["code"]) == ("t1", ErrorCode.FORBIDDEN)
    assert peer.events() == []
    other = client()  # a client ignores a stray Transpond frame
    other.receive_text(text(frameType=6, id="t1"), 0.0)
    assert out(other) == [] and other.events() == []


def test_err_frames_surface_as_events() -> None:
    peer = client()
    peer.receive_text(text(frameType=9, id="m1", data={"code": "x", "message": "y"}), 0.0)
    (event,) = peer.events()
    assert isinstance(event, ErrorReceived) and event.frame.data["code"] == "x"


def test_bad_frames_get_err_and_strikes_close_with_1008() -> None:
    peer = server(quiet_options(max_strikes=3, strike_window=10.0))
    peer.receive_text("not json", 0.0)
    peer.receive_text(text(id=5), 1.0)
    assert [f.data["code"] for f in out(peer)] == ["bad_json", "bad_frame"]
    assert peer.close_request is None  # the connection stays up
    peer.receive_text(text(frameType=7, id="x"), 2.0)
    (err,) = out(peer)
    assert (err.data["code"], err.id) == ("unknown_frame_type", "x")
    assert peer.close_request == (1008, "too many bad messages (unknown_frame_type)")


def test_strikes_outside_the_window_decay() -> None:
    peer = server(quiet_options(max_strikes=3, strike_window=10.0))
    for now in (0.0, 5.0, 10.0, 15.0, 20.0):  # never three within 10 s
        peer.receive_text("{", now)
    assert peer.close_request is None
    peer.receive_text("{", 21.0)  # 15, 20, 21
    assert peer.close_request is not None and peer.close_request[0] == 1008


def test_rate_limit_answers_rate_limited_then_closes_if_continued() -> None:
    peer = server(quiet_options(rate_limit=2.0, rate_burst=2, max_strikes=3))
    for i in range(2):
        peer.receive_text(text(frameType=0, id=f"m{i}", method="chat"), 0.0)
    assert len(peer.events()) == 2
    out(peer)
    peer.receive_text(text(frameType=0, id="m2", method="chat"), 0.0)
    (err,) = out(peer)
    # Not acked: the client resends the same id after retryAfter seconds.
    assert err.id == "m2" and err.data["code"] == ErrorCode.RATE_LIMITED
    assert err.data["retryAfter"] == 0.5 and peer.events() == []
    peer.receive_text(text(frameType=0, id="m2", method="chat"), 0.25)
    assert out(peer)[0].data["retryAfter"] == 0.25
    # After waiting, the resend goes through.
    peer.receive_text(text(frameType=0, id="m2", method="chat"), 0.75)
    assert kinds(peer.events()) == ["MessageReceived"]
    assert out(peer)[0].frame_type is FrameType.ACK
    # A burst refused within one retry window is one strike: 20 frames at once (sent
    # before the client could read the first refusal) do not close the connection.
    for _ in range(20):
        peer.receive_text(text(frameType=3, id="n", method="chat"), 0.75)
    assert len(out(peer)) == 20 and peer.close_request is None
    # A client that goes on past the time it was told to wait strikes again, once per
    # window: hammering closes it (strikes at 0.0, 0.75, then 1.0: max_strikes 3).
    for _ in range(5):
        peer.receive_text(text(frameType=3, id="n", method="chat"), 1.0)
    assert peer.close_request == (1008, "too many bad messages (rate_limited)")


def test_rate_limit_does_not_count_acks_and_pings() -> None:
    peer = server(quiet_options(rate_limit=1.0, rate_burst=1))
    for _ in range(5):
        peer.receive_text(text(frameType=2, id="x", ackSeq=1), 0.0)
        peer.receive_text(text(frameType=1), 0.0)
    peer.receive_text(text(frameType=0, id="m", method="chat"), 0.0)
    assert kinds(peer.events()) == ["MessageReceived"]


def test_idle_timeout_closes_with_1000() -> None:
    peer = server(quiet_options(idle_timeout=30.0))
    assert peer.next_deadline() == 30.0
    peer.receive_text(text(frameType=1), 10.0)  # any message counts as activity
    assert peer.next_deadline() == 40.0
    peer.handle_timeout(39.0)
    assert peer.close_request is None
    peer.handle_timeout(40.0)
    assert peer.close_request == (CLOSE_IDLE, "idle timeout")


def test_request_close_first_wins() -> None:
    peer = server()
    peer.request_close(4000, "first")
    peer.request_close(1000, "second")
    assert peer.close_request == (4000, "first")


def test_push_is_resent_until_acked_then_delivered() -> None:
    timers = AckTimers(resend_interval=1.0, ack_timeout=3.0, remember_for=10.0)
    peer = server(quiet_options(timers=timers))
    frame = peer.send("push", {"x": 1}, 0.0, form_id="bob")
    assert out(peer) == [frame] and frame.form_id == "bob"
    assert peer.next_deadline() == 1.0
    peer.handle_timeout(1.0)
    assert out(peer) == [frame]
    peer.receive_text(text(frameType=2, id=frame.id, ackSeq=1), 1.5)
    (event,) = peer.events()
    assert isinstance(event, Delivered) and event.frame == frame
    lost = peer.send("push", 2, 2.0)
    peer.handle_timeout(5.0)
    assert peer.events() == [DeliveryFailed(lost, "timeout")]


def test_rigor_push_confirms_and_rigor_receive_expires_visibly() -> None:
    timers = AckTimers(resend_interval=1.0, ack_timeout=3.0, remember_for=10.0)
    peer = server(quiet_options(ack_mode=AckMode.RIGOR, timers=timers))
    frame = peer.send("push", 1, 0.0)
    out(peer)
    peer.receive_text(text(frameType=2, id=frame.id, ackSeq=1), 0.5)
    assert out(peer) == [Frame(FrameType.ACK, id=frame.id, ack_seq=2)]
    assert kinds(peer.events()) == ["Delivered"]
    # Upstream: acked, never confirmed, expired with an Err telling the client to resend.
    peer.receive_text(text(frameType=0, id="u1", method="chat"), 1.0)
    assert out(peer) == [Frame(FrameType.ACK, id="u1", ack_seq=1)]
    peer.handle_timeout(4.0)
    (event,) = peer.events()
    assert isinstance(event, MessageExpired) and event.frame.id == "u1"
    (err,) = out(peer)
    assert (err.id, err.data["code"]) == ("u1", ErrorCode.EXPIRED)
    # A confirmed one is dispatched on the confirmation.
    peer.receive_text(text(frameType=0, id="u2", method="chat"), 5.0)
    peer.receive_text(text(frameType=2, id="u2", ackSeq=2), 5.0)
    assert kinds(peer.events()) == ["MessageReceived"]


def test_noack_send_and_noack_mode() -> None:
    peer = server()
    frame = peer.send("typing", None, 0.0, acked=False)
    assert out(peer) == [frame] and frame.frame_type is FrameType.NO_ACK
    assert peer.sender.in_flight == 0
    noack = server(quiet_options(ack_mode=AckMode.NONE))
    noack.send("push", 1, 0.0)
    assert len(out(noack)) == 1 and noack.next_deadline() is None


def test_send_ids_and_reply_to() -> None:
    peer = server(id_prefix="n-")
    assert peer.new_id() == "n-1"
    frame = peer.send("chat.reply", {}, 0.0, reply_to="m9")
    assert frame.id == "n-2" and frame.reply_to == "m9"
    assert peer.send("x", 1, 0.0, message_id="mine").id == "mine"
    with pytest.raises(LocalProtocolError):
        peer.send("x", 1, 0.0, message_id="mine")
    a, b = server(), server()
    assert a.new_id() != b.new_id()  # random prefixes per peer


def test_unencodable_data_raises_and_sends_nothing() -> None:
    # Bug found: the frame entered the ack machine before it was encoded, so every later
    # resend raised out of handle_timeout().
    peer = server()
    with pytest.raises(TypeError):
        peer.send("push", {1, 2}, 0.0)
    with pytest.raises(ValueError):
        peer.send("push", float("nan"), 0.0)
    with pytest.raises(ValueError):
        peer.send("push", "\ud800", 0.0, acked=False)
    assert peer.sender.in_flight == 0 and peer.outgoing() == []
    peer.handle_timeout(100.0)
    assert peer.sender.next_deadline() is None


def test_backlog_overflow_fails_the_message_and_closes_1008() -> None:
    options = quiet_options(timers=AckTimers(window=1), max_backlog=2)
    peer = server(options)
    for i in range(3):
        peer.send("push", i, 0.0)
    assert peer.sender.backlog == 2 and peer.close_request is None
    frame = peer.send("push", 3, 0.0)
    assert peer.events() == [DeliveryFailed(frame, "overflow")]
    assert peer.close_request == (1008, "send queue full: the client is not reading")


def test_connection_lost_fails_everything_in_flight_on_a_server() -> None:
    peer = server(quiet_options(timers=AckTimers(window=1)))
    first = peer.send("push", 1, 0.0)
    queued = peer.send("push", 2, 0.0)
    assert len(peer.outgoing()) == 1
    peer.connection_lost()
    events = peer.events()
    assert events == [DeliveryFailed(queued, "closed"), DeliveryFailed(first, "closed")]
    assert peer.sender.in_flight == 0 and peer.next_deadline() is None
    peer.connection_lost()  # idempotent
    assert peer.events() == []
    # A closed peer ignores input and fails new sends at once.
    late = peer.send("push", 3, 1.0)
    assert peer.events() == [DeliveryFailed(late, "closed")]
    peer.receive_text(text(frameType=0, id="z", method="chat"), 1.0)
    peer.handle_timeout(1000.0)
    peer.send_error("x", "y")
    assert peer.events() == [] and peer.outgoing() == []


def test_a_client_keeps_its_sender_and_resumes_after_a_reconnect() -> None:
    sender, receiver = Sender(AckMode.RIGOR), Receiver(AckMode.RIGOR)
    options = quiet_options(ack_mode=AckMode.RIGOR)
    first = client(options, sender=sender, receiver=receiver)
    frame = first.send("chat", 1, 0.0, message_id="c1")
    first.receive_text(text(frameType=0, id="s1", method="push"), 0.0)  # awaits confirm
    first.outgoing()
    first.connection_lost(keep_sender=True)
    assert first.events() == [] and sender.in_flight == 1
    second = client(options, sender=sender, receiver=receiver)
    second.resume(1.0)
    # Same id as before, so the server's receiver recognises it; the ack is repeated.
    assert out(second) == [frame, Frame(FrameType.ACK, id="s1", ack_seq=1)]


def test_send_frame_and_send_error_bypass_the_ack_machines() -> None:
    peer = server()
    peer.send_frame(Frame(FrameType.PING, id="k"))
    peer.send_error(ErrorCode.BAD_REQUEST, "no", "m1", field="x")
    ping, err = out(peer)
    assert ping == Frame(FrameType.PING, id="k")
    assert err.data == {"code": "bad_request", "message": "no", "field": "x"}
    assert peer.sender.in_flight == 0


def test_acks_route_by_ack_seq() -> None:
    peer = server(quiet_options(ack_mode=AckMode.RIGOR))
    peer.receive_text(text(frameType=0, id="u", method="m"), 0.0)
    out(peer)
    peer.receive_text(text(frameType=2, id="u", ackSeq=1), 0.0)  # not a confirmation
    assert peer.events() == []
    peer.receive_text(encode_frame(Frame(FrameType.ACK, id="u", ack_seq=2)), 0.0)
    assert kinds(peer.events()) == ["MessageReceived"]


def test_a_repeated_rigor_ack_after_a_reconnect_is_confirmed_again() -> None:
    # Bug found by the delivery property test: the server counted a RigorAck push as
    # Delivered, its confirmation was lost with the connection, and the server's new
    # connection ignored the client's repeated ack: the client expired the push
    # undispatched although the server had reported it delivered.
    options = quiet_options(ack_mode=AckMode.RIGOR)
    identity_receiver = Receiver(AckMode.RIGOR)  # what Registry.receiver() keeps
    old = server(options, receiver=identity_receiver)
    push = old.send("push", 1, 0.0)
    old.outgoing()
    old.receive_text(text(frameType=2, id=push.id, ackSeq=1), 0.1)
    assert kinds(old.events()) == ["Delivered"]
    old.outgoing()  # the confirmation never reaches the client
    old.connection_lost()
    assert old.events() == []  # nothing was in flight any more
    new = server(options, receiver=identity_receiver)
    new.receive_text(text(frameType=2, id=push.id, ackSeq=1), 1.0)  # client's resume()
    assert out(new) == [Frame(FrameType.ACK, id=push.id, ack_seq=2)]
    assert new.events() == []  # still one Delivered, on the old connection
    # A push the old connection gave up on stays given up: never confirmed.
    failed = new.send("push", 2, 1.0)
    new.outgoing()
    new.connection_lost()
    assert new.events() == [DeliveryFailed(failed, "closed")]
    newer = server(options, receiver=identity_receiver)
    newer.receive_text(text(frameType=2, id=failed.id, ackSeq=1), 2.0)
    assert out(newer) == []


def test_a_client_sender_does_not_share_memory_with_its_receiver() -> None:
    peer = client(quiet_options(ack_mode=AckMode.RIGOR))
    peer.receive_text(text(frameType=0, id="x", method="m"), 0.0)
    peer.receive_text(text(frameType=2, id="x", ackSeq=2), 0.0)  # dispatched, remembered
    assert peer.send("chat", 1, 0.0, message_id="x").id == "x"  # our own id space


def err_text(frame_id: str, code: str, **extra: Any) -> str:
    return text(frameType=9, id=frame_id, data={"code": code, "message": "no", **extra})


def test_a_final_err_stops_the_resends_of_the_message_it_answers() -> None:
    """A client's message answered with ``Err{unknown_method}`` is not resent (the server
    would refuse every copy until the ack timeout): the sender forgets it and reports
    ``DeliveryFailed`` with reason ``"refused"``, after the ``ErrorReceived``."""
    peer = client(quiet_options(ack_mode=AckMode.ONLY))
    sent = peer.send("nope", {"n": 1}, 0.0, message_id="m1")
    assert [f.id for f in out(peer)] == ["m1"]
    peer.receive_text(err_text("m1", ErrorCode.UNKNOWN_METHOD), 0.5)
    events = peer.events()
    assert kinds(events) == ["ErrorReceived", "DeliveryFailed"]
    failed = events[1]
    assert isinstance(failed, DeliveryFailed)
    assert (failed.frame, failed.reason) == (sent, "refused")
    assert peer.sender.in_flight == 0
    peer.handle_timeout(10.0)  # past resend_interval and more: nothing is sent again
    assert out(peer) == [] and peer.events() == []


def test_a_retryable_err_leaves_the_message_to_its_resends() -> None:
    peer = client(quiet_options(ack_mode=AckMode.ONLY))
    peer.send("chat", {"n": 1}, 0.0, message_id="m1")
    out(peer)
    peer.receive_text(err_text("m1", ErrorCode.RATE_LIMITED), 0.1)
    assert kinds(peer.events()) == ["ErrorReceived"]
    assert peer.sender.in_flight == 1
    peer.handle_timeout(AckTimers().resend_interval)
    assert [f.id for f in out(peer)] == ["m1"]  # resent, same id


def test_rate_limited_resends_come_when_the_server_said_not_at_the_resend_interval() -> None:
    """``Err{rate_limited, retryAfter}`` moves the message's next resend to then: a short
    wait resends sooner than the resend interval (not a burst's 2 s later), a long one
    later (a resend before it would be refused again, and past its window count as a
    strike), and one past the ack timeout gives the message up at that timeout."""
    timers = AckTimers()  # resend every 2 s, give up after 10 s
    peer = client(quiet_options(ack_mode=AckMode.ONLY))
    for n in (1, 2, 3):
        peer.send("chat", n, 0.0, message_id=f"m{n}")
    out(peer)
    peer.receive_text(err_text("m1", ErrorCode.RATE_LIMITED, retryAfter=0.25), 0.1)
    peer.receive_text(err_text("m2", ErrorCode.RATE_LIMITED, retryAfter=5), 0.1)
    peer.receive_text(err_text("m3", ErrorCode.RATE_LIMITED, retryAfter=60.0), 0.1)
    assert kinds(peer.events()) == ["ErrorReceived"] * 3
    assert peer.next_deadline() == pytest.approx(0.35)
    peer.handle_timeout(0.34)
    assert out(peer) == []
    peer.handle_timeout(0.35)
    assert [f.id for f in out(peer)] == ["m1"]  # then on the resend interval again
    peer.handle_timeout(timers.resend_interval)  # m2 and m3 wait on
    assert out(peer) == []
    peer.handle_timeout(5.09)
    assert [f.id for f in out(peer)] == ["m1"]  # due at 0.35 + the interval
    peer.handle_timeout(5.1)
    assert [f.id for f in out(peer)] == ["m2"]
    for taken in ("m1", "m2"):  # the resends went through
        peer.receive_text(text(frameType=2, id=taken, ackSeq=1), 5.2)
    peer.events()
    peer.handle_timeout(timers.ack_timeout)  # m3 could not be resent in time: given up
    failed = [e for e in peer.events() if isinstance(e, DeliveryFailed)]
    assert [(e.frame.id, e.reason) for e in failed] == [("m3", "timeout")]


def fire_deadlines(peer: Peer, times: int) -> list[tuple[float, str]]:
    """Move to the peer's next deadline ``times`` times: ``(when, id)`` of what it sent."""
    sent: list[tuple[float, str]] = []
    for _ in range(times):
        now = peer.next_deadline()
        assert now is not None
        peer.handle_timeout(now)
        sent += [(round(now, 6), f.id) for f in out(peer)]
    return sent


def test_messages_rate_limited_together_are_resent_one_slot_apart() -> None:
    """Four messages refused at once with ``retryAfter`` 0.1 (the time until the limit
    takes one more) are resent 0.1 s apart, one per freed slot, not as a second burst."""
    peer = client(quiet_options(ack_mode=AckMode.ONLY))
    for n in range(4):
        peer.send("chat", n, 0.0, message_id=f"m{n}")
    out(peer)
    for n in range(4):
        peer.receive_text(err_text(f"m{n}", ErrorCode.RATE_LIMITED, retryAfter=0.1), 0.1)
    resent = fire_deadlines(peer, 4)
    assert resent == [(0.2, "m0"), (0.3, "m1"), (0.4, "m2"), (0.5, "m3")]
    peer.receive_text(err_text("m0", ErrorCode.RATE_LIMITED, retryAfter=0.1), 0.5)
    assert peer.next_deadline() == pytest.approx(0.6)  # after the last slot given out


def test_after_a_rate_limit_new_messages_wait_for_slots_of_their_own() -> None:
    """``Err{rate_limited, retryAfter 0.05, rate 10}``: the refused message goes again in
    0.05 s, and messages sent meanwhile are held for the next slots, 1/rate = 0.1 s apart
    (sent at once, each would be over the limit again: a strike each); once the slots
    have passed, a message goes at once again."""
    peer = client(quiet_options(ack_mode=AckMode.ONLY))
    assert peer.sender.paced_until == -math.inf
    peer.send("chat", 0, 0.0, message_id="m0")
    out(peer)
    peer.receive_text(err_text("m0", ErrorCode.RATE_LIMITED, retryAfter=0.05, rate=10), 0.0)
    peer.events()
    assert peer.sender.paced_until == pytest.approx(0.15)  # the next free slot
    peer.send("chat", 1, 0.01, message_id="m1")
    peer.send("chat", 2, 0.02, message_id="m2")
    assert out(peer) == []  # held: taken, first sent in their slots
    assert peer.sender.in_flight == 3
    sent = fire_deadlines(peer, 3)
    assert sent == [(0.05, "m0"), (0.15, "m1"), (0.25, "m2")]
    peer.send("chat", 3, 0.34, message_id="m3")  # before the next free slot: held
    assert out(peer) == []
    peer.handle_timeout(0.35)
    assert [f.id for f in out(peer)] == ["m3"]
    peer.send("chat", 4, 0.46, message_id="m4")  # past the next one: sent at once
    assert [f.id for f in out(peer)] == ["m4"]


def test_a_message_leaving_the_backlog_while_paced_waits_for_its_slot() -> None:
    """Window 1: ``m1`` waits in the backlog behind ``m0``, which is refused (retryAfter
    0.1, rate 10), resent at 0.1 and acked at 0.15; ``m1`` then takes the window but the
    next slot is 0.2: it goes then, not at once."""
    peer = client(quiet_options(ack_mode=AckMode.ONLY, timers=AckTimers(window=1)))
    peer.send("chat", 0, 0.0, message_id="m0")
    peer.send("chat", 1, 0.0, message_id="m1")
    assert [f.id for f in out(peer)] == ["m0"]
    peer.receive_text(err_text("m0", ErrorCode.RATE_LIMITED, retryAfter=0.1, rate=10), 0.0)
    assert fire_deadlines(peer, 1) == [(0.1, "m0")]
    peer.receive_text(text(frameType=2, id="m0", ackSeq=1), 0.15)
    assert out(peer) == [] and peer.sender.backlog == 0  # taken, held for its slot
    assert fire_deadlines(peer, 1) == [(0.2, "m1")]


def test_a_rate_limited_err_without_a_usable_retry_after_keeps_the_resend_interval() -> None:
    """A ``retryAfter`` that is missing, not a number, negative or NaN, or one for an id
    not in flight, changes nothing: the message is resent on the resend interval."""
    for retry in (None, "soon", True, -1.0, [1], 10**400):
        peer = client(quiet_options(ack_mode=AckMode.ONLY))
        peer.send("chat", 1, 0.0, message_id="m1")
        out(peer)
        extra = {} if retry is None else {"retryAfter": retry}
        peer.receive_text(err_text("m1", ErrorCode.RATE_LIMITED, **extra), 0.1)
        peer.receive_text(err_text("other", ErrorCode.RATE_LIMITED, retryAfter=0.1), 0.1)
        assert peer.next_deadline() == AckTimers().resend_interval, retry
        for bad in (float("nan"), float("inf")):  # (neither can come in JSON)
            assert peer.sender.retry_after("m1", bad, 0.2) is False
        assert peer.next_deadline() == AckTimers().resend_interval
    assert peer.sender.retry_after("gone", 1.0, 0.2) is False
    assert peer.sender.retry_after("m1", 1.0, 0.2, every=float("nan")) is False
    # A rate that is not a positive number (or too large for a float) is left out: the
    # slots are retryAfter apart.
    for rate in (0, -5, "fast", None, 10**400):
        peer = client(quiet_options(ack_mode=AckMode.ONLY))
        for n in range(2):
            peer.send("chat", n, 0.0, message_id=f"m{n}")
        for n in range(2):
            peer.receive_text(
                err_text(f"m{n}", ErrorCode.RATE_LIMITED, retryAfter=0.5, rate=rate), 0.0
            )
        assert peer.next_deadline() == 0.5
        peer.handle_timeout(0.5)
        assert peer.next_deadline() == 1.0, rate


def test_a_final_err_for_an_acked_or_unknown_id_changes_nothing() -> None:
    """A handler's error comes after the ack (the message is delivered), and an Err may
    name an id this end never sent: neither stops or reports anything more."""
    for mode in (AckMode.ONLY, AckMode.RIGOR, AckMode.NONE):
        peer = client(quiet_options(ack_mode=mode))
        peer.send("chat", 1, 0.0, message_id="m1")
        out(peer)
        peer.receive_text(text(frameType=2, id="m1", ackSeq=1), 0.1)
        peer.events()
        out(peer)
        peer.receive_text(err_text("m1", ErrorCode.HANDLER_ERROR), 0.2)
        peer.receive_text(err_text("other", ErrorCode.BAD_REQUEST), 0.2)
        peer.receive_text(err_text("", ErrorCode.BAD_JSON), 0.2)
        peer.receive_text(text(frameType=9, id="m1", data="not a dict"), 0.2)
        assert kinds(peer.events()) == ["ErrorReceived"] * 4
        assert out(peer) == []


def test_a_refusal_makes_room_for_the_backlog() -> None:
    peer = client(quiet_options(ack_mode=AckMode.ONLY, timers=AckTimers(window=1)))
    peer.send("nope", 1, 0.0, message_id="m1")
    peer.send("chat", 2, 0.0, message_id="m2")  # waits for room in the window
    assert [f.id for f in out(peer)] == ["m1"]
    peer.receive_text(err_text("m1", ErrorCode.UNKNOWN_METHOD), 0.1)
    assert [f.id for f in out(peer)] == ["m2"]


def test_send_while_room_sends_what_the_window_takes_and_leaves_the_rest() -> None:
    timers = AckTimers(window=3, resend_interval=1.0, ack_timeout=3.0, remember_for=10.0)
    peer = server(quiet_options(timers=timers))
    items = iter([({"n": n}, f"u{n}") for n in range(5)])
    frames = peer.send_while_room("push", items, 0.0, most=10)
    # The window holds 3: the fourth item is still in the iterator, not taken and lost.
    assert [(f.data, f.form_id) for f in frames] == [({"n": n}, f"u{n}") for n in range(3)]
    assert out(peer) == frames and peer.sender.in_flight == 3
    assert peer.send_while_room("push", items, 0.0, most=10) == []
    peer.receive_text(text(frameType=2, id=frames[0].id, ackSeq=1), 0.5)
    assert kinds(peer.events()) == ["Delivered"]
    (fourth,) = peer.send_while_room("push", items, 0.5, most=10)
    assert fourth.data == {"n": 3} and next(items) == ({"n": 4}, "u4")


def test_send_while_room_stops_at_most_at_the_end_and_at_a_close_request() -> None:
    peer = server()
    items = iter([(n, "") for n in range(5)])
    assert [f.data for f in peer.send_while_room("push", items, 0.0, most=2)] == [0, 1]
    assert [f.data for f in peer.send_while_room("push", items, 0.0, most=9)] == [2, 3, 4]
    assert peer.send_while_room("push", items, 0.0, most=9) == []
    peer.request_close(1000, "bye")
    rest = iter([(9, "")])
    assert peer.send_while_room("push", rest, 0.0, most=9) == [] and next(rest) == (9, "")


def test_send_while_room_on_a_lost_connection_takes_nothing() -> None:
    peer = server()
    peer.connection_lost()
    items = iter([(1, "")])
    assert peer.send_while_room("push", items, 0.0, most=9) == []
    assert next(items) == (1, "") and peer.events() == []


def test_send_while_room_raises_for_bad_data_after_sending_what_came_before() -> None:
    peer = server()
    items = iter([(1, ""), ({1, 2}, ""), (3, "")])
    with pytest.raises(TypeError):
        peer.send_while_room("push", items, 0.0, most=9)
    assert [f.data for f in out(peer)] == [1] and next(items) == (3, "")
