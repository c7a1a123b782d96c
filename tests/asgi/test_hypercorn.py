"""The ASGI adapter under hypercorn, on asyncio and on trio (``docs/asgi.md`` names both):
a real server on 127.0.0.1, imkit clients, a request answered and a push relayed."""

from __future__ import annotations

import functools
import os
import socket
from typing import Any

import anyio
import pytest

import imkit
from imkit.transport.asgi import ASGIApp

hypercorn_config = pytest.importorskip("hypercorn.config")

pytestmark = pytest.mark.anyio


def chat_app() -> imkit.App:
    app = imkit.App(auth=imkit.InsecureDevAuth(quiet=True))

    @app.route("echo")
    async def echo(ctx: imkit.Context) -> None:
        await ctx.reply(ctx.data)

    @app.route("relay")
    async def relay(ctx: imkit.Context) -> None:
        reached = await ctx.server.send_to_users([ctx.data["to"]], "chat", ctx.data["text"])
        await ctx.reply({"reached": reached})

    return app


async def wait_listening(port: int) -> None:
    while True:
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            await anyio.sleep(0.02)
        else:
            await stream.aclose()
            return


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_hypercorn_serves_requests_and_pushes(anyio_backend: str) -> None:
    if anyio_backend == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve  # type: ignore[assignment]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config = hypercorn_config.Config()
    config.bind = [f"fd://{os.dup(listener.fileno())}"]  # hypercorn closes its copy
    config.accesslog = None
    stop = anyio.Event()
    serving: Any = functools.partial(serve, ASGIApp(chat_app()), config, shutdown_trigger=stop.wait)
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serving)
                await wait_listening(port)
                base = f"ws://127.0.0.1:{port}/ws"
                async with (
                    imkit.connect(f"{base}?userId=alice") as alice,
                    imkit.connect(f"{base}?userId=bob") as bob,
                ):
                    assert await alice.request("echo", {"n": 1}) == {"n": 1}
                    answer = await alice.request("relay", {"to": "bob", "text": "hello"})
                    assert answer == {"reached": 1}
                    pushed = await bob.receive()
                    assert (pushed.method, pushed.data) == ("chat", "hello")
                stop.set()
    finally:
        listener.close()
