"""Time for the transports: the only place imkit reads a clock or sleeps.

:class:`AnyioClock` is the real one. :class:`imkit.testing.FakeClock` implements the same
protocol so tests can move time forward instead of waiting for it.

Two kinds of time are read: :meth:`Clock.now` is monotonic and drives every deadline of the
sans-IO core (resends, ack timeouts, keepalive, idle timeout); :meth:`Clock.wall` is the
wall clock, used only to turn a credential's ``expires_at`` (seconds since the epoch) into
a deadline on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Protocol

import anyio

__all__ = ("AnyioClock", "Clock")


class Clock(Protocol):
    """A monotonic clock the transport sleeps on, and the wall clock beside it."""

    def now(self) -> float:
        """The current monotonic time, in seconds."""
        ...

    def wall(self) -> float:
        """The current wall-clock time, in seconds since the epoch."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (``math.inf``: never)."""
        ...


class AnyioClock:
    """The event loop's own monotonic clock (:func:`anyio.current_time`) and
    :func:`time.time`."""

    __slots__ = ("_loop", "_thread")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def now(self) -> float:
        """The event loop's time (what :func:`anyio.current_time` returns)."""
        # Read several times per message. asyncio.get_running_loop() makes a getpid()
        # system call each time (CPython checks for a fork), so the loop found last is
        # kept: while it runs on this thread, it is the running loop here.
        loop = self._loop
        if loop is not None and self._thread == threading.get_ident() and loop.is_running():
            return loop.time()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
            return anyio.current_time()
        self._loop, self._thread = loop, threading.get_ident()
        return loop.time()

    def wall(self) -> float:
        """Seconds since the epoch (:func:`time.time`)."""
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` on the event loop's clock."""
        if deadline == math.inf:
            await anyio.sleep_forever()
        else:
            await anyio.sleep_until(deadline)
