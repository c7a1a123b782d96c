"""The ack machines' bookkeeping: window and backlog, deadlines, dedupe memory, reconnects."""

from __future__ import annotations

import pytest

from imkit.core.ack import (
    _MIN_COMPACT,
    AckMode,
    AckTimers,
    Delivered,
    Dispatch,
    GaveUp,
    Receiver,
    Role,
    Sender,
    SendFrame,
    State,
)
from imkit.core.frames import Frame, FrameType
from imkit.exceptions import LocalProtocolError

T = AckTimers(resend_interval=1.0, ack_timeout=5.0, remember_for=20.0, max_remembered=3, window=2)


def data(message_id: str, ack_seq: int = 0) -> Frame:
    return Frame(FrameType.DATA, id=message_id, method="m", ack_seq=ack_seq)


def sent_ids(effects: list[object]) -> list[str]:
    return [e.frame.id for e in effects if isinstance(e, SendFrame)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resend_interval": 0.0}, "resend_interval"),
        ({"resend_interval": 10.0, "ack_timeout": 5.0}, "resend_interval"),
        ({"ack_timeout": 40.0, "remember_for": 30.0}, "remember_for"),
        ({"max_remembered": 0}, "positive"),
        ({"window": 0}, "positive"),
    ],
)
def test_timers_reject_inconsistent_bounds(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AckTimers(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_documented_values() -> None:
    timers = AckTimers()
    assert (timers.resend_interval, timers.ack_timeout, timers.remember_for) == (2.0, 30.0, 300.0)
    assert (timers.max_remembered, timers.window) == (10_000, 256)
    assert Sender(AckMode.ONLY).timers == timers and Receiver("rigor").mode is AckMode.RIGOR  # type: ignore[arg-type]


# ---------------------------------------------------------------------- sender
def test_sender_resends_on_its_deadline_until_acked() -> None:
    sender = Sender(AckMode.ONLY, T)
    assert sent_ids(sender.send(data("a"), 0.0)) == ["a"]
    assert sender.state_of("a") is State.AWAIT_ACK and sender.in_flight == 1
    assert sender.next_deadline() == 1.0
    assert sender.handle_timeout(0.5) == []  # not yet due
    assert sent_ids(sender.handle_timeout(1.0)) == ["a"]
    assert sender.next_deadline() == 2.0
    effects = sender.on_ack("a", 2.5)
    assert [type(e) for e in effects] == [Delivered]
    assert sender.state_of("a") is State.DONE and sender.in_flight == 0
    # Only the memory of the delivered id is left to expire.
    assert sender.next_deadline() == 22.5
    assert sender.on_ack("a", 3.0) == []  # a duplicate ack changes nothing


def test_sender_gives_up_at_the_ack_timeout_and_forgets_the_id() -> None:
    sender = Sender(AckMode.RIGOR, T)
    sender.send(data("a"), 0.0)
    resent = 0
    now = 0.0
    while True:
        deadline = sender.next_deadline()
        assert deadline is not None
        now = deadline
        effects = sender.handle_timeout(now)
        if any(isinstance(e, GaveUp) for e in effects):
            break
        resent += len(sent_ids(effects))
    assert now == 5.0 and resent == 4
    (gave_up,) = effects
    assert isinstance(gave_up, GaveUp) and gave_up.role is Role.SENDER
    assert sender.state_of("a") is State.NEW and sender.next_deadline() is None
    # A late ack of a message reported failed is ignored: no confirmation, no Delivered.
    assert sender.on_ack("a", 6.0) == []
    # The application may retry with the same id.
    assert sent_ids(sender.send(data("a"), 7.0)) == ["a"]


def test_rigor_sender_confirms_every_ack_of_a_delivered_id() -> None:
    sender = Sender(AckMode.RIGOR, T)
    sender.send(data("a"), 0.0)
    first = sender.on_ack("a", 0.1)
    assert isinstance(first[0], SendFrame) and first[0].frame == Frame(
        FrameType.ACK, id="a", ack_seq=2
    )
    assert isinstance(first[1], Delivered)
    # The receiver resends its ack because our confirmation was lost: confirm again.
    again = sender.on_ack("a", 1.0)
    assert [e.frame for e in again if isinstance(e, SendFrame)] == [
        Frame(FrameType.ACK, id="a", ack_seq=2)
    ]


def test_sender_ids_must_be_fresh_and_non_empty() -> None:
    sender = Sender(AckMode.ONLY, T)
    sender.send(data("a"), 0.0)
    with pytest.raises(LocalProtocolError, match="already in use"):
        sender.send(data("a"), 0.0)
    sender.on_ack("a", 0.0)
    with pytest.raises(LocalProtocolError, match="already in use"):
        sender.send(data("a"), 1.0)  # still remembered
    with pytest.raises(LocalProtocolError, match="non-empty id"):
        sender.send(data(""), 1.0)


def test_noack_sender_sends_once_and_remembers_nothing() -> None:
    sender = Sender(AckMode.NONE, T)
    assert sent_ids(sender.send(data("a"), 0.0)) == ["a"]
    assert sent_ids(sender.send(data("a"), 0.0)) == ["a"]  # no memory: no id check
    assert sent_ids(sender.send(data(""), 0.0)) == [""]
    assert sender.in_flight == 0 and sender.remembered == 0 and sender.next_deadline() is None
    assert sender.on_ack("a", 1.0) == []


def test_window_holds_later_messages_in_the_backlog() -> None:
    sender = Sender(AckMode.ONLY, T)
    assert sent_ids(sender.send(data("a"), 0.0)) == ["a"]
    assert sender.has_room()
    assert sent_ids(sender.send(data("b"), 0.0)) == ["b"]
    assert not sender.has_room()  # window of 2 is full
    assert sender.send(data("c"), 0.0) == []
    assert sender.send(data("d"), 0.0) == []
    assert sender.backlog == 2 and sender.in_flight == 2
    assert [f.id for f in sender.pending()] == ["a", "b"]
    # An ack makes room: the oldest waiting message goes out at once, in order.
    assert sent_ids(sender.on_ack("b", 1.0)) == ["c"]
    # A give-up makes room too ("c", still waiting, is resent on its deadline).
    effects = sender.handle_timeout(5.0)
    assert [type(e).__name__ for e in effects] == ["GaveUp", "SendFrame", "SendFrame"]
    assert effects[0].frame.id == "a" and sent_ids(effects) == ["c", "d"]
    assert sender.backlog == 0 and not sender.has_room()  # c and d fill the window
    sender.on_ack("c", 6.0)
    assert sender.has_room()


def test_an_id_waiting_in_the_backlog_cannot_be_sent_twice() -> None:
    # Bug found: a second message with a queued id used to go out after the first was
    # delivered, overwriting its state and reporting Delivered twice.
    sender = Sender(AckMode.ONLY, AckTimers(window=1))
    sender.send(data("a"), 0.0)
    sender.send(data("b"), 0.0)
    with pytest.raises(LocalProtocolError, match="already queued"):
        sender.send(data("b"), 0.0)
    assert sent_ids(sender.on_ack("a", 1.0)) == ["b"]
    assert [type(e) for e in sender.on_ack("b", 1.0)] == [Delivered]
    assert sender.in_flight == 0 and sender.backlog == 0


def test_drop_backlog_returns_unsent_messages_and_frees_their_ids() -> None:
    sender = Sender(AckMode.ONLY, AckTimers(window=1))
    sender.send(data("a"), 0.0)
    sender.send(data("b"), 0.0)
    assert [f.id for f in sender.drop_backlog()] == ["b"]
    assert sender.backlog == 0
    assert sender.send(data("b"), 0.0) == []  # the id is free again (queued behind "a")


def test_resend_all_sends_everything_in_flight_with_the_same_ids() -> None:
    sender = Sender(AckMode.ONLY, T)
    sender.send(data("a"), 0.0)
    sender.send(data("b"), 0.5)
    assert sent_ids(sender.resend_all(0.8)) == ["a", "b"]
    # The resend timers restart from now, the give-up times do not move.
    assert sender.next_deadline() == 1.8
    effects = sender.handle_timeout(5.0)
    assert [e.frame.id for e in effects if isinstance(e, GaveUp)] == ["a"]


def test_deadline_at_time_zero_is_reported() -> None:
    # Bug found: a deadline of exactly 0.0 was dropped as falsy, so the message was never
    # resent nor given up (monotonic clocks may be at any value, including 0 and below).
    sender = Sender(AckMode.ONLY, AckTimers(resend_interval=1.0, ack_timeout=1.0, remember_for=1))
    sender.send(data("a"), -1.0)
    assert sender.next_deadline() == 0.0
    assert [type(e) for e in sender.handle_timeout(0.0)] == [GaveUp]


# ---------------------------------------------------------------------- receiver
def test_onlyack_receiver_acks_every_copy_and_dispatches_the_first() -> None:
    receiver = Receiver(AckMode.ONLY, T)
    first = receiver.on_data(data("a"), 0.0)
    assert [type(e) for e in first] == [SendFrame, Dispatch]
    assert first[0].frame == Frame(FrameType.ACK, id="a", ack_seq=1)
    again = receiver.on_data(data("a"), 1.0)
    assert [type(e) for e in again] == [SendFrame]
    assert receiver.state_of("a") is State.DONE and receiver.remembered == 1
    # easy-chat's OnlyAck answers ackSeq + 1.
    assert receiver.on_data(data("b", ack_seq=4), 1.0)[0].frame.ack_seq == 5  # type: ignore[union-attr]


def test_rigorack_receiver_waits_for_the_confirmation() -> None:
    receiver = Receiver(AckMode.RIGOR, T)
    effects = receiver.on_data(data("a"), 0.0)
    assert [e.frame for e in effects] == [Frame(FrameType.ACK, id="a", ack_seq=1)]
    assert receiver.state_of("a") is State.AWAIT_CONFIRM
    # A resent copy with another ackSeq replaces the stored frame; still one message.
    receiver.on_data(data("a", ack_seq=1), 0.2)
    assert receiver.pending()[0].ack_seq == 1
    # Our ack is resent until the confirmation comes.
    assert sent_ids(receiver.handle_timeout(1.2)) == ["a"]
    (dispatch,) = receiver.on_confirm("a", 1.5)
    assert isinstance(dispatch, Dispatch) and dispatch.frame.ack_seq == 1
    assert receiver.on_confirm("a", 1.6) == []  # duplicate confirmation
    assert sent_ids(receiver.on_data(data("a"), 2.0)) == ["a"]  # late copy: re-acked only
    assert receiver.on_confirm("zzz", 2.0) == []  # stale confirmation of an unknown id


def test_rigorack_receiver_expires_unconfirmed_messages_visibly() -> None:
    receiver = Receiver(AckMode.RIGOR, T)
    receiver.on_data(data("a"), 0.0)
    effects = receiver.handle_timeout(5.0)
    (gave_up,) = effects
    assert isinstance(gave_up, GaveUp) and gave_up.role is Role.RECEIVER
    assert receiver.state_of("a") is State.NEW and receiver.in_flight == 0


def test_resend_acks_after_a_reconnect() -> None:
    receiver = Receiver(AckMode.RIGOR, T)
    receiver.on_data(data("a"), 0.0)
    receiver.on_data(data("b"), 0.0)
    receiver.on_confirm("b", 0.0)
    assert sent_ids(receiver.resend_acks(0.5)) == ["a"]
    assert receiver.next_deadline() == 1.5


def test_noack_frames_skip_acks_but_are_deduped() -> None:
    for mode in (AckMode.ONLY, AckMode.RIGOR):
        receiver = Receiver(mode, T)
        assert [type(e) for e in receiver.on_data(data("a"), 0.0, acked=False)] == [Dispatch]
        assert receiver.on_data(data("a"), 0.0, acked=False) == []
        # Same id as an acked message: that one is known, not dispatched again.
        assert not any(isinstance(e, Dispatch) for e in receiver.on_data(data("a"), 0.0))
        # Id-less NoAck frames cannot be deduped: each is dispatched.
        assert len(receiver.on_data(data(""), 0.0, acked=False)) == 1
        assert len(receiver.on_data(data(""), 0.0, acked=False)) == 1
    rigor = Receiver(AckMode.RIGOR, T)
    rigor.on_data(data("w"), 0.0)  # waiting for its confirmation
    assert rigor.on_data(data("w"), 0.0, acked=False) == []


def test_noack_mode_receiver_dispatches_once() -> None:
    receiver = Receiver(AckMode.NONE, T)
    assert [type(e) for e in receiver.on_data(data("a"), 0.0)] == [Dispatch]
    assert receiver.on_data(data("a"), 0.0) == []
    assert receiver.on_data(data("a"), 0.0, acked=False) == []
    assert receiver.on_confirm("a", 0.0) == [] and receiver.on_confirm("b", 0.0) == []
    # Without an id there is nothing to remember: every id-less message is dispatched.
    assert len(receiver.on_data(data(""), 0.0)) == len(receiver.on_data(data(""), 0.0)) == 1
    assert receiver.remembered == 1


def test_memory_is_bounded_in_count_and_time() -> None:
    receiver = Receiver(AckMode.ONLY, T)  # max_remembered=3, remember_for=20
    for i, message_id in enumerate("abcd"):
        receiver.on_data(data(message_id), float(i))
    assert receiver.remembered == 3
    assert receiver.state_of("a") is State.NEW  # the oldest was forgotten first
    assert receiver.next_deadline() == 21.0  # "b" expires first
    receiver.handle_timeout(21.0)
    assert receiver.remembered == 2 and receiver.state_of("b") is State.NEW
    receiver.handle_timeout(100.0)
    assert receiver.remembered == 0 and receiver.next_deadline() is None


def test_stale_heap_entries_are_skipped() -> None:
    sender = Sender(AckMode.ONLY, T)
    sender.send(data("a"), 0.0)
    sender.resend_all(0.5)  # reschedules: the first heap entry is now stale
    sender.on_ack("a", 0.6)
    # The stale and the current entry both point at a finished id: only memory is left.
    assert sender.handle_timeout(1.0) == []
    assert sender.next_deadline() == 20.6


def test_senders_sharing_a_partner_share_their_delivered_ids() -> None:
    identity = Receiver(AckMode.RIGOR, T)
    first = Sender(AckMode.RIGOR, T, partner=identity)
    first.send(data("s1"), 0.0)
    first.on_ack("s1", 0.5)
    second = Sender(AckMode.RIGOR, T, partner=identity)  # the next connection
    assert second.state_of("s1") is State.DONE and second.remembered == 1
    assert [e.frame for e in second.on_ack("s1", 1.0)] == [  # type: ignore[union-attr]
        Frame(FrameType.ACK, id="s1", ack_seq=2)
    ]
    with pytest.raises(LocalProtocolError, match="already in use"):
        second.send(data("s1"), 1.0)
    # The receiver's own dedupe memory is separate: upstream and downstream ids never mix.
    assert identity.state_of("s1") is State.NEW and identity.remembered == 0


def test_the_heap_drops_its_stale_items_in_bulk() -> None:
    # Every acked id leaves a heap item behind; the heap is compacted as it grows, so it
    # stays within twice the live ids (or the minimum size) however many were sent.
    sender = Sender(AckMode.ONLY, AckTimers(resend_interval=1.0, ack_timeout=5.0, window=8))
    for i in range(1000):
        sender.send(data(f"m{i}"), float(i) / 1000)
        if i >= 3:
            sender.on_ack(f"m{i - 3}", float(i) / 1000)
    assert sender.in_flight == 3
    assert len(sender._heap) <= _MIN_COMPACT
    # The live ids still come due, in order, and nothing else does.
    sent = sender.handle_timeout(2.5)
    assert [e.frame.id for e in sent] == ["m997", "m998", "m999"]  # type: ignore[union-attr]


def test_a_resend_that_compacts_the_heap_loses_no_deadline() -> None:
    # Many ids due at once: their resends push new items while the due ones are still
    # being taken, and compact the heap meanwhile; each id is resent exactly once.
    sender = Sender(AckMode.ONLY, AckTimers(resend_interval=1.0, ack_timeout=30, window=500))
    for i in range(200):
        sender.send(data(f"m{i}"), 0.0)
    before = sender._heap
    sender._compact_at = len(before) - 1  # the first resend compacts, mid-loop
    resent = [e.frame.id for e in sender.handle_timeout(1.0)]  # type: ignore[union-attr]
    assert sender._heap is not before
    assert sorted(resent) == sorted(f"m{i}" for i in range(200))
    resent = [e.frame.id for e in sender.handle_timeout(2.0)]  # type: ignore[union-attr]
    assert sorted(resent) == sorted(f"m{i}" for i in range(200))
    assert len(sender._heap) <= 2 * 200
