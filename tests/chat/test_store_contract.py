"""The MessageStore contract: every store passes the same tests.

Stores: MemoryStore and SQLiteStore under asyncio and trio, PostgresStore under asyncio
(asyncpg is asyncio-only) in a fresh schema per test, dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from imkit.chat.memory import MemoryStore
from imkit.chat.sqlite import SQLiteStore
from imkit.chat.store import ConversationSummary, MessageStore, QueuedAppend, StoredMessage
from imkit.exceptions import StoreError
from services import require_postgres_dsn

pytestmark = pytest.mark.anyio

CASES = [
    pytest.param(("memory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory", "trio"), id="memory-trio"),
    pytest.param(("sqlite", "asyncio"), id="sqlite-asyncio"),
    pytest.param(("sqlite", "trio"), id="sqlite-trio"),
    pytest.param(("postgres", "asyncio"), id="postgres-asyncio", marks=pytest.mark.services),
]

StoreFactory = Callable[[], Any]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    param: tuple[str, str] = request.param
    return param


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture
async def store_factory(case: tuple[str, str], tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Makes (unopened) store objects that all see the same data."""
    kind = case[0]
    if kind == "memory":
        shared = MemoryStore()
        yield lambda: shared
    elif kind == "sqlite":
        path = tmp_path / "chat.sqlite3"
        yield lambda: SQLiteStore(path)
    else:
        import asyncpg

        from imkit.integrations.postgres import PostgresStore

        dsn = require_postgres_dsn()
        schema = f"imkit_test_{uuid.uuid4().hex[:16]}"
        yield lambda: PostgresStore(dsn, schema=schema, min_size=1, max_size=8)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[MessageStore]:
    s = store_factory()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def send(
    store: MessageStore,
    conversation_id: str,
    sender: str,
    recv: str,
    msg_id: str,
    content: str = "hi",
    *,
    send_time: int = 1_700_000_000_000,
    m_type: int = 0,
) -> tuple[StoredMessage, bool]:
    return await store.append(
        conversation_id=conversation_id,
        sender_id=sender,
        recv_id=recv,
        msg_id=msg_id,
        chat_type=2,
        m_type=m_type,
        content=content,
        send_time=send_time,
    )


async def test_is_a_message_store(store: MessageStore) -> None:
    assert isinstance(store, MessageStore)


async def test_seqs_are_gapless_from_one(store: MessageStore) -> None:
    assert await store.last_seq("a_b") == 0
    for i in range(20):
        sender, recv = ("a", "b") if i % 3 else ("b", "a")
        message, created = await send(store, "a_b", sender, recv, f"m{i}", f"text {i}", m_type=i)
        assert created
        assert message.seq == i + 1
        assert (message.sender_id, message.recv_id, message.m_type) == (sender, recv, i)
    assert await store.last_seq("a_b") == 20
    stored = await store.read_after("a_b", 0, limit=100)
    assert [m.seq for m in stored] == list(range(1, 21))
    assert [m.msg_id for m in stored] == [f"m{i}" for i in range(20)]
    assert stored[5] == StoredMessage(
        conversation_id="a_b",
        seq=6,
        sender_id="a",
        recv_id="b",
        msg_id="m5",
        chat_type=2,
        m_type=5,
        content="text 5",
        send_time=1_700_000_000_000,
    )
    # Another conversation numbers from 1 on its own.
    message, _ = await send(store, "a_c", "a", "c", "m0")
    assert message.seq == 1


async def test_append_is_idempotent_on_sender_and_msg_id(store: MessageStore) -> None:
    first, created = await send(store, "a_b", "a", "b", "x", "original", send_time=1)
    assert created and first.seq == 1
    again, created = await send(store, "a_b", "a", "b", "x", "changed", send_time=2)
    assert not created
    assert again == first  # the original, not the resend's content or time
    assert await store.last_seq("a_b") == 1
    # No seq was burnt: the next message is 2.
    nxt, created = await send(store, "a_b", "a", "b", "y")
    assert created and nxt.seq == 2
    # The same msg_id from the other sender is another message.
    other, created = await send(store, "a_b", "b", "a", "x")
    assert created and other.seq == 3
    # ... and so is the same sender + msg_id in another conversation.
    elsewhere, created = await send(store, "a_c", "a", "c", "x")
    assert created and elsewhere.seq == 1
    assert len(await store.read_after("a_b", 0, limit=100)) == 3


async def test_concurrent_appends_are_gapless_and_deduplicated(store: MessageStore) -> None:
    results: list[tuple[StoredMessage, bool]] = []

    async def one(conversation: str, i: int) -> None:
        results.append(await send(store, conversation, "u1", "u2", f"id-{i}", f"c{i}"))

    async with anyio.create_task_group() as tg:
        for i in range(100):
            for conversation in ("u1_u2", "u1_u3"):
                tg.start_soon(one, conversation, i)
        # Resends of the first 30 ids race with the originals.
        for i in range(30):
            tg.start_soon(one, "u1_u2", i)

    assert len(results) == 230
    assert sum(created for _, created in results) == 200
    for conversation in ("u1_u2", "u1_u3"):
        stored = await store.read_after(conversation, 0, limit=1000)
        assert [m.seq for m in stored] == list(range(1, 101))
        assert sorted(m.msg_id for m in stored) == sorted(f"id-{i}" for i in range(100))
        assert await store.last_seq(conversation) == 100
    seq_of = {(m.conversation_id, m.msg_id): m.seq for m, created in results if created}
    for message, _ in results:
        assert seq_of[(message.conversation_id, message.msg_id)] == message.seq


async def test_read_after_pages(store: MessageStore) -> None:
    for i in range(25):
        await send(store, "a_b", "a", "b", f"m{i}")
    pages: list[list[int]] = []
    after = 0
    while True:
        page = await store.read_after("a_b", after, limit=10)
        if not page:
            break
        pages.append([m.seq for m in page])
        after = page[-1].seq
    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert await store.read_after("a_b", 25, limit=10) == []
    assert await store.read_after("a_b", 1000, limit=10) == []
    assert await store.read_after("nobody_here", 0, limit=10) == []


async def test_history_bounds_are_inclusive(store: MessageStore) -> None:
    # send_time: 1000, 1010, ..., 1190 (seq n has time 1000 + 10 * (n - 1))
    for i in range(20):
        await send(store, "a_b", "a", "b", f"m{i}", send_time=1000 + 10 * i)

    async def seqs(**kwargs: Any) -> list[int]:
        return [m.seq for m in await store.history("a_b", **kwargs)]

    assert await seqs() == list(range(1, 21))
    assert await seqs(start_seq=5, end_seq=8) == [5, 6, 7, 8]
    assert await seqs(start_seq=18) == [18, 19, 20]
    assert await seqs(end_seq=3) == [1, 2, 3]
    assert await seqs(start_time=1050, end_time=1080) == [6, 7, 8, 9]
    assert await seqs(start_time=1051, end_time=1079) == [7, 8]
    assert await seqs(start_seq=7, end_time=1100) == [7, 8, 9, 10, 11]
    assert await seqs(limit=3) == [1, 2, 3]
    assert await seqs(limit=3, descending=True) == [20, 19, 18]
    assert await seqs(start_seq=5, end_seq=12, limit=3, descending=True) == [12, 11, 10]
    assert await seqs(start_time=1000, end_time=1040, descending=True) == [5, 4, 3, 2, 1]
    assert await seqs(start_seq=9, end_seq=4) == []
    assert await seqs(start_time=5000) == []
    assert await store.history("x_y") == []


async def test_send_times_never_decrease_within_a_conversation(store: MessageStore) -> None:
    """A send time below the conversation's last is raised to it (a node's clock stepped
    back): the message is stored and returned so, a resend gets it back as stored, and
    history by time finds it where its seq is. Other conversations are not touched."""
    got = [
        (m.seq, m.send_time, created)
        for m, created in [
            await send(store, "a_b", "a", "b", "1", send_time=100),
            await send(store, "a_b", "b", "a", "2", send_time=50),  # raised to 100
            await send(store, "a_b", "a", "b", "3", send_time=120),
            await send(store, "a_b", "a", "b", "4", send_time=120),  # equal: kept
            await send(store, "a_b", "b", "a", "5", send_time=110),  # raised to 120
            await send(store, "a_c", "a", "c", "1", send_time=10),  # another conversation
            await send(store, "a_b", "b", "a", "2", send_time=999),  # a resend: as stored
        ]
    ]
    assert got == [
        (1, 100, True),
        (2, 100, True),
        (3, 120, True),
        (4, 120, True),
        (5, 120, True),
        (1, 10, True),
        (2, 100, False),
    ]
    assert [m.send_time for m in await store.read_after("a_b", 0, limit=10)] == [
        100,
        100,
        120,
        120,
        120,
    ]

    async def seqs(**kwargs: Any) -> list[int]:
        return [m.seq for m in await store.history("a_b", **kwargs)]

    assert await seqs(start_time=100, end_time=100) == [1, 2]
    assert await seqs(start_time=101) == [3, 4, 5]
    assert await seqs(end_time=119) == [1, 2]
    assert await seqs(start_time=120, descending=True, limit=2) == [5, 4]
    assert await seqs(start_time=121) == []
    assert await seqs(end_time=99) == []


async def test_membership(store: MessageStore) -> None:
    assert not await store.is_member("a_b", "a")
    await send(store, "a_b", "a", "b", "1")
    assert await store.is_member("a_b", "a")
    assert await store.is_member("a_b", "b")
    assert not await store.is_member("a_b", "c")
    assert not await store.is_member("a_c", "a")
    # A later message records its users too, also in a conversation that exists.
    await send(store, "a_b", "a", "b", "2")
    await send(store, "a_b", "c", "a", "3")
    assert await store.is_member("a_b", "c")
    await send(store, "a_b", "a", "d", "4")
    assert await store.is_member("a_b", "d")


async def test_delivered_watermark_is_monotonic_and_per_device(store: MessageStore) -> None:
    assert await store.get_delivered("b", "phone", "a_b") == 0
    assert await store.set_delivered("b", "phone", "a_b", 3) == 0  # nothing stored yet
    for i in range(5):
        await send(store, "a_b", "a", "b", f"m{i}")
    assert await store.set_delivered("b", "phone", "a_b", 3) == 3
    assert await store.set_delivered("b", "phone", "a_b", 2) == 3
    assert await store.set_delivered("b", "phone", "a_b", 0) == 3
    assert await store.get_delivered("b", "phone", "a_b") == 3
    assert await store.set_delivered("b", "phone", "a_b", 99) == 5  # capped at last seq
    assert await store.get_delivered("b", "phone", "a_b") == 5
    assert await store.get_delivered("b", "laptop", "a_b") == 0
    assert await store.set_delivered("b", "", "a_b", 1) == 1
    assert await store.get_delivered("b", "", "a_b") == 1
    assert await store.get_delivered("a", "phone", "a_b") == 0


async def test_read_watermark_is_monotonic(store: MessageStore) -> None:
    assert await store.get_read("b", "a_b") == 0
    for i in range(4):
        await send(store, "a_b", "a", "b", f"m{i}")
    assert await store.set_read("b", "a_b", 2) == 2
    assert await store.set_read("b", "a_b", 1) == 2
    assert await store.get_read("b", "a_b") == 2
    assert await store.set_read("b", "a_b", 10) == 4
    assert await store.get_read("a", "a_b") == 0


async def test_pending_orders_by_conversation_and_seq(store: MessageStore) -> None:
    # bob talks with alice, carol and dave; messages interleave across conversations.
    script = [
        ("alice_bob", "alice", "bob"),
        ("bob_dave", "dave", "bob"),
        ("alice_bob", "bob", "alice"),  # bob's own: never pending for bob
        ("alice_bob", "alice", "bob"),
        ("bob_carol", "carol", "bob"),
        ("bob_dave", "bob", "dave"),
        ("bob_dave", "dave", "bob"),
        ("alice_bob", "alice", "bob"),
        ("alice_carol", "alice", "carol"),  # not bob's conversation
    ]
    for i, (conversation, sender, recv) in enumerate(script):
        await send(store, conversation, sender, recv, f"m{i}")

    def keys(messages: list[StoredMessage]) -> list[tuple[str, int]]:
        return [(m.conversation_id, m.seq) for m in messages]

    everything = [
        ("alice_bob", 1),
        ("alice_bob", 3),
        ("alice_bob", 4),
        ("bob_carol", 1),
        ("bob_dave", 1),
        ("bob_dave", 3),
    ]
    assert keys(await store.pending("bob", "phone", limit=100)) == everything
    # Paging with a cursor, without acks.
    page1 = await store.pending("bob", "phone", limit=4)
    assert keys(page1) == everything[:4]
    last = page1[-1]
    page2 = await store.pending("bob", "phone", limit=4, after=(last.conversation_id, last.seq))
    assert keys(page2) == everything[4:]
    assert await store.pending("bob", "phone", limit=4, after=("bob_dave", 3)) == []
    # Paging by acks: the watermark hides what was acknowledged, per device.
    await store.set_delivered("bob", "phone", "alice_bob", 3)
    await store.set_delivered("bob", "phone", "bob_dave", 1)
    assert keys(await store.pending("bob", "phone", limit=100)) == [
        ("alice_bob", 4),
        ("bob_carol", 1),
        ("bob_dave", 3),
    ]
    assert keys(await store.pending("bob", "laptop", limit=100)) == everything
    assert keys(await store.pending("carol", "phone", limit=100)) == [("alice_carol", 1)]
    assert keys(await store.pending("alice", "phone", limit=100)) == [("alice_bob", 2)]
    assert await store.pending("zed", "phone", limit=100) == []


async def test_pending_cursor_and_watermark_combine(store: MessageStore) -> None:
    """A cursor inside a conversation continues above the higher of it and the device's
    watermark there; conversations after the cursor's start above their watermarks."""
    for i in range(6):
        await send(store, "a_b", "a", "b", f"ab{i}")
    await send(store, "a_b", "b", "a", "own")  # seq 7: b's own, never pending for b
    await send(store, "a_b", "a", "b", "ab7")  # seq 8
    for i in range(3):
        await send(store, "b_c", "c", "b", f"bc{i}")
    await send(store, "a_c", "a", "c", "not b's")
    await store.set_delivered("b", "d", "a_b", 4)
    await store.set_delivered("b", "d", "b_c", 1)

    def keys(messages: list[StoredMessage]) -> list[tuple[str, int]]:
        return [(m.conversation_id, m.seq) for m in messages]

    rest = [("b_c", 2), ("b_c", 3)]
    everything = [("a_b", 5), ("a_b", 6), ("a_b", 8), *rest]
    assert keys(await store.pending("b", "d", limit=100)) == everything
    # A cursor below the watermark: the watermark holds; above it: the cursor does.
    assert keys(await store.pending("b", "d", limit=100, after=("a_b", 2))) == everything
    assert keys(await store.pending("b", "d", limit=100, after=("a_b", 5))) == everything[1:]
    assert keys(await store.pending("b", "d", limit=100, after=("a_b", 6))) == everything[2:]
    # A cursor on a conversation that is not the user's, or before every conversation.
    assert keys(await store.pending("b", "d", limit=100, after=("a_c", 99))) == rest
    assert keys(await store.pending("b", "d", limit=100, after=("a", 99))) == everything
    assert keys(await store.pending("b", "d", limit=100, after=("zz", 0))) == []
    # Pages across a conversation boundary.
    page = await store.pending("b", "d", limit=2, after=("a_b", 5))
    assert keys(page) == [("a_b", 6), ("a_b", 8)]
    page = await store.pending("b", "d", limit=2, after=(page[-1].conversation_id, page[-1].seq))
    assert keys(page) == rest


async def test_conversations_and_unread_counts(store: MessageStore) -> None:
    await send(store, "alice_bob", "alice", "bob", "1", "hello", send_time=100)
    await send(store, "alice_bob", "bob", "alice", "2", "hi", send_time=110)
    await send(store, "alice_bob", "alice", "bob", "3", "how are you", send_time=120)
    await send(store, "alice_bob", "alice", "bob", "4", "?", send_time=130)
    await send(store, "bob_carol", "carol", "bob", "1", "yo", send_time=200)
    await send(store, "alice_carol", "alice", "carol", "1", "psst", send_time=300)

    bob = await store.conversations("bob")
    assert [c.conversation_id for c in bob] == ["bob_carol", "alice_bob"]  # newest first
    carol_chat, alice_chat = bob
    assert alice_chat.peer_id == "alice"
    assert (alice_chat.last_seq, alice_chat.read_seq, alice_chat.unread) == (4, 0, 3)
    assert alice_chat.last_message is not None
    assert alice_chat.last_message.content == "?"
    assert carol_chat == ConversationSummary(
        conversation_id="bob_carol",
        peer_id="carol",
        last_seq=1,
        read_seq=0,
        unread=1,
        last_message=(await store.read_after("bob_carol", 0, limit=1))[0],
    )

    await store.set_read("bob", "alice_bob", 3)
    bob = await store.conversations("bob")
    alice_chat = next(c for c in bob if c.conversation_id == "alice_bob")
    assert (alice_chat.read_seq, alice_chat.unread) == (3, 1)
    await store.set_read("bob", "alice_bob", 4)
    alice_chat = next(c for c in await store.conversations("bob") if c.peer_id == "alice")
    assert alice_chat.unread == 0

    alice = await store.conversations("alice")
    assert [(c.conversation_id, c.peer_id, c.unread) for c in alice] == [
        ("alice_carol", "carol", 0),
        ("alice_bob", "bob", 1),  # bob's "hi"
    ]
    assert await store.conversations("nobody") == []


async def test_conversation_with_oneself(store: MessageStore) -> None:
    message, created = await send(store, "me_me", "me", "me", "note")
    assert created and message.seq == 1
    assert await store.is_member("me_me", "me")
    assert await store.pending("me", "d", limit=10) == []
    [summary] = await store.conversations("me")
    assert (summary.peer_id, summary.unread, summary.last_seq) == ("me", 0, 1)


AWKWARD = [
    "",
    "\x00",
    "a\x00b\x00",
    "\u202eevil\u202c",
    "😀🇺🇳👩‍👩‍👧",
    "<script>alert(1)</script>",
    "'; DROP TABLE x;--",
    '"quoted" \\ backslash %s %% $1 ? :name',
    "line\nbreak\r\n\ttab",
    "\ufeff\u200b\uffff",
    "x" * 65536,
    "é" * 40000,
]


async def test_awkward_content_round_trips_exactly(store: MessageStore) -> None:
    for i, content in enumerate(AWKWARD):
        message, _ = await send(store, "a_b", "a", "b", f"m{i}", content)
        assert message.content == content
    stored = await store.read_after("a_b", 0, limit=100)
    assert [m.content for m in stored] == AWKWARD
    assert [m.content.encode("utf-8") for m in stored] == [c.encode("utf-8") for c in AWKWARD]
    history = await store.history("a_b", descending=True)
    assert [m.content for m in history] == AWKWARD[::-1]


async def test_awkward_ids_round_trip(store: MessageStore) -> None:
    ids = ["'; DROP TABLE x;--", "ユーザー", "😀", "a b", "%_", "\u202e"]
    for i, user in enumerate(ids):
        conversation = f"conv {user}"
        message, _ = await send(store, conversation, user, "peer", f"{user}-{i}")
        assert (message.conversation_id, message.sender_id) == (conversation, user)
        assert await store.is_member(conversation, user)
        [summary] = await store.conversations(user)
        assert (summary.conversation_id, summary.peer_id) == (conversation, "peer")
    pending = await store.pending("peer", "", limit=100)
    assert sorted(m.sender_id for m in pending) == sorted(ids)
    # Ordered by code point, the same in every store.
    assert [m.conversation_id for m in pending] == sorted(f"conv {u}" for u in ids)


async def test_data_survives_close_and_reopen(
    store: MessageStore, store_factory: StoreFactory
) -> None:
    for i in range(5):
        await send(store, "a_b", "a", "b", f"m{i}", f"content {i}")
    await store.set_delivered("b", "phone", "a_b", 2)
    await store.set_read("b", "a_b", 4)
    before = await store.read_after("a_b", 0, limit=10)
    await store.close()
    await store.close()  # idempotent

    reopened = store_factory()
    await reopened.open()
    try:
        assert await reopened.read_after("a_b", 0, limit=10) == before
        assert await reopened.last_seq("a_b") == 5
        assert await reopened.get_delivered("b", "phone", "a_b") == 2
        assert await reopened.get_read("b", "a_b") == 4
        assert await reopened.is_member("a_b", "b")
        message, created = await send(reopened, "a_b", "a", "b", "m1")
        assert (message.seq, created) == (2, False)
        message, created = await send(reopened, "a_b", "a", "b", "new")
        assert (message.seq, created) == (6, True)
    finally:
        await reopened.close()
    await store.open()  # the fixture closes it again


async def test_open_is_idempotent(store: MessageStore) -> None:
    await store.open()
    await send(store, "a_b", "a", "b", "1")
    await store.open()
    assert await store.last_seq("a_b") == 1


async def test_use_before_open_raises(store_factory: StoreFactory) -> None:
    fresh = store_factory()
    with pytest.raises(StoreError):
        await fresh.last_seq("a_b")
    with pytest.raises(StoreError):
        await send(fresh, "a_b", "a", "b", "1")


@pytest.mark.parametrize(
    "overrides",
    [
        {"conversation_id": ""},
        {"sender_id": ""},
        {"recv_id": ""},
        {"msg_id": ""},
        {"sender_id": "a\x00"},
        {"msg_id": "\x00"},
        {"content": "lone \ud800 surrogate"},
        {"recv_id": "b\udc80"},  # in an id too (ASCII ids skip the encode)
        {"m_type": 2**31},
        {"send_time": 2**63},
    ],
)
async def test_invalid_append_is_rejected_before_storing(
    store: MessageStore, overrides: dict[str, Any]
) -> None:
    arguments: dict[str, Any] = {
        "conversation_id": "a_b",
        "sender_id": "a",
        "recv_id": "b",
        "msg_id": "1",
        "chat_type": 2,
        "m_type": 0,
        "content": "x",
        "send_time": 1,
    }
    arguments.update(overrides)
    with pytest.raises(ValueError):
        await store.append(**arguments)
    assert await store.last_seq(arguments["conversation_id"] or "a_b") == 0


async def test_invalid_queries_are_rejected(store: MessageStore) -> None:
    with pytest.raises(ValueError):
        await store.read_after("a_b", 0, limit=0)
    with pytest.raises(ValueError):
        await store.history("a_b", limit=0)
    with pytest.raises(ValueError):
        await store.pending("a", "d", limit=0)
    with pytest.raises(ValueError):
        await store.set_delivered("a", "d", "a_b", -1)
    with pytest.raises(ValueError):
        await store.set_read("a", "a_b", -1)
    with pytest.raises(ValueError):
        await store.is_member("", "a")
    with pytest.raises(TypeError):
        await store.last_seq(5)  # type: ignore[arg-type]


def test_to_wire_uses_easy_chat_names() -> None:
    message = StoredMessage(
        conversation_id="a_b",
        seq=7,
        sender_id="a",
        recv_id="b",
        msg_id="m-1",
        chat_type=2,
        m_type=0,
        content="hello",
        send_time=1_700_000_000_123,
    )
    assert message.to_wire() == {
        "conversationId": "a_b",
        "seq": 7,
        "sendId": "a",
        "recvId": "b",
        "msgId": "m-1",
        "chatType": 2,
        "sendTime": 1_700_000_000_123,
        "msg": {"mType": 0, "content": "hello"},
    }


def _queued(store: MessageStore) -> QueuedAppend:
    if not isinstance(store, QueuedAppend):
        pytest.skip(f"{type(store).__name__} does not queue appends (no append_nowait)")
    return store


def _fields(msg_id: str, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "conversation_id": "a_b",
        "sender_id": "a",
        "recv_id": "b",
        "msg_id": msg_id,
        "chat_type": 2,
        "m_type": 0,
        "content": msg_id,
        "send_time": 1_700_000_000_000,
    }
    return {**fields, **changes}


class _Outcomes:
    """What a store's ``append_nowait`` reported: ``(msg_id, seq, created)`` or
    ``(msg_id, error)``, in the order the callbacks ran."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, ...]] = []
        self._wanted = 0
        self._enough = anyio.Event()

    def done(self, msg_id: str) -> Any:
        def record(result: tuple[StoredMessage, bool] | None, error: BaseException | None) -> None:
            assert (result is None) != (error is None), "exactly one of result and error"
            if result is not None:
                message, created = result
                assert message.msg_id == msg_id
                self.got.append((msg_id, message.seq, created))
            else:
                self.got.append((msg_id, error))
            if self._wanted and len(self.got) >= self._wanted:
                self._enough.set()

        return record

    async def wait(self, count: int) -> list[tuple[Any, ...]]:
        if len(self.got) < count:
            self._wanted, self._enough = count, anyio.Event()
            with anyio.fail_after(5):
                await self._enough.wait()
        return self.got


async def test_queued_appends_take_seqs_and_report_in_call_order(store: MessageStore) -> None:
    """Five appends queued at once, then a repeat of a msg_id: seqs follow the calls, the
    callbacks run in call order, the repeat gets the first one back (created False)."""
    queued = _queued(store)
    outcomes = _Outcomes()
    for i in range(5):
        queued.append_nowait(**_fields(f"m{i}"), done=outcomes.done(f"m{i}"))
    queued.append_nowait(**_fields("m1"), done=outcomes.done("m1"))
    assert await outcomes.wait(6) == [
        ("m0", 1, True),
        ("m1", 2, True),
        ("m2", 3, True),
        ("m3", 4, True),
        ("m4", 5, True),
        ("m1", 2, False),
    ]
    assert await store.last_seq("a_b") == 5
    assert [m.msg_id for m in await store.read_after("a_b", 0, limit=10)] == [
        f"m{i}" for i in range(5)
    ]


async def test_queued_appends_keep_send_times_from_decreasing(store: MessageStore) -> None:
    """Appends queued together (one round) raise a send time below the one before them,
    in the round and across rounds."""
    queued = _queued(store)
    await send(store, "a_b", "a", "b", "first", send_time=500)
    times: list[int] = []
    done = anyio.Event()

    def record(result: tuple[StoredMessage, bool] | None, error: BaseException | None) -> None:
        assert result is not None, error
        times.append(result[0].send_time)
        if len(times) == 4:
            done.set()

    for i, send_time in enumerate([400, 600, 550, 700]):
        queued.append_nowait(**_fields(f"m{i}", send_time=send_time), done=record)
    with anyio.fail_after(5):
        await done.wait()
    assert times == [500, 600, 600, 700]
    assert [m.send_time for m in await store.read_after("a_b", 0, limit=10)] == [
        500,
        500,
        600,
        600,
        700,
    ]


async def test_a_queued_append_reports_failures_to_its_callback_never_raising(
    store_factory: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad arguments (ValueError) and a closed store (StoreError) go to ``done``; the call
    never raises, the appends around a bad one are stored, and a callback that raises
    is logged without stopping the store."""
    store = store_factory()
    queued = _queued(store)
    outcomes = _Outcomes()
    queued.append_nowait(**_fields("m0"), done=outcomes.done("m0"))
    [(msg_id, error)] = await outcomes.wait(1)
    assert msg_id == "m0" and isinstance(error, StoreError)
    await store.open()
    try:
        outcomes = _Outcomes()
        queued.append_nowait(**_fields("good-1"), done=outcomes.done("good-1"))
        queued.append_nowait(**_fields("", content="x"), done=outcomes.done(""))
        queued.append_nowait(**_fields("good-2"), done=outcomes.done("good-2"))
        got = await outcomes.wait(3)
        [(_, error)] = [o for o in got if o[0] == ""]
        assert isinstance(error, ValueError) and "msg_id" in str(error)
        assert [o for o in got if o[0] != ""] == [("good-1", 1, True), ("good-2", 2, True)]

        def explode(result: object, error: object) -> None:
            raise RuntimeError("a bug in the callback")

        queued.append_nowait(**_fields("boom"), done=explode)
        outcomes = _Outcomes()
        queued.append_nowait(**_fields("after"), done=outcomes.done("after"))
        assert await outcomes.wait(1) == [("after", 4, True)]
        assert await store.last_seq("a_b") == 4
        assert "an append_nowait callback failed" in caplog.text
        assert "a bug in the callback" in caplog.text
    finally:
        await store.close()
