"""Shared pieces of the transport tests: an app with test routes, a raw WebSocket client
written on wsproto (not on imkit), and a loopback server runner."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

import imkit
from imkit.transport.server import Server

SECRET = "test-secret-0123456789abcdef"


class Collected(list[Any]):
    """A list that tests can wait on: ``await items.wait_until(lambda xs: len(xs) >= 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = anyio.Event()

    def add(self, item: Any) -> None:
        """Append ``item`` and wake the waiters."""
        self.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[list[Any]], bool]) -> None:
        """Wait until ``predicate(self)`` holds."""
        while not predicate(self):
            await self._changed.wait()


class RevocableAuth:
    """Admits the user of ``?userId=`` (or ``?user=``) unless in ``revoked``; raises while
    ``broken`` (an auth backend outage); counts its calls."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.broken = False
        self.calls = 0

    async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
        self.calls += 1
        if self.broken:
            raise RuntimeError("the auth backend is down")
        user = request.query.get("userId") or request.query.get("user") or "anon"
        if user in self.revoked:
            raise imkit.AuthenticationFailed("revoked")
        return imkit.Identity(user)


def logged_app() -> tuple[imkit.App, Collected]:
    """An app on InsecureDevAuth whose ``fast`` route logs ``("fast", data)`` and replies
    with its data, and whose ``on_disconnect`` logs ``("disconnect", user_id)``; tests
    add the routes they study, logging to the same list."""
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))
    log = Collected()

    @app.route("fast")
    async def fast(ctx: imkit.Context) -> None:
        log.add(("fast", ctx.data))
        await ctx.reply(ctx.data)

    @app.on_disconnect
    async def gone(session: imkit.Session, server: imkit.ServerAPI) -> None:
        log.add(("disconnect", session.user_id))

    return app, log


class Recorder:
    """What the routes of :func:`make_app` saw."""

    def __init__(self) -> None:
        self.dispatched: Counter[tuple[str, str]] = Counter()
        self.order: list[tuple[str, Any]] = []


def make_app(**options: Any) -> tuple[imkit.App, Recorder]:
    """An app on InsecureDevAuth (unless ``auth`` is given) with the test routes:

    * ``echo``: replies with its data;
    * ``relay``: pushes ``data`` to ``data["to"]`` (method ``chat``);
    * ``count``: records (user, message id) and replies ``"ok"``;
    * ``boom``: raises ``RuntimeError``; ``refuse``: raises ``HandlerError("bad_request")``.
    """
    options.setdefault("auth", imkit.InsecureDevAuth(quiet=True))
    app = imkit.App(**options)
    seen = Recorder()

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data)

    @app.route("relay")
    async def relay(ctx: imkit.Context) -> None:
        seen.order.append((ctx.user_id, ctx.data))
        await ctx.server.send_to_users([ctx.data["to"]], "chat", ctx.data, form_id=ctx.user_id)

    @app.route("count")
    async def count(ctx: imkit.Context) -> None:
        seen.dispatched[ctx.user_id, ctx.frame.id] += 1
        seen.order.append((ctx.user_id, ctx.data))

    @app.route("boom")
    async def boom(ctx: imkit.Context) -> None:
        raise RuntimeError("the handler broke")

    @app.route("refuse")
    async def refuse(ctx: imkit.Context) -> None:
        raise imkit.HandlerError("bad_request", "not like that", hint="send a number")

    return app, seen


@asynccontextmanager
async def serve_tcp(app: imkit.App, **options: Any) -> AsyncIterator[Server]:
    """Run ``app`` on 127.0.0.1, port 0; shut it down gracefully on exit."""
    server = Server(app, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", 0)
        try:
            yield server
        finally:
            server.shutdown()


def ws_url(server: Server, query: str = "userId=alice", path: str = "/ws") -> str:
    """The ws:// URL of a loopback server."""
    return f"ws://127.0.0.1:{server.port}{path}" + (f"?{query}" if query else "")


class RawWS:
    """A WebSocket client on wsproto over any anyio byte stream, for wire-level checks.

    Unlike imkit's client it does only what the test asks: it never acks a push and never
    answers a ping unless told to.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.status: int | None = None
        self.body = b""
        self.closed: CloseConnection | None = None
        self.pings = 0
        self._texts: list[str] = []
        self._parts: list[str] = []
        self.answer_pings = True

    async def handshake(
        self, target: str = "/ws?userId=alice", headers: list[tuple[str, str]] | None = None
    ) -> int:
        """Send the upgrade request; return the HTTP status of the answer (101 if open)."""
        extra = [(k.encode(), v.encode()) for k, v in headers or []]
        await self.stream.send(
            self.ws.send(Request(host="imkit.test", target=target, extra_headers=extra))
        )
        done = False
        while not done:
            data = await self._read()
            if data is None:
                raise EOFError("connection closed during the handshake")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.status, done = 101, True
                elif isinstance(event, RejectConnection):
                    self.status, done = event.status_code, not event.has_body
                elif isinstance(event, RejectData):
                    self.body += event.data
                    done = event.body_finished
                else:  # frames right behind the 101, in the same read
                    await self._handle(event)
        assert self.status is not None
        return self.status

    async def _handle(self, event: object) -> None:
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            if event.message_finished:
                self._texts.append("".join(self._parts))
                self._parts.clear()
        elif isinstance(event, Ping):
            self.pings += 1
            if self.answer_pings and self.ws.state is ConnectionState.OPEN:
                await self.stream.send(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.closed = event
            if self.ws.state is not ConnectionState.REMOTE_CLOSING:
                return  # the answer to our own close frame
            try:
                await self.stream.send(self.ws.send(event.response()))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the server may close its socket right after its close frame

    async def _read(self) -> bytes | None:
        try:
            return await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None
        except OSError:
            return None

    async def send_text(self, text: str) -> None:
        """Send one text message."""
        await self.stream.send(self.ws.send(TextMessage(data=text)))

    async def send_json(self, obj: Any) -> None:
        """Send one JSON object as a text message."""
        await self.send_text(json.dumps(obj))

    async def recv_text(self) -> str | None:
        """The next text message, or ``None`` once the server closed (see ``closed``)."""
        while not self._texts:
            if self.closed is not None:
                return None
            data = await self._read()
            if data is None:
                self.ws.receive_data(None)
                if self.closed is None:
                    self.closed = CloseConnection(code=1006, reason="connection lost")
                return None
            self.ws.receive_data(data)
            for event in self.ws.events():
                await self._handle(event)
        return self._texts.pop(0)

    async def recv_json(self) -> dict[str, Any] | None:
        """The next message as JSON, or ``None`` once closed."""
        text = await self.recv_text()
        return None if text is None else json.loads(text)

    async def wait_closed(self) -> CloseConnection:
        """Read (and drop messages) until the server closes; return its close frame."""
        while await self.recv_text() is not None:
            pass
        assert self.closed is not None
        return self.closed

    async def close(self, code: int = 1000) -> None:
        """Start the closing handshake and wait for the answer."""
        await self.stream.send(self.ws.send(CloseConnection(code=code)))
        await self.wait_closed()
        await self.stream.aclose()


async def http_status(port: int, request: bytes) -> tuple[int, bytes]:
    """Send a raw HTTP request to 127.0.0.1:port; return the status and the whole answer."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        answer = b""
        while True:
            try:
                answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                break
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def upgrade_request(
    target: str = "/ws?userId=alice", host: str = "127.0.0.1", extra: str = ""
) -> bytes:
    """A valid WebSocket upgrade request, as bytes."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()
