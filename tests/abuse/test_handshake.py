"""CASES.md A1-A8: the opening handshake, driven by raw sockets, websockets and aiohttp.

Each test says what the client sees (an HTTP status and headers) and checks that the
server goes on serving: a normal handshake still succeeds afterwards.
"""

from __future__ import annotations

import json
import logging
import time

import aiohttp
import anyio
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from imkit import ConnLimits

from .wire import KEY, Recorder, data_frame, make_app, request_head, running, token, wire

pytestmark = pytest.mark.anyio


async def assert_still_serving(port: int) -> None:
    """A normal client (websockets) can still connect and get an answer."""
    async with ws_connect(f"ws://127.0.0.1:{port}/ws?token={token('carol')}") as ws:
        await ws.send('{"frameType": 3, "id": "x", "method": "echo", "data": 1}')
        reply = await ws.recv()
        assert '"replyTo":"x"' in str(reply).replace(" ", "")


# ---------------------------------------------------------------------------- A1
async def test_a1_plain_get_gets_426_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port):
            async with wire(port) as w:
                await w.send(request_head("/ws", upgrade=False))
                status, headers, _ = await w.http_response()
                assert status == 426
                assert headers.get("upgrade", "").lower() == "websocket"
            async with wire(port) as w:  # another path: a plain 404
                await w.send(request_head("/elsewhere", upgrade=False))
                status, _, _ = await w.http_response()
                assert status == 404
            async with wire(port) as w:  # not HTTP at all
                await w.send(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")
                status, _, _ = await w.http_response()
                assert status == 400
            await assert_still_serving(port)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------- A2
@pytest.mark.parametrize("version", ["12", "8", "", "13, 8"])
async def test_a2_unsupported_version_gets_426_with_version_13(version: str) -> None:
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port):
            async with wire(port) as w:
                await w.send(request_head(version=version, tok=token()))
                status, headers, _ = await w.http_response()
                assert status == 426
                assert headers["sec-websocket-version"] == "13"
            await assert_still_serving(port)


@pytest.mark.parametrize("key", [None, "", "not base64!", "c2hvcnQ=", KEY + KEY])
async def test_a2_missing_or_malformed_key_gets_400(key: str | None) -> None:
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port):
            async with wire(port) as w:
                await w.send(request_head(key=key, tok=token()))
                status, _, _ = await w.http_response()
                assert status == 400
            await assert_still_serving(port)


# ---------------------------------------------------------------------------- A3
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("X-Big", "a" * 9000)], id="one-9000-byte-header"),
        pytest.param([(f"X-H{i}", "v") for i in range(2000)], id="2000-headers"),
        pytest.param([(f"X-H{i}", "v") for i in range(150)], id="150-small-headers"),
    ],
)
async def test_a3_oversized_head_gets_431(headers: list[tuple[str, str]]) -> None:
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port):
            async with wire(port) as w:
                await w.send(request_head(headers=headers, tok=token()))
                status, _, _ = await w.http_response()
                assert status == 431
                assert await w.at_eof()
            await assert_still_serving(port)


async def test_a3_endless_request_line_gets_431_without_waiting_for_the_end() -> None:
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port):
            async with wire(port) as w:
                await w.send(b"GET /" + b"a" * 20000)  # no CRLF, ever
                status, _, _ = await w.http_response()
                assert status == 431
            await assert_still_serving(port)


# ---------------------------------------------------------------------------- A4
async def test_a4_slowloris_is_cut_at_the_handshake_deadline() -> None:
    deadline = 1.0
    app = make_app(limits=ConnLimits(handshake_timeout=deadline, ping_interval=None))
    head = request_head(tok=token())
    closed_after: list[float] = []

    async def loris(port: int) -> None:
        async with wire(port) as w:
            started = time.monotonic()
            async with anyio.create_task_group() as tg:

                async def drip() -> None:
                    try:
                        for byte in head[:-2]:  # never the final CRLF
                            await w.send(bytes([byte]))
                            await anyio.sleep(0.1)
                    except (anyio.BrokenResourceError, ConnectionError, OSError):
                        pass

                tg.start_soon(drip)
                assert await w.at_eof()  # the server closed: no HTTP answer, just EOF
                closed_after.append(time.monotonic() - started)
                tg.cancel_scope.cancel()

    with anyio.fail_after(15):
        async with running(app) as (_, port):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(loris, port)
                await anyio.sleep(0.3)
                started = time.monotonic()
                await assert_still_serving(port)  # not delayed by the 50 slow sockets
                assert time.monotonic() - started < 0.5
    assert len(closed_after) == 50
    assert all(deadline - 0.05 <= t < deadline + 1.0 for t in closed_after), closed_after


async def test_a4_slowloris_socket_is_released_at_the_deadline() -> None:
    """The server lets go of the socket (and its fd) at the deadline, not close_timeout
    later, even while the slowloris keeps writing."""
    deadline = 0.5
    app = make_app(limits=ConnLimits(handshake_timeout=deadline, ping_interval=None))
    with anyio.fail_after(10):
        async with running(app) as (server, port):
            async with wire(port) as w:
                await w.send(b"GET /ws HTTP/1.1\r\n")
                with anyio.move_on_after(deadline + 1.5):
                    while True:  # keep dripping, as a slowloris does
                        try:
                            await w.send(b"X")
                        except (anyio.BrokenResourceError, ConnectionError, OSError):
                            await anyio.sleep(0.1)  # reset: the server let go of it
                        await anyio.sleep(0.1)
                        if not server._sessions:
                            break
                assert not server._sessions, "the server still holds the slowloris socket"


# ---------------------------------------------------------------------------- A5
FOREIGN_ORIGINS = [
    "null",
    "https://app.example.com.evil.net",
    "http://app.example.com",  # wrong scheme
    "https://app.example.com:8443",  # foreign port
    "https://evil.example.com",
]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
async def test_a5_foreign_origin_gets_403_before_upgrade(origin: str) -> None:
    recorder = Recorder()
    app = make_app(allowed_origins=["https://app.example.com"], recorder=recorder)
    with anyio.fail_after(10):
        async with running(app) as (_, port):
            async with wire(port) as w:
                await w.send(request_head(tok=token(), origin=origin))
                status, _, _ = await w.http_response()
                assert status == 403
                assert await w.at_eof()
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with ws_connect(
                    f"ws://127.0.0.1:{port}/ws?token={token()}",
                    origin=websockets.Origin(origin),
                ):
                    pass
            assert refused.value.response.status_code == 403
            async with ws_connect(
                f"ws://127.0.0.1:{port}/ws?token={token('bob')}",
                origin=websockets.Origin("https://app.example.com"),
            ):
                pass
    assert recorder.connected == ["bob"]  # nothing of the refused ones reached the app


# ---------------------------------------------------------------------------- A6
async def test_a6_bad_credentials_get_401_and_tokens_are_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    good = token("alice")
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    expired = token("alice", ttl=60, now=time.time() - 3600)
    garbage = "not-a-token-secret-looking-string"
    recorder = Recorder()
    with anyio.fail_after(10):
        async with running(make_app(recorder=recorder)) as (_, port):
            for bad in (None, tampered, expired, garbage):
                async with wire(port) as w:
                    await w.send(request_head(tok=bad) if bad else request_head())
                    status, _, body = await w.http_response()
                    assert status == 401, (bad, status)
                    if bad:
                        assert bad.encode() not in body
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(
                        f"http://127.0.0.1:{port}/ws",
                        headers={"Authorization": f"Bearer {expired}"},
                    )
                assert refused.value.status == 401
                ws = await http.ws_connect(
                    f"http://127.0.0.1:{port}/ws", headers={"Authorization": f"Bearer {good}"}
                )
                await ws.close()
    assert recorder.connected == ["alice"]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (good, tampered, expired, garbage):
        assert secret not in logged
        assert secret.split(".")[-1] not in logged  # not even the signature


# ---------------------------------------------------------------------------- A7
async def test_a7_per_ip_limit_gets_429_and_existing_sessions_are_untouched() -> None:
    app = make_app(max_connections_per_ip=2, login_policy="multi")
    with anyio.fail_after(10):
        async with running(app) as (_, port):
            async with (
                ws_connect(f"ws://127.0.0.1:{port}/ws?token={token('a')}") as first,
                ws_connect(f"ws://127.0.0.1:{port}/ws?token={token('b')}") as second,
            ):
                for _ in range(3):
                    async with wire(port) as w:
                        await w.send(request_head(tok=token("c")))
                        status, _, _ = await w.http_response()
                        assert status == 429
                for ws, name in ((first, "a"), (second, "b")):
                    await ws.send(json.dumps(data_frame("echo", 1, name, frameType=3)))
                    assert f'"replyTo":"{name}"' in str(await ws.recv()).replace(" ", "")
            # Once they are gone the address may connect again.
            with anyio.fail_after(3):
                while True:
                    try:
                        await assert_still_serving(port)
                        break
                    except websockets.InvalidStatus:
                        await anyio.sleep(0.05)


# ---------------------------------------------------------------------------- A8
@pytest.mark.parametrize(
    "offer",
    [
        [("Sec-WebSocket-Protocol", "bogus.v1, chat.superchat")],
        [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits=99")],
        [("Sec-WebSocket-Extensions", 'permessage-deflate; server_max_window_bits=1; x="')],
        [("Sec-WebSocket-Extensions", "x-webkit-deflate-frame, bogus-ext")],
    ],
)
async def test_a8_unsupported_offers_negotiate_nothing(offer: list[tuple[str, str]]) -> None:
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port):
            async with wire(port) as w:
                await w.send(request_head(tok=token(), headers=offer))
                status, headers, _ = await w.http_response()
                assert status == 101
                assert "sec-websocket-protocol" not in headers
                assert "sec-websocket-extensions" not in headers
                await w.send_text(data_frame("echo", "hi", "m1"))
                assert (await w.read_json())["frameType"] == 2  # the ack; no compression
            async with ws_connect(
                f"ws://127.0.0.1:{port}/ws?token={token()}",
                subprotocols=[websockets.Subprotocol("bogus")],
            ) as ws:
                pass
            assert ws.subprotocol is None
