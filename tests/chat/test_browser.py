"""Two people chat through the page at ``/`` in a real browser (Chromium via Playwright).

``imkit serve --auth dev`` runs as a process on a SQLite file in ``tmp_path``. Alice and
Bob each open the page; they exchange messages; Bob closes his page, Alice writes, and
Bob's reopened page shows what he missed. The test reads the DOM: ``.msg`` elements with
``data-seq``, and ``#status[data-state]`` for the connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.browser import CHROMIUM, CHROMIUM_ARGS, require_browser

from .test_service_helpers import imkit_serve, server_log

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

SHOWN = """() => Array.from(document.querySelectorAll('#log .msg[data-seq]'),
    el => [Number(el.dataset.seq), el.dataset.from, el.textContent, el.dataset.state])"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio


@pytest.mark.parametrize("ack_mode", ["only", "rigor", "none"])
async def test_two_pages_chat_and_a_reopened_page_shows_what_it_missed(
    tmp_path: Path, ack_mode: str
) -> None:
    """In each ack mode (the page acks, confirms or stays silent accordingly)."""
    async_api = require_browser()
    args = ("--auth", "dev", "--db", str(tmp_path / "chat.db"), "--ack", ack_mode)
    with anyio.fail_after(60):
        async with (
            imkit_serve(tmp_path, *args) as (_process, port),
            async_api.async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                root = f"http://127.0.0.1:{port}/"
                errors: list[str] = []

                async def open_page(user: str, peer: str) -> Any:
                    page = await browser.new_page()
                    page.on("pageerror", lambda exc: errors.append(f"{user}: {exc}"))
                    await page.goto(f"{root}?user={user}&peer={peer}")
                    await page.wait_for_selector('#status[data-state="open"]', timeout=10_000)
                    return page

                async def say(page: Any, text: str, seq: int) -> None:
                    await page.fill("#text", text)
                    await page.press("#text", "Enter")
                    stored = f'#log .msg.mine[data-seq="{seq}"][data-state="stored"]'
                    await page.wait_for_selector(stored, timeout=10_000)

                alice = await open_page("alice", "bob")
                bob = await open_page("bob", "alice")
                await say(alice, "hello bob", 1)
                await bob.wait_for_selector('#log .msg[data-seq="1"]', timeout=10_000)
                await say(bob, "hi alice", 2)
                await alice.wait_for_selector('#log .msg[data-seq="2"]', timeout=10_000)

                await bob.close()
                await anyio.sleep(0.3)  # the server sees Bob go
                awkward = [
                    "while you were away",
                    '<img src=x onerror="window.pwned=1">',
                    "emoji \U0001f600 and rtl \u202eabc",
                ]
                for seq, text in enumerate(awkward, start=3):
                    await say(alice, text, seq)

                bob = await open_page("bob", "alice")
                # The catch-up pushes 3-5; the page's history request brings 1-2. Either
                # may come first: wait for both ends.
                await bob.wait_for_selector('#log .msg[data-seq="5"]', timeout=10_000)
                await bob.wait_for_selector('#log .msg[data-seq="1"]', timeout=10_000)
                shown = await bob.evaluate(SHOWN)
                assert [(seq, sender) for seq, sender, _text, _state in shown] == [
                    (1, "alice"),
                    (2, "bob"),
                    (3, "alice"),
                    (4, "alice"),
                    (5, "alice"),
                ]
                texts = [text for _seq, _sender, text, _state in shown]
                assert texts == [
                    "alice: hello bob",
                    "me: hi alice",
                    *(f"alice: {text}" for text in awkward),
                ]
                assert await bob.evaluate("() => window.pwned") is None, "shown as text"
                # Bob's page marked the conversation read: Alice's page shows the receipt.
                await alice.wait_for_selector('#log .msg.mine.read[data-seq="5"]', timeout=10_000)
                alice_view = await alice.evaluate(SHOWN)
                assert [row[0] for row in alice_view] == [1, 2, 3, 4, 5]
                assert {row[3] for row in alice_view} == {"stored"}
                assert errors == []
            finally:
                await browser.close()
        assert "Traceback" not in await server_log(tmp_path)
