"""Time for the transports: the only place imkit reads a clock or sleeps.

:class:`AnyioClock` is the real one. :class:`imkit.testing.FakeClock` implements the same
protocol so tests can move time forward instead of waiting for it.
"""

from __future__ import annotations

import math
from typing import Protocol

import anyio

__all__ = ("AnyioClock", "Clock")


class Clock(Protocol):
    """A monotonic clock the transport sleeps on."""

    def now(self) -> float:
        """The current time, in seconds."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (``math.inf``: never)."""
        ...


class AnyioClock:
    """The event loop's own monotonic clock (:func:`anyio.current_time`)."""

    def now(self) -> float:
        """The event loop's time."""
        return anyio.current_time()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` on the event loop's clock."""
        if deadline == math.inf:
            await anyio.sleep_forever()
        else:
            await anyio.sleep_until(deadline)
