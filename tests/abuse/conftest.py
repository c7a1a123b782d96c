"""The abuse tests run on asyncio: the external clients (websockets, aiohttp) need it."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
