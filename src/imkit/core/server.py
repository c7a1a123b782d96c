"""The server's decisions, with no I/O: the application, its options, and the registry.

* :class:`App` holds what a user configures: routes, hooks, pages, authentication,
  discovery, ack mode, login policy, limits. It never awaits anything; a transport
  (:mod:`imkit.transport`) runs it.
* :class:`Registry` maps users to their live connections under a :class:`LoginPolicy`,
  keyed by a per-connection epoch so that the late close of an old connection never
  removes the newer one, and keeps each identity's receiver (its dedupe memory) alive
  across reconnects.
* :class:`Context`, :class:`Session` and :class:`ServerAPI` are what handlers and hooks
  receive; the transport implements them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import attrs

from imkit.core.ack import AckMode, AckTimers, Receiver
from imkit.core.conn import ConnLimits
from imkit.core.frames import Frame
from imkit.core.interfaces import (
    Authentication,
    Discover,
    HandshakeRequest,
    Identity,
    SingleNode,
)
from imkit.core.peer import PeerOptions
from imkit.core.proxies import TrustedProxies
from imkit.core.routing import H, Router
from imkit.exceptions import ConfigurationError

__all__ = (
    "DEFAULT_MAX_CONCURRENT_HANDLERS",
    "DEFAULT_MAX_CONCURRENT_HANDSHAKES",
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "DEFAULT_MAX_CONNECTIONS_PER_USER",
    "App",
    "Context",
    "Deferred",
    "HttpResponse",
    "LoginPolicy",
    "Registry",
    "ServerAPI",
    "Session",
)

# Precedent: easy-chat's TaskRunner runs handlers on a bounded pool.
DEFAULT_MAX_CONCURRENT_HANDLERS = 256
# Handshakes being authenticated at once, server-wide; more get 503 and retry (CASES D29).
DEFAULT_MAX_CONCURRENT_HANDSHAKES = 256
DEFAULT_MAX_CONNECTIONS_PER_USER = 16
DEFAULT_MAX_CONNECTIONS_PER_IP = 1024


class LoginPolicy(str, Enum):
    """What happens when a user who is connected connects again."""

    SINGLE = "single"
    """The new connection closes the old one (close 4000 "session replaced")."""
    MULTI = "multi"
    """Both stay (one per device); a new connection of the same device replaces the old."""


class Session(Protocol):
    """A live connection as handlers and hooks see it."""

    @property
    def identity(self) -> Identity:
        """Who is connected."""
        ...

    @property
    def user_id(self) -> str:
        """The authenticated user id."""
        ...

    @property
    def device_id(self) -> str:
        """The device id (empty when the authentication gives none)."""
        ...

    @property
    def epoch(self) -> str:
        """This connection's unique id."""
        ...

    async def push(
        self, method: str, data: Any, *, message_id: str | None = None, form_id: str = ""
    ) -> Frame:
        """Send a message with the downstream ack mode; returns the frame sent."""
        ...

    def push_many(self, method: str, items: Iterator[tuple[Any, str]]) -> list[Frame]:
        """Push messages of ``method`` from ``items`` (``(data, form_id)`` pairs) without
        waiting, as many as the ack window and the write buffer have room for now, their
        bytes written together; an item is taken from ``items`` only when it is sent.
        Returns the frames sent (none once the connection is closed)."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this connection."""
        ...

    def hold(self) -> None:
        """Queue :meth:`ServerAPI.send_to_users` pushes for this session until released."""
        ...

    async def release(self, keep: Callable[[Frame], bool] | None = None) -> None:
        """Send the held pushes ``keep`` accepts, stop holding; ``keep`` goes on filtering
        later fan-out pushes."""
        ...


class ServerAPI(Protocol):
    """What the running server offers to handlers and hooks."""

    @property
    def node_id(self) -> str:
        """This node's id."""
        ...

    async def send_to_users(
        self,
        user_ids: Sequence[str],
        method: str,
        data: Any,
        *,
        form_id: str = "",
        here: bool = True,
    ) -> int:
        """Push to every connection of each user, on this node or others (``here=False``:
        on other nodes only, for pushes :meth:`push_here` made here already).

        Returns how many connections (local) or nodes (remote) it was handed to.
        """
        ...

    @property
    def single_node(self) -> bool:
        """Whether this node is the only one (no discovery backend spans nodes): then
        :meth:`push_here` reaches every connection :meth:`send_to_users` would."""
        ...

    def push_here(
        self, user_ids: Sequence[str], method: str, data: Any, *, form_id: str = ""
    ) -> int:
        """Push to every connection of each user on this node, at once: the local part of
        :meth:`send_to_users`, for code that may not await (a :class:`Deferred`'s
        callback). It never waits and never reaches another node. Returns how many
        connections it was handed to."""
        ...

    def sessions(self, user_id: str) -> list[Session]:
        """The user's live connections on this node."""
        ...

    async def online(self, user_ids: Sequence[str]) -> set[str]:
        """Which of ``user_ids`` are connected, on any node."""
        ...


class Deferred(Protocol):
    """A message whose handler has returned and whose answer comes later, from a callback
    (:meth:`Context.defer`). Its methods do not await: they may be called on the event
    loop's thread from a callback (a store's, say, outside any task) as well as from a
    task."""

    def reply(self, data: Any, *, acked: bool = True) -> Frame:
        """Answer the message, as :meth:`Context.reply` does."""
        ...

    def error(self, code: str, message: str, **extra: Any) -> None:
        """Answer the message with an ``Err`` frame, as :meth:`Context.error` does."""
        ...

    def fail(self, exc: Exception) -> None:
        """Answer the message as a handler that raised ``exc`` is answered: a
        :class:`~imkit.exceptions.HandlerError` with its ``Err`` frame, anything else
        logged and answered ``HANDLER_ERROR``."""
        ...

    def end(self, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """The message is done (a second call does nothing). With ``then``, it is done
        once ``then()`` has run in a task of the connection: for the rare work that must
        await; a :class:`~imkit.exceptions.HandlerError` it raises answers the message
        with an ``Err`` frame, as from a handler."""
        ...


class Context(Protocol):
    """What a route handler receives for one message."""

    @property
    def frame(self) -> Frame:
        """The message, with ``form_id`` set to the authenticated user."""
        ...

    @property
    def data(self) -> Any:
        """The message's ``data``."""
        ...

    @property
    def method(self) -> str:
        """The message's ``method``."""
        ...

    @property
    def session(self) -> Session:
        """The connection the message came on."""
        ...

    @property
    def user_id(self) -> str:
        """The authenticated sender."""
        ...

    @property
    def server(self) -> ServerAPI:
        """The running server."""
        ...

    async def reply(self, data: Any, *, acked: bool = True) -> Frame:
        """Answer the message: a ``Data`` frame with ``replyTo`` = its id, sent with the
        downstream ack mode; ``acked=False``: a ``NoAck`` frame (never acked or resent)."""
        ...

    def unblock(self) -> bool:
        """Let this connection's next message start before this handler returns.

        A connection's messages are handled one at a time, in order. A handler that has
        done the part that must stay in order (say, queued a write that keeps the order it
        was queued in) calls this: the next message's handler starts at once, and the
        rest of this one runs alongside it. Handlers still start in arrival order, and
        ``on_disconnect`` still runs after all of them. Returns ``False`` (the handler
        stays in order) when the server cannot: 16 messages of the connection are
        unblocked or deferred already, the connection is ending, the call is not from
        the message's own handler, or the transport handles one message at a time (the
        ASGI adapter).
        """
        ...

    def defer(self) -> Deferred | None:
        """Finish this message after the handler returns, from a callback.

        For a handler whose answer waits on something that reports through a callback
        (a store's queued write, say): it calls this, hands the returned
        :class:`Deferred` to that callback, and returns. The connection's next message
        starts at once and no task is kept for this one; the callback answers with
        :meth:`Deferred.reply` and calls :meth:`Deferred.end`. Handlers still start in
        arrival order; ``on_disconnect`` runs after every deferred message has ended
        (or after the server's ``shutdown_timeout``). Returns ``None`` (finish in the
        handler) when the server cannot: 16 messages of the connection are deferred or
        unblocked already, the connection is ending, the call is not from the message's
        own handler, or the transport handles one message at a time (the ASGI adapter).
        """
        ...

    async def error(self, code: str, message: str, **extra: Any) -> None:
        """Answer the message with an ``Err`` frame."""
        ...


@attrs.frozen(slots=True)
class HttpResponse:
    """A plain HTTP answer from a page handler."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = ()


PageHandler = Callable[[HandshakeRequest], Awaitable[HttpResponse]]
SessionHook = Callable[[Session, ServerAPI], Awaitable[None]]
DeliveryHook = Callable[[Session, Frame], Awaitable[None] | None]
"""An ``on_delivered`` hook: a coroutine function, or a plain function that returns
``None`` or something to await (see :meth:`App.on_delivered`)."""
FailureHook = Callable[[Session, Frame, str], Awaitable[None]]
LifecycleHook = Callable[[ServerAPI], Awaitable[None]]

F = TypeVar("F")


class App:
    """An imkit application: configuration, routes and hooks. Run it with
    :func:`imkit.serve`, :meth:`run`, or mount it with :class:`imkit.transport.asgi.ASGIApp`.

    ``ack_mode`` applies to both directions. ``login_policy`` is ``"single"`` (a new login
    closes the old connection) or ``"multi"``. ``allowed_origins=None`` admits
    non-browser clients and same-origin pages only (see
    :func:`~imkit.core.conn.origin_allowed`). ``trusted_proxies`` (addresses or networks)
    are the reverse proxies whose ``X-Forwarded-For`` names the client: its address then
    counts for ``max_connections_per_ip`` and is the handshake's ``remote_addr`` (see
    :mod:`imkit.core.proxies`); by default none, and the socket's address counts.
    ``max_concurrent_handshakes`` bounds the handshakes being authenticated at once: in a
    mass reconnect the others are refused at once with HTTP 503 (``imkit.Client``
    retries them with its jittered backoff) instead of piling up on the authentication.
    """

    def __init__(
        self,
        *,
        auth: Authentication,
        ack_mode: AckMode | str = AckMode.ONLY,
        login_policy: LoginPolicy | str = LoginPolicy.SINGLE,
        path: str | re.Pattern[str] = "/ws",
        allowed_origins: Sequence[str] | None = None,
        discover: Discover | None = None,
        limits: ConnLimits | None = None,
        options: PeerOptions | None = None,
        timers: AckTimers | None = None,
        max_concurrent_handlers: int = DEFAULT_MAX_CONCURRENT_HANDLERS,
        max_concurrent_handshakes: int = DEFAULT_MAX_CONCURRENT_HANDSHAKES,
        max_connections_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
        revalidate_interval: float | None = 60.0,
        trusted_proxies: Sequence[str] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(auth, Authentication):
            raise ConfigurationError("auth must implement imkit.Authentication")
        self.auth = auth
        self.ack_mode = AckMode(ack_mode)
        self.login_policy = LoginPolicy(login_policy)
        self.path = path
        self.allowed_origins = tuple(allowed_origins) if allowed_origins is not None else None
        self.discover: Discover = discover or SingleNode()
        self.limits = limits or ConnLimits()
        base = options or PeerOptions()
        self.options = attrs.evolve(base, ack_mode=self.ack_mode, timers=timers or base.timers)
        if max_concurrent_handlers < 1:
            raise ConfigurationError("max_concurrent_handlers must be at least 1")
        self.max_concurrent_handlers = max_concurrent_handlers
        if max_concurrent_handshakes < 1:
            raise ConfigurationError("max_concurrent_handshakes must be at least 1")
        self.max_concurrent_handshakes = max_concurrent_handshakes
        self.max_connections_per_user = max_connections_per_user
        self.max_connections_per_ip = max_connections_per_ip
        if revalidate_interval is not None and not revalidate_interval > 0:
            raise ConfigurationError("revalidate_interval must be > 0 seconds, or None")
        self.revalidate_interval = revalidate_interval
        if isinstance(trusted_proxies, str):
            raise ConfigurationError("trusted_proxies is a list of addresses, not one string")
        try:
            self.trusted_proxies = TrustedProxies(trusted_proxies)
        except ValueError as exc:
            raise ConfigurationError(f"trusted_proxies: {exc}") from None
        self.logger = logger or logging.getLogger("imkit.server")
        self.router = Router()
        self.pages: dict[str, PageHandler] = {}
        self.connect_hooks: list[SessionHook] = []
        self.disconnect_hooks: list[SessionHook] = []
        self.delivered_hooks: list[DeliveryHook] = []
        self.failed_hooks: list[FailureHook] = []
        self.startup_hooks: list[LifecycleHook] = []
        self.shutdown_hooks: list[LifecycleHook] = []

    def client_request(self, request: HandshakeRequest) -> HandshakeRequest:
        """``request`` with the client's address as ``remote_addr`` when it came through a
        trusted proxy (``trusted_proxies``); else ``request`` itself."""
        proxies = self.trusted_proxies
        if not proxies:
            return request
        address = proxies.client_address(request.remote_addr, request.headers)
        if address == request.remote_addr:
            return request
        return attrs.evolve(request, remote_addr=address)

    def route(self, method: str) -> Callable[[H], H]:
        """Decorator: register an async handler for ``method``."""
        return self.router.route(method)

    def page(self, path: str) -> Callable[[PageHandler], PageHandler]:
        """Decorator: answer plain HTTP GETs of ``path`` with an :class:`HttpResponse`."""

        def register(handler: PageHandler) -> PageHandler:
            if path in self.pages:
                raise ConfigurationError(f"path {path!r} already has a page")
            self.pages[path] = handler
            return handler

        return register

    def on_connect(self, hook: SessionHook) -> SessionHook:
        """Decorator: run ``hook(session, server)`` when a connection opens."""
        self.connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: SessionHook) -> SessionHook:
        """Decorator: run ``hook(session, server)`` when a connection closes."""
        self.disconnect_hooks.append(hook)
        return hook

    def on_delivered(self, hook: DeliveryHook) -> DeliveryHook:
        """Decorator: run ``hook(session, frame)`` when a client acknowledges a push.

        The hook is called as the ack is read. What it returns to await (an ``async def``
        hook's coroutine, whose body has not started) is awaited by the connection's
        worker in order with the connection's messages and other delivery hooks. A plain
        function's body runs at once, before messages read earlier are handled; it must
        not block, and it may return an awaitable for the part that must wait (the cheap
        path for a hook that usually only updates memory: no queue, no coroutine)."""
        self.delivered_hooks.append(hook)
        return hook

    def on_delivery_failed(self, hook: FailureHook) -> FailureHook:
        """Decorator: run ``hook(session, frame, reason)`` when a push is given up."""
        self.failed_hooks.append(hook)
        return hook

    def on_startup(self, hook: LifecycleHook) -> LifecycleHook:
        """Decorator: run ``hook(server)`` once the server is ready, before it accepts."""
        self.startup_hooks.append(hook)
        return hook

    def on_shutdown(self, hook: LifecycleHook) -> LifecycleHook:
        """Decorator: run ``hook(server)`` when the server stops."""
        self.shutdown_hooks.append(hook)
        return hook

    def run(self, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
        """Serve until interrupted (blocking); see :func:`imkit.serve` for the options."""
        from imkit.transport.server import run  # the core itself never imports a transport

        run(self, host=host, port=port, **options)


C = TypeVar("C")


@attrs.define
class _Entry(Generic[C]):
    identity: Identity
    epoch: str
    conn: C


@attrs.define
class _Inbound:
    receiver: Receiver
    connections: int = 0
    idle_since: float = 0.0


class Registry(Generic[C]):
    """Users and their live connections on this node, under a login policy.

    :meth:`add` returns the connections the new one displaces (the caller closes them);
    :meth:`remove` takes the epoch, so only the connection that registered it can leave.
    """

    def __init__(self, policy: LoginPolicy | str = LoginPolicy.SINGLE) -> None:
        self.policy = LoginPolicy(policy)
        self._users: dict[str, dict[str, _Entry[C]]] = {}
        # Each user's connections as a tuple, made when they change (read once per push).
        self._live: dict[str, tuple[C, ...]] = {}
        self._inbound: dict[tuple[str, str], _Inbound] = {}
        self._next_prune = 0.0
        self._forgotten: list[tuple[str, str, Frame]] = []

    def add(self, identity: Identity, epoch: str, conn: C) -> list[C]:
        """Register ``conn``; return the connections it replaces under the policy."""
        entries = self._users.setdefault(identity.user_id, {})
        if epoch in entries:
            raise ConfigurationError(f"epoch {epoch!r} is already registered")
        displaced = [
            e.conn
            for e in entries.values()
            if self.policy is LoginPolicy.SINGLE or e.identity.device_id == identity.device_id
        ]
        for key in [
            k
            for k, e in entries.items()
            if self.policy is LoginPolicy.SINGLE or e.identity.device_id == identity.device_id
        ]:
            del entries[key]
        entries[epoch] = _Entry(identity, epoch, conn)
        self._live[identity.user_id] = tuple(e.conn for e in entries.values())
        return displaced

    def remove(self, user_id: str, epoch: str) -> bool:
        """Unregister the connection with ``epoch``; ``False`` if it was already replaced."""
        entries = self._users.get(user_id)
        if not entries or epoch not in entries:
            return False
        del entries[epoch]
        if entries:
            self._live[user_id] = tuple(e.conn for e in entries.values())
        else:
            del self._users[user_id]
            del self._live[user_id]
        return True

    def connections(self, user_id: str) -> list[C]:
        """The user's live connections."""
        return list(self._live.get(user_id, ()))

    def live(self, user_id: str) -> tuple[C, ...]:
        """The user's live connections, as the registry keeps them (no copy is made: what
        a push to every connection of a user reads). Later changes make a new tuple."""
        return self._live.get(user_id, ())

    def count(self, user_id: str) -> int:
        """How many live connections the user has."""
        return len(self._users.get(user_id, ()))

    def is_online(self, user_id: str) -> bool:
        """Whether the user has a live connection here."""
        return user_id in self._users

    def __len__(self) -> int:
        return sum(len(e) for e in self._users.values())

    def all(self) -> list[C]:
        """Every live connection."""
        return [e.conn for entries in self._users.values() for e in entries.values()]

    def receiver(
        self, identity: Identity, mode: AckMode, timers: AckTimers, now: float
    ) -> Receiver:
        """The identity's receiver, kept across its connections (and ``remember_for``
        seconds after the last one closes), so a resend after a reconnect is not
        dispatched twice. Call :meth:`release_receiver` when the connection closes.
        """
        self._prune(now, timers.remember_for)
        key = (identity.user_id, identity.device_id)
        inbound = self._inbound.get(key)
        if inbound is None or inbound.receiver.mode is not mode:
            inbound = _Inbound(Receiver(mode, timers))
            self._inbound[key] = inbound
        inbound.connections += 1
        return inbound.receiver

    def release_receiver(self, identity: Identity, now: float) -> None:
        """A connection of ``identity`` closed: its receiver may be dropped later."""
        inbound = self._inbound.get((identity.user_id, identity.device_id))
        if inbound is not None:
            inbound.connections = max(0, inbound.connections - 1)
            inbound.idle_since = now

    def _prune(self, now: float, keep_for: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + keep_for / 4
        stale = [
            key
            for key, inbound in self._inbound.items()
            if inbound.connections == 0 and now - inbound.idle_since > keep_for
        ]
        for key in stale:
            # (RigorAck: what still waits for its confirmation goes with it.)
            for frame in self._inbound.pop(key).receiver.pending():
                self._forgotten.append((key[0], key[1], frame))

    def take_forgotten(self) -> list[tuple[str, str, Frame]]:
        """The messages dropped undispatched since the last call because the receiver
        holding them was forgotten (``remember_for`` after its user's and device's last
        connection closed) while they still waited for their sender's confirmation
        (RigorAck): ``(user id, device id, frame)`` each. Nobody is connected to be told
        (``Err{expired}``): the caller logs them."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten
