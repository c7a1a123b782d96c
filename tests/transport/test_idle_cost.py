"""What an idle connection costs the server on asyncio over plain TCP (the lean stream).

After its handshake, an idle connection has no task at all: its bytes arrive in the
stream's protocol callback, its timer is an event-loop timer, and its jobs (a handshake's
decision, the worker, the flush and close, the clean-up) start in the server's task group
only when needed. These tests pin that, and bound the memory an idle connection takes.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from tests.transport.helpers import RawWS, make_app, serve_tcp

from imkit import PeerOptions
from imkit.transport.server import Server

pytestmark = pytest.mark.anyio

# Measured: about 9.7 KiB per idle connection (asyncio's transport included); 17 KiB
# when each connection had a task parked in a task group of its own.
_MAX_IDLE_BYTES = 13 * 1024


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """The lean stream exists on asyncio only (the standard loop and uvloop)."""
    return request.param


def _options() -> PeerOptions:
    return PeerOptions(rate_limit=None, idle_timeout=None)


@asynccontextmanager
async def _server() -> AsyncIterator[Server]:
    app, _seen = make_app(options=_options())
    app.max_connections_per_ip = 10**6
    async with serve_tcp(app) as server:
        yield server


async def _open_raw(port: int, count: int) -> list[socket.socket]:
    """``count`` WebSocket connections on bare sockets (the client side allocates almost
    nothing), each past its handshake."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    for i in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?userId=idle{i} HTTP/1.1\r\nHost: imkit.test\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, "the server closed the connection during the handshake"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        socks.append(sock)
    return socks


async def test_an_idle_connection_has_no_task_of_its_own() -> None:
    async with _server() as server:
        assert server.port is not None
        await anyio.wait_all_tasks_blocked()
        before = len(asyncio.all_tasks())
        socks = await _open_raw(server.port, 20)
        try:
            await anyio.wait_all_tasks_blocked()
            assert server.connection_count == 20
            assert len(asyncio.all_tasks()) == before
            # They are served all the same: a message gets its answer (its worker is a
            # task from then on, that connection's only one).
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                client = RawWS(stream)
                with anyio.fail_after(5):
                    assert await client.handshake("/ws?userId=busy") == 101
                    await client.send_json(
                        {"frameType": 0, "id": "e1", "method": "echo", "data": 1}
                    )
                    answers = [await client.recv_json(), await client.recv_json()]
                assert answers[1] is not None and answers[1]["data"] == 1
                await anyio.wait_all_tasks_blocked()
                assert len(asyncio.all_tasks()) == before + 1
        finally:
            sessions = list(server._sessions)
            for sock in socks:
                sock.close()
        with anyio.fail_after(5):
            for session in sessions:
                await session.wait_closed()
        assert server.connection_count == 0
        await anyio.wait_all_tasks_blocked()
        assert len(asyncio.all_tasks()) == before


async def test_idle_connections_are_closed_with_1001_on_shutdown() -> None:
    """With no task to cancel, a graceful shutdown still reaches each idle connection."""
    app, _seen = make_app(options=_options())
    async with serve_tcp(app) as server:
        assert server.port is not None
        clients = []
        for i in range(3):
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            client = RawWS(stream)
            assert await client.handshake(f"/ws?userId=u{i}") == 101
            clients.append(client)
        server.shutdown()
        with anyio.fail_after(5):
            for client in clients:
                assert await client.recv_json() is None
                assert client.closed is not None
                assert client.closed.code == 1001
                await client.stream.aclose()


async def test_memory_per_idle_connection_is_bounded() -> None:
    count = 200
    async with _server() as server:
        assert server.port is not None
        warm = await _open_raw(server.port, 10)  # first-use allocations, caches
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            socks = await _open_raw(server.port, count)
            await anyio.wait_all_tasks_blocked()
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        try:
            mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
            stats = after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
            grown = sum(stat.size_diff for stat in stats)
            assert server.connection_count == count + len(warm)
            assert grown / count < _MAX_IDLE_BYTES, f"{grown / count:.0f} bytes per connection"
        finally:
            for sock in socks + warm:
                sock.close()
