"""The open-connection machinery :class:`~imkit.core.conn.ServerConn` and
:class:`~imkit.core.conn.ClientConn` share: wsproto framing, message limits, keepalive,
the closing handshake, and the :class:`~imkit.core.peer.Peer` above.

Private: import the public names from :mod:`imkit.core.conn`, which re-exports them.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import attrs
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError

from imkit.core.events import Closed, Event, RawMessageReceived
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


class _Conn:
    """The open-connection machinery both ends share."""

    _ws: WSConnection | None
    peer: Peer | None

    def __init__(self, limits: ConnLimits, now: float) -> None:
        self.limits = limits
        self.state = ConnState.HANDSHAKE
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
        return self.state is ConnState.CLOSED

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next be called (``None``: nothing pending)."""
        state = self.state
        if state is ConnState.HANDSHAKE:
            timeout = self.limits.handshake_timeout
            return None if timeout is None else self._created + timeout
        if state is ConnState.CLOSING:
            return self._close_due
        if state is ConnState.CLOSED:
            return None
        times = [self._next_ping, self._pong_due]
        if self.peer is not None:
            times.append(self.peer.next_deadline())
        present = [t for t in times if t is not None]
        return min(present) if present else None

    # ------------------------------------------------------------------ inputs
    def handle_timeout(self, now: float) -> None:
        """Fire what is due at ``now``: handshake, keepalive, resend and close deadlines."""
        state = self.state
        if state is ConnState.HANDSHAKE:
            timeout = self.limits.handshake_timeout
            if timeout is not None and now >= self._created + timeout:
                self._finish(CLOSE_ABNORMAL, "handshake timeout")
            return
        if state is ConnState.CLOSING:
            if self._close_due is not None and now >= self._close_due:
                self._finish(self._close_code, self._close_reason)
            return
        if state is not ConnState.OPEN:
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
    def send(self, method: str, data: Any, now: float, **options: Any) -> Frame:
        """Send a message with the connection's ack mode; see :meth:`Peer.send`."""
        peer = self._require_peer()
        frame = peer.send(method, data, now, **options)
        self._pump(now)
        return frame

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
        if self.state is ConnState.OPEN:
            self._send_ws(CloseConnection(code=code, reason=reason))
            self._start_closing(code, reason, now)
        elif self.state is ConnState.HANDSHAKE:
            self._finish(code, reason)

    def send_raw(self, data: str | bytes) -> None:
        """Raw mode: send ``data`` as one text (``str``) or binary (``bytes``) message.

        Ignored once the connection is closing. Write ``data_to_send()`` afterwards.
        """
        if not self.raw:
            raise LocalProtocolError("send_raw() needs a connection in raw mode")
        if self.state is not ConnState.OPEN:
            return
        if isinstance(data, str):
            self._send_ws(TextMessage(data=data))
        else:
            self._send_ws(BytesMessage(data=bytes(data)))

    def _require_peer(self) -> Peer:
        if self.peer is None or self.state is not ConnState.OPEN:
            raise LocalProtocolError(f"cannot send on a connection in state {self.state.value}")
        return self.peer

    # ------------------------------------------------------------------ internals
    def _open(self, peer: Peer | None, now: float) -> None:
        self.peer = peer
        self.state = ConnState.OPEN
        if self.limits.ping_interval is not None:
            self._next_ping = now + self.limits.ping_interval

    def _send_ws(self, event: Any) -> None:
        assert self._ws is not None
        try:
            self._out.append(self._ws.send(event))
        except WSLocalProtocolError:  # already closing: nothing more may be sent
            pass

    def _start_closing(self, code: int, reason: str, now: float) -> None:
        self.state = ConnState.CLOSING
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
        if self.state is ConnState.CLOSED:  # pragma: no cover - every caller checks first
            return
        self.state = ConnState.CLOSED
        if self.peer is not None:
            self.peer.connection_lost(keep_sender=self._keeps_sender())
            self._events.extend(self.peer.events())
        self._events.append(Closed(code, reason, by_peer))

    def _keeps_sender(self) -> bool:
        return False

    def _flush_peer(self) -> None:
        peer = self.peer
        assert peer is not None
        texts = peer.outgoing()
        if texts and self._ws is not None and self._ws.state is ConnectionState.OPEN:
            for text in texts:
                self._out.append(self._ws.send(TextMessage(data=text)))
        self._events.extend(peer.events())

    def _pump(self, now: float) -> None:
        peer = self.peer
        assert peer is not None
        self._flush_peer()
        request = peer.close_request
        if request is not None and self.state is ConnState.OPEN:
            code, reason = request
            self.close(code, reason, now)

    def _receive_frames(self, now: float) -> None:
        """Drain wsproto's events while the connection is open or closing."""
        ws = self._ws
        assert ws is not None
        # Every branch that ends the connection returns at once.
        for event in ws.events():
            if isinstance(event, TextMessage):
                if self.state is not ConnState.OPEN:
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
                if self.state is not ConnState.OPEN:
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
                if self.limits.ping_interval is not None and self.state is ConnState.OPEN:
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
        if ws.state is ConnectionState.REMOTE_CLOSING:
            # The peer started the closing handshake: echo its code, then end.
            self._send_ws(event.response())
            self._finish(code, reason, by_peer=True)
        elif ws.state is ConnectionState.CLOSED:
            # The peer answered our close frame.
            self._finish(self._close_code, self._close_reason)
        elif self.state is ConnState.CLOSING:
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
            if self.state is ConnState.CLOSING:
                self._finish(self._close_code, self._close_reason)
            else:
                self._finish(CLOSE_ABNORMAL, "connection lost", by_peer=True)
            return
        # wsproto is CLOSED only once this connection is (both ends of a close handshake).
        ws.receive_data(data)
        self._receive_frames(now)
        self._check_announced_size()

    def _check_announced_size(self) -> None:
        """Close with 1009 as soon as a frame header announces a message over the limit.

        wsproto hands out a frame's payload as it arrives, so without this check a frame
        announcing 2**62 bytes would be read (and buffered) until the byte count passed
        ``max_message_size``. The header wsproto has parsed for the frame in progress is
        private (``connection._proto._frame_decoder.header``), hence the defensive lookups.
        """
        if self.state is not ConnState.OPEN:
            return
        proto = getattr(getattr(self._ws, "connection", None), "_proto", None)
        decoder = getattr(proto, "_frame_decoder", None)
        header = getattr(decoder, "header", None)
        length = getattr(header, "payload_len", None)
        opcode = getattr(header, "opcode", None)
        if not isinstance(length, int) or opcode is None or opcode.iscontrol():
            return
        remaining = length - int(getattr(decoder, "payload_consumed", 0))
        if self._part_bytes + remaining > self.limits.max_message_size:
            self._fail(CLOSE_MESSAGE_TOO_BIG, "message too big")
