"""examples/echo_chat.py: its routes through imkit.testing, and run() as a real process
that shuts down gracefully on SIGTERM."""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
from pathlib import Path
from types import ModuleType

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import imkit
from imkit.testing import MemoryServer

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "echo_chat.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echo_chat_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_routes() -> None:
    example = load_example()
    with anyio.fail_after(10):
        async with MemoryServer(example.app) as server:
            async with (
                server.connect(user_id="alice") as alice,
                server.connect(user_id="bob") as bob,
            ):
                assert (await alice.receive()).data == {"you": "alice"}
                assert (await bob.receive()).data == {"you": "bob"}
                assert await alice.request("echo", "hello") == "hello"
                answer = await alice.request("chat.send", {"to": "bob", "text": "hi"})
                assert answer == {"delivered_to": 1}
                message = await bob.receive()
                assert (message.method, message.data) == ("chat.message", {"text": "hi"})
                with pytest.raises(imkit.RequestFailed) as failed:
                    await alice.request("chat.send", {"to": 5})
                assert failed.value.code == "bad_request"


async def test_run_serves_until_sigterm_then_closes_1001() -> None:
    with anyio.fail_after(20):
        async with await anyio.open_process(
            [sys.executable, str(EXAMPLE), "--port", "0"], stdout=None
        ) as process:
            assert process.stderr is not None
            lines = BufferedByteReceiveStream(process.stderr)
            port = None
            while port is None:
                line = await lines.receive_until(b"\n", 65536)
                found = re.search(rb"imkit serving on 127\.0\.0\.1:(\d+)", line)
                port = int(found.group(1)) if found else None
            url = f"ws://127.0.0.1:{port}/ws?userId=carol"
            async with imkit.connect(url, reconnect=False) as carol:
                assert (await carol.receive()).data == {"you": "carol"}
                process.send_signal(signal.SIGTERM)
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await carol.receive()
                assert closed.value.code == 1001
            assert await process.wait() == 0
