"""The anyio server: listeners, connections, fan-out, forwards, graceful shutdown.

Use :func:`serve` inside your own task group (``port = await tg.start(serve, app)``), or
:func:`run` from a script. Both run on asyncio (with uvloop when it is installed) and on
trio.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import math
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute, TaskStatus

from imkit.core.frames import Frame, FrameType
from imkit.core.interfaces import Forward, HandshakeRequest, SingleNode
from imkit.core.server import App, Registry, Session
from imkit.exceptions import DiscoverError
from imkit.transport._asyncio_stream import accept_stream, running_on_asyncio
from imkit.transport._gc import (
    DEFAULT_GC_THRESHOLD,
    check_gc_threshold,
    young_generation_threshold,
)
from imkit.transport._sync import Slots
from imkit.transport.clock import AnyioClock, Clock
from imkit.transport.session import ServerSession

__all__ = (
    "DEFAULT_GC_THRESHOLD",
    "DEFAULT_MAX_QUEUED_MESSAGES",
    "DEFAULT_MAX_WRITE_BUFFER",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "RawHandler",
    "Server",
    "run",
    "serve",
)

# Precedents: websockets' max_queue=16 (received messages waiting for the app) and its
# write_limit; 4 MiB of unsent bytes is ~40,000 chat messages of 100 bytes.
DEFAULT_MAX_QUEUED_MESSAGES = 64
DEFAULT_MAX_WRITE_BUFFER = 4 * 2**20
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_ACCEPT_BACKOFF_MAX = 1.0
_PUSHES_PER_YIELD = 64

RawHandler = Callable[[ServerSession, "str | bytes"], Awaitable[None]]
"""A raw-mode handler: called with the session and each whole message, in order."""


class Server:
    """Runs an :class:`~imkit.core.server.App`; implements the handlers' ``ServerAPI``.

    ``raw_handler`` turns the server into a plain WebSocket server: the app's
    authentication, path, origins and limits still decide the handshake, but no IM
    framing is spoken; each text (``str``) or binary (``bytes``) message goes to
    ``raw_handler(session, data)``, which answers with ``session.send_raw(data)``. The
    app's routes are then unused. See ``examples/echo_server.py``.

    While :meth:`serve` runs, the garbage collector's young-generation threshold is at
    least ``gc_threshold`` (CPython's default, 700, makes a loaded server spend ~10 % of
    its CPU in the collector: see ``imkit.transport._gc``); the value found is put back
    when the process' last server stops. ``gc_threshold=None`` leaves the collector as it
    is (the setting is process-wide; :func:`gc.set_threshold`).
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
        raw_handler: RawHandler | None = None,
        gc_threshold: int | None = DEFAULT_GC_THRESHOLD,
    ) -> None:
        check_gc_threshold(gc_threshold)
        self.app = app
        self.raw_handler = raw_handler
        self.clock: Clock = clock or AnyioClock()
        self.max_queued_messages = max_queued_messages
        self.max_write_buffer = max_write_buffer
        self.shutdown_timeout = shutdown_timeout
        self.gc_threshold = gc_threshold
        self.logger = logger or app.logger
        self.registry: Registry[ServerSession] = Registry(app.login_policy)
        self.handler_limiter = Slots(app.max_concurrent_handlers)
        """The server-wide limit on handlers running at once (``max_concurrent_handlers``)."""
        self.single_node = isinstance(app.discover, SingleNode)
        self.port: int | None = None
        self.stopping = False
        self.authenticating = 0  # handshakes in decide_handshake's authentication
        self._per_ip: Counter[str] = Counter()
        self._unyielded = 0  # pushes since send_to_users last yielded
        self._press_at = max_write_buffer // 8  # unsent bytes that make it yield at once
        self._pressed = False  # a push passed _press_at since send_to_users last yielded
        self._sessions: set[ServerSession] = set()
        self._stop = anyio.Event()
        self._started = False

    # ------------------------------------------------------------------ ServerAPI
    @property
    def node_id(self) -> str:
        """This node's id (from the discovery backend)."""
        return self.app.discover.node_id

    def sessions(self, user_id: str) -> list[Session]:
        """The user's live connections on this node."""
        return list(self.registry.live(user_id))

    def push_here(
        self, user_ids: Sequence[str], method: str, data: Any, *, form_id: str = ""
    ) -> int:
        """Push to every connection of each user on this node, at once (the local part of
        :meth:`send_to_users`; it never waits and never reaches another node). Returns
        the number of connections reached."""
        reached = 0
        registry = self.registry
        for user_id in user_ids:
            for session in registry.live(user_id):
                session.deliver(method, data, form_id=form_id)
                reached += 1
        return reached

    def note_unsent(self, unsent: int) -> None:
        """What a session tells as its messages reach its write buffer (on the lean
        asyncio stream once per loop iteration, elsewhere per message): with more than an
        eighth of ``max_write_buffer`` unsent, the next :meth:`send_to_users` yields, so
        that the writers run."""
        if unsent > self._press_at:
            self._pressed = True

    async def send_to_users(
        self,
        user_ids: Sequence[str],
        method: str,
        data: Any,
        *,
        form_id: str = "",
        here: bool = True,
    ) -> int:
        """Push to every connection of each user here, and forward to the nodes that hold
        the others. Returns the number of local connections and remote nodes reached.

        It never waits for a recipient: each push goes to the connection's write buffer
        (a connection whose buffer passes ``max_write_buffer`` is cut off, its pushes fail
        with ``on_delivery_failed``). It yields, so that the writers run between the
        pushes of a handler that sends many in a loop, when a recipient's unsent bytes
        pass an eighth of ``max_write_buffer``, and at least once every
        ``_PUSHES_PER_YIELD`` pushes (a yield on every call would cost a trip through
        the event loop per message, and split the writes that one loop iteration batches).
        ``here=False`` leaves out this node's connections (:meth:`push_here` reached them).
        """
        reached = 0
        if here:
            reached = self.push_here(user_ids, method, data, form_id=form_id)
            self._unyielded += reached or 1
            if self._pressed or self._unyielded >= _PUSHES_PER_YIELD:
                self._pressed = False
                self._unyielded = 0
                await anyio.lowlevel.checkpoint()
        if self.single_node or not user_ids:
            return reached
        discover = self.app.discover
        try:
            located = await discover.locate(list(user_ids))
        except DiscoverError as exc:
            self.logger.warning("could not locate users for a push: %s", exc)
            return reached
        me = self.node_id
        frame = Frame(FrameType.DATA, method=method, form_id=form_id, data=data)
        for user_id, bindings in located.items():
            for node in sorted({b.node_id for b in bindings if b.node_id != me}):
                try:
                    await discover.forward(node, Forward("push", user_id, me, frame=frame))
                    reached += 1
                except DiscoverError as exc:
                    self.logger.warning("push to %r via node %r failed: %s", user_id, node, exc)
        return reached

    async def online(self, user_ids: Sequence[str]) -> set[str]:
        """Which of ``user_ids`` are connected here or on another node."""
        here = {u for u in user_ids if self.registry.is_online(u)}
        rest = [u for u in user_ids if u not in here]
        if self.single_node or not rest:
            return here
        try:
            located = await self.app.discover.locate(rest)
        except DiscoverError as exc:
            self.logger.warning("could not locate users: %s", exc)
            return here
        return here | {u for u, bindings in located.items() if bindings}

    async def on_forward(self, message: Forward) -> None:
        """Handle a message another node forwarded here."""
        if message.kind == "push" and message.frame is not None:
            frame = message.frame
            for session in self.registry.connections(message.user_id):
                session.deliver(frame.method, frame.data, form_id=frame.form_id)
        elif message.kind == "kick":
            for session in self.registry.connections(message.user_id):
                if session.epoch == message.epoch:
                    session.close_nowait(4000, "session replaced: the user logged in elsewhere")
        else:
            self.logger.warning("ignoring a forward of unknown kind %r", message.kind)

    # ------------------------------------------------------------------ admission
    def admission(self, request: HandshakeRequest) -> tuple[int, str] | None:
        """Refuse a handshake before authentication: shutting down, or too many per IP."""
        if self.stopping:
            return 503, "server shutting down"
        addr = request.remote_addr
        if addr and self._per_ip[addr] >= self.app.max_connections_per_ip:
            return 429, "too many connections from this address"
        return None

    def ip_opened(self, addr: str) -> None:
        """Count an accepted connection from ``addr``."""
        if addr:
            self._per_ip[addr] += 1

    def ip_closed(self, addr: str) -> None:
        """Forget an accepted connection from ``addr``."""
        if addr:
            self._per_ip[addr] -= 1
            if self._per_ip[addr] <= 0:
                del self._per_ip[addr]

    # ------------------------------------------------------------------ running
    async def startup(self) -> None:
        """Freeze the routes, start discovery and run the startup hooks (once)."""
        if self._started:
            return
        self._started = True
        self.app.router.freeze()
        await self.app.discover.start(self.on_forward)
        for hook in self.app.startup_hooks:
            await hook(self)

    async def cleanup(self) -> None:
        """Stop discovery and run the shutdown hooks."""
        for hook in self.app.shutdown_hooks:
            try:
                await hook(self)
            except Exception:
                self.logger.exception("a shutdown hook failed")
        try:
            await self.app.discover.stop()
        except DiscoverError as exc:
            self.logger.warning("discovery did not stop cleanly: %s", exc)

    @property
    def connection_count(self) -> int:
        """How many sockets this server is serving (handshakes in progress included)."""
        return len(self._sessions)

    async def handle_stream(self, stream: anyio.abc.ByteStream, remote_addr: str = "") -> None:
        """Serve one connection over ``stream`` (any anyio byte stream: a socket, TLS, or
        :class:`imkit.testing.MemoryByteStream`) until it closes. ``remote_addr`` is the
        client's IP address, for the per-address limit and the logs.

        It never raises for what the client does; a bug is logged ("connection handler
        failed") and ends only this connection.
        """
        session = ServerSession(self, stream, remote_addr)
        self._sessions.add(session)
        try:
            await session.run()
        except Exception:
            self.logger.exception("connection handler failed (%s)", remote_addr or "-")
        finally:
            self._sessions.discard(session)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl: Any = None,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` until :meth:`shutdown` (or cancelled); reports the bound
        port through ``task_status``.

        After :meth:`shutdown` it stops listening (new connections are refused), closes
        every connection with 1001 (a handshake in progress gets HTTP 503), waits up to
        ``shutdown_timeout`` for them, runs the shutdown hooks and returns. Cancelled from
        outside, it closes the connections with 1001 as best it can, without waiting.
        """
        listener: anyio.abc.Listener[Any] = await anyio.create_tcp_listener(
            local_host=host, local_port=port
        )
        sockets = getattr(listener, "listeners", [listener])
        self.port = sockets[0].extra(SocketAttribute.local_port)
        connections: anyio.abc.TaskGroup | None = None
        with young_generation_threshold(self.gc_threshold):
            try:
                await self.startup()
                async with anyio.create_task_group() as connections:
                    async with anyio.create_task_group() as accepting:
                        for sock in sockets:
                            accepting.start_soon(self._accept_loop, sock, ssl, connections)
                        task_status.started(self.port)
                        await self._stop.wait()
                        accepting.cancel_scope.cancel()
                    await listener.aclose()
                    await self.drain()
                    connections.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    self.stopping = True
                    await listener.aclose()
                    if connections is not None:
                        await self._abandon(connections)
                    await self.cleanup()

    async def _abandon(self, connections: anyio.abc.TaskGroup) -> None:
        """``connections`` has ended: clean up the connections whose jobs ran there and
        that did not finish (idle ones have no task that a cancellation would reach)."""
        left = list(self._sessions)
        if left:
            async with anyio.create_task_group() as tg:
                for session in left:
                    tg.start_soon(session.abandon, connections)

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, ssl: Any, connections: anyio.abc.TaskGroup
    ) -> None:
        backoff = 0.01
        # On asyncio, plain TCP connections use the lean stream (see _asyncio_stream).
        lean = ssl is None and running_on_asyncio()
        while True:
            try:
                stream: anyio.abc.ByteStream = await (
                    accept_stream(listener) if lean else listener.accept()
                )
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.logger.error("accept() failed (%s); retrying in %.2f s", exc, backoff)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, _ACCEPT_BACKOFF_MAX)
                    continue
                raise
            backoff = 0.01
            remote = ""
            try:
                peer = stream.extra(SocketAttribute.remote_address)
                remote = peer[0] if isinstance(peer, tuple) else str(peer)
            except anyio.TypedAttributeLookupError:
                pass
            if ssl is not None:
                connections.start_soon(self._tls_then_handle, stream, ssl, remote)
            elif lean:
                await self._open(stream, remote, connections)
            else:
                connections.start_soon(self.handle_stream, stream, remote)

    async def _open(
        self, stream: anyio.abc.ByteStream, remote: str, connections: anyio.abc.TaskGroup
    ) -> None:
        """Serve a connection with no task of its own: its jobs start in ``connections``
        when needed (an idle connection on the lean asyncio stream then has none)."""
        session = ServerSession(self, stream, remote)
        self._sessions.add(session)
        try:
            session.start(connections, on_finished=self._sessions.discard)
        except Exception:
            self.logger.exception("connection handler failed (%s)", remote or "-")
            self._sessions.discard(session)
            await anyio.aclose_forcefully(stream)

    async def _tls_then_handle(self, stream: anyio.abc.ByteStream, ssl: Any, remote: str) -> None:
        from anyio.streams.tls import TLSStream

        try:
            limit = self.app.limits.handshake_timeout or math.inf
            with anyio.fail_after(limit):
                tls = await TLSStream.wrap(
                    stream, server_side=True, ssl_context=ssl, standard_compatible=False
                )
        except (TimeoutError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            await anyio.aclose_forcefully(stream)
            return
        await self.handle_stream(tls, remote)

    def shutdown(self) -> None:
        """Stop accepting; close every connection with 1001; :meth:`serve` then returns."""
        self.stopping = True
        self._stop.set()

    async def drain(self) -> None:
        """Refuse new handshakes (503), close every connection with 1001 and wait for them
        to finish, up to ``shutdown_timeout``."""
        self.stopping = True
        sessions = list(self._sessions)
        for session in sessions:
            session.shutdown_nowait()
        with anyio.move_on_after(self.shutdown_timeout):
            for session in sessions:
                await session.wait_closed()


async def serve(
    app: App,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl: Any = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled.

    Inside a task group, ``port = await tg.start(serve, app, "127.0.0.1", 0)`` gives the
    bound port. ``options`` go to :class:`Server` (``max_write_buffer``, ...).
    """
    server = Server(app, **options)
    await server.serve(host, port, ssl=ssl, task_status=task_status)


def run(
    app: App,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    backend: str = "asyncio",
    ssl: Any = None,
    **options: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully (blocking)."""

    async def main() -> None:
        server = Server(app, **options)

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    server.logger.info("received signal %s, shutting down", signum)
                    server.shutdown()
                    return

        async with anyio.create_task_group() as tg:

            async def serve_until_shutdown(*, task_status: TaskStatus[int]) -> None:
                await server.serve(host, port, ssl=ssl, task_status=task_status)
                tg.cancel_scope.cancel()  # the graceful shutdown is over: stop listening too

            tg.start_soon(on_signals)
            bound = await tg.start(serve_until_shutdown)
            server.logger.info("imkit serving on %s:%s", host, bound)

    backend_options: dict[str, Any] = {}
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        backend_options["use_uvloop"] = True
    anyio.run(main, backend=backend, backend_options=backend_options)
