"""One client connection on the server: a core :class:`~imkit.core.conn.ServerConn` driven
over an anyio byte stream.

Three tasks per connection, all in one task group so that no failure goes unseen:

* the **reader** reads bytes, feeds the core, and hands messages to the worker through a
  bounded queue: when the worker falls behind, the reader stops reading and TCP pushes
  back on the client;
* the **worker** runs the route handlers of this connection in order (under the
  server-wide handler limit) and the delivery hooks;
* the **pump** writes what the core produced and sleeps until the core's next deadline
  or until woken. Writes never block a pusher: bytes go to a buffer that the pump drains,
  and a client whose buffer passes ``max_write_buffer`` is cut off (close 1008).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from imkit.core.conn import ServerConn
from imkit.core.peer import CLOSE_POLICY
from imkit.core.events import (
    Closed,
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    HandshakeRequested,
    HttpRequested,
    MessageExpired,
    MessageReceived,
    RawMessageReceived,
)
from imkit.core.frames import ErrorCode, Frame, FrameType
from imkit.core.interfaces import Binding, Forward, HandshakeRequest, Identity
from imkit.core.server import HttpResponse, LoginPolicy
from imkit.exceptions import AuthenticationFailed, DiscoverError, HandlerError

if TYPE_CHECKING:
    from imkit.transport.server import Server

__all__ = ("ServerSession",)

_READ_SIZE = 65536
_STREAM_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
    OSError,
)


class _Context:
    """The :class:`~imkit.core.server.Context` of one message."""

    __slots__ = ("_frame", "_session")

    def __init__(self, session: ServerSession, frame: Frame) -> None:
        self._session = session
        self._frame = frame

    @property
    def frame(self) -> Frame:
        """The message, ``form_id`` set to the authenticated user."""
        return self._frame

    @property
    def data(self) -> Any:
        """The message's payload."""
        return self._frame.data

    @property
    def method(self) -> str:
        """The message's method."""
        return self._frame.method

    @property
    def session(self) -> ServerSession:
        """The connection the message came on."""
        return self._session

    @property
    def user_id(self) -> str:
        """The authenticated sender."""
        return self._session.user_id

    @property
    def server(self) -> Server:
        """The running server."""
        return self._session.server

    async def reply(self, data: Any) -> Frame:
        """Answer with a ``Data`` frame whose ``replyTo`` is this message's id."""
        return self._session.send_now(self._frame.method, data, reply_to=self._frame.id)

    async def error(self, code: str, message: str, **extra: Any) -> None:
        """Answer with an ``Err`` frame."""
        self._session.send_error(code, message, self._frame.id, **extra)


class ServerSession:
    """A connection on the server, as handlers and hooks see it (a core ``Session``)."""

    def __init__(self, server: Server, stream: anyio.abc.ByteStream, remote_addr: str = "") -> None:
        app = server.app
        self.server = server
        self.app = app
        self.clock = server.clock
        self.remote_addr = remote_addr
        self.epoch = f"{server.node_id}:{secrets.token_hex(8)}"
        self.conn = ServerConn(
            now=self.clock.now(),
            path=app.path,
            allowed_origins=app.allowed_origins,
            limits=app.limits,
            remote_addr=remote_addr,
            raw=server.raw_handler is not None,
        )
        self._stream = stream
        self._buffer = bytearray()
        self._woken = False
        self._sleep_scope: anyio.CancelScope | None = None
        self._send_scope: anyio.CancelScope | None = None
        self._queue_in, self._queue_out = anyio.create_memory_object_stream[tuple[str, Any]](
            math.inf
        )
        self._slots = anyio.Semaphore(server.max_queued_messages)
        self._room = anyio.Event()
        self._held: list[Frame] | None = []
        self._identity: Identity | None = None
        self._expires_at: float | None = None
        self._registered = False
        self._finished = anyio.Event()
        self._aborted = False
        self.closed_with: Closed | None = None
        self._handshakes: list[tuple[str, HandshakeRequest, str]] = []

    # ------------------------------------------------------------------ Session API
    @property
    def identity(self) -> Identity:
        """Who is connected (only after the handshake)."""
        assert self._identity is not None
        return self._identity

    @property
    def user_id(self) -> str:
        """The authenticated user id."""
        return self._identity.user_id if self._identity else ""

    @property
    def device_id(self) -> str:
        """The device id (may be empty)."""
        return self._identity.device_id if self._identity else ""

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on this connection."""
        return self.conn.peer is not None and self.conn.state.value == "open"

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

        With ``wait`` (the default) it first waits until the ack window has room, so a
        long catch-up cannot overflow the send queue.
        """
        if wait:
            await self.wait_for_room()
        return self.send_now(method, data, message_id=message_id, form_id=form_id)

    async def wait_for_room(self) -> None:
        """Wait until the ack window has room (or the connection is closed)."""
        while self.is_open:
            assert self.conn.peer is not None
            sender = self.conn.peer.sender
            if sender.backlog == 0 and sender.in_flight < sender.timers.window:
                return
            room = self._room
            await room.wait()

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
        cut off with 1008."""
        if not self.is_open:
            frame = Frame(FrameType.DATA, id=message_id or "", method=method, data=data)
            self._queue_in.send_nowait(("event", DeliveryFailed(frame, "closed")))
            return frame
        frame = self.conn.send(
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
            peer = self.conn.peer
            message_id = peer.new_id() if peer is not None else ""
            self._held.append(
                Frame(FrameType.DATA, id=message_id, method=method, form_id=form_id, data=data)
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

    def send_raw(self, data: str | bytes) -> None:
        """Raw mode (``Server(raw_handler=...)``): send one text or binary message.

        Ignored once the connection is closing; a client that does not read is cut off
        like any other (``max_write_buffer``).
        """
        if self.conn.raw and self.conn.state.value == "open":
            self.conn.send_raw(data)
            self._collect()

    def send_error(self, code: str, message: str, frame_id: str = "", **extra: Any) -> None:
        """Send an ``Err`` frame (ignored once the connection is closed)."""
        if self.is_open:
            self.conn.send_error(code, message, frame_id, self.clock.now(), **extra)
            self._collect()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code``."""
        self.close_nowait(code, reason)

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code`` without awaiting anything."""
        self.conn.close(code, reason, self.clock.now())
        self._collect()

    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed and cleaned up."""
        await self._finished.wait()

    # ------------------------------------------------------------------ driving
    async def run(self) -> None:
        """Serve this connection until it closes; cleans up whatever happens."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._pump)
                tg.start_soon(self._worker)
                await self._read()
                self._queue_in.close()
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()

    def _wake(self) -> None:
        self._woken = True
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def _collect(self) -> list[Frame | RawMessageReceived]:
        """Move the core's output to the write buffer and queue; return frames to handle."""
        conn = self.conn
        data = conn.data_to_send()
        if data:
            self._buffer += data
            if len(self._buffer) > self.server.max_write_buffer and not self._aborted:
                self._abort("send buffer full: the client is not reading")
                return []
            self._wake()
        messages: list[Frame | RawMessageReceived] = []
        room = False
        for event in conn.events():
            if isinstance(event, MessageReceived):
                messages.append(event.frame)
            elif isinstance(event, RawMessageReceived):
                messages.append(event)
            elif isinstance(event, Delivered):
                room = True
                if self.app.delivered_hooks:
                    self._queue_in.send_nowait(("event", event))
            elif isinstance(event, (DeliveryFailed, MessageExpired)):
                room = True
                self._queue_in.send_nowait(("event", event))
            elif isinstance(event, ErrorReceived):
                self.server.logger.debug("client %s sent an Err frame", self.user_id)
            elif isinstance(event, Closed):
                self.closed_with = event
                room = True
                self._wake()
            elif isinstance(event, HandshakeRequested):
                self._handshakes.append(("ws", event.request, "GET"))
            elif isinstance(event, HttpRequested):
                self._handshakes.append(("http", event.request, event.method))
        if room:
            self._room.set()
            self._room = anyio.Event()
        return messages

    def _abort(self, reason: str) -> None:
        """Cut the client off at once (slow consumer): close 1008 and drop the socket."""
        self._aborted = True
        self._buffer.clear()
        now = self.clock.now()
        self.conn.close(CLOSE_POLICY, reason, now)
        self.conn.receive_data(None, now)
        self.conn.data_to_send()
        if self._send_scope is not None:
            self._send_scope.cancel()
        self.server.logger.info("closing a connection of %r: %s", self.user_id, reason)
        self._collect()

    async def _read(self) -> None:
        stream = self._stream
        conn = self.conn
        while self.closed_with is None:
            try:
                data: bytes | None = await stream.receive(_READ_SIZE)
            except _STREAM_ERRORS:
                data = None
            if self.closed_with is not None:
                return
            conn.receive_data(data, self.clock.now())
            for frame in self._collect():
                await self._slots.acquire()
                self._queue_in.send_nowait(("message", frame))
            while self._handshakes:
                kind, request, method = self._handshakes.pop(0)
                if kind == "ws":
                    await self._handshake(request)
                else:
                    await self._page(request, method)

    async def _pump(self) -> None:
        stream = self._stream
        clock = self.clock
        while True:
            if self._buffer and not self._aborted:
                data = bytes(self._buffer)
                self._buffer.clear()
                with anyio.CancelScope() as scope:
                    self._send_scope = scope
                    try:
                        await stream.send(data)
                    except _STREAM_ERRORS:
                        self.conn.receive_data(None, clock.now())
                        self._collect()
                self._send_scope = None
                continue
            if self.closed_with is not None:
                break
            if self._woken:
                self._woken = False
                continue
            deadline = self.conn.next_deadline()
            if self._expires_at is not None:
                deadline = self._expires_at if deadline is None else min(deadline, self._expires_at)
            with anyio.CancelScope() as scope:
                self._sleep_scope = scope
                await clock.sleep_until(math.inf if deadline is None else deadline)
            self._sleep_scope = None
            now = clock.now()
            if self._expires_at is not None and now >= self._expires_at:
                self._expires_at = None
                self.close_nowait(CLOSE_POLICY, "credential expired")
            elif deadline is not None and now >= deadline:
                self.conn.handle_timeout(now)
                for frame in self._collect():
                    self._queue_in.send_nowait(("message", frame))  # pragma: no cover
        await anyio.aclose_forcefully(stream) if self._aborted else await self._close_stream()
        self._tg.cancel_scope.cancel()

    async def _close_stream(self) -> None:
        try:
            with anyio.move_on_after(1):
                await self._stream.aclose()
        except _STREAM_ERRORS:
            pass
        await anyio.aclose_forcefully(self._stream)

    async def _worker(self) -> None:
        async with self._queue_out:
            async for kind, item in self._queue_out:
                if kind == "message":
                    try:
                        if isinstance(item, RawMessageReceived):
                            await self._dispatch_raw(item.data)
                        else:
                            await self._dispatch(item)
                    finally:
                        self._slots.release()
                else:
                    await self._hooks(item)

    async def _dispatch(self, frame: Frame) -> None:
        route = self.app.router.get(frame.method)
        if route is None:  # refused by the core before it was acked; kept for safety
            self.send_error(ErrorCode.UNKNOWN_METHOD, f"unknown method {frame.method!r}", frame.id)
            return
        async with self.server.handler_limiter:
            try:
                await route.handler(_Context(self, frame))
            except HandlerError as exc:
                self.send_error(exc.code, exc.message, frame.id, **exc.extra)
            except Exception:
                self.server.logger.exception(
                    "handler for %r failed (user %r, message %r)",
                    frame.method,
                    self.user_id,
                    frame.id,
                )
                self.send_error(
                    ErrorCode.HANDLER_ERROR, "the handler failed; see the server log", frame.id
                )

    async def _dispatch_raw(self, data: str | bytes) -> None:
        handler = self.server.raw_handler
        assert handler is not None
        async with self.server.handler_limiter:
            try:
                await handler(self, data)
            except Exception:
                self.server.logger.exception("raw handler failed (user %r)", self.user_id)
                self.close_nowait(1011, "handler error")

    async def _hooks(self, event: Any) -> None:
        app = self.app
        try:
            if isinstance(event, Delivered):
                for hook in app.delivered_hooks:
                    await hook(self, event.frame)
            elif isinstance(event, DeliveryFailed):
                for failed in app.failed_hooks:
                    await failed(self, event.frame, event.reason)
            elif isinstance(event, MessageExpired):
                self.server.logger.info(
                    "message %r of %r expired unconfirmed (RigorAck)", event.frame.id, self.user_id
                )
        except Exception:
            self.server.logger.exception("a delivery hook failed for %r", self.user_id)

    # ------------------------------------------------------------------ handshake
    async def _handshake(self, request: HandshakeRequest) -> None:
        server = self.server
        conn = self.conn
        refusal = server.admission(request)
        if refusal is not None:
            conn.reject(*refusal)
            self._collect()
            return
        try:
            limit = self.app.limits.handshake_timeout
            with anyio.fail_after(limit if limit is not None else math.inf):
                identity = await self.app.auth.authenticate(request)
        except AuthenticationFailed as exc:
            server.logger.info("handshake from %s refused: %s", self.remote_addr, exc.reason)
            conn.reject(exc.status, exc.reason)
            self._collect()
            return
        except TimeoutError:
            conn.reject(503, "authentication timed out")
            self._collect()
            return
        except Exception:
            server.logger.exception("authentication failed with an error")
            conn.reject(500, "authentication error")
            self._collect()
            return
        if (
            self.app.login_policy is LoginPolicy.MULTI
            and server.registry.count(identity.user_id) >= self.app.max_connections_per_user
        ):
            conn.reject(429, "too many connections for this user")
            self._collect()
            return
        now = self.clock.now()
        receiver = server.registry.receiver(
            identity, self.app.ack_mode, self.app.options.timers, now
        )
        conn.accept(
            identity,
            now,
            options=self.app.options,
            receiver=receiver,
            accepts_method=self.app.router.__contains__,
        )
        self._identity = identity
        if identity.expires_at is not None:
            self._expires_at = now + (identity.expires_at - time.time())
        displaced = server.registry.add(identity, self.epoch, self)
        self._registered = True
        for old in displaced:
            old.close_nowait(4000, "session replaced: the user logged in again")
        server.ip_opened(self.remote_addr)
        messages = self._collect()
        for frame in messages:
            await self._slots.acquire()
            self._queue_in.send_nowait(("message", frame))
        self._tg.start_soon(self._connected, identity)

    async def _connected(self, identity: Identity) -> None:
        server = self.server
        binding = Binding(identity.user_id, server.node_id, self.epoch, identity.device_id)
        if not server.single_node:
            try:
                others = await server.app.discover.bind(binding)
            except DiscoverError as exc:
                server.logger.warning("could not bind %r in discovery: %s", identity.user_id, exc)
                others = []
            for other in others:
                same_device = other.device_id == identity.device_id
                if other.node_id != server.node_id and (
                    self.app.login_policy is LoginPolicy.SINGLE or same_device
                ):
                    kick = Forward("kick", identity.user_id, server.node_id, epoch=other.epoch)
                    try:
                        await server.app.discover.forward(other.node_id, kick)
                    except DiscoverError as exc:
                        server.logger.warning("could not reach node %r: %s", other.node_id, exc)
        for hook in self.app.connect_hooks:
            try:
                await hook(self, server)
            except Exception:
                server.logger.exception("an on_connect hook failed for %r", identity.user_id)
        if self._held is not None:
            await self.release()

    async def _page(self, request: HandshakeRequest, method: str) -> None:
        handler = self.app.pages.get(request.path)
        if handler is None or method not in ("GET", "HEAD"):
            path = self.app.path
            is_ws_path = (
                request.path == path
                if isinstance(path, str)
                else bool(path.fullmatch(request.path))
            )
            if handler is None and is_ws_path:
                self.conn.respond(
                    426, b"this endpoint speaks WebSocket\n", [("Upgrade", "websocket")]
                )
            elif handler is None:
                self.conn.respond(404, b"not found\n")
            else:
                self.conn.respond(405, b"method not allowed\n", [("Allow", "GET, HEAD")])
            self._collect()
            return
        try:
            response = await handler(request)
        except Exception:
            self.server.logger.exception("page handler for %r failed", request.path)
            response = HttpResponse(500, b"internal server error\n")
        body = b"" if method == "HEAD" else response.body
        self.conn.respond(
            response.status, body, response.headers, content_type=response.content_type
        )
        self._collect()

    async def _cleanup(self) -> None:
        server = self.server
        identity = self._identity
        if not self.conn.closed:
            self.conn.receive_data(None, self.clock.now())
            self._collect()
        await anyio.aclose_forcefully(self._stream)
        if identity is not None and self._registered:
            server.ip_closed(self.remote_addr)
            server.registry.remove(identity.user_id, self.epoch)
            server.registry.release_receiver(identity, self.clock.now())
            if not server.single_node:
                binding = Binding(identity.user_id, server.node_id, self.epoch, identity.device_id)
                try:
                    with anyio.move_on_after(5):
                        await server.app.discover.unbind(binding)
                except DiscoverError as exc:
                    server.logger.warning("could not unbind %r: %s", identity.user_id, exc)
            # Failures of pushes still in flight reach the hooks before the disconnect.
            while True:
                try:
                    kind, item = self._queue_out.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                if kind == "event":
                    await self._hooks(item)
            for hook in self.app.disconnect_hooks:
                try:
                    with anyio.move_on_after(10):
                        await hook(self, server)
                except Exception:
                    server.logger.exception("an on_disconnect hook failed for %r", identity.user_id)
        self._finished.set()
