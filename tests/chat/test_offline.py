"""Offline messages: stored once, delivered after restarts, in order, exactly once.

Bob is offline while Alice writes; the server restarts (a new ``Server`` on the same
SQLite file, or a real ``imkit serve`` process stopped with SIGKILL or SIGTERM); Bob
connects and receives everything above his delivered watermark, oldest first.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from imkit.chat.client import ChatClient
from imkit.chat.ids import private_conversation_id
from imkit.chat.memory import MemoryStore
from imkit.chat.sqlite import SQLiteStore
from imkit.chat.store import StoredMessage
from imkit.transport.client import Client, connect

from .test_service_helpers import (
    chat_client,
    chat_server,
    collect,
    imkit_serve,
    nothing_more,
    server_log,
    ws_url,
)

pytestmark = pytest.mark.anyio

AB = private_conversation_id("alice", "bob")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


async def send_many(
    base: str, count: int, *, sender: str = "alice", to: str = "bob"
) -> dict[int, str]:
    """``sender`` sends ``count`` messages (up to 64 in flight); ``{seq: content}``."""
    sent: dict[int, str] = {}
    async with chat_client(base, sender) as chat:
        limiter = anyio.CapacityLimiter(64)

        async def one(i: int) -> None:
            async with limiter:
                answer = await chat.send(to, f"{sender}-{i}")
                sent[answer["seq"]] = f"{sender}-{i}"

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    return sent


async def raw_pushes(client: Client, count: int) -> list[dict[str, Any]]:
    """The next ``count`` pushes exactly as the server sent them (the client acks each)."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        frame = await client.receive()
        if frame.method == "push":
            out.append(frame.data)
    return out


async def test_a_thousand_offline_messages_survive_a_restart_and_arrive_once(
    tmp_path: Path,
) -> None:
    """Alice sends 1,000 to offline Bob; the server stops; a new one opens the same
    file; Bob gets seqs 1..1000 in order, each exactly once; reconnecting gets nothing."""
    db = tmp_path / "chat.db"
    with anyio.fail_after(60):
        async with chat_server(SQLiteStore(db)) as srv:
            sent = await send_many(srv.url, 1000)
        assert sorted(sent) == list(range(1, 1001))
        async with chat_server(SQLiteStore(db)) as srv:
            async with connect(ws_url(srv.url, "bob")) as bob:
                pushes = await raw_pushes(bob, 1000)
                assert await nothing_more(bob) == [], "no push comes twice"
            assert [p["seq"] for p in pushes] == list(range(1, 1001))
            assert all(p["msg"]["content"] == sent[p["seq"]] for p in pushes)
            assert {(p["sendId"], p["recvId"], p["conversationId"]) for p in pushes} == {
                ("alice", "bob", AB)
            }
            async with connect(ws_url(srv.url, "bob")) as bob:
                assert await nothing_more(bob, 0.5) == [], "delivered: not sent again"
        async with chat_server(SQLiteStore(db)) as srv, connect(ws_url(srv.url, "bob")) as bob:
            assert await nothing_more(bob, 0.5) == [], "nor after another restart"


async def test_catch_up_holds_live_pushes_so_bob_sees_seqs_rising(tmp_path: Path) -> None:
    """While Bob's catch-up of 600 messages is going out, Alice sends 100 more: Bob's
    stream (as the server sent it) has every seq once, rising."""
    with anyio.fail_after(60):
        async with chat_server(SQLiteStore(tmp_path / "chat.db")) as srv:
            await send_many(srv.url, 600)
            seqs: list[int] = []
            async with chat_client(srv.url, "alice") as alice:
                async with connect(ws_url(srv.url, "bob")) as bob:

                    async def bob_reads() -> None:
                        while len(set(seqs)) < 700:
                            frame = await bob.receive()
                            if frame.method == "push":
                                seqs.append(frame.data["seq"])

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(bob_reads)
                        for i in range(100):  # while the catch-up is under way
                            await alice.send("bob", f"live-{i}")
                    assert await nothing_more(bob) == []
    assert sorted(set(seqs)) == list(range(1, 701))
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == sorted(first_seen), "rising: no live push overtook the catch-up"
    # A live message comes twice only when Alice's ChatClient timed out and resent it
    # (the server pushes again on a resend; clients drop a seq they have). On a loaded
    # machine that can happen; a catch-up message never comes twice.
    repeated = {s for s in seqs if seqs.count(s) > 1}
    assert all(s > 600 for s in repeated), f"catch-up messages came twice: {sorted(repeated)}"


async def test_a_catch_up_that_sent_nothing_leaves_no_filter_on_the_session() -> None:
    """The catch-up's filter (dropping live pushes it already sent) stays on a session
    only when it sent something: otherwise each push would pass it for nothing."""
    with anyio.fail_after(20):
        async with chat_server(MemoryStore()) as srv:
            async with chat_client(srv.url, "alice") as alice:
                async with connect(ws_url(srv.url, "bob")) as bob:
                    await alice.send("bob", "live")  # pushed once the hold is released
                    assert [p["seq"] for p in await raw_pushes(bob, 1)] == [1]
                    (session,) = srv.server.sessions("bob")
                    assert session._keep is None
                await alice.send("bob", "offline")
                async with connect(ws_url(srv.url, "bob")) as bob:
                    assert [p["seq"] for p in await raw_pushes(bob, 1)] == [2]
                    await alice.send("bob", "live again")
                    assert [p["seq"] for p in await raw_pushes(bob, 1)] == [3]
                    (session,) = srv.server.sessions("bob")
                    assert session._keep is not None


async def test_a_catch_up_in_pages_crosses_conversations_in_order(tmp_path: Path) -> None:
    """Read five at a time, Bob's catch-up of three conversations (with one message of
    his own among them) brings each peer message once, by conversation, then seq."""
    with anyio.fail_after(30):
        async with chat_server(SQLiteStore(tmp_path / "chat.db")) as srv:
            srv.service.catch_up_page = 5
            await send_many(srv.url, 1, sender="bob", to="carol")  # before any is pending
            for sender in ("alice", "carol", "dave"):
                await send_many(srv.url, 4, sender=sender)
            async with connect(ws_url(srv.url, "bob")) as bob:
                pushes = await raw_pushes(bob, 12)
                assert await nothing_more(bob) == []
    got = [(p["conversationId"], p["seq"]) for p in pushes]
    assert got == [
        (private_conversation_id(sender, "bob"), seq)
        for sender in ("alice", "carol", "dave")
        for seq in (range(2, 6) if sender == "carol" else range(1, 5))
    ]


class _SlowLevelStore(MemoryStore):
    """A memory store whose delivered-watermark reads take 0.1 s; it records each read
    with what ``probe()`` says then, and counts the reads of holes (``read_after``)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe: Callable[[], int] = lambda: 0
        self.level_reads: list[tuple[str, str, int]] = []
        self.hole_reads = 0

    async def get_delivered(self, user_id: str, device_id: str, conversation_id: str) -> int:
        self.level_reads.append((user_id, conversation_id, self.probe()))
        await anyio.sleep(0.1)
        return await super().get_delivered(user_id, device_id, conversation_id)

    async def read_after(
        self, conversation_id: str, after_seq: int, *, limit: int
    ) -> list[StoredMessage]:
        self.hole_reads += 1
        return await super().read_after(conversation_id, after_seq, limit=limit)


async def test_a_catch_up_reads_each_watermark_before_its_first_push() -> None:
    """Bob catches up on 300 messages from Alice, then 300 from Carol, while the store
    takes 0.1 s to read a watermark. Each is read once, before the first push of the
    page that holds them goes out (not at the conversation's first ack, which would hold
    every later ack until the read is done), so his acks are noted as they come: no hole
    opens above a watermark (no message is read back), and he gets every message once,
    in order."""
    store = _SlowLevelStore()
    bc = private_conversation_id("bob", "carol")
    with anyio.fail_after(30):
        async with chat_server(store) as srv:
            for sender in ("alice", "carol"):
                await send_many(srv.url, 300, sender=sender)
            store.level_reads.clear()

            def pushed_to_bob() -> int:  # the pushes Bob's connection has sent so far
                (session,) = srv.server.sessions("bob")
                return session.conn.peer._next_id  # type: ignore[attr-defined,no-any-return]

            store.probe = pushed_to_bob
            async with connect(ws_url(srv.url, "bob")) as bob:
                pushes = await raw_pushes(bob, 600)
                assert await nothing_more(bob) == []
                await _until(lambda: srv.service._devices[("bob", "")].level == {AB: 300, bc: 300})
    assert [(p["sendId"], p["seq"]) for p in pushes] == [
        (sender, seq) for sender in ("alice", "carol") for seq in range(1, 301)
    ]
    assert [read for read in store.level_reads if read[0] == "bob"] == [
        ("bob", AB, 0),
        ("bob", bc, 0),
    ]
    assert store.hole_reads == 0


@pytest.mark.parametrize("ack_mode", ["none", "only", "rigor"])
async def test_offline_and_live_delivery_in_every_ack_mode(ack_mode: str) -> None:
    """In each ack mode Bob gets the offline messages, then live ones, and a reconnect
    brings nothing again. Under NoAck a push counts as delivered once it is handed to
    the connection (there are no acks to wait for)."""
    with anyio.fail_after(30):
        async with chat_server(MemoryStore(), ack_mode=ack_mode) as srv:
            await send_many(srv.url, 50)
            async with chat_client(srv.url, "bob") as bob, chat_client(srv.url, "alice") as a:
                got = await collect(bob, 50)
                assert [m["seq"] for m in got] == list(range(1, 51))
                for i in range(10):
                    await a.send("bob", f"live-{i}")
                live = await collect(bob, 10)
                assert [m["seq"] for m in live] == list(range(51, 61))
                await anyio.sleep(0.1)  # the last acks reach the server
            async with connect(ws_url(srv.url, "bob")) as bob_again:
                assert await nothing_more(bob_again, 0.5) == []


async def test_the_watermark_passes_the_users_own_messages(tmp_path: Path) -> None:
    """Alice and Bob take turns; Bob goes offline; only Alice's new messages come at his
    next connect: his own replies never hold his delivered watermark back."""
    with anyio.fail_after(20):
        async with chat_server(SQLiteStore(tmp_path / "chat.db")) as srv:
            async with chat_client(srv.url, "alice") as alice:
                async with chat_client(srv.url, "bob") as bob:
                    for i in range(3):
                        await alice.send("bob", f"a{i}")
                        await collect(bob, 1)
                        await bob.send("alice", f"b{i}")
                    await anyio.sleep(0.1)
                await alice.send("bob", "while you were away")
            async with chat_client(srv.url, "bob") as bob:
                got = await collect(bob, 1)
                assert [(m["seq"], m["msg"]["content"]) for m in got] == [
                    (7, "while you were away")
                ]
                assert await nothing_more(bob.client) == []
            async with connect(ws_url(srv.url, "bob")) as bob_again:
                assert await nothing_more(bob_again, 0.5) == []


async def test_devices_have_their_own_watermarks() -> None:
    """In "multi" login mode Bob's phone and laptop each get the offline messages."""
    with anyio.fail_after(20):
        async with chat_server(MemoryStore(), login_policy="multi") as srv:
            await send_many(srv.url, 20)
            async with chat_client(srv.url, "bob", "phone") as phone:
                assert [m["seq"] for m in await collect(phone, 20)] == list(range(1, 21))
            async with chat_client(srv.url, "bob", "laptop") as laptop:
                assert [m["seq"] for m in await collect(laptop, 20)] == list(range(1, 21))
            async with connect(ws_url(srv.url, "bob", "phone")) as phone_again:
                assert await nothing_more(phone_again, 0.5) == []


async def test_a_device_passes_what_its_user_sent_from_another_device(tmp_path: Path) -> None:
    """Bob's laptop is off while he writes from his phone: the laptop's catch-up brings
    Alice's new message only, and the laptop's watermark passes Bob's own message (the
    server reads who sent the hole), so nothing comes again at the next connect. A
    client that knows it saw seq 1 pulls Bob's own message through the gap."""
    with anyio.fail_after(20):
        async with chat_server(SQLiteStore(tmp_path / "chat.db"), login_policy="multi") as srv:
            async with chat_client(srv.url, "alice") as alice:
                async with chat_client(srv.url, "bob", "laptop") as laptop:
                    await alice.send("bob", "one")
                    await collect(laptop, 1)
                    await anyio.sleep(0.1)
                async with chat_client(srv.url, "bob", "phone") as phone:
                    await phone.send("alice", "two, from the phone")
                await alice.send("bob", "three")
            async with connect(ws_url(srv.url, "bob", "laptop")) as laptop_raw:
                pushes = await raw_pushes(laptop_raw, 1)
                assert [(p["seq"], p["sendId"]) for p in pushes] == [(3, "alice")]
                assert await nothing_more(laptop_raw) == []
            async with connect(ws_url(srv.url, "bob", "laptop")) as laptop_again:
                assert await nothing_more(laptop_again, 0.5) == [], "3 was delivered"
            async with chat_client(srv.url, "bob", "tablet", seen={AB: 1}) as tablet:
                got = await collect(tablet, 2)
                assert [(m["seq"], m["sendId"]) for m in got] == [(2, "bob"), (3, "alice")]


# ---------------------------------------------------------------- a real `imkit serve`
# The server runs in its own process (on asyncio); the test side needs one backend only.


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_imkit_serve_killed_and_restarted_loses_nothing(tmp_path: Path) -> None:
    """``imkit serve`` as a process: SIGKILL after Alice's 1,000 messages were answered;
    restarted, Bob gets all 1,000 once, in order; SIGTERM exits cleanly with Bob's
    watermark saved, so the next start sends him nothing."""
    db = str(tmp_path / "chat.db")
    args = ("--auth", "dev", "--db", db, "--rate-limit", "0")
    with anyio.fail_after(90):
        async with imkit_serve(tmp_path, *args, name="first") as (process, port):
            sent = await send_many(f"ws://127.0.0.1:{port}/ws", 1000)
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
        assert sorted(sent) == list(range(1, 1001)), "every message was answered with a seq"

        async with imkit_serve(tmp_path, *args, name="second") as (process, port):
            async with connect(f"ws://127.0.0.1:{port}/ws?userId=bob") as bob:
                pushes = await raw_pushes(bob, 1000)
                assert await nothing_more(bob) == []
            assert [p["seq"] for p in pushes] == list(range(1, 1001))
            assert all(p["msg"]["content"] == sent[p["seq"]] for p in pushes)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        log = await server_log(tmp_path, "second")
        assert "shutting down" in log
        assert "Traceback" not in log

        async with imkit_serve(tmp_path, *args, name="third") as (process, port):
            async with connect(f"ws://127.0.0.1:{port}/ws?userId=bob") as bob:
                assert await nothing_more(bob, 0.5) == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_imkit_serve_killed_during_catch_up_resumes_where_bob_was(
    tmp_path: Path,
) -> None:
    """SIGKILL while Bob's catch-up is half done: after the restart Bob's client, which
    remembers what it saw, gets the rest; every message reaches it once, in order."""
    db = str(tmp_path / "chat.db")
    args = ("--auth", "dev", "--db", db, "--rate-limit", "0")
    seen: list[int] = []
    with anyio.fail_after(90):
        async with imkit_serve(tmp_path, *args, name="first") as (process, port):
            base = f"ws://127.0.0.1:{port}/ws"
            await send_many(base, 1000)
            async with connect(ws_url(base, "bob"), reconnect=False) as client:
                chat = ChatClient(client, user_id="bob")
                seen += [m["seq"] for m in await collect(chat, 400)]
                process.send_signal(signal.SIGKILL)
                await process.wait()
                marks = chat.seen
        assert marks == {AB: 400}
        async with imkit_serve(tmp_path, *args, name="second") as (process, port):
            async with connect(f"ws://127.0.0.1:{port}/ws?userId=bob") as client:
                chat = ChatClient(client, user_id="bob", seen=marks)
                seen += [m["seq"] for m in await collect(chat, 600)]
    assert seen == list(range(1, 1001))


class _CountingStore(MemoryStore):
    """A memory store that counts delivered-watermark writes."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered_writes = 0

    async def set_delivered(self, user_id: str, device_id: str, conversation: str, seq: int) -> int:
        self.delivered_writes += 1
        return await super().set_delivered(user_id, device_id, conversation, seq)


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (up to 5 s) until ``condition()`` holds."""
    with anyio.fail_after(5):
        for _ in range(1000):
            if condition():
                return
            await anyio.sleep(0.005)
    raise AssertionError("condition never held")


class _SlowWatermarkStore(MemoryStore):
    """A memory store whose delivered-watermark writes wait for ``gate`` while ``hold``."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.gate = anyio.Event()
        self.started: list[int] = []

    async def set_delivered(self, user_id: str, device_id: str, conversation: str, seq: int) -> int:
        self.started.append(seq)
        if self.hold:
            await self.gate.wait()
        return await super().set_delivered(user_id, device_id, conversation, seq)


async def test_acks_read_while_a_watermark_is_written_are_noted_at_once() -> None:
    """Bob's first ack starts a watermark write that the store holds up. The four acks he
    sends meanwhile are noted at once (his watermark in memory reaches 5 while the write
    of 1 still waits: they do not queue behind it), and start no second write. Once the
    store answers, the watermark stays due; his disconnect writes 5, and his next connect
    brings nothing."""
    store = _SlowWatermarkStore()
    with anyio.fail_after(20):
        async with chat_server(store) as srv:
            srv.service.watermark_interval = 0  # every ack that has all he was sent: due
            async with chat_client(srv.url, "alice") as alice:
                async with chat_client(srv.url, "bob") as bob:

                    def device() -> Any:
                        return srv.service._devices.get(("bob", ""))

                    store.hold = True
                    try:
                        await alice.send("bob", "m0")
                        assert [m["seq"] for m in await collect(bob, 1)] == [1]
                        await _until(lambda: store.started == [1])
                        for i in range(1, 5):
                            await alice.send("bob", f"m{i}")
                        assert [m["seq"] for m in await collect(bob, 4)] == [2, 3, 4, 5]
                        await _until(lambda: device().level.get(AB) == 5)
                        assert store.started == [1]  # one write at a time
                        assert await store.get_delivered("bob", "", AB) == 0  # still held up
                    finally:
                        store.gate.set()  # (else a failure here would hang Bob's disconnect)
                    await _until(lambda: store._delivered.get(("bob", "", AB)) == 1)
                    assert AB in device().dirty and not device().writing
                await _until(lambda: store._delivered.get(("bob", "", AB)) == 5)  # at disconnect
            async with connect(ws_url(srv.url, "bob")) as bob_again:
                assert await nothing_more(bob_again, 0.3) == []


@pytest.mark.parametrize(("interval", "writes_while_online"), [(3600.0, 1), (0.0, 10)])
async def test_a_busy_conversation_writes_its_watermark_once_per_interval(
    interval: float, writes_while_online: int
) -> None:
    """Bob acknowledges ten pushes one after another, each time having all he was sent:
    with a long ``watermark_interval`` only the first ack is written at once (the others
    wait: his disconnect writes them); with 0, every one is. Either way the store ends at
    10 and his next connect brings nothing."""
    store = _CountingStore()
    with anyio.fail_after(20):
        async with chat_server(store) as srv:
            srv.service.watermark_interval = interval
            async with chat_client(srv.url, "alice") as alice:
                async with chat_client(srv.url, "bob") as bob:

                    def level() -> int | None:  # Bob's delivered watermark in memory
                        device = srv.service._devices.get(("bob", ""))
                        return None if device is None else device.level.get(AB)

                    for i in range(10):
                        await alice.send("bob", f"m{i}")
                        assert [m["seq"] for m in await collect(bob, 1)] == [i + 1]
                        # His ack is in before the next push: he has all he was sent.
                        await _until(lambda i=i: level() == i + 1)
                    await _until(lambda: store.delivered_writes >= writes_while_online)
                    await anyio.sleep(0.05)  # no write is late
                    assert store.delivered_writes == writes_while_online
                    assert await store.get_delivered("bob", "", AB) == (10 if interval == 0 else 1)
                await _until(lambda: store._delivered.get(("bob", "", AB)) == 10)  # at disconnect
            async with connect(ws_url(srv.url, "bob")) as bob_again:
                assert await nothing_more(bob_again, 0.3) == []
