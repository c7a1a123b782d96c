"""Refused handshakes: the client sees an HTTP status (``HandshakeRejected.status``), raw
sockets see the same status line, and nothing reaches the application."""

from __future__ import annotations

import logging

import anyio
import anyio.abc
import pytest
from tests.transport.helpers import (
    SECRET,
    Collected,
    RawWS,
    http_status,
    make_app,
    serve_tcp,
    upgrade_request,
    ws_url,
)

import imkit
from imkit.testing import MemoryServer

pytestmark = pytest.mark.anyio

ORIGIN = "https://chat.example.com"


class CountingAuth(imkit.TokenAuth):
    """TokenAuth that counts the handshakes it was asked to decide."""

    calls = 0

    async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
        CountingAuth.calls += 1
        return await super().authenticate(request)


def token_app(**options: object) -> tuple[imkit.App, list[str]]:
    CountingAuth.calls = 0
    app, _seen = make_app(auth=CountingAuth(SECRET), allowed_origins=[ORIGIN], **options)
    connected: list[str] = []

    @app.on_connect
    async def on_connect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        connected.append(session.user_id)

    return app, connected


def good_token(user: str = "alice") -> str:
    return imkit.mint_token(SECRET, user)


CASES = [
    # (what is wrong, query, path, origin header, expected status)
    ("no token", "", "/ws", ORIGIN, 401),
    ("forged token", "token=" + good_token()[:-3] + "abc", "/ws", ORIGIN, 401),
    ("expired token", "token=" + imkit.mint_token(SECRET, "alice", ttl=-1), "/ws", ORIGIN, 401),
    ("foreign origin", "token=" + good_token(), "/ws", "https://chat.example.com.evil.net", 403),
    ("no origin with an allowlist", "token=" + good_token(), "/ws", None, 403),
    ("wrong path", "token=" + good_token(), "/socket", ORIGIN, 404),
]


@pytest.mark.parametrize(("what", "query", "path", "origin", "status"), CASES)
async def test_client_sees_the_status(
    what: str, query: str, path: str, origin: str | None, status: int
) -> None:
    app, connected = token_app()
    headers = [("Origin", origin)] if origin else []
    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            url = f"ws://127.0.0.1:{server.port}{path}" + (f"?{query}" if query else "")
            with pytest.raises(imkit.HandshakeRejected) as refused:
                async with imkit.connect(url, headers=headers):
                    pass
            assert refused.value.status == status, what
            # The same over a raw socket: the status line, and no upgrade.
            extra = f"Origin: {origin}\r\n" if origin else ""
            raw_status, answer = await http_status(
                server.port,
                upgrade_request(path + (f"?{query}" if query else ""), extra=extra),
            )
            assert raw_status == status, answer
            assert b"101" not in answer.split(b"\r\n", 1)[0]
    assert connected == []
    if status in (403, 404):
        assert CountingAuth.calls == 0  # decided before authentication


async def test_valid_token_and_origin_is_accepted() -> None:
    app, connected = token_app()
    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            url = ws_url(server, f"token={good_token('carol')}")
            async with imkit.connect(url, headers=[("Origin", ORIGIN)]) as client:
                assert await client.request("echo", "hi") == "hi"
    assert connected == ["carol"]


async def test_refusals_in_memory() -> None:
    """The same statuses through imkit.testing (no socket)."""
    app, connected = token_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            for token, headers, path, status in [
                (None, [("Origin", ORIGIN)], None, 401),
                (good_token(), [("Origin", "http://evil.test")], None, 403),
                (good_token(), [("Origin", ORIGIN)], "/nope", 404),
            ]:
                with pytest.raises(imkit.HandshakeRejected) as refused:
                    async with server.connect(token=token, headers=headers, path=path):
                        pass
                assert refused.value.status == status
                assert b"\n" in refused.value.body  # the reason, as plain text
    assert connected == []


async def test_per_ip_limit_gives_429_and_frees_up() -> None:
    app, _seen = make_app(max_connections_per_ip=2)
    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            async with (
                imkit.connect(ws_url(server, "userId=u1")) as first,
                imkit.connect(ws_url(server, "userId=u2")),
            ):
                with pytest.raises(imkit.HandshakeRejected) as refused:
                    async with imkit.connect(ws_url(server, "userId=u3")):
                        pass
                assert refused.value.status == 429
                status, _ = await http_status(server.port, upgrade_request("/ws?userId=u4"))
                assert status == 429
                # Existing sessions are untouched.
                assert await first.request("echo", 1) == 1
                await first.aclose()  # its address slot is free once the close completes
                async with imkit.connect(ws_url(server, "userId=u5")) as fifth:
                    assert await fifth.request("echo", 5) == 5


async def test_per_ip_limit_in_memory_counts_per_address() -> None:
    app, _seen = make_app(max_connections_per_ip=1)
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with server.connect(user_id="a", remote_addr="10.0.0.1"):
                with pytest.raises(imkit.HandshakeRejected) as refused:
                    async with server.connect(user_id="b", remote_addr="10.0.0.1"):
                        pass
                assert refused.value.status == 429
                async with server.connect(user_id="c", remote_addr="10.0.0.2") as other:
                    assert await other.request("echo", "ok") == "ok"


async def test_behind_a_trusted_proxy_the_forwarded_client_address_counts() -> None:
    """Over real TCP from 127.0.0.1, a trusted proxy: the limit of one connection per
    address counts the client each ``X-Forwarded-For`` names, the handler sees it as the
    session's address, and a second connection for the same client gets 429. Without
    ``trusted_proxies`` the header is ignored and every connection counts for
    127.0.0.1."""
    app, _seen = make_app(max_connections_per_ip=1, trusted_proxies=["127.0.0.0/8"])

    @app.route("whoami")
    async def whoami(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.session.remote_addr)  # type: ignore[attr-defined]

    def via(client: str) -> list[tuple[str, str]]:
        return [("X-Forwarded-For", f"{client}, 127.0.0.1")]  # the client's, then a proxy's

    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            url = ws_url(server, "userId=u1")
            async with (
                imkit.connect(url, headers=via("198.51.100.1")) as first,
                imkit.connect(ws_url(server, "userId=u2"), headers=via("198.51.100.2")) as second,
            ):
                assert await first.request("whoami", None) == "198.51.100.1"
                assert await second.request("whoami", None) == "198.51.100.2"
                with pytest.raises(imkit.HandshakeRejected) as refused:
                    async with imkit.connect(
                        ws_url(server, "userId=u3"), headers=via("198.51.100.1")
                    ):
                        pass
                assert refused.value.status == 429
                assert b"too many connections from this address" in refused.value.body

    plain, _seen = make_app(max_connections_per_ip=1)
    with anyio.fail_after(10):
        async with serve_tcp(plain) as server:
            async with imkit.connect(ws_url(server, "userId=u1"), headers=via("198.51.100.1")):
                with pytest.raises(imkit.HandshakeRejected) as refused:
                    async with imkit.connect(
                        ws_url(server, "userId=u2"), headers=via("198.51.100.2")
                    ):
                        pass
                assert refused.value.status == 429


async def test_plain_http_on_the_ws_path_gets_426() -> None:
    app, _seen = make_app()
    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            status, answer = await http_status(
                server.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            assert status == 426 and b"Upgrade: websocket" in answer
            status, _ = await http_status(server.port, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            assert status == 404


async def test_raw_handshake_then_frames_in_memory() -> None:
    """A raw wsproto client opens a connection through imkit.testing and talks JSON."""
    app, _seen = make_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=zed") == 101
            await raw.send_json({"frameType": 0, "id": "e1", "method": "echo", "data": "x"})
            ack = await raw.recv_json()
            reply = await raw.recv_json()
            assert ack is not None and (ack["frameType"], ack["id"], ack["ackSeq"]) == (2, "e1", 1)
            assert reply is not None and reply["replyTo"] == "e1" and reply["data"] == "x"
            await raw.close()


class GatedAuth(imkit.InsecureDevAuth):
    """Development auth that keeps users named ``slow...`` waiting until ``gate`` opens
    (a credential store that has become slow, as in a mass reconnect)."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.gate = anyio.Event()
        self.waiting = Collected()

    async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
        user = request.query.get("userId", "")
        if user.startswith("slow"):
            self.waiting.add(user)
            await self.gate.wait()
        return await super().authenticate(request)


class Refusals(logging.Handler):
    """The server's "too many handshakes" log lines, to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = Collected()

    def emit(self, record: logging.LogRecord) -> None:
        if "handshakes are being authenticated" in record.getMessage():
            self.seen.add(record.getMessage())


async def test_handshakes_beyond_the_cap_get_503_and_the_client_retries_them() -> None:
    """CASES D29 (the clean refusal): with ``max_concurrent_handshakes=2`` and two
    handshakes stuck in the authentication, a third is answered at once with HTTP 503
    "server busy", not queued. An ``imkit.Client`` that was connected and must reconnect
    meanwhile is refused the same way, backs off and retries, and gets in once the
    authentication is free again; its message sent while away is handled once."""
    auth = GatedAuth()
    app, seen = make_app(auth=auth, max_concurrent_handshakes=2)
    refusals = Refusals()
    logger = logging.getLogger("imkit")
    logger.addHandler(refusals)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with anyio.fail_after(10):
            async with MemoryServer(app) as server:

                async def open_stream() -> anyio.abc.ByteStream:
                    return server.open_stream()

                client = imkit.Client(
                    "ws://imkit.test/ws?userId=al",
                    stream_factory=open_stream,
                    reconnect_delay=0.01,
                    max_reconnect_delay=0.05,
                )
                async with client, anyio.create_task_group() as tg:
                    await client.send("count", 1, message_id="first")
                    slow = [RawWS(server.open_stream()) for _ in range(2)]
                    statuses = Collected()

                    async def stuck(raw: RawWS, user: str) -> None:
                        statuses.add(await raw.handshake(f"/ws?userId={user}"))

                    for i, raw in enumerate(slow):
                        tg.start_soon(stuck, raw, f"slow{i}")
                    await auth.waiting.wait_until(lambda items: len(items) == 2)
                    third = RawWS(server.open_stream())
                    assert await third.handshake("/ws?userId=carol") == 503
                    assert b"server busy" in third.body
                    await third.stream.aclose()
                    # The client's connection drops (1012, a restart): its reconnects are
                    # refused while the two handshakes hold the authentication.
                    server.sessions("al")[0].close_nowait(1012, "service restart")
                    await refusals.seen.wait_until(lambda items: len(items) >= 3)
                    assert server.sessions("al") == []
                    sent = anyio.Event()

                    async def send_while_away() -> None:
                        await client.send("count", 2, message_id="second")
                        sent.set()

                    tg.start_soon(send_while_away)
                    auth.gate.set()
                    await sent.wait()
                    await statuses.wait_until(lambda items: len(items) == 2)
                    assert statuses == [101, 101]
                    assert len(server.sessions("al")) == 1
                    for raw in slow:
                        await raw.close()
    finally:
        logger.removeHandler(refusals)
        logger.setLevel(level)
    assert seen.dispatched["al", "first"] == 1 and seen.dispatched["al", "second"] == 1
