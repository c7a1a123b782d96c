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

import re
from collections.abc import Callable, Sequence

import attrs
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from imkit.core._wsconn import (
    _CLOSED,
    _HANDSHAKE,
    ACK_MODE_HEADER,
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    CLOSE_SESSION_REPLACED,
    CLOSE_UNSUPPORTED_DATA,
    ConnLimits,
    ConnState,
    _Conn,
)
from imkit.core.ack import AckMode, Receiver, Sender
from imkit.core.events import (
    Connected,
    HandshakeRequested,
    HttpRequested,
    Rejected,
)
from imkit.core.handshake import (
    Refusal,
    check_upgrade,
    http_response,
    is_upgrade,
    origin_allowed,
    parse_request_head,
    status_phrase,
)
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


class ServerConn(_Conn):
    """The server end of one connection, from the first byte of the HTTP request.

    After a :class:`~imkit.core.events.HandshakeRequested` event, call :meth:`accept` or
    :meth:`reject`; after :class:`~imkit.core.events.HttpRequested`, call :meth:`respond`.

    ``raw=True`` makes a plain WebSocket connection with no IM layer (no
    :class:`~imkit.core.peer.Peer`, no frames, acks, strikes or rate limit): every whole
    message, text or binary, comes out as a :class:`~imkit.core.events.RawMessageReceived`
    event and :meth:`send_raw` sends one. The limits of :class:`ConnLimits` still apply.
    """

    __slots__ = (
        "_deciding",
        "_head",
        "allowed_origins",
        "identity",
        "path",
        "remote_addr",
        "request",
    )

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
        if self.state is _CLOSED:
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
        parsed = parse_request_head(
            bytes(self._head),
            remote_addr=self.remote_addr,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
        )
        if parsed is None:
            return
        if isinstance(parsed, Refusal):
            self._refuse(parsed.status, parsed.reason, parsed.headers)
            return
        method, request = parsed
        self.request = request
        if not is_upgrade(request):
            self._deciding = True
            self._events.append(HttpRequested(method, request))
            return
        refusal = check_upgrade(
            method, request, path_ok=self._path_ok, allowed_origins=self.allowed_origins
        )
        if refusal is not None:
            self._refuse(refusal.status, refusal.reason, refusal.headers)
            return
        self._deciding = True
        self._events.append(HandshakeRequested(request))

    def _path_ok(self, path: str) -> bool:
        if isinstance(self.path, str):
            return path == self.path
        return self.path.fullmatch(path) is not None

    def _refuse(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._out.append(http_response(status, reason.encode() + b"\n", headers))
        self._finish(CLOSE_ABNORMAL, f"HTTP {status}: {reason}")

    def reject(
        self, status: int, reason: str = "", headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Refuse the upgrade with an HTTP ``status`` (401, 403, 429, 503, ...)."""
        if self.state is not _HANDSHAKE:
            raise LocalProtocolError("the handshake is already decided")
        self._refuse(status, reason or status_phrase(status), headers)

    def respond(
        self,
        status: int,
        body: bytes,
        headers: Sequence[tuple[str, str]] = (),
        *,
        content_type: str = "",
    ) -> None:
        """Answer a plain HTTP request (after ``HttpRequested``), then close."""
        if self.state is not _HANDSHAKE:
            raise LocalProtocolError("the request is already answered")
        self._out.append(http_response(status, body, headers, content_type))
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
        if self.state is not _HANDSHAKE or self.request is None or self._ws is not None:
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
        self._head = bytearray()  # a new, empty one: clear() keeps the grown buffer
        extra = [] if self.raw else [(b"imkit-ack-mode", options.ack_mode.value.encode())]
        extra.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
        self._out.append(ws.send(AcceptConnection(extra_headers=extra, subprotocol=subprotocol)))
        # From here on only the open connection is needed: keep wsproto's Connection and
        # let the handshake objects (an h11 parser and its state) go.
        assert ws.connection is not None
        self._ws = ws.connection
        if early:
            self._ws.receive_data(early)
        if self.raw:
            self._open(None, now)
            self._receive_frames(now)
            self._check_announced_size()
            self._resync()
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
        self._resync()


class ClientConn(_Conn):
    """The client end of one connection: sends the upgrade request at once.

    The ack mode comes from the server's ``imkit-ack-mode`` response header unless
    ``ack_mode`` is given (for servers that do not send it, like easy-chat's).
    ``sender`` and ``receiver`` may be kept across reconnects so that unacknowledged
    messages are resent with their original ids and pushes are not handled twice.
    """

    __slots__ = (
        "_receiver_factory",
        "_reject",
        "_reject_body",
        "_sender_factory",
        "ack_mode",
        "options",
    )

    _out_mask = 0x80  # a client masks what it sends (RFC 6455 §5.3)
    _in_mask = 0  # and gets unmasked frames

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
        if self.state is _CLOSED:
            return
        if self.state is not _HANDSHAKE:
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
        except WSRemoteProtocolError as exc:
            # What wsproto understood before the fault still counts: a refusal and its
            # status must not be lost to garbage that followed it in the same read.
            self._handshake_events(now)
            if self.state is _HANDSHAKE:
                if self._reject is not None:
                    self._rejected()
                else:
                    reason = f"bad handshake response: {exc}"
                    self._finish(CLOSE_ABNORMAL, reason, by_peer=True)
            return
        self._handshake_events(now)

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
                self._resync()
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
