"""The anyio client: connect, send with acks, receive pushes, reconnect and resend.

::

    async with imkit.connect("ws://127.0.0.1:8000/ws", token=token) as client:
        await client.send("conversation.chat", {...})      # returns once acked
        answer = await client.request("conversation.list", {})
        async for frame in client:                          # pushes, acked for you
            ...

It runs on the same sans-IO core as the server (:class:`~imkit.core.conn.ClientConn`). The
client's sender and receiver outlive each connection: after a reconnect every message not
yet acknowledged is resent with its original id (the server's dedupe makes that harmless),
and a push the server resends is handed to you once.
"""

from __future__ import annotations

import math
import random
import ssl as ssl_module
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.abc
import anyio.lowlevel

from imkit.core.ack import AckMode, AckTimers, Receiver, Sender
from imkit.core.conn import ClientConn, ConnLimits, ConnState
from imkit.core.events import (
    Closed,
    Connected,
    Delivered,
    DeliveryFailed,
    ErrorReceived,
    MessageExpired,
    MessageReceived,
    Rejected,
)
from imkit.core.frames import FINAL_ERROR_CODES, ErrorCode, Frame, FrameType
from imkit.core.peer import PeerOptions
from imkit.exceptions import (
    ConnectionClosed,
    HandshakeRejected,
    RequestFailed,
)
from imkit.exceptions import (
    DeliveryFailed as DeliveryFailedError,
)
from imkit.transport._writer import STREAM_ERRORS, StreamWriter
from imkit.transport.clock import AnyioClock, Clock

__all__ = ("DEFAULT_KEEPALIVE", "Client", "StreamFactory", "connect")

StreamFactory = Callable[[], Awaitable[anyio.abc.ByteStream]]
"""Opens the byte stream a :class:`Client` speaks WebSocket over (instead of TCP)."""

DEFAULT_KEEPALIVE = 30.0
"""Seconds between application ``Ping`` frames, which keep the server's idle timer quiet."""

_FINAL_ERRORS = FINAL_ERROR_CODES  # resending the same message cannot succeed
# Close codes after which reconnecting would only repeat the refusal.
_NO_RECONNECT = frozenset({1002, 1003, 1007, 1008, 1009, 4000})
_READ_SIZE = 65536
# Unsent bytes past which the server is taken for gone: the connection is dropped and
# everything unacknowledged is resent on the next one (a server reads far faster).
_MAX_WRITE_BUFFER = 16 * 2**20


class _Waiter:
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Client:
    """A connection to an imkit (or easy-chat) server that survives reconnects.

    Use :func:`connect`. ``ack_mode`` is learned from the server unless given.
    ``reconnect`` retries with exponential backoff and jitter between
    ``reconnect_delay`` and ``max_reconnect_delay`` seconds, at most
    ``max_reconnect_attempts`` times in a row (``None``: forever); a server that refuses
    the handshake (400/401/403/404) or closes for a policy reason (1002, 1003, 1007, 1008,
    1009, 4000) is not retried.

    ``stream_factory`` replaces the TCP (or TLS) connection with any anyio byte stream
    (:func:`imkit.testing.MemoryServer.connect` uses it); the URL still gives the
    ``Host`` header and the request target. ``clock`` drives the ack timers, keepalive
    and reconnect backoff (tests pass an :class:`imkit.testing.FakeClock`).

    Pushes wait in a queue of ``max_pushes``; when it is full the client stops reading
    from the server until :meth:`receive` takes one.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        ack_mode: AckMode | str | None = None,
        timers: AckTimers | None = None,
        limits: ConnLimits | None = None,
        reconnect: bool = True,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 10.0,
        max_reconnect_attempts: int | None = None,
        connect_timeout: float = 10.0,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        max_pushes: int = 1024,
        ssl: ssl_module.SSLContext | None = None,
        clock: Clock | None = None,
        stream_factory: StreamFactory | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        self.url = url
        self._tls = parts.scheme == "wss"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        query = parts.query
        if token is not None:
            query = (
                f"{query}&{urlencode({'token': token})}" if query else urlencode({"token": token})
            )
        self._target = (parts.path or "/") + (f"?{query}" if query else "")
        self._headers = list(headers)
        self.ack_mode: AckMode | None = AckMode(ack_mode) if ack_mode is not None else None
        self._timers = timers or AckTimers()
        self._limits = limits or ConnLimits()
        self._reconnect = reconnect
        self._delay = reconnect_delay
        self._max_delay = max_reconnect_delay
        self._max_attempts = max_reconnect_attempts
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._ssl = ssl
        self._stream_factory = stream_factory
        self.clock: Clock = clock or AnyioClock()
        self._sender: Sender | None = None
        self._receiver: Receiver | None = None
        self._conn: ClientConn | None = None
        self._writer: StreamWriter | None = None
        self._timer_scope: anyio.CancelScope | None = None
        self._timer_at = math.inf
        # No input sets a deadline sooner than this from now (see ServerSession), but an
        # Err rate_limited (its retryAfter: _on_error wakes the timer) and a message
        # held for the server's rate limit (Sender.paced_until: _flush looks again).
        steps: list[float | None] = [self._timers.resend_interval, self._limits.close_timeout]
        steps += [self._limits.ping_timeout, self._limits.ping_interval, keepalive]
        self._min_step = min(step for step in steps if step is not None)
        self._acks: dict[str, _Waiter] = {}
        self._replies: dict[str, _Waiter] = {}
        self._push_in, self._push_out = anyio.create_memory_object_stream[Frame](max_pushes)
        self._connected = anyio.Event()
        self._conn_done = anyio.Event()
        self._first = _Waiter()
        self._done = False
        self._closing = False
        self._final_error: BaseException | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.connections = 0
        """How many times a connection was established (1 + reconnects)."""
        self.last_close: Closed | None = None
        """How the last connection closed (``None`` before the first one closes)."""

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Client:
        if self._tg is not None:
            raise RuntimeError("this Client is already open")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._manage)
        try:
            await self._first.wait()
        except BaseException:
            await self._exit_tasks()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            await self._exit_tasks()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (with ``code``, after the closing handshake, waiting at
        most ``close_timeout``) and stop reconnecting. Pending sends and requests fail
        with :class:`~imkit.exceptions.ConnectionClosed`; :meth:`receive` raises it.

        It may be called from any task; the client's tasks end when its ``async with``
        block does.
        """
        if self._closing:
            return
        self._closing = self._done = True
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.close(code, reason, self.clock.now())
            self._flush()
            with anyio.move_on_after(self._limits.close_timeout):
                await self._conn_done.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._fail_all(ConnectionClosed(code, reason or "client closed"))
        self._push_in.close()

    async def _exit_tasks(self) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    @property
    def connected(self) -> bool:
        """Whether a connection is open right now."""
        return self._conn is not None and self._conn.state is ConnState.OPEN

    # ------------------------------------------------------------------ sending
    def new_id(self) -> str:
        """A fresh message id."""
        return uuid.uuid4().hex

    async def send(
        self, method: str, data: Any, *, message_id: str | None = None, acked: bool = True
    ) -> Frame:
        """Send a message; return once the server acknowledged it under its ack mode
        (at once under NoAck, or with ``acked=False``).

        Raises :class:`~imkit.exceptions.DeliveryFailed` after the ack timeout,
        :class:`~imkit.exceptions.RequestFailed` if the server refused it for good.
        """
        frame_id = message_id or self.new_id()
        waiter = self._submit(method, data, frame_id, acked)
        if waiter is None:
            return Frame(FrameType.DATA, id=frame_id, method=method, data=data)
        return await waiter.wait()  # type: ignore[no-any-return]

    async def request(
        self,
        method: str,
        data: Any,
        *,
        message_id: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - a reply may never come; bound it by default
    ) -> Any:
        """Send a message and return the ``data`` of the server's reply to it.

        Raises :class:`~imkit.exceptions.RequestFailed` when the server answers with an
        ``Err`` frame, and ``TimeoutError`` when no reply comes within ``timeout`` seconds.
        """
        frame_id = message_id or self.new_id()
        reply = self._replies.setdefault(frame_id, _Waiter())
        try:
            with anyio.fail_after(timeout):
                await self._wait_connected()
                ack = self._submit(method, data, frame_id, True)
                frame: Frame = await reply.wait()
                if ack is not None and not ack.event.is_set():
                    ack.resolve(frame)
            return frame.data
        finally:
            self._replies.pop(frame_id, None)

    def _submit(self, method: str, data: Any, frame_id: str, acked: bool) -> _Waiter | None:
        if self._final_error is not None:
            raise self._final_error
        conn = self._conn
        now = self.clock.now()
        use_acks = acked and self.ack_mode is not AckMode.NONE
        waiter = self._acks.setdefault(frame_id, _Waiter()) if use_acks else None
        if conn is not None and conn.state is ConnState.OPEN:
            conn.send(method, data, now, message_id=frame_id, acked=acked)
            self._flush()
        elif self._sender is not None and acked and self._sender.mode is not AckMode.NONE:
            # Offline: track it now; it goes out when the connection is back.
            frame = Frame(FrameType.DATA, id=frame_id, method=method, data=data)
            self._sender.send(frame, now)
        else:
            self._acks.pop(frame_id, None)
            raise ConnectionClosed(1006, "not connected")
        return waiter

    async def _wait_connected(self) -> None:
        if self.ack_mode is None or self._sender is None:
            await self._connected.wait()

    # ------------------------------------------------------------------ receiving
    async def receive(self) -> Frame:
        """The next push from the server (already acknowledged for you)."""
        try:
            return await self._push_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._final_error or ConnectionClosed(1000, "client closed") from None

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Frame]:
        while True:
            try:
                yield await self.receive()
            except ConnectionClosed:
                return

    # ------------------------------------------------------------------ driving
    def _sender_for(self, mode: AckMode) -> Sender:
        if self._sender is None or self._sender.mode is not mode:
            self._sender = Sender(mode, self._timers)
        return self._sender

    def _receiver_for(self, mode: AckMode) -> Receiver:
        if self._receiver is None or self._receiver.mode is not mode:
            self._receiver = Receiver(mode, self._timers)
        return self._receiver

    async def _manage(self) -> None:
        attempts = 0
        while not self._done:
            outcome = await self._connect_once()
            if isinstance(outcome, BaseException):
                if not self._first.event.is_set():
                    self._first.fail(outcome)
                    return
                if isinstance(outcome, HandshakeRejected) and outcome.status in (
                    400,
                    401,
                    403,
                    404,
                ):
                    self._finish(outcome)
                    return
            elif outcome is not None and outcome.code in _NO_RECONNECT:
                self._finish(ConnectionClosed(outcome.code, outcome.reason))
                return
            else:
                attempts = 0 if outcome is not None else attempts
            if self._done or not self._reconnect:
                code = outcome.code if isinstance(outcome, Closed) else 1006
                reason = outcome.reason if isinstance(outcome, Closed) else str(outcome)
                self._finish(ConnectionClosed(code, reason))
                return
            attempts += 1
            if self._max_attempts is not None and attempts > self._max_attempts:
                self._finish(ConnectionClosed(1006, "gave up reconnecting"))
                return
            delay = min(self._max_delay, self._delay * 2 ** (attempts - 1))
            delay *= random.uniform(0.5, 1.0)
            await self.clock.sleep_until(self.clock.now() + delay)

    def _finish(self, error: BaseException) -> None:
        self._final_error = error
        self._done = True
        self._fail_all(error)
        self._push_in.close()

    def _fail_all(self, error: BaseException) -> None:
        for waiter in list(self._acks.values()) + list(self._replies.values()):
            waiter.fail(error)
        self._acks.clear()

    async def _connect_once(self) -> Closed | BaseException | None:
        try:
            with anyio.fail_after(self._connect_timeout):
                stream = await self._open_stream()
        except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
            return ConnectionClosed(1006, f"cannot connect: {exc}")
        conn = ClientConn(
            host=self._host_header,
            target=self._target,
            now=self.clock.now(),
            headers=self._headers,
            limits=self._limits,
            options=PeerOptions(idle_timeout=None, rate_limit=None, timers=self._timers),
            ack_mode=self.ack_mode,
            sender_factory=self._sender_for,
            receiver_factory=self._receiver_for,
        )
        read_scope = anyio.CancelScope()
        self._writer = writer = StreamWriter(
            stream,
            limit=_MAX_WRITE_BUFFER,
            close_timeout=self._limits.close_timeout,
            on_broken=read_scope.cancel,
            on_drained=_nothing,
        )
        self._conn = conn
        self._conn_done = anyio.Event()
        self._closed_event: Closed | None = None
        self._rejection: Rejected | None = None
        self._flush()  # the upgrade request
        read_done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, writer, read_done, read_scope)
                tg.start_soon(self._timer, conn)
                with read_scope:
                    await self._read(stream, conn)
                read_done.set()
                if not conn.closed:  # the stream broke or ended under us
                    conn.receive_data(None, self.clock.now())
                    self._flush()
                await self._handle_events(conn)
                self._wake_timer()
        finally:
            self._conn = None
            self._connected = anyio.Event()
            self._conn_done.set()
            with anyio.CancelScope(shield=True):
                await writer.last_words()
        if self._rejection is not None:
            rejection = self._rejection
            return HandshakeRejected(rejection.status, rejection.body)
        return self._closed_event

    async def _open_stream(self) -> anyio.abc.ByteStream:
        if self._stream_factory is not None:
            return await self._stream_factory()
        stream: anyio.abc.ByteStream = await anyio.connect_tcp(self._host, self._port)
        if self._tls:
            from anyio.streams.tls import TLSStream

            context = self._ssl or ssl_module.create_default_context()
            try:
                stream = await TLSStream.wrap(
                    stream, hostname=self._host, ssl_context=context, standard_compatible=False
                )
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        return stream

    def _flush(self) -> None:
        """Hand the core's output to the writer; wake the timer if a deadline may have
        moved earlier; notice a close."""
        conn = self._conn
        writer = self._writer
        if conn is None or writer is None:
            return
        data = conn.data_to_send()
        if data and not writer.write(data):
            writer.abort()  # the server is not reading: start over on a new connection
            conn.receive_data(None, self.clock.now())
        if conn.closed:
            writer.closing(linger=True)  # the server closes first; wait for its end
            self._wake_timer()
        elif self._timer_scope is not None:
            now = self.clock.now()
            sender = self._sender
            # A message held for the server's rate limit may be due sooner than min_step.
            if self._timer_at > now + self._min_step or (
                sender is not None and sender.paced_until > now
            ):
                deadline = conn.next_deadline()
                if deadline is not None and deadline < self._timer_at:
                    self._wake_timer()

    def _wake_timer(self) -> None:
        scope, self._timer_scope = self._timer_scope, None
        if scope is not None:
            scope.cancel()

    async def _write(
        self, writer: StreamWriter, read_done: anyio.Event, read_scope: anyio.CancelScope
    ) -> None:
        await writer.run(read_done)
        read_scope.cancel()  # the stream is closed: nothing more to read

    async def _read(self, stream: anyio.abc.ByteStream, conn: ClientConn) -> None:
        """Read until the server's end of stream (past the closing handshake)."""
        while True:
            try:
                data: bytes | None = await stream.receive(_READ_SIZE)
            except STREAM_ERRORS:
                data = None
            conn.receive_data(data, self.clock.now())
            self._flush()
            await self._handle_events(conn)
            if data is None:
                return

    async def _timer(self, conn: ClientConn) -> None:
        """Fire the core's deadlines (resends, ack timeouts, keepalive and close
        timeouts) and send application pings, even while a write is blocked."""
        clock = self.clock
        next_ping = clock.now() + self._keepalive if self._keepalive else math.inf
        while not conn.closed:
            deadline = conn.next_deadline()
            wake_at = min(deadline if deadline is not None else math.inf, next_ping)
            with anyio.CancelScope() as scope:
                self._timer_at = wake_at
                self._timer_scope = scope
                await clock.sleep_until(wake_at)
            self._timer_scope = None
            self._timer_at = math.inf
            now = clock.now()
            if conn.state is ConnState.OPEN and now >= next_ping:
                next_ping = now + (self._keepalive or math.inf)
                conn.send_frame(Frame(FrameType.PING), now)
                self._flush()
            if deadline is not None and now >= deadline:
                conn.handle_timeout(now)
                self._flush()
                await self._handle_events(conn)
            await anyio.lowlevel.checkpoint()

    async def _handle_events(self, conn: ClientConn) -> None:
        for event in conn.events():
            if isinstance(event, MessageReceived):
                frame = event.frame
                reply = self._replies.get(frame.reply_to) if frame.reply_to else None
                if reply is not None:
                    reply.resolve(frame)
                else:
                    try:
                        await self._push_in.send(frame)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        pass
            elif isinstance(event, Delivered):
                waiter = self._acks.pop(event.frame.id, None)
                if waiter is not None:
                    waiter.resolve(event.frame)
            elif isinstance(event, DeliveryFailed):
                waiter = self._acks.pop(event.frame.id, None)
                if waiter is not None:
                    waiter.fail(DeliveryFailedError(event.frame.id))
            elif isinstance(event, ErrorReceived):
                self._on_error(event.frame)
            elif isinstance(event, Connected):
                self.connections += 1
                self._connected.set()
                self._first.resolve(None)
                if self.ack_mode is None:
                    self.ack_mode = conn.ack_mode
            elif isinstance(event, Rejected):
                self._rejection = event
            elif isinstance(event, Closed):
                self._closed_event = event
                if self._rejection is None:
                    self.last_close = event
            elif isinstance(event, MessageExpired):
                pass  # the server will resend; nothing was dispatched

    def _on_error(self, frame: Frame) -> None:
        data = frame.data if isinstance(frame.data, dict) else {}
        code = str(data.get("code", ""))
        message = str(data.get("message", ""))
        error = RequestFailed(code, message, frame.id)
        if code == ErrorCode.RATE_LIMITED:
            # The core moved the message's resend to its retryAfter, maybe sooner than
            # the resend interval (the one input that can): the timer looks again.
            self._wake_timer()
        if code not in _FINAL_ERRORS:
            # Rate limited, store unavailable, expired...: while the message is not yet
            # acknowledged, the sender's resend retries it. Once it is acknowledged the
            # server has taken it and nothing resends it: the request fails with the code,
            # and the caller decides (ChatClient resends under the same msgId).
            reply = self._replies.get(frame.id)
            if reply is not None and frame.id not in self._acks:
                self._replies.pop(frame.id, None)
                reply.fail(error)
            return
        for table in (self._acks, self._replies):
            waiter = table.pop(frame.id, None)
            if waiter is not None:
                waiter.fail(error)


def _nothing() -> None:
    """A callback that does nothing."""


def connect(url: str, **options: Any) -> Client:
    """Open a client: ``async with connect(url, token=...) as client: ...``.

    See :class:`Client` for the options.
    """
    return Client(url, **options)
