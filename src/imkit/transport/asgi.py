"""Mount an imkit :class:`~imkit.core.server.App` in any ASGI 3 server or framework.

::

    import imkit
    from imkit.transport.asgi import ASGIApp

    app = imkit.App(auth=imkit.TokenAuth(secret))
    asgi = ASGIApp(app)   # uvicorn mymodule:asgi, or Mount("/chat", app=asgi) in Starlette

An ASGI server hands over whole WebSocket messages, so the adapter drives the core's
:class:`~imkit.core.peer.Peer` directly (no wsproto) and leaves framing, WebSocket
ping/pong and the closing handshake to the ASGI server. Everything above the framing is
the anyio server's: an :class:`ASGIApp` holds an :class:`imkit.transport.server.Server` and
registers its :class:`ASGISession` objects in ``server.registry``, so the login policy,
fan-out (``send_to_users``), forwards from other nodes, admission (503 while stopping,
429 per address), the handler limit and the hooks behave as under :func:`imkit.serve`.

Per connection, three tasks in one task group: the **reader** feeds messages to the peer
and hands the ones to handle to the **worker** through a bounded queue (the reader stops
reading when the worker falls behind, and the ASGI server stops reading the socket); the
worker runs this connection's handlers in order under the server-wide limit; the
**pump** sends what the peer produced and sleeps until the peer's next deadline or until
woken. Nothing polls.

What ASGI imposes (see ``docs/asgi.md``):

* A refused handshake is an HTTP response (401, 403, 404, 429, 503...) when the server
  offers the ``websocket.http.response`` extension (uvicorn does). Without it the only
  refusal ASGI allows is ``websocket.close`` before the accept, which the server turns into
  HTTP 403 whatever the cause: the adapter sends code 1008 with the intended status in the
  reason (``"HTTP 401: missing token"``).
* Message size, keepalive pings and the handshake timeout are the ASGI server's settings
  (uvicorn's ``--ws-max-size``, ``--ws-ping-interval``); the adapter still closes with 1009
  a message over ``App.limits.max_message_size`` and with 1003 a binary message.
* uvicorn closes open WebSockets with 1012 on its own shutdown, before it sends
  ``lifespan.shutdown``; call :meth:`ASGIApp.shutdown` first for a 1001.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

import anyio
import anyio.abc
import anyio.lowlevel

from imkit.core.conn import (
    ACK_MODE_HEADER,
    CLOSE_GOING_AWAY,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    origin_allowed,
)
from imkit.core.events import (
    Closed,
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    MessageExpired,
    MessageReceived,
)
from imkit.core.frames import Frame, FrameType
from imkit.core.interfaces import HandshakeRequest, Identity
from imkit.core.peer import CLOSE_POLICY, Peer
from imkit.core.server import App, HttpResponse
from imkit.transport._lifecycle import (
    announce,
    decide_handshake,
    delivery_hooks,
    dispatch,
    page_response,
    path_matches,
    retire,
)
from imkit.transport.clock import Clock
from imkit.transport.server import (
    DEFAULT_MAX_QUEUED_MESSAGES,
    DEFAULT_MAX_WRITE_BUFFER,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Server,
)

if TYPE_CHECKING:
    from imkit.transport.session import ServerSession

__all__ = ("CLOSE_REFUSED", "ASGIApp", "ASGISession")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CLOSE_REFUSED = CLOSE_POLICY
"""Close code of a refused handshake on a server without ``websocket.http.response``."""

_CLOSE_ABNORMAL = 1006
_CLOSE_NO_STATUS = 1005
_HTTP_RESPONSE_EXTENSION = "websocket.http.response"
_REFUSAL_LINGER = 1.0  # seconds to wait for the server's disconnect after a refusal
_MAX_REASON_BYTES = 123  # RFC 6455 §5.5: a close frame's payload is at most 125 bytes


# ---------------------------------------------------------------------- the request
def route_path(scope: Scope) -> str:
    """The path an app mounted at ``scope["root_path"]`` should route on.

    ASGI servers and frameworks disagree on whether ``path`` includes ``root_path``
    (uvicorn and Starlette's ``Mount`` include it); a leading ``root_path`` is removed.
    """
    path = str(scope.get("path") or "/")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def handshake_request(scope: Scope) -> HandshakeRequest:
    """The :class:`~imkit.core.interfaces.HandshakeRequest` of an ASGI ``http`` or
    ``websocket`` scope, as :class:`~imkit.core.conn.ServerConn` builds it from bytes."""
    headers = [
        (bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
        for name, value in scope.get("headers") or ()
    ]
    query = bytes(scope.get("query_string") or b"").decode("latin-1")
    client = scope.get("client")
    return HandshakeRequest(
        path=route_path(scope),
        query=dict(reversed(parse_qsl(query, keep_blank_values=True))),
        headers=headers,
        remote_addr=str(client[0]) if client else "",
        subprotocols=[str(p) for p in scope.get("subprotocols") or ()],
    )


def _close_reason(reason: str) -> str:
    """``reason`` cut to what fits in a close frame, on a character boundary."""
    data = reason.encode()[:_MAX_REASON_BYTES]
    return data.decode("utf-8", "ignore")


# ---------------------------------------------------------------------- one connection
class ASGISession:
    """One accepted WebSocket of an ASGI server, as handlers and hooks see it.

    It offers what :class:`~imkit.transport.session.ServerSession` offers (a core
    ``Session`` plus ``send_now``, ``deliver``, ``wait_for_room``...), so the server's
    fan-out and hooks treat both alike. :class:`ASGIApp` creates it after the handshake.
    """

    def __init__(
        self, server: Server, request: HandshakeRequest, identity: Identity, send: Send
    ) -> None:
        app = server.app
        self.server = server
        self.app = app
        self.clock = server.clock
        self.request = request
        self.remote_addr = request.remote_addr
        self.epoch = f"{server.node_id}:{secrets.token_hex(8)}"
        self._identity = identity
        now = self.clock.now()
        receiver = server.registry.receiver(identity, app.ack_mode, app.options.timers, now)
        self.peer = Peer(
            app.options,
            server=True,
            now=now,
            user_id=identity.user_id,
            receiver=receiver,
            accepts_method=app.router.__contains__,
        )
        self._expires_at: float | None = None
        if identity.expires_at is not None:
            self._expires_at = now + (identity.expires_at - time.time())
        self._send = send
        self._out: deque[str] = deque()
        self._out_size = 0
        self._woken = False
        self._sleep_scope: anyio.CancelScope | None = None
        self._send_scope: anyio.CancelScope | None = None
        self._closing: tuple[int, str] | None = None
        self._aborted = False
        self.closed_with: Closed | None = None
        """How the connection ended (``None`` while it is open or closing)."""
        self._held: list[Frame] | None = []
        self._queue_in, self._queue_out = anyio.create_memory_object_stream[tuple[str, Any]](
            math.inf
        )
        self._slots = anyio.Semaphore(server.max_queued_messages)
        self._room = anyio.Event()
        self._finished = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------ Session API
    @property
    def identity(self) -> Identity:
        """Who is connected."""
        return self._identity

    @property
    def user_id(self) -> str:
        """The authenticated user id."""
        return self._identity.user_id

    @property
    def device_id(self) -> str:
        """The device id (may be empty)."""
        return self._identity.device_id

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on this connection."""
        return self.closed_with is None and self._closing is None

    @property
    def held(self) -> bool:
        """Whether fan-out pushes are being held (until :meth:`release`)."""
        return self._held is not None

    async def push(
        self,
        method: str,
        data: Any,
        *,
        message_id: str | None = None,
        form_id: str = "",
        wait: bool = True,
    ) -> Frame:
        """Send a message with the downstream ack mode, even while fan-out is held.

        With ``wait`` (the default) it first waits until the ack window has room.
        """
        if wait:
            await self.wait_for_room()
        return self.send_now(method, data, message_id=message_id, form_id=form_id)

    async def wait_for_room(self) -> None:
        """Wait until the ack window has room (or the connection is closed)."""
        while self.is_open:
            sender = self.peer.sender
            if sender.backlog == 0 and sender.in_flight < sender.timers.window:
                return
            await self._room.wait()

    def send_now(
        self,
        method: str,
        data: Any,
        *,
        message_id: str | None = None,
        form_id: str = "",
        reply_to: str = "",
    ) -> Frame:
        """Send without waiting (fan-out, replies); over the backlog limit the client is
        cut off with 1008. On a closed connection the message fails with ``"closed"``."""
        if not self.is_open:
            frame = Frame(FrameType.DATA, id=message_id or "", method=method, data=data)
            try:
                self._queue_in.send_nowait(("event", DeliveryFailed(frame, "closed")))
            except anyio.ClosedResourceError:  # cleaned up: no hook will run any more
                self.server.logger.info("push %r to a closed session of %r", method, self.user_id)
            return frame
        frame = self.peer.send(
            method,
            data,
            self.clock.now(),
            message_id=message_id,
            form_id=form_id,
            reply_to=reply_to,
        )
        self._collect()
        return frame

    def deliver(self, method: str, data: Any, *, form_id: str = "") -> None:
        """Fan-out delivery: queued while the session is held, else sent at once."""
        if self._held is not None:
            self._held.append(
                Frame(
                    FrameType.DATA,
                    id=self.peer.new_id(),
                    method=method,
                    form_id=form_id,
                    data=data,
                )
            )
            return
        self.send_now(method, data, form_id=form_id)

    def hold(self) -> None:
        """Queue fan-out pushes until :meth:`release`."""
        if self._held is None:
            self._held = []

    async def release(self, keep: Callable[[Frame], bool] | None = None) -> None:
        """Send the held pushes that ``keep`` accepts (all by default), stop holding."""
        held, self._held = self._held, None
        for frame in held or ():
            if keep is None or keep(frame):
                self.send_now(frame.method, frame.data, message_id=frame.id, form_id=frame.form_id)

    def send_error(self, code: str, message: str, frame_id: str = "", **extra: Any) -> None:
        """Send an ``Err`` frame (ignored once the connection is closing)."""
        if self.is_open:
            self.peer.send_error(code, message, frame_id, **extra)
            self._collect()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this connection with ``code``."""
        self.close_nowait(code, reason)

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` once what is already queued is sent; awaits nothing."""
        if not self.is_open:
            return
        self._closing = (code, _close_reason(reason))
        self._signal_room()
        self._wake()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and cleaned up (hooks included)."""
        await self._finished.wait()

    # ------------------------------------------------------------------ driving
    async def run(self, receive: Receive) -> None:
        """Accept, serve the connection until it closes, and clean up whatever happens."""
        try:
            mode = self.app.ack_mode.value.encode()
            accept = {"type": "websocket.accept", "headers": [(ACK_MODE_HEADER.encode(), mode)]}
            if await self._write(accept):
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._pump)
                    tg.start_soon(self._worker)
                    tg.start_soon(announce, self.server, self)
                    await self._read(receive)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()

    def _wake(self) -> None:
        self._woken = True
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def _signal_room(self) -> None:
        self._room.set()
        self._room = anyio.Event()

    def _collect(self) -> list[Frame]:
        """Move the peer's output to the send queue; return the messages to handle."""
        peer = self.peer
        texts = peer.outgoing()
        if texts and self.closed_with is None:
            self._out.extend(texts)
            self._out_size += sum(map(len, texts))
            if self._out_size > self.server.max_write_buffer and not self._aborted:
                self._abort("send buffer full: the client is not reading")
            self._wake()
        messages: list[Frame] = []
        room = False
        for event in peer.events():
            if isinstance(event, MessageReceived):
                messages.append(event.frame)
            elif isinstance(event, Delivered):
                room = True
                if self.app.delivered_hooks:
                    self._queue_in.send_nowait(("event", event))
            elif isinstance(event, (DeliveryFailed, MessageExpired)):
                room = True
                self._queue_in.send_nowait(("event", event))
            elif isinstance(event, ErrorReceived):
                self.server.logger.debug("client %s sent an Err frame", self.user_id)
        if room:
            self._signal_room()
        request = peer.close_request
        if request is not None:
            self.close_nowait(*request)
        return messages

    def _abort(self, reason: str) -> None:
        """Cut a client that does not read: drop its queue and close with 1008."""
        self._aborted = True
        self._out.clear()
        self._out_size = 0
        self.server.logger.info("closing a connection of %r: %s", self.user_id, reason)
        self._closing = None
        self.close_nowait(CLOSE_POLICY, reason)
        if self._send_scope is not None:
            self._send_scope.cancel()

    def _finish(self, code: int, reason: str, *, by_peer: bool) -> None:
        """The connection is over: fail what is in flight and stop the tasks."""
        if self.closed_with is not None:
            return
        self.closed_with = Closed(code, reason, by_peer)
        self._out.clear()
        self._out_size = 0
        if self._send_scope is not None:  # a write blocked on a gone client never returns
            self._send_scope.cancel()
        self.peer.connection_lost()
        self._collect()
        self._signal_room()
        self._wake()

    async def _write(self, message: Message) -> bool:
        """Send one ASGI message; ``False`` (and the connection is over) if it failed."""
        with anyio.CancelScope() as scope:
            self._send_scope = scope
            try:
                await self._send(message)
            except OSError:  # ASGI: send() on a closed connection raises an OSError
                self._finish(_CLOSE_ABNORMAL, "connection lost", by_peer=True)
        self._send_scope = None
        return self.closed_with is None and not scope.cancelled_caught

    async def _read(self, receive: Receive) -> None:
        limit = self.app.limits.max_message_size
        while self.closed_with is None:
            try:
                message = await receive()
            except OSError:
                message = {"type": "websocket.disconnect", "code": _CLOSE_ABNORMAL}
            kind = message.get("type")
            if kind == "websocket.disconnect":
                code = int(message.get("code") or _CLOSE_NO_STATUS)
                self._finish(code, str(message.get("reason") or ""), by_peer=True)
                return
            if kind != "websocket.receive" or self._closing is not None:
                continue  # after our close, messages are ignored (as ServerConn does)
            text = message.get("text")
            if text is None:
                self.close_nowait(CLOSE_UNSUPPORTED_DATA, "binary messages are not supported")
                continue
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                self.close_nowait(CLOSE_MESSAGE_TOO_BIG, "message too big")
                continue
            self.peer.receive_text(text, self.clock.now())
            for frame in self._collect():
                await self._slots.acquire()
                self._queue_in.send_nowait(("message", frame))

    def _deadline(self) -> float:
        deadline = self.peer.next_deadline()
        expires = self._expires_at
        if expires is not None:
            deadline = expires if deadline is None else min(deadline, expires)
        return math.inf if deadline is None else deadline

    async def _pump(self) -> None:
        clock = self.clock
        while True:
            if self._out:
                text = self._out.popleft()
                self._out_size -= len(text)
                await self._write({"type": "websocket.send", "text": text})
                continue
            if self.closed_with is not None:
                break
            if self._closing is not None:
                code, reason = self._closing
                with anyio.move_on_after(self.app.limits.close_timeout):
                    await self._write({"type": "websocket.close", "code": code, "reason": reason})
                self._finish(code, reason, by_peer=False)
                break
            if self._woken:
                self._woken = False
                continue
            deadline = self._deadline()
            with anyio.CancelScope() as scope:
                self._sleep_scope = scope
                await clock.sleep_until(deadline)
            self._sleep_scope = None
            now = clock.now()
            if self._expires_at is not None and now >= self._expires_at:
                self._expires_at = None
                self.close_nowait(CLOSE_POLICY, "credential expired")
            elif now >= deadline:
                self.peer.handle_timeout(now)
                for frame in self._collect():  # timers only resend; dispatch is not expected
                    self._queue_in.send_nowait(("message-unslotted", frame))
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _worker(self) -> None:
        async for kind, item in self._queue_out:
            if kind == "event":
                await delivery_hooks(self.server, self, item)
                continue
            try:
                await dispatch(self.server, self, item)
            finally:
                if kind == "message":
                    self._slots.release()

    async def _cleanup(self) -> None:
        if self.closed_with is None:
            self._finish(_CLOSE_ABNORMAL, "connection lost", by_peer=True)
        self._queue_in.close()
        pending: list[Any] = []
        while True:
            try:
                kind, item = self._queue_out.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if kind == "event":
                pending.append(item)
        self._queue_out.close()
        try:
            await retire(self.server, self, pending)
        finally:
            self._finished.set()


# ---------------------------------------------------------------------- the ASGI app
class ASGIApp:
    """An ASGI 3 application serving ``app``: WebSocket, HTTP pages and lifespan.

    ``clock`` and the other options go to the :class:`~imkit.transport.server.Server` it
    holds as :attr:`server` (the ``ServerAPI`` handlers see, with the registry). Startup
    runs on ``lifespan.startup``, or on the first request when the server (or a framework's
    ``Mount``) sends no lifespan events; shutdown runs on ``lifespan.shutdown`` or when
    :meth:`shutdown` is called.
    """

    def __init__(
        self,
        app: App,
        *,
        clock: Clock | None = None,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.server = Server(
            app,
            clock=clock,
            max_queued_messages=max_queued_messages,
            max_write_buffer=max_write_buffer,
            shutdown_timeout=shutdown_timeout,
            logger=logger,
        )
        self.logger = self.server.logger
        self._sessions: set[ASGISession] = set()
        self._ready: anyio.Event | None = None
        self._startup_error: BaseException | None = None
        self._shut_down = False

    @property
    def sessions(self) -> list[ASGISession]:
        """The open WebSocket sessions."""
        return list(self._sessions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        """Freeze the routes, start discovery and run the startup hooks, once; concurrent
        callers wait for the first. Raises if the startup failed."""
        if self._ready is None:
            self._ready = anyio.Event()
            try:
                await self.server.startup()
            except BaseException as exc:
                self._startup_error = exc
                raise
            finally:
                self._ready.set()
            return
        await self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError("the imkit server failed to start") from self._startup_error

    async def shutdown(self) -> None:
        """Refuse new handshakes (503), close every session with 1001 and wait for them
        (up to ``shutdown_timeout``), then run the shutdown hooks and stop discovery."""
        server = self.server
        server.stopping = True
        sessions = list(self._sessions)
        for session in sessions:
            session.close_nowait(CLOSE_GOING_AWAY, "server shutting down")
        with anyio.move_on_after(server.shutdown_timeout):
            for session in sessions:
                await session.wait_closed()
        if self._ready is not None and not self._shut_down:
            self._shut_down = True
            await server.cleanup()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    self.logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    self.logger.exception("shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _started(self) -> bool:
        try:
            await self.startup()
        except Exception:
            self.logger.exception("the imkit server could not start")
            return False
        return True

    # ------------------------------------------------------------------ HTTP
    async def _http(self, scope: Scope, send: Send) -> None:
        method = str(scope.get("method") or "GET").upper()
        request = handshake_request(scope)
        if request.path in self.app.pages and not await self._started():
            response = HttpResponse(503, b"server not started\n")
        else:
            response = await page_response(self.server, request, method)
        await self._respond(send, response, head=method == "HEAD")

    @staticmethod
    async def _respond(send: Send, response: HttpResponse, *, head: bool = False) -> None:
        headers = [
            (name.lower().encode("latin-1"), v.encode("latin-1")) for name, v in response.headers
        ]
        names = {name for name, _ in headers}
        if b"content-type" not in names:
            headers.append((b"content-type", response.content_type.encode("latin-1")))
        if b"content-length" not in names:
            headers.append((b"content-length", str(len(response.body)).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else response.body})

    # ------------------------------------------------------------------ WebSocket
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message.get("type") != "websocket.connect":
            return  # the client left before the handshake
        request = handshake_request(scope)
        app = self.app
        decision: Identity | tuple[int, str]
        if len(request.headers) > app.limits.max_headers:
            decision = 431, "too many request headers"
        elif not path_matches(app.path, request.path):
            decision = 404, "no WebSocket endpoint at this path"
        elif not origin_allowed(
            request.header("origin"), request.header("host"), app.allowed_origins
        ):
            decision = 403, "origin not allowed"
        elif not await self._started():
            decision = 503, "server not started"
        else:
            decision = await decide_handshake(self.server, request)
        if not isinstance(decision, Identity):
            await self._refuse(scope, receive, send, *decision)
            return
        session = ASGISession(self.server, request, decision, send)
        self._register(session)
        self._sessions.add(session)
        try:
            await session.run(receive)
        finally:
            self._sessions.discard(session)

    def _register(self, session: ASGISession) -> None:
        """Add ``session`` to the server's registry; close the ones it replaces."""
        server = self.server
        # The registry is typed for the anyio sessions; it only calls what both offer.
        entry = cast("ServerSession", session)
        for old in server.registry.add(session.identity, session.epoch, entry):
            old.close_nowait(4000, "session replaced: the user logged in again")
        server.ip_opened(session.remote_addr)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, reason: str
    ) -> None:
        """Refuse the handshake: an HTTP response if the server can send one, else 1008."""
        extensions = scope.get("extensions") or {}
        try:
            if _HTTP_RESPONSE_EXTENSION in extensions:
                await send(
                    {
                        "type": "websocket.http.response.start",
                        "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await send(
                    {"type": "websocket.http.response.body", "body": reason.encode() + b"\n"}
                )
            else:
                await send(
                    {
                        "type": "websocket.close",
                        "code": CLOSE_REFUSED,
                        "reason": _close_reason(f"HTTP {status}: {reason}"),
                    }
                )
        except OSError:
            return  # the client is gone already
        # Return once the server reports the connection closed: uvicorn's default protocol
        # logs "returned without completing handshake" for an app that returns first.
        with anyio.move_on_after(_REFUSAL_LINGER):
            while (await receive()).get("type") != "websocket.disconnect":
                pass
            await anyio.lowlevel.checkpoint()
