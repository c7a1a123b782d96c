"""One accepted WebSocket under an ASGI server: the session :class:`~imkit.transport.asgi.ASGIApp`
runs for it.

It drives the core's :class:`~imkit.core.peer.Peer` with the whole messages ASGI hands over
and registers in the :class:`~imkit.transport.server.Server`'s registry like the anyio
:class:`~imkit.transport.session.ServerSession`, whose life cycle it follows: four tasks
(reader, worker, writer, timer), the registry left as soon as the connection ends, the
messages already acknowledged still handled, then the hooks.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from imkit.core.conn import (
    ACK_MODE_HEADER,
    CLOSE_GOING_AWAY,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
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
from imkit.transport._lifecycle import (
    HOOK_TIMEOUT,
    PUSH_BATCH,
    DeferredMessage,
    HeldFanOut,
    HooksAwaiting,
    announce,
    delivery_hooks,
    dispatch,
    hooks_item,
    inbound_receiver,
    retire,
    revalidate,
)
from imkit.transport._sync import Flag, Inbox

if TYPE_CHECKING:
    from imkit.transport.server import Server

__all__ = ("ASGISession", "Message", "Receive", "Send", "close_reason")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CLOSE_ABNORMAL = 1006
_CLOSE_NO_STATUS = 1005
_MAX_REASON_BYTES = 123  # RFC 6455 §5.5: a close frame's payload is at most 125 bytes


def close_reason(reason: str) -> str:
    """``reason`` cut to what fits in a close frame, on a character boundary."""
    data = reason.encode()[:_MAX_REASON_BYTES]
    return data.decode("utf-8", "ignore")


class _Stop:
    """Queue marker: the reader is done, no message follows."""


_STOP = _Stop()
_Item = Frame | HooksAwaiting | DeliveryFailed | MessageExpired | _Stop


class ASGISession(HeldFanOut):
    """One accepted WebSocket of an ASGI server, as handlers and hooks see it.

    It offers what :class:`~imkit.transport.session.ServerSession` offers (a core
    ``Session`` plus ``send_now``, ``deliver``, ``wait_for_room``...), so the server's
    fan-out and hooks treat both alike. :class:`ASGIApp` creates and registers it once the
    handshake is decided.

    Four tasks serve it: the reader, the worker (handlers in order, then the hooks), the
    writer (ASGI ``send``; pushers never wait for it) and the timer (the peer's deadlines
    and the credential's expiry, apart from the writer so that a client that stops
    reading still meets its ack timeouts). When the connection ends the session leaves the
    registry at once; the worker finishes the messages already acknowledged (within the
    server's ``shutdown_timeout``), runs the hooks of pushes that failed, then
    ``on_disconnect``.
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
        """This connection's unique id (also its binding epoch in discovery)."""
        self._identity = identity
        self.user_id = identity.user_id
        """The authenticated user id."""
        self.device_id = identity.device_id
        """The device id (may be empty)."""
        now = self.clock.now()
        receiver = inbound_receiver(server, identity, now)
        self.peer = Peer(
            app.options,
            server=True,
            now=now,
            user_id=identity.user_id,
            receiver=receiver,
            accepts_method=app.router.__contains__,
        )
        self.closed_with: Closed | None = None
        """How the connection ended (``None`` while it is open or closing)."""
        self._closing: tuple[int, str] | None = None
        self._send = send
        # writer
        self._out: deque[str] = deque()
        self._out_size = 0
        self._write_event: anyio.Event | None = None
        self._send_scope: anyio.CancelScope | None = None
        self._aborted = False
        # timer
        self._timer_scope: anyio.CancelScope | None = None
        self._timer_at = math.inf
        self._expires_at: float | None = None
        if identity.expires_at is not None:
            self._expires_at = now + (identity.expires_at - self.clock.wall())
        self._revalidate_at: float | None = None
        if app.revalidate_interval is not None:
            self._revalidate_at = now + app.revalidate_interval
        self._tasks: anyio.abc.TaskGroup | None = None  # the connection's, while it runs
        # reader and worker
        self._read_scope = anyio.CancelScope()
        self._inbox: Inbox[_Item] = Inbox(server.max_queued_messages)
        self._worker_done = Flag()
        # pushes
        self._room = Flag()
        self._room_waiters = 0
        self._held: list[Frame] | None = []
        self._keep: Callable[[Frame], bool] | None = None
        # life cycle
        self._connected_done = Flag()
        self._disconnected = False
        self._finished = Flag()

    # ------------------------------------------------------------------ Session API
    @property
    def identity(self) -> Identity:
        """Who is connected."""
        return self._identity

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on this connection."""
        return self.closed_with is None and self._closing is None

    @property
    def unsent(self) -> int:
        """Text queued for this connection and not yet handed to the ASGI server."""
        return self._out_size

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

        With ``wait`` (the default) it first waits until the ack window has room and the
        unsent messages are under half of ``max_write_buffer``. On a closed connection the
        message fails at once (``on_delivery_failed`` with reason ``"closed"``).
        """
        if wait:
            await self.wait_for_room()
        return self.send_now(method, data, message_id=message_id, form_id=form_id)

    async def wait_for_room(self) -> None:
        """Wait until the ack window and the send queue have room (or the connection is
        closed)."""
        limit = self.server.max_write_buffer // 2
        while self.is_open:
            if self._out_size < limit and self.peer.sender.has_room():
                return
            room = self._room
            self._room_waiters += 1
            try:
                await room.wait()
            finally:
                self._room_waiters -= 1

    def _send_while_room(self, method: str, items: Iterator[tuple[Any, str]]) -> list[Frame]:
        try:
            return self.peer.send_while_room(method, items, self.clock.now(), most=PUSH_BATCH)
        finally:
            self._collect()

    def send_now(
        self,
        method: str,
        data: Any,
        *,
        message_id: str | None = None,
        form_id: str = "",
        reply_to: str = "",
        acked: bool = True,
    ) -> Frame:
        """Send without waiting (fan-out, replies), with the downstream ack mode, or as a
        ``NoAck`` frame with ``acked=False``. Past the backlog limit the client is closed
        with 1008, and past ``max_write_buffer`` too.

        Raises ``TypeError``/``ValueError`` for ``data`` that is not JSON.
        """
        if not self.is_open:
            frame = Frame(
                FrameType.DATA if acked else FrameType.NO_ACK,
                id=message_id if message_id is not None else self._new_id(),
                method=method,
                form_id=form_id,
                data=data,
                reply_to=reply_to,
            )
            self._post(DeliveryFailed(frame, "closed"))
            return frame
        frame = self.peer.send(
            method,
            data,
            self.clock.now(),
            message_id=message_id,
            form_id=form_id,
            reply_to=reply_to,
            acked=acked,
        )
        self._collect()
        return frame

    def _new_id(self) -> str:
        return self.peer.new_id()

    def unblock(self, frame: Frame) -> bool:
        """ASGI connections handle their messages one at a time: always ``False``."""
        return False

    def defer(self, frame: Frame) -> DeferredMessage | None:
        """ASGI connections handle their messages one at a time: always ``None``."""
        return None

    def deferred_end(
        self, message: DeferredMessage, then: Callable[[], Awaitable[None]] | None
    ) -> None:
        """Never called: :meth:`defer` defers nothing."""
        raise RuntimeError("an ASGI connection defers no message")  # pragma: no cover

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
        self._closing = (code, close_reason(reason))
        self._signal_room()
        self._wake_writer()
        self._wake_timer()

    def shutdown_nowait(self) -> None:
        """Server shutdown: close with 1001."""
        self.close_nowait(CLOSE_GOING_AWAY, "server shutting down")

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and cleaned up (hooks included)."""
        await self._finished.wait()

    # ------------------------------------------------------------------ driving
    async def run(self, receive: Receive) -> None:
        """Accept, serve the connection until it closes, and clean up whatever happens."""
        try:
            mode = self.app.ack_mode.value.encode()
            accept = {"type": "websocket.accept", "headers": [(ACK_MODE_HEADER.encode(), mode)]}
            await self._write(accept)
            if self.closed_with is not None:
                return
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._writer)
                tg.start_soon(self._timer)
                tg.start_soon(self._worker)
                tg.start_soon(self._connected)
                with self._read_scope:
                    await self._read(receive)
                grace = self.server.shutdown_timeout
                with anyio.move_on_after(grace):
                    await self._worker_done.wait()
                if not self._worker_done.is_set():
                    self.server.logger.warning(
                        "handlers of %r still running %.1f s after the connection closed; "
                        "cancelling them",
                        self.user_id,
                        grace,
                    )
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()

    def _post(self, event: Delivered | DeliveryFailed | MessageExpired) -> None:
        """Hand a delivery event to the worker (its hooks run there, in order; the
        ``on_delivered`` hooks are called now, and what they return is awaited there)."""
        if self._worker_done.is_set():
            self.server.logger.debug(
                "dropping %s for %r: its session has ended", type(event).__name__, self.user_id
            )
            return
        item = hooks_item(self.server, self, event)
        if item is not None:
            self._inbox.put(item)

    def _wake_writer(self) -> None:
        event = self._write_event
        if event is not None:
            self._write_event = None
            event.set()

    def _wake_timer(self) -> None:
        scope = self._timer_scope
        if scope is not None:
            self._timer_scope = None
            scope.cancel()

    def _signal_room(self) -> None:
        self._room.set()
        self._room = Flag()

    def _deadline(self) -> float | None:
        """When the timer must wake next: the peer's deadline, the credential's expiry or
        the next revalidation."""
        deadline = self.peer.next_deadline()
        for extra in (self._expires_at, self._revalidate_at):
            if extra is not None and (deadline is None or extra < deadline):
                deadline = extra
        return deadline

    def _collect(self) -> list[Frame]:
        """Move the peer's output to the send queue; act on its events; return the
        messages to dispatch."""
        peer = self.peer
        texts = peer.outgoing()
        if texts and self.closed_with is None and not self._aborted:
            self._out.extend(texts)
            self._out_size += sum(map(len, texts))
            if self._out_size > self.server.max_write_buffer:
                self._abort("send buffer full: the client is not reading")
                return []
            self.server.note_unsent(self._out_size)
            self._wake_writer()
        messages: list[Frame] = []
        room = False
        for event in peer.events():
            if isinstance(event, MessageReceived):
                messages.append(event.frame)
            elif isinstance(event, Delivered):
                room = True
                if self.app.delivered_hooks:
                    self._post(event)  # the hooks are called now (hooks_item)
            elif isinstance(event, (DeliveryFailed, MessageExpired)):
                room = True
                self._post(event)
            elif isinstance(event, ErrorReceived):
                self.server.logger.debug("client %r sent an Err frame", self.user_id)
        if room and self._room_waiters:
            self._signal_room()
        request = peer.close_request
        if request is not None:
            self.close_nowait(*request)
        deadline = self._deadline()
        if deadline is not None and deadline < self._timer_at:
            self._wake_timer()
        return messages

    def _abort(self, reason: str) -> None:
        """Give up on a client that does not read: drop what it has not read, close 1008.

        ASGI cannot reset a socket; the close is bounded by ``close_timeout``, after which
        the adapter returns and the ASGI server drops the connection.
        """
        self._aborted = True
        self._out.clear()
        self._out_size = 0
        self.server.logger.warning("cutting off a connection of %r: %s", self.user_id, reason)
        if self.closed_with is None:
            self._closing = (CLOSE_POLICY, reason)
        if self._send_scope is not None:
            self._send_scope.cancel()
        self._signal_room()
        self._wake_writer()

    def _finish(self, code: int, reason: str, *, by_peer: bool) -> None:
        """The connection is over: leave the registry, fail what is in flight, stop reading."""
        if self.closed_with is not None:
            return
        self.closed_with = Closed(code, reason, by_peer)
        identity = self._identity
        self.server.registry.remove(identity.user_id, self.epoch)
        self.server.registry.release_receiver(identity, self.clock.now())
        self._out.clear()
        self._out_size = 0
        if self._send_scope is not None:  # a write blocked on a gone client never returns
            self._send_scope.cancel()
        self.peer.connection_lost()
        self._collect()
        self._signal_room()
        self._wake_writer()
        self._wake_timer()
        self._read_scope.cancel()

    async def _write(self, message: Message) -> None:
        """Send one ASGI message; a failed send ends the connection."""
        with anyio.CancelScope() as scope:
            self._send_scope = scope
            try:
                await self._send(message)
            except OSError:  # ASGI: send() on a closed connection raises an OSError
                self._finish(_CLOSE_ABNORMAL, "connection lost", by_peer=True)
        self._send_scope = None

    # ------------------------------------------------------------------ tasks
    async def _read(self, receive: Receive) -> None:
        limit = self.app.limits.max_message_size
        messages: list[Frame] = []
        handed = 0
        try:
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
                messages = self._collect()
                handed = 0
                while handed < len(messages):
                    await self._inbox.put_message(messages[handed])
                    handed += 1
        finally:
            # Cancelled while the worker was behind: the messages already acknowledged
            # are still handled; nothing follows the stop marker.
            for frame in messages[handed:]:
                self._inbox.put_message_nowait(frame)
            self._inbox.put(_STOP)

    async def _writer(self) -> None:
        while True:
            if self._out:
                text = self._out.popleft()
                self._out_size -= len(text)
                await self._write({"type": "websocket.send", "text": text})
                if self._room_waiters and self._out_size < self.server.max_write_buffer // 2:
                    self._signal_room()
                continue
            if self.closed_with is not None:
                return
            if self._closing is not None:
                code, reason = self._closing
                with anyio.move_on_after(self.app.limits.close_timeout):
                    await self._write({"type": "websocket.close", "code": code, "reason": reason})
                self._finish(code, reason, by_peer=False)
                return
            event = self._write_event = anyio.Event()
            await event.wait()

    async def _timer(self) -> None:
        clock = self.clock
        while self.is_open:
            deadline = self._deadline()
            expires = self._expires_at
            target = math.inf if deadline is None else deadline
            with anyio.CancelScope() as scope:
                self._timer_at = target
                self._timer_scope = scope
                await clock.sleep_until(target)
            self._timer_scope = None
            self._timer_at = math.inf
            if not self.is_open:
                return
            now = clock.now()
            revalidate_at = self._revalidate_at
            if expires is not None and now >= expires:
                self._expires_at = None
                self.close_nowait(CLOSE_POLICY, "credential expired")
            elif revalidate_at is not None and now >= revalidate_at:
                self._revalidate_at = now + (self.app.revalidate_interval or math.inf)
                if self._tasks is not None:
                    self._tasks.start_soon(revalidate, self.server, self, self.request)
            elif deadline is not None and now >= deadline:
                self.peer.handle_timeout(now)
                for frame in self._collect():  # pragma: no cover - timeouts never dispatch
                    self._inbox.put_message_nowait(frame)
            await anyio.lowlevel.checkpoint()

    async def _connected(self) -> None:
        try:
            await announce(self.server, self)
        finally:
            self._connected_done.set()
            if self._held is not None:
                await self.release()

    async def _worker(self) -> None:
        try:
            while True:
                item = await self._inbox.get()
                if isinstance(item, _Stop):
                    break
                await self._handle(item)
            await self._disconnect()
        finally:
            self._worker_done.set()

    async def _handle(self, item: _Item) -> None:
        if isinstance(item, Frame):
            try:
                await dispatch(self.server, self, item)
            finally:
                self._inbox.message_done()
        elif not isinstance(item, _Stop):
            await delivery_hooks(self.server, self, item)

    async def _disconnect(self, *, handlers: bool = True) -> None:
        """Run what is still queued (with ``handlers=False``, only the delivery hooks),
        then :func:`retire` the session (once)."""
        if self._disconnected:
            return
        self._disconnected = True
        with anyio.move_on_after(HOOK_TIMEOUT):
            await self._connected_done.wait()  # on_connect hooks end before on_disconnect
        while True:
            try:
                item = self._inbox.get_nowait()
            except anyio.WouldBlock:
                break
            if handlers or not isinstance(item, Frame):
                await self._handle(item)
        self.server.ip_closed(self.remote_addr)
        await retire(self.server, self)

    async def _cleanup(self) -> None:
        """Runs shielded when the session ends, even when it was cancelled."""
        if self.closed_with is None:
            if self._closing is None and not self._aborted:
                # Cancelled from outside (the ASGI server stopped hard): say goodbye.
                with anyio.move_on_after(1):
                    goodbye = "server shutting down"
                    message = {"type": "websocket.close", "code": CLOSE_GOING_AWAY}
                    await self._write({**message, "reason": goodbye})
            self._finish(_CLOSE_ABNORMAL, "connection lost", by_peer=True)
        if not self._disconnected:
            # The worker was cancelled: no handler runs any more, but the hooks still do.
            self._connected_done.set()
            await self._disconnect(handlers=False)
        self._worker_done.set()
        self._finished.set()
