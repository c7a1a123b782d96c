"""One WebSocket connection, sans-IO: wsproto below, a :class:`~imkit.core.peer.Peer` above.

The verbs are the same on both ends (:class:`ServerConn`, :class:`ClientConn`):

* :meth:`receive_data` (``None`` for end of stream) and :meth:`handle_timeout` take input;
* :meth:`events` and :meth:`data_to_send` give output, to act on and to write, in that order;
* :meth:`next_deadline` says when to call :meth:`handle_timeout` next.

After every input call, write ``data_to_send()`` to the socket and act on ``events()``.
When a :class:`~imkit.core.events.Closed` event comes out, write what is left and close the
socket: nothing more will come.

A misbehaving peer never raises out of here. Handshake faults become HTTP answers (400,
403, 404, 426, 431); framing faults become close codes (1002, 1007); an oversized message
closes with 1009 and a binary one with 1003; bad frames become ``Err`` frames and then
1008 (see :mod:`imkit.core.peer`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from enum import Enum
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from imkit.core.ack import AckMode, Receiver, Sender
from imkit.core.events import (
    Closed,
    Connected,
    Event,
    HandshakeRequested,
    HttpRequested,
    RawMessageReceived,
    Rejected,
)
from imkit.core.frames import Frame
from imkit.core.interfaces import HandshakeRequest, Identity
from imkit.core.peer import Peer, PeerOptions
from imkit.exceptions import LocalProtocolError

__all__ = (
    "ACK_MODE_HEADER",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_SESSION_REPLACED",
    "CLOSE_UNSUPPORTED_DATA",
    "ClientConn",
    "ConnLimits",
    "ConnState",
    "ServerConn",
    "origin_allowed",
)

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


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str] | None) -> bool:
    """Whether a browser ``Origin`` may open a connection.

    ``allowed=None`` admits requests without an Origin (non-browser clients) and
    same-origin pages (the Origin's host equals the Host header); a list admits exactly
    the origins listed (``scheme://host[:port]``, case-insensitive), and ``"*"`` admits all.
    """
    if allowed is not None and "*" in allowed:
        return True
    if origin is None:
        return allowed is None or "" in allowed
    origin = origin.strip().lower().rstrip("/")
    if allowed is None:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == (host or "").lower() != ""
    return origin in {o.strip().lower().rstrip("/") for o in allowed}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _http_response(
    status: int, body: bytes, headers: Sequence[tuple[str, str]] = (), content_type: str = ""
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_phrase(status)}"]
    names = {name.lower() for name, _ in headers}
    if "content-type" not in names:
        lines.append(f"Content-Type: {content_type or 'text/plain; charset=utf-8'}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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
        limits = self.limits
        # Every branch that ends the connection returns at once.
        for event in ws.events():
            if isinstance(event, TextMessage):
                if self.state is not ConnState.OPEN:
                    continue  # frames after our close frame are ignored
                chunk = event.data
                self._parts.append(chunk)
                # Count UTF-8 bytes chunk by chunk: linear in the message, whatever its split.
                self._part_bytes += len(chunk) if chunk.isascii() else len(chunk.encode())
                if event.frame_finished:
                    self._fragments += 1
                if self._part_bytes > limits.max_message_size:
                    self._fail(CLOSE_MESSAGE_TOO_BIG, "message too big")
                    return
                if self._fragments > limits.max_fragments:
                    self._fail(CLOSE_MESSAGE_TOO_BIG, "too many fragments")
                    return
                if event.message_finished:
                    text = chunk if len(self._parts) == 1 else "".join(self._parts)
                    self._parts.clear()
                    self._part_bytes = 0
                    self._fragments = 0
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
                self._part_bytes += len(event.data)
                if event.frame_finished:
                    self._fragments += 1
                if self._part_bytes > limits.max_message_size:
                    self._fail(CLOSE_MESSAGE_TOO_BIG, "message too big")
                    return
                if self._fragments > limits.max_fragments:
                    self._fail(CLOSE_MESSAGE_TOO_BIG, "too many fragments")
                    return
                if event.message_finished:
                    data = b"".join(self._bin_parts)
                    self._bin_parts.clear()
                    self._part_bytes = 0
                    self._fragments = 0
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


class ServerConn(_Conn):
    """The server end of one connection, from the first byte of the HTTP request.

    After a :class:`~imkit.core.events.HandshakeRequested` event, call :meth:`accept` or
    :meth:`reject`; after :class:`~imkit.core.events.HttpRequested`, call :meth:`respond`.

    ``raw=True`` makes a plain WebSocket connection with no IM layer (no
    :class:`~imkit.core.peer.Peer`, no frames, acks, strikes or rate limit): every whole
    message, text or binary, comes out as a :class:`~imkit.core.events.RawMessageReceived`
    event and :meth:`send_raw` sends one. The limits of :class:`ConnLimits` still apply.
    """

    def __init__(
        self,
        *,
        now: float,
        path: str | re.Pattern[str] = "/ws",
        allowed_origins: Sequence[str] | None = None,
        limits: ConnLimits | None = None,
        remote_addr: str = "",
        raw: bool = False,
    ) -> None:
        super().__init__(limits or ConnLimits(), now)
        self.raw = raw
        self.path = path
        self.allowed_origins = allowed_origins
        self.remote_addr = remote_addr
        self.request: HandshakeRequest | None = None
        self.identity: Identity | None = None
        self._head = bytearray()
        self._deciding = False

    def receive_data(self, data: bytes | None, now: float) -> None:
        """Feed bytes read from the socket; ``None`` means the peer closed its side."""
        if self.state is ConnState.CLOSED:
            return
        if self._ws is not None:
            self._feed_ws(data, now)
            return
        if data is None:
            self._finish(CLOSE_ABNORMAL, "connection lost before the handshake", by_peer=True)
            return
        self._head += data
        if self._deciding:
            if len(self._head) > self.limits.max_header_bytes + self.limits.max_message_size:
                self._finish(CLOSE_ABNORMAL, "too much data before the handshake was decided")
            return
        self._parse_head()

    def _parse_head(self) -> None:
        limits = self.limits
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > limits.max_header_bytes:
                self._refuse(431, "request head too large")
            return
        if end + 4 > limits.max_header_bytes:
            self._refuse(431, "request head too large")
            return
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        parser.receive_data(bytes(self._head[: end + 4]))
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            self._refuse(exc.error_status_hint, f"bad request: {exc}")
            return
        if not isinstance(event, h11.Request):  # pragma: no cover - a full head always parses
            self._refuse(400, "bad request")
            return
        if len(event.headers) > limits.max_headers:
            self._refuse(431, "too many request headers")
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        request = HandshakeRequest(
            path=split.path,
            query=dict(reversed(parse_qsl(split.query, keep_blank_values=True))),
            headers=headers,
            remote_addr=self.remote_addr,
            subprotocols=[
                p.strip()
                for name, value in headers
                if name == "sec-websocket-protocol"
                for p in value.split(",")
                if p.strip()
            ],
        )
        self.request = request
        upgrade = (request.header("upgrade") or "").lower()
        connection = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
        if upgrade != "websocket" or "upgrade" not in connection:
            self._deciding = True
            self._events.append(HttpRequested(event.method.decode("latin-1"), request))
            return
        if event.method != b"GET":
            self._refuse(405, "WebSocket upgrades must use GET", [("Allow", "GET")])
            return
        if not self._path_ok(request.path):
            self._refuse(404, "no WebSocket endpoint at this path")
            return
        if request.header("sec-websocket-version") != "13":
            self._refuse(426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")])
            return
        try:
            key = base64.b64decode(request.header("sec-websocket-key") or "", validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 16:
            self._refuse(400, "missing or malformed Sec-WebSocket-Key")
            return
        if not origin_allowed(
            request.header("origin"), request.header("host"), self.allowed_origins
        ):
            self._refuse(403, "origin not allowed")
            return
        self._deciding = True
        self._events.append(HandshakeRequested(request))

    def _path_ok(self, path: str) -> bool:
        if isinstance(self.path, str):
            return path == self.path
        return self.path.fullmatch(path) is not None

    def _refuse(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._out.append(_http_response(status, reason.encode() + b"\n", headers))
        self._finish(CLOSE_ABNORMAL, f"HTTP {status}: {reason}")

    def reject(
        self, status: int, reason: str = "", headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Refuse the upgrade with an HTTP ``status`` (401, 403, 429, 503, ...)."""
        if self.state is not ConnState.HANDSHAKE:
            raise LocalProtocolError("the handshake is already decided")
        self._refuse(status, reason or _phrase(status), headers)

    def respond(
        self,
        status: int,
        body: bytes,
        headers: Sequence[tuple[str, str]] = (),
        *,
        content_type: str = "",
    ) -> None:
        """Answer a plain HTTP request (after ``HttpRequested``), then close."""
        if self.state is not ConnState.HANDSHAKE:
            raise LocalProtocolError("the request is already answered")
        self._out.append(_http_response(status, body, headers, content_type))
        self._finish(CLOSE_ABNORMAL, f"HTTP {status}")

    def accept(
        self,
        identity: Identity,
        now: float,
        *,
        options: PeerOptions | None = None,
        receiver: Receiver | None = None,
        accepts_method: Callable[[str], bool] | None = None,
        headers: Sequence[tuple[str, str]] = (),
        subprotocol: str | None = None,
    ) -> None:
        """Complete the upgrade for ``identity``; the connection is then open.

        ``receiver`` lets the server keep the identity's dedupe memory across connections.
        ``subprotocol`` selects one of the client's offered subprotocols; a browser that
        offered any (a ``token.…`` credential, say) fails a connection that selects none.
        """
        if self.state is not ConnState.HANDSHAKE or self.request is None or self._ws is not None:
            raise LocalProtocolError("no handshake is waiting to be accepted")
        if subprotocol is not None and subprotocol not in self.request.subprotocols:
            raise LocalProtocolError(f"the client did not offer subprotocol {subprotocol!r}")
        options = options or PeerOptions()
        self.identity = identity
        ws = WSConnection(ConnectionType.SERVER)
        self._ws = ws
        # wsproto drops whatever follows the request head: keep it and feed it after the
        # 101, so frames sent without waiting for the answer are not lost silently.
        end = self._head.find(b"\r\n\r\n") + 4
        early = bytes(self._head[end:])
        try:
            ws.receive_data(bytes(self._head[:end]))
            request = next(e for e in ws.events() if isinstance(e, Request))
        except (WSRemoteProtocolError, StopIteration):
            self._ws = None
            self._refuse(400, "bad WebSocket handshake")
            return
        del request
        self._head.clear()
        extra = [] if self.raw else [(b"imkit-ack-mode", options.ack_mode.value.encode())]
        extra.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
        self._out.append(ws.send(AcceptConnection(extra_headers=extra, subprotocol=subprotocol)))
        if early:
            ws.receive_data(early)
        if self.raw:
            self._open(None, now)
            self._receive_frames(now)
            self._check_announced_size()
            return
        peer = Peer(
            options,
            server=True,
            now=now,
            user_id=identity.user_id,
            receiver=receiver,
            accepts_method=accepts_method,
        )
        self._open(peer, now)
        self._receive_frames(now)
        self._check_announced_size()


class ClientConn(_Conn):
    """The client end of one connection: sends the upgrade request at once.

    The ack mode comes from the server's ``imkit-ack-mode`` response header unless
    ``ack_mode`` is given (for servers that do not send it, like easy-chat's).
    ``sender`` and ``receiver`` may be kept across reconnects so that unacknowledged
    messages are resent with their original ids and pushes are not handled twice.
    """

    def __init__(
        self,
        *,
        host: str,
        target: str,
        now: float,
        headers: Sequence[tuple[str, str]] = (),
        limits: ConnLimits | None = None,
        options: PeerOptions | None = None,
        ack_mode: AckMode | None = None,
        sender_factory: Callable[[AckMode], Sender] | None = None,
        receiver_factory: Callable[[AckMode], Receiver] | None = None,
    ) -> None:
        super().__init__(limits or ConnLimits(), now)
        self.options = options or PeerOptions(idle_timeout=None, rate_limit=None)
        self.ack_mode = ack_mode
        self._sender_factory = sender_factory
        self._receiver_factory = receiver_factory
        self._reject: Rejected | None = None
        self._reject_body = bytearray()
        ws = WSConnection(ConnectionType.CLIENT)
        self._ws = ws
        self._out.append(
            ws.send(
                Request(
                    host=host,
                    target=target,
                    extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                )
            )
        )

    def _keeps_sender(self) -> bool:
        return True

    def receive_data(self, data: bytes | None, now: float) -> None:
        """Feed bytes read from the socket; ``None`` means the server closed its side."""
        if self.state is ConnState.CLOSED:
            return
        if self.state is not ConnState.HANDSHAKE:
            self._feed_ws(data, now)
            return
        ws = self._ws
        assert ws is not None
        if data is None:
            if self._reject is not None:  # a refusal whose body ends with the connection
                self._rejected()
                return
            self._finish(CLOSE_ABNORMAL, "connection lost during the handshake", by_peer=True)
            return
        try:
            ws.receive_data(data)
            self._handshake_events(now)
        except WSRemoteProtocolError as exc:
            self._finish(CLOSE_ABNORMAL, f"bad handshake response: {exc}", by_peer=True)

    def _handshake_events(self, now: float) -> None:
        ws = self._ws
        assert ws is not None
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                headers = [
                    (k.decode("latin-1").lower(), v.decode("latin-1"))
                    for k, v in event.extra_headers
                ]
                self._on_accepted(headers, now)
                self._receive_frames(now)
                return
            if isinstance(event, RejectConnection):
                headers = [
                    (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers
                ]
                self._reject = Rejected(event.status_code, headers, b"")
                if not event.has_body:
                    self._rejected()
                    return
            else:
                assert isinstance(event, RejectData)  # a client handshake's only other event
                self._reject_body += event.data
                if event.body_finished:
                    self._rejected()
                    return

    def _rejected(self) -> None:
        assert self._reject is not None
        rejected = attrs.evolve(self._reject, body=bytes(self._reject_body))
        self._events.append(rejected)
        self._finish(CLOSE_ABNORMAL, f"HTTP {rejected.status}", by_peer=True)

    def _on_accepted(self, headers: list[tuple[str, str]], now: float) -> None:
        mode = self.ack_mode
        if mode is None:
            advertised = dict(headers).get(ACK_MODE_HEADER, "")
            try:
                mode = AckMode(advertised)
            except ValueError:
                mode = self.options.ack_mode
        self.ack_mode = mode
        options = attrs.evolve(self.options, ack_mode=mode)
        sender = self._sender_factory(mode) if self._sender_factory else None
        receiver = self._receiver_factory(mode) if self._receiver_factory else None
        peer = Peer(options, server=False, now=now, sender=sender, receiver=receiver)
        self._open(peer, now)
        self._events.append(Connected(headers))
        peer.resume(now)
        self._pump(now)
