"""The write side of one server connection: a buffer that never blocks its producers, and
the task that drains it into the socket.

Producers (the session, on behalf of handlers and fan-out) call :meth:`StreamWriter.write`,
which only appends to a buffer; :meth:`StreamWriter.run` writes it out. Past ``limit``
unsent bytes the connection is cut off (:meth:`StreamWriter.abort`: the unsent bytes are
dropped and the socket is reset), so one client that stops reading costs bounded memory
and never delays anyone else.

How the stream ends, once the session calls :meth:`StreamWriter.closing`:

* what is buffered (a close frame, an HTTP answer) is flushed within ``close_timeout``;
* with ``linger`` the writer half-closes and waits up to ``close_timeout`` for the client
  to close its end (so the client reads everything: closing with unread input would reset
  the connection), then closes; without it (nothing left for the client to read) it
  closes at once;
* a write that fails or does not finish in time leaves the stream unusable: it is reset.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from imkit.transport._asyncio_stream import AsyncioSocketStream
from imkit.transport._sync import Flag

__all__ = ("STREAM_ERRORS", "StreamWriter", "abort_stream")

STREAM_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)
"""What a socket (or TLS, or in-memory) stream raises when the peer is gone."""


class StreamWriter:
    """Buffers and writes one connection's outgoing bytes.

    ``on_broken`` is called (once) when a write fails: the peer is gone. ``on_drained`` is
    called when the buffer falls under half of ``limit`` after a write, for producers
    waiting for room.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        limit: int,
        close_timeout: float,
        on_broken: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        self.stream = stream
        # On asyncio's lean stream, writes go straight to the stream, which writes what a
        # loop iteration produced in one call: no task wakes up per write.
        self._direct = stream if isinstance(stream, AsyncioSocketStream) else None
        if self._direct is not None:
            self._direct.set_write_limit(limit)
            self._direct.on_drained = on_drained
        self.limit = limit
        self.close_timeout = close_timeout
        self._on_broken = on_broken
        self._on_drained = on_drained
        self._buffer = bytearray()
        self._wake: anyio.Event | None = None
        self._send_scope: anyio.CancelScope | None = None
        self._deadline = math.inf
        self._closing = False
        self._linger = False
        self.aborted = False
        """Whether the connection was cut off (:meth:`abort`)."""
        self.broken = False
        """Whether a write failed or was cut short: the stream is unusable."""
        self.closed = False
        """Whether the stream is closed."""

    @property
    def needs_task(self) -> bool:
        """Whether :meth:`run` must run for the whole connection. On the lean asyncio
        stream writes need no task: :meth:`run` is needed only once :meth:`closing` or
        :meth:`abort` was called, to flush and close."""
        return self._direct is None

    @property
    def buffered(self) -> int:
        """Bytes waiting to be written."""
        if self._direct is not None:
            return self._direct.write_buffered
        return len(self._buffer)

    def write(self, data: bytes) -> bool:
        """Queue ``data``; ``False`` once the buffer passes the limit: the caller must
        then :meth:`abort`."""
        if self.aborted or self.broken:
            return True  # the bytes go nowhere; the connection is already ending
        direct = self._direct
        if direct is not None:
            return direct.write_soon(data)  # its write limit is ours
        self._buffer += data
        if len(self._buffer) > self.limit:
            return False
        self._notify()
        return True

    def closing(self, *, linger: bool) -> None:
        """The connection is closed: flush what is left within ``close_timeout``, then
        close the stream (after waiting for the client's end of stream if ``linger``)."""
        if self._closing:
            return
        self._closing = True
        self._linger = linger
        self._deadline = anyio.current_time() + self.close_timeout
        if self._send_scope is not None:
            self._send_scope.deadline = min(self._send_scope.deadline, self._deadline)
        self._notify()

    def abort(self) -> None:
        """Cut the connection off: drop the unsent bytes, stop a write in progress, and
        reset the socket."""
        self.aborted = True
        self._buffer.clear()
        if self._direct is not None:
            self._direct.discard_pending()
        if self._send_scope is not None:
            self._send_scope.cancel()
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    async def run(self, read_done: Flag | anyio.Event) -> None:
        """Write until the connection is closed and flushed, then close the stream.
        ``read_done`` is set once the reader saw the client's end of stream."""
        while not (self.broken or self.aborted):
            if self._buffer:
                await self._send()
                continue
            if self._closing:
                break
            wake = self._wake = anyio.Event()
            await wake.wait()
        await self._close(read_done)

    async def _send(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        with anyio.CancelScope(deadline=self._deadline) as scope:
            self._send_scope = scope
            try:
                await self.stream.send(data)
            except STREAM_ERRORS:
                self.broken = True
        self._send_scope = None
        if scope.cancelled_caught:
            self.broken = True  # a write cut short leaves the stream unusable
        if self.broken:
            self._buffer.clear()
            self._on_broken()
        elif len(self._buffer) < self.limit // 2:
            self._on_drained()

    async def _flush_direct(self, direct: AsyncioSocketStream) -> None:
        """Wait (until the close deadline) for the lean stream to write everything."""
        with anyio.CancelScope(deadline=self._deadline):
            try:
                await direct.wait_flushed()
            except STREAM_ERRORS:
                self.broken = True
            return
        self.broken = True  # not flushed in time: the rest is dropped

    async def _close(self, read_done: Flag | anyio.Event) -> None:
        self.closed = True
        if self._direct is not None and not (self.aborted or self.broken):
            await self._flush_direct(self._direct)
        if self.aborted or self.broken or self._buffer:
            await abort_stream(self.stream)
        elif not self._linger:
            await anyio.aclose_forcefully(self.stream)
        else:
            with anyio.move_on_after(self.close_timeout):
                try:
                    await self.stream.send_eof()
                except (NotImplementedError, *STREAM_ERRORS):
                    pass
                await read_done.wait()
            await anyio.aclose_forcefully(self.stream)

    async def last_words(self) -> None:
        """Best effort, for a connection cancelled from outside: write what is buffered
        (within one second), then close the stream."""
        if self.closed:
            return
        self.closed = True
        if self.aborted or self.broken:
            await abort_stream(self.stream)
            return
        if self._buffer:
            with anyio.move_on_after(1):
                try:
                    await self.stream.send(bytes(self._buffer))
                except STREAM_ERRORS:
                    pass
            self._buffer.clear()
        if self._direct is not None:
            with anyio.move_on_after(1):
                try:
                    await self._direct.wait_flushed()
                except STREAM_ERRORS:
                    pass
        await anyio.aclose_forcefully(self.stream)


async def abort_stream(stream: anyio.abc.ByteStream) -> None:
    """Close ``stream`` at once, dropping unsent data (a TCP reset where possible)."""
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    await anyio.aclose_forcefully(stream)
