"""CASES.md D27, D29, E33: a fast producer, a mass reconnect, a crash mid-message.

What a client sees, on loopback, with bounded counts and time. D29 and E33 run
``python -m imkit serve`` as a subprocess (SQLite in ``tmp_path``) and SIGKILL it; E33 uses
the CLI's testing hooks ``IMKIT_FAULT_KILL_AFTER_STORE`` / ``IMKIT_FAULT_KILL_AFTER_ANSWER``
(see :mod:`imkit.cli`), which end the process at an exact point of a chat message.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.chat.test_service_helpers import collect, imkit_serve, nothing_more, ws_url

from imkit.chat.client import ChatClient
from imkit.chat.ids import private_conversation_id
from imkit.cli import FAULT_KILL_AFTER_ANSWER_ENV, FAULT_KILL_AFTER_STORE_ENV
from imkit.transport.client import Client, connect

pytestmark = pytest.mark.anyio

AB = private_conversation_id("alice", "bob")


def stored_rows(db: Path) -> list[tuple[str, int, str, str]]:
    """``(conversation, seq, sender, msgId)`` of every stored message, read from the file."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT conversation_id, seq, sender_id, msg_id FROM imkit_messages "
            "ORDER BY conversation_id, seq"
        ).fetchall()
    return [tuple(r) for r in rows]


async def pushes(client: Client, count: int) -> list[dict[str, Any]]:
    """The next ``count`` pushes exactly as the server sent them."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        frame = await client.receive()
        if frame.method == "push":
            out.append(frame.data)
    return out


# ---------------------------------------------------------------------------- E33
async def test_e33_killed_after_persist_before_answer_resend_gets_the_same_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stores Alice's message and dies before answering. Restarted on the same
    port and file, Alice's ChatClient resends under the same msgId and gets seq 1: the
    message is stored once, and Bob's ChatClient, online through both servers, hands it
    out once (on the wire it may come twice, by catch-up and by the resend's push; the
    client drops the repeated seq); the next message is seq 2."""
    db = tmp_path / "chat.db"
    args = ("--auth", "dev", "--db", str(db), "--rate-limit", "0")
    with anyio.fail_after(45):
        monkeypatch.setenv(FAULT_KILL_AFTER_STORE_ENV, "1")
        async with imkit_serve(tmp_path, *args, name="first") as (process, port):
            monkeypatch.delenv(FAULT_KILL_AFTER_STORE_ENV)
            base = f"ws://127.0.0.1:{port}/ws"
            async with (
                connect(ws_url(base, "alice")) as alice_client,
                connect(ws_url(base, "bob")) as bob_client,
            ):
                alice = ChatClient(alice_client, user_id="alice")
                bob = ChatClient(bob_client, user_id="bob")
                answers: list[dict[str, Any]] = []
                answered = anyio.Event()

                async def send() -> None:
                    answers.append(await alice.send("bob", "once", message_id="m-1"))
                    answered.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    assert await process.wait() == 137  # stored, then gone unanswered
                    assert answers == []
                    assert [r[1:] for r in stored_rows(db)] == [(1, "alice", "m-1")]
                    restart = ("--port", str(port))
                    async with imkit_serve(tmp_path, *args, *restart, name="second") as (_, again):
                        assert again == port
                        await answered.wait()
                        assert answers[0]["seq"] == 1 and answers[0]["msgId"] == "m-1"
                        nxt = await alice.send("bob", "next")
                        assert nxt["seq"] == 2
                        got = await collect(bob, 2)
                        assert await nothing_more(bob_client, 0.5) == [], "no message twice"
                        with anyio.move_on_after(0.3):
                            got += await collect(bob, 1)
        assert [(m["seq"], m["msg"]["content"]) for m in got] == [(1, "once"), (2, "next")]
        assert [r[1:] for r in stored_rows(db)] == [
            (1, "alice", "m-1"),
            (2, "alice", nxt["msgId"]),
        ]


async def test_e33_killed_after_answer_before_push_bob_catches_up_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's second message is answered (seq 2), then the server dies before pushing
    it to Bob. Restarted on the same port and file, Bob's client reconnects and gets seq 2
    by catch-up, once; later messages follow in order; no acknowledged message is lost."""
    db = tmp_path / "chat.db"
    args = ("--auth", "dev", "--db", str(db), "--rate-limit", "0")
    with anyio.fail_after(45):
        monkeypatch.setenv(FAULT_KILL_AFTER_ANSWER_ENV, "2")
        async with imkit_serve(tmp_path, *args, name="first") as (process, port):
            monkeypatch.delenv(FAULT_KILL_AFTER_ANSWER_ENV)
            base = f"ws://127.0.0.1:{port}/ws"
            async with (
                connect(ws_url(base, "alice")) as alice_client,
                connect(ws_url(base, "bob")) as bob,
            ):
                alice = ChatClient(alice_client, user_id="alice")
                # Bob's (empty) catch-up is over before the first live push: once in ~4
                # runs without this pause, Bob's raw stream had seq 1 twice (a connect
                # race between catch-up and a live push; not what this test is about).
                await anyio.sleep(0.3)
                first = await alice.send("bob", "one")
                got = await pushes(bob, 1)
                second = await alice.send("bob", "two")  # answered ...
                assert (first["seq"], second["seq"]) == (1, 2)
                assert await process.wait() == 137  # ... then gone before the push
                assert await nothing_more(bob, 0.3) == []
                async with imkit_serve(tmp_path, *args, "--port", str(port), name="second"):
                    got += await pushes(bob, 1)  # catch-up after Bob's client reconnects
                    third = await alice.send("bob", "three")
                    assert third["seq"] == 3
                    got += await pushes(bob, 1)
                    assert await nothing_more(bob, 0.5) == [], "no message twice"
    assert [(p["seq"], p["msg"]["content"]) for p in got] == [(1, "one"), (2, "two"), (3, "three")]
    assert [r[1] for r in stored_rows(db)] == [1, 2, 3]
