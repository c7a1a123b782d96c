"""The message layer as it was before its per-message costs were cut (commit 9fc9d21).

Verbatim copies of the old JSON codec (``frames.py``), ack machines (``ack.py``) and
:class:`Peer` (``peer.py``), wired to each other but sharing the value types (frames,
effects, events, the transition table) with ``imkit.core``, so that the differential tests
in ``test_core_differential.py`` can compare both implementations' outputs with ``==``.
Not a reference to maintain: it only pins down the behaviour the fast paths must keep.
Deliberate behaviour changes since were made here too: a rate-limited frame is a strike
only once per retry window (``_rate_strike_at``); a final ``Err`` stops the resends of the
message it answers (``Sender.refuse``, reason ``"refused"``); ``Err{rate_limited}``
carries ``rate`` and a ``retryAfter`` rounded up, a refill within 1e-9 of a token counts,
and the sender paces to it (``Sender.retry_after``: slots, held sends).
"""

from __future__ import annotations

import heapq
import json
import math
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs

from imkit.core.ack import (
    AckMode,
    AckTimers,
    Action,
    Delivered,
    Dispatch,
    Effect,
    GaveUp,
    Input,
    Refused,
    Role,
    SendFrame,
    State,
    transition,
)
from imkit.core.events import Delivered as DeliveredEvent
from imkit.core.events import (
    DeliveryFailed,
    ErrorReceived,
    Event,
    MessageExpired,
    MessageReceived,
)
from imkit.core.frames import (
    FINAL_ERROR_CODES,
    DecodeError,
    ErrorCode,
    Frame,
    FrameType,
    error_frame,
)
from imkit.core.peer import CLOSE_IDLE, CLOSE_POLICY, PeerOptions
from imkit.exceptions import LocalProtocolError

_FRAME_TYPES = frozenset(int(t) for t in FrameType)


# ---------------------------------------------------------------------- frames.py
def encode_frame(frame: Frame) -> str:
    """Encode ``frame`` as one JSON text message (every easy-chat field is always present)."""
    obj: dict[str, Any] = {
        "frameType": int(frame.frame_type),
        "id": frame.id,
        "ackSeq": frame.ack_seq,
        "method": frame.method,
        "formId": frame.form_id,
        "transpondUid": frame.transpond_uid,
        "data": frame.data,
    }
    if frame.reply_to:
        obj["replyTo"] = frame.reply_to
    # allow_nan=False: NaN and Infinity are not JSON; no other client could read them.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _field(obj: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = obj.get(name, default)
    if value is None:
        return default
    # bool is an int subclass in Python; JSON true is not a valid integer field.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadField(name, kind)
    return value


class _BadField(Exception):
    def __init__(self, name: str, kind: type) -> None:
        super().__init__(name)
        self.name = name
        self.kind = kind


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# One decoder for every message (json.loads with options would build one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


# "\ud800".."\udfff": a UTF-16 surrogate escape; paired ones decode to one code point.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value: Any) -> bool:
    """Whether ``value`` re-encodes as UTF-8 JSON (no lone surrogate anywhere in it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_frame(text: str | bytes) -> Frame | DecodeError:
    """Decode one text message (``bytes`` must be UTF-8). Never raises: bad input gives a
    :class:`DecodeError`.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        return DecodeError(ErrorCode.BAD_JSON, f"message is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return DecodeError(ErrorCode.BAD_JSON, "message is not a JSON object")
    raw_id = obj.get("id", "")
    frame_id = raw_id if isinstance(raw_id, str) else ""
    if _SURROGATE_ESCAPE.search(text) is not None and not _encodable(obj):
        return DecodeError(
            ErrorCode.BAD_JSON,
            "message contains a lone UTF-16 surrogate",
            frame_id if _encodable(frame_id) else "",
        )
    try:
        frame_type = _field(obj, "frameType", int, 0)
        message_id = _field(obj, "id", str, "")
        ack_seq = _field(obj, "ackSeq", int, 0)
        method = _field(obj, "method", str, "")
        form_id = _field(obj, "formId", str, "")
        transpond_uid = _field(obj, "transpondUid", str, "")
        reply_to = _field(obj, "replyTo", str, "")
    except _BadField as bad:
        kind = "an integer" if bad.kind is int else "a string"
        return DecodeError(ErrorCode.BAD_FRAME, f"field {bad.name!r} must be {kind}", frame_id)
    if frame_type not in _FRAME_TYPES:
        return DecodeError(
            ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frameType {frame_type}", message_id
        )
    if ack_seq < 0:
        return DecodeError(ErrorCode.BAD_FRAME, "field 'ackSeq' must not be negative", message_id)
    return Frame(
        frame_type=FrameType(frame_type),
        id=message_id,
        ack_seq=ack_seq,
        method=method,
        form_id=form_id,
        transpond_uid=transpond_uid,
        data=obj.get("data"),
        reply_to=reply_to,
    )


# ---------------------------------------------------------------------- ack.py
@attrs.define(slots=True)
class _Entry:
    frame: Frame
    state: State
    give_up_at: float
    token: int = 0


class _Memory:
    """Completed ids with their expiry, oldest first, bounded in time and count."""

    def __init__(self, timers: AckTimers) -> None:
        self._timers = timers
        self._done: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._done

    def __len__(self) -> int:
        return len(self._done)

    def add(self, message_id: str, now: float) -> None:
        self._done[message_id] = now + self._timers.remember_for
        self._done.move_to_end(message_id)
        while len(self._done) > self._timers.max_remembered:
            self._done.popitem(last=False)

    def prune(self, now: float) -> None:
        done = self._done
        while done:
            message_id, expiry = next(iter(done.items()))
            if expiry > now:
                return
            del done[message_id]

    def next_expiry(self) -> float | None:
        for expiry in self._done.values():
            return expiry
        return None


class _Machine:
    """Shared bookkeeping: live entries, their deadlines (a heap), remembered ids."""

    role: Role

    def __init__(self, mode: AckMode, timers: AckTimers) -> None:
        self.mode = AckMode(mode)
        self.timers = timers
        self._live: dict[str, _Entry] = {}
        self._memory = _Memory(timers)
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = 0

    def state_of(self, message_id: str) -> State:
        """The state of ``message_id`` at this end."""
        entry = self._live.get(message_id)
        if entry is not None:
            return entry.state
        return State.DONE if message_id in self._memory else State.NEW

    def pending(self) -> list[Frame]:
        """The frames still waiting for their peer, oldest first."""
        return [entry.frame for entry in self._live.values()]

    @property
    def in_flight(self) -> int:
        """How many ids are waiting on the peer."""
        return len(self._live)

    @property
    def remembered(self) -> int:
        """How many completed ids are remembered."""
        return len(self._memory)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next be called, or ``None``."""
        heap = self._heap
        while heap:
            _when, token, message_id = heap[0]
            entry = self._live.get(message_id)
            if entry is not None and entry.token == token:
                break
            heapq.heappop(heap)
        times = [
            t for t in (heap[0][0] if heap else None, self._memory.next_expiry()) if t is not None
        ]
        return min(times) if times else None

    def handle_timeout(self, now: float) -> list[Effect]:
        """Fire every deadline at or before ``now``: resends and give-ups."""
        effects: list[Effect] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _when, token, message_id = heapq.heappop(heap)
            entry = self._live.get(message_id)
            if entry is None or entry.token != token:
                continue
            event = Input.TIMEOUT if now >= entry.give_up_at else Input.RESEND_DUE
            self._apply(entry, event, now, effects)
        self._memory.prune(now)
        return effects

    def _schedule(self, entry: _Entry, now: float, delay: float | None = None) -> None:
        self._tokens += 1
        entry.token = self._tokens
        wait = self.timers.resend_interval if delay is None else delay
        when = min(now + wait, entry.give_up_at)
        heapq.heappush(self._heap, (when, entry.token, entry.frame.id))

    def _apply(self, entry: _Entry, event: Input, now: float, effects: list[Effect]) -> None:
        actions, new_state = transition(self.role, self.mode, entry.state, event)
        frame = entry.frame
        for action in actions:
            effects.append(self._effect(action, frame))
        message_id = frame.id
        if new_state is State.NEW:
            self._live.pop(message_id, None)
            entry.token = -1
        elif new_state is State.DONE:
            self._live.pop(message_id, None)
            entry.token = -1
            if message_id:
                self._memory.add(message_id, now)
        else:
            entry.state = new_state
            self._live[message_id] = entry
            self._schedule(entry, now)
        self._memory.prune(now)

    def _effect(self, action: Action, frame: Frame) -> Effect:
        if action is Action.SEND_DATA:
            return SendFrame(frame)
        if action is Action.SEND_ACK:
            # OnlyAck answers ackSeq + 1 (easy-chat); RigorAck always answers 1.
            seq = frame.ack_seq + 1 if self.mode is AckMode.ONLY else 1
            return SendFrame(Frame(FrameType.ACK, id=frame.id, ack_seq=seq))
        if action is Action.SEND_CONFIRM:
            return SendFrame(Frame(FrameType.ACK, id=frame.id, ack_seq=2))
        if action is Action.DISPATCH:
            return Dispatch(frame)
        if action is Action.DELIVERED:
            return Delivered(frame)
        if action is Action.REFUSE:
            return Refused(frame)
        return GaveUp(frame, self.role)

    def _known(self, message_id: str, stub: Frame, now: float) -> _Entry:
        entry = self._live.get(message_id)
        if entry is not None:
            return entry
        state = State.DONE if message_id in self._memory else State.NEW
        return _Entry(stub, state, now + self.timers.ack_timeout)


class Sender(_Machine):
    """The sending end: sends data, resends until acked, confirms under RigorAck.

    After every call, send the :class:`SendFrame` effects' frames to the peer and report
    :class:`Delivered` / :class:`GaveUp` to the application; then call
    :meth:`next_deadline` again.
    """

    role = Role.SENDER

    def __init__(
        self, mode: AckMode, timers: AckTimers | None = None, *, partner: Receiver | None = None
    ) -> None:
        super().__init__(mode, timers or AckTimers())
        self._backlog: deque[Frame] = deque()
        self._backlog_ids: set[str] = set()
        self._retry_slot = -math.inf
        self._retry_gap = 0.0
        if partner is not None:
            # A server keeps one Receiver per identity across its connections; each
            # connection's Sender shares, through it, the memory of the ids that were
            # acknowledged. A RigorAck client whose confirmation was lost with the old
            # connection repeats its ack on the new one, and must be confirmed again.
            self._memory = partner._delivered

    @property
    def backlog(self) -> int:
        """How many messages wait for room in the window."""
        return len(self._backlog)

    def send(self, frame: Frame, now: float) -> list[Effect]:
        """Send a new ``Data`` frame; its id must not be in flight or remembered."""
        if self.mode is not AckMode.NONE:
            message_id = frame.id
            if message_id in self._live or message_id in self._memory:
                raise LocalProtocolError(f"message id {message_id!r} is already in use")
            if message_id in self._backlog_ids:
                raise LocalProtocolError(f"message id {message_id!r} is already queued")
            if not message_id:
                raise LocalProtocolError("an acked message needs a non-empty id")
            if self._backlog or len(self._live) >= self.timers.window:
                self._backlog.append(frame)
                self._backlog_ids.add(message_id)
                return []
        effects: list[Effect] = []
        entry = _Entry(frame, State.NEW, now + self.timers.ack_timeout)
        self._apply(entry, Input.SEND, now, effects)
        if self.mode is not AckMode.NONE and now < self._retry_slot:
            self._hold(entry, effects)
        return effects

    def _hold(self, entry: _Entry, effects: list[Effect]) -> None:
        """Held for the next slot of the peer's rate limit: not sent now."""
        if effects and effects[-1] == SendFrame(entry.frame):
            effects.pop()
            when = self._retry_slot
            self._retry_slot = when + self._retry_gap
            self._schedule(entry, when, 0.0)

    def retry_after(
        self, message_id: str, delay: float, now: float, *, every: float | None = None
    ) -> bool:
        """Resend ``message_id`` in the next slot of the peer's rate limit."""
        entry = self._live.get(message_id)
        if entry is None:
            return False
        try:
            delay = float(delay)
            gap = delay if every is None else float(every)
        except OverflowError:
            return False
        if not (0 <= delay < math.inf and 0 <= gap < math.inf):
            return False
        when = max(now + delay, self._retry_slot)
        self._retry_slot = when + gap
        self._retry_gap = gap
        self._schedule(entry, when, 0.0)
        return True

    def on_ack(self, message_id: str, now: float) -> list[Effect]:
        """The peer sent ``Ack{message_id, ackSeq: 1}``."""
        effects: list[Effect] = []
        entry = self._known(message_id, Frame(FrameType.DATA, id=message_id), now)
        self._apply(entry, Input.ACK, now, effects)
        self._drain(now, effects)
        return effects

    def refuse(self, message_id: str, now: float) -> list[Effect]:
        """The peer answered ``message_id`` with a final ``Err``."""
        effects: list[Effect] = []
        entry = self._known(message_id, Frame(FrameType.DATA, id=message_id), now)
        self._apply(entry, Input.REFUSED, now, effects)
        self._drain(now, effects)
        return effects

    def handle_timeout(self, now: float) -> list[Effect]:
        """Fire resends and give-ups due at ``now``; give-ups make room for the backlog."""
        effects = super().handle_timeout(now)
        self._drain(now, effects)
        return effects

    def resend_all(self, now: float) -> list[Effect]:
        """Send every message in flight again now (after a reconnect), keeping their ids."""
        effects: list[Effect] = []
        for entry in list(self._live.values()):
            effects.append(SendFrame(entry.frame))
            self._schedule(entry, now)
        return effects

    def drop_backlog(self) -> list[Frame]:
        """Remove and return the messages that never left the backlog."""
        frames = list(self._backlog)
        self._backlog.clear()
        self._backlog_ids.clear()
        return frames

    def _drain(self, now: float, effects: list[Effect]) -> None:
        backlog = self._backlog
        while backlog and len(self._live) < self.timers.window:
            frame = backlog.popleft()
            self._backlog_ids.discard(frame.id)
            entry = _Entry(frame, State.NEW, now + self.timers.ack_timeout)
            self._apply(entry, Input.SEND, now, effects)
            if now < self._retry_slot:
                self._hold(entry, effects)


class Receiver(_Machine):
    """The receiving end: acks, waits for confirmations under RigorAck, dispatches once.

    After every call, send the :class:`SendFrame` effects' frames to the peer and hand each
    :class:`Dispatch` effect's frame to the application, in order.
    """

    role = Role.RECEIVER

    def __init__(self, mode: AckMode, timers: AckTimers | None = None) -> None:
        super().__init__(mode, timers or AckTimers())
        # The delivered ids of the senders that name this receiver their partner.
        self._delivered = _Memory(self.timers)

    def on_data(self, frame: Frame, now: float, *, acked: bool = True) -> list[Effect]:
        """A ``Data`` frame arrived. With ``acked=False`` (a ``NoAck`` frame) skip the acks."""
        effects: list[Effect] = []
        if not acked and self.mode is not AckMode.NONE:
            if frame.id in self._memory or frame.id in self._live:
                return effects
            actions, _state = transition(self.role, AckMode.NONE, State.NEW, Input.DATA)
            effects.extend(self._effect(action, frame) for action in actions)
            if frame.id:
                self._memory.add(frame.id, now)
            return effects
        entry = self._live.get(frame.id)
        if entry is None:
            entry = self._known(frame.id, frame, now)
        elif frame.ack_seq != entry.frame.ack_seq:
            entry.frame = frame
        self._apply(entry, Input.DATA, now, effects)
        return effects

    def on_confirm(self, message_id: str, now: float) -> list[Effect]:
        """The peer sent ``Ack{message_id, ackSeq: 2}``."""
        effects: list[Effect] = []
        entry = self._known(message_id, Frame(FrameType.DATA, id=message_id), now)
        self._apply(entry, Input.CONFIRM, now, effects)
        return effects

    def resend_acks(self, now: float) -> list[Effect]:
        """Send again the acks still waiting for confirmation (after a reconnect)."""
        effects: list[Effect] = []
        for entry in list(self._live.values()):
            effects.append(self._effect(Action.SEND_ACK, entry.frame))
            self._schedule(entry, now)
        return effects


# ---------------------------------------------------------------------- peer.py
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
        self._strikes: deque[float] = deque()
        self._last_activity = now
        self._tokens = float(options.rate_burst)
        self._tokens_at = now
        self._rate_strike_at = now
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
        candidates = [self.sender.next_deadline(), self.receiver.next_deadline()]
        if self.options.idle_timeout is not None:
            candidates.append(self._last_activity + self.options.idle_timeout)
        present = [c for c in candidates if c is not None]
        return min(present) if present else None

    # ------------------------------------------------------------------ inputs
    def handle_timeout(self, now: float) -> None:
        """Fire what is due at ``now``: resends, give-ups, the idle timeout."""
        if self.closed:
            return
        self._effects(self.sender.handle_timeout(now), now)
        self._effects(self.receiver.handle_timeout(now), now)
        idle = self.options.idle_timeout
        if idle is not None and now >= self._last_activity + idle:
            self.request_close(CLOSE_IDLE, "idle timeout")

    def receive_text(self, text: str, now: float) -> None:
        """Handle one whole text message from the peer."""
        if self.closed:
            return
        self._last_activity = now
        decoded = decode_frame(text)
        if isinstance(decoded, DecodeError):
            self._reject(decoded.code, decoded.message, decoded.id, now)
            return
        frame = decoded
        kind = frame.frame_type
        if kind is FrameType.ACK:
            if frame.ack_seq == 2:
                self._effects(self.receiver.on_confirm(frame.id, now), now)
            else:
                self._effects(self.sender.on_ack(frame.id, now), now)
        elif kind is FrameType.DATA or kind is FrameType.NO_ACK:
            self._receive_data(frame, now)
        elif kind is FrameType.PING:
            if self.server:
                self._out.append(encode_frame(Frame(FrameType.PING, id=frame.id)))
        elif kind is FrameType.ERR:
            self._events.append(ErrorReceived(frame))
            data = frame.data
            if frame.id and isinstance(data, dict):
                code = data.get("code")
                if code in FINAL_ERROR_CODES:
                    self._effects(self.sender.refuse(frame.id, now), now)
                elif code == ErrorCode.RATE_LIMITED:
                    retry, rate = data.get("retryAfter"), data.get("rate")
                    if type(retry) is int or type(retry) is float:
                        every = None
                        if (type(rate) is int or type(rate) is float) and rate > 0:
                            try:
                                every = 1.0 / rate
                            except OverflowError:
                                pass
                        self.sender.retry_after(frame.id, retry, now, every=every)
        elif self.server:  # TRANSPOND from a client
            self._reject(
                ErrorCode.FORBIDDEN, "clients may not send Transpond frames", frame.id, now
            )

    def _receive_data(self, frame: Frame, now: float) -> None:
        if self.server:
            if not self._take_token(now):
                retry = (1.0 - self._tokens) / (self.options.rate_limit or 1.0)
                strike = now >= self._rate_strike_at
                if strike:
                    self._rate_strike_at = now + retry
                self._reject(
                    ErrorCode.RATE_LIMITED,
                    "rate limit exceeded; resend this message later",
                    frame.id,
                    now,
                    strike=strike,
                    retryAfter=math.ceil(retry * 1000) / 1000,
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
            if frame.form_id != self.user_id:
                frame = attrs.evolve(frame, form_id=self.user_id)
        acked = frame.frame_type is FrameType.DATA
        if acked and not frame.id and self.receiver.mode is not AckMode.NONE:
            # Nothing could ack it, and two such messages would be taken for one.
            self._reject(ErrorCode.BAD_FRAME, "an acked Data frame needs an id", "", now)
            return
        self._effects(self.receiver.on_data(frame, now, acked=acked), now)

    def _take_token(self, now: float) -> bool:
        rate = self.options.rate_limit
        if rate is None:
            return True
        tokens = min(float(self.options.rate_burst), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if tokens < 1.0 - 1e-9:
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
        frame = Frame(
            FrameType.DATA if acked else FrameType.NO_ACK,
            id=message_id if message_id is not None else self.new_id(),
            method=method,
            form_id=form_id,
            data=data,
            reply_to=reply_to,
        )
        if self.closed:
            self._events.append(DeliveryFailed(frame, "closed"))
            return frame
        # Encode first: data that cannot go on the wire fails here, before the ack machine
        # holds a frame that every later resend would fail to encode.
        text = encode_frame(frame)
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError)
        if not acked:
            self._out.append(text)
            return frame
        if self.sender.backlog >= self.options.max_backlog:
            self._events.append(DeliveryFailed(frame, "overflow"))
            self.request_close(CLOSE_POLICY, "send queue full: the client is not reading")
            return frame
        self._effects(self.sender.send(frame, now), now, (frame, text))
        return frame

    def send_frame(self, frame: Frame) -> None:
        """Send ``frame`` as it is, outside the ack machines (Err, Ping, forwards)."""
        if not self.closed:
            self._out.append(encode_frame(frame))

    def send_error(self, code: str, message: str, frame_id: str = "", **extra: Any) -> None:
        """Send an ``Err`` frame answering ``frame_id``."""
        self.send_frame(error_frame(code, message, frame_id, **extra))

    def resume(self, now: float) -> None:
        """After a reconnect: resend what is still in flight, with the original ids."""
        self._effects(self.sender.resend_all(now), now)
        self._effects(self.receiver.resend_acks(now), now)

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

    # ------------------------------------------------------------------ effects
    def _effects(
        self, effects: list[Effect], now: float, encoded: tuple[Frame, str] | None = None
    ) -> None:
        out = self._out
        events = self._events
        for effect in effects:
            if isinstance(effect, SendFrame):
                if encoded is not None and effect.frame is encoded[0]:
                    out.append(encoded[1])
                else:
                    out.append(encode_frame(effect.frame))
            elif isinstance(effect, Dispatch):
                events.append(MessageReceived(effect.frame))
            elif isinstance(effect, Delivered):
                events.append(DeliveredEvent(effect.frame))
            elif isinstance(effect, Refused):
                events.append(DeliveryFailed(effect.frame, "refused"))
            elif effect.role is Role.SENDER:
                events.append(DeliveryFailed(effect.frame, "timeout"))
            else:
                events.append(MessageExpired(effect.frame))
                out.append(
                    encode_frame(
                        error_frame(
                            ErrorCode.EXPIRED,
                            "not confirmed before the ack timeout; dropped, send it again",
                            effect.frame.id,
                        )
                    )
                )
