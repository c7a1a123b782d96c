"""AnyioClock: the running event loop's clock, found again when the loop changes."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from imkit.transport.clock import AnyioClock


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_now_is_the_running_loops_time(anyio_backend: str) -> None:
    clock = AnyioClock()
    before = anyio.current_time()
    first = clock.now()
    second = clock.now()
    assert before <= first <= second <= anyio.current_time()


class _ShiftedLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is far from the default one: reading the wrong loop shows."""

    def time(self) -> float:
        return super().time() + 1_000_000.0


def test_a_new_loop_on_the_same_thread_is_found_again() -> None:
    clock = AnyioClock()

    async def read() -> tuple[float, float]:
        return clock.now(), asyncio.get_running_loop().time()

    for make in (asyncio.new_event_loop, _ShiftedLoop, asyncio.new_event_loop):
        loop = make()
        try:
            now, loop_time = loop.run_until_complete(read())
        finally:
            loop.close()
        assert loop_time - 1 < now <= loop_time


def test_outside_a_loop_it_asks_anyio() -> None:
    clock = AnyioClock()
    with pytest.raises(RuntimeError):  # anyio's NoEventLoopError, or sniffio's
        clock.now()
