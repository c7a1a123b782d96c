"""``Context.unblock()``: a handler lets its connection's next message start before it
ends; messages still start in arrival order, and ``on_disconnect`` waits for them all."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from tests.transport.helpers import Collected, logged_app

import imkit
from imkit.testing import MemoryServer
from imkit.transport._lifecycle import MAX_UNBLOCKED

pytestmark = pytest.mark.anyio


async def wait_for(log: Collected, entry: tuple[str, Any]) -> None:
    """Wait until the handlers logged ``entry``."""
    await log.wait_until(lambda entries: entry in entries)


def gated_app() -> tuple[imkit.App, anyio.Event, Collected]:
    """An app whose ``slow`` route unblocks, then waits for the gate; ``fast`` answers
    (:func:`logged_app`)."""
    app, log = logged_app()
    gate = anyio.Event()

    @app.route("slow")
    async def slow(ctx: imkit.Context) -> None:
        log.add(("start", ctx.data))
        log.add(("unblocked", ctx.unblock()))
        await gate.wait()
        log.add(("end", ctx.data))
        await ctx.reply(ctx.data)

    return app, gate, log


async def test_the_next_message_runs_while_an_unblocked_handler_waits() -> None:
    """Alice's ``slow`` 1 unblocks and waits; her ``fast`` 2 is answered meanwhile. A
    second unblock() of the same handler is refused (False)."""
    app, gate, log = gated_app()

    @app.route("twice")
    async def twice(ctx: imkit.Context) -> None:
        await ctx.reply([ctx.unblock(), ctx.unblock()])

    with anyio.fail_after(10):
        async with MemoryServer(app) as server, server.connect(user_id="alice") as alice:
            assert await alice.request("twice", None) == [True, False]
            answers: list[Any] = []

            async def ask_slow() -> None:
                answers.append(await alice.request("slow", 1))

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask_slow)
                await wait_for(log, ("unblocked", True))
                assert await alice.request("fast", 2) == 2
                assert log == [("start", 1), ("unblocked", True), ("fast", 2)]
                gate.set()
            assert answers == [1]


async def test_on_disconnect_runs_after_the_unblocked_handlers_end() -> None:
    """Alice leaves while her unblocked ``slow`` handler still waits: ``on_disconnect``
    comes only once it has ended."""
    app, gate, log = gated_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="alice") as alice:
                await alice.send("slow", 1)
                await wait_for(log, ("unblocked", True))
                assert await alice.request("fast", 2) == 2
            await anyio.sleep(0.2)
            assert ("disconnect", "alice") not in log
            gate.set()
            await wait_for(log, ("disconnect", "alice"))
            assert log.index(("end", 1)) < log.index(("disconnect", "alice"))


async def test_at_most_max_unblocked_handlers_run_on_per_connection() -> None:
    """70 ``slow`` messages at once: the first 64 unblock; the 65th is refused and holds
    the rest back (in order) until the gate opens; then all 70 are answered."""
    app, gate, log = gated_app()
    with anyio.fail_after(20):
        async with (
            MemoryServer(app, max_queued_messages=100) as server,
            server.connect(user_id="alice") as alice,
        ):
            async with anyio.create_task_group() as tg:
                for i in range(70):
                    tg.start_soon(alice.send, "slow", i)
                await wait_for(log, ("unblocked", False))
                await anyio.sleep(0.1)
                started = [value for kind, value in log if kind == "start"]
                assert len(started) == MAX_UNBLOCKED + 1
                assert [v for k, v in log if k == "unblocked"] == [True] * MAX_UNBLOCKED + [False]
                gate.set()
            await log.wait_until(lambda entries: sum(k == "end" for k, _ in entries) >= 70)
            assert sorted(value for kind, value in log if kind == "end") == list(range(70))
