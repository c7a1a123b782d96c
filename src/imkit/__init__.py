"""imkit: ack-aware WebSocket instant-messaging servers.

::

    import imkit

    app = imkit.App(auth=imkit.TokenAuth(secret))

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data)

    app.run(port=8000)

The layers: :mod:`imkit.core` (sans-IO: frames, acks, connections, routing),
:mod:`imkit.transport` (anyio server and client, ASGI), :mod:`imkit.chat` (private chat and
offline messages), :mod:`imkit.integrations` (Redis discovery, PostgreSQL store).
This module imports no optional dependency.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from imkit.auth import InsecureDevAuth, JWTAuth, TokenAuth, mint_token
from imkit.core.ack import AckMode, AckTimers
from imkit.core.conn import ConnLimits
from imkit.core.frames import ErrorCode, Frame, FrameType
from imkit.core.interfaces import (
    Authentication,
    Binding,
    Discover,
    Forward,
    HandshakeRequest,
    Identity,
    SingleNode,
)
from imkit.core.peer import PeerOptions
from imkit.core.server import (
    App,
    Context,
    Deferred,
    HttpResponse,
    LoginPolicy,
    ServerAPI,
    Session,
)
from imkit.exceptions import (
    AuthenticationFailed,
    ClientError,
    ConfigurationError,
    ConnectionClosed,
    DeliveryFailed,
    DiscoverError,
    HandlerError,
    HandshakeRejected,
    ImkitError,
    LocalProtocolError,
    RequestFailed,
    StoreError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from imkit.transport.client import Client, connect
    from imkit.transport.server import Server, run, serve

# The transport (anyio) is imported on first use, so that ``import imkit.core`` (which
# imports this package first) stays free of event loops and sockets (STYLE: the sans-IO
# boundary, checked by tests/core/test_boundary.py).
_LAZY = {
    "Client": "imkit.transport.client",
    "connect": "imkit.transport.client",
    "Server": "imkit.transport.server",
    "run": "imkit.transport.server",
    "serve": "imkit.transport.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0.dev0"

__all__ = (
    "AckMode",
    "AckTimers",
    "App",
    "Authentication",
    "AuthenticationFailed",
    "Binding",
    "Client",
    "ClientError",
    "ConfigurationError",
    "ConnLimits",
    "ConnectionClosed",
    "Context",
    "Deferred",
    "DeliveryFailed",
    "Discover",
    "DiscoverError",
    "ErrorCode",
    "Forward",
    "Frame",
    "FrameType",
    "HandlerError",
    "HandshakeRejected",
    "HandshakeRequest",
    "HttpResponse",
    "Identity",
    "ImkitError",
    "InsecureDevAuth",
    "JWTAuth",
    "LocalProtocolError",
    "LoginPolicy",
    "PeerOptions",
    "RequestFailed",
    "Server",
    "ServerAPI",
    "Session",
    "SingleNode",
    "StoreError",
    "StoreUnavailable",
    "TokenAuth",
    "connect",
    "mint_token",
    "run",
    "serve",
)
