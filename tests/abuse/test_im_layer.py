"""CASES.md C20-C25: bad input at the IM layer (DESIGN.md section 2), on a raw socket.

What the client sees is an ``Err`` frame (``frameType`` 9, ``data.code``) answering the
``id`` of the frame it sent, or a close code; what the application sees is recorded by
the ``echo`` route of :func:`make_app`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from imkit import PeerOptions

from .wire import OP_BINARY, OP_TEXT, Recorder, Wire, data_frame, make_app, running, token, wire

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_users(
    options: PeerOptions | None = None, recorder: Recorder | None = None
) -> AsyncIterator[tuple[Wire, Wire]]:
    """A server and two raw connections to it: alice and bob."""
    app = make_app(options=options, recorder=recorder, login_policy="multi")
    async with running(app) as (_, port), wire(port) as alice, wire(port) as bob:
        await alice.upgrade(token("alice"))
        await bob.upgrade(token("bob"))
        yield alice, bob


async def read_err(w: Wire) -> dict[str, Any]:
    """Read frames until an Err frame; return it."""
    while True:
        msg = await w.read_json()
        if msg["frameType"] == 9:
            return msg


async def round_trip(w: Wire, frame_id: str) -> float:
    """Send a NoAck echo and wait for its reply; return the latency in seconds."""
    started = time.monotonic()
    await w.send_text(data_frame("echo", frame_id, frame_id, frameType=3))
    while True:
        msg = await w.read_json()
        if msg.get("replyTo") == frame_id:
            assert msg["data"] == frame_id
            return time.monotonic() - started


# ---------------------------------------------------------------------------- C20
@pytest.mark.parametrize(
    ("text", "code", "frame_id"),
    [
        ("{not json", "bad_json", ""),
        ("[1, 2, 3]", "bad_json", ""),
        ('{"frameType": 0, "id": "r1", "ackSeq": "one"}', "bad_frame", "r1"),
        ('{"frameType": "0", "id": "r2", "method": "echo"}', "bad_frame", "r2"),
        ('{"frameType": 0, "id": "r3", "method": 7}', "bad_frame", "r3"),
        ('{"frameType": 42, "id": "r4", "method": "echo"}', "unknown_frame_type", "r4"),
        ('{"frameType": 0, "id": "r5", "method": "no.such.route"}', "unknown_method", "r5"),
        ('{"frameType": 0, "id": "r6", "data": NaN}', "bad_json", ""),
    ],
)
async def test_c20_bad_frames_get_an_err_naming_the_id_and_the_connection_stays_up(
    text: str, code: str, frame_id: str
) -> None:
    recorder = Recorder()
    with anyio.fail_after(10):
        async with two_users(recorder=recorder) as (alice, _):
            await alice.send_frame(OP_TEXT, text.encode())
            err = await read_err(alice)
            assert err["id"] == frame_id
            assert err["data"]["code"] == code
            assert isinstance(err["data"]["message"], str)
            await round_trip(alice, "after")
    assert recorder.handled == [("alice", "alice", "after")]


async def test_c20_too_many_bad_frames_close_1008() -> None:
    options = PeerOptions(max_strikes=5, strike_window=60.0)
    with anyio.fail_after(10):
        async with two_users(options=options) as (alice, bob):
            for i in range(4):
                await alice.send_frame(OP_TEXT, f'{{"frameType": 77, "id": "b{i}"}}'.encode())
                assert (await read_err(alice))["id"] == f"b{i}"
            await round_trip(alice, "still-up")
            await alice.send_frame(OP_TEXT, b"garbage")
            assert (await read_err(alice))["data"]["code"] == "bad_json"
            assert await alice.finish_close() == 1008
            await round_trip(bob, "bob-unaffected")


async def test_c20_handler_exception_gets_an_err_and_disturbs_nobody() -> None:
    with anyio.fail_after(10):
        async with two_users() as (alice, bob):
            await alice.send_text(data_frame("boom", None, "h1", frameType=3))
            err = await read_err(alice)
            assert (err["id"], err["data"]["code"]) == ("h1", "handler_error")
            await round_trip(alice, "alice-ok")
            await round_trip(bob, "bob-ok")


# ---------------------------------------------------------------------------- C21
async def test_c21_binary_frame_closes_1003() -> None:
    with anyio.fail_after(10):
        async with two_users() as (alice, bob):
            await alice.send_frame(OP_BINARY, json.dumps(data_frame("echo", 1, "x")).encode())
            assert await alice.read_close() == 1003
            assert await alice.at_eof()
            await round_trip(bob, "bob-ok")


# ---------------------------------------------------------------------------- C22
async def test_c22_forged_form_id_is_replaced_by_the_authenticated_user() -> None:
    recorder = Recorder()
    with anyio.fail_after(10):
        async with two_users(recorder=recorder) as (alice, _):
            await alice.send_text(data_frame("echo", "hi", "f1", formId="bob", frameType=3))
            while (await alice.read_json()).get("replyTo") != "f1":
                pass
    assert recorder.handled == [("alice", "alice", "hi")]


async def test_c22_transpond_from_a_client_is_forbidden() -> None:
    recorder = Recorder()
    with anyio.fail_after(10):
        async with two_users(recorder=recorder) as (alice, bob):
            await alice.send_text(
                {
                    "frameType": 6,
                    "id": "t1",
                    "method": "echo",
                    "transpondUid": "bob",
                    "data": "pretend to be a node",
                }
            )
            err = await read_err(alice)
            assert (err["id"], err["data"]["code"]) == ("t1", "forbidden")
            await round_trip(bob, "bob-ok")  # bob got nothing before his own reply
            await round_trip(alice, "alice-ok")
    assert [h[2] for h in recorder.handled] == ["bob-ok", "alice-ok"]


# ---------------------------------------------------------------------------- C25
async def test_c25_flood_gets_rate_limited_then_1008_and_others_are_unaffected() -> None:
    options = PeerOptions(rate_limit=5.0, rate_burst=5, max_strikes=5, strike_window=60.0)
    with anyio.fail_after(15):
        async with two_users(options=options) as (alice, bob):
            baseline = await round_trip(bob, "bob-before")
            # A burst of 5 is allowed (one of them was not used yet: alice sent nothing).
            for i in range(5):
                await alice.send_text(data_frame("echo", i, f"ok{i}", frameType=3))
            await alice.send_text(data_frame("echo", 5, "over", frameType=3))
            err = await read_err(alice)
            assert err["id"] == "over"
            assert err["data"]["code"] == "rate_limited"
            assert 0 < err["data"]["retryAfter"] <= 1.0
            # bob's latency while alice floods stays close to the baseline.
            during = await round_trip(bob, "bob-during")
            assert during < max(0.25, 10 * baseline)
            # Going on past the time it was told to wait: each retry window (0.2 s at
            # 5 msg/s) with refused frames is one more strike; 1008 after max_strikes.
            closed = None
            for i in range(150):  # a frame every 20 ms, for at most 3 s
                try:
                    await alice.send_text(data_frame("echo", i, f"flood{i}", frameType=3))
                except (anyio.BrokenResourceError, ConnectionError, OSError):
                    break
                await anyio.sleep(0.02)
            closed = await alice.finish_close()
            assert closed == 1008
            await round_trip(bob, "bob-after")
