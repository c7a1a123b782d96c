"""Server-level steps of a connection's life that do not depend on the transport.

The anyio session (:mod:`imkit.transport.session`) and the ASGI adapter
(:mod:`imkit.transport.asgi`) read and write differently, but decide a handshake, announce a
new connection, run handlers and hooks, and retire a closed connection alike. These
functions do that against a :class:`~imkit.transport.server.Server` and any session that
satisfies :class:`Connection`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio

from imkit.core.ack import Receiver
from imkit.core.events import Delivered, DeliveryFailed, MessageExpired
from imkit.core.frames import ErrorCode, Frame, FrameType
from imkit.core.interfaces import Binding, Forward, HandshakeRequest, Identity
from imkit.core.peer import CLOSE_POLICY
from imkit.core.server import HttpResponse, LoginPolicy, ServerAPI, Session
from imkit.exceptions import AuthenticationFailed, DiscoverError, HandlerError

if TYPE_CHECKING:
    from imkit.transport.server import Server

__all__ = (
    "HOOK_TIMEOUT",
    "MAX_UNBLOCKED",
    "UNBIND_TIMEOUT",
    "Connection",
    "DeferredMessage",
    "HandlerContext",
    "HeldFanOut",
    "HooksAwaiting",
    "announce",
    "as_api",
    "decide_handshake",
    "delivery_hooks",
    "dispatch",
    "hooks_item",
    "page_response",
    "path_matches",
    "retire",
    "revalidate",
)


HOOK_TIMEOUT = 10.0
"""Longest an ``on_disconnect`` hook may run (and an ``on_connect`` hook may delay it)."""
UNBIND_TIMEOUT = 5.0
"""Longest a discovery ``unbind`` may take when a connection closes."""
PUSH_BATCH = 64
"""``push_many`` moves the core's output to the writer every this many messages, and
checks the write buffer's room again (the bytes still in the core are not counted)."""
MAX_UNBLOCKED = 16
"""At most this many messages of one connection are unblocked (``Context.unblock()``) or
deferred (``Context.defer()``) at a time. An unblocked handler holds one of the server's
``max_concurrent_handlers`` slots: one connection takes no more than this and one."""


class HeldFanOut:
    """Fan-out holding and batched pushes, shared by the socket and ASGI sessions: while
    held (from the handshake until the ``on_connect`` hooks end), :meth:`deliver` queues
    pushes; :meth:`release` sends those its filter keeps; :meth:`push_many` sends what
    there is room for. A session provides ``server``, ``is_open``, ``unsent``,
    ``send_now``, ``_send_while_room`` and ``_new_id``."""

    # Slots (with a __dict__ for what applications attach to a session) keep an idle
    # connection small; a session's own attributes are listed in its class.
    __slots__ = ("__dict__", "_held", "_keep")

    server: Server
    _held: list[Frame] | None

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent on this connection (provided by the session)."""
        raise NotImplementedError  # pragma: no cover - every session defines it

    @property
    def unsent(self) -> int:
        """What is queued for the client and not yet taken (provided by the session)."""
        raise NotImplementedError  # pragma: no cover - every session defines it

    def push_many(self, method: str, items: Iterator[tuple[Any, str]]) -> list[Frame]:
        """Push messages of ``method`` from ``items`` (``(data, form_id)`` pairs) with the
        downstream ack mode, without waiting: as many, in order, as the ack window and
        the write buffer have room for now (the room ``wait_for_room`` waits for). An
        item is taken from ``items`` only when it is sent: the caller waits for room and
        goes on with the rest. Their bytes go out together, :data:`PUSH_BATCH` at a time
        (the buffer is looked at again between batches), which costs less than a
        ``push`` each. Returns the frames sent (none on a closed connection).

        Raises ``TypeError``/``ValueError`` for ``data`` that is not JSON, after sending
        the items before it.
        """
        frames: list[Frame] = []
        limit = self.server.max_write_buffer // 2
        while self.is_open and self.unsent < limit:
            batch = self._send_while_room(method, items)
            frames += batch
            if len(batch) < PUSH_BATCH:
                break
        return frames

    def _send_while_room(self, method: str, items: Iterator[tuple[Any, str]]) -> list[Frame]:
        """Send up to :data:`PUSH_BATCH` items while the ack window has room, and move
        their bytes and events on (provided by the session)."""
        raise NotImplementedError  # pragma: no cover - every session defines it

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
        """Send at once (provided by the session)."""
        raise NotImplementedError  # pragma: no cover - every session defines it

    def _new_id(self) -> str:
        raise NotImplementedError  # pragma: no cover - every session defines it

    _keep: Callable[[Frame], bool] | None

    def deliver(self, method: str, data: Any, *, form_id: str = "") -> None:
        """Fan-out delivery: queued while the session is held, else sent at once (if the
        filter given to :meth:`release` keeps it)."""
        held, keep = self._held, self._keep
        if held is None and keep is None:
            self.send_now(method, data, form_id=form_id)
            return
        frame = Frame(FrameType.DATA, id=self._new_id(), method=method, form_id=form_id, data=data)
        if held is not None:
            held.append(frame)
        elif keep is not None and keep(frame):
            self.send_now(method, data, message_id=frame.id, form_id=form_id)

    def hold(self) -> None:
        """Queue fan-out pushes until :meth:`release`."""
        if self._held is None:
            self._held = []

    async def release(self, keep: Callable[[Frame], bool] | None = None) -> None:
        """Send the held pushes that ``keep`` accepts (all by default), stop holding.

        ``keep`` goes on filtering later fan-out pushes: one that was on its way while
        the hold ended (its handler read the store before the release) is judged alike.
        A call without ``keep`` on a session that is not held changes nothing (the server
        releases once more after the ``on_connect`` hooks; a hook's filter must survive).
        """
        held, self._held = self._held, None
        if held is None and keep is None:
            return  # not held: nothing to send, and the filter of the last release stays
        self._keep = keep
        for frame in held or ():
            if keep is None or keep(frame):
                self.send_now(frame.method, frame.data, message_id=frame.id, form_id=frame.form_id)


class Connection(Session, Protocol):
    """What the steps need of a server-side session, beyond the core ``Session``."""

    @property
    def server(self) -> Server:
        """The server the session belongs to."""
        ...

    @property
    def remote_addr(self) -> str:
        """The client's address (empty when unknown)."""
        ...

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
        """Send at once with the downstream ack mode (``acked=False``: a NoAck frame)."""
        ...

    def unblock(self, frame: Frame) -> bool:
        """Let the connection's next message start before the handler of ``frame`` ends
        (``False``: it cannot, and the handler stays in order)."""
        ...

    def defer(self, frame: Frame) -> DeferredMessage | None:
        """Let the handler of ``frame`` return before the message is done (``None``: it
        cannot, and the handler finishes the message)."""
        ...

    def deferred_end(
        self, message: DeferredMessage, then: Callable[[], Awaitable[None]] | None
    ) -> None:
        """A deferred message is done (after ``then`` has run in a task, if given)."""
        ...

    def send_error(self, code: str, message: str, frame_id: str = "", **extra: Any) -> None:
        """Send an ``Err`` frame."""
        ...

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Start closing the connection with ``code`` without awaiting anything."""
        ...


def path_matches(pattern: str | re.Pattern[str], path: str) -> bool:
    """Whether ``path`` is the WebSocket path ``pattern`` (a string or a full-match regex)."""
    return path == pattern if isinstance(pattern, str) else pattern.fullmatch(path) is not None


def as_api(server: Server) -> ServerAPI:
    """``server`` as the ``ServerAPI`` protocol.

    ``Server.sessions()`` is typed ``list[ServerSession]``, which mypy does not accept for
    the protocol's ``list[Session]`` (lists are invariant), though it is one at run time.
    """
    return cast(ServerAPI, server)


async def decide_handshake(server: Server, request: HandshakeRequest) -> Identity | tuple[int, str]:
    """Admission, authentication and the per-user limit: an identity or (status, reason)."""
    app = server.app
    refusal = server.admission(request)
    if refusal is not None:
        return refusal
    if server.authenticating >= app.max_concurrent_handshakes:
        server.logger.info(
            "handshake from %s refused: %d handshakes are being authenticated",
            request.remote_addr,
            server.authenticating,
        )
        return 503, "server busy: too many handshakes at once; retry shortly"
    server.authenticating += 1
    try:
        limit = app.limits.handshake_timeout
        with anyio.fail_after(limit if limit is not None else math.inf):
            identity = await app.auth.authenticate(request)
    except AuthenticationFailed as exc:
        server.logger.info("handshake from %s refused: %s", request.remote_addr, exc.reason)
        return exc.status, exc.reason
    except TimeoutError:
        return 503, "authentication timed out"
    except Exception:
        server.logger.exception("authentication failed with an error")
        return 500, "authentication error"
    finally:
        server.authenticating -= 1
    if (
        app.login_policy is LoginPolicy.MULTI
        and server.registry.count(identity.user_id) >= app.max_connections_per_user
    ):
        return 429, "too many connections for this user"
    return identity


def inbound_receiver(server: Server, identity: Identity, now: float) -> Receiver:
    """The identity's receiver for a new connection (:meth:`Registry.receiver`); logs the
    RigorAck messages dropped unconfirmed with a receiver the registry forgot meanwhile
    (no connection of their sender is left to be told)."""
    app = server.app
    receiver = server.registry.receiver(identity, app.ack_mode, app.options.timers, now)
    for user_id, device_id, frame in server.registry.take_forgotten():
        server.logger.warning(
            "message %r of %r (device %r) dropped unconfirmed (RigorAck): its sender was"
            " away longer than remember_for",
            frame.id,
            user_id,
            device_id,
        )
    return receiver


async def announce(server: Server, session: Connection) -> None:
    """Bind the user in discovery (kicking its replaced connections on other nodes), run
    the ``on_connect`` hooks, then release the fan-out held meanwhile."""
    app = server.app
    identity = session.identity
    if not server.single_node:
        binding = Binding(identity.user_id, server.node_id, session.epoch, identity.device_id)
        try:
            others = await app.discover.bind(binding)
        except DiscoverError as exc:
            server.logger.warning("could not bind %r in discovery: %s", identity.user_id, exc)
            others = []
        for other in others:
            same_device = other.device_id == identity.device_id
            if other.node_id != server.node_id and (
                app.login_policy is LoginPolicy.SINGLE or same_device
            ):
                kick = Forward("kick", identity.user_id, server.node_id, epoch=other.epoch)
                try:
                    await app.discover.forward(other.node_id, kick)
                except DiscoverError as exc:
                    server.logger.warning("could not reach node %r: %s", other.node_id, exc)
    for hook in app.connect_hooks:
        try:
            await hook(session, as_api(server))
        except Exception:
            server.logger.exception("an on_connect hook failed for %r", identity.user_id)
    await session.release()  # a no-op unless fan-out was held


async def dispatch(server: Server, session: Connection, frame: Frame) -> None:
    """Run the route of ``frame`` under the server's handler limit; errors become ``Err``."""
    route = server.app.router.get(frame.method)
    if route is None:  # the peer refuses unknown methods before acking; kept for safety
        session.send_error(ErrorCode.UNKNOWN_METHOD, f"unknown method {frame.method!r}", frame.id)
        return
    limiter = server.handler_limiter
    if not limiter.acquire_nowait():
        await limiter.acquire()
    try:
        try:
            await route.handler(HandlerContext(session, frame))
        except Exception as exc:  # noqa: BLE001 - answered with Err, logged unless a HandlerError
            _failed(server, session, frame, exc)
    finally:
        limiter.release()


async def finish_deferred(
    server: Server, session: Connection, frame: Frame, then: Callable[[], Awaitable[None]]
) -> None:
    """Run the awaiting end of a deferred message (:meth:`DeferredMessage.end`) as its
    handler would run: under the handler limit, errors answered with ``Err``."""
    limiter = server.handler_limiter
    if not limiter.acquire_nowait():
        await limiter.acquire()
    try:
        try:
            await then()
        except Exception as exc:  # noqa: BLE001 - answered with Err, logged unless a HandlerError
            _failed(server, session, frame, exc)
    finally:
        limiter.release()


def _failed(server: Server, session: Connection, frame: Frame, exc: Exception) -> None:
    """Answer ``frame`` for a handler that raised ``exc``."""
    if isinstance(exc, HandlerError):
        session.send_error(exc.code, exc.message, frame.id, **exc.extra)
        return
    server.logger.error(
        "handler for %r failed (user %r, message %r)",
        frame.method,
        session.user_id,
        frame.id,
        exc_info=exc,
    )
    session.send_error(ErrorCode.HANDLER_ERROR, "the handler failed; see the server log", frame.id)


async def revalidate(server: Server, session: Connection, request: HandshakeRequest) -> None:
    """Ask the authentication again about the handshake ``request`` of ``session``: a
    credential revoked since (or now naming someone else) closes it with 1008; an
    authentication that fails (an error, a timeout) keeps it, with a warning."""
    app = server.app
    try:
        limit = app.limits.handshake_timeout
        with anyio.fail_after(limit if limit is not None else math.inf):
            identity: Identity | None = await app.auth.authenticate(request)
    except AuthenticationFailed as exc:
        server.logger.info("credential of %r revoked: %s", session.user_id, exc.reason)
        identity = None
    except Exception:
        server.logger.warning(
            "could not revalidate the credential of %r; keeping the connection",
            session.user_id,
            exc_info=True,
        )
        return
    if identity is None or identity.user_id != session.user_id:
        session.close_nowait(CLOSE_POLICY, "credential revoked")


class HooksAwaiting:
    """What the ``on_delivered`` hooks of one ack returned to await (a coroutine, for an
    ``async def`` hook): the connection's worker awaits it in order with its messages."""

    __slots__ = ("awaiting", "frame")

    def __init__(self, frame: Frame, awaiting: list[Awaitable[None]]) -> None:
        self.frame = frame
        self.awaiting = awaiting


def hooks_item(server: Server, session: Connection, event: Any) -> Any:
    """The inbox item for a delivery event, or ``None`` when nothing is left to queue.

    The ``on_delivered`` hooks are called here, when the ack is read: a plain function's
    body runs at once (no task, no queue: the cheap path for a hook that only updates
    memory), and what a hook returns to await (the coroutine of an ``async def`` hook,
    whose body has not started) is queued as :class:`HooksAwaiting`, so it runs in order
    with the connection's messages as before. Other events are queued as they are."""
    if not isinstance(event, Delivered):
        return event
    awaiting: list[Awaitable[None]] | None = None
    frame = event.frame
    for hook in server.app.delivered_hooks:
        try:
            result = hook(session, frame)
        except Exception:
            server.logger.exception("a delivery hook failed for %r", session.user_id)
            continue
        if result is not None:
            if awaiting is None:
                awaiting = []
            awaiting.append(result)
    return None if awaiting is None else HooksAwaiting(frame, awaiting)


async def delivery_hooks(server: Server, session: Connection, event: Any) -> None:
    """Run the ``on_delivered`` / ``on_delivery_failed`` hooks for one inbox item (what
    :func:`hooks_item` made of a peer event)."""
    app = server.app
    if isinstance(event, HooksAwaiting):
        for awaitable in event.awaiting:
            try:
                await awaitable
            except Exception:
                server.logger.exception("a delivery hook failed for %r", session.user_id)
        return
    try:
        if isinstance(event, DeliveryFailed):
            for failed in app.failed_hooks:
                await failed(session, event.frame, event.reason)
        elif isinstance(event, MessageExpired):
            server.logger.info(
                "message %r of %r expired unconfirmed (RigorAck)", event.frame.id, session.user_id
            )
    except Exception:
        server.logger.exception("a delivery hook failed for %r", session.user_id)


async def retire(server: Server, session: Connection) -> None:
    """The tail of a closed session, once it has left the registry and its last delivery
    hooks have run: unbind it in discovery, run ``on_disconnect``."""
    identity = session.identity
    if not server.single_node:
        binding = Binding(identity.user_id, server.node_id, session.epoch, identity.device_id)
        try:
            with anyio.move_on_after(UNBIND_TIMEOUT):
                await server.app.discover.unbind(binding)
        except DiscoverError as exc:
            server.logger.warning("could not unbind %r: %s", identity.user_id, exc)
    for hook in server.app.disconnect_hooks:
        try:
            with anyio.move_on_after(HOOK_TIMEOUT):
                await hook(session, as_api(server))
        except Exception:
            server.logger.exception("an on_disconnect hook failed for %r", identity.user_id)


async def page_response(server: Server, request: HandshakeRequest, method: str) -> HttpResponse:
    """The answer to a plain HTTP request: a page, 426 on the WebSocket path, 404, 405."""
    app = server.app
    handler = app.pages.get(request.path)
    if handler is None:
        if path_matches(app.path, request.path):
            return HttpResponse(
                426, b"this endpoint speaks WebSocket\n", headers=[("Upgrade", "websocket")]
            )
        return HttpResponse(404, b"not found\n")
    if method not in ("GET", "HEAD"):
        return HttpResponse(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
    try:
        return await handler(request)
    except Exception:
        server.logger.exception("page handler for %r failed", request.path)
        return HttpResponse(500, b"internal server error\n")


# ---------------------------------------------------------------------- one connection
class HandlerContext:
    """The :class:`~imkit.core.server.Context` of one message.

    Its fields are plain attributes, set once (a handler reads several per message; a
    property each would be a call each).
    """

    __slots__ = ("data", "frame", "method", "server", "session", "user_id")

    def __init__(self, session: Connection, frame: Frame) -> None:
        self.frame = frame
        """The message, ``form_id`` set to the authenticated user."""
        self.data: Any = frame.data
        """The message's payload."""
        self.method: str = frame.method
        """The message's method."""
        self.session = session
        """The connection the message came on."""
        self.user_id: str = session.user_id
        """The authenticated sender."""
        self.server: ServerAPI = session.server
        """The running server (an :class:`~imkit.transport.server.Server`)."""

    async def reply(self, data: Any, *, acked: bool = True) -> Frame:
        """Answer with a ``Data`` frame whose ``replyTo`` is this message's id, sent with
        the downstream ack mode; ``acked=False`` sends a ``NoAck`` frame instead (for an
        answer whose loss the client recovers by asking again)."""
        return self.session.send_now(self.method, data, reply_to=self.frame.id, acked=acked)

    def unblock(self) -> bool:
        """Let this connection's next message start before this handler returns (see
        :meth:`imkit.core.server.Context.unblock`)."""
        return self.session.unblock(self.frame)

    def defer(self) -> DeferredMessage | None:
        """Finish this message after the handler returns, from a callback (see
        :meth:`imkit.core.server.Context.defer`)."""
        return self.session.defer(self.frame)

    async def error(self, code: str, message: str, **extra: Any) -> None:
        """Answer with an ``Err`` frame."""
        self.session.send_error(code, message, self.frame.id, **extra)


class DeferredMessage:
    """The :class:`~imkit.core.server.Deferred` of one message (from :meth:`Connection.defer`)."""

    __slots__ = ("_ended", "frame", "session")

    def __init__(self, session: Connection, frame: Frame) -> None:
        self.session = session
        """The connection the message came on."""
        self.frame = frame
        """The message."""
        self._ended = False

    def reply(self, data: Any, *, acked: bool = True) -> Frame:
        """Answer the message (see :meth:`imkit.core.server.Context.reply`)."""
        frame = self.frame
        return self.session.send_now(frame.method, data, reply_to=frame.id, acked=acked)

    def error(self, code: str, message: str, **extra: Any) -> None:
        """Answer the message with an ``Err`` frame."""
        self.session.send_error(code, message, self.frame.id, **extra)

    def fail(self, exc: Exception) -> None:
        """Answer the message as a handler that raised ``exc`` is answered."""
        session = self.session
        _failed(session.server, session, self.frame, exc)

    def end(self, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """The message is done, or once ``then()`` has run (see
        :meth:`imkit.core.server.Deferred.end`); a second call does nothing."""
        if self._ended:
            return
        self._ended = True
        self.session.deferred_end(self, then)
