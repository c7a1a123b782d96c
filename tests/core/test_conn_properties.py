"""Delivery through the whole sans-IO stack: ClientConn and ServerConn joined by bytes.

The Peer-level property test (test_delivery_properties.py) covers loss, duplication and
reordering. This one checks the wiring a real deployment relies on, over a TCP-like link
(bytes arrive in order, split anywhere) that breaks at random, losing what was in flight:
the server keeps each identity's receiver in the ``Registry``, the client keeps its
``Sender`` and ``Receiver`` (``sender_factory``/``receiver_factory``) and resends on
``Connected``. Promise: at most once always; once the link stays up, every acked message
is dispatched exactly once or its loss is reported.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from imkit.core.ack import AckMode, AckTimers, Receiver, Sender
from imkit.core.conn import ClientConn, ConnLimits, ServerConn
from imkit.core.events import (
    Closed,
    Connected,
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    Event,
    HandshakeRequested,
    MessageExpired,
    MessageReceived,
)
from imkit.core.interfaces import Identity
from imkit.core.peer import PeerOptions
from imkit.core.server import Registry

TIMERS = AckTimers(resend_interval=1.0, ack_timeout=8.0, remember_for=40.0)
LIMITS = ConnLimits(ping_interval=None)
IDENTITY = Identity("alice")


class ConnMachine(RuleBasedStateMachine):
    mode = AckMode.ONLY

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.options = PeerOptions(
            ack_mode=self.mode, timers=TIMERS, idle_timeout=None, rate_limit=None
        )
        self.registry: Registry[ServerConn] = Registry()
        self.client_sender: Sender | None = None
        self.client_receiver: Receiver | None = None
        self.sent: dict[str, dict[str, float]] = {"client": {}, "server": {}}
        self.dispatched: dict[str, Counter[str]] = {"client": Counter(), "server": Counter()}
        self.delivered: dict[str, set[str]] = {"client": set(), "server": set()}
        self.failed: dict[str, set[str]] = {"client": set(), "server": set()}
        self.expired: dict[str, set[str]] = {"client": set(), "server": set()}
        self.counter = 0
        self._connect()

    def _sender(self, mode: AckMode) -> Sender:
        if self.client_sender is None:
            self.client_sender = Sender(mode, TIMERS)
        return self.client_sender

    def _receiver(self, mode: AckMode) -> Receiver:
        if self.client_receiver is None:
            self.client_receiver = Receiver(mode, TIMERS)
        return self.client_receiver

    def _connect(self) -> None:
        self.client = ClientConn(
            host="h",
            target="/ws",
            now=self.now,
            limits=LIMITS,
            options=self.options,
            sender_factory=self._sender,
            receiver_factory=self._receiver,
        )
        self.server = ServerConn(now=self.now, limits=LIMITS)
        self.server.receive_data(self.client.data_to_send(), self.now)
        assert [type(e) for e in self.server.events()] == [HandshakeRequested]
        receiver = self.registry.receiver(IDENTITY, self.mode, TIMERS, self.now)
        self.server.accept(IDENTITY, self.now, options=self.options, receiver=receiver)
        self.to_client = self.server.data_to_send()
        self.to_server = b""
        self._flush_client(len(self.to_client))  # the 101, and whatever follows it
        assert self.client.ack_mode is self.mode

    # ------------------------------------------------------------------ plumbing
    def _record(self, side: str, events: list[Event]) -> None:
        other = "server" if side == "client" else "client"
        for event in events:
            if isinstance(event, MessageReceived):
                self.dispatched[side][event.frame.id] += 1
                assert self.dispatched[side][event.frame.id] == 1, "dispatched twice"
                assert event.frame.id in self.sent[other]
            elif isinstance(event, Delivered):
                self.delivered[side].add(event.frame.id)
            elif isinstance(event, DeliveryFailed):
                self.failed[side].add(event.frame.id)
            elif isinstance(event, MessageExpired):
                self.expired[side].add(event.frame.id)
            else:
                assert isinstance(event, (Connected, Closed, ErrorReceived)), event

    def _collect(self) -> None:
        self._record("client", self.client.events())
        self._record("server", self.server.events())
        self.to_server += self.client.data_to_send()
        self.to_client += self.server.data_to_send()

    def _flush_client(self, n: int) -> None:
        data, self.to_client = self.to_client[:n], self.to_client[n:]
        self.client.receive_data(data, self.now)
        self._collect()

    def _flush_server(self, n: int) -> None:
        data, self.to_server = self.to_server[:n], self.to_server[n:]
        self.server.receive_data(data, self.now)
        self._collect()

    def _timers(self) -> None:
        for conn in (self.client, self.server):
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= self.now:
                conn.handle_timeout(self.now)
        self._collect()

    # ------------------------------------------------------------------ rules
    @rule(from_client=st.booleans())
    def send(self, from_client: bool) -> None:
        self.counter += 1
        side = "client" if from_client else "server"
        message_id = f"{side[0]}{self.counter}"
        self.sent[side][message_id] = self.now
        conn = self.client if from_client else self.server
        conn.send("chat", {"n": self.counter}, self.now, message_id=message_id)
        self._collect()

    @rule(to_client=st.booleans(), cut=st.none() | st.integers(0, 300))
    def transmit(self, to_client: bool, cut: int | None) -> None:
        """TCP: the next ``cut`` bytes (all: ``None``) arrive, in order, maybe mid-frame."""
        if to_client:
            self._flush_client(len(self.to_client) if cut is None else cut)
        else:
            self._flush_server(len(self.to_server) if cut is None else cut)

    @rule()
    def round_trip(self) -> None:
        """What is in flight arrives both ways; the answers wait for the next trip."""
        self._flush_client(len(self.to_client))
        self._flush_server(len(self.to_server))

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0, 9.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._timers()

    @rule()
    def link_breaks(self) -> None:
        """The TCP connection dies: bytes in flight are lost; the client reconnects."""
        self.client.receive_data(None, self.now)
        self.server.receive_data(None, self.now)
        self._collect()
        self.registry.release_receiver(IDENTITY, self.now)
        self._connect()

    def _settle(self, until: float) -> None:
        """The link stays up and delivers at once; the clock jumps deadline to deadline."""
        while True:
            while self.to_client or self.to_server:
                self._flush_client(len(self.to_client))
                self._flush_server(len(self.to_server))
            deadlines = [
                d for c in (self.client, self.server) if (d := c.next_deadline()) is not None
            ]
            if not deadlines or min(deadlines) > until:
                return
            self.now = max(self.now, min(deadlines))
            self._timers()

    @rule()
    def stays_up(self) -> None:
        """While the link stays up, every message with time left gets through, once."""
        start = self.now
        healthy = [
            (side, other, message_id)
            for side, other in (("client", "server"), ("server", "client"))
            for message_id, at in self.sent[side].items()
            if self.mode is not AckMode.NONE
            and message_id not in self.failed[side]
            and message_id not in self.expired[other]
            and at + TIMERS.ack_timeout > start + 2 * TIMERS.resend_interval
        ]
        self._settle(until=start + 2 * TIMERS.resend_interval)
        for side, other, message_id in healthy:
            assert self.dispatched[other][message_id] == 1, f"{message_id} not dispatched"
            assert message_id in self.delivered[side], f"{message_id} not acknowledged"

    def teardown(self) -> None:
        self.stays_up()
        self._settle(until=float("inf"))
        for side, other in (("client", "server"), ("server", "client")):
            for message_id in self.sent[side]:
                count = self.dispatched[other][message_id]
                assert count <= 1
                if self.mode is AckMode.NONE:
                    continue
                lost = message_id in self.failed[side] or message_id in self.expired[other]
                assert count == 1 or lost, f"{message_id} from the {side} vanished"


class NoAckConns(ConnMachine):
    mode = AckMode.NONE


class OnlyAckConns(ConnMachine):
    mode = AckMode.ONLY


class RigorAckConns(ConnMachine):
    mode = AckMode.RIGOR


_fewer = settings(
    max_examples=max(10, settings().max_examples // 2),
    stateful_step_count=max(10, settings().stateful_step_count * 3 // 4),
)
TestNoAckConns = NoAckConns.TestCase
TestOnlyAckConns = OnlyAckConns.TestCase
TestRigorAckConns = RigorAckConns.TestCase
for _case in (TestOnlyAckConns, TestRigorAckConns):
    _case.settings = _fewer
del _case
TestNoAckConns.settings = settings(
    max_examples=max(10, settings().max_examples // 8),
    stateful_step_count=_fewer.stateful_step_count,
)
