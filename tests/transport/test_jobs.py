"""A connection's jobs: each starts when needed, a failing one ends only its connection,
and the end of a connection (closed, cut short, or cancelled) always runs its hooks.

On asyncio the server starts the lean connections' jobs in its own task group (an idle
connection has no task); on trio each connection has a task group of its own. Both are
covered here (the transport conftest runs each test on both backends).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc
import pytest
from tests.transport.helpers import RawWS, make_app, serve_tcp

import imkit
from imkit import PeerOptions
from imkit.transport import session as session_module

pytestmark = pytest.mark.anyio


async def _connect(port: int, user: str) -> RawWS:
    client = RawWS(await anyio.connect_tcp("127.0.0.1", port))
    assert await client.handshake(f"/ws?userId={user}") == 101
    return client


async def _echo(client: RawWS, n: int) -> Any:
    await client.send_json({"frameType": 0, "id": f"e{n}", "method": "echo", "data": n})
    while True:
        answer = await client.recv_json()
        assert answer is not None
        if answer.get("replyTo") == f"e{n}":
            return answer["data"]


async def test_a_failing_job_ends_its_connection_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a job (here: announcing a new connection) is logged; that connection ends
    (its hooks still run), the others and the server go on."""
    announce = session_module.announce

    async def broken_announce(server: Any, session: Any) -> None:
        if session.user_id == "bad":
            raise RuntimeError("a bug on purpose")
        await announce(server, session)

    monkeypatch.setattr(session_module, "announce", broken_announce)
    app, _seen = make_app(options=PeerOptions(rate_limit=None))
    gone = anyio.Event()

    @app.on_disconnect
    async def on_disconnect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        if session.user_id == "bad":
            gone.set()

    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            assert server.port is not None
            good = await _connect(server.port, "good")
            assert await _echo(good, 1) == 1
            bad = RawWS(await anyio.connect_tcp("127.0.0.1", server.port))
            try:  # the job fails right after the handshake: the 101 may not get out
                if await bad.handshake("/ws?userId=bad") == 101:
                    assert await bad.recv_json() is None  # closed by the server
            except EOFError:
                pass
            await gone.wait()
            assert await _echo(good, 2) == 2
            late = await _connect(server.port, "late")
            assert await _echo(late, 3) == 3
            for client in (good, bad, late):
                await client.stream.aclose()
    assert any("connection handler failed" in r.getMessage() for r in caplog.records)


async def test_handlers_still_running_after_the_close_are_cancelled_and_hooks_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _seen = make_app(options=PeerOptions(rate_limit=None))
    started = anyio.Event()
    cancelled = anyio.Event()
    gone = anyio.Event()

    @app.route("hang")
    async def hang(ctx: imkit.Context) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    @app.on_disconnect
    async def on_disconnect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        gone.set()

    caplog.set_level(logging.WARNING)
    with anyio.fail_after(10):
        async with serve_tcp(app, shutdown_timeout=0.1) as server:
            assert server.port is not None
            client = await _connect(server.port, "alice")
            await client.send_json({"frameType": 0, "id": "h1", "method": "hang", "data": 0})
            await started.wait()
            await client.stream.aclose()
            await cancelled.wait()
            await gone.wait()
            assert not server.sessions("alice")
    assert any("still running" in r.getMessage() for r in caplog.records)


async def test_cancelled_serve_closes_idle_connections_with_1001_and_runs_hooks() -> None:
    """Idle connections (no message ever sent: on asyncio, no task of their own) are
    still closed with 1001 and see their on_disconnect hooks when serve() is cancelled."""
    app, _seen = make_app(options=PeerOptions(rate_limit=None))
    gone: list[str] = []

    @app.on_disconnect
    async def on_disconnect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        gone.append(session.user_id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            serving = anyio.CancelScope()

            async def run_server(*, task_status: anyio.abc.TaskStatus[int]) -> None:
                with serving:
                    await imkit.serve(app, task_status=task_status)

            port = await outer.start(run_server)
            clients = [await _connect(port, f"u{i}") for i in range(3)]
            serving.cancel()
            for client in clients:
                assert await client.recv_json() is None
                assert client.closed is not None and client.closed.code == 1001
                await client.stream.aclose()
    assert sorted(gone) == ["u0", "u1", "u2"]
