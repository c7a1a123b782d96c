"""Find the external services (PostgreSQL, Redis) that some tests need.

``require_postgres_dsn()`` and ``require_redis_url()`` return the address of a
reachable server, or skip the calling test with the reason. With
``IMKIT_REQUIRE_SERVICES=1`` in the environment (CI) an unreachable service fails the
test instead, so a broken service cannot turn the suite green by skipping.

Addresses default to 127.0.0.1 and can be overridden with ``IMKIT_POSTGRES_DSN`` and
``IMKIT_REDIS_URL``. The checks are synchronous (a socket and a few bytes of
each protocol), so they can be called from fixtures running inside an event loop.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from urllib.parse import urlsplit

import pytest

__all__ = ("require_postgres_dsn", "require_redis_url", "services_required")

DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
_TIMEOUT = 2.0


def services_required() -> bool:
    """Whether ``IMKIT_REQUIRE_SERVICES=1``: a missing service is a failure, not a skip."""
    return os.environ.get("IMKIT_REQUIRE_SERVICES", "").strip() == "1"


def _unavailable(what: str, reason: str) -> None:
    message = f"{what} is not available: {reason}"
    if services_required():
        pytest.fail(f"{message} (IMKIT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(f"{message} (set IMKIT_REQUIRE_SERVICES=1 to fail instead)")


@functools.cache
def _probe_postgres(host: str, port: int) -> str | None:
    """``None`` if a PostgreSQL server answers at host:port, else the reason it does not."""
    try:
        with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
            sock.settimeout(_TIMEOUT)
            # SSLRequest: every PostgreSQL server answers it with one byte, "S" or "N".
            sock.sendall(struct.pack("!ii", 8, 80877103))
            answer = sock.recv(1)
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc}"
    if answer not in (b"S", b"N"):
        return f"{host}:{port} does not speak the PostgreSQL protocol (got {answer!r})"
    return None


@functools.cache
def _probe_redis(host: str, port: int) -> str | None:
    """``None`` if a Redis server answers PING at host:port, else the reason it does not."""
    try:
        with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
            sock.settimeout(_TIMEOUT)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc}"
    if not answer.startswith((b"+PONG", b"-NOAUTH")):
        return f"{host}:{port} did not answer PING like Redis (got {answer!r})"
    return None


def require_postgres_dsn() -> str:
    """The DSN of a reachable PostgreSQL server, or skip (fail under CI) the test."""
    dsn = os.environ.get("IMKIT_POSTGRES_DSN") or DEFAULT_POSTGRES_DSN
    parts = urlsplit(dsn)
    reason = _probe_postgres(parts.hostname or "127.0.0.1", parts.port or 5432)
    if reason is not None:
        _unavailable("PostgreSQL", reason)
    return dsn


def require_redis_url() -> str:
    """The URL of a reachable Redis server, or skip (fail under CI) the test."""
    url = os.environ.get("IMKIT_REDIS_URL") or DEFAULT_REDIS_URL
    parts = urlsplit(url)
    reason = _probe_redis(parts.hostname or "127.0.0.1", parts.port or 6379)
    if reason is not None:
        _unavailable("Redis", reason)
    return url
