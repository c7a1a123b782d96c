"""PostgresStore beyond the shared contract: several nodes, schema setup, errors.

Needs PostgreSQL at 127.0.0.1:5432 (``IMKIT_POSTGRES_DSN`` to change it); skipped when
unreachable unless ``IMKIT_REQUIRE_SERVICES=1``. Each test works in its own schema and
drops it afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import imkit
from imkit.chat.store import SCHEMA_VERSION, StoredMessage
from imkit.exceptions import ConfigurationError, StoreError, StoreUnavailable
from services import require_postgres_dsn

asyncpg = pytest.importorskip("asyncpg")
from imkit.integrations.postgres import PostgresStore  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def schema() -> AsyncIterator[tuple[str, str]]:
    """A DSN and a fresh schema name; the schema is dropped afterwards."""
    dsn = require_postgres_dsn()
    name = f"imkit_test_{uuid.uuid4().hex[:16]}"
    yield dsn, name
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def send(
    store: PostgresStore, msg_id: str, *, sender: str = "a"
) -> tuple[StoredMessage, bool]:
    return await store.append(
        conversation_id="a_b",
        sender_id=sender,
        recv_id="b" if sender == "a" else "a",
        msg_id=msg_id,
        chat_type=2,
        m_type=0,
        content=f"from {sender}",
        send_time=1,
    )


@pytest.mark.services
async def test_nodes_starting_together_share_one_schema(schema: tuple[str, str]) -> None:
    dsn, name = schema
    stores = [PostgresStore(dsn, schema=name, min_size=1, max_size=4) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.open)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            version = await conn.fetchval(f'SELECT version FROM "{name}".imkit_schema_version')
        finally:
            await conn.close()
        assert version == SCHEMA_VERSION == 1
    finally:
        for store in stores:
            await store.close()


@pytest.mark.services
async def test_concurrent_nodes_give_gapless_seqs_and_dedupe(schema: tuple[str, str]) -> None:
    dsn, name = schema
    node1 = PostgresStore(dsn, schema=name, min_size=1, max_size=6)
    node2 = PostgresStore(dsn, schema=name, min_size=1, max_size=6)
    results: list[tuple[StoredMessage, bool]] = []

    async def one(store: PostgresStore, msg_id: str, sender: str) -> None:
        results.append(await send(store, msg_id, sender=sender))

    async with node1, node2:
        async with anyio.create_task_group() as tg:
            for i in range(150):
                # Every message goes through both nodes, as a client resending after a
                # failover would; one of each pair is stored.
                sender = "a" if i % 2 else "b"
                tg.start_soon(one, node1, f"m{i}", sender)
                tg.start_soon(one, node2, f"m{i}", sender)
        stored = await node1.read_after("a_b", 0, limit=1000)
    assert [m.seq for m in stored] == list(range(1, 151))
    assert sorted(m.msg_id for m in stored) == sorted(f"m{i}" for i in range(150))
    assert sum(created for _, created in results) == 150
    seq_of = {m.msg_id: m.seq for m in stored}
    assert all(seq_of[m.msg_id] == m.seq for m, _ in results)


@pytest.mark.services
async def test_table_prefix_and_schema_isolate_stores(schema: tuple[str, str]) -> None:
    dsn, name = schema
    async with (
        PostgresStore(dsn, schema=name) as one,
        PostgresStore(dsn, schema=name, table_prefix="other_") as two,
    ):
        await send(one, "1")
        await send(one, "2")
        assert (await send(two, "1"))[0].seq == 1
        assert await one.last_seq("a_b") == 2
        assert await two.last_seq("a_b") == 1


@pytest.mark.services
async def test_refuses_a_newer_schema(schema: tuple[str, str]) -> None:
    dsn, name = schema
    async with PostgresStore(dsn, schema=name):
        pass
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'UPDATE "{name}".imkit_schema_version SET version = 99')
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="version 99"):
        await PostgresStore(dsn, schema=name).open()


@pytest.mark.services
async def test_connection_lost_mid_append_raises_store_unavailable(
    schema: tuple[str, str],
) -> None:
    dsn, name = schema
    async with PostgresStore(dsn, schema=name, min_size=1, max_size=2) as store:
        await send(store, "1")
        admin = await asyncpg.connect(dsn)
        try:
            # Hold the conversation's row lock so the next append waits inside its
            # transaction, then kill the backend it waits on.
            locker = await asyncpg.connect(dsn)
            tx = locker.transaction()
            await tx.start()
            await locker.execute(
                f'SELECT 1 FROM "{name}".imkit_conversations WHERE conversation_id = $1 FOR UPDATE',
                "a_b",
            )
            outcome: list[BaseException] = []

            async def append_two() -> None:
                try:
                    await send(store, "2")
                except StoreError as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(append_two)
                with anyio.fail_after(10):
                    while True:
                        pid = await admin.fetchval(
                            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND query LIKE $1",
                            f"%{name}%",
                        )
                        if pid is not None:
                            break
                        await anyio.sleep(0.01)
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await tx.rollback()
            await locker.close()
        finally:
            await admin.close()
        assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)
        # The pool replaces the dead connection; the failed append burnt no seq.
        message, created = await send(store, "2")
        assert (message.seq, created) == (2, True)
        assert await store.last_seq("a_b") == 2


async def test_unreachable_server_raises_store_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=5)
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreError):
        await store.last_seq("a_b")


async def test_bad_names_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        PostgresStore("postgresql://x", schema='x"; DROP TABLE y; --')
    with pytest.raises(ConfigurationError):
        PostgresStore("postgresql://x", table_prefix="a-b")
    with pytest.raises(ConfigurationError):
        PostgresStore("postgresql://x", min_size=5, max_size=2)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_trio() -> None:
    with pytest.raises(ConfigurationError, match="asyncio"):
        await PostgresStore("postgresql://postgres@127.0.0.1:1/test").open()


def test_import_without_asyncpg_names_the_extra() -> None:
    src = str(Path(imkit.__file__).resolve().parent.parent)
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "try:\n"
        "    import imkit.integrations.postgres\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "pip install 'imkit[postgres]'" in out


def _scanned(plan: dict[str, object], relation: str) -> int:
    """Rows the plan node tree read from ``relation``: returned and filtered out, over
    every loop of each scan of it."""
    total = 0
    if plan.get("Relation Name") == relation:
        loops = int(plan.get("Actual Loops", 1))  # type: ignore[call-overload]
        for key in ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck"):
            total += int(plan.get(key, 0)) * loops  # type: ignore[call-overload]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        total += _scanned(child, relation)
    return total


@pytest.mark.services
async def test_pending_reads_only_what_is_above_the_watermarks(schema: tuple[str, str]) -> None:
    """The catch-up query's shape on a real server: a device with three conversations of
    3,000 messages each, acknowledged up to 10 below the end of each. ``pending`` (the
    very SQL the store sends, run under ``EXPLAIN ANALYZE``) reads about the 30 messages
    above the watermarks from the messages table, not the 9,000 below them: each
    conversation is read by its primary key from its watermark on."""
    dsn, name = schema
    each, unread = 3000, 10
    async with PostgresStore(dsn, schema=name) as store:
        await send(store, "setup")  # the tables exist
        conn = await asyncpg.connect(dsn)
        try:
            for peer in ("p1", "p2", "p3"):
                conversation = f"{peer}_u"
                await conn.execute(
                    f"INSERT INTO {store._msgs} SELECT $1, s, $2, $3, $2 || s,"
                    " 2, 0, 'x'::bytea, s FROM generate_series(1, $4) s",
                    conversation,
                    peer,
                    "u",
                    each,
                )
                await conn.execute(f"INSERT INTO {store._conv} VALUES ($1, $2)", conversation, each)
                await conn.execute(
                    f"INSERT INTO {store._members} VALUES ($1, $3), ($2, $3)",
                    peer,
                    "u",
                    conversation,
                )
                await store.set_delivered("u", "", conversation, each - unread)
            await conn.execute(f"ANALYZE {store._msgs}")
            sent: list[tuple[str, tuple[object, ...]]] = []
            real = store._messages

            async def capture(sql: str, *args: object) -> list[StoredMessage]:
                sent.append((sql, args))
                return await real(sql, *args)

            store._messages = capture  # type: ignore[method-assign]
            page = await store.pending("u", "", limit=100)
            assert [(m.conversation_id, m.seq) for m in page] == [
                (f"{peer}_u", seq)
                for peer in ("p1", "p2", "p3")
                for seq in range(each - unread + 1, each + 1)
            ]
            ((sql, args),) = sent
            explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        finally:
            await conn.close()
    plan = json.loads(explained)[0]["Plan"]
    read = _scanned(plan, f"{store._prefix}messages")
    assert read <= 3 * unread + 10, (read, json.dumps(plan, indent=1))
