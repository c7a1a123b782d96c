"""imkit's transports: the anyio server and client, and the ASGI adapter.

This is the only layer that awaits, reads the clock or touches sockets; it drives the
sans-IO core in :mod:`imkit.core`.
"""

from __future__ import annotations

from imkit.transport.clock import AnyioClock, Clock

__all__ = ("AnyioClock", "Clock")
