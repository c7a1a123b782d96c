"""A real browser: Chromium (through Playwright) talks to imkit's server from a page the
server itself serves, and a page from another origin is refused before the upgrade.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``); never ``playwright install``.
Skipped without it, unless ``IMKIT_REQUIRE_SERVICES=1`` (then it fails).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tests.browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.transport.helpers import Collected, make_app, serve_tcp

import imkit

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

# The page opens ws://<its own host>/ws (or the ?target= URL), sends one Data frame,
# acks every push, and writes each event into the DOM for the test to read.
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>imkit</title></head><body>
<ul id="log"></ul>
<script>
const params = new URLSearchParams(location.search);
const log = (kind, text) => {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  document.getElementById("log").appendChild(li);
};
const target = params.get("target") || `ws://${location.host}/ws`;
const ws = new WebSocket(`${target}?userId=${encodeURIComponent(params.get("user"))}`);
ws.onopen = () => {
  log("open", "open");
  ws.send(JSON.stringify({frameType: 0, id: "b1", method: "echo", data: {hello: "browser"}}));
};
ws.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  if (frame.frameType === 2) {
    log("ack", `${frame.id}:${frame.ackSeq}`);
  } else if (frame.frameType === 0) {
    ws.send(JSON.stringify({frameType: 2, id: frame.id, ackSeq: 1}));
    const kind = frame.replyTo ? "reply" : "push";
    log(kind, `${JSON.stringify(frame.data)} from ${frame.formId || "server"}`);
  } else if (frame.frameType === 9) {
    log("err", frame.data.code);
  }
};
ws.onclose = (event) => log("close", String(event.code));
</script></body></html>
"""


@asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    async_playwright = require_browser().async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            yield page
        finally:
            await browser.close()


def app_with_page(**options: Any) -> tuple[imkit.App, Collected, Collected]:
    app, _seen = make_app(**options)
    delivered = Collected()
    connected = Collected()

    @app.page("/")
    async def index(request: imkit.HandshakeRequest) -> imkit.HttpResponse:
        return imkit.HttpResponse(200, PAGE, content_type="text/html; charset=utf-8")

    @app.on_connect
    async def on_connect(session: imkit.Session, server: imkit.ServerAPI) -> None:
        connected.add(session.user_id)

    @app.on_delivered
    async def on_delivered(session: imkit.Session, frame: imkit.Frame) -> None:
        delivered.add((session.user_id, frame.method, frame.data))

    return app, delivered, connected


async def test_chromium_page_talks_to_the_server_that_served_it() -> None:
    app, delivered, connected = app_with_page()
    with anyio.fail_after(45):
        async with serve_tcp(app) as server, browser_page() as page:
            await page.goto(f"http://127.0.0.1:{server.port}/?user=alice")
            # Same origin (no allowlist): accepted; the Data frame is acked, then answered.
            await page.wait_for_selector("li.reply")
            assert await page.inner_text("li.ack") == "b1:1"
            assert await page.inner_text("li.reply") == '{"hello":"browser"} from server'
            await connected.wait_until(lambda users: users == ["alice"])
            # A push from a Python client reaches the page, which acks it.
            url = f"ws://127.0.0.1:{server.port}/ws?userId=bob"
            async with imkit.connect(url) as bob:
                await bob.send("relay", {"to": "alice", "text": "hi from python"})
                await page.wait_for_selector("li.push")
                text = await page.inner_text("li.push")
                assert text == '{"to":"alice","text":"hi from python"} from bob'
                await delivered.wait_until(
                    lambda d: ("alice", "chat", {"to": "alice", "text": "hi from python"}) in d
                )
            assert await page.locator("li.err").count() == 0
            assert await page.locator("li.close").count() == 0


async def test_cross_site_page_is_refused_and_sees_1006() -> None:
    """CSWSH: a page from another origin (another port) opens a WebSocket to a server with
    an origin allowlist. The server answers 403 before the upgrade; the page sees only
    close code 1006; nothing reached the application (no auth call, no on_connect)."""
    calls: list[str] = []

    class RecordingAuth:
        async def authenticate(self, request: imkit.HandshakeRequest) -> imkit.Identity:
            calls.append(request.query.get("userId", ""))
            return imkit.Identity(request.query.get("userId", "anon"))

    target_app, _delivered, connected = app_with_page(auth=RecordingAuth())
    evil_app, _d, _c = app_with_page()
    with anyio.fail_after(45):
        async with (
            serve_tcp(target_app) as target,
            serve_tcp(evil_app) as evil,
            browser_page() as page,
        ):
            own_origin = f"http://127.0.0.1:{target.port}"
            target_app.allowed_origins = (own_origin,)  # before any connection is made
            ws_target = f"ws://127.0.0.1:{target.port}/ws"
            await page.goto(f"http://127.0.0.1:{evil.port}/?user=mallory&target={ws_target}")
            await page.wait_for_selector("li.close")
            assert await page.inner_text("li.close") == "1006"
            assert await page.locator("li.open").count() == 0
            assert calls == [] and connected == []
            # The same page from the allowed origin connects (the allowlist is not a wall).
            await page.goto(f"{own_origin}/?user=alice")
            await page.wait_for_selector("li.reply")
            assert calls == ["alice"]
