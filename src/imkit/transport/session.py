"""One client connection on the server: a core :class:`~imkit.core.conn.ServerConn` driven
over an anyio byte stream.

Four jobs per connection, each a task started when needed in the task group the session
is given (:meth:`ServerSession.start`), and watched: a job that fails is logged and ends
its connection, no other:

* the **reader** feeds the bytes read to the core and hands messages to the worker through
  a bounded queue (``max_queued_messages``): when the worker falls behind, reading stops
  and TCP pushes back on the client;
* the **worker** runs the route handlers of this connection in order (under the
  server-wide handler limit), the delivery hooks, and at the end the disconnect hooks;
* the **writer** (:class:`~imkit.transport._writer.StreamWriter`) writes what the core
  produced. Writes never block a pusher: bytes go to a buffer that is drained, and a
  client whose unsent bytes pass ``max_write_buffer`` is cut off at once: its socket is
  reset, so it sees no close frame (a WebSocket client reports 1006);
* the **timer** waits for the next deadline (the core's resends, keepalive, idle and
  close timeouts; the credential's expiry; the next revalidation) and fires it. It is
  apart from the writer so that a client that stops reading still meets its ping timeout
  (1011) and close timeout.

On trio, on TLS and on any other anyio stream the reader, the writer and the timer are
tasks for the whole connection, and :meth:`ServerSession.run` gives the jobs a task group
of their own (the connection's task). On asyncio over plain TCP the server uses the lean
stream of :mod:`imkit.transport._asyncio_stream` and starts the session in its own task
group of connections, and an idle connection has no task at all: the reader runs in the
stream's protocol callback (``_consume``: a handshake is decided in a task while reading
is paused; a full queue pauses reading), the writer's bytes leave once per event-loop
iteration and a task starts only to flush and close, the timer is an event-loop timer,
and the worker task starts with the first message or event. The other jobs (a handshake's
decision, the ``on_connect`` hooks, a revalidation, the end) are tasks while they run.

How a connection ends: when the core reports ``Closed`` the session leaves the registry at
once (no push goes to it, and a newer connection of the same user is never touched). The
writer flushes what is left (the close frame, an HTTP answer) within ``close_timeout``;
if the client still has that to read it half-closes and waits up to ``close_timeout`` for
the client's end of stream, else it closes at once. The worker finishes the messages
already acknowledged (for at most the server's ``shutdown_timeout``), runs the hooks of the
pushes that failed, then ``on_disconnect``. The last job to end, once nothing more is
read, cleans up (shielded from cancellation); a connection whose task group is cancelled
first says goodbye (1001) as best it can and still runs its hooks.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from imkit.core.conn import (
    CLOSE_GOING_AWAY,
    CLOSE_SESSION_REPLACED,
    ConnState,
    ServerConn,
)
from imkit.core.events import (
    Closed,
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    Event,
    HandshakeRequested,
    HttpRequested,
    MessageExpired,
    MessageReceived,
    RawMessageReceived,
)
from imkit.core.frames import Frame, FrameType
from imkit.core.interfaces import HandshakeRequest, Identity
from imkit.core.peer import CLOSE_POLICY
from imkit.transport._asyncio_stream import (
    AsyncioSocketStream,
    run_as_asyncio,
    running_on_asyncio,
)
from imkit.transport._lifecycle import (
    MAX_UNBLOCKED,
    PUSH_BATCH,
    DeferredMessage,
    HeldFanOut,
    HooksAwaiting,
    announce,
    decide_handshake,
    delivery_hooks,
    dispatch,
    finish_deferred,
    hooks_item,
    inbound_receiver,
    page_response,
    retire,
    revalidate,
)
from imkit.transport._sync import Flag, Inbox
from imkit.transport._writer import STREAM_ERRORS, StreamWriter
from imkit.transport.clock import AnyioClock

if TYPE_CHECKING:
    from imkit.transport.server import Server

__all__ = ("ServerSession",)

_READ_SIZE = 65536
_HOOK_TIMEOUT = 10.0


class _Stop:
    """Queue marker: the reader is done, no message follows."""


_STOP = _Stop()
_Message = Frame | RawMessageReceived
_Item = Frame | Event | HooksAwaiting | _Stop  # a message, a delivery event, or the end
_OPEN = ConnState.OPEN


class ServerSession(HeldFanOut):
    """A connection on the server, as handlers and hooks see it (a core ``Session``).

    Created and run by :meth:`imkit.Server.handle_stream` (or started by the server's
    accept loop, on asyncio over plain TCP); applications get one through
    ``ctx.session``, ``server.sessions(user_id)`` and the hooks.
    """

    __slots__ = (
        "_blocked",
        "_cancelled",
        "_connected_done",
        "_deferred",
        "_disconnected",
        "_dispatching",
        "_ending",
        "_expires_at",
        "_finished",
        "_handshakes",
        "_identity",
        "_inbox",
        "_jobs",
        "_lean",
        "_live",
        "_min_step",
        "_now",
        "_on_finished",
        "_read_done",
        "_read_scope",
        "_registered",
        "_revalidate_at",
        "_room",
        "_room_waiters",
        "_scopes",
        "_stream",
        "_timer_at",
        "_timer_handle",
        "_timer_loop",
        "_timer_scope",
        "_unblocked",
        "_unblocked_idle",
        "_worker_done",
        "_writer",
        "app",
        "clock",
        "closed_with",
        "conn",
        "device_id",
        "epoch",
        "remote_addr",
        "server",
        "user_id",
    )

    def __init__(self, server: Server, stream: anyio.abc.ByteStream, remote_addr: str = "") -> None:
        app = server.app
        self.server = server
        self.app = app
        self.clock = server.clock
        self.remote_addr = remote_addr
        self.epoch = f"{server.node_id}:{secrets.token_hex(8)}"
        """This connection's unique id (also its binding epoch in discovery)."""
        # The time, read several times per message: the clock's, or on the lean asyncio
        # stream with the real clock the loop's own (what AnyioClock.now returns there).
        self._now: Callable[[], float] = self.clock.now
        self.conn = ServerConn(
            now=self._now(),
            path=app.path,
            allowed_origins=app.allowed_origins,
            limits=app.limits,
            remote_addr=remote_addr,
            raw=server.raw_handler is not None,
        )
        self.closed_with: Closed | None = None
        """How the connection closed (``None`` while it is open)."""
        self._stream = stream
        self._writer = StreamWriter(
            stream,
            limit=server.max_write_buffer,
            close_timeout=app.limits.close_timeout,
            on_broken=self._lost,
            on_drained=self._on_drained,
        )
        # timer
        self._timer_scope: anyio.CancelScope | None = None
        self._timer_at = math.inf
        # On the lean asyncio stream with the real clock the timer is an event-loop
        # timer (``call_at``), not a task: an idle connection then costs no timer task.
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._timer_handle: asyncio.TimerHandle | None = None
        self._expires_at: float | None = None
        self._revalidate_at: float | None = None
        # No activity sets a deadline sooner than this from now (the smallest of the
        # resend, close, keepalive and idle intervals): while the timer is due to wake
        # within it, an input cannot need an earlier wake-up, and nothing is computed.
        steps = [
            app.options.timers.resend_interval,
            app.limits.close_timeout,
            app.limits.ping_timeout,
            app.limits.ping_interval,
            app.options.idle_timeout,
        ]
        self._min_step = min(step for step in steps if step is not None)
        # reader and worker
        self._read_scope: anyio.CancelScope | None = None  # the reader task's (not lean)
        # On asyncio's lean stream the bytes are pushed to the session from the event
        # loop's callback (``_consume``): no reader task. Other streams are read by one.
        self._lean = stream if isinstance(stream, AsyncioSocketStream) else None
        self._blocked = False  # push mode: a handshake is being decided, or the inbox is full
        self._deferred: list[bytes | None] = []
        self._read_done = Flag()
        self._inbox: Inbox[_Item] = Inbox(
            server.max_queued_messages, self._lean.loop if self._lean is not None else None
        )
        self._worker_done = Flag()
        # unblock() and defer(): the message the worker is handling, the messages let go
        # on before their end (an unblocked handler in a task that was a worker, a
        # deferred one in its callback), and a flag for their last end.
        self._dispatching: Frame | None = None
        self._unblocked = 0
        self._unblocked_idle: Flag | None = None
        self._handshakes: list[tuple[HandshakeRequest, str | None]] = []
        # pushes
        self._room = Flag()
        self._room_waiters = 0
        self._held: list[Frame] | None = []
        self._keep: Callable[[Frame], bool] | None = None
        # life cycle: the jobs (see run and start)
        self._jobs: anyio.abc.TaskGroup | None = None
        self._scopes: set[anyio.CancelScope] | None = None  # of the running jobs
        self._live = 0  # jobs spawned and not finished
        self._cancelled = False  # the jobs were cancelled: new ones start cancelled
        self._ending = False  # _finish has begun
        self._on_finished: Callable[[ServerSession], None] | None = None
        self._identity: Identity | None = None
        # The identity's ids, read per message: plain attributes (empty before the
        # handshake), not properties.
        self.user_id = ""
        """The authenticated user id ("" before the handshake)."""
        self.device_id = ""
        """The device id (may be empty)."""
        self._registered = False
        self._connected_done = Flag()
        self._disconnected = False
        self._finished = Flag()

    # ------------------------------------------------------------------ Session API
    @property
    def identity(self) -> Identity:
        """Who is connected (only after the handshake)."""
        assert self._identity is not None
        return self._identity

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on this connection."""
        return self.conn.state is ConnState.OPEN

    @property
    def unsent(self) -> int:
        """Bytes written to this connection and not yet taken by the socket.

        On the lean asyncio stream the messages sent with :meth:`send_now` and
        :meth:`deliver` are moved to the stream once per event-loop iteration (their
        bytes count from then on; ``max_write_buffer`` is checked then too)."""
        lean = self._lean  # (straight from the stream)
        return lean.write_buffered if lean is not None else self._writer.buffered

    def send_raw(self, data: str | bytes) -> None:
        """Raw mode (``Server(raw_handler=...)``): send one text or binary message."""
        self.conn.send_raw(data)
        self._collect(self._now())

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
        unsent bytes are under half of ``max_write_buffer``, so a long catch-up neither
        overflows the send queue nor gets the client cut off. On a closed connection the
        message fails at once (``on_delivery_failed`` with reason ``"closed"``).
        """
        if wait:
            await self.wait_for_room()
        return self.send_now(method, data, message_id=message_id, form_id=form_id)

    async def wait_for_room(self) -> None:
        """Wait until the ack window and the write buffer have room (or the connection
        is closed)."""
        limit = self.server.max_write_buffer // 2
        conn = self.conn
        while conn.state is _OPEN:
            peer = conn.peer
            if self.unsent < limit:
                if peer is None:  # raw mode: only the write buffer counts
                    return
                if peer.sender.has_room():
                    return
            room = self._room
            self._room_waiters += 1
            try:
                await room.wait()
            finally:
                self._room_waiters -= 1

    def _send_while_room(self, method: str, items: Iterator[tuple[Any, str]]) -> list[Frame]:
        conn = self.conn
        if conn.peer is None:  # raw mode: no messages to push
            return []
        now = self._now()
        try:
            return conn.send_while_room(method, items, now, most=PUSH_BATCH)
        finally:
            self._collect(now)

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
        with 1008; past ``max_write_buffer`` it is cut off.

        Raises ``TypeError``/``ValueError`` for ``data`` that is not JSON.
        """
        conn = self.conn
        if conn.state is not _OPEN or conn.peer is None:
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
        now = self._now()
        lean = self._lean
        frame = conn.send(
            method,
            data,
            now,
            message_id=message_id,
            form_id=form_id,
            reply_to=reply_to,
            acked=acked,
            flush=lean is None,
        )
        if lean is not None:
            if lean.producer is None:  # (its bytes and events at the end of the iteration)
                lean.produce_soon(self)
        else:
            # A NoAck frame sets no timer in the core (nothing to resend or give up): its
            # send cannot bring the next deadline forward.
            self._collect(now, timers=acked)
            self.server.note_unsent(self._writer.buffered)
        return frame

    def deliver(self, method: str, data: Any, *, form_id: str = "") -> None:
        """Fan-out delivery: queued while the session is held, else sent at once (see
        :meth:`~imkit.transport._lifecycle.HeldFanOut.deliver`)."""
        conn = self.conn
        if (
            self._held is not None
            or self._keep is not None
            or conn.state is not _OPEN
            or conn.peer is None
        ):
            HeldFanOut.deliver(self, method, data, form_id=form_id)
            return
        now = self._now()
        lean = self._lean
        conn.send(method, data, now, form_id=form_id, flush=lean is None)
        if lean is not None:
            if lean.producer is None:
                lean.produce_soon(self)
        else:
            self._collect(now)
            self.server.note_unsent(self._writer.buffered)

    def produce_output(self) -> None:
        """The lean stream's callback before it writes (:meth:`AsyncioSocketStream.
        produce_soon`): what :meth:`send_now` and :meth:`deliver` made this iteration
        goes to the write buffer at once, and their events are acted on."""
        now = self._now()
        self.conn.flush(now)
        self._collect(now)
        lean = self._lean
        assert lean is not None  # (only the lean stream calls it)
        self.server.note_unsent(lean.write_buffered)

    def send_error(self, code: str, message: str, frame_id: str = "", **extra: Any) -> None:
        """Send an ``Err`` frame (ignored once the connection is closed)."""
        if self.is_open and self.conn.peer is not None:
            now = self._now()
            self.conn.send_error(code, message, frame_id, now, **extra)
            self._collect(now)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code``."""
        self.close_nowait(code, reason)

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code`` without awaiting anything."""
        now = self._now()
        self.conn.close(code, reason, now)
        self._collect(now)

    def shutdown_nowait(self) -> None:
        """Server shutdown: close with 1001, or answer a pending handshake with 503."""
        conn = self.conn
        if conn.state is ConnState.HANDSHAKE and conn.request is not None:
            conn.reject(503, "server shutting down")
            self._collect(self._now())
        else:
            self.close_nowait(CLOSE_GOING_AWAY, "server shutting down")

    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed and cleaned up."""
        await self._finished.wait()

    def _new_id(self) -> str:
        peer = self.conn.peer
        return peer.new_id() if peer is not None else secrets.token_hex(8)

    def _post(self, event: Event) -> None:
        """Hand a delivery event to the worker (its hooks run there, in order; the
        ``on_delivered`` hooks are called now, and what they return is awaited there)."""
        if self._worker_done.is_set():
            self.server.logger.info(
                "%s for %r not reported to the hooks: its session has ended",
                type(event).__name__,
                self.user_id,
            )
            return
        item = hooks_item(self.server, self, event)
        if item is not None:
            self._inbox.put(item)

    # ------------------------------------------------------------------ driving
    async def run(self) -> None:
        """Serve this connection until it closes; cleans up whatever happens.

        The connection's jobs run in a task group of its own; cancelled, the connection
        closes with 1001 as best it can and its hooks still run.
        """
        try:
            async with anyio.create_task_group() as tg:
                self.start(tg)
                await self._finished.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()

    def start(
        self,
        jobs: anyio.abc.TaskGroup,
        on_finished: Callable[[ServerSession], None] | None = None,
    ) -> None:
        """Start serving this connection and return at once: every task it needs (the
        reader, writer, timer, worker, a handshake's decision, the hooks, the clean-up)
        is started in ``jobs`` when needed, and ends there.

        ``on_finished(session)`` is called once the connection is closed and cleaned up.
        A job that fails (a bug) is logged and ends this connection only. If ``jobs``
        ends (is cancelled) before the connection does, call :meth:`abandon`.
        """
        self._jobs = jobs
        self._on_finished = on_finished
        if self._writer.needs_task:
            self._spawn(self._write)
        if self._lean is not None and isinstance(self.clock, AnyioClock):
            self._timer_loop = self._lean.loop
            self._now = self._lean.time
            self._arm_timer()
        else:
            self._spawn(self._timer)
        # The worker starts with the first message or event: none while idle.
        self._inbox.when_first_item(self._start_worker)
        if self._lean is not None:
            self._lean.consume(self._consume)
        else:
            self._read_scope = anyio.CancelScope()
            self._spawn(self._read)

    async def abandon(self, jobs: anyio.abc.TaskGroup) -> None:
        """``jobs`` has ended: if this connection was started there (:meth:`start`) and is
        not cleaned up yet, clean it up now, as when it is cancelled (close with 1001 as
        best it can, run the hooks)."""
        if self._jobs is jobs:
            await self._finish()

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> bool:
        """Start ``job`` in the connection's task group; ``False`` if the connection is
        ending (no new job starts)."""
        jobs = self._jobs
        if jobs is None:
            return False
        self._live += 1
        try:
            jobs.start_soon(self._run_job, job)
        except RuntimeError:  # the task group has ended: abandon() cleans up
            self._live -= 1
            return False
        return True

    async def _run_job(self, job: Callable[[], Awaitable[None]]) -> None:
        scope = anyio.CancelScope()
        if self._cancelled:
            scope.cancel()
        scopes = self._scopes
        if scopes is None:
            scopes = self._scopes = set()
        scopes.add(scope)
        try:
            with scope:
                await job()
        except Exception:
            self.server.logger.exception("connection handler failed (%s)", self.remote_addr or "-")
            self._cancel_jobs()
            self._end_reading()
        finally:
            scopes.discard(scope)
            self._live -= 1
            if not self._live:
                self._scopes = None
                if self._read_done.is_set():
                    # The last job of a connection that reads no more: clean up.
                    with anyio.CancelScope(shield=True):
                        await self._finish()

    def _cancel_jobs(self) -> None:
        """Cancel every job of this connection; those started later start cancelled."""
        self._cancelled = True
        for scope in list(self._scopes or ()):
            scope.cancel()

    async def _end(self) -> None:
        """The job that starts once reading is over (the core connection has ended then):
        the worker gets up to ``shutdown_timeout`` to finish, then every job is cancelled."""
        grace = self.server.shutdown_timeout
        with anyio.move_on_after(grace):
            await self._worker_done.wait()
        if not self._worker_done.is_set():
            self.server.logger.warning(
                "handlers of %r still running %.1f s after the connection closed; cancelling them",
                self.user_id,
                grace,
            )
            self._cancel_jobs()

    async def _finish(self) -> None:
        """Clean up (once, run shielded): no job starts any more, later bytes are ignored,
        the connection says goodbye if it can and its hooks run."""
        if self._ending:
            return
        self._ending = True
        self._jobs = None
        if not self._read_done.is_set():  # push mode: later bytes are ignored
            self._inbox.put(_STOP)
            self._read_done.set()
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        try:
            await self._cleanup()
        finally:
            if self._on_finished is not None:
                self._on_finished(self)

    def _collect(self, now: float, *, timers: bool = True) -> Sequence[_Message]:
        """Move the core's output to the write buffer; act on its events; return the
        messages to dispatch. ``now``: the time the core was last given; ``timers=False``
        when the core's last input set no timer (the timer is not looked at then)."""
        conn = self.conn
        data = conn.data_to_send()
        if data and not self._writer.write(data):
            self._abort("send buffer full: the client is not reading")
            return ()
        messages: Sequence[_Message] = ()
        if conn._events:  # (no events() call, and no new list, when there are none)
            messages = self._on_events(conn.events(), linger=bool(data))
        if (
            (timers or self.closed_with is not None)
            and (self._timer_loop is not None or self._timer_scope is not None)
            and (self.closed_with is not None or self._timer_at > now + self._min_step)
        ):
            deadline = self._deadline()
            if self.closed_with is not None or (deadline is not None and deadline < self._timer_at):
                self._wake_timer()
        return messages

    def _on_events(self, events: list[Event], *, linger: bool) -> list[_Message]:
        """Act on the core's events; return the messages to dispatch."""
        messages: list[_Message] = []
        room = False
        for event in events:
            if isinstance(event, MessageReceived):
                messages.append(event.frame)
            elif isinstance(event, Delivered):  # the commonest next
                room = True
                if self.app.delivered_hooks:
                    self._post(event)  # the hooks are called now (hooks_item)
            elif isinstance(event, RawMessageReceived):
                messages.append(event)
            elif isinstance(event, (DeliveryFailed, MessageExpired)):
                room = True
                self._post(event)
            elif isinstance(event, ErrorReceived):
                self.server.logger.debug("client %r sent an Err frame", self.user_id)
            elif isinstance(event, Closed):
                room = True
                self._on_closed(event, linger=linger)
            elif isinstance(event, HandshakeRequested):
                # Behind a trusted proxy the client's address counts (per-address limit).
                request = self.app.client_request(event.request)
                self.remote_addr = request.remote_addr
                self._handshakes.append((request, None))
            elif isinstance(event, HttpRequested):
                self._handshakes.append((self.app.client_request(event.request), event.method))
        if room and self._room_waiters:
            self._signal_room()
        return messages

    def _deadline(self) -> float | None:
        """When the timer must wake next: the core's deadline, the credential's expiry,
        or the next revalidation."""
        deadline = self.conn.next_deadline()
        for extra in (self._expires_at, self._revalidate_at):
            if extra is not None and (deadline is None or extra < deadline):
                deadline = extra
        return deadline

    def _wake_timer(self) -> None:
        if self._timer_loop is not None:
            self._arm_timer()
            return
        scope, self._timer_scope = self._timer_scope, None
        if scope is not None:
            scope.cancel()

    def _signal_room(self) -> None:
        self._room.set()
        self._room = Flag()

    def _on_drained(self) -> None:
        if self._room_waiters:
            self._signal_room()

    def _on_closed(self, event: Closed, *, linger: bool) -> None:
        if self.closed_with is not None:
            return
        self.closed_with = event
        self._writer.closing(linger=linger)
        if not self._writer.needs_task:
            self._spawn(self._write)  # flush and close (no writer task until now)
        identity = self._identity
        if identity is not None and self._registered:
            self.server.registry.remove(identity.user_id, self.epoch)
            self.server.registry.release_receiver(identity, self._now())
            self.server.ip_closed(self.remote_addr)

    def _lost(self) -> None:
        """The socket is gone: end the core connection if it is not closed yet."""
        if not self.conn.closed:
            now = self._now()
            self.conn.receive_data(None, now)
            self._collect(now)

    def _abort(self, reason: str) -> None:
        """Cut the client off at once (slow consumer): drop its unsent bytes, close with
        1008 on our side and abort the socket."""
        self._writer.abort()
        now = self._now()
        self.conn.close(CLOSE_POLICY, reason, now)
        self.conn.receive_data(None, now)
        self.conn.data_to_send()
        self.server.logger.warning("cutting off a connection of %r: %s", self.user_id, reason)
        self._collect(now)

    # ------------------------------------------------------------------ reader
    async def _read(self) -> None:
        """The reader task (not on the lean stream)."""
        assert self._read_scope is not None
        with self._read_scope:
            await self._read_all()

    async def _read_all(self) -> None:
        stream = self._stream
        conn = self.conn
        messages: Sequence[_Message] = ()
        handed = 0
        try:
            while True:
                try:
                    data: bytes | None = await stream.receive(_READ_SIZE)
                except STREAM_ERRORS:
                    data = None
                now = self._now()
                conn.receive_data(data, now)
                messages = self._collect(now)
                handed = 0
                while handed < len(messages):
                    await self._inbox.put_message(messages[handed])
                    handed += 1
                while self._handshakes:
                    messages = await self._decide_next()
                    handed = 0
                    while handed < len(messages):
                        await self._inbox.put_message(messages[handed])
                        handed += 1
                if data is None:
                    return
        finally:
            # Cancelled while the worker was behind: the messages already acknowledged
            # are still handled; nothing follows the stop marker.
            for message in messages[handed:]:
                self._inbox.put_message_nowait(message)
            self._end_reading()

    def _end_reading(self) -> None:
        """Nothing more is read: the worker gets the stop marker, and the connection ends
        (:meth:`_end`). Once."""
        if not self._read_done.is_set():
            self._inbox.put(_STOP)
            self._read_done.set()
            if not self._cancelled:
                self._spawn(self._end)

    def _consume(self, data: bytes | None) -> None:
        """Push mode: bytes (``None``: end of stream) from the lean stream's callback."""
        if self._read_done.is_set():
            return
        if self._blocked:
            self._deferred.append(data)  # read before the pause took effect: in turn
            return
        try:
            self._feed(data)
        except Exception:
            self.server.logger.exception("connection handler failed (%s)", self.remote_addr)
            self._abort("internal error")
            self._end_reading()

    def _feed(self, data: bytes | None) -> None:
        now = self._now()
        self.conn.receive_data(data, now)
        messages = self._collect(now)
        if messages:
            self._inbox.put_messages_nowait(messages)
        if data is None:
            self._end_reading()
        elif self._handshakes:
            self._block()
            self._spawn(self._decide_in_turn)
        elif self._inbox.full:
            self._block()
            self._inbox.when_room(self._unblock)

    def _block(self) -> None:
        assert self._lean is not None
        self._blocked = True
        self._lean.pause_reading()

    def _unblock(self) -> None:
        assert self._lean is not None
        self._blocked = False
        deferred = self._deferred
        while deferred and not self._blocked and not self._read_done.is_set():
            self._consume(deferred.pop(0))
        if not self._blocked:
            self._lean.resume_reading()

    async def _decide_in_turn(self) -> None:
        """Push mode: decide the handshake (or answer the page) the bytes asked for, with
        reading paused meanwhile, then read on."""
        while self._handshakes:
            self._inbox.put_messages_nowait(await self._decide_next())
        if self._inbox.full:
            self._inbox.when_room(self._unblock)
        else:
            self._unblock()

    async def _write(self) -> None:
        await self._writer.run(self._read_done)
        # The stream is closed: nothing more to read.
        if self._read_scope is not None:
            self._read_scope.cancel()
        else:
            self._end_reading()

    # ------------------------------------------------------------------ timer
    async def _timer(self) -> None:
        """The timer as a task: sleeps on the session's clock until the next deadline."""
        clock = self.clock
        while self.closed_with is None:
            deadline = self._deadline()
            target = math.inf if deadline is None else deadline
            with anyio.CancelScope() as scope:
                self._timer_at = target
                self._timer_scope = scope
                await clock.sleep_until(target)
            self._timer_scope = None
            self._timer_at = math.inf
            if self.closed_with is not None:
                return
            self._timer_due(clock.now())
            await anyio.lowlevel.checkpoint()

    def _arm_timer(self) -> None:
        """The timer as an event-loop timer: (re)schedule it for the next deadline."""
        assert self._timer_loop is not None
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        self._timer_at = math.inf
        if self.closed_with is not None or self._jobs is None:
            return
        deadline = self._deadline()
        if deadline is not None:
            self._timer_at = deadline
            self._timer_handle = self._timer_loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer_handle = None
        self._timer_at = math.inf
        run_as_asyncio(self._timer_due, self._now())
        self._arm_timer()

    def _timer_due(self, now: float) -> None:
        """Fire what is due at ``now``: expiry, revalidation, the core's deadlines."""
        if self.closed_with is not None:
            return
        expires, revalidate = self._expires_at, self._revalidate_at
        if expires is not None and now >= expires:
            self._expires_at = None
            self.close_nowait(CLOSE_POLICY, "credential expired")
        elif revalidate is not None and now >= revalidate:
            self._revalidate_at = now + (self.app.revalidate_interval or math.inf)
            self._spawn(self._revalidate)
        else:
            deadline = self.conn.next_deadline()
            if deadline is not None and now >= deadline:
                self.conn.handle_timeout(now)
                # timeouts never dispatch: no messages come out
                self._inbox.put_messages_nowait(self._collect(now))

    # ------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        self._spawn(self._worker)
        # if it did not start, the session is ending; _cleanup runs the queued hooks

    async def _worker(self) -> None:
        inbox = self._inbox
        server = self.server
        retired = False  # its handler called unblock(): another worker took over
        try:
            while True:
                # What is queued is taken without a coroutine per item; a wait only when
                # the inbox is empty.
                item = inbox.get_nowait_or(None)
                if item is None:
                    item = await inbox.get()
                if isinstance(item, Frame):  # a route call: the commonest, inline
                    self._dispatching = item
                    try:
                        await dispatch(server, self, item)
                    finally:
                        inbox.message_done()
                        if self._dispatching is not item:
                            retired = True
                            self._unblocked_end()
                    if retired:
                        return
                    self._dispatching = None
                elif item is _STOP:
                    break
                else:
                    await self._handle(item)
            while self._unblocked:  # on_disconnect after every handler
                if self._unblocked_idle is None:
                    self._unblocked_idle = Flag()
                await self._unblocked_idle.wait()
            await self._disconnect()
        finally:
            if not retired:
                self._worker_done.set()

    def unblock(self, frame: Frame) -> bool:
        """Let the next message start before the handler of ``frame`` ends (see
        :meth:`imkit.core.server.Context.unblock`); ``False`` if it cannot: ``frame`` is
        not the message the worker is handling, :data:`MAX_UNBLOCKED` messages of this
        connection are unblocked or deferred already, or the connection is ending."""
        if self._dispatching is not frame or self._unblocked >= MAX_UNBLOCKED:
            return False
        self._dispatching = None
        self._unblocked += 1
        if not self._spawn(self._worker):  # the connection is ending: stay in order
            self._unblocked -= 1
            self._dispatching = frame
            return False
        return True

    def defer(self, frame: Frame) -> DeferredMessage | None:
        """Let the handler of ``frame`` return before the message is done (see
        :meth:`imkit.core.server.Context.defer`); ``None`` if it cannot: ``frame`` is not
        the message the worker is handling, :data:`MAX_UNBLOCKED` messages of this
        connection are unblocked or deferred already, or the connection is ending."""
        if self._dispatching is not frame or self._unblocked >= MAX_UNBLOCKED:
            return None
        if self._jobs is None:
            return None
        self._unblocked += 1
        return DeferredMessage(self, frame)

    def deferred_end(
        self, message: DeferredMessage, then: Callable[[], Awaitable[None]] | None
    ) -> None:
        """A deferred message is done; with ``then``, once ``then()`` has run in a task of
        the connection (if the connection is too far gone to start one, ``then`` is
        dropped, with a warning)."""
        if then is None:
            self._unblocked_end()
            return

        async def finish() -> None:
            try:
                await finish_deferred(self.server, self, message.frame, then)
            finally:
                self._unblocked_end()

        # Called from a callback (outside any task), anyio on asyncio must be told which
        # library runs, or it cannot start the task.
        if running_on_asyncio():
            started = run_as_asyncio(self._spawn, finish)
        else:
            started = self._spawn(finish)
        if not started:
            self.server.logger.warning(
                "the end of message %r of %r was dropped: its connection is gone",
                message.frame.id,
                self.user_id,
            )
            self._unblocked_end()

    def _unblocked_end(self) -> None:
        self._unblocked -= 1
        idle = self._unblocked_idle
        if not self._unblocked and idle is not None:
            self._unblocked_idle = None
            idle.set()

    async def _handle(self, item: _Item) -> None:
        if isinstance(item, Frame):
            try:
                await dispatch(self.server, self, item)
            finally:
                self._inbox.message_done()
        elif isinstance(item, RawMessageReceived):
            try:
                await self._raw(item.data)
            finally:
                self._inbox.message_done()
        elif not isinstance(item, _Stop):
            await delivery_hooks(self.server, self, item)

    async def _raw(self, data: str | bytes) -> None:
        handler = self.server.raw_handler
        assert handler is not None
        try:
            await handler(self, data)
        except Exception:
            self.server.logger.exception("raw handler failed (user %r)", self.user_id)
            self.close_nowait(1011, "internal error")

    # ------------------------------------------------------------------ handshake
    async def _decide_next(self) -> Sequence[_Message]:
        """Decide the oldest handshake (or answer the page) the bytes asked for; return
        the messages that came with an accepted handshake."""
        request, method = self._handshakes.pop(0)
        if method is None:
            return await self._handshake(request)
        await self._page(request, method)
        return []

    def _refuse(self, status: int, reason: str) -> None:
        if self.conn.state is ConnState.HANDSHAKE:
            self.conn.reject(status, reason)
            self._collect(self._now())

    async def _handshake(self, request: HandshakeRequest) -> Sequence[_Message]:
        server = self.server
        conn = self.conn
        decision = await decide_handshake(server, request)
        if conn.state is not ConnState.HANDSHAKE:
            return ()  # the handshake timed out, or the server began shutting down
        if isinstance(decision, Identity) and server.stopping:
            decision = (503, "server shutting down")
        if not isinstance(decision, Identity):
            self._refuse(*decision)
            return ()
        identity = decision
        now = self._now()
        app = self.app
        receiver = inbound_receiver(server, identity, now)
        # A browser that sent its credential as a ``token.<t>`` subprotocol needs that
        # subprotocol selected in the answer, or it fails the connection.
        offered = conn.request.subprotocols if conn.request is not None else ()
        conn.accept(
            identity,
            now,
            options=app.options,
            receiver=receiver,
            accepts_method=app.router.contains,
            subprotocol=next((p for p in offered if p.startswith("token.")), None),
        )
        self._identity = identity
        self.user_id, self.device_id = identity.user_id, identity.device_id
        if identity.expires_at is not None:
            self._expires_at = now + (identity.expires_at - self.clock.wall())
        if app.revalidate_interval is not None:
            self._revalidate_at = now + app.revalidate_interval
        self._wake_timer()  # new deadlines: keepalive, expiry, revalidation
        displaced = server.registry.add(identity, self.epoch, self)
        self._registered = True
        server.ip_opened(self.remote_addr)
        for old in displaced:
            old.close_nowait(CLOSE_SESSION_REPLACED, "session replaced: the user logged in again")
        if not self._spawn(self._connected):
            self._connected_done.set()  # the session is ending: no on_connect hooks
        return self._collect(now)

    async def _revalidate(self) -> None:
        """Ask the authentication again about the handshake request (see
        :func:`~imkit.transport._lifecycle.revalidate`)."""
        request = self.conn.request
        assert request is not None
        await revalidate(self.server, self, request)

    async def _connected(self) -> None:
        try:
            await announce(self.server, self)
        finally:
            self._connected_done.set()
            if self._held is not None:
                await self.release()

    async def _page(self, request: HandshakeRequest, method: str) -> None:
        response = await page_response(self.server, request, method)
        if self.conn.state is not ConnState.HANDSHAKE:
            return
        body = b"" if method == "HEAD" else response.body
        self.conn.respond(
            response.status, body, response.headers, content_type=response.content_type
        )
        self._collect(self._now())

    # ------------------------------------------------------------------ the end
    async def _disconnect(self, *, handlers: bool = True) -> None:
        """Release the user in discovery and run ``on_disconnect`` (once); before that,
        what is still queued (with ``handlers=False``, only the delivery hooks)."""
        if self._disconnected:
            return
        self._disconnected = True
        server = self.server
        if self._registered:
            with anyio.move_on_after(_HOOK_TIMEOUT):
                await self._connected_done.wait()  # on_connect hooks end before on_disconnect
        # Pushes that failed (the connection ended with them in flight) reach their hooks
        # before on_disconnect; so do the messages the last handlers left queued.
        while True:
            try:
                item = self._inbox.get_nowait()
            except anyio.WouldBlock:
                break
            if isinstance(item, (Frame, RawMessageReceived)):
                if handlers:
                    await self._handle(item)
            elif not isinstance(item, _Stop):
                await delivery_hooks(server, self, item)
        if self._identity is not None and self._registered:
            await retire(server, self)

    async def _cleanup(self) -> None:
        """Runs shielded when the session ends, even when it was cancelled."""
        conn = self.conn
        if conn.state is ConnState.OPEN and not (self._writer.aborted or self._writer.broken):
            # Cancelled from outside (the server stopped hard): say goodbye if we can.
            now = self._now()
            conn.close(CLOSE_GOING_AWAY, "server shutting down", now)
            self._collect(now)
        await self._writer.last_words()
        self._lost()
        if not self._disconnected:
            # The worker was cancelled: no handler runs any more, but the hooks still do.
            self._connected_done.set()
            await self._disconnect(handlers=False)
        self._worker_done.set()
        self._finished.set()
