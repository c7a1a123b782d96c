"""Raw mode (``Server(raw_handler=...)``): plain WebSocket messages, limits still enforced.

Driven by the ``websockets`` client against ``examples/echo_server.py``'s server and a
handler that fails.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from imkit import App, ConnLimits, Server

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "echo_server.py"


def load_echo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imkit_example_echo_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_raw_mode_echoes_text_as_text_and_binary_as_binary() -> None:
    echo = load_echo()
    server: Server = echo.build_server()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            async with ws_connect(f"ws://127.0.0.1:{port}/any/path", max_size=None) as ws:
                await ws.send("h\u00e9llo \U0001f600")
                assert await ws.recv() == "h\u00e9llo \U0001f600"
                await ws.send(b"\x00\xff binary")
                assert await ws.recv() == b"\x00\xff binary"
                await ws.send(["frag", "mented"])
                assert await ws.recv() == "fragmented"
                big = b"x" * (2 * 2**20)
                await ws.send(big)
                assert await ws.recv() == big
            server.shutdown()


async def test_raw_mode_enforces_conn_limits_and_closes_1011_on_handler_error() -> None:
    echo = load_echo()

    async def handler(session: Any, data: str | bytes) -> None:
        if data == "fail":
            raise RuntimeError("raw handler failure on purpose")
        session.send_raw(data)

    app = App(
        auth=echo.AnonymousAuth(),
        path=re.compile(r"/.*"),
        login_policy="multi",
        limits=ConnLimits(max_message_size=1024, ping_interval=None),
    )
    server = Server(app, raw_handler=handler, shutdown_timeout=1.0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send(b"a" * 1025)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send("ok")
                assert await ws.recv() == "ok"
                await ws.send("fail")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
            server.shutdown()
