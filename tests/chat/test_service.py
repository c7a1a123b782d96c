"""The chat service end to end: real loopback servers, the imkit client, asyncio and trio.

Each test says what a client sees. Raw-socket checks (forged fields, lost answers) are in
``test_service_raw.py``; offline delivery across restarts in ``test_offline.py``.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from imkit.chat.ids import private_conversation_id
from imkit.chat.memory import MemoryStore
from imkit.chat.sqlite import SQLiteStore
from imkit.exceptions import RequestFailed
from imkit.transport.client import connect

from .test_service_helpers import (
    chat_client,
    chat_pair,
    chat_server,
    collect,
    nothing_more,
    ws_url,
)

pytestmark = pytest.mark.anyio

AB = private_conversation_id("alice", "bob")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


async def _request_error(call: Any) -> str:
    """The ``Err`` code a request was refused with."""
    with pytest.raises(RequestFailed) as info:
        await call
    return info.value.code


# ---------------------------------------------------------------- two senders at once


async def test_two_senders_and_two_devices_see_one_gapless_order(tmp_path: Path) -> None:
    """Alice (two devices, "multi" login) and Bob send at the same moment: the seqs are
    1..N without gaps, and every device sees the same message under each seq."""
    per_sender = 60
    with anyio.fail_after(30):
        async with (
            chat_server(SQLiteStore(tmp_path / "chat.db"), login_policy="multi") as srv,
            # The conversation is new: every client knows it has seen nothing of it.
            chat_client(srv.url, "alice", "d1", seen={AB: 0}) as a1,
            chat_client(srv.url, "alice", "d2", seen={AB: 0}) as a2,
            chat_client(srv.url, "bob", seen={AB: 0}) as b,
        ):
            clients = {"a1": a1, "a2": a2, "b": b}
            answers: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
            total = per_sender * len(clients)

            async def send_all(name: str) -> None:
                peer = "alice" if name == "b" else "bob"
                for i in range(per_sender):
                    answer = await clients[name].send(peer, f"{name}-{i}")
                    answers[name].append(answer)

            received: dict[str, list[dict[str, Any]]] = {}

            async def receive_all(name: str) -> None:
                chat = clients[name]
                # Bob sees Alice's two devices; each Alice device sees Bob and the other device.
                expected = total - per_sender
                received[name] = await collect(chat, expected)

            async with anyio.create_task_group() as tg:
                for name in clients:
                    tg.start_soon(receive_all, name)
                for name in clients:
                    tg.start_soon(send_all, name)

    all_seqs = sorted(a["seq"] for sent in answers.values() for a in sent)
    assert all_seqs == list(range(1, total + 1)), "seqs are gapless and unique"
    for name, sent in answers.items():
        assert [a["seq"] for a in sent] == sorted(a["seq"] for a in sent), (
            f"{name}'s own messages got rising seqs"
        )
    views: dict[str, dict[int, str]] = {}
    for name in clients:
        seqs = [m["seq"] for m in received[name]]
        assert seqs == sorted(set(seqs)), f"{name} saw seqs rising, each once"
        view = {m["seq"]: m["msg"]["content"] for m in received[name]}
        view.update({a["seq"]: f"{name}-{i}" for i, a in enumerate(answers[name])})
        assert sorted(view) == list(range(1, total + 1)), f"{name} has every seq"
        views[name] = view
    assert views["a1"] == views["a2"] == views["b"], "every device sees the same order"


# ---------------------------------------------------------------- authorization


async def test_outsider_can_neither_read_sync_mark_nor_post_into_a_conversation() -> None:
    """Carol gets ``forbidden`` for every route on the Alice-Bob conversation."""
    async with chat_pair(MemoryStore(), users=("alice", "carol")) as (_, alice, carol):
        await alice.send("bob", "for bob only")
        c = carol.client
        assert await _request_error(
            c.request("conversation.getChatLog", {"conversationId": AB})
        ) == ("forbidden")
        assert await _request_error(c.request("conversation.sync", {AB: 0})) == "forbidden"
        assert (
            await _request_error(
                c.request("conversation.markChat", {"conversationId": AB, "seq": 1})
            )
            == "forbidden"
        )
        posting = {
            "conversationId": AB,
            "chatType": 2,
            "recvId": "bob",
            "msg": {"mType": 0, "content": "sneaky"},
        }
        assert await _request_error(c.request("conversation.chat", posting)) == "forbidden"
        # A made-up conversation id is refused the same way, not as a server error.
        for bogus in ("alice_bob_carol", "_x", "bob_alice", "carol"):
            assert (
                await _request_error(
                    c.request("conversation.getChatLog", {"conversationId": bogus})
                )
                == "forbidden"
            )
        log = await alice.client.request("conversation.getChatLog", {"conversationId": AB})
        assert [m["msg"]["content"] for m in log["list"]] == ["for bob only"]


async def test_user_online_lists_only_the_callers_conversation_peers() -> None:
    """``user.online`` never reveals who else is connected."""
    with anyio.fail_after(10):
        async with (
            chat_server(MemoryStore()) as srv,
            chat_client(srv.url, "alice") as alice,
            chat_client(srv.url, "bob"),
            chat_client(srv.url, "dave"),
            chat_client(srv.url, "carol") as carol,
        ):
            await alice.send("bob", "hi")
            await alice.send("erin", "are you there?")  # erin is offline
            assert await alice.client.request("user.online", {}) == {"online": ["bob"]}
            asked = await alice.client.request("user.online", {"userIds": ["dave", "bob", "erin"]})
            assert asked == {"online": ["bob"]}, "dave is online but no peer of alice"
            assert await carol.client.request("user.online", {"userIds": ["alice"]}) == {
                "online": []
            }


async def test_sender_is_always_the_authenticated_user() -> None:
    """Sender fields in the data are ignored: the message is stored and pushed as Alice's."""
    async with chat_pair(MemoryStore()) as (_, alice, bob):
        data = {
            "chatType": 2,
            "recvId": "bob",
            "sendId": "mallory",
            "formId": "mallory",
            "msgId": "m1",
            "msg": {"mType": 0, "content": "trust me", "sendId": "mallory"},
        }
        answer = await alice.client.request("conversation.chat", data)
        assert answer["conversationId"] == AB
        frame = await bob.client.receive()
        assert frame.form_id == "alice"
        assert frame.data["sendId"] == "alice"
        assert frame.data["msg"] == {"mType": 0, "content": "trust me"}


# ---------------------------------------------------------------- content


AWKWARD = [
    "nul\x00inside",
    "\x00",
    "rtl \u202egnp.exe",
    "emoji \U0001f600\U0001f469\u200d\U0001f4bb",
    "",
    "<script>alert(1)</script>",
    "'; DROP TABLE imkit_messages; --",
    'quote " backslash \\ percent % underscore _',
    "\r\n\t line breaks \u2028\u2029",
    "\ufeff BOM and \uffff noncharacter",
    "x" * (64 * 1024),  # exactly at the limit, in bytes
    "\u00e9" * (32 * 1024),  # 64 KiB of two-byte characters
    "\U0001f600" * (16 * 1024),  # 64 KiB of four-byte characters
]


async def test_awkward_content_round_trips_byte_for_byte(tmp_path: Path) -> None:
    """What Alice sends is what Bob gets, as UTF-8 bytes, and what history returns."""
    async with chat_pair(SQLiteStore(tmp_path / "chat.db"), seconds=20) as (_, alice, bob):
        for text in AWKWARD:
            await alice.send("bob", text)
        got = await collect(bob, len(AWKWARD))
        log = await bob.client.request(
            "conversation.getChatLog", {"conversationId": AB, "count": 100}
        )
    for sent, pushed, stored in zip(AWKWARD, got, log["list"], strict=True):
        assert pushed["msg"]["content"].encode("utf-8") == sent.encode("utf-8")
        assert stored["msg"]["content"].encode("utf-8") == sent.encode("utf-8")


async def test_content_over_the_limit_is_refused_and_neither_stored_nor_pushed() -> None:
    """64 KiB + 1 byte → ``too_large``; Bob receives nothing, history stays empty."""
    async with chat_pair(MemoryStore()) as (_, alice, bob):
        for text in ("x" * (64 * 1024 + 1), "\u00e9" * (32 * 1024) + "x"):
            assert await _request_error(alice.send("bob", text)) == "too_large"
        assert await nothing_more(bob.client) == []
        assert (await alice.client.request("conversation.list", {}))["list"] == []
        ok = await alice.send("bob", "x" * (64 * 1024))
        assert ok["seq"] == 1, "nothing before it took a seq"


async def test_malformed_chat_requests_get_bad_request_and_the_connection_stays() -> None:
    """Wrong shapes are answered with ``bad_request``; the next message still works."""
    bad: list[Any] = [
        None,
        [],
        {"chatType": 1, "recvId": "bob", "msg": {"content": "group?"}},
        {"chatType": 2, "msg": {"content": "to nobody"}},
        {"chatType": 2, "recvId": "", "msg": {"content": "x"}},
        {"chatType": 2, "recvId": "b\x00b", "msg": {"content": "x"}},
        {"chatType": 2, "recvId": "bob", "msg": {"content": 5}},
        {"chatType": 2, "recvId": "bob", "msg": "text"},
        {"chatType": "2", "recvId": "bob", "msg": {"content": "x"}},
        {"chatType": True, "recvId": "bob", "msg": {"content": "x"}},
    ]
    with anyio.fail_after(10):
        async with chat_server(MemoryStore()) as srv, chat_client(srv.url, "alice") as alice:
            for data in bad:
                code = await _request_error(alice.client.request("conversation.chat", data))
                assert code == "bad_request", data
            for data in ({"x": 1}, {AB: -1}, {AB: "1"}, {AB: 0, "limit": 0}):
                code = await _request_error(alice.client.request("conversation.sync", data))
                assert code in ("bad_request", "forbidden"), data
            assert (await alice.send("bob", "still here"))["seq"] == 1


async def test_optional_chat_fields_of_the_wrong_type_say_which() -> None:
    """``msgId`` and ``conversationId`` may be left out, not given as numbers: the client
    sees ``bad_request`` naming the field; nothing is stored."""
    message = {"chatType": 2, "recvId": "bob", "msg": {"content": "x"}}
    with anyio.fail_after(10):
        async with chat_server(MemoryStore()) as srv, chat_client(srv.url, "alice") as alice:
            for field, value in (("msgId", 5), ("conversationId", 7), ("msgId", ["m"])):
                with pytest.raises(RequestFailed) as info:
                    await alice.client.request("conversation.chat", {**message, field: value})
                assert info.value.code == "bad_request"
                assert str(info.value).endswith(f"{field!r} must be a string"), info.value
            answer = await alice.client.request("conversation.chat", {**message, "msgId": None})
            assert answer["seq"] == 1, "a null msgId is a missing one; nothing before was stored"


# ---------------------------------------------------------------- read receipts, history


async def test_mark_chat_moves_the_read_watermark_and_tells_the_other_side() -> None:
    """Bob marks 3 of 5 read: Alice gets ``conversation.read``; his unread count drops."""
    async with chat_pair(MemoryStore()) as (_, alice, bob):
        for i in range(5):
            await alice.send("bob", f"m{i}")
        await collect(bob, 5)
        (summary,) = await bob.conversations()
        assert summary["conversationId"] == AB
        assert summary["peerId"] == "alice"
        assert (summary["lastSeq"], summary["readSeq"], summary["unread"]) == (5, 0, 5)
        assert summary["lastMessage"]["msg"]["content"] == "m4"
        (mine,) = await alice.conversations()
        assert (mine["peerId"], mine["unread"]) == ("bob", 0), "own messages are not unread"

        assert await bob.mark_read(AB, 3) == 3
        frame = await alice.client.receive()
        assert frame.method == "conversation.read"
        assert frame.data == {"conversationId": AB, "userId": "bob", "readSeq": 3}
        assert (await bob.conversations())[0]["unread"] == 2
        assert await bob.mark_read(AB, 1) == 3, "a read watermark never moves back"
        assert await bob.mark_read(AB, 99) == 5, "nor beyond the last message"
        assert (await bob.conversations())[0]["unread"] == 0


async def test_get_chat_log_by_seq_and_time_range_paged() -> None:
    """History pages by seq range (``hasMore`` says when to go on) and by send time."""
    clock = iter(range(1000, 100_000, 1000))
    async with chat_pair(MemoryStore()) as (srv, alice, bob):
        srv.service.now_ms = lambda: next(clock)
        for i in range(1, 8):
            sender, peer = (alice, "bob") if i % 2 else (bob, "alice")
            assert (await sender.send(peer, f"m{i}"))["seq"] == i
        request = bob.client.request

        async def log(**query: Any) -> tuple[list[int], bool]:
            page = await request("conversation.getChatLog", {"conversationId": AB, **query})
            return [m["seq"] for m in page["list"]], page["hasMore"]

        assert await log(startSeq=2, endSeq=4) == ([2, 3, 4], False)
        pages, start = [], 1
        while True:
            seqs, more = await log(startSeq=start, count=3)
            pages.append(seqs)
            if not more:
                break
            start = seqs[-1] + 1
        assert pages == [[1, 2, 3], [4, 5, 6], [7]]
        assert await log(descending=True, count=2) == ([7, 6], True)
        assert await log(startSendTime=2000, endSendTime=4000) == ([2, 3, 4], False)
        assert await log(startSendTime=6500) == ([7], False)
        assert await log(startSeq=9) == ([], False)
        page = await request("conversation.getChatLog", {"conversationId": AB, "count": 1})
        (first,) = page["list"]
        assert first == {
            "conversationId": AB,
            "seq": 1,
            "sendId": "alice",
            "recvId": "bob",
            "msgId": first["msgId"],
            "chatType": 2,
            "sendTime": 1000,
            "msg": {"mType": 0, "content": "m1"},
        }


async def test_sync_pages_with_has_more() -> None:
    """``conversation.sync`` returns what follows each seq, at most ``limit`` at a time."""
    async with chat_pair(MemoryStore()) as (_, alice, bob):
        for i in range(5):
            await alice.send("bob", f"m{i}")
        page = await bob.client.request("conversation.sync", {AB: 1, "limit": 2})
        assert [m["seq"] for m in page["messages"][AB]] == [2, 3]
        assert page["hasMore"] == {AB: True}
        page = await bob.client.request("conversation.sync", {AB: 3})
        assert [m["seq"] for m in page["messages"][AB]] == [4, 5]
        assert page["hasMore"] == {AB: False}
        assert [m["seq"] for m in await bob.sync(AB, 0, limit=2)] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- live delivery


async def test_live_messages_reach_every_device_and_a_gap_is_pulled(tmp_path: Path) -> None:
    """Bob online gets Alice's messages at once; a client that missed one (it saw seq 3
    after seq 1) pulls seq 2 before handing out seq 3."""
    async with chat_pair(SQLiteStore(tmp_path / "chat.db")) as (_, alice, bob):
        await alice.send("bob", "one")
        assert [m["msg"]["content"] for m in await collect(bob, 1)] == ["one"]
        await alice.send("bob", "two")
        missed = await bob.client.receive()  # taken off the stream: the client never saw it
        assert missed.data["seq"] == 2
        await alice.send("bob", "three")
        got = await collect(bob, 2)
        assert [(m["seq"], m["msg"]["content"]) for m in got] == [(2, "two"), (3, "three")]


async def test_page_is_served_at_root_with_the_servers_ack_mode() -> None:
    """``GET /`` returns the chat page for this server; no WebSocket needed."""
    with anyio.fail_after(10):
        async with chat_server(MemoryStore(), ack_mode="rigor") as srv:
            http = srv.url.replace("ws://", "http://").removesuffix("/ws") + "/"

            def get() -> tuple[int, str, str]:
                with urllib.request.urlopen(http, timeout=5) as response:
                    return (
                        response.status,
                        response.headers["Content-Type"],
                        response.read().decode("utf-8"),
                    )

            status, content_type, html = await anyio.to_thread.run_sync(get)
    assert status == 200
    assert content_type.startswith("text/html")
    assert 'const ACK_MODE = "rigor";' in html
    assert 'const AUTH = "dev";' in html
    assert 'id="status"' in html


async def test_client_learns_nothing_about_users_it_never_talked_to() -> None:
    """Bob's ``conversation.list`` holds his conversations only, with the peer id."""
    with anyio.fail_after(10):
        async with (
            chat_server(MemoryStore()) as srv,
            chat_client(srv.url, "alice") as alice,
            chat_client(srv.url, "carol") as carol,
            connect(ws_url(srv.url, "bob")) as bob,
        ):
            await alice.send("bob", "hi bob")
            await carol.send("dave", "hi dave")
            listing = await bob.request("conversation.list", {})
            assert [(c["conversationId"], c["peerId"]) for c in listing["list"]] == [(AB, "alice")]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_messages_sent_back_to_back_are_answered_and_pushed_in_order(
    kind: str, tmp_path: Path
) -> None:
    """Alice sends 12 messages one after the other, each as soon as the server acked the
    one before (not waiting for its answer): the answers come in her order with seqs
    1..12, and Bob's pushes in that order too, on either backend (the handlers of one
    connection overlap while they wait for the store; they answer in order)."""
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "chat.db")
    async with chat_pair(store) as (_, alice, bob):
        for i in range(12):
            data = {"chatType": 2, "recvId": "bob", "msgId": f"m{i}", "msg": {"content": f"{i}"}}
            await alice.client.send("conversation.chat", data)
        answers = [await alice.client.receive() for _ in range(12)]
        assert [(a.data["msgId"], a.data["seq"]) for a in answers] == [
            (f"m{i}", i + 1) for i in range(12)
        ]
        pushes = [await bob.client.receive() for _ in range(12)]
        assert [(p.data["seq"], p.data["msg"]["content"]) for p in pushes] == [
            (i + 1, f"{i}") for i in range(12)
        ]


async def test_a_store_subclass_that_changes_append_alone_is_called_through_it() -> None:
    """A MemoryStore subclass that overrides ``append`` (not ``append_nowait``): the
    service stores through its ``append``, one message at a time, never around it."""

    class Counting(MemoryStore):
        calls = 0

        async def append(self, **fields: Any) -> Any:
            self.calls += 1
            return await super().append(**fields)

    store = Counting()
    async with chat_pair(store) as (_, alice, bob):
        assert (await alice.send("bob", "one"))["seq"] == 1
        assert (await alice.send("bob", "two"))["seq"] == 2
        assert [m["msg"]["content"] for m in await collect(bob, 2)] == ["one", "two"]
    assert store.calls == 2
