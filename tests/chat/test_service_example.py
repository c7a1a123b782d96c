"""``examples/private_chat/server.py`` starts, refuses strangers, serves a chat, and
stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from imkit.auth import mint_token
from imkit.chat.client import ChatClient
from imkit.exceptions import ConnectionClosed
from imkit.transport.client import connect

from .test_service_helpers import SRC, collect

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "private_chat" / "server.py"
SECRET = "the example's secret, 16+ bytes"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the example runs in its own process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_serving(url: str, token: str) -> None:
    """Return once the example accepts a chat connection (it starts in well under 10 s)."""
    with anyio.fail_after(10):
        while True:
            try:
                async with connect(url, token=token, reconnect=False):
                    return
            except ConnectionClosed:  # not listening yet
                await anyio.sleep(0.05)


async def test_example_server_serves_a_private_chat(tmp_path: Path) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    env = {**os.environ, "PYTHONPATH": SRC, "IMKIT_SECRET": SECRET}
    command = [sys.executable, str(EXAMPLE), "--port", str(port), "--db", str(tmp_path / "x.db")]
    with anyio.fail_after(30):
        async with await anyio.open_process(command, env=env) as process:
            try:
                await wait_until_serving(url, mint_token(SECRET, "carol"))
                async with connect(url, token=mint_token(SECRET, "alice")) as alice_client:
                    alice = ChatClient(alice_client, user_id="alice")
                    assert (await alice.send("bob", "offline hello"))["seq"] == 1
                    for query in ("", f"?token={mint_token('not the secret!!', 'bob')}"):
                        with pytest.raises(InvalidStatus) as refused:
                            async with ws_connect(url + query):
                                pass
                        assert refused.value.response.status_code == 401
                    async with connect(url, token=mint_token(SECRET, "bob")) as bob_client:
                        bob = ChatClient(bob_client, user_id="bob")
                        (offline,) = await collect(bob, 1)
                        assert (offline["sendId"], offline["msg"]["content"]) == (
                            "alice",
                            "offline hello",
                        )
                        await bob.send("alice", "hi alice")
                        (reply,) = await collect(alice, 1)
                        assert (reply["seq"], reply["msg"]["content"]) == (2, "hi alice")
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
