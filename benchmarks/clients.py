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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import picows

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


class ClientConn(Protocol):
    async def send(self, msg_id: str, to: str, text: str) -> None: ...

    async def aclose(self) -> None: ...


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
