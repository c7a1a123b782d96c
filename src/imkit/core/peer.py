"""The message layer of one connection: frames, acks, strikes, rate limit, idle timeout.

A :class:`Peer` sits above the WebSocket framing and below the application. It takes
whole text messages in (:meth:`Peer.receive_text`) and gives text messages out
(:meth:`Peer.outgoing`) and :mod:`imkit.core.events` to act on (:meth:`Peer.events`).
:class:`~imkit.core.conn.ServerConn` and :class:`~imkit.core.conn.ClientConn` put one over
wsproto; the ASGI adapter, which receives whole messages, drives one directly.

After every input (``receive_text``, ``send``, ``handle_timeout``) the caller must:
send every text of :meth:`outgoing`, act on every event of :meth:`events`, close the
connection if :attr:`close_request` is set, and wait until :meth:`next_deadline`.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from imkit.core.ack import (
    AckMode,
    AckTimers,
    Action,
    Input,
    Receiver,
    Role,
    Sender,
    _Acts,
    _Machine,
)
from imkit.core.events import (
    DeliveryFailed,
    ErrorReceived,
    Event,
    MessageExpired,
    _delivered,
    _message_received,
)
from imkit.core.frames import (
    _ACK_TYPE,
    _FORM_TYPES,
    _FRAME_TYPES,
    _PING_TYPE,
    FINAL_ERROR_CODES,
    DecodeError,
    ErrorCode,
    Frame,
    FrameType,
    _c_encode_frame,
    _encode_ack,
    _encode_ping,
    _new_frame,
    _read_fields,
    encode_frame,
    error_frame,
    py_decode_fields,
)

__all__ = (
    "CLOSE_IDLE",
    "CLOSE_POLICY",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_MAX_STRIKES",
    "DEFAULT_RATE_BURST",
    "DEFAULT_RATE_LIMIT",
    "DEFAULT_STRIKE_WINDOW",
    "Peer",
    "PeerOptions",
)

CLOSE_IDLE = 1000
CLOSE_POLICY = 1008
# A token: a little under 1.0, so that a client that waited exactly the announced
# retryAfter is not refused for the float rounding of the refill.
_ONE_TOKEN = 1.0 - 1e-9

# Precedents: easy-chat's maxConnectionIdle; OWASP and Discord rate limits (100-120/min
# for people typing; raise it for machine clients); websockets' max_queue of 16 frames.
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_STRIKES = 10
DEFAULT_STRIKE_WINDOW = 60.0
DEFAULT_RATE_LIMIT = 50.0
DEFAULT_RATE_BURST = 100
DEFAULT_MAX_BACKLOG = 1024


@attrs.frozen(kw_only=True)
class PeerOptions:
    """The message-layer options of a connection, all with documented defaults."""

    ack_mode: AckMode = AckMode.ONLY
    """The ack mode of both directions (DESIGN §3)."""
    timers: AckTimers = attrs.field(factory=AckTimers)
    """Resend interval, ack timeout, dedupe memory and window."""
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    """Close (1000, "idle timeout") after this long without a message; ``None``: never."""
    max_strikes: int = DEFAULT_MAX_STRIKES
    """Bad frames (and rate-limited ones, one per retry window) within ``strike_window``
    that close with 1008."""
    strike_window: float = DEFAULT_STRIKE_WINDOW
    """The window, in seconds, over which strikes are counted."""
    rate_limit: float | None = DEFAULT_RATE_LIMIT
    """Sustained messages per second a client may send; ``None`` disables the limit."""
    rate_burst: int = DEFAULT_RATE_BURST
    """How many messages a client may send at once above the sustained rate."""
    max_backlog: int = DEFAULT_MAX_BACKLOG
    """Messages waiting for room in the ack window; beyond it the peer is closed (1008)."""


class Peer:
    """One end of an IM connection, above the WebSocket layer. No I/O, no clock.

    ``server`` selects the rules of the server end: ``formId`` is overwritten with
    ``user_id``, ``Transpond`` frames are refused, application pings are answered, and
    ``accepts_method`` (if given) refuses unknown methods before anything is acked.
    ``receiver`` and ``sender`` may be passed in to outlive one connection: a server keeps
    one receiver per identity so that a resend on a new connection is not dispatched
    twice (and a repeated RigorAck ack of a delivered push is confirmed again); a client
    keeps both across reconnects.
    """

    # Slots keep a connection small; ``__dict__`` stays for subclasses' own fields.
    __slots__ = (
        "__dict__",
        "_accepts_method",
        "_events",
        "_last_activity",
        "_next_id",
        "_out",
        "_prefix",
        "_rate_strike_at",
        "_strikes",
        "_tokens",
        "_tokens_at",
        "close_request",
        "closed",
        "options",
        "receiver",
        "sender",
        "server",
        "user_id",
    )

    def __init__(
        self,
        options: PeerOptions,
        *,
        server: bool,
        now: float,
        user_id: str = "",
        receiver: Receiver | None = None,
        sender: Sender | None = None,
        accepts_method: Callable[[str], bool] | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.options = options
        self.server = server
        self.user_id = user_id
        self.receiver = receiver or Receiver(options.ack_mode, options.timers)
        # A server's Sender lives as long as its connection; it remembers the ids the
        # client acknowledged in the identity's receiver, which outlives the connection.
        self.sender = sender or Sender(
            options.ack_mode, options.timers, partner=self.receiver if server else None
        )
        self._accepts_method = accepts_method
        self._prefix = id_prefix if id_prefix is not None else secrets.token_hex(4) + "-"
        self._next_id = 0
        self._out: list[str] = []
        self._events: list[Event] = []
        self._strikes: deque[float] | None = None  # made at the first strike
        self._last_activity = now
        self._tokens = float(options.rate_burst)
        self._tokens_at = now
        self._rate_strike_at = now  # a rate-limited frame before this time is no new strike
        self.close_request: tuple[int, str] | None = None
        """Set when this layer wants the connection closed: ``(code, reason)``."""
        self.closed = False

    # ------------------------------------------------------------------ outputs
    def outgoing(self) -> list[str]:
        """Take the text messages to send to the peer, in order."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        """Take the events to act on, in order."""
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next be called (``None``: nothing pending)."""
        if self.closed:
            return None
        deadline = self.sender.next_deadline()
        other = self.receiver.next_deadline()
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        idle = self.options.idle_timeout
        if idle is not None:
            other = self._last_activity + idle
            if deadline is None or other < deadline:
                deadline = other
        return deadline

    # ------------------------------------------------------------------ inputs
    def handle_timeout(self, now: float) -> None:
        """Fire what is due at ``now``: resends, give-ups, the idle timeout."""
        if self.closed:
            return
        self._act_all(self.sender._timeout(now), self.sender)
        self._act_all(self.receiver._timeout(now), self.receiver)
        idle = self.options.idle_timeout
        if idle is not None and now >= self._last_activity + idle:
            self.request_close(CLOSE_IDLE, "idle timeout")

    def receive_text(self, text: str, now: float) -> None:
        """Handle one whole text message from the peer."""
        if self.closed:
            return
        self._last_activity = now
        # A server's Data frames carry the authenticated sender, whatever the client wrote.
        # (frames._decode_fields, inline: the C readings in one call, else Python's.)
        form_id = self.user_id if self.server else None
        fields = (
            None
            if _read_fields is None
            else _read_fields(text, form_id, _FRAME_TYPES, _FORM_TYPES, _ACK_TYPE, _PING_TYPE)
        )
        if fields is None:
            fields = py_decode_fields(text, form_id)
        if isinstance(fields, DecodeError):
            self._reject(fields.code, fields.message, fields.id, now)
            return
        # An Ack or a Ping needs its id (and ackSeq) only: no Frame is built for it.
        kind = fields[0]
        if kind is _ACK:
            if fields[2] == 2:
                receiver = self.receiver
                confirmed, actions = receiver._on_id(fields[1], _CONFIRM, now)
                self._act(confirmed, actions, receiver)
            else:
                sender = self.sender
                if sender._backlog:  # room for the backlog's messages too
                    self._act_all(sender._ack(fields[1], now), sender)
                else:  # (Sender._ack without a backlog: the ack's one act, no list)
                    acked, actions = sender._on_id(fields[1], _ACKED, now)
                    self._act(acked, actions, sender)
            return
        if kind is _PING:
            if self.server:
                self._out.append(_encode_ping(fields[1]))
            return
        frame = _new_frame(*fields)
        if kind is _DATA or kind is _NO_ACK:
            self._receive_data(frame, now)
        elif kind is _ERR:
            self._events.append(ErrorReceived(frame))
            data = frame.data
            if frame.id and isinstance(data, dict):
                code = data.get("code")
                if code in FINAL_ERROR_CODES:
                    # Refused for good: stop resending it (DeliveryFailed, reason "refused").
                    self._act_all(self.sender._refuse(frame.id, now), self.sender)
                elif code == ErrorCode.RATE_LIMITED:
                    # Refused for now: resend it when the peer said it may come again (a
                    # resend before then is refused again; one much later waits for no
                    # reason).
                    retry, rate = data.get("retryAfter"), data.get("rate")
                    if type(retry) is int or type(retry) is float:
                        every = None
                        if (type(rate) is int or type(rate) is float) and rate > 0:
                            try:
                                every = 1.0 / rate
                            except OverflowError:  # an int too large for a float
                                pass
                        self.sender.retry_after(frame.id, retry, now, every=every)
        elif self.server:  # TRANSPOND from a client
            self._reject(
                ErrorCode.FORBIDDEN, "clients may not send Transpond frames", frame.id, now
            )

    def _receive_data(self, frame: Frame, now: float) -> None:
        if self.server:
            if self.options.rate_limit is not None and not self._take_token(now):
                retry = (1.0 - self._tokens) / (self.options.rate_limit or 1.0)
                # One strike per retry window: the frames a client sent before it could
                # read the first refusal are refused too, but only a client that goes on
                # past the time it was told to wait is striking again. A burst is slowed
                # down (its messages resent later); a sustained flood is closed.
                strike = now >= self._rate_strike_at
                if strike:
                    self._rate_strike_at = now + retry
                self._reject(
                    ErrorCode.RATE_LIMITED,
                    "rate limit exceeded; resend this message later",
                    frame.id,
                    now,
                    strike=strike,
                    # Rounded up: a client that waits exactly this long finds a token.
                    retryAfter=math.ceil(retry * 1000) / 1000,
                    # ...and one more every 1/rate s: how a client spaces what follows.
                    rate=self.options.rate_limit,
                )
                return
            accepts = self._accepts_method
            if accepts is not None and not accepts(frame.method):
                self._out.append(
                    encode_frame(
                        error_frame(
                            ErrorCode.UNKNOWN_METHOD, f"unknown method {frame.method!r}", frame.id
                        )
                    )
                )
                return
        acked = frame.frame_type is _DATA
        if acked and not frame.id and self.receiver.mode is not _NO_ACK_MODE:
            # Nothing could ack it, and two such messages would be taken for one.
            self._reject(ErrorCode.BAD_FRAME, "an acked Data frame needs an id", "", now)
            return
        receiver = self.receiver
        frame, actions = receiver._data(frame, now, acked)
        self._act(frame, actions, receiver)

    def _take_token(self, now: float) -> bool:
        rate = self.options.rate_limit
        assert rate is not None  # the caller skips a connection without a rate limit
        tokens = min(float(self.options.rate_burst), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if tokens < _ONE_TOKEN:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def _reject(
        self,
        code: str,
        message: str,
        frame_id: str,
        now: float,
        *,
        strike: bool = True,
        **extra: Any,
    ) -> None:
        self._out.append(encode_frame(error_frame(code, message, frame_id, **extra)))
        if not strike:
            return
        window = self.options.strike_window
        strikes = self._strikes
        if strikes is None:
            strikes = self._strikes = deque()
        strikes.append(now)
        while strikes and strikes[0] <= now - window:
            strikes.popleft()
        if len(strikes) >= self.options.max_strikes:
            self.request_close(CLOSE_POLICY, f"too many bad messages ({code})")

    # ------------------------------------------------------------------ sending
    def new_id(self) -> str:
        """A fresh message id, unique for this peer."""
        self._next_id += 1
        return f"{self._prefix}{self._next_id}"

    def send(
        self,
        method: str,
        data: Any,
        now: float,
        *,
        message_id: str | None = None,
        reply_to: str = "",
        acked: bool = True,
        form_id: str = "",
    ) -> Frame:
        """Send a message with this connection's ack mode (``acked=False``: a NoAck frame).

        Returns the frame sent; its ``id`` identifies the later ``Delivered`` or
        ``DeliveryFailed`` event. Over ``max_backlog`` waiting messages the connection is
        closed with 1008 and the message fails with reason ``"overflow"``.

        Raises ``TypeError`` or ``ValueError`` (and sends nothing) when ``data`` cannot be
        encoded as strict JSON in UTF-8, and
        :class:`~imkit.exceptions.LocalProtocolError` for an id that is still in use.
        """
        frame_type = _DATA if acked else _NO_ACK
        if message_id is None:
            message_id = self.new_id()
        frame = _new_frame(frame_type, message_id, 0, method, form_id, "", data, reply_to)
        if self.closed:
            self._events.append(DeliveryFailed(frame, "closed"))
            return frame
        # Encode first: data that cannot go on the wire fails here, before the ack machine
        # holds a frame that every later resend would fail to encode. (The C encoder is
        # called with the fields at hand; what it declines, encode_frame writes.)
        text = (
            None
            if _c_encode_frame is None
            else _c_encode_frame(frame_type, message_id, 0, method, form_id, "", data, reply_to)
        )
        if text is None:
            text = encode_frame(frame)
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError)
        if not acked:
            self._out.append(text)
            return frame
        sender = self.sender
        backlog = sender._backlog  # (sender.backlog, without a property call per send)
        if backlog is not None and len(backlog) >= self.options.max_backlog:
            self._events.append(DeliveryFailed(frame, "overflow"))
            self.request_close(CLOSE_POLICY, "send queue full: the client is not reading")
            return frame
        self._act(frame, sender._send(frame, now), sender, text)
        return frame

    def send_while_room(
        self, method: str, items: Iterator[tuple[Any, str]], now: float, *, most: int
    ) -> list[Frame]:
        """Send messages of ``method`` from ``items`` (``(data, form_id)`` pairs), as
        :meth:`send` does, while each can go out at once: at most ``most``, and only
        while the ack window has room and nothing waits in the backlog, nor is a close
        requested. An item is taken from ``items`` only when it is sent, so the caller
        can go on with the rest later. Returns the frames sent, in order.

        Raises as :meth:`send` does, after sending the items before the bad one.
        """
        frames: list[Frame] = []
        if self.closed:
            return frames
        sender = self.sender
        while len(frames) < most and sender.has_room() and self.close_request is None:
            item = next(items, None)
            if item is None:
                break
            frames.append(self.send(method, item[0], now, form_id=item[1]))
        return frames

    def send_frame(self, frame: Frame) -> None:
        """Send ``frame`` as it is, outside the ack machines (Err, Ping, forwards)."""
        if not self.closed:
            self._out.append(encode_frame(frame))

    def send_error(self, code: str, message: str, frame_id: str = "", **extra: Any) -> None:
        """Send an ``Err`` frame answering ``frame_id``."""
        self.send_frame(error_frame(code, message, frame_id, **extra))

    def resume(self, now: float) -> None:
        """After a reconnect: resend what is still in flight, with the original ids."""
        self._act_all(self.sender._resend_all(now), self.sender)
        self._act_all(self.receiver._resend_acks(now), self.receiver)

    def request_close(self, code: int, reason: str) -> None:
        """Ask the connection layer to close with ``code`` (the first request wins)."""
        if self.close_request is None:
            self.close_request = (code, reason)

    def connection_lost(self, *, keep_sender: bool = False) -> None:
        """The connection ended. Unless ``keep_sender``, everything still in flight fails
        with reason ``"closed"`` (a client keeps its sender to resend after reconnecting).
        """
        if self.closed:
            return
        self.closed = True
        if keep_sender:
            return
        for frame in self.sender.drop_backlog():
            self._events.append(DeliveryFailed(frame, "closed"))
        for frame in self.sender.pending():
            self._events.append(DeliveryFailed(frame, "closed"))
        self.sender = Sender(self.sender.mode, self.sender.timers)

    # ------------------------------------------------------------------ actions
    def _act_all(self, acts: list[_Acts], machine: _Machine) -> None:
        for frame, actions in acts:
            self._act(frame, actions, machine)

    def _act(
        self,
        frame: Frame,
        actions: tuple[Action, ...],
        machine: _Machine,
        text: str | None = None,
    ) -> None:
        """Carry out the ``actions`` ``machine`` gave for ``frame``: texts to send, events.
        ``text`` is ``frame`` already encoded."""
        for action in actions:
            if action is _SEND_ACK:
                self._out.append(_encode_ack(frame.id, machine._ack_seq(frame)))
            elif action is _DISPATCH:
                self._events.append(_message_received(frame))
            elif action is _DELIVERED:
                self._events.append(_delivered(frame))
            elif action is _SEND_DATA:
                self._out.append(encode_frame(frame) if text is None else text)
            elif action is _SEND_CONFIRM:
                self._out.append(_encode_ack(frame.id, 2))
            elif action is _REFUSE:
                self._events.append(DeliveryFailed(frame, "refused"))
            elif machine.role is Role.SENDER:  # GIVE_UP
                self._events.append(DeliveryFailed(frame, "timeout"))
            else:
                self._events.append(MessageExpired(frame))
                self._out.append(
                    encode_frame(
                        error_frame(
                            ErrorCode.EXPIRED,
                            "not confirmed before the ack timeout; dropped, send it again",
                            frame.id,
                        )
                    )
                )


# Module constants: read for a fraction of the cost of an enum class's attribute.
_SEND_DATA = Action.SEND_DATA
_SEND_ACK = Action.SEND_ACK
_SEND_CONFIRM = Action.SEND_CONFIRM
_DISPATCH = Action.DISPATCH
_DELIVERED = Action.DELIVERED
_REFUSE = Action.REFUSE
_CONFIRM = Input.CONFIRM
_ACKED = Input.ACK
_ACK, _PING, _DATA, _NO_ACK, _ERR = (
    FrameType.ACK,
    FrameType.PING,
    FrameType.DATA,
    FrameType.NO_ACK,
    FrameType.ERR,
)
_NO_ACK_MODE = AckMode.NONE
