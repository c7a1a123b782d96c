"""Helpers for testing imkit applications: a fake clock and an in-memory client/server pair.

Nothing here opens a socket. :class:`MemoryServer` is a real :class:`imkit.Server` whose
connections run over in-memory byte streams, and its clients are real
:class:`imkit.Client` objects: the handshake, the WebSocket framing, the ack modes, the
hooks and the close codes are exactly those of a deployed server. With a
:class:`FakeClock`, timeouts (ack resends, idle timeout, keepalive, credential expiry)
happen when the test says so, not after real waiting.

Test a route (with pytest and the anyio plugin)::

    import pytest
    import imkit
    from imkit.testing import connect_pair

    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data)

    @pytest.mark.anyio
    async def test_echo() -> None:
        async with connect_pair(app, user_id="alice") as (server, client):
            assert await client.request("echo", {"n": 1}) == {"n": 1}

Several clients on one server, and time under the test's control::

    clock = FakeClock()
    async with MemoryServer(app, clock=clock) as server:
        async with server.connect(user_id="alice") as alice:
            await clock.advance_to(clock.now() + 301)   # past the idle timeout
            ...

``InsecureDevAuth`` reads the ``userId`` query parameter that ``user_id=`` sets; for an
app on :class:`imkit.TokenAuth`, pass ``token=imkit.mint_token(secret, "alice")``.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from imkit.core.server import App
from imkit.transport.client import Client
from imkit.transport.server import Server

__all__ = (
    "DEFAULT_MEMORY_BUFFER",
    "MEMORY_SHUTDOWN_TIMEOUT",
    "FakeClock",
    "MemoryByteStream",
    "MemoryServer",
    "connect_pair",
    "memory_stream_pair",
)

DEFAULT_MEMORY_BUFFER = 16
"""Chunks (one per ``send``) a :class:`MemoryByteStream` holds before ``send`` waits."""

MEMORY_SHUTDOWN_TIMEOUT = 2.0
"""A :class:`MemoryServer`'s default ``shutdown_timeout``: short, so that a test whose
client never answers the server's close frame (on a :class:`FakeClock` the close timeout
never passes by itself) still ends quickly."""

_DEFAULT_WALL = 1_700_000_000.0  # 2023-11-14: any fixed epoch time keeps tests repeatable


class FakeClock:
    """A clock that moves only when told to; implements :class:`imkit.transport.Clock`.

    ``now()`` starts at ``start`` and ``wall()`` at ``wall``; both move together. A task
    in :meth:`sleep_until` wakes when :meth:`advance` or :meth:`advance_to` moves time to
    or past its deadline. Give the same clock to the server and its clients
    (:class:`MemoryServer` does) and to :class:`imkit.TokenAuth` as ``clock=clock.wall``.
    """

    def __init__(self, start: float = 0.0, *, wall: float = _DEFAULT_WALL) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    def now(self) -> float:
        """The fake monotonic time."""
        return self._now

    def wall(self) -> float:
        """The fake wall-clock time (seconds since the epoch)."""
        return self._now + self._wall_offset

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline a task sleeps until (``None``: nobody sleeps)."""
        return self._sleepers[0][0] if self._sleepers else None

    @property
    def sleepers(self) -> int:
        """How many tasks sleep on this clock."""
        return len(self._sleepers)

    async def sleep_until(self, deadline: float) -> None:
        """Wait until the clock reaches ``deadline`` (``math.inf``: until cancelled)."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (deadline, next(self._order), event)
        heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled: forget the sleeper
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` at once and wake every sleeper now due, in
        deadline order. The woken tasks run at the caller's next ``await``; use
        :meth:`advance_to` to let each one run at its own deadline."""
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        self._now += seconds
        self._wake_due()

    async def advance_to(self, when: float) -> None:
        """Move time to ``when`` one deadline at a time: at each deadline up to ``when``
        the sleepers due wake and every task runs until it blocks again (new deadlines
        they set before ``when`` are honoured too), then time moves on.

        "Blocks" is :func:`anyio.wait_all_tasks_blocked`: a task waiting on a thread or a
        real socket counts as blocked.
        """
        await anyio.wait_all_tasks_blocked()
        while self._sleepers and self._sleepers[0][0] <= when:
            self._now = max(self._now, self._sleepers[0][0])
            self._wake_due()
            await anyio.wait_all_tasks_blocked()
        self._now = max(self._now, when)

    async def advance_by(self, seconds: float) -> None:
        """:meth:`advance_to` ``now() + seconds``."""
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        await self.advance_to(self._now + seconds)

    def _wake_due(self) -> None:
        sleepers = self._sleepers
        while sleepers and sleepers[0][0] <= self._now:
            _deadline, _order, event = heapq.heappop(sleepers)
            event.set()


class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-memory byte stream pair (see :func:`memory_stream_pair`).

    It behaves like a TCP socket for imkit's purposes: ``send`` waits when the peer has
    ``buffer`` unread chunks (backpressure), :meth:`send_eof` half-closes, :meth:`aclose`
    closes both directions (the peer reads what was sent, then end of stream; its later
    sends fail with ``BrokenResourceError``), and :meth:`cut` drops the connection under
    both ends at once, like a network failure.
    """

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._peer: MemoryByteStream | None = None
        self._pending = b""
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether this end was closed (by :meth:`aclose` or :meth:`cut`)."""
        return self._closed

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Read at most ``max_bytes``; raises ``EndOfStream`` once the peer closed."""
        if self._closed:
            raise anyio.ClosedResourceError
        if not self._pending:
            try:
                self._pending = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise anyio.EndOfStream from None
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    async def send(self, item: bytes) -> None:
        """Write ``item``; waits while the peer's buffer is full."""
        if self._closed:
            raise anyio.ClosedResourceError
        if not item:
            await anyio.lowlevel.checkpoint()
            return
        try:
            await self._send.send(bytes(item))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            if self._closed:
                raise anyio.ClosedResourceError from None
            raise anyio.BrokenResourceError from None

    async def send_eof(self) -> None:
        """Half-close: the peer reads what was sent, then end of stream."""
        self._send.close()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close both directions of this end."""
        self._close()
        await anyio.lowlevel.checkpoint()

    def cut(self) -> None:
        """Break the connection at both ends at once (a network failure): each end reads
        what is already buffered, then end of stream, and every send fails."""
        self._close()
        if self._peer is not None:
            self._peer._send.close()
            self._peer._receive.close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send.close()
        self._receive.close()
        if self._peer is not None:
            # Like TCP: once this end is gone, what the peer sends goes nowhere; closing
            # its sending side also wakes a receive() pending on this end.
            self._peer._send.close()


def memory_stream_pair(
    buffer: int = DEFAULT_MEMORY_BUFFER,
) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected :class:`MemoryByteStream` ends; each holds ``buffer`` unread chunks."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    a = MemoryByteStream(a_send, a_receive)
    b = MemoryByteStream(b_send, b_receive)
    a._peer, b._peer = b, a
    return a, b


class MemoryServer(Server):
    """An :class:`imkit.Server` whose connections are in-memory streams.

    Use it as an async context manager: entering runs the startup hooks; leaving closes
    every connection with 1001 (like :meth:`Server.shutdown`, waiting at most
    ``shutdown_timeout`` real seconds) and runs the shutdown hooks; leaving with an
    exception cancels the connections at once. ``options`` go to :class:`imkit.Server`
    (``clock``, ``max_write_buffer``, ...).
    """

    def __init__(self, app: App, **options: Any) -> None:
        options.setdefault("shutdown_timeout", MEMORY_SHUTDOWN_TIMEOUT)
        super().__init__(app, **options)
        self.streams: list[MemoryByteStream] = []
        """The client ends of every stream opened, oldest first (to :meth:`~MemoryByteStream.cut`
        one)."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._running: AbstractAsyncContextManager[MemoryServer] | None = None

    async def __aenter__(self) -> MemoryServer:
        self._running = self._run()
        return await self._running.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        running, self._running = self._running, None
        assert running is not None
        return await running.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[MemoryServer]:
        await self.startup()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    yield self
                except BaseException:
                    tg.cancel_scope.cancel()  # the test failed: no graceful goodbyes
                    raise
                await self.drain()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self.cleanup()

    def open_stream(
        self, *, remote_addr: str = "127.0.0.1", buffer: int = DEFAULT_MEMORY_BUFFER
    ) -> MemoryByteStream:
        """Open a connection: the server serves one end, the caller gets the other (to
        write a raw HTTP request or WebSocket frames to it, or to cut it)."""
        if self._tg is None:
            raise RuntimeError("the MemoryServer is not running: use 'async with'")
        client_end, server_end = memory_stream_pair(buffer)
        self.streams.append(client_end)
        self._tg.start_soon(self.handle_stream, server_end, remote_addr)
        return client_end

    def connect(
        self,
        *,
        user_id: str | None = None,
        token: str | None = None,
        query: Mapping[str, str] | None = None,
        path: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        remote_addr: str = "127.0.0.1",
        **options: Any,
    ) -> Client:
        """A :class:`imkit.Client` of this server; use it with ``async with``.

        ``user_id`` sets the ``userId`` query parameter (what
        :class:`imkit.InsecureDevAuth` reads); ``token`` is sent as
        :class:`imkit.TokenAuth` expects. ``path`` defaults to the app's WebSocket path.
        Every reconnect opens a new stream. ``options`` go to :class:`imkit.Client`; its
        clock defaults to the server's, so with a :class:`FakeClock` its ack timers,
        keepalive and reconnect backoff wait for the test to move time too.
        """
        params = dict(query or {})
        if user_id is not None:
            params["userId"] = user_id
        if path is None:
            path = self.app.path if isinstance(self.app.path, str) else _example_path(self.app.path)
        url = "ws://imkit.test" + path + (f"?{urlencode(params)}" if params else "")

        async def open_stream() -> anyio.abc.ByteStream:
            return self.open_stream(remote_addr=remote_addr)

        options.setdefault("clock", self.clock)
        return Client(url, token=token, headers=headers, stream_factory=open_stream, **options)


def _example_path(pattern: re.Pattern[str]) -> str:
    """A path for a regex WebSocket path: the pattern itself when it is a literal."""
    literal = re.sub(r"\\(.)", r"\1", pattern.pattern)
    if pattern.fullmatch(literal):
        return literal
    raise ValueError("the app's path is a pattern: pass path= to connect()")


@asynccontextmanager
async def connect_pair(
    app: App,
    *,
    user_id: str | None = None,
    token: str | None = None,
    server_options: Mapping[str, Any] | None = None,
    **client_options: Any,
) -> AsyncIterator[tuple[MemoryServer, Client]]:
    """Run ``app`` on a :class:`MemoryServer` and connect one client to it.

    ``async with connect_pair(app, user_id="alice", clock=clock) as (server, client):``.
    ``clock`` (and the other ``server_options``) go to the server; the client shares its
    clock. The other keyword arguments go to :meth:`MemoryServer.connect`.
    """
    server_kwargs = dict(server_options or {})
    clock = client_options.pop("clock", None)
    if clock is not None:
        server_kwargs["clock"] = clock
    async with MemoryServer(app, **server_kwargs) as server:
        async with server.connect(user_id=user_id, token=token, **client_options) as client:
            yield server, client
