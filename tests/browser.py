"""Chromium for the browser tests: Debian's binary driven by Playwright, never
``playwright install``.

:func:`require_browser` returns Playwright's async API, or skips the calling test with
the reason (fails instead under ``IMKIT_REQUIRE_SERVICES=1``, as the services do).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from tests.services import services_required

__all__ = ("CHROMIUM", "CHROMIUM_ARGS", "require_browser")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_browser() -> Any:
    """The ``playwright.async_api`` module, or skip (fail under IMKIT_REQUIRE_SERVICES=1)."""
    problem = None
    try:
        from playwright import async_api
    except ImportError as exc:  # pragma: no cover - depends on the environment
        problem = f"the playwright package is not installed ({exc})"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is not installed (apt-get install chromium)"
    if problem is not None:
        if services_required():
            pytest.fail(f"browser test cannot run: {problem} (IMKIT_REQUIRE_SERVICES=1)")
        pytest.skip(f"browser test skipped: {problem}")
    return async_api
