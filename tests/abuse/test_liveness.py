"""CASES.md D28, D30, E36, E37: dead peers, fd exhaustion, expiring credentials, shutdown.

Durations are scaled down (ping every 0.3 s, tokens that live 1 s); the subprocess of D30
runs its own server under a lowered ``RLIMIT_NOFILE``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import anyio
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from imkit import ConnLimits

from .wire import OP_PING, SECRET, data_frame, make_app, request_head, running, token, wire

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------- D28
async def test_d28_peer_that_stops_answering_pings_is_closed_1011_in_time() -> None:
    interval, timeout = 0.3, 0.3
    app = make_app(limits=ConnLimits(ping_interval=interval, ping_timeout=timeout))
    with anyio.fail_after(10):
        async with running(app) as (server, port):
            async with (
                wire(port) as dead,
                ws_connect(f"ws://127.0.0.1:{port}/ws?token={token('bob')}") as alive,
            ):
                await dead.upgrade(token("alice"))
                started = time.monotonic()
                assert server.registry.is_online("alice")
                opcode, _ = await dead.read_frame()
                assert opcode == OP_PING  # ... which it never answers
                assert await dead.read_close() == 1011
                elapsed = time.monotonic() - started
                assert interval + timeout - 0.05 <= elapsed < interval + timeout + 1.0
                assert await dead.at_eof()
                assert not server.registry.is_online("alice")  # no ghost session
                # websockets answers pings: it is still connected well past the timeout.
                await anyio.sleep(2 * (interval + timeout))
                await alive.send('{"frameType": 3, "id": "p", "method": "echo", "data": 1}')
                assert "replyTo" in str(await alive.recv())
                assert server.registry.is_online("bob")


# ---------------------------------------------------------------------------- D30
_FD_SERVER = textwrap.dedent(
    """
    import logging, resource, sys
    import anyio
    from imkit import App, ConnLimits, Server, TokenAuth

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), hard))
    app = App(auth=TokenAuth(sys.argv[1]), limits=ConnLimits(handshake_timeout=60))

    @app.route("echo")
    async def echo(ctx):
        await ctx.reply(ctx.data)

    async def main():
        server = Server(app)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            print(port, flush=True)

    anyio.run(main)
    """
)


@contextlib.contextmanager
def fd_server(limit: int) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """Run the server of ``_FD_SERVER`` with ``limit`` fds; yield it, its port, and a list
    that holds its stderr once it has stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _FD_SERVER, SECRET, str(limit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline()), log
    finally:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        log.append(stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
async def test_d30_fd_exhaustion_is_logged_and_serving_resumes() -> None:
    limit = 64
    held: list[socket.socket] = []
    with fd_server(limit) as (proc, port, log), anyio.fail_after(30):
        try:
            # More sockets than the server has fds: it accepts until EMFILE; the rest wait
            # in the listen backlog.
            for _ in range(limit + 20):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET /ws HTTP/1.1\r\n")  # an unfinished handshake
                held.append(sock)
            await anyio.sleep(1.0)
            assert proc.poll() is None, "the server died"
        finally:
            for sock in held:
                sock.close()
        # Serving resumes once fds are free (the accept loop retries with a pause).
        deadline = time.monotonic() + 10
        while True:
            try:
                async with ws_connect(
                    f"ws://127.0.0.1:{port}/ws?token={token()}", open_timeout=2
                ) as ws:
                    await ws.send('{"frameType": 3, "id": "r", "method": "echo", "data": "back"}')
                    assert "back" in str(await ws.recv())
                    break
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                assert time.monotonic() < deadline, "serving did not resume"
                await anyio.sleep(0.2)
        assert proc.poll() is None
    [stderr] = log
    assert re.search(r"accept\(\) failed .*(Too many open files|EMFILE)", stderr), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]


# ---------------------------------------------------------------------------- E36
async def test_e36_credential_expiring_on_a_live_connection_closes_1008() -> None:
    ttl = 1.0
    short = token("alice", ttl=ttl)
    with anyio.fail_after(10):
        async with running(make_app()) as (server, port), wire(port) as w:
            await w.upgrade(short)
            started = time.monotonic()
            await w.send_text(data_frame("echo", "before", "b", frameType=3))
            assert (await w.read_json())["data"] == "before"
            assert await w.finish_close() == 1008
            assert time.monotonic() - started < ttl + 1.0
            assert not server.registry.is_online("alice")


async def test_e36_expired_credential_cannot_reconnect() -> None:
    with anyio.fail_after(10):
        async with running(make_app()) as (_, port), wire(port) as w:
            await w.send(request_head(tok=token("alice", ttl=60, now=time.time() - 120)))
            status, _, _ = await w.http_response()
            assert status == 401


# ---------------------------------------------------------------------------- E37
async def test_e37_graceful_shutdown_closes_1001_and_refuses_new_handshakes() -> None:
    with anyio.fail_after(15):
        async with running(make_app(login_policy="multi")) as (server, port):
            async with (
                wire(port) as raw,
                ws_connect(f"ws://127.0.0.1:{port}/ws?token={token('bob')}") as ws,
                wire(port) as pending,
            ):
                await raw.upgrade(token("alice"))
                await pending.send(request_head(tok=token("carol"))[:20])  # mid-handshake
                await anyio.sleep(0.1)
                server.shutdown()
                assert await raw.finish_close() == 1001
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
                assert await pending.at_eof()  # the unfinished handshake is dropped
                # New connections are refused (listener closed) or answered 503.
                assert server.stopping
                try:
                    async with wire(port) as late:
                        await late.send(request_head(tok=token("dave")))
                        status, _, _ = await late.http_response()
                        assert status == 503
                except (OSError, anyio.EndOfStream, anyio.IncompleteRead):
                    pass  # connection refused or closed: no upgrade either way
