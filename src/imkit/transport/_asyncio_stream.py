"""A lean socket stream for the server on asyncio.

anyio's asyncio socket stream is general and safe, and on a server that reads small
frames and writes small answers on many connections its costs dominate: it stops
reading after every chunk and starts again before the next ``receive`` (two ``epoll_ctl``
calls per read), yields to the event loop before every ``send``, and makes every write
wait for an empty kernel buffer.

:class:`AsyncioSocketStream` is an :class:`anyio.abc.SocketStream` and an
:class:`asyncio.BufferedProtocol` in one object:

* the socket is read into one buffer per thread that every connection shares (the
  protocol callbacks run one at a time), and only the bytes received are copied out: a
  plain protocol would have a 256 KiB ``bytes`` made, shrunk and freed per read (three
  system calls: ``mmap``, ``mremap``, ``munmap``);

* the socket stays readable until ``max_read_buffer`` bytes wait unread (then reading
  pauses: TCP pushes back on the client), and ``receive`` returns buffered bytes at once;
* :meth:`write_soon` queues bytes and writes everything queued in one call per event-loop
  iteration, so the frames a connection produced meanwhile leave in one system call;
* :attr:`write_buffered` counts what is queued and what the kernel has not taken yet, and
  ``on_drained`` is called when that falls to half of ``write_limit`` or below.

The server uses it on asyncio for plain TCP connections (:func:`accept_stream`); TLS and
trio go through anyio's own streams.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute


def _library_cvar() -> ContextVar[str | None] | None:
    try:
        import sniffio
    except ImportError:  # pragma: no cover - anyio then finds asyncio by its running loop
        return None
    return sniffio.current_async_library_cvar


_LIBRARY = _library_cvar()

T = TypeVar("T")
R = TypeVar("R")

__all__ = (
    "DEFAULT_MAX_READ_BUFFER",
    "AsyncioSocketStream",
    "OutputProducer",
    "accept_stream",
    "run_as_asyncio",
    "running_on_asyncio",
)

DEFAULT_MAX_READ_BUFFER = 256 * 1024
"""Unread bytes at which a connection stops reading from its socket."""

_RECEIVE_SIZE = 256 * 1024  # the most one read takes from a socket
_buffers = threading.local()


def _receive_buffer() -> memoryview:
    """This thread's receive buffer: protocol callbacks run one at a time on a thread, and
    each takes its bytes out before returning, so every connection of the loop shares it."""
    try:
        view: memoryview = _buffers.view
    except AttributeError:
        view = _buffers.view = memoryview(bytearray(_RECEIVE_SIZE))
    return view


def _ignore() -> None:
    pass


class OutputProducer(Protocol):
    """What :meth:`AsyncioSocketStream.produce_soon` calls back."""

    def produce_output(self) -> None:
        """Queue the bytes made since the last call (with ``write_soon``)."""


class _Flusher:
    """Writes what the streams of one event loop queued, in one callback per loop
    iteration for all of them (a callback each costs a handle made and run each)."""

    __slots__ = ("_loop", "_streams", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._streams: list[AsyncioSocketStream] = []
        self.time = _loop_clock(loop)
        """The loop's clock, bound once for all its streams."""

    def add(self, stream: AsyncioSocketStream) -> None:
        """Flush ``stream`` soon (this loop iteration), after those added before it."""
        streams = self._streams
        streams.append(stream)
        if len(streams) == 1:
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            try:
                stream._flush()
            except Exception as exc:  # noqa: BLE001 - reported as asyncio does; the rest flush
                self._loop.call_exception_handler(
                    {"message": "flushing a connection failed", "exception": exc}
                )


def _loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, or what it calls: asyncio's own loops read ``time.monotonic()``
    through a Python method (a call more per read, several reads per message); a loop
    that defines its own clock (uvloop) keeps it."""
    if getattr(loop.time, "__func__", None) is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


def _flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    """The flusher of ``loop``: one per thread, for the loop running there (a thread runs
    one loop at a time; a stream keeps the flusher it got)."""
    flusher: _Flusher | None = getattr(_buffers, "flusher", None)
    if flusher is None or flusher._loop is not loop:
        flusher = _buffers.flusher = _Flusher(loop)
    return flusher


class AsyncioSocketStream(anyio.abc.SocketStream, asyncio.BufferedProtocol):
    """One accepted TCP connection on asyncio (see the module docstring).

    ``on_drained`` may be set by the writer; it is called (with no argument) when the
    unwritten bytes fall to half of ``write_limit`` or below after having been queued.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_read_buffer: int = DEFAULT_MAX_READ_BUFFER,
    ) -> None:
        self._flusher = _flusher(loop)  # and the loop (few attributes: an idle connection
        # keeps every one)
        self._buffer = _receive_buffer()
        self._transport: asyncio.Transport | None = None
        self._max_read_buffer = max_read_buffer
        self._chunks: list[bytes] = []  # few: a list is lighter than a deque
        self._unread = 0
        self._reading_paused = False
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._closed = False
        self._reader: asyncio.Future[None] | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_limit: float = math.inf
        self._consumer: Callable[[bytes | None], None] | None = None
        self._consumer_ended = False
        self.on_drained: Callable[[], None] = _ignore
        """Called when the unwritten bytes fall to half of the write limit or below."""
        self.producer: OutputProducer | None = None
        """Who queues its bytes just before the next flush (:meth:`produce_soon`)."""

    # ------------------------------------------------------------------ asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio: the socket is connected."""
        # Not always an asyncio.Transport subclass (uvloop's are not), but one in kind.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        """asyncio: where to read the socket into (the thread's shared buffer)."""
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        """asyncio: ``nbytes`` arrived in the buffer."""
        self.data_received(bytes(self._buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """Take bytes that arrived."""
        if self._consumer is not None:
            self._call_consumer(data)
            return
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread >= self._max_read_buffer and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        """asyncio: the client closed its sending side; keep ours open."""
        self._eof = True
        self._wake_reader()
        self._end_consumer()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio: the socket is closed."""
        self._lost = True
        if exc is not None and self._error is None:
            self._error = exc
        self._pending.clear()
        self._pending_bytes = 0
        self._wake_reader()
        self._wake_drain()
        self._end_consumer()

    def pause_writing(self) -> None:
        """asyncio: the kernel and the transport hold more than the high-water mark."""
        self._writing_paused = True

    def resume_writing(self) -> None:
        """asyncio: the transport's buffer fell to the low-water mark."""
        self._writing_paused = False
        self._wake_drain()
        self.on_drained()

    def _end_consumer(self) -> None:
        if self._consumer is not None and not self._consumer_ended:
            self._consumer_ended = True
            self._call_consumer(None)

    def _call_consumer(self, data: bytes | None) -> None:
        consumer = self._consumer
        assert consumer is not None
        run_as_asyncio(consumer, data)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this connection lives in."""
        return self._flusher._loop

    @property
    def time(self) -> Callable[[], float]:
        """The event loop's ``time`` (one bound method for all the loop's streams)."""
        return self._flusher.time

    # ------------------------------------------------------------------ consuming
    def consume(self, consumer: Callable[[bytes | None], None]) -> None:
        """Hand every chunk received from now on straight to ``consumer``, from the event
        loop's callback, instead of keeping it for :meth:`receive`; ``None`` at the end
        of the stream (end of file, or the socket lost). Chunks already buffered go first.

        ``consumer`` runs inside asyncio's protocol callback: it must not raise and must
        not block; it calls :meth:`pause_reading` when it cannot take more.
        """
        self._consumer = consumer
        chunks = self._chunks
        if chunks:
            data = b"".join(chunks)
            chunks.clear()
            self._unread = 0
            self._call_consumer(data)
        if self._reading_paused:
            self._reading_paused = False
            self.resume_reading()
        if self._eof or self._lost:
            self._end_consumer()

    def pause_reading(self) -> None:
        """Stop reading from the socket (the consumer is full)."""
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.is_reading():
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        transport = self._transport
        if transport is not None and not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()

    def _wake_reader(self) -> None:
        waiter = self._reader
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ writing
    def set_write_limit(self, limit: int) -> None:
        """Call ``on_drained`` when the unwritten bytes fall to ``limit // 2`` or below."""
        assert self._transport is not None
        self._write_limit = limit
        self._transport.set_write_buffer_limits(high=limit // 2, low=limit // 2)

    @property
    def write_buffered(self) -> int:
        """Bytes queued or written to the transport but not yet taken by the kernel."""
        transport = self._transport
        size = transport.get_write_buffer_size() if transport is not None else 0
        return self._pending_bytes + size

    @property
    def unread(self) -> int:
        """Bytes received and not yet taken by :meth:`receive`."""
        return self._unread

    @property
    def reading_paused(self) -> bool:
        """Whether reading from the socket is paused (``max_read_buffer`` reached)."""
        return self._reading_paused

    @property
    def lost(self) -> bool:
        """Whether the socket is closed (by either end, or by an error)."""
        return self._lost

    def write_soon(self, data: bytes) -> bool:
        """Queue ``data``; everything queued is written in one call, soon (this loop
        iteration). Bytes queued after the socket is lost are dropped.

        Returns whether :attr:`write_buffered` is still within the limit given to
        :meth:`set_write_limit` (always, without one).
        """
        if self._lost or self._closed:
            return True
        self._pending.append(data)
        pending = self._pending_bytes = self._pending_bytes + len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flusher.add(self)
        # While writing is not paused the transport holds at most its high-water mark
        # (set_write_limit makes that half the limit): no need to ask it how much.
        if pending * 2 <= self._write_limit and not self._writing_paused:
            return True
        return self.write_buffered <= self._write_limit

    def produce_soon(self, producer: OutputProducer) -> None:
        """Have ``producer.produce_output()`` called soon (this loop iteration), just
        before the bytes queued here are written: it queues its own then, once, however
        many messages it made in between. A no-op while a producer is due."""
        if self.producer is None:
            self.producer = producer
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._flusher.add(self)

    def _produce(self) -> None:
        producer = self.producer
        if producer is not None:
            self.producer = None
            producer.produce_output()

    def discard_pending(self) -> None:
        """Drop the bytes queued by :meth:`write_soon` and not yet written."""
        self._pending.clear()
        self._pending_bytes = 0

    def _flush(self) -> None:
        # (Still marked scheduled: what the producer queues is written now, not again.)
        self._produce()
        self._flush_scheduled = False
        self._write_pending()
        if self._pending_bytes == 0 and not self._writing_paused:
            self.on_drained()

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        transport = self._transport
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_bytes = 0
        if transport is None or self._lost or transport.is_closing():
            return
        transport.write(data)

    async def _drained(self) -> None:
        """Wait for the transport's next resume_writing (or the socket's loss)."""
        waiter = self._drain_waiter = self._flusher._loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    async def wait_flushed(self) -> None:
        """Wait until every queued byte was taken by the kernel.

        Raises :class:`anyio.BrokenResourceError` if the socket is lost first.
        """
        self._produce()
        self._write_pending()
        transport = self._transport
        assert transport is not None
        # A write limit of 0: the transport reports (resume_writing) once it is empty.
        transport.set_write_buffer_limits(high=0, low=0)
        while transport.get_write_buffer_size() > 0:
            if self._lost:
                raise anyio.BrokenResourceError from self._error
            await self._drained()
        if self._lost and self._error is not None:
            raise anyio.BrokenResourceError from self._error

    # ------------------------------------------------------------------ anyio ByteStream
    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Return buffered bytes at once, else wait for some (anyio semantics)."""
        chunks = self._chunks
        while not chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._lost and self._error is not None:
                raise anyio.BrokenResourceError from self._error
            if self._eof or self._lost:
                raise anyio.EndOfStream
            waiter = self._reader = self._flusher._loop.create_future()
            try:
                await waiter
            finally:
                self._reader = None
        chunk = chunks.pop(0)
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            chunks.insert(0, rest)
        self._unread -= len(chunk)
        if self._reading_paused and self._unread < self._max_read_buffer // 2:
            self._reading_paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        return chunk

    async def send(self, item: bytes) -> None:
        """Write ``item`` (after anything queued), waiting while the kernel is full."""
        if self._closed:
            raise anyio.ClosedResourceError
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise anyio.BrokenResourceError from self._error
        self._write_pending()
        transport.write(item)
        while self._writing_paused and not self._lost:
            await self._drained()
        if self._lost and self._error is not None:
            raise anyio.BrokenResourceError from self._error

    async def send_eof(self) -> None:
        """Close the sending side once the queued bytes are written."""
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise anyio.BrokenResourceError from self._error
        self._write_pending()
        transport.write_eof()

    async def aclose(self) -> None:
        """Close the socket: at once if nothing is left to write, else drop what is left
        (a reset where ``SO_LINGER`` says so)."""
        if self._closed:
            return
        self._closed = True
        self._wake_reader()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._pending or transport.get_write_buffer_size():
            self.discard_pending()
            transport.abort()
        else:
            transport.close()

    @property
    def _raw_socket(self) -> socket.socket:
        assert self._transport is not None
        sock: socket.socket = self._transport.get_extra_info("socket")
        return sock

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """anyio typed attributes: the raw socket and the addresses."""
        transport = self._transport
        assert transport is not None
        sock: socket.socket = transport.get_extra_info("socket")
        return {
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.local_address: lambda: sock.getsockname(),
            SocketAttribute.local_port: lambda: sock.getsockname()[1],
            SocketAttribute.remote_address: lambda: transport.get_extra_info("peername"),
            SocketAttribute.remote_port: lambda: transport.get_extra_info("peername")[1],
        }


def run_as_asyncio(function: Callable[[T], R], argument: T) -> R:
    """Call ``function(argument)`` from an asyncio callback (a protocol method, a
    ``call_at`` timer) as asyncio code: outside any task, sniffio (which anyio asks)
    cannot tell which library is running, and anyio calls would fail. Returns what
    ``function`` returns."""
    if _LIBRARY is None:  # pragma: no cover - see _library_cvar
        return function(argument)
    token = _LIBRARY.set("asyncio")
    try:
        return function(argument)
    finally:
        _LIBRARY.reset(token)


def running_on_asyncio() -> bool:
    """Whether the calling code runs in an asyncio event loop (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def accept_stream(listener: anyio.abc.SocketListener) -> AsyncioSocketStream:
    """Accept one connection from an anyio TCP listener, as an :class:`AsyncioSocketStream`.

    Must run on asyncio. Raises ``OSError`` as ``accept()`` does (``EMFILE``...).
    """
    loop = asyncio.get_running_loop()
    raw: socket.socket = listener.extra(SocketAttribute.raw_socket)
    client, _addr = await loop.sock_accept(raw)
    try:
        if client.family in (socket.AF_INET, socket.AF_INET6):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = AsyncioSocketStream(loop)
        await loop.connect_accepted_socket(lambda: stream, client)
    except BaseException:
        client.close()
        raise
    return stream
