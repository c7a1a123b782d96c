"""Mount an imkit :class:`~imkit.core.server.App` in any ASGI 3 server or framework.

::

    import imkit
    from imkit.transport.asgi import ASGIApp

    app = imkit.App(auth=imkit.TokenAuth(secret))
    asgi = ASGIApp(app)   # uvicorn mymodule:asgi, or Mount("/chat", app=asgi) in Starlette

An ASGI server hands over whole WebSocket messages, so the adapter drives the core's
:class:`~imkit.core.peer.Peer` directly (no wsproto) and leaves framing, WebSocket
ping/pong and the closing handshake to the ASGI server. Everything above the framing is
the anyio server's: an :class:`ASGIApp` holds an :class:`imkit.transport.server.Server` and
registers its :class:`ASGISession` objects in ``server.registry``, so the login policy,
fan-out (``send_to_users``), forwards from other nodes, admission (503 while stopping,
429 per address), the handler limit and the hooks behave as under :func:`imkit.serve`.

Each accepted connection is an :class:`~imkit.transport.asgi_session.ASGISession` with four
tasks (reader, worker, writer, timer; see that module). The reader stops calling
``receive()`` while the worker is behind, so the ASGI server stops reading the socket; the
timer sleeps until the peer's next deadline. Nothing polls. The steps that do not depend
on the transport (deciding a handshake, running handlers and hooks, pages) are
:mod:`imkit.transport._lifecycle`, which the anyio session runs too.

What ASGI imposes (see ``docs/asgi.md``):

* A refused handshake is an HTTP response (401, 403, 404, 429, 503...) when the server
  offers the ``websocket.http.response`` extension (uvicorn does). Without it the only
  refusal ASGI allows is ``websocket.close`` before the accept, which the server turns into
  HTTP 403 whatever the cause: the adapter sends code 1008 with the intended status in the
  reason (``"HTTP 401: missing token"``).
* Message size, keepalive pings and the handshake timeout are the ASGI server's settings
  (uvicorn's ``--ws-max-size``, ``--ws-ping-interval``); the adapter still closes with 1009
  a message over ``App.limits.max_message_size`` and with 1003 a binary message.
* uvicorn closes open WebSockets with 1012 on its own shutdown, before it sends
  ``lifespan.shutdown``; call :meth:`ASGIApp.shutdown` first for a 1001.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel

from imkit.core.conn import origin_allowed
from imkit.core.interfaces import HandshakeRequest, Identity
from imkit.core.peer import CLOSE_POLICY
from imkit.core.server import App, HttpResponse
from imkit.transport._lifecycle import decide_handshake, page_response, path_matches
from imkit.transport.asgi_session import ASGISession, Receive, Send, close_reason
from imkit.transport.clock import Clock
from imkit.transport.server import (
    DEFAULT_MAX_QUEUED_MESSAGES,
    DEFAULT_MAX_WRITE_BUFFER,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Server,
)

if TYPE_CHECKING:
    from imkit.transport.session import ServerSession

__all__ = ("CLOSE_REFUSED", "ASGIApp", "ASGISession", "handshake_request", "route_path")

Scope = MutableMapping[str, Any]

CLOSE_REFUSED = CLOSE_POLICY
"""Close code of a refused handshake on a server without ``websocket.http.response``."""

_HTTP_RESPONSE_EXTENSION = "websocket.http.response"
_REFUSAL_LINGER = 1.0  # seconds to wait for the server's disconnect after a refusal


# ---------------------------------------------------------------------- the request
def route_path(scope: Scope) -> str:
    """The path an app mounted at ``scope["root_path"]`` should route on.

    ASGI servers and frameworks disagree on whether ``path`` includes ``root_path``
    (uvicorn and Starlette's ``Mount`` include it); a leading ``root_path`` is removed.
    """
    path = str(scope.get("path") or "/")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def handshake_request(scope: Scope) -> HandshakeRequest:
    """The :class:`~imkit.core.interfaces.HandshakeRequest` of an ASGI ``http`` or
    ``websocket`` scope, as :class:`~imkit.core.conn.ServerConn` builds it from bytes."""
    headers = [
        (bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
        for name, value in scope.get("headers") or ()
    ]
    query = bytes(scope.get("query_string") or b"").decode("latin-1")
    client = scope.get("client")
    return HandshakeRequest(
        path=route_path(scope),
        query=dict(reversed(parse_qsl(query, keep_blank_values=True))),
        headers=headers,
        remote_addr=str(client[0]) if client else "",
        subprotocols=[str(p) for p in scope.get("subprotocols") or ()],
    )


# ---------------------------------------------------------------------- the ASGI app
class ASGIApp:
    """An ASGI 3 application serving ``app``: WebSocket, HTTP pages and lifespan.

    ``clock`` and the other options go to the :class:`~imkit.transport.server.Server` it
    holds as :attr:`server` (the ``ServerAPI`` handlers see, with the registry). Startup
    runs on ``lifespan.startup``, or on the first request when the server (or a framework's
    ``Mount``) sends no lifespan events; shutdown runs on ``lifespan.shutdown`` or when
    :meth:`shutdown` is called.
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
    ) -> None:
        self.app = app
        self.server = Server(
            app,
            clock=clock,
            max_queued_messages=max_queued_messages,
            max_write_buffer=max_write_buffer,
            shutdown_timeout=shutdown_timeout,
            logger=logger,
        )
        self.logger = self.server.logger
        self._sessions: set[ASGISession] = set()
        self._ready: anyio.Event | None = None
        self._startup_error: BaseException | None = None
        self._shut_down = False

    @property
    def sessions(self) -> list[ASGISession]:
        """The open WebSocket sessions."""
        return list(self._sessions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        """Freeze the routes, start discovery and run the startup hooks, once; concurrent
        callers wait for the first. Raises if the startup failed."""
        if self._ready is None:
            self._ready = anyio.Event()
            try:
                await self.server.startup()
            except BaseException as exc:
                self._startup_error = exc
                raise
            finally:
                self._ready.set()
            return
        await self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError("the imkit server failed to start") from self._startup_error

    async def shutdown(self) -> None:
        """Refuse new handshakes (503), close every session with 1001 and wait for them
        (up to ``shutdown_timeout``), then run the shutdown hooks and stop discovery."""
        server = self.server
        server.stopping = True
        sessions = list(self._sessions)
        for session in sessions:
            session.shutdown_nowait()
        with anyio.move_on_after(server.shutdown_timeout):
            for session in sessions:
                await session.wait_closed()
        if self._ready is not None and not self._shut_down:
            self._shut_down = True
            await server.cleanup()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    self.logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    self.logger.exception("shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _started(self) -> bool:
        try:
            await self.startup()
        except Exception:
            self.logger.exception("the imkit server could not start")
            return False
        return True

    # ------------------------------------------------------------------ HTTP
    async def _http(self, scope: Scope, send: Send) -> None:
        method = str(scope.get("method") or "GET").upper()
        request = self.app.client_request(handshake_request(scope))
        if request.path in self.app.pages and not await self._started():
            response = HttpResponse(503, b"server not started\n")
        else:
            response = await page_response(self.server, request, method)
        await self._respond(send, response, head=method == "HEAD")

    @staticmethod
    async def _respond(send: Send, response: HttpResponse, *, head: bool = False) -> None:
        headers = [
            (name.lower().encode("latin-1"), v.encode("latin-1")) for name, v in response.headers
        ]
        names = {name for name, _ in headers}
        if b"content-type" not in names:
            headers.append((b"content-type", response.content_type.encode("latin-1")))
        if b"content-length" not in names:
            headers.append((b"content-length", str(len(response.body)).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else response.body})

    # ------------------------------------------------------------------ WebSocket
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message.get("type") != "websocket.connect":
            return  # the client left before the handshake
        request = self.app.client_request(handshake_request(scope))
        app = self.app
        decision: Identity | tuple[int, str]
        if len(request.headers) > app.limits.max_headers:
            decision = 431, "too many request headers"
        elif not path_matches(app.path, request.path):
            decision = 404, "no WebSocket endpoint at this path"
        elif not origin_allowed(
            request.header("origin"), request.header("host"), app.allowed_origins
        ):
            decision = 403, "origin not allowed"
        elif not await self._started():
            decision = 503, "server not started"
        else:
            decision = await decide_handshake(self.server, request)
            if isinstance(decision, Identity) and self.server.stopping:
                decision = 503, "server shutting down"  # the shutdown began meanwhile
        if not isinstance(decision, Identity):
            await self._refuse(scope, receive, send, *decision)
            return
        session = ASGISession(self.server, request, decision, send)
        self._register(session)
        self._sessions.add(session)
        try:
            await session.run(receive)
        finally:
            self._sessions.discard(session)

    def _register(self, session: ASGISession) -> None:
        """Add ``session`` to the server's registry; close the ones it replaces."""
        server = self.server
        # The registry is typed for the anyio sessions; it only calls what both offer.
        entry = cast("ServerSession", session)
        for old in server.registry.add(session.identity, session.epoch, entry):
            old.close_nowait(4000, "session replaced: the user logged in again")
        server.ip_opened(session.remote_addr)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, reason: str
    ) -> None:
        """Refuse the handshake: an HTTP response if the server can send one, else 1008."""
        extensions = scope.get("extensions") or {}
        try:
            if _HTTP_RESPONSE_EXTENSION in extensions:
                await send(
                    {
                        "type": "websocket.http.response.start",
                        "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await send(
                    {"type": "websocket.http.response.body", "body": reason.encode() + b"\n"}
                )
            else:
                await send(
                    {
                        "type": "websocket.close",
                        "code": CLOSE_REFUSED,
                        "reason": close_reason(f"HTTP {status}: {reason}"),
                    }
                )
        except OSError:
            return  # the client is gone already
        # Return once the server reports the connection closed: uvicorn's default protocol
        # logs "returned without completing handshake" for an app that returns first.
        with anyio.move_on_after(_REFUSAL_LINGER):
            while (await receive()).get("type") != "websocket.disconnect":
                pass
            await anyio.lowlevel.checkpoint()
