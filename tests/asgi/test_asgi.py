"""The ASGI adapter, under uvicorn with real WebSocket clients and at the ASGI level.

Under uvicorn (asyncio): every ack mode both ways, relay between users, handshake refusals
as HTTP statuses, Err frames for garbage, the single-login close, pages, lifespan. At the
ASGI level (asyncio and trio, hand-made receive/send): the refusal without the
``websocket.http.response`` extension, a whole session, and deadline-driven resends.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import uvicorn
import websockets
from tests.transport.helpers import RevocableAuth
from websockets.asyncio.client import connect as ws_connect

import imkit
from imkit.core.ack import AckTimers
from imkit.core.conn import ConnLimits
from imkit.core.peer import PeerOptions
from imkit.testing import FakeClock
from imkit.transport.asgi import CLOSE_REFUSED, ASGIApp

pytestmark = pytest.mark.anyio

TIMEOUT = 10
WS_IMPLS = pytest.mark.parametrize("ws_impl", ["websockets-sansio", "wsproto"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio; the ASGI-level tests also run on trio


class QueryAuth:
    """``?user=NAME``; no user is 401, ``banned`` is 403."""

    async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
        user = request.query.get("user")
        if not user:
            raise imkit.AuthenticationFailed("missing user")
        if user == "banned":
            raise imkit.AuthenticationFailed("banned user", status=403)
        return imkit.Identity(user, device_id=request.query.get("device", ""))


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.changed = anyio.Event()

    def add(self, kind: str, value: Any) -> None:
        self.events.append((kind, value))
        self.changed.set()
        self.changed = anyio.Event()

    def of(self, kind: str) -> list[Any]:
        return [value for k, value in self.events if k == kind]

    async def wait_for(self, kind: str, count: int = 1) -> list[Any]:
        while len(self.of(kind)) < count:
            await self.changed.wait()
        return self.of(kind)


def make_app(ack_mode: str = "only", **options: Any) -> tuple[imkit.App, Recorder]:
    app = imkit.App(auth=QueryAuth(), ack_mode=ack_mode, **options)
    seen = Recorder()

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        seen.add("echo", ctx.data)
        await ctx.reply(ctx.data)

    @app.route("echo_once")
    async def echo_once(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data, acked=False)

    @app.route("in_turn")
    async def in_turn(ctx: imkit.Context) -> None:
        await ctx.reply({"unblocked": ctx.unblock(), "deferred": ctx.defer() is not None})

    @app.route("push_me")
    async def push_me(ctx: imkit.Context) -> None:
        await ctx.session.push("pushed", ctx.data)

    @app.route("relay")
    async def relay(ctx: imkit.Context) -> None:
        reached = await ctx.server.send_to_users([ctx.data["to"]], "relay", ctx.data["msg"])
        await ctx.reply({"reached": reached})

    @app.route("boom")
    async def boom(ctx: imkit.Context) -> None:
        raise RuntimeError("handler bug")

    @app.route("refuse")
    async def refuse(ctx: imkit.Context) -> None:
        raise imkit.HandlerError("bad_request", "no thanks", field="x")

    @app.on_connect
    async def connected(session: imkit.Session, server: imkit.ServerAPI) -> None:
        seen.add("connect", session.user_id)

    @app.on_disconnect
    async def disconnected(session: imkit.Session, server: imkit.ServerAPI) -> None:
        seen.add("disconnect", session.user_id)

    @app.on_delivered
    async def delivered(session: imkit.Session, frame: imkit.Frame) -> None:
        seen.add("delivered", frame.method)

    @app.on_startup
    async def started(server: imkit.ServerAPI) -> None:
        seen.add("startup", server.node_id)

    @app.on_shutdown
    async def stopped(server: imkit.ServerAPI) -> None:
        seen.add("shutdown", server.node_id)

    @app.page("/hello")
    async def hello(request: imkit.HandshakeRequest) -> imkit.HttpResponse:
        return imkit.HttpResponse(200, b"hello " + request.query.get("name", "").encode())

    return app, seen


@asynccontextmanager
async def serving(asgi: Any, **options: Any) -> AsyncIterator[int]:
    """Run uvicorn on 127.0.0.1, port 0, in this event loop; yield the bound port."""
    options.setdefault("lifespan", "on")
    config = uvicorn.Config(asgi, host="127.0.0.1", port=0, log_level="warning", **options)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


def data(frame_id: str, method: str, payload: Any, *, frame_type: int = 0) -> str:
    return json.dumps({"frameType": frame_type, "id": frame_id, "method": method, "data": payload})


def ack(frame_id: str, seq: int) -> str:
    return json.dumps({"frameType": 2, "id": frame_id, "ackSeq": seq})


async def recv(ws: Any) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def nothing_within(ws: Any, seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        await ws.recv()
        return False
    return True


# ---------------------------------------------------------------------- under uvicorn
@WS_IMPLS
@pytest.mark.parametrize("mode", ["none", "only", "rigor"])
async def test_imkit_client_every_ack_mode(mode: str, ws_impl: str) -> None:
    app, seen = make_app(mode)
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app), ws=ws_impl) as port:
            url = f"ws://127.0.0.1:{port}/ws?user=alice"
            async with imkit.connect(url, reconnect=False) as client:
                assert client.ack_mode is imkit.AckMode(mode)  # learned from the header
                assert await client.request("echo", {"n": 1}) == {"n": 1}
                await client.send("push_me", {"n": 2})
                pushed = await client.receive()
                assert (pushed.method, pushed.data) == ("pushed", {"n": 2})
                if mode == "none":
                    assert await client.request("echo", 3) == 3
                    assert seen.of("delivered") == []
                else:
                    assert "pushed" in await seen.wait_for("delivered", 2)
            await seen.wait_for("disconnect")
    assert seen.of("startup") == ["local"] and seen.of("shutdown") == ["local"]


async def test_upstream_and_downstream_frames_no_ack() -> None:
    app, _ = make_app("none")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                assert ws.response.headers["imkit-ack-mode"] == "none"
                await ws.send(data("m1", "echo", "hi"))
                reply = await recv(ws)  # no Ack first: NoAck dispatches at once
                assert reply["frameType"] == 0 and reply["replyTo"] == "m1"
                assert reply["data"] == "hi"
                assert await nothing_within(ws, 0.2)  # and nothing is resent


async def test_upstream_and_downstream_frames_only_ack() -> None:
    app, seen = make_app("only")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                assert ws.response.headers["imkit-ack-mode"] == "only"
                await ws.send(data("m1", "echo", "hi"))
                assert await recv(ws) == {**json.loads(ack("m1", 1)), **_blank}
                reply = await recv(ws)
                assert (reply["ackSeq"], reply["replyTo"], reply["data"]) == (0, "m1", "hi")
                await ws.send(ack(reply["id"], 1))
                assert await seen.wait_for("delivered") == ["echo"]
                # A resend of m1 is acked again but never dispatched twice.
                await ws.send(data("m1", "echo", "hi"))
                assert (await recv(ws))["frameType"] == 2
                assert await nothing_within(ws, 0.2)
                assert seen.of("echo") == ["hi"]


_blank = {"method": "", "formId": "", "transpondUid": "", "data": None}


async def test_a_reply_sent_unacked_is_a_noack_frame_never_resent() -> None:
    """``ctx.reply(data, acked=False)`` under OnlyAck: the client gets the transport Ack,
    then a NoAck frame (frameType 3) with ``replyTo``; it acks nothing and nothing comes
    again, however long it waits past the resend interval; no delivery hook runs."""
    timers = AckTimers(resend_interval=0.05, ack_timeout=0.5)
    app, seen = make_app("only", timers=timers)
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                await ws.send(data("m1", "echo_once", "hi"))
                assert (await recv(ws))["frameType"] == 2
                reply = await recv(ws)
                assert (reply["frameType"], reply["replyTo"], reply["data"]) == (3, "m1", "hi")
                assert await nothing_within(ws, 0.3)
                assert seen.of("delivered") == []


async def test_asgi_handles_a_connections_messages_one_at_a_time() -> None:
    """The ASGI adapter neither unblocks nor defers a message: ``ctx.unblock()`` is
    False and ``ctx.defer()`` None, so the handler answers in its turn."""
    app, _ = make_app("none")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                await ws.send(data("m1", "in_turn", None))
                reply = await recv(ws)
                assert reply["replyTo"] == "m1"
                assert reply["data"] == {"unblocked": False, "deferred": False}


async def test_asgi_behind_a_trusted_proxy_counts_the_forwarded_client() -> None:
    """Uvicorn with its own proxy-header handling off: imkit's ``trusted_proxies`` reads
    ``X-Forwarded-For``, so two clients behind the proxy at 127.0.0.1 each get their one
    connection, and a second for the same client is refused with 429."""
    app, _ = make_app("none", max_connections_per_ip=1, trusted_proxies=["127.0.0.1"])
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app), proxy_headers=False) as port:
            url = f"ws://127.0.0.1:{port}/ws"
            one = {"X-Forwarded-For": "198.51.100.1"}
            two = {"X-Forwarded-For": "198.51.100.2"}
            async with (
                ws_connect(f"{url}?user=alice", additional_headers=one),
                ws_connect(f"{url}?user=bob", additional_headers=two) as bob,
            ):
                await bob.send(data("m1", "echo", "hi"))
                assert (await recv(bob))["data"] == "hi"
                with pytest.raises(websockets.InvalidStatus) as info:
                    async with ws_connect(f"{url}?user=carol", additional_headers=one):
                        pass
                assert info.value.response.status_code == 429


async def test_upstream_and_downstream_frames_rigor_ack() -> None:
    app, seen = make_app("rigor")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                assert ws.response.headers["imkit-ack-mode"] == "rigor"
                await ws.send(data("m1", "echo", "hi"))
                first = await recv(ws)
                assert (first["frameType"], first["id"], first["ackSeq"]) == (2, "m1", 1)
                assert await nothing_within(ws, 0.3)  # not dispatched before the confirmation
                assert seen.of("echo") == []
                await ws.send(ack("m1", 2))
                reply = await recv(ws)
                assert (reply["frameType"], reply["replyTo"], reply["ackSeq"]) == (0, "m1", 0)
                await ws.send(ack(reply["id"], 1))
                confirm = await recv(ws)
                assert (confirm["frameType"], confirm["id"], confirm["ackSeq"]) == (
                    2,
                    reply["id"],
                    2,
                )
                assert await seen.wait_for("delivered") == ["echo"]
                assert seen.of("echo") == ["hi"]


async def test_relay_between_two_users() -> None:
    app, seen = make_app("only")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            base = f"ws://127.0.0.1:{port}/ws?user="
            async with (
                imkit.connect(base + "alice", reconnect=False) as alice,
                imkit.connect(base + "bob", reconnect=False) as bob,
            ):
                await seen.wait_for("connect", 2)
                answer = await alice.request("relay", {"to": "bob", "msg": "hi bob"})
                assert answer == {"reached": 1}
                frame = await bob.receive()
                assert (frame.method, frame.data) == ("relay", "hi bob")
                answer = await bob.request("relay", {"to": "carol", "msg": "anyone?"})
                assert answer == {"reached": 0}


@WS_IMPLS
async def test_handshake_refusals_are_http_statuses(ws_impl: str) -> None:
    app, seen = make_app("only", allowed_origins=["https://chat.example", ""])
    asgi = ASGIApp(app)
    with anyio.fail_after(TIMEOUT):
        async with serving(asgi, ws=ws_impl) as port:
            base = f"ws://127.0.0.1:{port}"
            cases = [
                (f"{base}/ws", {}, 401, b"missing user"),
                (f"{base}/ws?user=banned", {}, 403, b"banned user"),
                (f"{base}/elsewhere?user=alice", {}, 404, b"no WebSocket endpoint"),
                (f"{base}/ws?user=alice", {"origin": "https://evil.example"}, 403, b"origin"),
            ]
            for url, extra, status, body in cases:
                with pytest.raises(websockets.InvalidStatus) as info:
                    async with ws_connect(url, **extra):
                        pass
                assert info.value.response.status_code == status, url
                assert body in info.value.response.body
            with pytest.raises(imkit.HandshakeRejected) as rejected:
                async with imkit.connect(f"{base}/ws", reconnect=False):
                    pass
            assert rejected.value.status == 401
            origin = {"origin": "https://chat.example"}
            async with ws_connect(f"{base}/ws?user=alice", **origin) as ws:
                await ws.send(data("m1", "echo", 1))
                assert (await recv(ws))["frameType"] == 2
    assert seen.of("connect") == ["alice"]  # nothing refused reached application code
    assert seen.of("echo") == [1]


async def test_garbage_gets_err_and_the_connection_stays() -> None:
    app, _ = make_app("only")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                await ws.send("this is not json")
                err = await recv(ws)
                assert err["frameType"] == 9 and err["data"]["code"] == "bad_json"
                await ws.send(data("m2", "no.such.method", {}))
                err = await recv(ws)
                assert (err["id"], err["data"]["code"]) == ("m2", "unknown_method")
                await ws.send(data("m3", "boom", {}))
                assert (await recv(ws))["frameType"] == 2
                err = await recv(ws)
                assert (err["id"], err["data"]["code"]) == ("m3", "handler_error")
                await ws.send(data("m4", "refuse", {}))
                assert (await recv(ws))["frameType"] == 2
                err = await recv(ws)
                assert err["data"] == {"code": "bad_request", "message": "no thanks", "field": "x"}
                await ws.send(json.dumps({"frameType": 1, "id": "p"}))
                assert (await recv(ws))["frameType"] == 1  # application ping answered
                await ws.send(data("m5", "echo", "still here"))
                assert (await recv(ws))["frameType"] == 2
                assert (await recv(ws))["data"] == "still here"


async def test_many_bad_messages_close_1008() -> None:
    app, _ = make_app("only", options=PeerOptions(max_strikes=3))
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice") as ws:
                for _ in range(3):
                    await ws.send("{")
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await ws.recv()
                assert ws.close_code == 1008


@WS_IMPLS
async def test_single_login_closes_the_old_connection_4000(ws_impl: str) -> None:
    app, seen = make_app("only")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app), ws=ws_impl) as port:
            url = f"ws://127.0.0.1:{port}/ws?user=alice"
            async with ws_connect(url) as first:
                await seen.wait_for("connect")
                async with ws_connect(url) as second:
                    with pytest.raises(websockets.ConnectionClosed):
                        await first.recv()
                    assert first.close_code == 4000
                    assert "session replaced" in (first.close_reason or "")
                    await second.send(data("m1", "echo", 1))
                    assert (await recv(second))["frameType"] == 2


async def test_multi_login_keeps_both_devices() -> None:
    app, seen = make_app("none", login_policy="multi")
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            url = f"ws://127.0.0.1:{port}/ws?user=alice&device="
            async with ws_connect(url + "a") as phone, ws_connect(url + "b") as laptop:
                await seen.wait_for("connect", 2)
                await phone.send(data("m1", "relay", {"to": "alice", "msg": "both"}))
                push, reply = await recv(phone), await recv(phone)
                assert (push["method"], push["data"]) == ("relay", "both")
                assert (reply["replyTo"], reply["data"]) == ("m1", {"reached": 2})
                other = await recv(laptop)
                assert (other["method"], other["data"]) == ("relay", "both")


@WS_IMPLS
async def test_binary_closes_1003_and_oversize_closes_1009(ws_impl: str) -> None:
    app, _ = make_app("only", limits=ConnLimits(max_message_size=100))
    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app), ws=ws_impl) as port:
            url = f"ws://127.0.0.1:{port}/ws?user=alice"
            async with ws_connect(url) as ws:
                await ws.send(b"\x00\x01")
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1003
            async with ws_connect(url) as ws:
                await ws.send(data("m1", "echo", "x" * 200))
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1009


async def test_pages_over_http() -> None:
    app, _ = make_app("only")

    def get(url: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    with anyio.fail_after(TIMEOUT):
        async with serving(ASGIApp(app)) as port:
            base = f"http://127.0.0.1:{port}"
            status, body, _ = await anyio.to_thread.run_sync(get, f"{base}/hello?name=ann")
            assert (status, body) == (200, b"hello ann")
            status, body, headers = await anyio.to_thread.run_sync(get, f"{base}/hello", "HEAD")
            assert (status, body, headers["content-length"]) == (200, b"", "6")
            status, _, headers = await anyio.to_thread.run_sync(get, f"{base}/ws")
            assert (status, headers["upgrade"]) == (426, "websocket")
            status, _, _ = await anyio.to_thread.run_sync(get, f"{base}/missing")
            assert status == 404
            status, _, headers = await anyio.to_thread.run_sync(get, f"{base}/hello", "DELETE")
            assert (status, headers["allow"]) == (405, "GET, HEAD")


async def test_lifespan_shutdown_closes_clients_1001_then_refuses_503() -> None:
    app, seen = make_app("only")
    asgi = ASGIApp(app)
    to_app_in, to_app = anyio.create_memory_object_stream[dict[str, Any]](4)
    from_app_in, from_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def send(message: Any) -> None:
        await from_app_in.send(dict(message))

    with anyio.fail_after(TIMEOUT):
        # uvicorn itself closes WebSockets with 1012 before its lifespan.shutdown, so this
        # test sends the lifespan events itself while uvicorn keeps serving.
        async with serving(asgi, lifespan="off") as port, anyio.create_task_group() as tg:
            tg.start_soon(asgi, {"type": "lifespan"}, to_app.receive, send)
            await to_app_in.send({"type": "lifespan.startup"})
            assert (await from_app.receive())["type"] == "lifespan.startup.complete"
            url = f"ws://127.0.0.1:{port}/ws?user="
            async with ws_connect(url + "alice") as alice, ws_connect(url + "bob") as bob:
                await seen.wait_for("connect", 2)
                await to_app_in.send({"type": "lifespan.shutdown"})
                for ws in (alice, bob):
                    with pytest.raises(websockets.ConnectionClosed):
                        await ws.recv()
                    assert ws.close_code == 1001
                assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
            assert sorted(seen.of("disconnect")) == ["alice", "bob"]
            assert seen.of("shutdown") == ["local"]
            with pytest.raises(websockets.InvalidStatus) as info:
                async with ws_connect(url + "carol"):
                    pass
            assert info.value.response.status_code == 503


async def test_uvicorn_shutdown_closes_1012_and_runs_the_hooks() -> None:
    app, seen = make_app("only")
    asgi = ASGIApp(app)
    with anyio.fail_after(TIMEOUT):
        async with serving(asgi) as port:
            ws = await ws_connect(f"ws://127.0.0.1:{port}/ws?user=alice")
            await seen.wait_for("connect")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1012
    assert seen.of("disconnect") == ["alice"]
    assert seen.of("shutdown") == ["local"]
    assert asgi.sessions == [] and len(asgi.server.registry) == 0


# ---------------------------------------------------------------------- at the ASGI level
class FakeASGI:
    """Hand-made ``receive``/``send``: the test plays the ASGI server."""

    def __init__(self) -> None:
        self._in_send, self._in = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self._out_send, self.out = anyio.create_memory_object_stream[dict[str, Any]](math.inf)

    async def receive(self) -> dict[str, Any]:
        return await self._in.receive()

    async def send(self, message: Any) -> None:
        await self._out_send.send(dict(message))

    def feed(self, message: dict[str, Any]) -> None:
        self._in_send.send_nowait(message)

    async def next_text(self) -> dict[str, Any]:
        message = await self.out.receive()
        assert message["type"] == "websocket.send", message
        frame: dict[str, Any] = json.loads(message["text"])
        return frame


def ws_scope(query: str = "", extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "subprotocols": [],
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


def serve_client(
    tg: anyio.abc.TaskGroup,
    asgi: ASGIApp,
    query: str = "user=alice",
    send: Callable[[Any], Awaitable[None]] | None = None,
) -> FakeASGI:
    """A client that has asked to connect (``websocket.connect`` fed), served by ``asgi``
    in ``tg``; ``send`` stands in for the client's own when given."""
    io = FakeASGI()
    io.feed({"type": "websocket.connect"})
    tg.start_soon(asgi, ws_scope(query), io.receive, io.send if send is None else send)
    return io


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_refusal_without_the_extension_is_close_1008() -> None:
    app, seen = make_app("only")
    asgi = ASGIApp(app)
    io = FakeASGI()
    io.feed({"type": "websocket.connect"})
    io.feed({"type": "websocket.disconnect", "code": 1006})  # what the server reports next
    with anyio.fail_after(TIMEOUT):
        await asgi(ws_scope("", extensions={}), io.receive, io.send)
    message = await io.out.receive()
    assert message == {
        "type": "websocket.close",
        "code": CLOSE_REFUSED,
        "reason": "HTTP 401: missing user",
    }
    assert CLOSE_REFUSED == 1008
    assert seen.of("connect") == []


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_refusal_with_the_extension_is_an_http_response() -> None:
    app, _ = make_app("only")
    io = FakeASGI()
    io.feed({"type": "websocket.connect"})
    io.feed({"type": "websocket.disconnect", "code": 1006})
    scope = ws_scope("user=banned", extensions={"websocket.http.response": {}})
    with anyio.fail_after(TIMEOUT):
        await ASGIApp(app)(scope, io.receive, io.send)
    start, body = await io.out.receive(), await io.out.receive()
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 403)
    assert body == {"type": "websocket.http.response.body", "body": b"banned user\n"}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_whole_session_at_the_asgi_level() -> None:
    app, seen = make_app("only")
    asgi = ASGIApp(app)  # no lifespan events: the first connection starts the server
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            io = serve_client(tg, asgi)
            accept = await io.out.receive()
            assert accept == {"type": "websocket.accept", "headers": [(b"imkit-ack-mode", b"only")]}
            assert seen.of("startup") == ["local"]
            io.feed({"type": "websocket.receive", "text": data("m1", "echo", "hi")})
            assert (await io.next_text())["ackSeq"] == 1
            reply = await io.next_text()
            assert (reply["replyTo"], reply["data"]) == ("m1", "hi")
            assert [s.user_id for s in asgi.server.sessions("alice")] == ["alice"]
            io.feed({"type": "websocket.disconnect", "code": 1000})
        assert seen.of("disconnect") == ["alice"]
        assert asgi.server.sessions("alice") == []


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_resends_are_driven_by_deadlines() -> None:
    timers = AckTimers(resend_interval=0.05, ack_timeout=0.3, remember_for=1.0)
    app, seen = make_app("rigor", timers=timers)
    io = FakeASGI()
    io.feed({"type": "websocket.connect"})
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ASGIApp(app), ws_scope("user=alice"), io.receive, io.send)
            await io.out.receive()  # accept
            io.feed({"type": "websocket.receive", "text": data("m1", "echo", "hi")})
            acks = 0
            while True:  # the Ack{1} is resent until the timeout, then the message expires
                frame = await io.next_text()
                if frame["frameType"] != 2:
                    break
                acks += 1
            assert frame["frameType"] == 9 and frame["data"]["code"] == "expired"
            assert acks >= 3
            assert seen.of("echo") == []  # never confirmed: never dispatched
            io.feed({"type": "websocket.disconnect", "code": 1000})


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_lifespan_startup_failure_is_reported() -> None:
    app, _ = make_app("only")

    @app.on_startup
    async def broken(server: imkit.ServerAPI) -> None:
        raise RuntimeError("no database")

    io = FakeASGI()
    io.feed({"type": "lifespan.startup"})
    with anyio.fail_after(TIMEOUT):
        await ASGIApp(app)({"type": "lifespan"}, io.receive, io.send)
    message = await io.out.receive()
    assert message["type"] == "lifespan.startup.failed"
    assert "no database" in message["message"]


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/ws", "", "/ws"),
        ("/chat/ws", "/chat", "/ws"),
        ("/chat", "/chat", "/"),
        ("/chatty", "/chat", "/chatty"),
    ],
)
def test_route_path_strips_the_mount_point(path: str, root_path: str, expected: str) -> None:
    from imkit.transport.asgi import route_path

    assert route_path({"path": path, "root_path": root_path}) == expected


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_push_many_sends_what_the_window_has_room_for_and_leaves_the_rest() -> None:
    """As on the socket server: ``push_many`` sends what the ack window (3) takes and
    leaves the rest in the iterator; once the client acks, the next call sends more; on
    a closed session it sends nothing and takes nothing."""
    app, _ = make_app("only", timers=imkit.AckTimers(window=3))
    calls: list[Any] = []
    acked = anyio.Event()
    items = iter([({"n": n}, "sys") for n in range(5)])

    @app.on_connect
    async def catch_up(session: imkit.Session, server: imkit.ServerAPI) -> None:
        calls.append([f.data["n"] for f in session.push_many("caught_up", items)])
        await acked.wait()
        calls.append([f.data["n"] for f in session.push_many("caught_up", items)])

    @app.on_disconnect
    async def gone(session: imkit.Session, server: imkit.ServerAPI) -> None:
        late = iter([(99, "")])
        calls.append((session.push_many("late", late), next(late)))

    asgi = ASGIApp(app)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            io = serve_client(tg, asgi)
            await io.out.receive()  # accept
            first = [await io.next_text() for _ in range(3)]
            assert [(f["method"], f["data"]["n"], f["formId"]) for f in first] == [
                ("caught_up", n, "sys") for n in range(3)
            ]
            for frame in first:
                io.feed({"type": "websocket.receive", "text": ack(frame["id"], 1)})
            await anyio.wait_all_tasks_blocked()
            acked.set()
            rest = [await io.next_text() for _ in range(2)]
            assert [f["data"]["n"] for f in rest] == [3, 4]
            io.feed({"type": "websocket.disconnect", "code": 1000})
    assert calls == [[0, 1, 2], [3, 4], ([], (99, ""))]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_fan_out_is_held_until_the_connect_hooks_finish() -> None:
    app, _ = make_app("none")
    go = anyio.Event()

    @app.on_connect
    async def catch_up(session: imkit.Session, server: imkit.ServerAPI) -> None:
        await go.wait()
        await session.push("catch-up", 1)

    asgi = ASGIApp(app)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            io = serve_client(tg, asgi)
            await io.out.receive()  # accept: the session is registered by now
            assert await asgi.server.send_to_users(["alice"], "live", 2) == 1
            with anyio.move_on_after(0.2):
                await io.out.receive()
                pytest.fail("a live push overtook the connect hook")
            go.set()
            assert [(await io.next_text())["method"] for _ in range(2)] == ["catch-up", "live"]
            io.feed({"type": "websocket.disconnect", "code": 1000})


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_client_that_does_not_read_is_cut_off() -> None:
    app, seen = make_app("only", limits=ConnLimits(close_timeout=0.2))
    failed: list[str] = []

    @app.on_delivery_failed
    async def on_failed(session: imkit.Session, frame: imkit.Frame, reason: str) -> None:
        failed.append(reason)

    asgi = ASGIApp(app, max_write_buffer=2000)
    sent: list[dict[str, Any]] = []
    accepted, stuck = anyio.Event(), anyio.Event()

    async def send(message: Any) -> None:
        sent.append(dict(message))
        if message["type"] == "websocket.accept":
            accepted.set()
        else:
            stuck.set()
            await anyio.sleep_forever()  # the client's socket never drains

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            serve_client(tg, asgi, send=send)
            await accepted.wait()
            await asgi.server.send_to_users(["alice"], "news", "first")
            await stuck.wait()
            for n in range(100):  # pushes never block the pusher, whatever the client does
                await asgi.server.send_to_users(["alice"], "news", "x" * 50 + str(n))
        # the task group ends: the adapter gave up on the stuck client and returned
    assert sent[-1]["type"] == "websocket.close" and sent[-1]["code"] == 1008
    assert "send buffer full" in sent[-1]["reason"]
    assert seen.of("disconnect") == ["alice"]
    assert failed and set(failed) == {"closed"}
    assert asgi.server.sessions("alice") == []


async def test_mounted_in_starlette() -> None:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    app, seen = make_app("only")
    asgi = ASGIApp(app)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("home")

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await asgi.startup()  # Starlette does not forward lifespan events to mounts
        yield
        await asgi.shutdown()

    site = Starlette(routes=[Route("/", home), Mount("/chat", app=asgi)], lifespan=lifespan)
    with anyio.fail_after(TIMEOUT):
        async with serving(site) as port:
            async with imkit.connect(f"ws://127.0.0.1:{port}/chat/ws?user=alice") as alice:
                assert await alice.request("echo", "mounted") == "mounted"
            with pytest.raises(websockets.InvalidStatus) as info:
                async with ws_connect(f"ws://127.0.0.1:{port}/chat/ws"):
                    pass
            assert info.value.response.status_code == 401
            assert seen.of("startup") == ["local"]
    assert seen.of("shutdown") == ["local"]


class ExpiringAuth:
    """``?user=NAME``, with a credential valid for ``ttl`` seconds of ``clock``'s wall time."""

    def __init__(self, clock: FakeClock, ttl: float) -> None:
        self.clock = clock
        self.ttl = ttl

    async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
        user = request.query.get("user", "")
        return imkit.Identity(user, expires_at=self.clock.wall() + self.ttl)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_revoked_credential_closes_1008_at_the_next_revalidation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``revalidate_interval=60`` under ASGI: an auth backend that fails keeps the
    connection (a warning is logged); once the user is revoked, the next revalidation
    closes it with 1008 "credential revoked"."""
    clock = FakeClock()
    auth = RevocableAuth()
    app = imkit.App(auth=auth, ack_mode="none", revalidate_interval=60)

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data)

    asgi = ASGIApp(app, clock=clock)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            io = serve_client(tg, asgi)
            assert (await io.out.receive())["type"] == "websocket.accept"
            assert auth.calls == 1
            auth.broken = True
            await clock.advance_by(60)
            while auth.calls < 2:  # the revalidation runs in a task of its own
                await anyio.lowlevel.checkpoint()
            io.feed({"type": "websocket.receive", "text": data("m1", "echo", 1)})
            assert (await io.next_text())["data"] == 1, "kept through the outage"
            assert "could not revalidate" in caplog.text
            auth.broken = False
            auth.revoked.add("alice")
            await clock.advance_by(59)
            io.feed({"type": "websocket.receive", "text": data("m2", "echo", 2)})
            assert (await io.next_text())["data"] == 2
            await clock.advance_by(1)
            close = await io.out.receive()
            assert (close["type"], close["code"], close["reason"]) == (
                "websocket.close",
                1008,
                "credential revoked",
            )
            assert auth.calls == 3


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_expiry_and_idle_timeout_follow_the_clock() -> None:
    clock = FakeClock()
    app = imkit.App(
        auth=ExpiringAuth(clock, ttl=60), ack_mode="none", options=PeerOptions(idle_timeout=30)
    )

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data)

    asgi = ASGIApp(app, clock=clock)
    with anyio.fail_after(TIMEOUT):
        for messages_every, code, reason in (
            (None, 1000, "idle timeout"),
            (20, 1008, "credential expired"),
        ):
            async with anyio.create_task_group() as tg:
                io = serve_client(tg, asgi)
                assert (await io.out.receive())["type"] == "websocket.accept"
                start = clock.now()
                if messages_every is None:
                    await clock.advance_by(31)  # no message for 30 s
                else:
                    for n in range(4):  # busy, but the credential runs out at 60 s
                        await clock.advance_by(messages_every)
                        io.feed({"type": "websocket.receive", "text": data(f"m{n}", "echo", n)})
                        if clock.now() - start < 60:
                            assert (await io.next_text())["data"] == n
                close = await io.out.receive()
                assert (close["type"], close["code"], close["reason"]) == (
                    "websocket.close",
                    code,
                    reason,
                )
