"""The chat service driven by a client imkit did not write (the ``websockets`` library).

These tests write the wire format by hand: forged sender fields, a resend after a lost
answer, a push that is never acknowledged. ``websockets`` runs on asyncio only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from imkit.chat.ids import private_conversation_id
from imkit.chat.memory import MemoryStore
from imkit.chat.sqlite import SQLiteStore
from imkit.core.ack import AckTimers
from imkit.exceptions import StoreUnavailable

from .test_service_helpers import chat_client, chat_server, collect, nothing_more, ws_url

pytestmark = pytest.mark.anyio

AB = private_conversation_id("alice", "bob")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def frame(**fields: Any) -> str:
    """One wire frame, every easy-chat field present."""
    base = {"frameType": 0, "id": "", "ackSeq": 0, "method": "", "formId": "", "data": None}
    return json.dumps({**base, "transpondUid": "", **fields})


def chat(content: str, **extra: Any) -> dict[str, Any]:
    """The data of a ``conversation.chat`` to Bob."""
    return {"chatType": 2, "recvId": "bob", "msg": {"mType": 0, "content": content}, **extra}


@asynccontextmanager
async def raw(base: str, user: str) -> AsyncIterator[ClientConnection]:
    """A plain ``websockets`` connection logged in as ``user``."""
    async with ws_connect(ws_url(base, user), compression=None, close_timeout=1) as ws:
        yield ws


async def receive(ws: ClientConnection, seconds: float = 5) -> dict[str, Any]:
    """The next frame, decoded."""
    with anyio.fail_after(seconds):
        decoded: dict[str, Any] = json.loads(await ws.recv())
    return decoded


async def answer_to(ws: ClientConnection, frame_id: str, *, ack: bool = True) -> dict[str, Any]:
    """Read frames until the answer to ``frame_id`` (acking Data frames); its data."""
    while True:
        got = await receive(ws)
        if got["frameType"] == 0 and ack:
            await ws.send(frame(frameType=2, id=got["id"], ackSeq=1))
        if got["frameType"] == 9 and got["id"] == frame_id:
            raise AssertionError(f"refused: {got['data']}")
        if got["frameType"] in (0, 3) and got.get("replyTo") == frame_id:
            data: dict[str, Any] = got["data"]
            return data


async def quiet(ws: ClientConnection, seconds: float = 0.4) -> list[dict[str, Any]]:
    """Every frame that arrives within ``seconds``."""
    frames: list[dict[str, Any]] = []
    with anyio.move_on_after(seconds):
        while True:
            frames.append(await receive(ws, seconds + 1))
    return frames


async def test_forged_form_id_and_sender_fields_are_ignored() -> None:
    """A frame claiming ``formId: mallory`` is stored and pushed as Alice's."""
    with anyio.fail_after(10):
        async with chat_server(MemoryStore()) as srv, chat_client(srv.url, "bob") as bob:
            async with raw(srv.url, "alice") as ws:
                forged = chat("hi", sendId="mallory", formId="mallory", senderId="mallory")
                await ws.send(
                    frame(id="f1", method="conversation.chat", formId="mallory", data=forged)
                )
                answer = await answer_to(ws, "f1")
            assert answer["conversationId"] == AB
            pushed = await bob.client.receive()
            assert (pushed.form_id, pushed.data["sendId"]) == ("alice", "alice")
            (summary,) = await bob.conversations()
            assert summary["peerId"] == "alice"


async def test_lost_answer_is_replayed_on_reconnect_and_the_resend_stores_nothing() -> None:
    """Alice's client dies after the server stored her message and answered, before it
    read the answer. On reconnect she gets the same answer (same seq); resending the
    same frame is acked and stored nowhere a second time; Bob gets it once."""
    with anyio.fail_after(15):
        async with chat_server(MemoryStore()) as srv:
            async with raw(srv.url, "alice") as ws:
                await ws.send(frame(id="f1", method="conversation.chat", data=chat("once")))
                first = await answer_to(ws, "f1", ack=False)  # the answer is never acked
            assert first["seq"] == 1
            async with raw(srv.url, "alice") as ws:
                replayed = await answer_to(ws, "f1")
                assert replayed == first
                await ws.send(frame(id="f1", method="conversation.chat", data=chat("once")))
                again = await quiet(ws)
                assert [(f["frameType"], f["ackSeq"]) for f in again] == [(2, 1)], (
                    "the resend is acked, not handled again"
                )
            async with chat_client(srv.url, "bob") as bob:
                got = await collect(bob, 1)
                assert [(m["seq"], m["msg"]["content"]) for m in got] == [(1, "once")]
                assert await nothing_more(bob.client) == []
                log = await bob.client.request("conversation.getChatLog", {"conversationId": AB})
                assert len(log["list"]) == 1


async def test_an_answer_to_a_named_message_is_a_noack_frame_and_counts_as_delivered() -> None:
    """With a ``msgId`` the answer comes as a NoAck frame (frameType 3): Alice sends no ack
    for it, nothing is resent, and her device's watermark passes her own message all the
    same (written when she disconnects). Without a ``msgId`` the answer is an acked Data
    frame, resent until acked."""
    store = MemoryStore()
    with anyio.fail_after(15):
        async with chat_server(store, timers=AckTimers(resend_interval=0.2)) as srv:
            async with raw(srv.url, "alice") as ws:
                named = chat("a", msgId="m1")
                await ws.send(frame(id="n1", method="conversation.chat", data=named))
                frames = await quiet(ws, 0.8)  # longer than the resend interval
                answers = [f for f in frames if f.get("replyTo") == "n1"]
                assert [(f["frameType"], f["data"]["seq"]) for f in answers] == [(3, 1)]
                assert [f["frameType"] for f in frames if f not in answers] == [2]  # its ack
                await ws.send(frame(id="d1", method="conversation.chat", data=chat("b")))
                frames = await quiet(ws, 0.8)
                answers = [f for f in frames if f.get("replyTo") == "d1"]
                assert len(answers) >= 2, "an acked answer is resent until acked"
                assert {(f["frameType"], f["data"]["seq"]) for f in answers} == {(0, 2)}
        await store.open()  # the server has stopped: every watermark it held is written
        assert await store.get_delivered("alice", "", AB) == 1, "seq 2 was never acked"


async def test_a_burst_from_one_connection_is_stored_in_order_in_few_commits(
    tmp_path: Path,
) -> None:
    """Alice sends 20 messages while another process holds the database's write lock:
    each is acked at once; then the lock goes. Each is answered, seqs 1..20 in the order
    she sent them, and Bob gets the pushes in that order. Her connection's next message
    started while the one before waited, up to 16 of them (the 17th waits for its own
    commit, holding back the last three): the first transaction stores 17, and the 20
    take at most 4, where storing one message of a connection at a time took 20."""
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    with anyio.fail_after(15):
        async with chat_server(store) as srv, chat_client(srv.url, "bob") as bob:
            before = store.write_transactions
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the server's next transaction must wait
            try:
                async with raw(srv.url, "alice") as ws:
                    for i in range(20):
                        data = chat(f"m{i}", msgId=f"m{i}")
                        await ws.send(frame(id=f"f{i}", method="conversation.chat", data=data))
                    acks = [await receive(ws) for _ in range(20)]
                    assert [(a["frameType"], a["id"]) for a in acks] == [
                        (2, f"f{i}") for i in range(20)
                    ]
                    await anyio.sleep(0.3)  # the handlers queue their appends meanwhile
                    other.execute("ROLLBACK")
                    answers = [await answer_to(ws, f"f{i}") for i in range(20)]
            finally:
                other.close()
            assert [(a["msgId"], a["seq"]) for a in answers] == [
                (f"m{i}", i + 1) for i in range(20)
            ]
            assert store.write_transactions - before <= 4
            pushes = [await bob.client.receive() for _ in range(20)]
            assert [(p.data["seq"], p.data["msg"]["content"]) for p in pushes] == [
                (i + 1, f"m{i}") for i in range(20)
            ]


async def test_a_locked_sqlite_file_answers_store_unavailable_then_the_resend_is_stored(
    tmp_path: Path,
) -> None:
    """Another process holds the file's write lock longer than the store waits (0.2 s):
    Alice's two chat messages, answered from the store's callback, each get ``Err
    store_unavailable`` under their own frame ids, and nothing is pushed to Bob. The
    lock gone, the same ``msgId`` resent in a new frame is stored once, seq 1, and
    pushed."""
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    with anyio.fail_after(15):
        async with chat_server(store) as srv, chat_client(srv.url, "bob") as bob:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                async with raw(srv.url, "alice") as ws:
                    for n in (1, 2):
                        data = chat(f"m{n}", msgId=f"m{n}")
                        await ws.send(frame(id=f"f{n}", method="conversation.chat", data=data))
                    frames = await quiet(ws, 1.0)
                    errors = {f["id"]: f["data"]["code"] for f in frames if f["frameType"] == 9}
                    assert errors == {"f1": "store_unavailable", "f2": "store_unavailable"}
                    assert not [f for f in frames if f.get("replyTo")], "no seq for either"
                    assert await nothing_more(bob.client) == []
                    other.execute("ROLLBACK")
                    data = chat("m1", msgId="m1")
                    await ws.send(frame(id="f1-again", method="conversation.chat", data=data))
                    answer = await answer_to(ws, "f1-again")
                    assert (answer["msgId"], answer["seq"]) == ("m1", 1)
            finally:
                other.close()
            (got,) = await collect(bob, 1)
            assert (got["seq"], got["msg"]["content"]) == (1, "m1")
            assert await nothing_more(bob.client) == []


async def test_same_frame_twice_on_one_connection_is_handled_once() -> None:
    """A duplicated Data frame: two acks, one answer, one stored message."""
    with anyio.fail_after(10):
        async with chat_server(MemoryStore()) as srv:
            async with raw(srv.url, "alice") as ws:
                text = frame(id="dup", method="conversation.chat", data=chat("twice?"))
                await ws.send(text)
                await ws.send(text)
                frames = await quiet(ws, 0.6)
                acks = [f for f in frames if f["frameType"] == 2 and f["id"] == "dup"]
                answers = [f for f in frames if f.get("replyTo") == "dup"]
                assert len(acks) == 2
                assert [a["data"]["seq"] for a in answers] == [1]
            async with chat_client(srv.url, "bob") as bob:
                log = await bob.client.request("conversation.getChatLog", {"conversationId": AB})
                assert [m["msg"]["content"] for m in log["list"]] == ["twice?"]


async def test_resend_under_a_new_frame_id_with_the_same_msg_id_gets_the_same_seq() -> None:
    """What :class:`ChatClient` does after a lost answer: a new frame, the same ``msgId``."""
    with anyio.fail_after(10):
        async with chat_server(MemoryStore()) as srv, raw(srv.url, "alice") as ws:
            await ws.send(frame(id="a1", method="conversation.chat", data=chat("x", msgId="m")))
            first = await answer_to(ws, "a1")
            await ws.send(frame(id="b", method="conversation.chat", data=chat("y", msgId="n")))
            assert (await answer_to(ws, "b"))["seq"] == 2
            await ws.send(frame(id="a2", method="conversation.chat", data=chat("x", msgId="m")))
            again = await answer_to(ws, "a2")
            assert again == first == {**first, "seq": 1, "msgId": "m"}


async def test_resend_of_the_same_frame_after_a_server_restart_gets_the_same_seq(
    tmp_path: Path,
) -> None:
    """The server restarts (its memory of frame ids is gone); the same frame comes again:
    the store dedupes it and answers with the seq stored the first time."""
    db = tmp_path / "chat.db"
    with anyio.fail_after(15):
        async with chat_server(SQLiteStore(db)) as srv, raw(srv.url, "alice") as ws:
            await ws.send(frame(id="r1", method="conversation.chat", data=chat("before")))
            first = await answer_to(ws, "r1")
        async with chat_server(SQLiteStore(db)) as srv:
            async with raw(srv.url, "alice") as ws:
                await ws.send(frame(id="r1", method="conversation.chat", data=chat("before")))
                assert await answer_to(ws, "r1") == first
                await ws.send(frame(id="r2", method="conversation.chat", data=chat("after")))
                assert (await answer_to(ws, "r2"))["seq"] == 2
            async with chat_client(srv.url, "bob") as bob:
                got = await collect(bob, 2)
                assert [(m["seq"], m["msg"]["content"]) for m in got] == [
                    (1, "before"),
                    (2, "after"),
                ]


async def test_a_push_never_acknowledged_closes_the_connection_and_comes_again() -> None:
    """Bob's client takes pushes but never acks them: after the ack timeout the server
    closes it (1011); when Bob comes back the catch-up sends the message again."""
    timers = AckTimers(resend_interval=0.2, ack_timeout=0.6, remember_for=1.0)
    with anyio.fail_after(15):
        async with chat_server(MemoryStore(), timers=timers) as srv:
            async with raw(srv.url, "bob") as ws, chat_client(srv.url, "alice") as alice:
                await alice.send("bob", "are you there?")
                copies = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        copies.append(json.loads(await ws.recv()))
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
                assert {c["data"]["seq"] for c in copies} == {1}, "resent, never dropped"
            async with raw(srv.url, "bob") as ws:
                again = await receive(ws)
                assert (again["method"], again["data"]["seq"]) == ("push", 1)
                await ws.send(frame(frameType=2, id=again["id"], ackSeq=1))
                await anyio.sleep(0.2)
            async with raw(srv.url, "bob") as ws:
                assert await quiet(ws) == [], "acked once: not sent again"


class FlakyStore(MemoryStore):
    """A memory store whose next ``failures`` appends fail as if the database were down."""

    failures = 0

    async def append(self, **fields: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the database is down")
        return await super().append(**fields)


async def test_store_outage_answers_store_unavailable_and_the_client_resends() -> None:
    """While the store fails, ``conversation.chat`` answers ``Err store_unavailable``
    (no seq, nothing pushed); :meth:`ChatClient.send` resends under the same ``msgId``
    until it is stored, once."""
    store = FlakyStore()
    with anyio.fail_after(15):
        async with chat_server(store) as srv, chat_client(srv.url, "bob") as bob:
            async with raw(srv.url, "alice") as ws:
                store.failures = 1
                await ws.send(frame(id="s1", method="conversation.chat", data=chat("lost?")))
                frames = await quiet(ws)
                (err,) = [f for f in frames if f["frameType"] == 9]
                assert (err["id"], err["data"]["code"]) == ("s1", "store_unavailable")
                assert not [f for f in frames if f.get("replyTo") == "s1"], "no seq"
            assert await nothing_more(bob.client) == []
            async with chat_client(srv.url, "alice") as alice:
                store.failures = 2
                answer = await alice.send("bob", "kept", attempt_timeout=0.5)
                assert (answer["seq"], store.failures) == (1, 0)
            (got,) = await collect(bob, 1)
            assert (got["seq"], got["msg"]["content"]) == (1, "kept")
            assert await nothing_more(bob.client) == []
