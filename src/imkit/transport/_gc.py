"""The garbage collector's young-generation threshold while a server runs.

CPython collects its youngest generation every 700 net new container objects. A
messaging server under load keeps thousands of young objects alive at once (each
message in flight holds its frame, its context, its store job...), so at 700 nearly
every collection finds survivors and promotes them, and the older generations, whose
collections walk every object, fill and run over and over. Measured in the SQLite chat
benchmark: about 10 % of the server's CPU went to the collector at 700, under 0.2 % at
10,000 (``benchmarks/README.md``). The threshold is a process-wide setting, so a server
raises it only while it serves, never lowers it, and puts back the value it found when
the last server of the process stops, unless someone else changed it meanwhile.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ("DEFAULT_GC_THRESHOLD", "check_gc_threshold", "young_generation_threshold")

DEFAULT_GC_THRESHOLD = 10_000
"""The young-generation threshold a :class:`~imkit.transport.server.Server` sets while it
serves (``gc_threshold``; CPython's own default is 700)."""

_lock = threading.Lock()
_holders = 0
_found: tuple[int, int, int] | None = None  # the thresholds before the first holder
_set: int | None = None  # the young threshold we set (None: we changed nothing)


def check_gc_threshold(threshold: int | None) -> None:
    """Raise :class:`ValueError` for a threshold :func:`young_generation_threshold`
    cannot hold (below 1)."""
    if threshold is not None and threshold < 1:
        raise ValueError("gc_threshold must be at least 1 (or None: leave the collector be)")


@contextmanager
def young_generation_threshold(threshold: int | None) -> Iterator[None]:
    """Hold the young-generation threshold at ``threshold`` or above for the block.

    ``None`` changes nothing. A threshold of 0 (the collector's automatic runs turned
    off) is left alone, as is a higher one already set. When the last block of the
    process ends, the thresholds found before the first are put back if the young one is
    still the value set here.
    """
    check_gc_threshold(threshold)
    if threshold is None:
        yield
        return
    _enter(threshold)
    try:
        yield
    finally:
        _exit()


def _enter(threshold: int) -> None:
    global _holders, _found, _set
    with _lock:
        current = gc.get_threshold()
        if _holders == 0:
            _found, _set = current, None
        _holders += 1
        if 0 < current[0] < threshold:
            gc.set_threshold(threshold, current[1], current[2])
            _set = threshold


def _exit() -> None:
    global _holders, _found, _set
    with _lock:
        _holders -= 1
        if _holders:
            return
        found, changed = _found, _set
        _found = _set = None
        if found is not None and changed is not None and gc.get_threshold()[0] == changed:
            gc.set_threshold(*found)
