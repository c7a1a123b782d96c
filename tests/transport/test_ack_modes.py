"""Every ack mode, both directions, end to end: imkit's client against imkit's server over
in-memory streams and over loopback, and the wire seen by a raw wsproto client."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from tests.transport.helpers import Collected, RawWS, Recorder, make_app, serve_tcp

import imkit
from imkit import AckMode
from imkit.testing import FakeClock, MemoryServer, connect_pair

pytestmark = pytest.mark.anyio

MODES = [AckMode.NONE, AckMode.ONLY, AckMode.RIGOR]


def app_with_push(mode: AckMode) -> tuple[imkit.App, Any, Collected]:
    app, seen = make_app(ack_mode=mode)
    delivered = Collected()

    @app.route("push_me")
    async def push_me(ctx: imkit.Context) -> None:
        for n in range(ctx.data["n"]):
            await ctx.session.push("pushed", {"n": n})

    @app.on_delivered
    async def on_delivered(session: imkit.Session, frame: imkit.Frame) -> None:
        delivered.add(frame)

    return app, seen, delivered


def pushed(frames: list[imkit.Frame]) -> list[imkit.Frame]:
    return [f for f in frames if f.method == "pushed"]


@pytest.mark.parametrize("mode", MODES)
async def test_both_directions_in_memory(mode: AckMode) -> None:
    app, seen, delivered = app_with_push(mode)
    with anyio.fail_after(10):
        async with connect_pair(app, user_id="alice") as (_server, client):
            assert client.ack_mode is mode  # learned from the imkit-ack-mode header
            # Upstream: send() returns once the server acknowledged (at once under NoAck).
            for n in range(5):
                await client.send("count", {"n": n}, message_id=f"up-{n}")
            # A request is answered only after its message was dispatched, so every
            # earlier message has been handled too (one connection is handled in order).
            assert await client.request("echo", "sync") == "sync"
            assert [seen.dispatched["alice", f"up-{n}"] for n in range(5)] == [1] * 5
            assert [data for _, data in seen.order] == [{"n": n} for n in range(5)]
            # Downstream: the server pushes, the client acks (under OnlyAck/RigorAck).
            await client.send("push_me", {"n": 3})
            got = [await client.receive() for _ in range(3)]
            assert [f.data for f in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert all(f.method == "pushed" for f in got)
            if mode is AckMode.NONE:
                assert delivered == []
            else:
                await delivered.wait_until(lambda fs: len(pushed(fs)) == 3)
                assert sorted(f.data["n"] for f in pushed(delivered)) == [0, 1, 2]


@pytest.mark.parametrize("mode", MODES)
async def test_both_directions_over_loopback(mode: AckMode) -> None:
    app, seen, delivered = app_with_push(mode)
    with anyio.fail_after(10):
        async with serve_tcp(app) as server:
            url = f"ws://127.0.0.1:{server.port}/ws?userId=bob"
            async with imkit.connect(url) as client:
                assert client.ack_mode is mode
                await client.send("count", {"n": 1}, message_id="tcp-1")
                assert await client.request("echo", [1, "two"]) == [1, "two"]
                assert seen.dispatched["bob", "tcp-1"] == 1
                await client.send("push_me", {"n": 2})
                assert [(await client.receive()).data for _ in range(2)] == [{"n": 0}, {"n": 1}]
                if mode is not AckMode.NONE:
                    await delivered.wait_until(lambda fs: len(pushed(fs)) == 2)


async def _raw_pair(server: MemoryServer, user: str = "alice") -> RawWS:
    raw = RawWS(server.open_stream())
    assert await raw.handshake(f"/ws?userId={user}") == 101
    return raw


@contextlib.asynccontextmanager
async def _rigor_server() -> AsyncIterator[tuple[MemoryServer, FakeClock, Recorder]]:
    """A RigorAck app with the test routes, served on a fake clock (bounded to 10 s)."""
    clock = FakeClock()
    app, seen = make_app(ack_mode="rigor")
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            yield server, clock, seen


async def test_rigor_upstream_on_the_wire() -> None:
    """RigorAck upstream: Ack{ackSeq 1}, nothing dispatched until the client confirms with
    Ack{ackSeq 2}; unconfirmed, the ack is resent, then the message expires undispatched."""
    async with _rigor_server() as (server, clock, seen):
        raw = await _raw_pair(server)
        await raw.send_json({"frameType": 0, "id": "r1", "method": "count", "data": 1})
        ack = await raw.recv_json()
        assert ack is not None
        assert (ack["frameType"], ack["id"], ack["ackSeq"]) == (2, "r1", 1)
        await clock.advance_by(0)  # let every task run
        assert seen.dispatched["alice", "r1"] == 0
        await raw.send_json({"frameType": 2, "id": "r1", "ackSeq": 2})
        await raw.send_json({"frameType": 0, "id": "sync", "method": "echo", "data": 0})
        ack = await raw.recv_json()
        assert ack is not None and (ack["id"], ack["ackSeq"]) == ("sync", 1)
        await raw.send_json({"frameType": 2, "id": "sync", "ackSeq": 2})
        reply = await raw.recv_json()
        assert reply is not None and reply["replyTo"] == "sync"
        await raw.send_json({"frameType": 2, "id": reply["id"], "ackSeq": 1})
        confirm = await raw.recv_json()
        assert confirm is not None and (confirm["id"], confirm["ackSeq"]) == (reply["id"], 2)
        assert seen.dispatched["alice", "r1"] == 1
        # A resent Data frame is re-acked, never re-dispatched.
        await raw.send_json({"frameType": 0, "id": "r1", "method": "count", "data": 1})
        ack = await raw.recv_json()
        assert ack is not None and (ack["id"], ack["ackSeq"]) == ("r1", 1)
        # Never confirmed: the server resends its ack, then gives the message up.
        await raw.send_json({"frameType": 0, "id": "r2", "method": "count", "data": 2})
        first = await raw.recv_json()
        assert first is not None and (first["id"], first["ackSeq"]) == ("r2", 1)
        await clock.advance_by(imkit.AckTimers().resend_interval)
        again = await raw.recv_json()
        assert again is not None and (again["frameType"], again["id"]) == (2, "r2")
        await clock.advance_by(imkit.AckTimers().ack_timeout)
        frames = []
        while not frames or frames[-1]["frameType"] != 9:
            frame = await raw.recv_json()
            assert frame is not None
            frames.append(frame)
        assert frames[-1]["id"] == "r2" and frames[-1]["data"]["code"] == "expired"
        assert seen.dispatched["alice", "r2"] == 0
        await raw.close()


async def test_rigor_message_forgotten_with_its_sender_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alice's RigorAck message r1 is acked, but her confirmation never comes: she goes
    away. Past remember_for, Bob's connection makes the server forget her receiver: r1
    is dropped undispatched, and the server's log names it (no connection of Alice's is
    left for an Err{expired})."""
    async with _rigor_server() as (server, clock, seen):
        alice = await _raw_pair(server)
        await alice.send_json({"frameType": 0, "id": "r1", "method": "count", "data": 1})
        ack = await alice.recv_json()
        assert ack is not None and (ack["id"], ack["ackSeq"]) == ("r1", 1)
        await alice.close()
        await clock.advance_by(imkit.AckTimers().remember_for + 1)
        with caplog.at_level(logging.WARNING, logger="imkit"):
            bob = await _raw_pair(server, "bob")
        assert "message 'r1' of 'alice' (device '') dropped unconfirmed" in caplog.text
        assert seen.dispatched["alice", "r1"] == 0
        await bob.close()


async def test_rigor_downstream_on_the_wire() -> None:
    """RigorAck downstream: the push comes as Data{ackSeq 0}; the client's Ack{ackSeq 1}
    is confirmed with Ack{ackSeq 2} and reported to on_delivered."""
    app, _seen, delivered = app_with_push(AckMode.RIGOR)
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:
            raw = await _raw_pair(server)
            await raw.send_json({"frameType": 0, "id": "p", "method": "push_me", "data": {"n": 1}})
            ack = await raw.recv_json()
            assert ack is not None and (ack["id"], ack["ackSeq"]) == ("p", 1)
            await raw.send_json({"frameType": 2, "id": "p", "ackSeq": 2})  # confirm: dispatch
            push = await raw.recv_json()
            assert push is not None
            assert push["method"] == "pushed" and push["ackSeq"] == 0 and push["data"] == {"n": 0}
            await raw.send_json({"frameType": 2, "id": push["id"], "ackSeq": 1})
            confirm = await raw.recv_json()
            assert confirm is not None
            assert (confirm["frameType"], confirm["id"], confirm["ackSeq"]) == (2, push["id"], 2)
            await delivered.wait_until(bool)
            assert delivered[0].id == push["id"]
            await raw.close()


async def test_only_ack_on_the_wire() -> None:
    """OnlyAck: Data{ackSeq n} is answered Ack{ackSeq n+1} at once (easy-chat's rule); a
    push unacked is resent with the same id; NoAck frames get no ack."""
    clock = FakeClock()
    app, seen, _delivered = app_with_push(AckMode.ONLY)
    with anyio.fail_after(10):
        async with MemoryServer(app, clock=clock) as server:
            raw = await _raw_pair(server)
            await raw.send_json({"frameType": 0, "id": "o1", "method": "count", "ackSeq": 4})
            ack = await raw.recv_json()
            assert ack is not None and (ack["frameType"], ack["id"], ack["ackSeq"]) == (2, "o1", 5)
            await raw.send_json({"frameType": 3, "id": "n1", "method": "push_me", "data": {"n": 1}})
            push = await raw.recv_json()  # no ack for the NoAck frame: the push comes first
            assert push is not None and push["frameType"] == 0 and push["method"] == "pushed"
            await clock.advance_by(imkit.AckTimers().resend_interval)
            again = await raw.recv_json()
            assert again is not None and again["id"] == push["id"]
            await raw.send_json({"frameType": 2, "id": push["id"], "ackSeq": 1})
            assert seen.dispatched["alice", "o1"] == 1
            await raw.close()
