"""Handler failures reach only the client that caused them: ``Err`` frames, logs, and a
connection that stays up."""

from __future__ import annotations

import logging

import anyio
import pytest
from tests.transport.helpers import RawWS, make_app

import imkit
from imkit.testing import MemoryServer, connect_pair

pytestmark = pytest.mark.anyio


async def test_handler_exception_is_an_err_to_that_client_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _seen = make_app()
    caplog.set_level(logging.ERROR, logger="imkit")
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            async with (
                server.connect(user_id="alice") as alice,
                server.connect(user_id="bob") as bob,
            ):
                with pytest.raises(imkit.RequestFailed) as failed:
                    await alice.request("boom", {})
                assert failed.value.code == "handler_error"
                assert "server log" in failed.value.message
                # Alice's connection is still up, and Bob was never disturbed.
                assert await alice.request("echo", "still here") == "still here"
                assert await bob.request("echo", "fine") == "fine"
                assert alice.connections == 1 and bob.connections == 1
    logged = [r for r in caplog.records if "handler for 'boom' failed" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "the handler broke" in str(logged[0].exc_info[1])


async def test_handler_error_becomes_its_code() -> None:
    app, _seen = make_app()
    with anyio.fail_after(10):
        async with connect_pair(app, user_id="alice") as (server, client):
            with pytest.raises(imkit.RequestFailed) as failed:
                await client.request("refuse", 42)
            assert (failed.value.code, failed.value.message) == ("bad_request", "not like that")
            # On the wire the Err frame answers the message's id and carries the extras.
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=raw") == 101
            await raw.send_json({"frameType": 0, "id": "x1", "method": "refuse", "data": 1})
            frames = [await raw.recv_json(), await raw.recv_json()]
            err = next(f for f in frames if f and f["frameType"] == 9)
            assert err["id"] == "x1"
            assert err["data"] == {
                "code": "bad_request",
                "message": "not like that",
                "hint": "send a number",
            }
            await raw.close()


async def test_unknown_method_is_request_failed() -> None:
    app, seen = make_app()
    with anyio.fail_after(10):
        async with connect_pair(app, user_id="alice") as (_server, client):
            with pytest.raises(imkit.RequestFailed) as failed:
                await client.request("no.such.method", {})
            assert failed.value.code == "unknown_method"
            # send() too: the refusal comes instead of the ack.
            with pytest.raises(imkit.RequestFailed) as failed:
                await client.send("no.such.method", {})
            assert failed.value.code == "unknown_method"
            assert await client.request("echo", 1) == 1
    assert not seen.dispatched


async def test_garbage_gets_err_frames_and_the_connection_stays() -> None:
    app, _seen = make_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=gus") == 101
            for text, code in [
                ("not json", "bad_json"),
                ("[1, 2]", "bad_json"),
                ('{"frameType": 0, "id": 7}', "bad_frame"),
                ('{"frameType": 42, "id": "u"}', "unknown_frame_type"),
                ('{"frameType": 6, "id": "t", "transpondUid": "bob"}', "forbidden"),
            ]:
                await raw.send_text(text)
                err = await raw.recv_json()
                assert err is not None and err["frameType"] == 9, text
                assert err["data"]["code"] == code, text
            await raw.send_json({"frameType": 0, "id": "ok", "method": "echo", "data": "alive"})
            ack, reply = await raw.recv_json(), await raw.recv_json()
            assert ack is not None and ack["frameType"] == 2
            assert reply is not None and reply["data"] == "alive"
            await raw.close()


async def test_too_many_bad_frames_close_1008() -> None:
    app, _seen = make_app(options=imkit.PeerOptions(max_strikes=3))
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            raw = RawWS(server.open_stream())
            assert await raw.handshake("/ws?userId=gus") == 101
            for _ in range(3):
                await raw.send_text("{")
            closed = await raw.wait_closed()
            assert closed.code == 1008
            assert "too many bad messages" in closed.reason


async def test_retryable_err_after_the_ack_fails_the_request_at_once() -> None:
    """A handler that answers ``store_unavailable`` after the message was acknowledged:
    nothing will resend it, so ``request`` raises ``RequestFailed`` at once instead of
    waiting out its timeout; the caller may resend."""
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True), ack_mode="only")
    calls = 0

    @app.route("store")
    async def store(ctx: imkit.Context) -> None:
        nonlocal calls
        calls += 1
        raise imkit.HandlerError("store_unavailable", "try again")

    with anyio.fail_after(5):
        async with connect_pair(app, user_id="alice") as (_server, client):
            with pytest.raises(imkit.RequestFailed) as failed:
                await client.request("store", {}, timeout=30)
            assert failed.value.code == "store_unavailable"
            assert calls == 1
