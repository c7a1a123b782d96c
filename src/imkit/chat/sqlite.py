"""The embedded default :class:`~imkit.chat.store.MessageStore`: one SQLite file.

Threading
    Each open store owns one worker thread and one connection, and belongs to the event
    loop that opened it. Whatever may block runs on the worker: queries (a catch-up page
    may be large), ``BEGIN IMMEDIATE`` (it may wait for another process's lock) and
    ``COMMIT`` (the fsync). The writes themselves (a few indexed statements each) run on
    the event loop, inside the transaction the worker opened: Python code on the worker
    would fight the loop for the GIL on every statement, which cost the loop far more
    than the statements do. The loop touches the connection only between the worker's
    ``BEGIN`` and the ``COMMIT`` it hands back, and hands the worker nothing in between,
    so the connection is never used by two threads at once. Coroutines sleep on a future
    of the loop (under asyncio) or an :class:`anyio.Event` (under trio) that the
    worker's answer sets through the loop's thread-safe entry point
    (``call_soon_threadsafe`` under asyncio, the trio token under trio).

Group commit
    One write round at a time: the worker opens a transaction, the loop runs every write
    waiting at that moment (up to ``max_batch``; the appends among them together, in a
    fixed number of statements: reads of the conversations' last seqs and send times
    and their members, then one ``executemany`` of the rows; the ids already stored are
    read only when a row was skipped as one of them: then the round is rolled back and
    runs again, reading them first), and the worker commits once. A
    write that fails on its own (a constraint) rolls the round back and the round runs
    again with a savepoint around each write, so that it fails alone. Writes that
    arrive while a round is in progress wait for it and then share the next one, so a
    burst of N concurrent appends costs a handful of commits, not N. Nobody hears
    "stored" before the commit that stored it succeeded; if the commit fails every write
    in the round fails.

Durability
    The database runs in WAL mode. With ``synchronous="FULL"`` (the default) every commit
    is on disk when ``append`` returns: it survives a process kill (``kill -9``) and an
    operating-system crash or power cut. ``synchronous="NORMAL"`` skips the fsync per
    commit: committed data still survives a process crash or kill, but an OS crash or
    power cut may lose the last transactions (the database stays consistent). Losing
    them would mean reusing seqs clients have already seen, hence FULL by default; group
    commit keeps its cost to one fsync per batch. With FULL the store opens the file
    through ``imkit._sqlite_wal`` when that C extension is built: a VFS that gathers a
    commit's log writes (SQLite makes two per page) into one system call before the
    sync. It is safe only because every commit syncs the log before SQLite makes it
    visible, so NORMAL writes through SQLite's default VFS. Either way the files are
    ordinary SQLite files. Savepoint and statement journals are kept in memory
    (``temp_store = MEMORY``), not in temporary files. The log is checkpointed every
    10,000 pages (``wal_autocheckpoint``; SQLite's default is 1,000): a page that
    nearly every round writes is copied into the database once per checkpoint.

History by time
    A message's send time is never below the one before it in its conversation
    (:mod:`imkit.chat.store`), so the seqs of a time range are found by bisection over
    the conversation's seqs (a few primary-key reads) and no index of messages by time
    is kept: one B-tree less to write per message, a quarter of the pages a round
    writes. A file made at schema version 1 may hold send times that go down; it keeps
    its index, which history by time then reads.

Several processes
    Seqs are assigned inside the ``BEGIN IMMEDIATE`` transaction from the committed
    counter, so several processes may share one file: SQLite serialises their writers
    and waits up to ``busy_timeout`` seconds for the lock. A lock held longer raises
    :class:`~imkit.exceptions.StoreUnavailable`.

Schema
    Tables are prefixed ``imkit_`` (the file may be shared with an application) and
    created on first use; ``imkit_schema_version`` records the version. A file written by
    a newer imkit is refused with :class:`~imkit.exceptions.StoreError`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from imkit.chat.store import (
    SQLITE_SCHEMA_VERSION,
    AppendDone,
    ConversationSummary,
    StoredMessage,
    StoreLifecycle,
    check_append_args,
    check_cursor,
    check_history,
    check_int,
    check_limit,
    check_text,
    report_append,
)
from imkit.exceptions import ImkitError, StoreError, StoreUnavailable
from imkit.transport._sync import EventFactory, Flag

__all__ = ("SQLiteStore",)

logger = logging.getLogger("imkit.chat.sqlite")

_T = TypeVar("_T")
_Waker = Callable[[Callable[[], None]], object]

_COLUMNS = "conversation_id, seq, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time"
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))

# The send time of a conversation's last message (``c`` its imkit_conversations row): a new
# message's is never below it.
_LAST_TIME = (
    "(SELECT send_time FROM imkit_messages WHERE conversation_id = c.conversation_id"
    " AND seq = c.last_seq)"
)
_APPEND_LOOKUP = (
    "SELECT c.last_seq, (SELECT count(*) FROM imkit_members WHERE"
    "  conversation_id = c.conversation_id AND user_id IN (?, ?)),"
    f" {_LAST_TIME}, {_M_COLUMNS} FROM imkit_conversations c"
    " LEFT JOIN imkit_messages m ON m.conversation_id = c.conversation_id"
    "  AND m.sender_id = ? AND m.msg_id = ?"
    " WHERE c.conversation_id = ?"
)
_NEW_CONVERSATION = "INSERT INTO imkit_conversations (conversation_id, last_seq) VALUES (?, 1)"
_NEXT_SEQ = "UPDATE imkit_conversations SET last_seq = ? WHERE conversation_id = ?"
_INSERT_MESSAGE = f"INSERT INTO imkit_messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
# The same, skipping a message already stored under its id (the unique index): how many
# rows it inserted tells whether the batch held one (_append_all).
_INSERT_NEW_MESSAGE = (
    _INSERT_MESSAGE + " ON CONFLICT (conversation_id, sender_id, msg_id) DO NOTHING"
)
_ADD_MEMBERS = (
    "INSERT OR IGNORE INTO imkit_members (user_id, conversation_id) VALUES (?, ?), (?, ?)"
)
# A round's appends together (_append_all); {} is a list of "?" marks.
_LAST_SEQS = (
    f"SELECT c.conversation_id, c.last_seq, {_LAST_TIME} FROM imkit_conversations c"
    " WHERE c.conversation_id IN ({})"
)
_MEMBERS_OF = "SELECT conversation_id, user_id FROM imkit_members WHERE conversation_id IN ({})"
_STORED_UNDER = (
    "WITH k (c, s, m) AS (VALUES {}) SELECT "
    + _M_COLUMNS
    + " FROM k JOIN imkit_messages m ON m.conversation_id = k.c AND m.sender_id = k.s"
    " AND m.msg_id = k.m"
)
_SET_LAST_SEQ = (
    "INSERT INTO imkit_conversations (conversation_id, last_seq) VALUES (?, ?)"
    " ON CONFLICT (conversation_id) DO UPDATE SET last_seq = excluded.last_seq"
)
_ADD_MEMBER = "INSERT OR IGNORE INTO imkit_members (user_id, conversation_id) VALUES (?, ?)"
# Log pages between automatic checkpoints (about 40 MiB of log with 4 KiB pages).
_WAL_AUTOCHECKPOINT = 10_000
# Bound parameters per statement: under SQLite's oldest default limit (999).
_MAX_PARAMS = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS imkit_conversations (
    conversation_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS imkit_messages (
    conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, sender_id TEXT NOT NULL,
    recv_id TEXT NOT NULL, msg_id TEXT NOT NULL, chat_type INTEGER NOT NULL,
    m_type INTEGER NOT NULL, content TEXT NOT NULL, send_time INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq));
CREATE UNIQUE INDEX IF NOT EXISTS imkit_messages_by_msg_id
    ON imkit_messages (conversation_id, sender_id, msg_id);
CREATE TABLE IF NOT EXISTS imkit_members (
    user_id TEXT NOT NULL, conversation_id TEXT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS imkit_members_by_conversation
    ON imkit_members (conversation_id, user_id);
CREATE TABLE IF NOT EXISTS imkit_delivered (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL, PRIMARY KEY (user_id, device_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS imkit_read (
    user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID;
"""

# Primary result codes worth a retry: BUSY, LOCKED, NOMEM, IOERR, FULL, PROTOCOL.
_RETRYABLE_CODES = frozenset({5, 6, 7, 10, 13, 15})
_RETRYABLE_WORDS = ("locked", "busy", "disk i/o", "disk is full", "out of memory")


def _translate(exc: BaseException) -> ImkitError:
    """An imkit exception for ``exc``, raised by sqlite3 (or by a bug) in the worker."""
    if isinstance(exc, ImkitError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            retry = (code & 0xFF) in _RETRYABLE_CODES
        else:  # Python < 3.11
            retry = any(word in str(exc).lower() for word in _RETRYABLE_WORDS)
        error: ImkitError = (StoreUnavailable if retry else StoreError)(f"sqlite: {exc}")
    else:
        error = StoreError(f"unexpected error in the SQLite worker: {exc!r}")
    error.__cause__ = exc
    return error


def _current_waker() -> tuple[object, _Waker]:
    """A thread-safe "run this on the current event loop" callable, and a key for it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop, loop.call_soon_threadsafe
    try:
        import trio.lowlevel

        token = trio.lowlevel.current_trio_token()
    except (ImportError, RuntimeError):
        raise RuntimeError("SQLiteStore must be used from an asyncio or trio event loop") from None
    return token, token.run_sync_soon


class _Kind(enum.Enum):
    READ = "read"  # a query: the worker thread runs it
    WRITE = "write"  # a change: the event loop runs it inside a write round
    BEGIN = "begin"  # the worker opens a round's transaction (it may wait for a lock)
    COMMIT = "commit"  # the worker commits a round (the fsync)
    STOP = "stop"


class _Round(enum.Enum):
    BEGIN = "begin"  # BEGIN handed to the worker: reads wait on the loop side
    COMMIT = "commit"  # COMMIT handed to the worker: reads queue behind it


class _Job:
    """One request, and the slot its answer comes back in.

    Its ``event`` is what the caller waits on: under asyncio a bare future of the store's
    loop (an :class:`anyio.Event` there wraps an :class:`asyncio.Event`, which finds the
    loop and keeps a list of waiters, for each wait), else an :class:`anyio.Event`.
    """

    __slots__ = ("batch", "cancelled", "error", "event", "fn", "kind", "result", "then")

    def __init__(
        self,
        kind: _Kind,
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        event: anyio.Event | asyncio.Future[None] | None = None,
        then: AppendDone | None = None,
    ) -> None:
        self.kind = kind
        self.fn = fn
        self.event = event
        self.then = then  # called with the outcome instead of waking a waiter
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.batch: Sequence[_Job] = ()  # a COMMIT's writes

    def wake(self) -> None:
        """Wake the caller waiting for this job (if it still waits), or call it back."""
        event = self.event
        if event is None:
            if self.then is not None:
                error = self.error
                report_append(self.then, None if error is not None else self.result, error)
            return
        if isinstance(event, asyncio.Future):
            if not event.done():  # done: the wait was cancelled
                event.set_result(None)
        else:
            event.set()


# The columns are in the order of StoredMessage's fields: a row is made into one by
# tuple.__new__ itself, as StoredMessage._make does (without _make's Python frame and its
# length check: every query here selects the nine columns).
_row_to_message: Callable[[Iterable[Any]], StoredMessage] = functools.partial(
    tuple.__new__, StoredMessage
)


@functools.cache
def _watermark_sql(table: str, key_columns: tuple[str, ...]) -> tuple[str, str]:
    """For a watermark table: the read of (conversation's last seq, watermark), by
    ``(conversation_id, *key)``, and the upsert of the watermark, by ``(*key, seq)``."""
    where = " AND ".join(f"{column} = ?" for column in key_columns)
    lookup = (
        "SELECT (SELECT last_seq FROM imkit_conversations WHERE conversation_id = ?),"
        f" (SELECT seq FROM {table} WHERE {where})"
    )
    columns = ", ".join(key_columns)
    upsert = (
        f"INSERT INTO {table} ({columns}, seq) VALUES ({', '.join('?' * (len(key_columns) + 1))})"
        f" ON CONFLICT ({columns}) DO UPDATE SET seq = excluded.seq"
    )
    return lookup, upsert


class _Append:
    """One append's write, its arguments checked when it is made (``TypeError`` /
    ``ValueError``). Called alone (:meth:`__call__`), or run with the appends queued
    beside it in one round by :func:`_append_all`, which gives the same results."""

    __slots__ = (
        "chat_type",
        "content",
        "conversation_id",
        "m_type",
        "msg_id",
        "recv_id",
        "send_time",
        "sender_id",
    )

    def __init__(
        self,
        conversation_id: str,
        sender_id: str,
        recv_id: str,
        msg_id: str,
        chat_type: int,
        m_type: int,
        content: str,
        send_time: int,
        /,
    ) -> None:
        check_append_args(
            conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
        )
        self.conversation_id = conversation_id
        self.sender_id = sender_id
        self.recv_id = recv_id
        self.msg_id = msg_id
        self.chat_type = chat_type
        self.m_type = m_type
        self.content = content
        self.send_time = send_time

    def stored(self, seq: int, before: int | None) -> StoredMessage:
        """The message as stored under ``seq``, its send time never below ``before`` (the
        send time of the conversation's message before, ``None`` for its first: see
        store.py); a StoredMessage is also its row (its fields are in ``_COLUMNS`` order)."""
        send_time = self.send_time
        if before is not None and send_time < before:
            send_time = before
        return _row_to_message(
            (
                self.conversation_id,
                seq,
                self.sender_id,
                self.recv_id,
                self.msg_id,
                self.chat_type,
                self.m_type,
                self.content,
                send_time,
            )
        )

    def __call__(self, conn: sqlite3.Connection) -> tuple[StoredMessage, bool]:
        conversation_id, sender_id, recv_id = self.conversation_id, self.sender_id, self.recv_id
        # One read for three questions: the conversation's last seq, whether both
        # users are members already, and whether this sender's msg_id is stored
        # (no conversation row: none of them).
        row = conn.execute(
            _APPEND_LOOKUP, (sender_id, recv_id, sender_id, self.msg_id, conversation_id)
        ).fetchone()
        if row is None:
            seq, members, before = 1, 0, None
            conn.execute(_NEW_CONVERSATION, (conversation_id,))
        elif row[3] is not None:
            return _row_to_message(row[3:]), False
        else:
            seq, members, before = row[0] + 1, row[1], row[2]
            conn.execute(_NEXT_SEQ, (seq, conversation_id))
        stored = self.stored(seq, before)
        conn.execute(_INSERT_MESSAGE, stored)
        if members < (1 if sender_id == recv_id else 2):
            conn.execute(_ADD_MEMBERS, (sender_id, conversation_id, recv_id, conversation_id))
        return stored, True


def _messages(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[StoredMessage]:
    """The messages ``sql`` selects (``_COLUMNS``, in order) with ``params``."""
    return list(map(_row_to_message, conn.execute(sql, params)))


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _append_all(
    conn: sqlite3.Connection, appends: Sequence[_Append], *, probe: bool
) -> list[tuple[StoredMessage, bool]] | None:
    """Run ``appends`` in order, with the results of calling each in turn, in a fixed
    number of statements: one read of the conversations' last seqs, one of their members,
    then the inserts and the new last seqs each as one ``executemany`` (a statement per
    message costs the loop more than the writing does).

    Nearly every batch holds only new messages: without ``probe`` it is written without
    looking up its ids, and the unique index on ``(conversation_id, sender_id, msg_id)``
    says whether one was stored before, or is twice in the batch (an insert it skipped):
    then this returns ``None``, and what it wrote must be rolled back (the caller rolls
    back the round's transaction and runs the round again). With ``probe`` it first
    reads the messages already stored under the batch's ids, which are answered as they
    are."""
    conversations = list(dict.fromkeys([append.conversation_id for append in appends]))
    last: dict[str, int] = {}
    times: dict[str, int] = {}  # the send time of each conversation's last message
    members: dict[str, set[str]] = {}
    for chunk in _chunks(conversations, _MAX_PARAMS):
        marks = ", ".join("?" * len(chunk))
        for conversation_id, last_seq, last_time in conn.execute(_LAST_SEQS.format(marks), chunk):
            last[conversation_id] = last_seq
            if last_time is not None:
                times[conversation_id] = last_time
        for conversation_id, user_id in conn.execute(_MEMBERS_OF.format(marks), chunk):
            members.setdefault(conversation_id, set()).add(user_id)
    known: dict[tuple[str, str, str], StoredMessage] = {}
    if probe:
        for part in _chunks(appends, _MAX_PARAMS // 3):
            params = [v for a in part for v in (a.conversation_id, a.sender_id, a.msg_id)]
            marks = ", ".join(["(?, ?, ?)"] * len(part))
            for row in conn.execute(_STORED_UNDER.format(marks), params):
                known[(row[0], row[2], row[4])] = _row_to_message(row)
    results: list[tuple[StoredMessage, bool]] = []
    rows: list[StoredMessage] = []  # (a StoredMessage is its row: its fields in _COLUMNS order)
    seqs: dict[str, int] = {}
    joined: list[tuple[str, str]] = []
    for append in appends:
        conversation_id, sender_id = append.conversation_id, append.sender_id
        recv_id = append.recv_id
        if probe:  # (without it, an id twice in the batch is a row skipped, as above)
            key = (conversation_id, sender_id, append.msg_id)
            stored = known.get(key)
            if stored is not None:  # stored before, or earlier in this batch
                results.append((stored, False))
                continue
        seq = seqs[conversation_id] = last[conversation_id] = last.get(conversation_id, 0) + 1
        stored = append.stored(seq, times.get(conversation_id))
        times[conversation_id] = stored.send_time
        rows.append(stored)
        if probe:
            known[key] = stored
        results.append((stored, True))
        have = members.get(conversation_id)
        if have is None:
            have = members[conversation_id] = set()
        if sender_id not in have:
            have.add(sender_id)
            joined.append((sender_id, conversation_id))
        if recv_id not in have:
            have.add(recv_id)
            joined.append((recv_id, conversation_id))
    if rows:
        if probe:
            conn.executemany(_INSERT_MESSAGE, rows)
        elif conn.executemany(_INSERT_NEW_MESSAGE, rows).rowcount != len(rows):
            return None
        conn.executemany(_SET_LAST_SEQ, seqs.items())
    if joined:
        conn.executemany(_ADD_MEMBER, joined)
    return results


def wal_vfs(environ: Mapping[str, str]) -> str | None:
    """The name of imkit's write-gathering VFS (the C extension ``imkit._sqlite_wal``),
    registered with the SQLite library that :mod:`sqlite3` runs on (at the first call);
    ``None`` if ``environ`` sets ``IMKIT_NO_SPEEDUPS``, the extension is not built, or
    SQLite's VFS functions cannot be found."""
    return None if environ.get("IMKIT_NO_SPEEDUPS") else _registered_vfs()


@functools.cache
def _registered_vfs() -> str | None:
    """:func:`wal_vfs`'s registration, tried once per process."""
    try:
        import _sqlite3

        from imkit import _sqlite_wal
    except ImportError:
        return None
    return _sqlite_wal.VFS_NAME if _sqlite_wal.register(_sqlite3.__file__) else None


_LAST_SEQ = "SELECT last_seq FROM imkit_conversations WHERE conversation_id = ?"
_TIME_AT = "SELECT send_time FROM imkit_messages WHERE conversation_id = ? AND seq = ?"


def _time_seqs(
    conn: sqlite3.Connection, conversation_id: str, start_time: int | None, end_time: int | None
) -> tuple[int, int] | None:
    """The seqs whose send times lie in ``[start_time, end_time]`` (either bound may be
    ``None``), as ``(first, last)`` (``first > last`` when none), found by bisection over
    the conversation's seqs ``1 .. last_seq``: send times never decrease along them. A
    probe that finds no row (a store that broke its own gapless rule) gives ``None``: the
    caller then reads the range by time alone."""
    row = conn.execute(_LAST_SEQ, (conversation_id,)).fetchone()
    if row is None:
        return 1, 0

    def first_seq_from(time: int, above: bool) -> int | None:
        # The first seq whose send time is >= time (above: > time); last_seq + 1 if none.
        lo, hi = 1, row[0] + 1
        while lo < hi:
            mid = (lo + hi) // 2
            found = conn.execute(_TIME_AT, (conversation_id, mid)).fetchone()
            if found is None:
                return None
            if found[0] > time or (found[0] == time and not above):
                hi = mid
            else:
                lo = mid + 1
        return lo

    first, last = 1, row[0]
    if start_time is not None:
        seq = first_seq_from(start_time, above=False)
        if seq is None:
            return None
        first = seq
    if end_time is not None:
        seq = first_seq_from(end_time, above=True)
        if seq is None:
            return None
        last = seq - 1
    return first, last


class SQLiteStore(StoreLifecycle):
    """A :class:`~imkit.chat.store.MessageStore` in one SQLite file (see the module doc).

    An open store belongs to the event loop (and thread) that opened it.

    Args:
        path: the database file (created if missing); ``":memory:"`` for a private,
            non-persistent database.
        synchronous: ``"FULL"`` (durable across OS crashes) or ``"NORMAL"`` (durable
            across process crashes only).
        busy_timeout: seconds to wait for another connection's lock before raising
            :class:`~imkit.exceptions.StoreUnavailable`.
        max_batch: the most writes one transaction holds (group commit).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 5.0,
        max_batch: int = 256,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._path = os.fspath(path)
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job] | None = None
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._opening: anyio.Event | None = None
        self._open = False
        self._owner = 0  # the thread of the event loop that opened the store
        self._waker: _Waker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the owner's, under asyncio
        self._new_event = EventFactory()
        self._writes: deque[_Job] = deque()  # waiting for a round
        self._parked: list[_Job] = []  # reads waiting for the round's COMMIT
        self._round: _Round | None = None
        self._careful = False  # the next round runs each write under a savepoint
        self._probe = False  # the next round reads its appends' stored ids first
        # Whether the database has imkit_messages_by_time (made at schema version 1): then
        # history by time reads it; else send times never decrease along the seqs, and the
        # seqs of a time range are found by bisection (_time_seqs).
        self._time_index = False
        self._idle = Flag()
        self._transactions = 0
        self._writes_done = 0

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def write_transactions(self) -> int:
        """How many write transactions this store committed (group commit makes it small)."""
        return self._transactions

    @property
    def writes_committed(self) -> int:
        """How many write operations those transactions held."""
        return self._writes_done

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Start the worker thread, open the file and create the schema on first use."""
        if self._opening is not None:
            await self._opening.wait()
            if self._thread is not None:
                return
        if self._thread is not None:
            return
        self._opening = opening = anyio.Event()
        try:
            key, self._waker = _current_waker()
            self._loop = key if isinstance(key, asyncio.AbstractEventLoop) else None
            self._owner = threading.get_ident()
            jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
            ready_event = anyio.Event()
            ready = _Job(_Kind.STOP, event=ready_event)
            thread = threading.Thread(
                target=self._serve, args=(jobs, ready), name="imkit-sqlite", daemon=True
            )
            thread.start()
            with anyio.CancelScope(shield=True):  # never leave a thread without an owner
                await ready_event.wait()
            if ready.error is not None:
                await anyio.to_thread.run_sync(thread.join)
                raise ready.error
            self._queue, self._thread, self._conn = jobs, thread, ready.result
            self._open = True
            logger.debug("opened %s", self._path)
        finally:
            self._opening = None
            opening.set()

    async def close(self) -> None:
        """Finish the queued jobs, close the connection and stop the worker thread."""
        thread, jobs = self._thread, self._queue
        if thread is None or jobs is None or not self._open:
            return
        self._open = False  # new calls fail; what is queued still runs
        with anyio.CancelScope(shield=True):
            while self._round is not None or self._writes:
                self._idle = idle = Flag()
                await idle.wait()
            stopped = anyio.Event()
            jobs.put(_Job(_Kind.STOP, event=stopped))
            await stopped.wait()
            await anyio.to_thread.run_sync(thread.join)
        self._thread = self._queue = self._conn = None
        logger.debug("closed %s", self._path)

    async def _call(self, kind: _Kind, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        result: _T = await self._wait(self._submit(kind, fn))
        return result

    def _submit(
        self,
        kind: _Kind,
        fn: Callable[[sqlite3.Connection], Any],
        then: AppendDone | None = None,
    ) -> _Job:
        """Queue a job now (writes run in the order they are queued); its outcome is
        awaited with :meth:`_wait`, or, with ``then``, handed to that callback."""
        jobs = self._queue
        if jobs is None or not self._open:
            raise StoreError("the store is not open")
        if threading.get_ident() != self._owner:
            raise RuntimeError("an SQLiteStore is used by the event loop that opened it")
        if then is not None:
            job = _Job(kind, fn, None, then)
        else:
            loop = self._loop
            job = _Job(kind, fn, self._new_event() if loop is None else loop.create_future())
        if kind is _Kind.WRITE:
            self._writes.append(job)
            if self._round is None:
                self._begin()
        elif self._round is _Round.BEGIN:
            self._parked.append(job)  # the loop writes until the COMMIT: the worker waits
        else:
            jobs.put(job)
        return job

    @staticmethod
    async def _wait(job: _Job) -> Any:
        """The result of a queued job (its error raised)."""
        event = job.event
        assert event is not None
        try:
            await (event if isinstance(event, asyncio.Future) else event.wait())
        except BaseException:
            job.cancelled = True
            raise
        if job.error is not None:
            raise job.error
        return job.result

    # -- write rounds (on the event loop) --------------------------------------------
    #
    # A round: the worker opens a transaction (BEGIN IMMEDIATE: only the worker may wait
    # for another process's lock); the loop runs every waiting write in it, each under a
    # savepoint; the worker commits (the fsync). Writes that arrive meanwhile wait for
    # the next round: one round at a time is the group commit. The loop touches the
    # connection only between the worker's BEGIN and the COMMIT it hands back, and no
    # job reaches the worker in between, so the connection is never used by two threads.

    def _begin(self) -> None:
        assert self._queue is not None
        self._round = _Round.BEGIN
        self._queue.put(_Job(_Kind.BEGIN))

    def _begun(self, begin: _Job) -> None:
        batch: list[_Job] = []
        writes = self._writes
        while writes and len(batch) < self._max_batch:
            job = writes.popleft()
            if not job.cancelled:
                batch.append(job)
        if begin.error is not None:
            logger.warning("%s: cannot start a write transaction: %s", self._path, begin.error)
            self._fail(batch, begin.error)
            self._end_round(batch)
            return
        conn = self._conn
        assert conn is not None and self._queue is not None
        if self._careful:
            self._careful = False
            failure = self._run_writes(conn, batch)
        else:
            try:
                retry = not self._run_optimistic(conn, batch)
            except Exception as exc:  # noqa: BLE001 - every waiter must get an answer
                failure, retry = self._abandon(conn, exc), False
            else:
                failure = None
            if retry:  # rolled back: the round runs again (_run_optimistic says how)
                self._writes.extendleft(reversed(batch))
                self._end_round([])
                return
        if failure is not None:
            self._fail(batch, failure)
            self._end_round(batch)
            return
        commit = _Job(_Kind.COMMIT)
        commit.batch = batch
        self._round = _Round.COMMIT
        self._queue.put(commit)
        parked, self._parked = self._parked, []
        for job in parked:
            self._queue.put(job)

    def _run_optimistic(self, conn: sqlite3.Connection, writes: list[_Job]) -> bool:
        """Run ``writes`` in the open transaction without savepoints (two statements per
        write saved), appends queued side by side together (:func:`_append_all`). Roll
        back and return False when the round must run again: a write failed on its own
        (a constraint, a bug in it: it runs again with a savepoint around each write), or
        its appends held the resend of a message stored before (it runs again reading
        its appends' stored ids first). I/O, lock and memory trouble raises."""
        probe, self._probe = self._probe, False
        start, count = 0, len(writes)
        while start < count:
            end = start
            while end < count and type(writes[end].fn) is _Append:
                end += 1  # appends side by side: run together
            try:
                if end - start > 1:
                    appends: list[_Append] = [job.fn for job in writes[start:end]]  # type: ignore[misc]
                    results = _append_all(conn, appends, probe=probe)
                    if results is None:  # a resend of a message stored in an earlier round
                        logger.debug("%s: a round holds a resend; running it again", self._path)
                        conn.execute("ROLLBACK")
                        self._probe = True
                        return False
                    for job, result in zip(writes[start:end], results, strict=True):
                        job.result = result
                else:
                    end = start + 1
                    fn = writes[start].fn
                    assert fn is not None
                    writes[start].result = fn(conn)
            except (sqlite3.OperationalError, sqlite3.InternalError):
                raise
            except Exception as exc:  # noqa: BLE001 - retried under savepoints
                logger.debug("%s: a write failed (%r); running its round again", self._path, exc)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._careful = True
                return False
            start = end
        return True

    def _abandon(self, conn: sqlite3.Connection, exc: BaseException) -> BaseException:
        """Roll back after ``exc`` spoiled the transaction; return it."""
        logger.warning("%s: write transaction failed: %s", self._path, exc)
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as rollback_exc:
            logger.warning("%s: rollback failed: %s", self._path, rollback_exc)
        return exc

    def _run_writes(self, conn: sqlite3.Connection, writes: list[_Job]) -> BaseException | None:
        """Run ``writes`` in the open transaction, each under a savepoint; a failure that
        spoils it all is rolled back and returned."""
        try:
            for job in writes:
                assert job.fn is not None
                conn.execute("SAVEPOINT imkit_job")
                try:
                    job.result = job.fn(conn)
                except (sqlite3.OperationalError, sqlite3.InternalError):
                    raise  # I/O, lock or memory trouble: the whole batch fails
                except Exception as exc:
                    if not conn.in_transaction:
                        raise
                    conn.execute("ROLLBACK TO imkit_job")
                    job.error = _translate(exc)
                    logger.warning("%s: write failed: %r", self._path, exc)
                conn.execute("RELEASE imkit_job")
        except Exception as exc:  # noqa: BLE001 - every waiter must get an answer
            return self._abandon(conn, exc)
        return None

    def _committed(self, commit: _Job) -> None:
        if commit.error is not None:
            logger.warning("%s: write transaction failed: %s", self._path, commit.error)
            self._fail(commit.batch, commit.error)
        else:
            self._transactions += 1
            self._writes_done += len(commit.batch)
        self._end_round(commit.batch)

    @staticmethod
    def _fail(batch: Sequence[_Job], error: BaseException) -> None:
        for job in batch:  # one exception object per waiter: each gets raised
            job.result, job.error = None, _translate(error)

    def _end_round(self, batch: Sequence[_Job]) -> None:
        self._round = None
        if self._parked:
            assert self._queue is not None
            parked, self._parked = self._parked, []
            for job in parked:
                self._queue.put(job)
        for job in batch:
            job.wake()
        if self._writes:
            self._begin()
        else:
            self._idle.set()

    def _answered(self, jobs: list[_Job]) -> None:
        """On the event loop: act on what the worker did."""
        for job in jobs:
            try:
                if job.kind is _Kind.BEGIN:
                    self._begun(job)
                elif job.kind is _Kind.COMMIT:
                    self._committed(job)
                else:
                    job.wake()
            except Exception:  # pragma: no cover - a bug above; never raise into the loop
                logger.exception("SQLite store: handling the worker's answer failed")

    # -- the worker thread -----------------------------------------------------------

    def _serve(self, jobs: queue.SimpleQueue[_Job], ready: _Job) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - handed to open(), never lost
            ready.error = _translate(exc)
            logger.error("cannot open %s: %s", self._path, exc)
            self._wake([ready])
            return
        ready.result = conn
        self._wake([ready])
        try:
            while True:
                batch = [jobs.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = False
                for job in batch:
                    if job.kind is _Kind.STOP:
                        stop = True
                    elif not job.cancelled:
                        self._run_job(conn, job)
                if stop:
                    conn.close()
                self._wake(batch)
                if stop:
                    return
        except BaseException:  # pragma: no cover - a bug in the loop above
            logger.exception("SQLite worker crashed")
            conn.close()
            raise

    def _run_job(self, conn: sqlite3.Connection, job: _Job) -> None:
        try:
            if job.kind is _Kind.READ:
                assert job.fn is not None
                job.result = job.fn(conn)
            elif job.kind is _Kind.BEGIN:
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - handed to the event loop
            job.error = _translate(exc) if job.kind is _Kind.READ else exc
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.warning("%s: rollback after a failed %s failed", self._path, job.kind.value)

    def _wake(self, batch: list[_Job]) -> None:
        waker = self._waker
        assert waker is not None
        try:
            waker(functools.partial(self._answered, batch))
        except RuntimeError:  # the event loop is gone; nobody is waiting any more
            logger.debug("event loop closed before its SQLite answer arrived")

    def _connect(self) -> sqlite3.Connection:
        """Open, set up and migrate the database. Another process opening the same new
        file at once can make this fail with "database is locked" at once, without the
        busy handler (a lock upgrade SQLite refuses to wait for, to avoid a deadlock):
        such failures are retried with a growing pause for up to ``busy_timeout``."""
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.005
        while True:
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                busy = (code & 0xFF) in (5, 6) if code is not None else "locked" in str(exc)
                if not busy or time.monotonic() + pause > deadline:
                    raise
                logger.debug("%s is locked while opening; retrying: %s", self._path, exc)
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _connect_once(self) -> sqlite3.Connection:
        # With synchronous=FULL each commit's log writes go out as one system call
        # (imkit._sqlite_wal); that VFS is only safe when every commit syncs the log.
        vfs = wal_vfs(os.environ) if self._synchronous == "FULL" else None
        if vfs is not None and self._path not in ("", ":memory:"):
            target = f"file:{urllib.parse.quote(os.path.abspath(self._path))}?vfs={vfs}"
            uri = True
        else:
            target, uri = self._path, False
        conn = sqlite3.connect(
            target,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,  # the worker and, inside a round, the loop
            uri=uri,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and self._path != ":memory:":
                logger.warning("%s: journal_mode is %s, not wal", self._path, mode)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Savepoint and statement journals in memory: SQLite's default puts them in a
            # temporary file as soon as they pass 64 KiB, and a savepoint (a careful
            # round's, one per write) copies every page it touches there first: a system
            # call per page, as many as the commit's own.
            conn.execute("PRAGMA temp_store = MEMORY")
            # A checkpoint copies each page written to the log since the last one into
            # the database once, however often it was written: the leaves that take a
            # conversation's new messages are written by nearly every round, so the
            # rarer the checkpoint the fewer copies per message (SQLite's default, 1000
            # pages, is five rounds of 170 messages over 50 conversations).
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS imkit_schema_version ("
                " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM imkit_schema_version WHERE id = 1").fetchone()
            version = row[0] if row else 0
            if version > SQLITE_SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} has schema version {version}; "
                    f"this imkit supports up to {SQLITE_SCHEMA_VERSION}"
                )
            if version < SQLITE_SCHEMA_VERSION:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO imkit_schema_version (id, version) VALUES (1, ?)"
                    " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    (SQLITE_SCHEMA_VERSION,),
                )
                logger.info("%s: created schema version %d", self._path, SQLITE_SCHEMA_VERSION)
            conn.execute("COMMIT")
            self._time_index = (
                conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'index'"
                    " AND name = 'imkit_messages_by_time'"
                ).fetchone()
                is not None
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- operations ------------------------------------------------------------------

    async def append(
        self,
        *,
        conversation_id: str,
        sender_id: str,
        recv_id: str,
        msg_id: str,
        chat_type: int,
        m_type: int,
        content: str,
        send_time: int,
    ) -> tuple[StoredMessage, bool]:
        """Store a message under the next seq, or return the one stored before."""
        write = _Append(
            conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
        )
        result: tuple[StoredMessage, bool] = await self._call(_Kind.WRITE, write)
        return result

    def append_nowait(
        self,
        *,
        conversation_id: str,
        sender_id: str,
        recv_id: str,
        msg_id: str,
        chat_type: int,
        m_type: int,
        content: str,
        send_time: int,
        done: AppendDone,
    ) -> None:
        """Queue :meth:`append` now, behind every write queued before; ``done`` gets the
        outcome once the transaction holding it has committed, in the order of the calls
        (:class:`~imkit.chat.store.QueuedAppend`)."""
        try:
            write = _Append(
                conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time
            )
            self._submit(_Kind.WRITE, write, done)
        except Exception as exc:  # noqa: BLE001 - given to done, as promised
            report_append(done, None, exc)

    async def read_after(
        self, conversation_id: str, after_seq: int, *, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with seq above ``after_seq``, ascending."""
        check_text("conversation_id", conversation_id)
        check_int("after_seq", after_seq)
        check_limit(limit)
        return await self._select(
            f"SELECT {_COLUMNS} FROM imkit_messages WHERE conversation_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (conversation_id, after_seq, limit),
        )

    async def history(
        self,
        conversation_id: str,
        *,
        start_seq: int | None = None,
        end_seq: int | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> list[StoredMessage]:
        """Messages within the inclusive seq and time bounds, by seq."""
        check_text("conversation_id", conversation_id)
        check_history(
            start_seq=start_seq,
            end_seq=end_seq,
            start_time=start_time,
            end_time=end_time,
            limit=limit,
        )
        where = ["conversation_id = ?"]
        params: list[object] = [conversation_id]
        for clause, value in (
            ("seq >= ?", start_seq),
            ("seq <= ?", end_seq),
            ("send_time >= ?", start_time),
            ("send_time <= ?", end_time),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        order = "DESC" if descending else "ASC"
        tail = f" ORDER BY seq {order} LIMIT ?"
        if (start_time is None and end_time is None) or self._time_index:
            return await self._select(
                f"SELECT {_COLUMNS} FROM imkit_messages WHERE {' AND '.join(where)}{tail}",
                (*params, limit),
            )

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            # No index by time: the seqs of the time range first, then those seqs (the
            # time bounds stay in the query: a row is returned only if its time is in).
            extra, values = "", []
            seqs = _time_seqs(conn, conversation_id, start_time, end_time)
            if seqs is not None:
                extra, values = " AND seq >= ? AND seq <= ?", list(seqs)
            sql = f"SELECT {_COLUMNS} FROM imkit_messages WHERE {' AND '.join(where)}{extra}"
            return _messages(conn, sql + tail, (*params, *values, limit))

        return await self._call(_Kind.READ, run)

    async def _select(self, sql: str, params: tuple[object, ...]) -> list[StoredMessage]:
        return await self._call(_Kind.READ, lambda conn: _messages(conn, sql, params))

    async def _scalar(self, sql: str, params: tuple[object, ...]) -> Any:
        def run(conn: sqlite3.Connection) -> Any:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else row[0]

        return await self._call(_Kind.READ, run)

    async def is_member(self, conversation_id: str, user_id: str) -> bool:
        """Whether ``user_id`` has sent or received a message in the conversation."""
        check_text("conversation_id", conversation_id)
        check_text("user_id", user_id)
        found = await self._scalar(
            "SELECT 1 FROM imkit_members WHERE user_id = ? AND conversation_id = ?",
            (user_id, conversation_id),
        )
        return found is not None

    async def last_seq(self, conversation_id: str) -> int:
        """The conversation's highest seq (0 when it has no messages)."""
        check_text("conversation_id", conversation_id)
        seq = await self._scalar(_LAST_SEQ, (conversation_id,))
        return int(seq or 0)

    async def get_delivered(self, user_id: str, device_id: str, conversation_id: str) -> int:
        """The device's delivered watermark in the conversation (0 when none)."""
        check_text("user_id", user_id)
        check_text("device_id", device_id, allow_empty=True)
        check_text("conversation_id", conversation_id)
        seq = await self._scalar(
            "SELECT seq FROM imkit_delivered"
            " WHERE user_id = ? AND device_id = ? AND conversation_id = ?",
            (user_id, device_id, conversation_id),
        )
        return int(seq or 0)

    async def set_delivered(
        self, user_id: str, device_id: str, conversation_id: str, seq: int
    ) -> int:
        """Raise the delivered watermark to ``seq`` (capped at the last seq); the result."""
        check_text("user_id", user_id)
        check_text("device_id", device_id, allow_empty=True)
        check_text("conversation_id", conversation_id)
        check_int("seq", seq, minimum=0)
        return await self._raise_watermark(
            "imkit_delivered",
            ("user_id", "device_id", "conversation_id"),
            (user_id, device_id, conversation_id),
            seq,
        )

    async def _raise_watermark(
        self, table: str, key_columns: tuple[str, ...], key: tuple[str, ...], seq: int
    ) -> int:
        lookup, upsert = _watermark_sql(table, key_columns)
        conversation_id = key[-1]

        def run(conn: sqlite3.Connection) -> int:
            # The conversation's last seq and the watermark, in one read.
            last, current = conn.execute(lookup, (conversation_id, *key)).fetchone()
            current = current or 0
            new = max(current, min(seq, last or 0))
            if new > current:
                conn.execute(upsert, (*key, new))
            return int(new)

        return await self._call(_Kind.WRITE, run)

    async def pending(
        self,
        user_id: str,
        device_id: str,
        *,
        limit: int,
        after: tuple[str, int] | None = None,
    ) -> list[StoredMessage]:
        """The peers' messages the device has not acknowledged, by (conversation, seq)."""
        check_text("user_id", user_id)
        check_text("device_id", device_id, allow_empty=True)
        check_limit(limit)
        cursor_conversation, cursor_seq = check_cursor(after)
        # Conversations in key order, each one's watermark, then its messages by primary
        # key from above the watermark (or the cursor): a range read per conversation, no
        # sort. CROSS JOIN keeps that join order (SQLite does not reorder it).
        return await self._select(
            f"SELECT {_M_COLUMNS} FROM imkit_members mb"
            " LEFT JOIN imkit_delivered d ON d.user_id = mb.user_id AND d.device_id = ?"
            "  AND d.conversation_id = mb.conversation_id"
            " CROSS JOIN imkit_messages m ON m.conversation_id = mb.conversation_id"
            "  AND m.seq > CASE WHEN mb.conversation_id = ? THEN max(COALESCE(d.seq, 0), ?)"
            "   ELSE COALESCE(d.seq, 0) END"
            " WHERE mb.user_id = ? AND mb.conversation_id >= ? AND m.sender_id <> mb.user_id"
            " ORDER BY mb.conversation_id, m.seq LIMIT ?",
            (device_id, cursor_conversation, cursor_seq, user_id, cursor_conversation, limit),
        )

    async def get_read(self, user_id: str, conversation_id: str) -> int:
        """The user's read watermark in the conversation (0 when none)."""
        check_text("user_id", user_id)
        check_text("conversation_id", conversation_id)
        seq = await self._scalar(
            "SELECT seq FROM imkit_read WHERE user_id = ? AND conversation_id = ?",
            (user_id, conversation_id),
        )
        return int(seq or 0)

    async def set_read(self, user_id: str, conversation_id: str, seq: int) -> int:
        """Raise the read watermark to ``seq`` (capped at the last seq); the result."""
        check_text("user_id", user_id)
        check_text("conversation_id", conversation_id)
        check_int("seq", seq, minimum=0)
        return await self._raise_watermark(
            "imkit_read", ("user_id", "conversation_id"), (user_id, conversation_id), seq
        )

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        """The user's conversations, the most recently active first."""
        check_text("user_id", user_id)

        def run(conn: sqlite3.Connection) -> list[ConversationSummary]:
            rows = conn.execute(
                "SELECT c.conversation_id, c.last_seq, COALESCE(r.seq, 0),"
                " (SELECT count(*) FROM imkit_messages u"
                "   WHERE u.conversation_id = c.conversation_id"
                "   AND u.seq > COALESCE(r.seq, 0) AND u.sender_id <> mb.user_id),"
                " COALESCE((SELECT min(o.user_id) FROM imkit_members o"
                "   WHERE o.conversation_id = c.conversation_id AND o.user_id <> mb.user_id),"
                "   mb.user_id),"
                f" {_M_COLUMNS}"
                " FROM imkit_members mb"
                " JOIN imkit_conversations c ON c.conversation_id = mb.conversation_id"
                " LEFT JOIN imkit_read r ON r.user_id = mb.user_id"
                "  AND r.conversation_id = mb.conversation_id"
                " LEFT JOIN imkit_messages m ON m.conversation_id = c.conversation_id"
                "  AND m.seq = c.last_seq"
                " WHERE mb.user_id = ?"
                " ORDER BY COALESCE(m.send_time, 0) DESC, c.conversation_id",
                (user_id,),
            ).fetchall()
            return [
                ConversationSummary(
                    conversation_id=row[0],
                    peer_id=row[4],
                    last_seq=row[1],
                    read_seq=row[2],
                    unread=row[3],
                    last_message=None if row[5] is None else _row_to_message(row[5:]),
                )
                for row in rows
            ]

        return await self._call(_Kind.READ, run)
