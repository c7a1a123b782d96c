"""Load-generator connections (they run in the harness process).

One client library serves every peer whose protocol is plain JSON over WebSocket:
picows' client, the cheapest Python WebSocket client at hand, so the load generator
leaves as much CPU as possible to the server (whose CPU is what we measure). The
Socket.IO peer needs a Socket.IO client: python-socketio's ``AsyncClient``
(websocket transport only), sharing one aiohttp session.

A connection reports what it receives through :class:`Handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import picows

from benchmarks.suite import HB_ENGINEIO, HB_IMKIT_PING, HB_WS_PING
from benchmarks.wire import ACK, DELIVERY, ERROR, WireCodec, token_of

if TYPE_CHECKING:
    import aiohttp

_TEXT = picows.WSMsgType.TEXT
_CLOSE = picows.WSMsgType.CLOSE


class Handlers:
    """Callbacks of one connection: a delivery (token), an ack (message id), an error."""

    __slots__ = ("on_ack", "on_delivery", "on_error")

    def __init__(
        self,
        on_delivery: Callable[[str], None],
        on_ack: Callable[[str], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.on_delivery = on_delivery
        self.on_ack = on_ack
        self.on_error = on_error


def _ignore(_: str) -> None:
    return None


IDLE_HANDLERS = Handlers(_ignore, _ignore, _ignore)
"""For idle connections: whatever arrives is ignored."""


class Closable(Protocol):
    async def aclose(self) -> None: ...


class ClientConn(Closable, Protocol):
    async def send(self, msg_id: str, to: str, text: str) -> None: ...


class _PicowsListener(picows.WSListener):
    def __init__(self, codec: WireCodec, handlers: Handlers) -> None:
        super().__init__()
        self.decode = codec.decode
        self.handlers = handlers
        self.closing = False

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == _TEXT:
            kind, key, reply = self.decode(frame.get_payload_as_bytes())
            if reply is not None:
                transport.send(_TEXT, reply)
            if kind == DELIVERY:
                self.handlers.on_delivery(key)
            elif kind == ACK:
                self.handlers.on_ack(key)
            elif kind == ERROR:
                self.handlers.on_error(key)
        elif msg_type == _CLOSE:
            if not self.closing:
                self.handlers.on_error(f"server closed the connection ({frame.get_close_code()})")
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self.closing:
            self.closing = True
            self.handlers.on_error("connection lost")


class PicowsConn:
    """A picows client connection speaking a :class:`~benchmarks.wire.WireCodec`."""

    def __init__(self, transport: picows.WSTransport, listener: _PicowsListener, codec: WireCodec):
        self.transport = transport
        self.listener = listener
        self.encode = codec.encode

    @classmethod
    async def open(
        cls, codec: WireCodec, base_url: str, user: str, handlers: Handlers, *, timeout: float
    ) -> PicowsConn:
        listener = _PicowsListener(codec, handlers)
        transport, _ = await asyncio.wait_for(
            picows.ws_connect(
                lambda: listener,
                codec.url(base_url, user),
                websocket_handshake_timeout=timeout,
            ),
            timeout,
        )
        return cls(transport, listener, codec)

    async def send(self, msg_id: str, to: str, text: str) -> None:
        self.transport.send(_TEXT, self.encode(msg_id, to, text))

    def abort(self) -> None:
        self.listener.closing = True
        self.transport.disconnect(graceful=False)

    async def aclose(self) -> None:
        self.listener.closing = True
        if not self.transport.is_disconnected:
            with contextlib.suppress(Exception):
                self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.transport.wait_disconnected(), 2.0)


class SocketIOConn:
    """A python-socketio ``AsyncClient`` (websocket transport) on the socketio relay."""

    def __init__(self, client: Any, handlers: Handlers, want_ack: bool) -> None:
        self.client = client
        self.handlers = handlers
        self.want_ack = want_ack
        self.closing = False

    @classmethod
    async def open(
        cls,
        base_url: str,
        user: str,
        handlers: Handlers,
        *,
        session: aiohttp.ClientSession,
        want_ack: bool,
        timeout: float,
    ) -> SocketIOConn:
        import socketio  # type: ignore[import-untyped]

        client = socketio.AsyncClient(
            reconnection=False, handle_sigint=False, http_session=session, request_timeout=timeout
        )
        conn = cls(client, handlers, want_ack)
        client.on("chat", conn._on_chat)
        client.on("disconnect", conn._on_disconnect)
        url = base_url.replace("ws://", "http://", 1) + f"/?user={user}"
        try:
            await asyncio.wait_for(
                client.connect(url, transports=["websocket"], wait_timeout=timeout), timeout
            )
        except BaseException:
            conn.closing = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)
            raise
        return conn

    def _on_chat(self, data: dict[str, Any]) -> None:
        self.handlers.on_delivery(token_of(data["text"]))

    def _on_ack(self, msg_id: str) -> None:
        self.handlers.on_ack(msg_id)

    def _on_disconnect(self, *args: Any) -> None:
        if not self.closing:
            self.closing = True
            self.handlers.on_error(f"socket.io disconnected {args}")

    async def send(self, msg_id: str, to: str, text: str) -> None:
        payload = {"id": msg_id, "to": to, "text": text}
        if self.want_ack:
            await self.client.emit("chat", payload, callback=self._on_ack)
        else:
            await self.client.emit("chat", payload)

    async def aclose(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 2.0)


def new_socketio_session() -> aiohttp.ClientSession:
    """One aiohttp session for all Socket.IO clients: no connection limit, no cookies."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    )


# ------------------------------------------------------------------------ heartbeats

_PONG = picows.WSMsgType.PONG
_IMKIT_PING = 1  # easy-chat frameType of a Ping
_ENGINEIO_PING = b"2"
_ENGINEIO_PONG = b"3"
_SOCKETIO_CONNECT = b"40"


class HeartbeatBook:
    """What the heartbeat connections of one case saw, counted since :meth:`reset`.

    ``answered`` heartbeats (with their round trips in ``rtts``, client-sent protocols
    only), ``late`` ones (a heartbeat still unanswered when the connection's next one was
    due), ``server_pings`` (Engine.IO: pings the server sent, each answered at once) and
    ``dropped`` connections (closed by the server or lost, not by us).
    """

    def __init__(self) -> None:
        self.rtts: list[float] = []
        self.sent = 0
        self.answered = 0
        self.late = 0
        self.server_pings = 0
        self.dropped = 0
        self.drop_reasons: list[str] = []
        self.errors: list[str] = []

    def reset(self) -> None:
        """Start counting heartbeats afresh (connections dropped stay counted)."""
        self.rtts = []
        self.sent = self.answered = self.late = self.server_pings = 0

    def snapshot(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "late": self.late,
            "server_pings": self.server_pings,
            "dropped": self.dropped,
        }


class _HeartbeatListener(picows.WSListener):
    """One heartbeat connection: answers the server's pings, times its own."""

    def __init__(self, protocol: str, book: HeartbeatBook) -> None:
        super().__init__()
        self.protocol = protocol
        self.book = book
        self.closing = False
        self.sent_at: float | None = None
        self.expect: bytes = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        if self.protocol != HB_ENGINEIO and not self.ready.done():
            self.ready.set_result(None)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == _PONG:
            if self.protocol == HB_WS_PING:
                self._answered(frame.get_payload_as_bytes())
        elif msg_type == _TEXT:
            payload = frame.get_payload_as_bytes()
            if self.protocol == HB_IMKIT_PING:
                self._imkit_frame(payload)
            elif self.protocol == HB_ENGINEIO:
                self._engineio_packet(transport, payload)
        elif msg_type == _CLOSE:
            if not self.closing:
                self._lost(f"server closed ({frame.get_close_code()})")
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def _imkit_frame(self, payload: bytes) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:
            frame = None
        if isinstance(frame, dict) and frame.get("frameType") == _IMKIT_PING:
            self._answered(str(frame.get("id", "")).encode())
        elif len(self.book.errors) < 5:  # nothing else is sent to a connection that pings
            self.book.errors.append(f"unexpected frame {payload[:80]!r}")

    def _engineio_packet(self, transport: picows.WSTransport, payload: bytes) -> None:
        if payload == _ENGINEIO_PING:
            transport.send(_TEXT, _ENGINEIO_PONG)
            self.book.server_pings += 1
        elif payload.startswith(b"0"):  # Engine.IO open: join the default namespace
            transport.send(_TEXT, _SOCKETIO_CONNECT)
        elif payload.startswith(_SOCKETIO_CONNECT):
            if not self.ready.done():
                self.ready.set_result(None)
        elif payload.startswith(b"44") and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"socket.io refused: {payload[:80]!r}"))

    def _answered(self, key: bytes) -> None:
        if self.sent_at is None or key != self.expect:
            return  # not ours (or answered after it was counted late)
        self.book.rtts.append(time.perf_counter() - self.sent_at)
        self.book.answered += 1
        self.sent_at = None

    def _lost(self, reason: str) -> None:
        self.closing = True
        self.book.dropped += 1
        if len(self.book.drop_reasons) < 5:
            self.book.drop_reasons.append(reason)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self.closing:
            self._lost("connection lost")


class HeartbeatConn:
    """A picows connection that only keeps itself alive (see ``benchmarks.suite.HB_*``).

    - ``ws-ping``: :meth:`beat` sends a WebSocket Ping (payload: a counter); the server's
      library answers Pong with the same payload;
    - ``imkit-ping``: :meth:`beat` sends an easy-chat Ping frame ``{"frameType": 1, "id":
      <counter>, ...}``; the server answers a Ping frame with the same id;
    - ``engineio``: the server pings (``2``), the connection answers ``3`` at once;
      :meth:`beat` does nothing. Opening completes after Socket.IO's namespace connect.
    """

    def __init__(self, transport: picows.WSTransport, listener: _HeartbeatListener) -> None:
        self.transport = transport
        self.listener = listener
        self.count = 0

    @staticmethod
    def url(protocol: str, base_url: str, user: str, codec: WireCodec | None) -> str:
        """The URL a heartbeat client of ``user`` connects to."""
        if protocol == HB_ENGINEIO:
            return f"{base_url}/socket.io/?EIO=4&transport=websocket&user={user}"
        assert codec is not None
        return codec.url(base_url, user)

    @classmethod
    async def open(
        cls, protocol: str, url: str, book: HeartbeatBook, *, timeout: float
    ) -> HeartbeatConn:
        listener = _HeartbeatListener(protocol, book)
        transport, _ = await asyncio.wait_for(
            picows.ws_connect(lambda: listener, url, websocket_handshake_timeout=timeout),
            timeout,
        )
        try:
            await asyncio.wait_for(asyncio.shield(listener.ready), timeout)
        except BaseException:
            listener.closing = True
            transport.disconnect(graceful=False)
            raise
        return cls(transport, listener)

    def beat(self, now: float) -> None:
        """Send one heartbeat (client-initiated protocols); note a late previous one."""
        listener = self.listener
        protocol = listener.protocol
        if protocol == HB_ENGINEIO or listener.closing:
            return
        book = listener.book
        if listener.sent_at is not None:
            book.late += 1
        self.count += 1
        key = str(self.count).encode()
        listener.expect = key
        listener.sent_at = now
        book.sent += 1
        if protocol == HB_WS_PING:
            self.transport.send_ping(key)
        else:
            self.transport.send(
                _TEXT,
                b'{"frameType":1,"id":"' + key + b'","ackSeq":0,"method":"","formId":"",'
                b'"transpondUid":"","data":null}',
            )

    @property
    def waiting(self) -> bool:
        """A heartbeat of this connection is still unanswered."""
        return self.listener.sent_at is not None and not self.listener.closing

    @property
    def open_(self) -> bool:
        return not self.listener.closing

    async def aclose(self) -> None:
        self.listener.closing = True
        if not self.transport.is_disconnected:
            with contextlib.suppress(Exception):
                self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.transport.wait_disconnected(), 2.0)
