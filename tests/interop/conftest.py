"""Interop tests: clients imkit did not write (websockets, aiohttp, Chromium) against
imkit's server. These clients are asyncio libraries, so the tests run on asyncio only."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """websockets, aiohttp and playwright run on asyncio."""
    return "asyncio"
