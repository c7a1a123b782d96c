"""A PostgreSQL :class:`~imkit.chat.store.MessageStore` for servers with many nodes.

Needs ``asyncpg`` (``pip install 'imkit[postgres]'``) and therefore the asyncio backend.

Sequence numbers
    Each conversation has a row in ``<prefix>conversations`` holding its ``last_seq``.
    ``append`` runs one transaction: it locks that row (creating it if needed), looks for
    the message's ``(sender_id, msg_id)`` under the lock, and only if it is new bumps
    ``last_seq`` and inserts the message with the new value. Writers of one conversation,
    on any node, queue on the row lock, so seqs are gapless and a resend never burns
    one; a unique index on ``(conversation_id, sender_id, msg_id)`` backs the dedupe up.

Strings
    ``content`` is stored as UTF-8 ``bytea`` so that NUL characters, which PostgreSQL
    ``text`` cannot hold, come back byte-for-byte. Id columns use the ``"C"`` collation,
    so ``conversation_id`` ordering is by code point, as in the other stores.

Schema
    Created on first use inside ``schema`` (default ``public``) with table names prefixed
    by ``table_prefix`` (default ``imkit_``), under a transaction-scoped advisory lock so
    that nodes starting together do not race; ``<prefix>schema_version`` records the
    version and a newer version is refused.

Errors
    Connection failures, timeouts, lost connections, resource shortages, serialization
    failures and deadlocks raise :class:`~imkit.exceptions.StoreUnavailable`; other
    database errors :class:`~imkit.exceptions.StoreError`. If a connection drops during
    ``COMMIT`` the outcome is unknown: the caller retries the same ``msg_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

try:
    import asyncpg  # type: ignore[import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "imkit.integrations.postgres needs asyncpg: pip install 'imkit[postgres]'"
    ) from exc

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
from imkit.exceptions import ConfigurationError, ImkitError, StoreError, StoreUnavailable

__all__ = ("PostgresStore",)

logger = logging.getLogger("imkit.chat.postgres")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX = re.compile(r"[A-Za-z0-9_]*")
_COLUMNS = "conversation_id, seq, sender_id, recv_id, msg_id, chat_type, m_type, content, send_time"
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
# SQLSTATE classes worth a retry: connection exception, insufficient resources,
# operator intervention (shutdown, query canceled), system error, transaction rollback.
_RETRYABLE_CLASSES = frozenset({"08", "53", "57", "58", "40"})
_RETRYABLE_STATES = frozenset({"55P03"})  # lock_not_available


def _translate(exc: BaseException) -> ImkitError | None:
    """The imkit exception for a driver or network failure; ``None`` for anything else."""
    if isinstance(exc, ImkitError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        retry = state[:2] in _RETRYABLE_CLASSES or state in _RETRYABLE_STATES
        return (StoreUnavailable if retry else StoreError)(f"postgres: {exc} [{state}]")
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return StoreUnavailable(f"postgres unreachable: {exc!r}")
    if isinstance(exc, asyncpg.InterfaceError):
        return StoreUnavailable(f"postgres: {exc}")
    if isinstance(exc, asyncpg.InternalClientError):
        # What asyncpg raises on a connection the server terminated under it ("cannot
        # switch to state N; another operation is in progress"): a new connection helps.
        return StoreUnavailable(f"postgres: {exc}")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return StoreError(f"postgres: {exc}")
    return None


def _row_to_message(row: Sequence[Any], offset: int = 0) -> StoredMessage:
    return StoredMessage(
        conversation_id=str(row[offset]),
        seq=int(row[offset + 1]),
        sender_id=str(row[offset + 2]),
        recv_id=str(row[offset + 3]),
        msg_id=str(row[offset + 4]),
        chat_type=int(row[offset + 5]),
        m_type=int(row[offset + 6]),
        content=bytes(row[offset + 7]).decode("utf-8"),
        send_time=int(row[offset + 8]),
    )


class PostgresStore(StoreLifecycle):
    """A :class:`~imkit.chat.store.MessageStore` on PostgreSQL through an asyncpg pool.

    Args:
        dsn: a libpq connection string, e.g. ``postgresql://user@host:5432/db``.
        min_size: connections the pool opens at once.
        max_size: the most connections the pool opens.
        schema: the PostgreSQL schema that holds the tables (created if missing).
        table_prefix: prepended to every table and index name.
        connect_timeout: seconds to wait for a connection.
        command_timeout: seconds any one statement may take (``None``: no limit).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        schema: str = "public",
        table_prefix: str = "imkit_",
        connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
    ) -> None:
        if not _IDENT.fullmatch(schema) or len(schema) > 63:
            raise ConfigurationError(f"invalid schema name {schema!r}")
        if not _PREFIX.fullmatch(table_prefix) or len(table_prefix) > 30:
            raise ConfigurationError(f"invalid table prefix {table_prefix!r}")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigurationError("need 0 <= min_size <= max_size and max_size >= 1")
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._schema = schema
        self._prefix = table_prefix
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None
        s = f'"{schema}"'
        self._conv = f'{s}."{table_prefix}conversations"'
        self._msgs = f'{s}."{table_prefix}messages"'
        self._members = f'{s}."{table_prefix}members"'
        self._delivered = f'{s}."{table_prefix}delivered"'
        self._read = f'{s}."{table_prefix}read"'
        self._version = f'{s}."{table_prefix}schema_version"'

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the tables."""
        return self._schema

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and, on first use, the schema. Idempotent."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError("PostgresStore (asyncpg) needs the asyncio backend") from None
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                )
            except Exception as exc:
                raise (_translate(exc) or StoreError(f"postgres: {exc!r}")) from exc
            try:
                await self._migrate(pool)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            logger.debug("opened schema %s", self._schema)

    async def close(self) -> None:
        """Close the pool (waiting for connections in use). Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                logger.warning("closing the pool failed: %r", exc)

    async def _migrate(self, pool: Any) -> None:
        lock_key = int.from_bytes(
            hashlib.sha256(f"imkit-schema:{self._schema}.{self._prefix}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        p = self._prefix
        statements = (
            f"""CREATE TABLE IF NOT EXISTS {self._conv} (
                conversation_id TEXT COLLATE "C" PRIMARY KEY,
                last_seq BIGINT NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {self._msgs} (
                conversation_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                sender_id TEXT COLLATE "C" NOT NULL,
                recv_id TEXT COLLATE "C" NOT NULL,
                msg_id TEXT COLLATE "C" NOT NULL,
                chat_type INTEGER NOT NULL,
                m_type INTEGER NOT NULL,
                content BYTEA NOT NULL,
                send_time BIGINT NOT NULL,
                PRIMARY KEY (conversation_id, seq))""",
            f"""CREATE UNIQUE INDEX IF NOT EXISTS "{p}messages_by_msg_id"
                ON {self._msgs} (conversation_id, sender_id, msg_id)""",
            f"""CREATE INDEX IF NOT EXISTS "{p}messages_by_time"
                ON {self._msgs} (conversation_id, send_time)""",
            f"""CREATE TABLE IF NOT EXISTS {self._members} (
                user_id TEXT COLLATE "C" NOT NULL,
                conversation_id TEXT COLLATE "C" NOT NULL,
                PRIMARY KEY (user_id, conversation_id))""",
            f"""CREATE INDEX IF NOT EXISTS "{p}members_by_conversation"
                ON {self._members} (conversation_id, user_id)""",
            f"""CREATE TABLE IF NOT EXISTS {self._delivered} (
                user_id TEXT COLLATE "C" NOT NULL,
                device_id TEXT COLLATE "C" NOT NULL,
                conversation_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (user_id, device_id, conversation_id))""",
            f"""CREATE TABLE IF NOT EXISTS {self._read} (
                user_id TEXT COLLATE "C" NOT NULL,
                conversation_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (user_id, conversation_id))""",
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_namespace WHERE nspname = $1", self._schema
                )
                if not exists:
                    await conn.execute(f'CREATE SCHEMA "{self._schema}"')
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._version} ("
                    " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,"
                    " updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                version = int(
                    await conn.fetchval(f"SELECT version FROM {self._version} WHERE id = 1") or 0
                )
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"schema {self._schema} has imkit schema version {version}; "
                        f"this imkit supports up to {SCHEMA_VERSION}"
                    )
                if version < SCHEMA_VERSION:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        f"INSERT INTO {self._version} (id, version) VALUES (1, $1)"
                        " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,"
                        " updated_at = now()",
                        SCHEMA_VERSION,
                    )
                    logger.info(
                        "created imkit schema version %d in %s", SCHEMA_VERSION, self._schema
                    )
        except Exception as exc:
            translated = _translate(exc)
            if translated is None or translated is exc:
                raise
            raise translated from exc

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        try:
            async with pool.acquire() as conn:
                yield conn
        except Exception as exc:
            translated = _translate(exc)
            if translated is None or translated is exc:
                raise
            raise translated from exc

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
        async with self._connection() as conn:
            for attempt in range(3):
                try:
                    async with conn.transaction():
                        # Lock the conversation row (WHERE FALSE: lock it, write nothing).
                        await conn.execute(
                            f"INSERT INTO {self._conv} (conversation_id, last_seq)"
                            " VALUES ($1, 0) ON CONFLICT (conversation_id)"
                            " DO UPDATE SET last_seq = EXCLUDED.last_seq WHERE FALSE",
                            conversation_id,
                        )
                        # A fresh snapshot, taken after the lock: sees any committed twin.
                        row = await conn.fetchrow(
                            f"SELECT {_COLUMNS} FROM {self._msgs} WHERE conversation_id = $1"
                            " AND sender_id = $2 AND msg_id = $3",
                            conversation_id,
                            sender_id,
                            msg_id,
                        )
                        if row is not None:
                            return _row_to_message(row), False
                        # The send time is never below the one of the message before
                        # (store.py): GREATEST with it.
                        stored = await conn.fetchrow(
                            f"WITH s AS (UPDATE {self._conv} SET last_seq = last_seq + 1"
                            "   WHERE conversation_id = $1 RETURNING last_seq),"
                            f" ins AS (INSERT INTO {self._msgs} ({_COLUMNS})"
                            "   SELECT $1, s.last_seq, $2, $3, $4, $5, $6, $7,"
                            f"   GREATEST($8, (SELECT p.send_time FROM {self._msgs} p"
                            "     WHERE p.conversation_id = $1 AND p.seq = s.last_seq - 1))"
                            "   FROM s RETURNING seq, send_time),"
                            f" mem AS (INSERT INTO {self._members} (user_id, conversation_id)"
                            "   SELECT DISTINCT u, $1 FROM unnest(ARRAY[$2, $3]::text[]) AS u"
                            "   ON CONFLICT DO NOTHING)"
                            " SELECT seq, send_time FROM ins",
                            conversation_id,
                            sender_id,
                            recv_id,
                            msg_id,
                            chat_type,
                            m_type,
                            content.encode("utf-8"),
                            send_time,
                        )
                    assert stored is not None
                    return draft._replace(
                        seq=int(stored["seq"]), send_time=int(stored["send_time"])
                    ), True
                except asyncpg.UniqueViolationError:
                    # Cannot happen while every writer takes the row lock; retry anyway.
                    logger.warning("append raced on %r (attempt %d)", msg_id, attempt + 1)
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def _messages(self, sql: str, *args: object) -> list[StoredMessage]:
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
        return [_row_to_message(row) for row in rows]

    async def _value(self, sql: str, *args: object) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    async def read_after(
        self, conversation_id: str, after_seq: int, *, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with seq above ``after_seq``, ascending."""
        check_text("conversation_id", conversation_id)
        check_int("after_seq", after_seq)
        check_limit(limit)
        return await self._messages(
            f"SELECT {_COLUMNS} FROM {self._msgs} WHERE conversation_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT $3",
            conversation_id,
            after_seq,
            limit,
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
        where = ["conversation_id = $1"]
        args: list[object] = [conversation_id]
        for clause, value in (
            ("seq >= ", start_seq),
            ("seq <= ", end_seq),
            ("send_time >= ", start_time),
            ("send_time <= ", end_time),
        ):
            if value is not None:
                args.append(value)
                where.append(f"{clause}${len(args)}")
        args.append(limit)
        order = "DESC" if descending else "ASC"
        return await self._messages(
            f"SELECT {_COLUMNS} FROM {self._msgs} WHERE {' AND '.join(where)}"
            f" ORDER BY seq {order} LIMIT ${len(args)}",
            *args,
        )

    async def is_member(self, conversation_id: str, user_id: str) -> bool:
        """Whether ``user_id`` has sent or received a message in the conversation."""
        check_text("conversation_id", conversation_id)
        check_text("user_id", user_id)
        found = await self._value(
            f"SELECT 1 FROM {self._members} WHERE user_id = $1 AND conversation_id = $2",
            user_id,
            conversation_id,
        )
        return found is not None

    async def last_seq(self, conversation_id: str) -> int:
        """The conversation's highest seq (0 when it has no messages)."""
        check_text("conversation_id", conversation_id)
        seq = await self._value(
            f"SELECT last_seq FROM {self._conv} WHERE conversation_id = $1", conversation_id
        )
        return int(seq or 0)

    async def get_delivered(self, user_id: str, device_id: str, conversation_id: str) -> int:
        """The device's delivered watermark in the conversation (0 when none)."""
        check_text("user_id", user_id)
        check_text("device_id", device_id, allow_empty=True)
        check_text("conversation_id", conversation_id)
        seq = await self._value(
            f"SELECT seq FROM {self._delivered}"
            " WHERE user_id = $1 AND device_id = $2 AND conversation_id = $3",
            user_id,
            device_id,
            conversation_id,
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
            self._delivered,
            ("user_id", "device_id", "conversation_id"),
            (user_id, device_id, conversation_id),
            seq,
        )

    async def _raise_watermark(
        self, table: str, key_columns: tuple[str, ...], key: tuple[str, ...], seq: int
    ) -> int:
        n = len(key)
        conv_param = f"${n}"  # conversation_id is the last key column
        seq_param = f"${n + 1}"
        columns = ", ".join(key_columns)
        where = " AND ".join(f"w.{c} = ${i}" for i, c in enumerate(key_columns, 1))
        params = ", ".join(f"${i}" for i in range(1, n + 1))
        value = await self._value(
            f"WITH up AS (INSERT INTO {table} AS t ({columns}, seq)"
            f"   SELECT {params}, LEAST({seq_param}::bigint, c.last_seq) FROM {self._conv} c"
            f"   WHERE c.conversation_id = {conv_param}"
            f"     AND LEAST({seq_param}::bigint, c.last_seq) > 0"
            f"   ON CONFLICT ({columns}) DO UPDATE SET seq = GREATEST(t.seq, EXCLUDED.seq)"
            "   RETURNING t.seq)"
            " SELECT COALESCE((SELECT seq FROM up),"
            f" (SELECT w.seq FROM {table} w WHERE {where}), 0)",
            *key,
            seq,
        )
        return int(value)

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
        # The user's conversations in key order, each one's watermark, then (LATERAL) its
        # messages by primary key from above the watermark (or the cursor), at most a
        # page of them: a range read per conversation, never the messages below the
        # watermark (a plain join read every message of every conversation, and
        # filtered).
        return await self._messages(
            f"SELECT {_M_COLUMNS} FROM {self._members} mb"
            f" LEFT JOIN {self._delivered} d ON d.user_id = mb.user_id AND d.device_id = $2"
            "  AND d.conversation_id = mb.conversation_id"
            f" CROSS JOIN LATERAL (SELECT * FROM {self._msgs} m1"
            "  WHERE m1.conversation_id = mb.conversation_id AND m1.seq > CASE"
            "   WHEN mb.conversation_id = $3 THEN GREATEST(COALESCE(d.seq, 0), $4)"
            "   ELSE COALESCE(d.seq, 0) END"
            "  AND m1.sender_id <> mb.user_id ORDER BY m1.seq LIMIT $5) m"
            " WHERE mb.user_id = $1 AND mb.conversation_id >= $3"
            " ORDER BY mb.conversation_id, m.seq LIMIT $5",
            user_id,
            device_id,
            cursor_conversation,
            cursor_seq,
            limit,
        )

    async def get_read(self, user_id: str, conversation_id: str) -> int:
        """The user's read watermark in the conversation (0 when none)."""
        check_text("user_id", user_id)
        check_text("conversation_id", conversation_id)
        seq = await self._value(
            f"SELECT seq FROM {self._read} WHERE user_id = $1 AND conversation_id = $2",
            user_id,
            conversation_id,
        )
        return int(seq or 0)

    async def set_read(self, user_id: str, conversation_id: str, seq: int) -> int:
        """Raise the read watermark to ``seq`` (capped at the last seq); the result."""
        check_text("user_id", user_id)
        check_text("conversation_id", conversation_id)
        check_int("seq", seq, minimum=0)
        return await self._raise_watermark(
            self._read, ("user_id", "conversation_id"), (user_id, conversation_id), seq
        )

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        """The user's conversations, the most recently active first."""
        check_text("user_id", user_id)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT c.conversation_id, c.last_seq, COALESCE(r.seq, 0),"
                f" (SELECT count(*) FROM {self._msgs} u"
                "   WHERE u.conversation_id = c.conversation_id"
                "   AND u.seq > COALESCE(r.seq, 0) AND u.sender_id <> mb.user_id),"
                f" COALESCE((SELECT min(o.user_id) FROM {self._members} o"
                "   WHERE o.conversation_id = c.conversation_id AND o.user_id <> mb.user_id),"
                "   mb.user_id),"
                f" {_M_COLUMNS}"
                f" FROM {self._members} mb"
                f" JOIN {self._conv} c ON c.conversation_id = mb.conversation_id"
                f" LEFT JOIN {self._read} r ON r.user_id = mb.user_id"
                "  AND r.conversation_id = mb.conversation_id"
                f" LEFT JOIN {self._msgs} m ON m.conversation_id = c.conversation_id"
                "  AND m.seq = c.last_seq"
                " WHERE mb.user_id = $1"
                " ORDER BY COALESCE(m.send_time, 0) DESC, c.conversation_id",
                user_id,
            )
        return [
            ConversationSummary(
                conversation_id=str(row[0]),
                peer_id=str(row[4]),
                last_seq=int(row[1]),
                read_seq=int(row[2]),
                unread=int(row[3]),
                last_message=None if row[5] is None else _row_to_message(row, 5),
            )
            for row in rows
        ]
