"""imkit._sqlite_wal: the VFS that writes a write-ahead-log commit in one system call.

The SQLite store uses it with ``synchronous="FULL"``; the shared contract and
tests/chat/test_sqlite_store.py run the store on it. Here: that it is used (and only
then), that what it writes is an ordinary SQLite file that the default VFS reads while
it is being written, that a write it cannot make fails the commit and loses nothing
acknowledged, and that a round's savepoint writes no temporary file.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from tests.core.helpers import built_extension

from imkit.chat import sqlite as sqlite_module
from imkit.chat.sqlite import SQLiteStore

from .test_sqlite_store import message, python_env

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def wal_module() -> Any:
    """``imkit._sqlite_wal`` registered with sqlite3's SQLite, or skip the test when it
    was not built (fail instead under ``IMKIT_REQUIRE_SPEEDUPS=1``, as CI sets)."""
    module = built_extension("_sqlite_wal", "a C compiler and SQLite's header")
    if sqlite_module.wal_vfs(os.environ) is None:
        pytest.skip("IMKIT_NO_SPEEDUPS is set: the store writes through the default VFS")
    return module


def test_register_finds_the_sqlite_that_sqlite3_uses() -> None:
    wal = wal_module()
    import _sqlite3

    assert wal.register(_sqlite3.__file__) is True  # registered already: still True
    assert wal.register(str(Path(__file__))) is False  # not a loaded library
    with pytest.raises(TypeError):
        wal.register(b"/not/a/str")
    # sqlite3 opens files through it by name, and only a registered name works.
    conn = sqlite3.connect(f"file:{wal.VFS_NAME}-probe?mode=memory&vfs={wal.VFS_NAME}", uri=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()
    with pytest.raises(sqlite3.OperationalError, match="no such vfs"):
        sqlite3.connect("file:x?mode=memory&vfs=imkit-no-such-vfs", uri=True)


async def test_a_round_writes_its_log_in_a_few_calls_and_no_temporary_file(
    tmp_path: Path,
) -> None:
    """300 appends at once, some of them resends (their round is rolled back and runs
    again): SQLite asks for two log writes per page, the VFS makes a few per commit; no
    statement or savepoint journal file is opened (temp_store = MEMORY)."""
    wal = wal_module()
    async with SQLiteStore(tmp_path / "chat.db") as store:
        await store.append(**message("m0"))
        seen, issued, journals = wal.counts()
        async with anyio.create_task_group() as tg:
            for i in range(300):  # m0..m9 again: resends
                text = f"text {i} " + "x" * 1000  # (a page for every 3 or 4)
                tg.start_soon(lambda i=i, text=text: store.append(**message(f"m{i % 290}", text)))
        rounds = store.write_transactions - 1
        stored = await store.read_after("a_b", 0, limit=1000)
    assert sorted(m.msg_id for m in stored) == sorted(f"m{i}" for i in range(290))
    assert [m.seq for m in stored] == list(range(1, 291))
    seen2, issued2, journals2 = wal.counts()
    # (2 writes per page, the 290 rows fill 70 pages or more: 140 writes; a commit's
    # log goes out in one write per 124 KiB)
    assert seen2 - seen >= 140
    assert issued2 - issued <= 2 * rounds + 2 < (seen2 - seen) / 10
    assert journals2 == journals

    # The counter of journal files is live: a savepoint of more than 64 KiB on a
    # connection with SQLite's default temp_store spills to one.
    conn = sqlite3.connect(
        f"file:{tmp_path / 'spill.db'}?vfs={wal.VFS_NAME}", uri=True, isolation_level=None
    )
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 300)
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT s")
    conn.execute("UPDATE t SET x = 'y'")
    conn.execute("ROLLBACK TO s")
    conn.execute("COMMIT")
    conn.close()
    assert wal.counts()[2] > journals2


async def test_normal_synchronous_writes_through_the_default_vfs(tmp_path: Path) -> None:
    """Without a sync at each commit, gathered frames could be visible to other
    connections before they are in the file: a NORMAL store never uses the VFS."""
    wal = wal_module()
    before = wal.counts()[:2]
    async with SQLiteStore(tmp_path / "chat.db", synchronous="NORMAL") as store:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(lambda i=i: store.append(**message(f"m{i}")))
    assert wal.counts()[:2] == before


async def test_imkit_no_speedups_writes_through_the_default_vfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal = wal_module()
    monkeypatch.setenv("IMKIT_NO_SPEEDUPS", "1")
    before = wal.counts()
    async with SQLiteStore(tmp_path / "chat.db") as store:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(lambda i=i: store.append(**message(f"m{i}")))
        assert len(await store.read_after("a_b", 0, limit=100)) == 50
    assert wal.counts() == before


async def test_the_default_vfs_reads_the_file_while_it_is_written(tmp_path: Path) -> None:
    """Another connection on SQLite's default VFS (its own file descriptors: it reads
    what is in the files, not what the VFS holds) polls while the store commits rounds:
    every read sees a gapless prefix of the conversation, with the right contents."""
    wal_module()
    path = tmp_path / "chat.db"
    async with SQLiteStore(path) as store:
        await store.append(**message("m0", "text 0"))
        reader = sqlite3.connect(path, isolation_level=None)
        seen: list[int] = []
        done = False

        async def poll() -> None:
            while not done:
                rows = reader.execute(
                    "SELECT seq, msg_id, content FROM imkit_messages"
                    " WHERE conversation_id = 'a_b' ORDER BY seq"
                ).fetchall()
                assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
                for _seq, msg_id, content in rows:
                    assert content == f"text {msg_id[1:]}"
                assert len({r[1] for r in rows}) == len(rows)
                seen.append(len(rows))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            for start in range(1, 601, 100):  # six bursts: a few rounds each
                async with anyio.create_task_group() as burst:
                    for i in range(start, start + 100):
                        burst.start_soon(partial(store.append, **message(f"m{i}", f"text {i}")))
            done = True
        assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        reader.close()
    assert seen[-1] == 601 and len(set(seen)) > 3  # (it saw the rounds land)


_FILLED = r"""
import resource, signal, sys, anyio
from imkit.chat.sqlite import SQLiteStore
from imkit.exceptions import StoreError

async def main():
    async with SQLiteStore(sys.argv[1]) as store:
        await store.append(conversation_id="a_b", sender_id="a", recv_id="b", msg_id="m0",
                           chat_type=2, m_type=0, content="first", send_time=0)
        # From here on no file of this process may grow past the limit: the log's
        # writes fail (EFBIG), as on a full disk.
        limit = int(sys.argv[2])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        failed = 0

        async def one(i):
            nonlocal failed
            try:
                stored, _ = await store.append(
                    conversation_id="a_b", sender_id="a", recv_id="b", msg_id=f"m{i}",
                    chat_type=2, m_type=0, content="x" * 500, send_time=i)
            except StoreError as exc:
                failed += 1
                print("failed", type(exc).__name__, flush=True)
            else:
                print("stored", stored.msg_id, stored.seq, flush=True)

        for start in range(1, 4001, 200):
            async with anyio.create_task_group() as tg:
                for i in range(start, start + 200):
                    tg.start_soon(one, i)
            if failed:
                break
    print("end", flush=True)

anyio.run(main)
"""


async def test_a_log_write_that_fails_fails_its_commit_and_loses_nothing(tmp_path: Path) -> None:
    """The process may not grow its files past a limit (RLIMIT_FSIZE): the VFS's gathered
    write fails at the commit's sync. The appends of that round fail with a StoreError;
    every append answered as stored is in the file, which the default VFS finds intact."""
    wal_module()
    path = tmp_path / "chat.db"
    out = b""
    async with await anyio.open_process(
        [sys.executable, "-c", _FILLED, str(path), str(600 * 1024)], env=python_env()
    ) as proc:
        assert proc.stdout is not None
        lines = BufferedByteReceiveStream(proc.stdout)
        with anyio.fail_after(60):
            while not out.endswith(b"end\n"):
                try:
                    out += await lines.receive_until(b"\n", 200) + b"\n"
                except anyio.EndOfStream:
                    break
            assert await proc.wait() == 0, out[-2000:]
    lines_out = out.decode().splitlines()
    stored = {line.split()[1]: int(line.split()[2]) for line in lines_out if line[:6] == "stored"}
    failures = [line for line in lines_out if line.startswith("failed")]
    assert failures and len(stored) >= 200, lines_out[-5:]
    assert {line.split()[1] for line in failures} <= {"StoreError", "StoreUnavailable"}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = dict(conn.execute("SELECT msg_id, seq FROM imkit_messages"))
    conn.close()
    assert sorted(rows.values()) == list(range(1, len(rows) + 1))  # gapless
    for msg_id, seq in stored.items():
        assert rows[msg_id] == seq
    assert len(rows) == len(stored) + 1  # (m0) nothing that failed was kept


@pytest.mark.parametrize("page_size", [4096, 65536])
async def test_a_round_larger_than_the_buffer_and_large_pages(
    tmp_path: Path, page_size: int
) -> None:
    """One round of 160 appends of 60 KB (9.6 MB of log: more than the VFS gathers
    before it writes, 8 MiB), in a file of 4 KiB pages and in one of 64 KiB pages (a
    frame of 64 KiB + 24 bytes): every message comes back whole, the file is intact for
    the default VFS, and the log went out in far fewer writes than SQLite asked for."""
    wal = wal_module()
    path = tmp_path / "chat.db"
    made = sqlite3.connect(path)
    made.execute(f"PRAGMA page_size = {page_size}")
    made.execute("CREATE TABLE application_table (x)")  # (the page size is now set)
    made.close()
    asked, written, _ = wal.counts()
    async with SQLiteStore(path, max_batch=512) as store:
        async with anyio.create_task_group() as tg:
            for i in range(160):
                fields = message(f"m{i}", f"{i:05d}" * 12_000, conversation=f"a_b{i % 3}")
                tg.start_soon(partial(store.append, **fields))
        assert store.write_transactions == 1  # (one round: its log passes 8 MiB)
        stored = [m for c in range(3) for m in await store.read_after(f"a_b{c}", 0, limit=200)]
    assert sorted(m.content for m in stored) == sorted(f"{i:05d}" * 12_000 for i in range(160))
    asked2, written2, _ = wal.counts()
    assert written2 - written < (asked2 - asked) / 3
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("PRAGMA page_size").fetchone() == (page_size,)
    assert conn.execute("SELECT count(*) FROM imkit_messages").fetchone() == (160,)
    conn.close()
