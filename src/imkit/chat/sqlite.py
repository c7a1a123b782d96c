"""The embedded default :class:`~imkit.chat.store.MessageStore`: one SQLite file.

Threading
    sqlite3 calls block, so none of them runs on the event loop. Each open store owns
    one worker thread that owns the only connection; coroutines hand it jobs through a
    queue and sleep on an :class:`anyio.Event` that the worker sets through the loop's
    thread-safe entry point (``call_soon_threadsafe`` under asyncio, the trio token under
    trio). One thread, one connection: no pool, no lock juggling, works under both
    backends.

Group commit
    The worker takes every job waiting in the queue at once (up to ``max_batch``) and
    runs all the writes among them in one ``BEGIN IMMEDIATE`` transaction, each under its
    own savepoint so that one failing write does not undo the others, then commits once.
    Appends that arrive while a commit is in progress wait for it and then share the next
    one, so a burst of N concurrent appends costs a handful of commits, not N. Nobody
    hears "stored" before the commit that stored it succeeded; if the commit fails every
    write in the batch fails.

Durability
    The database runs in WAL mode. With ``synchronous="FULL"`` (the default) every commit
    is on disk when ``append`` returns: it survives a process kill (``kill -9``) and an
    operating-system crash or power cut. ``synchronous="NORMAL"`` skips the fsync per
    commit: committed data still survives a process crash or kill, but an OS crash or
    power cut may lose the last transactions (the database stays consistent). Losing
    them would mean reusing seqs clients have already seen, hence FULL by default; group
    commit keeps its cost to one fsync per batch.

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
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
import attrs

from imkit.chat.store import (
    SCHEMA_VERSION,
    ConversationSummary,
    StoredMessage,
    StoreLifecycle,
    check_cursor,
    check_history,
    check_int,
    check_limit,
    check_text,
    draft_message,
)
from imkit.exceptions import ImkitError, StoreError, StoreUnavailable

__all__ = ("SQLiteStore",)

logger = logging.getLogger("imkit.chat.sqlite")

_T = TypeVar("_T")
_Waker = Callable[[Callable[[], None]], object]

_COLUMNS = "conversation_id, seq, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time"
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))

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
CREATE INDEX IF NOT EXISTS imkit_messages_by_time ON imkit_messages (conversation_id, send_time);
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
    READ = "read"
    WRITE = "write"
    STOP = "stop"


class _Job:
    """One request to the worker thread, and the slot its answer comes back in."""

    __slots__ = ("cancelled", "error", "event", "fn", "kind", "result", "waker", "waker_key")

    def __init__(self, kind: _Kind, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.kind = kind
        self.fn = fn
        self.event = anyio.Event()
        self.waker_key, self.waker = _current_waker()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False


def _set_all(events: list[anyio.Event]) -> None:
    for event in events:
        event.set()


def _row_to_message(row: Sequence[Any]) -> StoredMessage:
    # The columns are in the order of StoredMessage's fields.
    return StoredMessage(*row)


class SQLiteStore(StoreLifecycle):
    """A :class:`~imkit.chat.store.MessageStore` in one SQLite file (see the module doc).

    Args:
        path: the database file (created if missing); ``":memory:"`` for a private,
            non-persistent database.
        synchronous: ``"FULL"`` (durable across OS crashes) or ``"NORMAL"`` (durable
            across process crashes only).
        busy_timeout: seconds to wait for another connection's lock before raising
            :class:`~imkit.exceptions.StoreUnavailable`.
        max_batch: the most queued jobs the worker takes in one round (one transaction).
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
        self._opening: anyio.Event | None = None
        self._transactions = 0
        self._writes = 0

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
        return self._writes

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
            jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
            ready = _Job(_Kind.STOP, lambda conn: None)
            thread = threading.Thread(
                target=self._serve, args=(jobs, ready), name="imkit-sqlite", daemon=True
            )
            thread.start()
            with anyio.CancelScope(shield=True):  # never leave a thread without an owner
                await ready.event.wait()
            if ready.error is not None:
                await anyio.to_thread.run_sync(thread.join)
                raise ready.error
            self._queue, self._thread = jobs, thread
            logger.debug("opened %s", self._path)
        finally:
            self._opening = None
            opening.set()

    async def close(self) -> None:
        """Finish the queued jobs, close the connection and stop the worker thread."""
        thread, jobs = self._thread, self._queue
        if thread is None or jobs is None:
            return
        self._thread = self._queue = None
        stop = _Job(_Kind.STOP, lambda conn: None)
        jobs.put(stop)
        with anyio.CancelScope(shield=True):
            await stop.event.wait()
            await anyio.to_thread.run_sync(thread.join)
        logger.debug("closed %s", self._path)

    async def _call(self, kind: _Kind, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        jobs = self._queue
        if jobs is None:
            raise StoreError("the store is not open")
        job = _Job(kind, fn)
        jobs.put(job)
        try:
            await job.event.wait()
        except BaseException:
            job.cancelled = True
            raise
        if job.error is not None:
            raise job.error
        result: _T = job.result
        return result

    # -- the worker thread -----------------------------------------------------------

    def _serve(self, jobs: queue.SimpleQueue[_Job], ready: _Job) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - handed to open(), never lost
            ready.error = _translate(exc)
            logger.error("cannot open %s: %s", self._path, exc)
            self._wake([ready])
            return
        self._wake([ready])
        try:
            while True:
                batch = [jobs.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = [job for job in batch if job.kind is _Kind.STOP]
                live = [job for job in batch if job.kind is not _Kind.STOP and not job.cancelled]
                self._run_writes(conn, [job for job in live if job.kind is _Kind.WRITE])
                for job in live:
                    if job.kind is _Kind.READ:
                        self._run_read(conn, job)
                if stop:
                    conn.close()
                self._wake(batch)
                if stop:
                    return
        except BaseException:  # pragma: no cover - a bug in the loop above
            logger.exception("SQLite worker crashed")
            conn.close()
            raise

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
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=True,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and self._path != ":memory:":
                logger.warning("%s: journal_mode is %s, not wal", self._path, mode)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
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
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} has schema version {version}; "
                    f"this imkit supports up to {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO imkit_schema_version (id, version) VALUES (1, ?)"
                    " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    (SCHEMA_VERSION,),
                )
                logger.info("%s: created schema version %d", self._path, SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _run_writes(self, conn: sqlite3.Connection, writes: list[_Job]) -> None:
        if not writes:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            logger.warning("%s: cannot start a write transaction: %s", self._path, exc)
            for job in writes:
                job.error = _translate(exc)
            return
        try:
            for job in writes:
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
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every waiter must get an answer
            logger.warning("%s: write transaction failed: %s", self._path, exc)
            for job in writes:  # one exception object per waiter: each gets raised
                job.result, job.error = None, _translate(exc)
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                logger.warning("%s: rollback failed: %s", self._path, rollback_exc)
            return
        self._transactions += 1
        self._writes += len(writes)

    def _run_read(self, conn: sqlite3.Connection, job: _Job) -> None:
        try:
            job.result = job.fn(conn)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting task
            job.error = _translate(exc)
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.warning("%s: rollback after a failed read failed", self._path)

    @staticmethod
    def _wake(batch: list[_Job]) -> None:
        by_loop: dict[int, tuple[_Waker, list[anyio.Event]]] = {}
        for job in batch:
            entry = by_loop.setdefault(id(job.waker_key), (job.waker, []))
            entry[1].append(job.event)
        for waker, events in by_loop.values():
            try:
                waker(functools.partial(_set_all, events))
            except RuntimeError:  # the event loop is gone; nobody is waiting any more
                logger.debug("event loop closed before its SQLite answer arrived")

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
        draft = draft_message(
            conversation_id=conversation_id,
            sender_id=sender_id,
            recv_id=recv_id,
            msg_id=msg_id,
            chat_type=chat_type,
            m_type=m_type,
            content=content,
            send_time=send_time,
        )

        def run(conn: sqlite3.Connection) -> tuple[StoredMessage, bool]:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM imkit_messages"
                " WHERE conversation_id = ? AND sender_id = ? AND msg_id = ?",
                (conversation_id, sender_id, msg_id),
            ).fetchone()
            if row is not None:
                return _row_to_message(row), False
            row = conn.execute(
                "SELECT last_seq FROM imkit_conversations WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            seq = (row[0] if row else 0) + 1
            conn.execute(
                "INSERT INTO imkit_conversations (conversation_id, last_seq) VALUES (?, ?)"
                " ON CONFLICT (conversation_id) DO UPDATE SET last_seq = excluded.last_seq",
                (conversation_id, seq),
            )
            message = attrs.evolve(draft, seq=seq)
            conn.execute(
                f"INSERT INTO imkit_messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(message),
            )
            conn.execute(
                "INSERT OR IGNORE INTO imkit_members (user_id, conversation_id)"
                " VALUES (?, ?), (?, ?)",
                (sender_id, conversation_id, recv_id, conversation_id),
            )
            return message, True

        return await self._call(_Kind.WRITE, run)

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
        params.append(limit)
        order = "DESC" if descending else "ASC"
        return await self._select(
            f"SELECT {_COLUMNS} FROM imkit_messages WHERE {' AND '.join(where)}"
            f" ORDER BY seq {order} LIMIT ?",
            tuple(params),
        )

    async def _select(self, sql: str, params: tuple[object, ...]) -> list[StoredMessage]:
        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            return [_row_to_message(row) for row in conn.execute(sql, params)]

        return await self._call(_Kind.READ, run)

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
        seq = await self._scalar(
            "SELECT last_seq FROM imkit_conversations WHERE conversation_id = ?",
            (conversation_id,),
        )
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
        where = " AND ".join(f"{column} = ?" for column in key_columns)
        conversation_id = key[-1]

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(f"SELECT seq FROM {table} WHERE {where}", key).fetchone()
            current = row[0] if row else 0
            last = conn.execute(
                "SELECT last_seq FROM imkit_conversations WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            new = max(current, min(seq, last[0] if last else 0))
            if new > current:
                conn.execute(
                    f"INSERT INTO {table} ({', '.join(key_columns)}, seq)"
                    f" VALUES ({', '.join('?' * (len(key) + 1))})"
                    f" ON CONFLICT ({', '.join(key_columns)}) DO UPDATE SET seq = excluded.seq",
                    (*key, new),
                )
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
