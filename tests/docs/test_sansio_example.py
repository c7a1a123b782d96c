"""The how-to's selectors driver (examples/sansio_selectors.py), in a thread, with real
clients: imkit's own and the websockets library."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
import websockets
from tests.docs.helpers import assert_blocks_are_example_code, load_example
from websockets.asyncio.client import connect as ws_connect

import imkit

pytestmark = pytest.mark.anyio

example = load_example("sansio_selectors")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the websockets client runs on asyncio


@contextmanager
def running(**options: Any) -> Iterator[str]:
    """Serve on 127.0.0.1, port 0, in a thread; yield the WebSocket URL."""
    server = example.SelectorServer(port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{server.port}/ws"
    finally:
        server.stop()
        thread.join(5)
        assert not thread.is_alive()
    assert server.clients == {}


def test_the_howto_shows_the_example_code() -> None:
    assert_blocks_are_example_code("howto-sansio.md", "sansio_selectors")


async def test_echo_and_broadcast_with_the_imkit_client() -> None:
    with running() as url, anyio.fail_after(10):
        async with (
            imkit.connect(f"{url}?user=alice", reconnect=False) as alice,
            imkit.connect(f"{url}?user=bob", reconnect=False) as bob,
        ):
            assert alice.ack_mode is imkit.AckMode.ONLY  # from the imkit-ack-mode header
            assert await alice.request("echo", {"n": 1}) == {"n": 1}
            assert await alice.request("broadcast", "hello all") == {"ok": True}
            push = await bob.receive()
            assert (push.method, push.data, push.form_id) == ("broadcast", "hello all", "alice")
            with pytest.raises(imkit.RequestFailed) as failed:
                await alice.request("no.such.method", {})
            assert failed.value.code == "unknown_method"


async def test_refusals_and_bad_input() -> None:
    with running() as url, anyio.fail_after(10):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with ws_connect(url):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus) as info:
            async with ws_connect(url.replace("/ws", "/other") + "?user=alice"):
                pass
        assert info.value.response.status_code == 404
        async with ws_connect(f"{url}?user=alice") as ws:
            await ws.send("not json")
            err = json.loads(await ws.recv())
            assert err["frameType"] == 9 and err["data"]["code"] == "bad_json"
            await ws.send(b"\x00")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1003


async def test_deadlines_drive_resends_and_rigor_acks() -> None:
    timers = imkit.AckTimers(resend_interval=0.1, ack_timeout=1.0)
    with running(ack_mode=imkit.AckMode.RIGOR, timers=timers) as url, anyio.fail_after(10):
        async with ws_connect(f"{url}?user=bob") as bob, ws_connect(f"{url}?user=al") as al:
            assert al.response.headers["imkit-ack-mode"] == "rigor"
            send = {"frameType": 0, "id": "m1", "method": "broadcast", "data": "hi"}
            await al.send(json.dumps(send))
            assert json.loads(await al.recv())["ackSeq"] == 1
            # RigorAck: nothing is dispatched before al confirms; the server resends its
            # ack from its deadline until then.
            assert json.loads(await al.recv()) == json.loads(await al.recv())
            await al.send(json.dumps({"frameType": 2, "id": "m1", "ackSeq": 2}))
            first = json.loads(await bob.recv())
            assert (first["method"], first["data"], first["formId"]) == ("broadcast", "hi", "al")
            again = json.loads(await bob.recv())  # bob did not ack: the push comes again
            assert again["id"] == first["id"]
            await bob.send(json.dumps({"frameType": 2, "id": first["id"], "ackSeq": 1}))
            confirm = json.loads(await bob.recv())
            assert (confirm["frameType"], confirm["id"], confirm["ackSeq"]) == (2, first["id"], 2)
