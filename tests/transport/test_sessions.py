"""Login policies and the session hooks, over imkit.testing's in-memory streams."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from tests.transport.helpers import Collected, RawWS, make_app

import imkit
from imkit.testing import FakeClock, MemoryServer

pytestmark = pytest.mark.anyio


# ----------------------------------------------------------------------------- policies
async def test_single_login_replaces_the_old_connection_with_4000() -> None:
    app, _seen = make_app(login_policy="single")
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            old = RawWS(server.open_stream())
            assert await old.handshake("/ws?userId=alice") == 101
            old_session = server.sessions("alice")[0]
            async with (
                server.connect(user_id="alice") as new,
                server.connect(user_id="carol") as carol,
            ):
                # The new connection is registered at once; the old one is only closing.
                assert server.sessions("alice") != [old_session]
                assert len(server.sessions("alice")) == 1
                # The old client reads its close frame late; its close completes only now.
                closed = await old.wait_closed()
                assert (closed.code, closed.reason) == (
                    4000,
                    "session replaced: the user logged in again",
                )
                await old_session.wait_closed()  # type: ignore[attr-defined]
                # The late close did not unregister the newer connection: pushes reach it.
                assert len(server.sessions("alice")) == 1
                await carol.send("relay", {"to": "alice", "text": "still there?"})
                push = await new.receive()
                assert (push.method, push.data["text"], push.form_id) == (
                    "chat",
                    "still there?",
                    "carol",
                )


async def test_single_login_imkit_client_sees_4000_and_does_not_reconnect() -> None:
    app, _seen = make_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="bob") as first:
                async with server.connect(user_id="bob") as second:
                    with pytest.raises(imkit.ConnectionClosed) as closed:
                        await first.receive()
                    assert closed.value.code == 4000
                    assert first.connections == 1  # no reconnect after "session replaced"
                    assert await second.request("echo", "me") == "me"


async def test_multi_login_keeps_every_device() -> None:
    app, _seen = make_app(login_policy="multi")
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with (
                server.connect(user_id="alice", query={"deviceId": "phone"}) as phone,
                server.connect(user_id="alice", query={"deviceId": "laptop"}) as laptop,
                server.connect(user_id="carol") as carol,
            ):
                assert sorted(s.device_id for s in server.sessions("alice")) == ["laptop", "phone"]
                await carol.send("relay", {"to": "alice", "n": 1})
                assert (await phone.receive()).data["n"] == 1
                assert (await laptop.receive()).data["n"] == 1
                # The same device again replaces only that device's connection.
                async with server.connect(user_id="alice", query={"deviceId": "phone"}) as phone2:
                    with pytest.raises(imkit.ConnectionClosed) as closed:
                        await phone.receive()
                    assert closed.value.code == 4000
                    await carol.send("relay", {"to": "alice", "n": 2})
                    assert (await phone2.receive()).data["n"] == 2
                    assert (await laptop.receive()).data["n"] == 2


# ----------------------------------------------------------------------------- hooks
async def test_on_connect_pushes_come_before_fan_out_sent_meanwhile() -> None:
    app, _seen = make_app()
    log = Collected()

    @app.on_connect
    async def greet(session: imkit.Session, server: imkit.ServerAPI) -> None:
        log.add(("connect", session.user_id))
        await session.push("hello", {"n": 1})
        # A fan-out push sent while the hooks run is held until they finish.
        await server.send_to_users([session.user_id], "fanout", {"n": 2})
        await session.push("hello", {"n": 3})

    @app.on_disconnect
    async def bye(session: imkit.Session, server: imkit.ServerAPI) -> None:
        log.add(("disconnect", session.user_id, len(server.sessions(session.user_id))))

    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="dora") as client:
                got = [await client.receive() for _ in range(3)]
                assert [(f.method, f.data["n"]) for f in got] == [
                    ("hello", 1),
                    ("hello", 3),
                    ("fanout", 2),
                ]
            await log.wait_until(lambda items: len(items) == 2)
    # on_disconnect runs once the session has left the registry.
    assert log == [("connect", "dora"), ("disconnect", "dora", 0)]


async def test_a_hooks_release_filter_outlives_the_servers_own_release() -> None:
    """An ``on_connect`` hook that releases the fan-out with a filter (as the chat
    catch-up does) keeps that filter for the pushes that arrive later: the server's own
    release after the hooks does not drop it. (It did: a message stored just as a device
    connected was pushed twice, by the catch-up and live.)"""
    app, _seen = make_app()

    @app.on_connect
    async def catch_up(session: imkit.Session, server: imkit.ServerAPI) -> None:
        await session.push("caught_up", {"n": 1})
        await session.release(lambda frame: frame.data != {"n": 1})

    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="erin") as client:
                first = await client.receive()
                assert (first.method, first.data) == ("caught_up", {"n": 1})
                # The hooks are over, so is the server's release; the live copy comes now.
                await anyio.wait_all_tasks_blocked()
                await server.send_to_users(["erin"], "live", {"n": 1})  # already sent
                await server.send_to_users(["erin"], "live", {"n": 2})
                got = await client.receive()
                assert (got.method, got.data) == ("live", {"n": 2})


async def test_delivery_hooks_report_acks_timeouts_and_closes() -> None:
    clock = FakeClock()
    app, _seen = make_app()
    delivered = Collected()
    failed = Collected()
    order = Collected()

    @app.route("push_me")
    async def push_me(ctx: imkit.Context) -> None:
        await ctx.session.push("pushed", ctx.data)

    @app.on_delivered
    async def on_delivered(session: imkit.Session, frame: imkit.Frame) -> None:
        if frame.method == "pushed":
            delivered.add(frame.data)

    @app.on_delivery_failed
    async def on_failed(session: imkit.Session, frame: imkit.Frame, reason: str) -> None:
        failed.add((frame.method, frame.data, reason))
        order.add("failed")

    @app.on_disconnect
    async def on_disconnect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        order.add("disconnect")

    timers = imkit.AckTimers()
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=erin") == 101

            async def ask(n: int) -> dict[str, object]:
                """Ask for a push; return it (after the ack of the request)."""
                await raw.send_json(
                    {"frameType": 0, "id": f"q{n}", "method": "push_me", "data": {"n": n}}
                )
                frames = [await raw.recv_json(), await raw.recv_json()]
                push = next(f for f in frames if f and f["frameType"] == 0)
                assert push["method"] == "pushed"
                return push

            # Acked: on_delivered.
            push = await ask(1)
            await raw.send_json({"frameType": 2, "id": push["id"], "ackSeq": 1})
            await delivered.wait_until(lambda items: items == [{"n": 1}])
            # Never acked: resent, then given up after the ack timeout.
            push = await ask(2)
            await clock.advance_by(timers.ack_timeout + timers.resend_interval)
            await failed.wait_until(bool)
            assert failed == [("pushed", {"n": 2}, "timeout")]
            # In flight when the client leaves: "closed", before on_disconnect.
            push = await ask(3)
            await raw.close()
            await order.wait_until(lambda items: "disconnect" in items)
    assert failed[-1] == ("pushed", {"n": 3}, "closed")
    assert order == ["failed", "failed", "disconnect"]


async def test_acked_message_is_handled_after_the_client_left() -> None:
    """A message the server acknowledged is handled even if the client leaves first; the
    handler's reply then fails visibly (on_delivery_failed "closed"), before
    on_disconnect."""
    app, _seen = make_app()
    release = anyio.Event()
    log = Collected()

    @app.route("slow")
    async def slow(ctx: imkit.Context) -> None:
        await release.wait()
        log.add("handled")
        await ctx.reply("too late")

    @app.on_delivery_failed
    async def on_failed(session: imkit.Session, frame: imkit.Frame, reason: str) -> None:
        log.add(("failed", frame.reply_to, reason))

    @app.on_disconnect
    async def on_disconnect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        log.add("disconnect")

    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="finn") as client:
                await client.send("slow", None, message_id="s1")  # acked, not yet handled
            assert client.last_close is not None and client.last_close.code == 1000
            release.set()
            await log.wait_until(lambda items: "disconnect" in items)
    assert log == ["handled", ("failed", "s1", "closed"), "disconnect"]


async def test_a_plain_on_delivered_hook_runs_as_the_ack_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain-function ``on_delivered`` hook is called as the ack is read, even while the
    connection's worker is busy with a handler; what it returns to await runs in order,
    after that handler, as an ``async def`` hook's body does. A plain hook that raises is
    logged; the other hooks still run and the connection goes on."""
    app, _seen = make_app()
    log = Collected()
    release = anyio.Event()

    @app.route("block")
    async def block(ctx: imkit.Context) -> None:
        await release.wait()
        log.add("handler done")

    async def later(frame: imkit.Frame) -> None:
        log.add(("later", frame.data))

    @app.on_delivered
    def at_once(session: imkit.Session, frame: imkit.Frame) -> Any:
        log.add(("at once", frame.data))
        return later(frame)

    @app.on_delivered
    def broken(session: imkit.Session, frame: imkit.Frame) -> None:
        raise RuntimeError("hook bug")

    @app.on_delivered
    async def in_order(session: imkit.Session, frame: imkit.Frame) -> None:
        log.add(("async", frame.data))

    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=erin") == 101
            await server.send_to_users(["erin"], "pushed", {"n": 1})
            push = await raw.recv_json()
            assert push is not None and push["method"] == "pushed"
            await raw.send_json({"frameType": 0, "id": "b1", "method": "block", "data": {}})
            ack = await raw.recv_json()
            assert ack is not None and (ack["frameType"], ack["id"]) == (2, "b1")
            await raw.send_json({"frameType": 2, "id": push["id"], "ackSeq": 1})
            # The handler still holds the worker: only the plain hook has run.
            await log.wait_until(lambda items: ("at once", {"n": 1}) in items)
            await anyio.wait_all_tasks_blocked()
            assert log == [("at once", {"n": 1})]
            release.set()
            await log.wait_until(lambda items: len(items) == 4)
            assert log == [
                ("at once", {"n": 1}),
                "handler done",
                ("later", {"n": 1}),
                ("async", {"n": 1}),
            ]
            # The connection goes on: another push is delivered and reported.
            await server.send_to_users(["erin"], "pushed", {"n": 2})
            push = await raw.recv_json()
            assert push is not None
            await raw.send_json({"frameType": 2, "id": push["id"], "ackSeq": 1})
            await log.wait_until(lambda items: ("async", {"n": 2}) in items)
            await raw.close()
    assert caplog.text.count("a delivery hook failed for 'erin'") == 2
    assert "hook bug" in caplog.text


async def test_push_many_sends_what_the_window_has_room_for_and_leaves_the_rest() -> None:
    """``push_many`` sends at once as many as the ack window takes (here 4 of 10), takes
    nothing more from the iterator, and the hook goes on with ``push`` (which waits for
    room); the client gets all ten in order. On a closed session it sends nothing and
    takes nothing."""
    app, _seen = make_app(timers=imkit.AckTimers(window=4))
    log = Collected()

    @app.on_connect
    async def catch_up(session: imkit.Session, server: imkit.ServerAPI) -> None:
        items = iter([({"n": n}, "sys") for n in range(10)])
        frames = session.push_many("caught_up", items)
        log.add(("at once", [f.data["n"] for f in frames]))
        for data, form_id in items:
            await session.push("caught_up", data, form_id=form_id)

    @app.on_disconnect
    async def gone(session: imkit.Session, server: imkit.ServerAPI) -> None:
        items = iter([({"n": 99}, "")])
        log.add(("closed", session.push_many("late", items), next(items)))

    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="fay") as client:
                got = [await client.receive() for _ in range(10)]
                assert [(f.method, f.data["n"], f.form_id) for f in got] == [
                    ("caught_up", n, "sys") for n in range(10)
                ]
            await log.wait_until(lambda items: len(items) == 2)
    assert log == [("at once", [0, 1, 2, 3]), ("closed", [], ({"n": 99}, ""))]


async def test_push_many_stops_when_the_write_buffer_is_half_full() -> None:
    """Past half of ``max_write_buffer`` unsent (what ``push`` waits for), ``push_many``
    stops: it looks at the buffer every ``PUSH_BATCH`` (64) messages. Each push here is
    150-170 bytes: one batch leaves the buffer under 15,000 bytes, two fill it, the third
    is not started."""
    app, _seen = make_app(timers=imkit.AckTimers(window=1000))
    log = Collected()

    @app.on_connect
    async def catch_up(session: imkit.Session, server: imkit.ServerAPI) -> None:
        items = iter([({"text": "x" * 40}, "sys") for _ in range(300)])
        log.add(len(session.push_many("caught_up", items)))
        for data, form_id in items:
            await session.push("caught_up", data, form_id=form_id)

    with anyio.fail_after(10):
        async with MemoryServer(app, max_write_buffer=30_000) as server:
            async with server.connect(user_id="gil") as client:
                got = [await client.receive() for _ in range(300)]
                assert len(got) == 300
    assert log == [128]
