"""The socket path under load: many clients over 127.0.0.1, a slow consumer that is cut
off while everyone else keeps receiving, and a graceful shutdown."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import defaultdict

import anyio
import anyio.lowlevel
import pytest
from tests.transport.helpers import (
    Collected,
    RawWS,
    http_status,
    make_app,
    serve_tcp,
    upgrade_request,
    ws_url,
)

import imkit
from imkit.transport.server import Server

pytestmark = pytest.mark.anyio

CLIENTS = 200
MESSAGES = 10


async def test_200_clients_exchange_messages_exactly_once_in_order() -> None:
    """Each client sends MESSAGES to its partner through the relay route; every message
    arrives exactly once, in the order its sender sent it."""
    app, _seen = make_app()
    received: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with anyio.fail_after(60):
        async with serve_tcp(app) as server:

            async def peer(n: int, all_connected: anyio.Event, ready: list[int]) -> None:
                me, partner = f"u{n}", f"u{n ^ 1}"
                async with imkit.connect(ws_url(server, f"userId={me}")) as client:
                    ready.append(n)
                    if len(ready) == CLIENTS:
                        all_connected.set()
                    await all_connected.wait()

                    async def send_all() -> None:
                        for seq in range(MESSAGES):
                            await client.send("relay", {"to": partner, "seq": seq})

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(send_all)
                        for _ in range(MESSAGES):
                            frame = await client.receive()
                            received[me].append((frame.form_id, frame.data["seq"]))

            all_connected = anyio.Event()
            ready: list[int] = []
            async with anyio.create_task_group() as tg:
                for n in range(CLIENTS):
                    tg.start_soon(peer, n, all_connected, ready)
    assert len(received) == CLIENTS
    for n in range(CLIENTS):
        partner = f"u{n ^ 1}"
        assert received[f"u{n}"] == [(partner, seq) for seq in range(MESSAGES)]


async def test_slow_consumer_is_cut_off_and_others_keep_receiving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raw client that never reads while 8 MiB of pushes are addressed to it: once its
    unsent bytes pass max_write_buffer the server aborts its socket. What that client sees
    is a TCP reset (or end of stream), never a close frame: a WebSocket client reports
    1006. A healthy client receives every push meanwhile, in order."""
    caplog.set_level(logging.WARNING, logger="imkit")
    app, _seen = make_app()
    count, size = 256, 32 * 1024
    blob = "x" * size

    @app.route("big")
    async def big(ctx: imkit.Context) -> None:
        n = ctx.data
        await ctx.server.send_to_users(["victim", "healthy"], "big", {"n": n, "blob": blob})
        await ctx.reply(n)

    with anyio.fail_after(60):
        async with serve_tcp(app, max_write_buffer=1024 * 1024) as server:
            victim = socket.socket()
            victim.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            victim.settimeout(10)
            try:
                victim.connect(("127.0.0.1", server.port))
                victim.sendall(upgrade_request("/ws?userId=victim"))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await anyio.to_thread.run_sync(victim.recv, 1)
                assert head.startswith(b"HTTP/1.1 101")
                # From here on the victim reads nothing.
                async with (
                    imkit.connect(ws_url(server, "userId=healthy")) as healthy,
                    imkit.connect(ws_url(server, "userId=boss")) as boss,
                ):
                    got: list[int] = []

                    async def receive_all() -> None:
                        for _ in range(count):
                            got.append((await healthy.receive()).data["n"])

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(receive_all)
                        for n in range(count):
                            assert await boss.request("big", n) == n
                    assert got == list(range(count))
                    assert server.sessions("victim") == []
                    assert len(server.sessions("healthy")) == 1

                def read_to_the_end() -> bytes:
                    data = b""
                    try:
                        while chunk := victim.recv(1 << 20):
                            data += chunk
                    except ConnectionResetError:
                        data += b"<reset>"
                    return data

                leftover = await anyio.to_thread.run_sync(read_to_the_end)
                assert len(leftover) < count * size  # it was cut off long before the end
            finally:
                victim.close()
    cut = [r.getMessage() for r in caplog.records if "cutting off" in r.getMessage()]
    assert cut == [
        "cutting off a connection of 'victim': send buffer full: the client is not reading"
    ]


async def test_graceful_shutdown() -> None:
    """shutdown(): connected clients see close 1001; a handshake in progress gets 503; new
    connections are refused; on_shutdown runs; serve() returns."""
    app, _seen = make_app()
    auth_started = anyio.Event()
    auth_release = anyio.Event()
    stopped = Collected()

    class SlowAuth:
        async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
            user = request.query["userId"]
            if user == "slow":
                auth_started.set()
                await auth_release.wait()
            return imkit.Identity(user)

    app.auth = SlowAuth()

    @app.on_shutdown
    async def on_shutdown(server: imkit.ServerAPI) -> None:
        stopped.add("shutdown hook")

    server = imkit.Server(app)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def run_server(*, task_status: anyio.abc.TaskStatus[int]) -> None:
                await server.serve("127.0.0.1", 0, task_status=task_status)
                stopped.add("serve returned")

            port = await tg.start(run_server)
            url = f"ws://127.0.0.1:{port}/ws?userId="
            stack = contextlib.AsyncExitStack()
            clients = [
                await stack.enter_async_context(imkit.connect(url + f"c{n}", reconnect=False))
                for n in range(3)
            ]
            raw = RawWS(await anyio.connect_tcp("127.0.0.1", port))
            waiting = anyio.Event()
            status: list[int] = []

            async def slow_handshake() -> None:
                waiting.set()
                status.append(await raw.handshake("/ws?userId=slow"))
                await raw.stream.aclose()

            tg.start_soon(slow_handshake)
            await auth_started.wait()
            server.shutdown()
            for client in clients:
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await client.receive()
                assert (closed.value.code, closed.value.reason) == (1001, "server shutting down")
            await stack.aclose()
            auth_release.set()
            await stopped.wait_until(lambda items: "serve returned" in items)
            assert status == [503]
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", port)
    assert stopped == ["shutdown hook", "serve returned"]


async def test_cancelled_serve_still_says_goodbye() -> None:
    """serve() cancelled from outside (no shutdown()): connections are cut at once, each
    with a best-effort close 1001 first."""
    app, _seen = make_app()
    codes: list[int] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            serving = anyio.CancelScope()

            async def run_server(*, task_status: anyio.abc.TaskStatus[int]) -> None:
                with serving:
                    await imkit.serve(app, task_status=task_status)

            port = await outer.start(run_server)
            async with imkit.connect(f"ws://127.0.0.1:{port}/ws?userId=x", reconnect=False) as x:
                assert await x.request("echo", 1) == 1
                serving.cancel()
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await x.receive()
                codes.append(closed.value.code)
    assert codes == [1001]


async def test_page_served_and_head() -> None:
    app, _seen = make_app()

    @app.page("/")
    async def index(request: imkit.HandshakeRequest) -> imkit.HttpResponse:
        return imkit.HttpResponse(200, b"<h1>hi</h1>", content_type="text/html")

    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            status, answer = await http_status(server.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert status == 200 and answer.endswith(b"<h1>hi</h1>")
            assert b"Content-Type: text/html" in answer
            status, answer = await http_status(server.port, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert status == 200 and answer.endswith(b"\r\n\r\n")
            status, _ = await http_status(server.port, b"POST / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert status == 405


async def test_a_handler_pushing_many_in_a_loop_lets_the_writer_keep_up() -> None:
    """A handler sends 1,000 pushes of 2 KiB in a loop, 8 times the write buffer (and
    within the ack window plus the backlog): the pushes do not pile up in the buffer
    until the reader is cut off, because ``send_to_users`` yields every so often and the
    writer flushes meanwhile. The reader gets all of them, in order, and stays
    connected."""
    app, _seen = make_app()
    count, blob = 1000, "y" * 2048

    @app.route("spray")
    async def spray(ctx: imkit.Context) -> None:
        for n in range(count):
            await ctx.server.send_to_users(["reader"], "spray", {"n": n, "blob": blob})

    with anyio.fail_after(60):
        async with serve_tcp(app, max_write_buffer=256 * 1024) as server:
            async with (
                imkit.connect(ws_url(server, "userId=reader")) as reader,
                imkit.connect(ws_url(server, "userId=boss")) as boss,
            ):
                await boss.send("spray", None)
                got = [(await reader.receive()).data["n"] for _ in range(count)]
                assert got == list(range(count))
                assert len(server.sessions("reader")) == 1


async def test_a_session_past_an_eighth_of_the_write_buffer_makes_the_next_push_yield(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a session tells (``note_unsent``) decides whether ``send_to_users`` yields at
    once: under an eighth of ``max_write_buffer`` it goes on without a checkpoint; past
    it, the next call yields (once), so that the writers run."""
    app, _seen = make_app()
    server = Server(app, max_write_buffer=8 * 1024)
    checkpoints: list[None] = []
    checkpoint = anyio.lowlevel.checkpoint

    async def counting() -> None:
        checkpoints.append(None)
        await checkpoint()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", counting)
    server.note_unsent(1024)  # exactly an eighth: not pressed
    await server.send_to_users([], "m", None)
    assert checkpoints == []
    server.note_unsent(1025)
    await server.send_to_users([], "m", None)
    assert len(checkpoints) == 1
    await server.send_to_users([], "m", None)  # yielded: not pressed any more
    assert len(checkpoints) == 1
