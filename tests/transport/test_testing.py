"""imkit.testing itself: the fake clock, the in-memory streams, and the documented example."""

from __future__ import annotations

import re
import textwrap
from typing import Any

import anyio
import pytest
from tests.transport.helpers import make_app

import imkit
import imkit.testing
from imkit.testing import FakeClock, MemoryServer, connect_pair, memory_stream_pair

pytestmark = pytest.mark.anyio


# ----------------------------------------------------------------------------- FakeClock
async def test_fake_clock_wakes_each_sleeper_at_its_deadline_in_order() -> None:
    clock = FakeClock(start=100.0, wall=5000.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append((name, clock.now()))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name, deadline in [("c", 130.0), ("a", 110.0), ("b", 120.0), ("late", 500.0)]:
                tg.start_soon(sleeper, name, deadline)
            await anyio.wait_all_tasks_blocked()
            assert (clock.sleepers, clock.next_deadline) == (4, 110.0)
            await clock.advance_to(125.0)
            assert woke == [("a", 110.0), ("b", 120.0)]
            assert clock.now() == 125.0 and clock.wall() == 5025.0
            await clock.advance_by(10)
            assert woke[-1] == ("c", 130.0)
            tg.cancel_scope.cancel()
    assert clock.sleepers == 0  # the cancelled sleeper was forgotten


async def test_fake_clock_advance_is_immediate_and_never_backwards() -> None:
    clock = FakeClock()
    event = anyio.Event()

    async def sleeper() -> None:
        await clock.sleep_until(5.0)
        event.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            await anyio.wait_all_tasks_blocked()
            clock.advance(4.9)
            await anyio.wait_all_tasks_blocked()
            assert not event.is_set()
            clock.advance(0.1)
            await event.wait()
        await clock.sleep_until(1.0)  # in the past: returns at once
        with pytest.raises(ValueError):
            clock.advance(-1)
        with pytest.raises(ValueError):
            await clock.advance_by(-1)


async def test_sleepers_set_while_advancing_are_honoured() -> None:
    """advance_to() also fires deadlines that woken tasks set before the target."""
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep_until(clock.now() + 2)
            ticks.append(clock.now())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await clock.advance_to(7)
            tg.cancel_scope.cancel()
    assert ticks == [2, 4, 6]


# ----------------------------------------------------------------------------- streams
async def test_memory_streams_behave_like_a_socket() -> None:
    a, b = memory_stream_pair(buffer=2)
    with anyio.fail_after(5):
        await a.send(b"hello world")
        assert await b.receive(5) == b"hello"
        assert await b.receive() == b" world"
        await a.send(b"")  # nothing to send: no chunk
        # Backpressure: the third chunk waits until the peer reads.
        await a.send(b"1")
        await a.send(b"2")
        with anyio.move_on_after(0.05) as blocked:
            await a.send(b"3")
        assert blocked.cancelled_caught
        assert await b.receive() == b"1"
        # Half-close: the peer reads what was sent, then end of stream; it can still send.
        await a.send_eof()
        assert await b.receive() == b"2"
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        await b.send(b"reply")
        assert await a.receive() == b"reply"
        # Full close: the peer's sends fail; this end refuses use.
        await a.aclose()
        with pytest.raises(anyio.BrokenResourceError):
            await b.send(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await a.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await a.send(b"x")
        assert a.closed and not b.closed


async def test_cut_ends_both_sides_and_wakes_a_pending_receive() -> None:
    a, b = memory_stream_pair()
    results: list[Any] = []

    async def reader() -> None:
        try:
            results.append(await b.receive())
        except anyio.EndOfStream:
            results.append("eof")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            a.cut()
        assert results == ["eof"]
        with pytest.raises(anyio.BrokenResourceError):
            await b.send(b"x")


# ----------------------------------------------------------------------------- the pair
async def test_documented_example_runs() -> None:
    """The example in imkit.testing's docstring, run as written."""
    doc = imkit.testing.__doc__ or ""
    block = re.search(r"Test a route.*?::\n\n(.*?)\n\n(?=\S)", doc, re.S)
    assert block is not None
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(block.group(1)), namespace)
    with anyio.fail_after(10):
        await namespace["test_echo"]()


async def test_connect_pair_shares_the_clock_and_runs_hooks() -> None:
    clock = FakeClock()
    app, _seen = make_app()
    events: list[str] = []

    @app.on_startup
    async def started(server: imkit.ServerAPI) -> None:
        events.append("startup")

    @app.on_shutdown
    async def stopped(server: imkit.ServerAPI) -> None:
        events.append("shutdown")

    with anyio.fail_after(10):
        async with connect_pair(app, user_id="pat", clock=clock) as (server, client):
            assert server.clock is clock and client.clock is clock
            assert isinstance(server, imkit.Server)
            assert [s.user_id for s in server.sessions("pat")] == ["pat"]
            assert await client.request("echo", {"x": 1}) == {"x": 1}
            assert client.last_close is None
    assert events == ["startup", "shutdown"]
    assert client.last_close is not None and client.last_close.code == 1000


async def test_memory_server_needs_async_with() -> None:
    app, _seen = make_app()
    server = MemoryServer(app)
    with pytest.raises(RuntimeError):
        server.open_stream()
