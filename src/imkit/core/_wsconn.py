"""The open-connection machinery :class:`~imkit.core.conn.ServerConn` and
:class:`~imkit.core.conn.ClientConn` share: wsproto framing, message limits, keepalive,
the closing handshake, and the :class:`~imkit.core.peer.Peer` above.

Private: import the public names from :mod:`imkit.core.conn`, which re-exports them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from enum import Enum
from typing import Any, ClassVar

import attrs
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError

from imkit.core import _framing
from imkit.core.events import Closed, Event, RawMessageReceived, _raw_message_received
from imkit.core.frames import Frame
from imkit.core.peer import Peer
from imkit.exceptions import LocalProtocolError

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_ABNORMAL = 1006
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SESSION_REPLACED = 4000
"""The user logged in again elsewhere under the "single" policy."""

ACK_MODE_HEADER = "imkit-ack-mode"
"""Response header by which a server tells its clients its ack mode."""

# Precedents: websockets' max_size=2**20, open_timeout=10, ping_interval=20,
# ping_timeout=20, close_timeout=10; h11 and nginx refuse heads over 8 KiB.
DEFAULT_MAX_MESSAGE_SIZE = 2**20
DEFAULT_MAX_FRAGMENTS = 4096
DEFAULT_MAX_HEADER_BYTES = 8192
DEFAULT_MAX_HEADERS = 100
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_CLOSE_TIMEOUT = 10.0

# RFC 6455 §5.2: the first byte of a whole (FIN) binary frame; the mask bit.
_BINARY = 0x82
_MASK_BIT = 0x80
_frame_head = _framing.frame_head
_read_text = _framing.read_text
_frame_texts = _framing.frame_texts


def _head_size(second: int) -> int:
    """The length of a frame header, from its second byte (length code and mask bit)."""
    code = second & 0x7F
    size = 2 if code < 126 else 4 if code == 126 else 10
    return size + 4 if second & _MASK_BIT else size


def _payload_length(head: bytearray) -> int:
    """The payload length a complete frame header announces."""
    code = head[1] & 0x7F
    if code < 126:
        return code
    return int.from_bytes(head[2:4] if code == 126 else head[2:10], "big")


@attrs.frozen(kw_only=True)
class ConnLimits:
    """WebSocket-level limits of a connection, with their defaults."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    """Largest message, in bytes; a larger one closes with 1009."""
    max_fragments: int = DEFAULT_MAX_FRAGMENTS
    """Most frames one message may be split into; more closes with 1009."""
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    """Largest request head (request line and headers); larger gets HTTP 431."""
    max_headers: int = DEFAULT_MAX_HEADERS
    """Most request headers; more gets HTTP 431."""
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT
    """A connection that has not finished its handshake by then is dropped."""
    ping_interval: float | None = DEFAULT_PING_INTERVAL
    """Send a WebSocket ping this long after the last one was answered; ``None``: never."""
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    """A ping unanswered this long closes with 1011 "keepalive ping timeout"."""
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    """How long to wait for the peer's close frame after sending ours."""


class ConnState(str, Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# Module constants: read for a fraction of the cost of an enum class's attribute.
_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = (
    ConnState.HANDSHAKE,
    ConnState.OPEN,
    ConnState.CLOSING,
    ConnState.CLOSED,
)
_WS_OPEN, _WS_REMOTE_CLOSING, _WS_CLOSED = (
    ConnectionState.OPEN,
    ConnectionState.REMOTE_CLOSING,
    ConnectionState.CLOSED,
)


class _Conn:
    """The open-connection machinery both ends share.

    Framing while open has two paths. wsproto does the handshakes, the closing handshake
    and everything unusual. The common case, a whole text message in one frame, skips
    its generic machinery: :meth:`_frame_texts` writes outgoing frames, and :meth:`_lean_frame`
    takes an incoming frame that is complete in one read, unfragmented, masked as the
    role requires, minimally encoded, within the limits and valid UTF-8, while wsproto
    is idle (no frame or message of its own in progress). Every other byte goes to
    wsproto in order, so what it does with them is what it would do alone. To know when
    it is idle again, :meth:`_pass_through` follows the frame headers of the bytes it
    gets (any fault in them closes the connection before that matters).
    """

    # Slots keep a connection small; ``__dict__`` stays for subclasses' own fields.
    __slots__ = (
        "__dict__",
        "_bin_parts",
        "_close_code",
        "_close_due",
        "_close_reason",
        "_created",
        "_events",
        "_fragments",
        "_lean_max",
        "_lean_on",
        "_next_ping",
        "_out",
        "_part_bytes",
        "_parts",
        "_ping_count",
        "_pong_due",
        "_pt_head",
        "_pt_left",
        "_pt_msg",
        "_pt_phase",
        "_ws",
        "limits",
        "peer",
        "raw",
        "state",
    )

    _ws: WSConnection | Connection | None
    peer: Peer | None
    _lean: bool = True
    """Take the lean framing path; ``False`` leaves all framing to wsproto (for tests)."""
    _out_mask: ClassVar[int] = 0
    """The mask bit of the frames this end sends (a client masks, RFC 6455 §5.3)."""
    _in_mask: ClassVar[int] = _MASK_BIT
    """The mask bit the peer's frames must carry (a server gets masked frames)."""

    def __init__(self, limits: ConnLimits, now: float) -> None:
        self.limits = limits
        self.state = _HANDSHAKE
        self.peer = None
        self._ws = None
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self.raw = False
        self._parts: list[str] = []
        self._bin_parts: list[bytes] = []
        self._part_bytes = 0
        self._fragments = 0
        self._created = now
        self._next_ping: float | None = None
        self._pong_due: float | None = None
        self._ping_count = 0
        self._close_due: float | None = None
        self._close_code = CLOSE_NORMAL
        self._close_reason = ""
        # The lean incoming path (see the class docstring). _lean_on: wsproto's framing
        # state is known (it was idle since the last _resync), so the tracker below holds.
        self._lean_on = False
        # Largest lean frame: a message within one frame is within max_fragments unless
        # that is 0 (then every message closes with 1009, which is wsproto's path).
        self._lean_max = limits.max_message_size if limits.max_fragments >= 1 else -1
        # The frame wsproto is being given: 0 none, 1 its header (bytes so far in
        # _pt_head), 2 its payload (_pt_left bytes still to come, always > 0).
        self._pt_phase = 0
        self._pt_head = bytearray()
        self._pt_left = 0
        # wsproto has a fragmented message in progress.
        self._pt_msg = False

    # ------------------------------------------------------------------ outputs
    def data_to_send(self) -> bytes:
        """Take the bytes to write to the socket."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def events(self) -> list[Event]:
        """Take the events to act on, in order."""
        events, self._events = self._events, []
        return events

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (a ``Closed`` event was produced)."""
        return self.state is _CLOSED

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next be called (``None``: nothing pending)."""
        state = self.state
        if state is _OPEN:  # the earliest of the ping, the pong and the peer's deadlines
            deadline = self._next_ping
            other = self._pong_due
            if other is not None and (deadline is None or other < deadline):
                deadline = other
            peer = self.peer
            if peer is not None:
                other = peer.next_deadline()
                if other is not None and (deadline is None or other < deadline):
                    deadline = other
            return deadline
        if state is _HANDSHAKE:
            timeout = self.limits.handshake_timeout
            return None if timeout is None else self._created + timeout
        if state is _CLOSING:
            return self._close_due
        return None

    # ------------------------------------------------------------------ inputs
    def handle_timeout(self, now: float) -> None:
        """Fire what is due at ``now``: handshake, keepalive, resend and close deadlines."""
        state = self.state
        if state is _HANDSHAKE:
            timeout = self.limits.handshake_timeout
            if timeout is not None and now >= self._created + timeout:
                self._finish(CLOSE_ABNORMAL, "handshake timeout")
            return
        if state is _CLOSING:
            if self._close_due is not None and now >= self._close_due:
                self._finish(self._close_code, self._close_reason)
            return
        if state is not _OPEN:
            return
        if self._pong_due is not None and now >= self._pong_due:
            self._fail(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
            return
        if self._next_ping is not None and now >= self._next_ping:
            self._ping_count += 1
            self._send_ws(Ping(payload=str(self._ping_count).encode()))
            self._next_ping = None
            self._pong_due = now + self.limits.ping_timeout
        if self.peer is not None:
            self.peer.handle_timeout(now)
            self._pump(now)

    def receive_data(self, data: bytes | None, now: float) -> None:
        """Feed bytes read from the socket; ``None`` means the peer closed its side."""
        raise NotImplementedError  # pragma: no cover - overridden by both ends

    # ------------------------------------------------------------------ sending
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
        flush: bool = True,
    ) -> Frame:
        """Send a message with the connection's ack mode; see :meth:`Peer.send`.

        ``flush=False`` leaves its bytes and events with the peer until :meth:`flush` or
        the connection's next input (which moves them first, in order): a caller that
        sends many messages at once moves them down together."""
        # (The options are spelled out: no keyword dict is built and unpacked per push.)
        peer = self.peer
        if peer is None or self.state is not _OPEN:
            peer = self._require_peer()  # raises
        frame = peer.send(
            method,
            data,
            now,
            message_id=message_id,
            reply_to=reply_to,
            acked=acked,
            form_id=form_id,
        )
        if flush:
            self._pump(now)
        return frame

    def flush(self, now: float) -> None:
        """Move what :meth:`send` with ``flush=False`` left with the peer to
        :meth:`data_to_send` and :meth:`events` (and start the close the peer asked for,
        if it did)."""
        if self.peer is not None:
            self._pump(now)

    def send_while_room(
        self, method: str, items: Iterator[tuple[Any, str]], now: float, *, most: int
    ) -> list[Frame]:
        """Send messages from ``items`` while each can go out at once, their bytes and
        events together; see :meth:`Peer.send_while_room`."""
        peer = self.peer
        if peer is None or self.state is not _OPEN:
            peer = self._require_peer()  # raises
        try:
            return peer.send_while_room(method, items, now, most=most)
        finally:
            self._pump(now)

    def send_frame(self, frame: Frame, now: float) -> None:
        """Send ``frame`` outside the ack machines (``Err``, ``Ping``)."""
        self._require_peer().send_frame(frame)
        self._pump(now)

    def send_error(self, code: str, message: str, frame_id: str, now: float, **extra: Any) -> None:
        """Send an ``Err`` frame answering ``frame_id``."""
        self._require_peer().send_error(code, message, frame_id, **extra)
        self._pump(now)

    def close(self, code: int, reason: str, now: float) -> None:
        """Start the closing handshake: send a close frame, wait for the peer's.

        The ``Closed`` event comes when the peer answers, the socket ends, or
        ``close_timeout`` passes.
        """
        if self.state is _OPEN:
            if self.peer is not None:  # what sends left unflushed goes before the close
                self._flush_peer()
            self._send_ws(CloseConnection(code=code, reason=reason))
            self._start_closing(code, reason, now)
        elif self.state is _HANDSHAKE:
            self._finish(code, reason)

    def send_raw(self, data: str | bytes) -> None:
        """Raw mode: send ``data`` as one text (``str``) or binary (``bytes``) message.

        Ignored once the connection is closing. Write ``data_to_send()`` afterwards.
        """
        if not self.raw:
            raise LocalProtocolError("send_raw() needs a connection in raw mode")
        if self.state is not _OPEN:
            return
        ws = self._ws
        assert ws is not None
        if self._lean and ws.state is _WS_OPEN:
            if isinstance(data, str):
                self._out.append(self._frame_texts([data]))
            else:
                self._out.append(self._binary_frame(bytes(data)))
        elif isinstance(data, str):
            self._send_ws(TextMessage(data=data))
        else:
            self._send_ws(BytesMessage(data=bytes(data)))

    def _require_peer(self) -> Peer:
        if self.peer is None or self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send on a connection in state {self.state.value}")
        return self.peer

    # ------------------------------------------------------------------ internals
    def _open(self, peer: Peer | None, now: float) -> None:
        self.peer = peer
        self.state = _OPEN
        if self.limits.ping_interval is not None:
            self._next_ping = now + self.limits.ping_interval

    def _send_ws(self, event: Any) -> None:
        assert self._ws is not None
        try:
            self._out.append(self._ws.send(event))
        except WSLocalProtocolError:  # already closing: nothing more may be sent
            pass

    def _start_closing(self, code: int, reason: str, now: float) -> None:
        self.state = _CLOSING
        self._close_code, self._close_reason = code, reason
        self._close_due = now + self.limits.close_timeout
        if self.peer is not None:
            self._flush_peer()

    def _fail(self, code: int, reason: str) -> None:
        """Close at once: send a close frame and end, without waiting for the peer.

        Only called while open (a fault after our close frame ends with our code instead).
        """
        self._send_ws(CloseConnection(code=code, reason=reason))
        self._finish(code, reason)

    def _finish(self, code: int, reason: str, *, by_peer: bool = False) -> None:
        if self.state is _CLOSED:  # pragma: no cover - every caller checks first
            return
        self.state = _CLOSED
        if self.peer is not None:
            self.peer.connection_lost(keep_sender=self._keeps_sender())
            self._events.extend(self.peer.events())
        self._events.append(Closed(code, reason, by_peer))

    def _keeps_sender(self) -> bool:
        return False

    def _flush_peer(self) -> None:
        peer = self.peer
        assert peer is not None
        # The peer's lists are taken in place (what outgoing() and events() give, without
        # a new list each): this runs after every input.
        texts = peer._out
        if texts:
            ws = self._ws
            if ws is not None and ws.state is _WS_OPEN:
                if self._lean:
                    self._out.append(self._frame_texts(texts))
                else:
                    out = self._out
                    for text in texts:
                        out.append(ws.send(TextMessage(data=text)))
            texts.clear()
        events = peer._events
        if events:
            self._events.extend(events)
            events.clear()

    def _frame_texts(self, texts: list[str]) -> bytes:
        """Each of ``texts`` as a whole text frame, as wsproto would write it (the
        shortest length encoding; masked with a fresh random key each by a client), all
        in one ``bytes``. Only while wsproto is open and has no outgoing message in progress
        (it never has: every message it sends is whole)."""
        if self._out_mask:
            return _frame_texts(texts, os.urandom(4 * len(texts)))
        return _frame_texts(texts, None)

    def _binary_frame(self, payload: bytes) -> bytes:
        """A whole binary frame, unmasked, as wsproto would write it (the shortest length
        encoding): only a server's raw mode sends binary messages (``send_raw``)."""
        return _frame_head(_BINARY, 0, len(payload)) + payload

    def _pump(self, now: float) -> None:
        peer = self.peer
        assert peer is not None
        self._flush_peer()
        request = peer.close_request
        if request is not None and self.state is _OPEN:
            code, reason = request
            self.close(code, reason, now)

    def _receive_frames(self, now: float) -> None:
        """Drain wsproto's events while the connection is open or closing."""
        ws = self._ws
        assert ws is not None
        # Every branch that ends the connection returns at once.
        for event in ws.events():
            if isinstance(event, TextMessage):
                if self.state is not _OPEN:
                    continue  # frames after our close frame are ignored
                chunk = event.data
                self._parts.append(chunk)
                # Count UTF-8 bytes chunk by chunk: linear in the message, whatever its split.
                size = len(chunk) if chunk.isascii() else len(chunk.encode())
                if not self._count(size, event):
                    return
                if event.message_finished:
                    text = chunk if len(self._parts) == 1 else "".join(self._parts)
                    self._parts.clear()
                    if self.raw:
                        self._events.append(RawMessageReceived(text))
                        continue
                    assert self.peer is not None
                    self.peer.receive_text(text, now)
                    self._pump(now)
            elif isinstance(event, BytesMessage):
                if self.state is not _OPEN:
                    continue
                if not self.raw:
                    self._fail(CLOSE_UNSUPPORTED_DATA, "binary messages are not supported")
                    return
                self._bin_parts.append(bytes(event.data))
                if not self._count(len(event.data), event):
                    return
                if event.message_finished:
                    data = b"".join(self._bin_parts)
                    self._bin_parts.clear()
                    self._events.append(RawMessageReceived(data))
            elif isinstance(event, Ping):
                self._send_ws(event.response())
            elif isinstance(event, Pong):
                self._pong_due = None
                if self.limits.ping_interval is not None and self.state is _OPEN:
                    self._next_ping = now + self.limits.ping_interval
            else:
                assert isinstance(event, CloseConnection)  # wsproto's only other event
                self._on_close(event)
                return

    def _count(self, size: int, event: TextMessage | BytesMessage) -> bool:
        """Count a chunk of the message being received; past a limit close with 1009 and
        return ``False``. The counts restart when the message ends.
        """
        self._part_bytes += size
        self._fragments += event.frame_finished
        limits = self.limits
        if self._part_bytes > limits.max_message_size:
            self._fail(CLOSE_MESSAGE_TOO_BIG, "message too big")
            return False
        if self._fragments > limits.max_fragments:
            self._fail(CLOSE_MESSAGE_TOO_BIG, "too many fragments")
            return False
        if event.message_finished:
            self._part_bytes = self._fragments = 0
        return True

    def _on_close(self, event: CloseConnection) -> None:
        ws = self._ws
        assert ws is not None
        code, reason = int(event.code), event.reason or ""
        if ws.state is _WS_REMOTE_CLOSING:
            # The peer started the closing handshake: echo its code, then end.
            self._send_ws(event.response())
            self._finish(code, reason, by_peer=True)
        elif ws.state is _WS_CLOSED:
            # The peer answered our close frame.
            self._finish(self._close_code, self._close_reason)
        elif self.state is _CLOSING:
            # A protocol violation after our close frame: end with the code we sent.
            self._finish(self._close_code, self._close_reason)
        else:
            # wsproto found a protocol violation (1002, 1007, ...): fail the connection.
            # (Its 1006 event comes only from receive_data(None), which is never called.)
            # Its 1007 reason is a codec message whose byte offset depends on how the
            # bytes were split: say the same thing however they arrive.
            self._fail(code, "invalid UTF-8 in a text message" if code == 1007 else reason)

    def _feed_ws(self, data: bytes | None, now: float) -> None:
        ws = self._ws
        assert ws is not None
        if data is None:
            if self.state is _CLOSING:
                self._finish(self._close_code, self._close_reason)
            else:
                self._finish(CLOSE_ABNORMAL, "connection lost", by_peer=True)
            return
        # wsproto is CLOSED only once this connection is (both ends of a close handshake).
        if self._lean_on and self.state is _OPEN:
            self._feed_lean(data, now)
            return
        ws.receive_data(data)
        self._receive_frames(now)
        self._check_announced_size()
        self._resync()

    def _resync(self) -> None:
        """Turn the lean incoming path on if wsproto is idle: no bytes buffered, no frame
        and no message in progress.

        Called once wsproto has handled bytes the tracker did not follow (those after the
        handshake). Its decoder state is private, hence the defensive lookups: anything
        unexpected counts as busy, which keeps everything on wsproto's path.
        """
        if not self._lean or self.state is not _OPEN:
            return
        proto = self._frame_protocol()
        decoder = getattr(proto, "_frame_decoder", None)
        buffered = getattr(getattr(decoder, "buffer", None), "buffer", None)
        message = getattr(proto, "_message_decoder", None)
        if (
            isinstance(buffered, bytearray)
            and not buffered
            and getattr(decoder, "header", False) is None
            and getattr(message, "opcode", False) is None
        ):
            self._lean_on = True
            self._pt_phase = self._pt_left = 0
            self._pt_head.clear()
            self._pt_msg = False

    def _feed_lean(self, data: bytes, now: float) -> None:
        """Take the whole simple frames wsproto is not needed for, give it the rest in
        order; each part is handled before the next, so events stay in wire order.
        """
        ws = self._ws
        assert ws is not None
        pos, end = 0, len(data)
        peer = self.peer
        # The peer's output of the lean frames of this read is moved down (_pump) once,
        # before anything else is written or read and at the end: the same bytes and
        # events, in the same order, as after every frame. A frame after which the peer
        # wants the connection closed is pumped at once (the close stops the reading).
        unpumped = False
        while pos < end:
            if not self._pt_phase and not self._pt_msg:
                stop = self._lean_frame(data, pos, end, now)
                if stop:
                    pos = stop
                    if peer is not None:
                        if peer.close_request is None:
                            unpumped = True
                            continue
                        self._pump(now)
                        unpumped = False
                    if self.state is not _OPEN:
                        break
                    continue
                self._pt_phase = 1  # wsproto's: this frame, and what follows it
            if unpumped:
                self._pump(now)
                unpumped = False
            start = pos
            pos = self._pass_through(data, pos, end)
            ws.receive_data(data[start:pos])
            self._receive_frames(now)
            self._check_announced_size()
            if self.state is not _OPEN:
                break
        if unpumped:
            self._pump(now)
        if self.state is _CLOSING and pos < end:
            # Our close frame went out mid-read: wsproto handles the rest, as it would.
            ws.receive_data(data[pos:])
            self._receive_frames(now)

    def _lean_frame(self, data: bytes, pos: int, end: int, now: float) -> int:
        """Handle the frame at ``data[pos:end]`` if it is a simple one (see the class
        docstring) and return where it ends; else return 0 and leave it to wsproto.

        A frame taken here is one wsproto would turn into one whole ``TextMessage``
        within the limits, so it goes where that would, without the counting.
        """
        frame = _read_text(data, pos, end, self._in_mask, self._lean_max)
        if frame is None:
            return 0
        text, stop = frame
        if self.raw:
            self._events.append(_raw_message_received(text))
        else:
            peer = self.peer
            assert peer is not None
            peer.receive_text(text, now)  # its output is pumped by _feed_lean
        return stop

    def _pass_through(self, data: bytes, pos: int, end: int) -> int:
        """Follow the frames wsproto is being given from ``data[pos:end]`` up to where it
        is idle again (or to ``end``); return that position.

        Only lengths, FIN and opcode matter here: wsproto checks everything else, and a
        fault it finds closes the connection before the tracker's view could be used.
        """
        head = self._pt_head
        while pos < end:
            phase = self._pt_phase
            if phase == 2:
                take = min(self._pt_left, end - pos)
                pos += take
                self._pt_left -= take
                if not self._pt_left:
                    self._pt_phase = 0
            elif phase == 1:
                need = 2 if len(head) < 2 else _head_size(head[1])
                take = min(need - len(head), end - pos)
                head += data[pos : pos + take]
                pos += take
                if len(head) < 2 or len(head) < _head_size(head[1]):
                    continue
                first = head[0]
                if not first & 0x08:  # a data frame: FIN says whether its message ends
                    self._pt_msg = not first & 0x80
                self._pt_left = _payload_length(head)
                self._pt_phase = 2 if self._pt_left else 0
                head.clear()
            elif self._pt_msg:
                self._pt_phase = 1  # the next frame of wsproto's message
            else:
                break
        return pos

    def _frame_protocol(self) -> Any:
        """wsproto's private frame protocol object: on a server's ``Connection`` (kept
        alone after the handshake) or inside a client's ``WSConnection``; ``None`` if
        neither has one (a wsproto that changed its internals)."""
        ws = self._ws
        proto = getattr(ws, "_proto", None)
        if proto is None:
            proto = getattr(getattr(ws, "connection", None), "_proto", None)
        return proto

    def _check_announced_size(self) -> None:
        """Close with 1009 as soon as a frame header announces a message over the limit.

        wsproto hands out a frame's payload as it arrives, so without this check a frame
        announcing 2**62 bytes would be read (and buffered) until the byte count passed
        ``max_message_size``. The header wsproto has parsed for the frame in progress is
        private (``connection._proto._frame_decoder.header``), hence the defensive lookups.
        """
        if self.state is not _OPEN:
            return
        proto = self._frame_protocol()
        decoder = getattr(proto, "_frame_decoder", None)
        header = getattr(decoder, "header", None)
        length = getattr(header, "payload_len", None)
        opcode = getattr(header, "opcode", None)
        if not isinstance(length, int) or opcode is None or opcode.iscontrol():
            return
        remaining = length - int(getattr(decoder, "payload_consumed", 0))
        if self._part_bytes + remaining > self.limits.max_message_size:
            self._fail(CLOSE_MESSAGE_TOO_BIG, "message too big")
