"""Delivery guarantees of the ack machines, property-tested through two Peers (DESIGN §3).

A client ``Peer`` and a server ``Peer`` talk through a channel that may drop, duplicate and
reorder text messages in either direction, while a fake clock moves on and the connection
is dropped and reopened. A reconnect works as the real server and client do: the server's
new Peer gets the identity's receiver from ``Registry.receiver`` (its dedupe memory), the
client's new Peer keeps the client's Sender and Receiver and calls ``resume(now)``.

What a user of imkit is promised, checked after every step and at the end:

* a message id is handed to the application (``MessageReceived``) at most once;
* an ``Ack`` only ever names an id its sender really received (acks never exceed receipts),
  and a RigorAck confirmation only an id whose ack came back;
* nothing vanishes silently: once the channel is perfect and the clock has run past every
  deadline, each acked message was dispatched exactly once or its loss was reported
  (``DeliveryFailed`` at the sender or ``MessageExpired`` at the receiver);
* when the channel heals, every message that still has time before its ack timeout is
  dispatched exactly once and acknowledged, with no failure reported;
* NoAck: at most once, no acks on the wire, nothing promised under loss.

The channel gives frames a maximum lifetime (like TCP's maximum segment lifetime): a copy
older than ``MAX_AGE`` is gone. No finite dedupe memory can recognise a copy delayed
forever; ``MAX_AGE < remember_for - ack_timeout`` is the bound the design relies on.
"""

from __future__ import annotations

from collections import Counter

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from imkit.core.ack import AckMode, AckTimers, Receiver, Sender
from imkit.core.events import (
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    Event,
    MessageExpired,
    MessageReceived,
)
from imkit.core.frames import ErrorCode, Frame, FrameType, decode_frame
from imkit.core.interfaces import Identity
from imkit.core.peer import Peer, PeerOptions
from imkit.core.server import Registry

RESEND = 1.0
TIMEOUT = 8.0
TIMERS = AckTimers(resend_interval=RESEND, ack_timeout=TIMEOUT, remember_for=40.0, window=64)
MAX_AGE = 20.0
assert MAX_AGE < TIMERS.remember_for - TIMERS.ack_timeout

CLIENT, SERVER = "client", "server"
OTHER = {CLIENT: SERVER, SERVER: CLIENT}


@attrs.define
class Sent:
    acked: bool
    at: float
    payload: dict[str, int]
    connection: int  # which connection it was sent on (a server's pushes die with theirs)


@attrs.define
class Side:
    """What one end did and saw, as the test observed it."""

    sent: dict[str, Sent] = attrs.field(factory=dict)
    data_seen: set[str] = attrs.field(factory=set)  # Data/NoAck ids that reached this end
    acks_seen: set[str] = attrs.field(factory=set)  # Ack{ackSeq: 1} ids that reached it
    dispatched: Counter[str] = attrs.field(factory=Counter)
    delivered: set[str] = attrs.field(factory=set)
    failed: dict[str, str] = attrs.field(factory=dict)
    expired: set[str] = attrs.field(factory=set)
    errors: list[Frame] = attrs.field(factory=list)


class DeliveryMachine(RuleBasedStateMachine):
    mode = AckMode.ONLY

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.options = PeerOptions(
            ack_mode=self.mode,
            timers=TIMERS,
            idle_timeout=None,
            rate_limit=None,
            max_strikes=10**9,
            max_backlog=10**9,
        )
        self.registry: Registry[object] = Registry()
        self.identity = Identity("alice")
        self.client_sender = Sender(self.mode, TIMERS)
        self.client_receiver = Receiver(self.mode, TIMERS)
        self.links: dict[str, list[tuple[float, str]]] = {CLIENT: [], SERVER: []}
        """Frames in flight, by the end that sent them."""
        self.sides = {CLIENT: Side(), SERVER: Side()}
        self.counter = 0
        self.connections = 0
        self.zombies: list[tuple[Peer, list[tuple[float, str]]]] = []
        self._connect()

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> None:
        self.connections += 1
        receiver = self.registry.receiver(self.identity, self.mode, TIMERS, self.now)
        self.server = Peer(
            self.options,
            server=True,
            now=self.now,
            user_id="alice",
            receiver=receiver,
            id_prefix=f"s{self.connections}-",
        )
        self.client = Peer(
            self.options,
            server=False,
            now=self.now,
            sender=self.client_sender,
            receiver=self.client_receiver,
            id_prefix="c-",
        )
        self.client.resume(self.now)
        self._collect()

    def _peers(self) -> tuple[tuple[str, Peer], ...]:
        return ((CLIENT, self.client), (SERVER, self.server))

    def _collect(self) -> None:
        for side, peer in self._peers():
            self._record(side, peer.events())
            for text in peer.outgoing():
                self._check_outgoing(side, text)
                self.links[side].append((self.now, text))

    def _check_outgoing(self, side: str, text: str) -> None:
        frame = decode_frame(text)
        assert isinstance(frame, Frame), frame
        me, other = self.sides[side], self.sides[OTHER[side]]
        if frame.frame_type is FrameType.ACK:
            assert self.mode is not AckMode.NONE, "NoAck mode never acks"
            if frame.ack_seq == 2:
                # A RigorAck confirmation: only for our own message, after its ack came back.
                assert self.mode is AckMode.RIGOR
                assert frame.id in me.sent and frame.id in me.acks_seen, frame
            else:
                # An ack names only an id that really arrived here, as an acked message.
                assert frame.ack_seq == 1, frame
                assert frame.id in me.data_seen, f"{side} acked {frame.id} it never received"
                assert other.sent[frame.id].acked, "a NoAck frame was acked"
        elif frame.frame_type in (FrameType.DATA, FrameType.NO_ACK):
            assert frame.id in me.sent, f"{side} sent {frame.id} nobody asked it to send"
            assert (frame.frame_type is FrameType.DATA) == me.sent[frame.id].acked
        else:
            # The only other frame: RigorAck's "expired" answer for an unconfirmed message.
            assert frame.frame_type is FrameType.ERR, frame
            assert self.mode is AckMode.RIGOR
            assert frame.data["code"] == ErrorCode.EXPIRED
            assert frame.id in me.expired

    def _record(self, side: str, events: list[Event]) -> None:
        me, other = self.sides[side], self.sides[OTHER[side]]
        for event in events:
            frame = event.frame
            if isinstance(event, MessageReceived):
                me.dispatched[frame.id] += 1
                assert me.dispatched[frame.id] == 1, f"{frame.id} dispatched twice at {side}"
                assert frame.data == other.sent[frame.id].payload
                if self.mode is AckMode.RIGOR and other.sent[frame.id].acked:
                    # RigorAck dispatches only what its sender knows is delivered.
                    assert frame.id in other.delivered, "dispatched without a confirmation"
                if side == SERVER:
                    assert frame.form_id == "alice"
            elif isinstance(event, Delivered):
                assert me.sent[frame.id].acked and self.mode is not AckMode.NONE
                assert frame.id in me.acks_seen, "Delivered without an ack"
                assert frame.id not in me.delivered and frame.id not in me.failed
                me.delivered.add(frame.id)
            elif isinstance(event, DeliveryFailed):
                assert frame.id in me.sent
                assert frame.id not in me.delivered and frame.id not in me.failed
                assert event.reason in ("timeout", "closed"), event
                me.failed[frame.id] = event.reason
            elif isinstance(event, MessageExpired):
                assert self.mode is AckMode.RIGOR
                assert me.dispatched[frame.id] == 0, "expired after it was dispatched"
                me.expired.add(frame.id)
            else:
                assert isinstance(event, ErrorReceived), event
                assert event.frame.data["code"] == ErrorCode.EXPIRED
                me.errors.append(event.frame)

    def _feed(self, source: str, text: str) -> None:
        dest = OTHER[source]
        frame = decode_frame(text)
        assert isinstance(frame, Frame)
        if frame.frame_type in (FrameType.DATA, FrameType.NO_ACK):
            self.sides[dest].data_seen.add(frame.id)
        elif frame.frame_type is FrameType.ACK and frame.ack_seq == 1:
            self.sides[dest].acks_seen.add(frame.id)
        peer = self.server if dest == SERVER else self.client
        peer.receive_text(text, self.now)
        self._collect()

    def _fire_timers(self) -> None:
        for _side, peer in self._peers():
            deadline = peer.next_deadline()
            if deadline is not None and deadline <= self.now:
                peer.handle_timeout(self.now)
        self._collect()

    def _send(self, side: str, acked: bool) -> None:
        self.counter += 1
        message_id = f"{side[0]}{self.counter}"
        payload = {"n": self.counter}
        self.sides[side].sent[message_id] = Sent(acked, self.now, payload, self.connections)
        peer = self.client if side == CLIENT else self.server
        frame = peer.send("chat", payload, self.now, message_id=message_id, acked=acked)
        assert frame.id == message_id
        self._collect()

    def _settle(self, until: float) -> None:
        """A perfect channel: deliver everything at once, then jump to the next deadline."""
        while True:
            while self.links[CLIENT] or self.links[SERVER]:
                for source in (CLIENT, SERVER):
                    while self.links[source]:
                        _at, text = self.links[source].pop(0)
                        self._feed(source, text)
            deadlines = [d for _s, p in self._peers() if (d := p.next_deadline()) is not None]
            if not deadlines or min(deadlines) > until:
                return
            self.now = max(self.now, min(deadlines))
            self._fire_timers()

    # ------------------------------------------------------------------ rules
    @rule(from_client=st.booleans(), acked=st.booleans())
    def send(self, from_client: bool, acked: bool) -> None:
        """The client sends a message, or the server pushes one (NoAck frames too)."""
        self._send(CLIENT if from_client else SERVER, acked)

    @rule(
        op=st.sampled_from(["deliver", "deliver", "deliver", "duplicate", "drop"]),
        upstream=st.booleans(),
        index=st.integers(0, 15),
    )
    def channel(self, op: str, upstream: bool, index: int) -> None:
        """Deliver, duplicate or drop any frame in flight (taking one from the middle
        reorders; a copy goes to the back)."""
        source = CLIENT if upstream else SERVER
        if not self.links[source]:
            source = OTHER[source]
        link = self.links[source]
        if not link:
            return
        index %= len(link)
        if op == "deliver":
            _at, text = link.pop(index)
            self._feed(source, text)
        elif op == "duplicate":
            link.append(link[index])
        else:
            link.pop(index)

    @rule()
    def round_trip(self) -> None:
        """One pass of in-order delivery down then up: what is in flight arrives, and what
        that provokes waits for the next pass (a healthy link's round trip)."""
        for source in (SERVER, CLIENT):
            frames, self.links[source] = self.links[source], []
            for _at, text in frames:
                self._feed(source, text)

    @rule(dt=st.sampled_from([0.25, 1.0, 2.5, 9.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        for source in (CLIENT, SERVER):
            self.links[source] = [(t, x) for t, x in self.links[source] if self.now - t <= MAX_AGE]
        for _peer, inbox in self.zombies:  # an old connection reads its bytes soon or never
            inbox[:] = [(t, x) for t, x in inbox if self.now - t <= MAX_AGE]
        self._fire_timers()

    @rule(late_close=st.booleans())
    def reconnect(self, late_close: bool) -> None:
        """The socket breaks (frames in flight are lost) and the client connects again.

        With ``late_close`` the server notices the old connection only later: the
        client's frames already on their way still reach the old server Peer, which
        shares the identity's receiver with the new one (a ``Registry`` race).
        """
        self.client.connection_lost(keep_sender=True)
        self._collect()
        if late_close:
            self.zombies.append((self.server, self.links[CLIENT]))
        else:
            self._close_server(self.server)
        self.links = {CLIENT: [], SERVER: []}
        self._connect()

    def _close_server(self, peer: Peer) -> None:
        peer.connection_lost()
        self.registry.release_receiver(self.identity, self.now)
        self._record(SERVER, peer.events())  # its pushes in flight fail: "closed"

    @precondition(lambda self: self.zombies)
    @rule()
    def old_connection_reads(self) -> None:
        """The old server connection reads one more frame, or finally sees the EOF."""
        peer, inbox = self.zombies[0]
        if not inbox:
            self.zombies.pop(0)
            self._close_server(peer)
            return
        _at, text = inbox.pop(0)
        frame = decode_frame(text)
        assert isinstance(frame, Frame)
        if frame.frame_type in (FrameType.DATA, FrameType.NO_ACK):
            self.sides[SERVER].data_seen.add(frame.id)
        elif frame.frame_type is FrameType.ACK and frame.ack_seq == 1:
            self.sides[SERVER].acks_seen.add(frame.id)
        peer.receive_text(text, self.now)
        self._record(SERVER, peer.events())
        for answer in peer.outgoing():  # written to a dead socket: lost
            self._check_outgoing(SERVER, answer)

    @rule()
    def heal(self) -> None:
        """The channel delivers perfectly for a while: whatever still has time arrives."""
        start = self.now
        healthy: list[tuple[str, str]] = []
        for side in (CLIENT, SERVER):
            me, other = self.sides[side], self.sides[OTHER[side]]
            assert set(other.dispatched) <= set(me.sent)
            for message_id, sent in me.sent.items():
                if (
                    self.mode is not AckMode.NONE
                    and sent.acked
                    and message_id not in me.failed
                    and message_id not in other.expired
                    and sent.at + TIMEOUT > start + 2 * RESEND
                    # A push from an older connection fails with it, unless it was
                    # already delivered: then the client must still get to dispatch it.
                    and (
                        side == CLIENT
                        or sent.connection == self.connections
                        or message_id in me.delivered
                    )
                ):
                    healthy.append((side, message_id))
        self._settle(until=start + 2 * RESEND)
        for side, message_id in healthy:
            me, other = self.sides[side], self.sides[OTHER[side]]
            assert other.dispatched[message_id] == 1, f"{message_id} from {side} not dispatched"
            assert message_id in me.delivered, f"{message_id} from {side} not acknowledged"
            assert message_id not in other.expired

    def teardown(self) -> None:
        # Final phase: old connections drain and close, the channel heals, then the
        # clock runs past every deadline.
        while self.zombies:
            self.old_connection_reads()
        self.heal()
        self._settle(until=float("inf"))
        for _side, peer in self._peers():
            assert peer.next_deadline() is None
            assert peer.sender.in_flight == 0 and peer.sender.backlog == 0
            assert peer.receiver.in_flight == 0
        for side in (CLIENT, SERVER):
            me, other = self.sides[side], self.sides[OTHER[side]]
            assert set(other.dispatched) <= set(me.sent)
            for message_id, sent in me.sent.items():
                count = other.dispatched[message_id]
                assert count <= 1
                if self.mode is AckMode.NONE or not sent.acked:
                    continue  # at most once: nothing is promised under loss
                reported = message_id in me.failed or message_id in other.expired
                # Nothing vanishes silently: dispatched once, or the loss was reported.
                assert count == 1 or reported, f"{message_id} from {side} vanished"
                # Every acked message ended in exactly one outcome at its sender.
                assert (message_id in me.delivered) != (message_id in me.failed)
                if message_id in me.delivered and self.mode is AckMode.ONLY:
                    assert count == 1, "OnlyAck: acked means dispatched"
                if message_id in me.delivered and self.mode is AckMode.RIGOR:
                    assert count == 1 or message_id in other.expired


class NoAckMachine(DeliveryMachine):
    mode = AckMode.NONE


class OnlyAckMachine(DeliveryMachine):
    mode = AckMode.ONLY


class RigorAckMachine(DeliveryMachine):
    mode = AckMode.RIGOR


TestNoAck = NoAckMachine.TestCase
TestOnlyAck = OnlyAckMachine.TestCase
TestRigorAck = RigorAckMachine.TestCase
# NoAck promises little (at most once), so it gets a quarter of the budget.
TestNoAck.settings = settings(max_examples=max(10, settings().max_examples // 4))
