"""Helpers shared by the chat tests (this module holds no tests).

Every server here is a real :class:`~imkit.transport.server.Server` on a loopback port
(or a real ``imkit serve`` process), running :func:`~imkit.chat.app.create_chat_app` with
development authentication (``?userId=``) and no rate limit, so a test can send a
thousand messages quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.to_thread
from anyio.abc import Process

from imkit.auth import InsecureDevAuth
from imkit.chat.app import create_chat_app
from imkit.chat.client import ChatClient
from imkit.chat.service import ChatService
from imkit.chat.store import MessageStore
from imkit.core.peer import PeerOptions
from imkit.core.server import App
from imkit.transport.client import Client, connect
from imkit.transport.server import Server

__all__ = (
    "ChatServer",
    "chat_client",
    "chat_pair",
    "chat_server",
    "collect",
    "imkit_serve",
    "nothing_more",
    "server_log",
    "ws_url",
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


class ChatServer:
    """A running chat server: its URL, app, service and transport server."""

    def __init__(self, url: str, app: App, service: ChatService, server: Server) -> None:
        self.url = url
        self.app = app
        self.service = service
        self.server = server


def ws_url(base: str, user: str, device: str = "") -> str:
    """The WebSocket URL that logs in as ``user`` (dev auth), optionally as ``device``."""
    query = {"userId": user, **({"deviceId": device} if device else {})}
    return f"{base}?{urlencode(query)}"


@asynccontextmanager
async def chat_server(
    store: MessageStore, *, shutdown_timeout: float = 5.0, **options: Any
) -> AsyncIterator[ChatServer]:
    """Serve a chat app on ``store`` at ``ws://127.0.0.1:<port>/ws`` for the block.

    ``options`` go to :func:`create_chat_app` (``ack_mode``, ``login_policy``, ...).
    """
    options.setdefault("options", PeerOptions(rate_limit=None))
    app, service = create_chat_app(
        store, auth=InsecureDevAuth(quiet=True), auth_kind="dev", **options
    )
    server = Server(app, shutdown_timeout=shutdown_timeout)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve, "127.0.0.1", 0)
        try:
            yield ChatServer(f"ws://127.0.0.1:{port}/ws", app, service, server)
        finally:
            server.shutdown()


@asynccontextmanager
async def chat_client(
    base: str, user: str, device: str = "", *, seen: dict[str, int] | None = None, **options: Any
) -> AsyncIterator[ChatClient]:
    """A :class:`ChatClient` connected as ``user`` for the block (``options`` go to
    :func:`~imkit.transport.client.connect`)."""
    async with connect(ws_url(base, user, device), **options) as client:
        yield ChatClient(client, user_id=user, seen=seen)


@asynccontextmanager
async def chat_pair(
    store: MessageStore,
    *,
    users: tuple[str, str] = ("alice", "bob"),
    seconds: float = 10.0,
    **options: Any,
) -> AsyncIterator[tuple[ChatServer, ChatClient, ChatClient]]:
    """A :func:`chat_server` on ``store`` and a :func:`chat_client` for each of the two
    ``users``, all within ``seconds`` (:func:`anyio.fail_after`); ``options`` go to
    :func:`chat_server`."""
    first, second = users
    with anyio.fail_after(seconds):
        async with (
            chat_server(store, **options) as srv,
            chat_client(srv.url, first) as one,
            chat_client(srv.url, second) as two,
        ):
            yield srv, one, two


async def collect(chat: ChatClient, count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages :meth:`ChatClient.messages` hands out."""
    out: list[dict[str, Any]] = []
    if count <= 0:
        return out
    async for message in chat.messages():
        out.append(message)
        if len(out) == count:
            break
    return out


async def nothing_more(client: Client, seconds: float = 0.3) -> list[Any]:
    """Every push that arrives on ``client`` within ``seconds`` (expected: none)."""
    extra: list[Any] = []
    with anyio.move_on_after(seconds):
        while True:
            extra.append((await client.receive()).data)
    return extra


@asynccontextmanager
async def imkit_serve(
    tmp_path: Path, *args: str, name: str = "server"
) -> AsyncIterator[tuple[Process, int]]:
    """Run ``python -m imkit serve --port 0 ...`` for the block; yields the process and
    its port (read from ``--port-file``); kills it if it still runs at the end. Its
    output goes to ``<tmp_path>/<name>.log``."""
    port_file = anyio.Path(tmp_path / f"{name}.port")
    log_path = anyio.Path(tmp_path / f"{name}.log")
    await port_file.unlink(missing_ok=True)
    log = await anyio.to_thread.run_sync(open, str(log_path), "ab")
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "imkit", "serve", "--port", "0"]
    command += ["--port-file", str(port_file), *args]
    try:
        process = await anyio.open_process(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()  # the child has its own descriptor
    try:
        with anyio.fail_after(20):
            while not await port_file.exists():
                if process.returncode is not None:
                    output = await log_path.read_text(errors="replace")
                    raise AssertionError(f"imkit serve exited with {process.returncode}: {output}")
                await anyio.sleep(0.02)
        yield process, int(await port_file.read_text())
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.aclose()


async def server_log(tmp_path: Path, name: str = "server") -> str:
    """What the ``imkit serve`` process ``name`` wrote."""
    return await anyio.Path(tmp_path / f"{name}.log").read_text(errors="replace")


def test_chat_client_message_ids_are_unique_and_sort_in_sending_order() -> None:
    """ChatClient's msgIds: 30 hex digits, unique, their time prefix (µs) never goes back
    from one to the next: compared as strings they follow the order of sending, which
    keeps the store's index of (conversation, sender, msgId) appending, not scattering."""
    from imkit.chat.client import new_message_id

    ids = [new_message_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 30 and int(i, 16) >= 0 for i in ids)
    prefixes = [i[:14] for i in ids]
    assert prefixes == sorted(prefixes)
    assert abs(int(ids[-1][:14], 16) / 1e6 - time.time()) < 60
