"""SQLiteStore beyond the shared contract: threads, locks, processes, durability."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import given, settings
from hypothesis import strategies as st

import imkit
from imkit.chat.sqlite import SQLiteStore, _Job, _Kind, _Round
from imkit.chat.store import StoredMessage
from imkit.exceptions import StoreError, StoreUnavailable

pytestmark = pytest.mark.anyio

SRC = str(Path(imkit.__file__).resolve().parent.parent)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def message(msg_id: str, content: str = "hi", *, conversation: str = "a_b") -> dict[str, Any]:
    """The arguments of an append from ``a`` to ``b``."""
    return {
        "conversation_id": conversation,
        "sender_id": "a",
        "recv_id": "b",
        "msg_id": msg_id,
        "chat_type": 2,
        "m_type": 0,
        "content": content,
        "send_time": 1,
    }


async def send(
    store: SQLiteStore, msg_id: str, content: str = "hi", *, conversation: str = "a_b"
) -> tuple[StoredMessage, bool]:
    return await store.append(**message(msg_id, content, conversation=conversation))


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


async def test_creates_a_versioned_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path) as store:
        await send(store, "1")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM imkit_schema_version").fetchall() == [(2,)]
        assert conn.execute("SELECT msg_id FROM imkit_messages").fetchall() == [("1",)]
        # Version 2: no index of messages by time (send times never decrease in a
        # conversation; history by time bisects the seqs).
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(imkit_messages)")}
        assert "imkit_messages_by_time" not in indexes
    conn.close()


async def test_the_connection_keeps_journals_in_memory_and_checkpoints_rarely(
    tmp_path: Path,
) -> None:
    """The store's own connection: savepoint and statement journals in memory (no
    temporary file per round), the log checkpointed every 10,000 pages."""
    async with SQLiteStore(tmp_path / "chat.db") as store:

        def pragmas(conn: sqlite3.Connection) -> tuple[int, int, str]:
            return (
                conn.execute("PRAGMA temp_store").fetchone()[0],
                conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
                conn.execute("PRAGMA journal_mode").fetchone()[0],
            )

        assert await store._call(_Kind.READ, pragmas) == (2, 10_000, "wal")  # 2: MEMORY


_V1_SCHEMA = """
CREATE TABLE imkit_schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO imkit_schema_version (id, version) VALUES (1, 1);
CREATE TABLE imkit_conversations (
    conversation_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE imkit_messages (
    conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, sender_id TEXT NOT NULL,
    recv_id TEXT NOT NULL, msg_id TEXT NOT NULL, chat_type INTEGER NOT NULL,
    m_type INTEGER NOT NULL, content TEXT NOT NULL, send_time INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq));
CREATE UNIQUE INDEX imkit_messages_by_msg_id ON imkit_messages (conversation_id, sender_id, msg_id);
CREATE INDEX imkit_messages_by_time ON imkit_messages (conversation_id, send_time);
"""


async def test_a_version_1_database_keeps_its_index_by_time(tmp_path: Path) -> None:
    """A database made at schema version 1 may hold send times that go down along the
    seqs (nothing kept them from it then): it is moved to version 2 with its index by
    time kept, and history by time reads that index, finding every message in range."""
    path = tmp_path / "chat.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_SCHEMA)
        times = [300, 100, 200, 100, 400]
        conn.executemany(
            "INSERT INTO imkit_messages VALUES ('a_b', ?, 'a', 'b', ?, 2, 0, 'x', ?)",
            [(seq, f"m{seq}", t) for seq, t in enumerate(times, 1)],
        )
        conn.execute("INSERT INTO imkit_conversations VALUES ('a_b', 5)")
    conn.close()
    async with SQLiteStore(path) as store:
        assert store._time_index
        assert [m.seq for m in await store.history("a_b", start_time=100, end_time=200)] == [
            2,
            3,
            4,
        ]
        # New messages keep to the rule from now on: not below the last one (400).
        message, _ = await send(store, "6")
        assert (message.seq, message.send_time) == (6, 400)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM imkit_schema_version").fetchall() == [(2,)]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(imkit_messages)")}
        assert "imkit_messages_by_time" in indexes
    conn.close()


@settings(max_examples=30, deadline=None)
@given(
    times=st.lists(st.integers(0, 30), max_size=40),
    bounds=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(-1, 32)),
            st.one_of(st.none(), st.integers(-1, 32)),
            st.one_of(st.none(), st.integers(0, 42)),
            st.integers(1, 50),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_history_by_time_without_the_index_reads_what_a_scan_reads(
    times: list[int], bounds: list[tuple[int | None, int | None, int | None, int, bool]]
) -> None:
    """Without the index by time (a version 2 database), history by time bisects the
    seqs for the range (send times never decrease along them) and gives what the
    in-memory store's scan gives, for any send times (raised where they went down), any
    time and seq bounds, limit and order."""
    import tempfile

    from imkit.chat.memory import MemoryStore

    async def main(path: Path) -> None:
        reference = MemoryStore()
        await reference.open()
        async with SQLiteStore(path) as store:
            assert not store._time_index
            for i, t in enumerate(times):
                fields = message(f"m{i}")
                fields["send_time"] = t
                assert await store.append(**fields) == await reference.append(**fields)
            for start_time, end_time, start_seq, limit, descending in bounds:
                query = {
                    "start_time": start_time,
                    "end_time": end_time,
                    "start_seq": start_seq,
                    "limit": limit,
                    "descending": descending,
                }
                assert await store.history("a_b", **query) == await reference.history(
                    "a_b", **query
                )
        await reference.close()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp) / "chat.db")


async def test_a_missing_row_makes_history_by_time_read_by_time_alone(tmp_path: Path) -> None:
    """A seq with no row (a database edited by hand) cannot be bisected over: history by
    time then reads the range by its send times alone, and still finds every message."""
    path = tmp_path / "chat.db"
    async with SQLiteStore(path) as store:
        for i in range(1, 9):
            fields = message(f"m{i}")
            fields["send_time"] = 10 * i
            await store.append(**fields)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM imkit_messages WHERE seq = 4")
    conn.close()
    async with SQLiteStore(path) as store:
        found = await store.history("a_b", start_time=20, end_time=70)
        assert [m.seq for m in found] == [2, 3, 5, 6, 7]


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE imkit_schema_version SET version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        await SQLiteStore(path).open()


async def test_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing-dir" / "chat.db")
    with pytest.raises(StoreError):
        await store.open()
    with pytest.raises(StoreError):
        await store.last_seq("a_b")


async def test_in_memory_database(tmp_path: Path) -> None:
    async with SQLiteStore(":memory:") as store:
        assert (await send(store, "1"))[0].seq == 1
        assert (await send(store, "2"))[0].seq == 2


async def test_event_loop_runs_while_the_worker_waits(tmp_path: Path) -> None:
    """Deterministic: appends cannot finish while another connection holds the write lock,
    yet the loop keeps ticking; a store that blocked the loop would never let the
    heartbeat below reach its count (and would time out on the lock instead)."""
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=30) as store:
        await send(store, "warm-up")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        results: list[StoredMessage] = []

        async def writer(i: int) -> None:
            message, _ = await send(store, f"m{i}", "x" * 65536)
            results.append(message)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(writer, i)
                for _ in range(2000):  # the heartbeat
                    await anyio.lowlevel.checkpoint()
                assert results == []  # all 200 are still waiting for the lock
                blocker.execute("COMMIT")
        blocker.close()
        assert sorted(m.seq for m in results) == list(range(2, 202))


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=30) as store:
        await send(store, "warm-up")
        transactions, writes = store.write_transactions, store.writes_committed
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(send, store, f"m{i}")
                await anyio.wait_all_tasks_blocked()
                blocker.execute("COMMIT")
        blocker.close()
        # The worker may have taken the first append alone before the others queued;
        # everything queued behind the lock went out in one transaction.
        assert store.writes_committed - writes == 100
        assert store.write_transactions - transactions <= 2
        stored = await store.read_after("a_b", 0, limit=1000)
        assert [m.seq for m in stored] == list(range(1, 102))


async def test_a_round_reads_its_ids_only_when_it_holds_a_resend(tmp_path: Path) -> None:
    """A round of new messages is written without first reading the messages stored
    under its ids, and with no savepoint; one that holds the resend of a message stored
    in an earlier round is rolled back and runs again in a new transaction, its appends
    still together, after that read. The resend gets the stored message (created
    false), the new ones the next seqs, without a gap."""
    results: list[tuple[str, int, bool]] = []
    expected = 0
    done = anyio.Event()

    def report(result: tuple[StoredMessage, bool] | None, error: BaseException | None) -> None:
        assert result is not None, error
        results.append((result[0].msg_id, result[0].seq, result[1]))
        if len(results) == expected:
            done.set()

    async def round_of(store: SQLiteStore, *msg_ids: str) -> list[str]:
        nonlocal expected, done
        expected, done = len(msg_ids), anyio.Event()
        statements: list[str] = []
        conn = store._conn
        assert conn is not None
        conn.set_trace_callback(statements.append)
        results.clear()
        for msg_id in msg_ids:  # queued before the round begins: one round
            store.append_nowait(**message(msg_id, msg_id), done=report)
        with anyio.fail_after(10):
            await done.wait()
        conn.set_trace_callback(None)
        return statements

    async with SQLiteStore(tmp_path / "chat.db") as store:
        new = await round_of(store, "m1", "m2")
        assert results == [("m1", 1, True), ("m2", 2, True)]
        assert not any("WITH k" in sql for sql in new)
        assert not any("ROLLBACK" in sql or "SAVEPOINT" in sql for sql in new)

        transactions = store.write_transactions
        again = await round_of(store, "m3", "m1", "m4")
        assert results == [("m3", 3, True), ("m1", 1, False), ("m4", 4, True)]
        assert again.count("ROLLBACK") == 1
        assert sum("WITH k" in sql for sql in again) == 1
        after = again[again.index("ROLLBACK") :]
        assert after.count("BEGIN IMMEDIATE") == 1 and after.count("COMMIT") == 1
        # (run again with its appends together: not a write at a time under savepoints)
        assert not any("SAVEPOINT" in sql for sql in again)
        assert store.write_transactions - transactions == 1
        # The next round of new messages reads no ids again.
        latest = await round_of(store, "m5", "m6")
        assert not any("WITH k" in sql or "ROLLBACK" in sql for sql in latest)
        stored = await store.read_after("a_b", 0, limit=10)
        assert [m.msg_id for m in stored] == ["m1", "m2", "m3", "m4", "m5", "m6"]
        assert [m.seq for m in stored] == [1, 2, 3, 4, 5, 6]


async def test_a_read_waits_for_the_write_round_in_progress(tmp_path: Path) -> None:
    """A read asked while a write round waits for its transaction runs after that round's
    COMMIT: it sees the round's writes, never the connection halfway through them (the
    loop runs the writes while the worker would otherwise be free to read)."""
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=30) as store:
        await send(store, "warm-up")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        seen: list[int] = []

        async def reader() -> None:
            seen.append(await store.last_seq("a_b"))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(send, store, f"m{i}")
                await anyio.wait_all_tasks_blocked()  # the round's BEGIN waits for the lock
                tg.start_soon(reader)
                await anyio.wait_all_tasks_blocked()
                assert seen == []
                blocker.execute("COMMIT")
        blocker.close()
        assert seen == [21]


async def test_a_failing_write_fails_alone_and_its_round_is_stored(tmp_path: Path) -> None:
    """Writes run without savepoints first; one that fails on its own (here a duplicate
    key) rolls the round back, and the round runs again with a savepoint per write: the
    failing write gets its error, the others are stored once, with gapless seqs."""
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=30) as store:
        await send(store, "warm-up")
        transactions = store.write_transactions
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        failures: list[BaseException] = []

        def duplicate(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO imkit_conversations (conversation_id, last_seq) VALUES ('a_b', 9)"
            )

        async def bad() -> None:
            try:
                await store._call(_Kind.WRITE, duplicate)
            except StoreError as exc:
                failures.append(exc)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(send, store, f"m{i}")
                tg.start_soon(bad)
                for i in range(10, 20):
                    tg.start_soon(send, store, f"m{i}")
                await anyio.wait_all_tasks_blocked()  # one round waits for the lock
                blocker.execute("COMMIT")
        blocker.close()
        assert len(failures) == 1 and not isinstance(failures[0], StoreUnavailable)
        assert isinstance(failures[0].__cause__, sqlite3.IntegrityError)
        stored = await store.read_after("a_b", 0, limit=100)
        assert [m.seq for m in stored] == list(range(1, 22))
        assert sorted(m.msg_id for m in stored[1:]) == sorted(f"m{i}" for i in range(20))
        assert store.write_transactions - transactions == 1  # the rolled-back try is not one


async def test_a_store_belongs_to_the_thread_that_opened_it(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "chat.db") as store:
        await send(store, "1")

        def elsewhere() -> None:
            async def use() -> None:
                await send(store, "2")

            anyio.run(use)

        with pytest.raises(RuntimeError, match="event loop that opened it"):
            await anyio.to_thread.run_sync(elsewhere)
        assert await store.last_seq("a_b") == 1


async def test_locked_database_raises_store_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=0.05) as store:
        await send(store, "1")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await send(store, "2")
            with pytest.raises(StoreUnavailable):
                await store.set_read("b", "a_b", 1)
            assert await store.last_seq("a_b") == 1  # WAL readers are not blocked
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        message, created = await send(store, "2")
        assert (message.seq, created) == (2, True)  # the failed attempt burnt no seq
        assert await store.set_read("b", "a_b", 2) == 2


async def test_cancelled_append_leaves_the_store_consistent(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=30) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        await send(store, "0")
        blocker.execute("BEGIN IMMEDIATE")
        with anyio.move_on_after(0.05) as scope:
            await send(store, "1")
        assert scope.cancelled_caught
        blocker.execute("COMMIT")
        blocker.close()
        # "1" may or may not have been stored (its transaction had started); either
        # way a retry dedupes and the seqs stay gapless.
        again, _ = await send(store, "1")
        after, created = await send(store, "2")
        assert created and after.seq == again.seq + 1
        stored = await store.read_after("a_b", 0, limit=10)
        assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
        assert [m.msg_id for m in stored] == ["0", "1", "2"]


async def test_a_wait_cancelled_while_its_round_commits_leaves_the_others_answered(
    tmp_path: Path,
) -> None:
    # The round's writes have run and its COMMIT is queued behind a job that holds the
    # worker; one writer gives up then. Waking the round must skip it and still answer
    # the other writer (under asyncio each wait is a bare future, cancelled with it).
    release = threading.Event()
    async with SQLiteStore(tmp_path / "chat.db") as store:
        held = anyio.Event()

        def hold_worker(conn: sqlite3.Connection) -> None:  # on the loop, in the round
            assert store._queue is not None
            store._queue.put(_Job(_Kind.READ, lambda _conn: release.wait(10)))
            held.set()

        scopes: list[anyio.CancelScope] = []
        answered: list[StoredMessage] = []

        async def doomed() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await send(store, "x")

        async def kept() -> None:
            answered.append((await send(store, "y"))[0])

        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(doomed)  # one round (asyncio: in this order)
                    tg.start_soon(kept)
                    tg.start_soon(store._call, _Kind.WRITE, hold_worker)
                    await held.wait()
                    assert store._round is _Round.COMMIT
                    scopes[0].cancel()
                    await anyio.wait_all_tasks_blocked()  # the doomed writer is gone
                    release.set()
        finally:
            release.set()
        assert [m.msg_id for m in answered] == ["y"]
        stored = await store.read_after("a_b", 0, limit=10)
        assert sorted(m.msg_id for m in stored) == ["x", "y"]  # trio starts tasks in any order


async def test_close_finishes_queued_work(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    await store.open()
    results: list[StoredMessage] = []

    async def writer(i: int) -> None:
        results.append((await send(store, f"m{i}"))[0])

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(writer, i)
        await anyio.wait_all_tasks_blocked()
        await store.close()
    assert len(results) == 50
    with pytest.raises(StoreError):
        await send(store, "late")


_WRITER = r"""
import os, sys, anyio
from imkit.chat.sqlite import SQLiteStore, _Kind

path, first, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]

async def main():
    async with SQLiteStore(path, busy_timeout=30) as store:
        print("ready", flush=True)
        while not os.path.exists(go):
            await anyio.sleep(0.002)

        async def one(i):
            await store.append(conversation_id="a_b", sender_id="a", recv_id="b",
                               msg_id=f"m{i}", chat_type=2, m_type=0, content=str(i),
                               send_time=i)

        for start in range(first, first + 300, 30):
            async with anyio.create_task_group() as tg:
                for i in range(start, start + 30):
                    tg.start_soon(one, i)

anyio.run(main)
"""


async def test_two_processes_share_one_file(tmp_path: Path) -> None:
    path, go = tmp_path / "chat.db", tmp_path / "go"
    # Process A sends m0..m299, B sends m100..m399: 200 ids overlap (resends across
    # processes), 400 distinct messages in all.
    async with (
        await anyio.open_process(
            [sys.executable, "-c", _WRITER, str(path), "0", str(go)], env=python_env()
        ) as proc_a,
        await anyio.open_process(
            [sys.executable, "-c", _WRITER, str(path), "100", str(go)], env=python_env()
        ) as proc_b,
    ):
        try:
            with anyio.fail_after(30):
                for proc in (proc_a, proc_b):
                    assert proc.stdout is not None and proc.stderr is not None
                    lines = BufferedByteReceiveStream(proc.stdout)
                    try:
                        ready = await lines.receive_until(b"\n", 100)
                    except anyio.IncompleteRead:  # it died: say why
                        errors = b""
                        with anyio.move_on_after(5):
                            try:
                                while True:
                                    errors += await proc.stderr.receive()
                            except anyio.EndOfStream:
                                pass
                        pytest.fail(f"a writer died: {errors[-2000:]!r}")
                    assert ready == b"ready"
                go.touch()
                for proc in (proc_a, proc_b):
                    assert await proc.wait() == 0
        finally:
            for proc in (proc_a, proc_b):
                if proc.returncode is None:
                    proc.kill()
    async with SQLiteStore(path) as store:
        stored = await store.read_after("a_b", 0, limit=1000)
    assert [m.seq for m in stored] == list(range(1, 401))
    assert sorted(int(m.msg_id[1:]) for m in stored) == list(range(400))


_KILLED = r"""
import sys, anyio
from imkit.chat.sqlite import SQLiteStore, _Kind

async def main():
    async with SQLiteStore(sys.argv[1], synchronous=sys.argv[2]) as store:
        for i in range(100000):
            message, _ = await store.append(
                conversation_id="a_b", sender_id="a", recv_id="b", msg_id=f"m{i}",
                chat_type=2, m_type=0, content=f"payload {i}", send_time=i)
            print(message.msg_id, message.seq, flush=True)

anyio.run(main)
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_acknowledged_appends_survive_kill_9(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "chat.db"
    acked: list[tuple[str, int]] = []
    async with await anyio.open_process(
        [sys.executable, "-c", _KILLED, str(path), synchronous], env=python_env()
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = BufferedByteReceiveStream(proc.stdout)
            with anyio.fail_after(30):
                while len(acked) < 200:
                    msg_id, seq = (await lines.receive_until(b"\n", 100)).split()
                    acked.append((msg_id.decode(), int(seq)))
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
        finally:
            if proc.returncode is None:
                proc.kill()
    async with SQLiteStore(path) as store:
        stored = await store.read_after("a_b", 0, limit=100000)
    assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
    by_id = {m.msg_id: m.seq for m in stored}
    for msg_id, seq in acked:
        assert by_id[msg_id] == seq


async def test_opening_waits_for_another_process_lock_then_says_unavailable(
    tmp_path: Path,
) -> None:
    """Another process holds the file's write lock while a server starts: opening waits
    (up to ``busy_timeout``) and succeeds once the lock is gone; a lock held for longer
    than that makes ``open`` fail with ``StoreUnavailable``, not hang."""
    path = tmp_path / "chat.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable):
            with anyio.fail_after(10):
                await SQLiteStore(path, busy_timeout=0.2).open()

        async def release_soon() -> None:
            await anyio.sleep(0.3)
            other.execute("COMMIT")

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            with anyio.fail_after(10):
                async with SQLiteStore(path, busy_timeout=5) as store:
                    message, created = await store.append(
                        conversation_id="a_b",
                        sender_id="a",
                        recv_id="b",
                        msg_id="m1",
                        chat_type=2,
                        m_type=0,
                        content="after the lock",
                        send_time=1,
                    )
        assert created and message.seq == 1
    finally:
        other.close()


_USERS = ("a", "b", "c")
_Append = tuple[int, int, int]  # (sender, recipient, msg id): indexes into small pools


@settings(max_examples=40)
@given(
    before=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 4)), max_size=6),
    batch=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 4)), min_size=2, max_size=40
    ),
)
def test_one_rounds_appends_run_together_as_if_one_at_a_time(
    before: list[_Append], batch: list[_Append]
) -> None:
    """The appends one round holds run as one batch of statements (``_append_all``); each
    gets what appending it alone, in turn, would give: new seqs without gaps per
    conversation, a message stored before (or earlier in the same round) returned with
    ``created`` false, both users made members. The in-memory store is the reference."""
    import tempfile

    from imkit.chat import sqlite as sqlite_module
    from imkit.chat.ids import private_conversation_id
    from imkit.chat.memory import MemoryStore

    def fields(i: int, item: _Append) -> dict[str, object]:
        sender, recv = _USERS[item[0]], _USERS[item[1]]
        return {
            "conversation_id": private_conversation_id(sender, recv),
            "sender_id": sender,
            "recv_id": recv,
            "msg_id": f"m{item[2]}",
            "chat_type": 2,
            "m_type": 0,
            "content": f"text {i}",
            "send_time": 1000 + i,
        }

    def outcome(result: tuple[StoredMessage, bool]) -> tuple[object, ...]:
        message, created = result
        return (
            message.conversation_id,
            message.seq,
            message.sender_id,
            message.msg_id,
            message.content,
            message.send_time,
            created,
        )

    batches: list[tuple[int, bool, bool]] = []  # (appends, probe, ran to the end)
    real = sqlite_module._append_all

    def counted(conn: sqlite3.Connection, appends: list[object], *, probe: bool) -> object:
        results = real(conn, appends, probe=probe)  # type: ignore[arg-type]
        batches.append((len(appends), probe, results is not None))
        return results

    async def main(path: Path) -> None:
        reference = MemoryStore()
        await reference.open()
        async with SQLiteStore(path) as store:
            for i, item in enumerate(before):  # each in a round of its own
                assert outcome(await store.append(**fields(i, item))) == outcome(
                    await reference.append(**fields(i, item))
                )
            expected = [
                outcome(await reference.append(**fields(100 + i, item)))
                for i, item in enumerate(batch)
            ]
            got: list[tuple[object, ...]] = []
            transactions = store.write_transactions
            done = anyio.Event()

            def report(
                result: tuple[StoredMessage, bool] | None, error: BaseException | None
            ) -> None:
                assert result is not None, error
                got.append(outcome(result))
                if len(got) == len(batch):
                    done.set()

            for i, item in enumerate(batch):  # queued before the round begins: one round
                store.append_nowait(**fields(100 + i, item), done=report)
            with anyio.fail_after(10):
                await done.wait()
            assert got == expected
            assert store.write_transactions - transactions == 1
            for user in _USERS:
                mine = [
                    (s.conversation_id, s.peer_id, s.last_seq)
                    for s in await store.conversations(user)
                ]
                theirs = [
                    (s.conversation_id, s.peer_id, s.last_seq)
                    for s in await reference.conversations(user)
                ]
                assert sorted(mine) == sorted(theirs)
        await reference.close()

    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(sqlite_module, "_append_all", counted)
        anyio.run(main, Path(tmp) / "chat.db")

    # Never re-run one at a time; written again after reading the stored ids exactly when
    # the round resends a message stored in an earlier round, or holds one id twice.
    def key(item: _Append) -> tuple[str, str, int]:
        sender, recv = _USERS[item[0]], _USERS[item[1]]
        return (private_conversation_id(sender, recv), sender, item[2])

    keys = [key(item) for item in batch]
    resends = len(set(keys)) < len(keys) or not set(keys).isdisjoint(map(key, before))
    n = len(batch)
    assert batches == ([(n, False, False), (n, True, True)] if resends else [(n, False, True)])


async def test_a_round_larger_than_one_statement_s_parameters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A round of 1,000 appends over 960 conversations (``max_batch=2000``): the batch's
    reads are split under SQLite's oldest parameter limit (999), and every append gets
    what it would alone, in the one batched try (no write failed and re-ran the round):
    960 first messages, then 40 resends of stored ones (created false, the first seq)."""
    caplog.set_level("DEBUG", logger="imkit.chat.sqlite")
    from imkit.chat.memory import MemoryStore

    def fields(i: int) -> dict[str, object]:
        n = i % 960
        return {
            "conversation_id": f"c{n:04d}",
            "sender_id": "a",
            "recv_id": f"u{n}",
            "msg_id": f"m{n}",
            "chat_type": 2,
            "m_type": 0,
            "content": f"text {i}",
            "send_time": i,
        }

    reference = MemoryStore()
    await reference.open()
    expected = [await reference.append(**fields(i)) for i in range(1000)]
    got: list[tuple[StoredMessage, bool]] = []
    done = anyio.Event()

    def report(result: tuple[StoredMessage, bool] | None, error: BaseException | None) -> None:
        assert result is not None, error
        got.append(result)
        if len(got) == 1000:
            done.set()

    async with SQLiteStore(tmp_path / "chat.db", max_batch=2000) as store:
        transactions = store.write_transactions
        for i in range(1000):
            store.append_nowait(**fields(i), done=report)  # type: ignore[arg-type]
        with anyio.fail_after(20):
            await done.wait()
        assert store.write_transactions - transactions == 1
    assert got == expected
    assert [created for _, created in got] == [True] * 960 + [False] * 40
    assert "running its round again" not in caplog.text
