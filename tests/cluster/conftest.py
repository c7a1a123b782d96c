"""Fixtures of the cluster tests: a real Redis and a real PostgreSQL on 127.0.0.1.

Each test gets its own Redis key prefix and its own PostgreSQL schema, both removed
afterwards. Skipped when a service is unreachable, unless ``IMKIT_REQUIRE_SERVICES=1``
(CI), which makes it fail.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg  # type: ignore[import-untyped,unused-ignore]
import pytest
import redis

from cluster.harness import Services
from services import require_postgres_dsn, require_redis_url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py and asyncpg are asyncio libraries


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    """A synchronous Redis client: inspect keys, kill the nodes' connections."""
    with redis.Redis.from_url(require_redis_url(), decode_responses=True) as client:
        yield client


@pytest.fixture
async def services(admin: redis.Redis) -> AsyncIterator[Services]:
    """A unique Redis key prefix and PostgreSQL schema, deleted after the test."""
    dsn = require_postgres_dsn()
    tag = uuid.uuid4().hex[:12]
    value = Services(
        redis_url=require_redis_url(),
        dsn=dsn,
        schema=f"imkit_cluster_{tag}",
        prefix=f"imkit-cluster-{tag}",
    )
    yield value
    keys = list(admin.scan_iter(f"{value.prefix}:*"))
    if keys:
        admin.delete(*keys)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{value.schema}" CASCADE')
    finally:
        await conn.close()
