"""The wire format spoken by clients imkit did not write: the ``websockets`` library and
aiohttp, each sending Data frames, receiving Acks and pushes, acking pushes, and getting
Err frames for garbage."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anyio
import pytest
import websockets
from tests.transport.helpers import Collected, make_app, serve_tcp
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

import imkit

pytestmark = pytest.mark.anyio


def data(frame_id: str, method: str, payload: Any, **extra: Any) -> str:
    return json.dumps({"frameType": 0, "id": frame_id, "method": method, "data": payload, **extra})


def ack(frame_id: str, seq: int = 1) -> str:
    return json.dumps({"frameType": 2, "id": frame_id, "ackSeq": seq})


def delivery_app(mode: str = "only") -> tuple[imkit.App, Collected]:
    app, _seen = make_app(ack_mode=mode)
    delivered = Collected()

    @app.on_delivered
    async def on_delivered(session: imkit.Session, frame: imkit.Frame) -> None:
        delivered.add((session.user_id, frame.method, frame.id))

    return app, delivered


async def recv(ws: ClientConnection) -> dict[str, Any]:
    message = await ws.recv()
    assert isinstance(message, str)  # text frames only
    frame: dict[str, Any] = json.loads(message)
    return frame


# ----------------------------------------------------------------------------- websockets
async def test_websockets_client_sends_acks_and_receives_pushes() -> None:
    app, delivered = delivery_app()
    with anyio.fail_after(15):
        async with serve_tcp(app) as server:
            base = f"ws://127.0.0.1:{server.port}/ws"
            async with (
                ws_connect(f"{base}?userId=alice") as alice,
                ws_connect(f"{base}?userId=bob") as bob,
            ):
                assert alice.response is not None
                assert alice.response.headers["imkit-ack-mode"] == "only"
                # Data -> Ack{ackSeq + 1} at once (easy-chat's OnlyAck), then the reply.
                await alice.send(data("w1", "echo", {"hi": 1}, ackSeq=0))
                assert await recv(alice) == {
                    "frameType": 2, "id": "w1", "ackSeq": 1, "method": "", "formId": "",
                    "transpondUid": "", "data": None,
                }  # fmt: skip
                reply = await recv(alice)
                assert (reply["frameType"], reply["replyTo"], reply["data"]) == (0, "w1", {"hi": 1})
                await alice.send(ack(reply["id"]))
                # A push relayed from Bob, with a forged formId that the server overwrites.
                await bob.send(data("b1", "relay", {"to": "alice", "text": "yo"}, formId="eve"))
                assert (await recv(bob))["id"] == "b1"  # Bob's ack
                push = await recv(alice)
                assert (push["method"], push["formId"], push["ackSeq"]) == ("chat", "bob", 0)
                assert push["data"] == {"to": "alice", "text": "yo"}
                await alice.send(ack(push["id"]))
                await delivered.wait_until(lambda d: ("alice", "chat", push["id"]) in d)
                # Application ping: answered with a Ping frame.
                await alice.send(json.dumps({"frameType": 1}))
                assert (await recv(alice))["frameType"] == 1
                # Garbage: an Err frame naming the problem; the connection stays up.
                await alice.send("this is not json")
                err = await recv(alice)
                assert (err["frameType"], err["data"]["code"]) == (9, "bad_json")
                await alice.send(data("w2", "no.such", None))
                err = await recv(alice)
                assert (err["frameType"], err["id"], err["data"]["code"]) == (
                    9,
                    "w2",
                    "unknown_method",
                )
                await alice.send(data("w3", "echo", "still up"))
                assert (await recv(alice))["id"] == "w3"
                # A binary frame closes with 1003.
                await alice.send(b"\x00\x01")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await alice.recv()
                    await alice.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


async def test_websockets_client_rigor_ack() -> None:
    app, delivered = delivery_app("rigor")
    with anyio.fail_after(15):
        async with serve_tcp(app) as server:
            async with ws_connect(f"ws://127.0.0.1:{server.port}/ws?userId=rita") as ws:
                assert ws.response is not None
                assert ws.response.headers["imkit-ack-mode"] == "rigor"
                await ws.send(data("r1", "echo", "strict"))
                first = await recv(ws)
                assert (first["frameType"], first["id"], first["ackSeq"]) == (2, "r1", 1)
                await ws.send(ack("r1", 2))  # confirm: only now is it dispatched
                reply = await recv(ws)
                assert (reply["replyTo"], reply["data"]) == ("r1", "strict")
                await ws.send(ack(reply["id"], 1))
                confirm = await recv(ws)
                assert (confirm["frameType"], confirm["id"], confirm["ackSeq"]) == (
                    2,
                    reply["id"],
                    2,
                )
                await delivered.wait_until(lambda d: ("rita", "echo", reply["id"]) in d)


async def test_websockets_client_sees_http_statuses() -> None:
    app, _seen = make_app(auth=imkit.TokenAuth("interop-secret-0123456789"))
    with anyio.fail_after(15):
        async with serve_tcp(app) as server:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with ws_connect(f"ws://127.0.0.1:{server.port}/ws?token=nope"):
                    pass
            assert refused.value.response.status_code == 401
            token = imkit.mint_token("interop-secret-0123456789", "tok")
            async with ws_connect(
                f"ws://127.0.0.1:{server.port}/ws",
                additional_headers={"Authorization": f"Bearer {token}"},
            ) as ws:
                await ws.send(data("t1", "echo", 1))
                assert (await recv(ws))["frameType"] == 2


# ----------------------------------------------------------------------------- aiohttp
async def test_aiohttp_client_sends_acks_and_receives_pushes() -> None:
    app, delivered = delivery_app()
    with anyio.fail_after(15):
        async with serve_tcp(app) as server, aiohttp.ClientSession() as http:
            base = f"ws://127.0.0.1:{server.port}/ws"
            async with (
                http.ws_connect(f"{base}?userId=ann") as ann,
                http.ws_connect(f"{base}?userId=ben") as ben,
            ):
                await ann.send_str(data("a1", "echo", [1, 2, 3]))
                assert await ann.receive_json() == {
                    "frameType": 2, "id": "a1", "ackSeq": 1, "method": "", "formId": "",
                    "transpondUid": "", "data": None,
                }  # fmt: skip
                reply = await ann.receive_json()
                assert (reply["replyTo"], reply["data"]) == ("a1", [1, 2, 3])
                await ann.send_str(ack(reply["id"]))
                await ben.send_str(data("b1", "relay", {"to": "ann", "n": 7}))
                assert (await ben.receive_json())["frameType"] == 2
                push = await ann.receive_json()
                assert (push["method"], push["formId"], push["data"]["n"]) == ("chat", "ben", 7)
                await ann.send_str(ack(push["id"]))
                await delivered.wait_until(lambda d: ("ann", "chat", push["id"]) in d)
                await ann.send_str('{"frameType": "zero"}')
                err = await ann.receive_json()
                assert (err["frameType"], err["data"]["code"]) == (9, "bad_frame")
                await ann.send_bytes(b"binary")
                msg = await ann.receive()
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1003
            async with http.get(f"http://127.0.0.1:{server.port}/ws") as response:
                assert response.status == 426
