"""The exceptions imkit raises.

Every error imkit raises on purpose derives from :class:`ImkitError`::

    ImkitError
    ├── LocalProtocolError        you called the API in a way the protocol forbids
    ├── ConfigurationError        an option or a route table is invalid
    ├── HandlerError              raised by a route handler to answer with an ``Err`` frame
    ├── AuthenticationFailed      a handshake was refused (carries the HTTP status)
    ├── StoreError                a message store failed
    │   └── StoreUnavailable      ... in a way that is worth retrying
    ├── DiscoverError             the multi-node discovery backend failed
    └── ClientError               raised by the client library
        ├── HandshakeRejected     the server answered the upgrade with an HTTP error
        ├── ConnectionClosed      the connection is closed (carries the close code)
        ├── DeliveryFailed        a message was not acknowledged before the ack timeout
        └── RequestFailed         the server answered a request with an ``Err`` frame

A peer that misbehaves never raises out of the sans-IO core: its bad input becomes an
``Err`` frame or a close code (see :mod:`imkit.core.conn`).
"""

from __future__ import annotations

__all__ = (
    "AuthenticationFailed",
    "ClientError",
    "ConfigurationError",
    "ConnectionClosed",
    "DeliveryFailed",
    "DiscoverError",
    "HandlerError",
    "HandshakeRejected",
    "ImkitError",
    "LocalProtocolError",
    "RequestFailed",
    "StoreError",
    "StoreUnavailable",
)


class ImkitError(Exception):
    """Base class of every exception imkit raises on purpose."""


class LocalProtocolError(ImkitError):
    """The caller used the API in a way the protocol forbids (for example a duplicate id)."""


class ConfigurationError(ImkitError):
    """An option, a limit or a route table is invalid."""


class HandlerError(ImkitError):
    """Raise it in a route handler to answer the message with ``Err{code, message}``.

    ``extra`` is added to the ``Err`` frame's ``data``. Any other exception a handler
    raises is logged and answered with ``handler_error``.
    """

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.extra = extra


class AuthenticationFailed(ImkitError):
    """An :class:`~imkit.core.interfaces.Authentication` refused a handshake.

    ``status`` is the HTTP status the client receives (401 when the credential is
    missing, invalid or expired, 403 when it is valid but not allowed).
    """

    def __init__(self, reason: str = "unauthorized", *, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class StoreError(ImkitError):
    """A message store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; the operation may be retried."""


class DiscoverError(ImkitError):
    """The multi-node discovery backend failed."""


class ClientError(ImkitError):
    """Base class of the errors the client library raises."""


class HandshakeRejected(ClientError):
    """The server refused the WebSocket upgrade with an HTTP status."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"handshake rejected with HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class ConnectionClosed(ClientError):
    """The connection is closed; ``code`` and ``reason`` are the WebSocket close code and reason."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class DeliveryFailed(ClientError):
    """A message was given up: it was not acknowledged before the ack timeout."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message {message_id!r} was not acknowledged in time")
        self.message_id = message_id


class RequestFailed(ClientError):
    """The server answered a request with an ``Err`` frame."""

    def __init__(self, code: str, message: str, message_id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.message_id = message_id
