"""``Context.defer()``: a handler returns before its message is done and answers it later
from a callback (no task kept per message); messages still start in arrival order,
``on_disconnect`` waits for every deferred message, at most 16 are deferred per
connection, and what an ``end(then)`` step raises is answered as a handler's error."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from tests.transport.helpers import Collected, logged_app

import imkit
from imkit.core.frames import ErrorCode
from imkit.exceptions import HandlerError, RequestFailed
from imkit.testing import MemoryServer
from imkit.transport._lifecycle import MAX_UNBLOCKED

pytestmark = pytest.mark.anyio


def deferring_app() -> tuple[imkit.App, dict[Any, imkit.Deferred], Collected]:
    """An app whose ``later`` route defers and returns, leaving the test to answer; its
    ``fast`` route answers at once (:func:`logged_app`)."""
    app, log = logged_app()
    held: dict[Any, imkit.Deferred] = {}

    @app.route("later")
    async def later(ctx: imkit.Context) -> None:
        deferred = ctx.defer()
        log.add(("deferred", ctx.data, deferred is not None))
        if deferred is None:
            await ctx.reply({"inline": ctx.data})
            log.add(("inline", ctx.data))
            return
        held[ctx.data] = deferred
        log.add(("returned", ctx.data))

    return app, held, log


async def test_deferred_messages_are_answered_later_in_the_order_their_callbacks_run() -> None:
    """Alice's ``later`` 1 and 2 return at once (her ``fast`` 3 is answered meanwhile);
    answered 2 then 1 from outside the handlers, she gets each answer under its id; a
    second ``end()`` does nothing."""
    app, held, log = deferring_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server, server.connect(user_id="alice") as alice:
            answers: dict[int, Any] = {}

            async def ask(value: int) -> None:
                answers[value] = await alice.request("later", value)

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, 1)
                await log.wait_until(lambda e: ("returned", 1) in e)
                tg.start_soon(ask, 2)
                await log.wait_until(lambda e: ("returned", 2) in e)
                assert await alice.request("fast", 3) == 3
                assert answers == {}
                held[2].reply({"late": 2})
                held[2].end()
                held[2].end()
                await anyio.sleep(0.05)
                assert answers == {2: {"late": 2}}
                held[1].reply({"late": 1}, acked=False)
                held[1].end()
            assert answers == {1: {"late": 1}, 2: {"late": 2}}
            assert log[:2] == [("deferred", 1, True), ("returned", 1)]


async def test_on_disconnect_runs_after_every_deferred_message_ends() -> None:
    """Alice leaves with a deferred message open: ``on_disconnect`` waits for its end."""
    app, held, log = deferring_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="alice") as alice:
                await alice.send("later", 1)
                await log.wait_until(lambda e: ("returned", 1) in e)
            await anyio.sleep(0.2)
            assert ("disconnect", "alice") not in log
            held[1].end()
            await log.wait_until(lambda e: ("disconnect", "alice") in e)


async def test_at_most_max_unblocked_messages_are_deferred_per_connection() -> None:
    """20 ``later`` messages at once: 16 are deferred; the 17th gets ``None`` and answers
    in its handler (the rest follow in order, deferred again once that one returned)."""
    app, held, log = deferring_app()
    with anyio.fail_after(10):
        async with (
            MemoryServer(app, max_queued_messages=100) as server,
            server.connect(user_id="alice") as alice,
        ):
            for i in range(20):
                await alice.send("later", i)
            await log.wait_until(lambda e: sum(k == "deferred" for k, *_ in e) == 20)
            flags = [ok for kind, _, *rest in log if kind == "deferred" for ok in rest]
            assert flags == [True] * MAX_UNBLOCKED + [False] + [False] * 3
            assert [value for kind, value, *_ in log if kind == "inline"] == [16, 17, 18, 19]
            held[0].end()
            await alice.send("later", 20)
            await log.wait_until(lambda e: ("returned", 20) in e)
            for deferred in held.values():
                deferred.end()


async def test_an_awaiting_end_step_runs_and_its_errors_are_answered_like_a_handlers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``end(then)``: ``then`` runs in a task (it may await); the message counts as open
    until it returns. A HandlerError it raises reaches the client as that Err; another
    exception is logged and answered HANDLER_ERROR; ``fail()`` does the same at once."""
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))
    ran = Collected()

    @app.route("steps")
    async def steps(ctx: imkit.Context) -> None:
        deferred = ctx.defer()
        assert deferred is not None
        kind = ctx.data

        async def then() -> None:
            await anyio.sleep(0.01)
            ran.add(kind)
            if kind == "refuse":
                raise HandlerError(ErrorCode.FORBIDDEN, "not yours")
            if kind == "bug":
                raise RuntimeError("a bug in a step")
            deferred.reply("fine")

        if kind == "fail-now":
            deferred.fail(HandlerError(ErrorCode.BAD_REQUEST, "refused at once"))
            deferred.end()
        else:
            deferred.end(then)

    with anyio.fail_after(10):
        async with MemoryServer(app) as server, server.connect(user_id="alice") as alice:
            assert await alice.request("steps", "ok") == "fine"
            with pytest.raises(RequestFailed) as refused:
                await alice.request("steps", "refuse")
            assert (refused.value.code, refused.value.message) == (ErrorCode.FORBIDDEN, "not yours")
            with caplog.at_level(logging.ERROR, logger="imkit"):
                with pytest.raises(RequestFailed) as bug:
                    await alice.request("steps", "bug")
            assert bug.value.code == ErrorCode.HANDLER_ERROR
            assert "a bug in a step" in caplog.text
            with pytest.raises(RequestFailed) as now:
                await alice.request("steps", "fail-now")
            assert (now.value.code, now.value.message) == (ErrorCode.BAD_REQUEST, "refused at once")
            assert ran == ["ok", "refuse", "bug"]


async def test_push_here_reaches_this_nodes_connections_at_once() -> None:
    """``push_here`` (what a deferred message's callback pushes with) hands the push to
    every connection of the user on this node and says how many; on a single node
    ``send_to_users(..., here=False)`` reaches nobody more. Bob gets the push once."""
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True), login_policy="multi")

    @app.route("push")
    async def push(ctx: imkit.Context) -> None:
        server = ctx.server
        here = server.push_here(["bob"], "chat", ctx.data, form_id=ctx.user_id)
        elsewhere = await server.send_to_users(["bob"], "chat", ctx.data, here=False)
        await ctx.reply([here, elsewhere, server.single_node])

    with anyio.fail_after(10):
        async with (
            MemoryServer(app) as server,
            server.connect(user_id="alice") as alice,
            server.connect(query={"userId": "bob", "deviceId": "phone"}) as phone,
            server.connect(query={"userId": "bob", "deviceId": "laptop"}) as laptop,
        ):
            assert await alice.request("push", {"n": 1}) == [2, 0, True]
            for bob in (phone, laptop):
                got = await bob.receive()
                assert (got.method, got.data, got.form_id) == ("chat", {"n": 1}, "alice")
            assert await alice.request("push", {"n": 2}) == [2, 0, True]
            assert (await phone.receive()).data == {"n": 2}, "one push each time, no repeat"


async def test_an_end_step_starts_from_a_callback_outside_any_task(anyio_backend: str) -> None:
    """A store's worker thread ends a deferred message through the event loop's
    thread-safe entry (asyncio's ``call_soon_threadsafe``, trio's token): no task, not
    even the context of one. Its awaiting step still starts, and the answer arrives."""
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))

    @app.route("from_thread")
    async def from_thread(ctx: imkit.Context) -> None:
        deferred = ctx.defer()
        assert deferred is not None
        if anyio_backend == "asyncio":
            soon = asyncio.get_running_loop().call_soon_threadsafe
        else:
            import trio.lowlevel

            soon = trio.lowlevel.current_trio_token().run_sync_soon

        async def then() -> None:
            await anyio.lowlevel.checkpoint()
            deferred.reply("from a step")

        threading.Thread(target=soon, args=(deferred.end, then)).start()

    with anyio.fail_after(10):
        async with MemoryServer(app) as server, server.connect(user_id="alice") as alice:
            assert await alice.request("from_thread", None, timeout=5) == "from a step"
