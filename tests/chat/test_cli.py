"""The ``imkit`` command line, run as real processes: ``token``, ``serve``, ``chat``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from imkit.auth import TokenAuth, mint_token
from imkit.chat.client import ChatClient
from imkit.chat.ids import private_conversation_id
from imkit.transport.client import connect

from .test_service_helpers import SRC, collect, imkit_serve

pytestmark = pytest.mark.anyio

SECRET = "a test secret of more than 16 bytes"
ENV = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the processes under test run their own event loops


async def run_imkit(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m imkit ARGS``, to completion."""
    return await anyio.run_process([sys.executable, "-m", "imkit", *args], env=ENV, check=False)


async def test_token_prints_a_token_that_token_auth_accepts() -> None:
    with anyio.fail_after(20):
        done = await run_imkit("token", "--user", "alice", "--secret", SECRET, "--device", "p1")
        assert done.returncode == 0
        token = done.stdout.decode().strip()
        identity = TokenAuth(SECRET).verify(token)
        assert (identity.user_id, identity.device_id) == ("alice", "p1")
        assert identity.expires_at is not None, "tokens expire by default (--ttl)"

        refused = await run_imkit("token", "--user", "alice")
        assert refused.returncode != 0
        assert b"secret" in refused.stderr, "it says what is missing"
        short = await run_imkit("token", "--user", "alice", "--secret", "short")
        assert short.returncode != 0 and b"16 bytes" in short.stderr


async def test_serve_with_token_auth_refuses_a_missing_or_bad_token_with_401(
    tmp_path: Path,
) -> None:
    args = ("--auth", "token", "--secret", SECRET, "--db", str(tmp_path / "chat.db"))
    with anyio.fail_after(30):
        async with imkit_serve(tmp_path, *args) as (_process, port):
            url = f"ws://127.0.0.1:{port}/ws"
            for query in ("", "?token=", "?token=not.a.token", "?userId=alice"):
                with pytest.raises(InvalidStatus) as refused:
                    async with ws_connect(url + query):
                        pass
                assert refused.value.response.status_code == 401, query
            forged = mint_token("another secret of 16+ bytes", "alice")
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(f"{url}?token={forged}"):
                    pass
            assert refused.value.response.status_code == 401
            async with connect(url, token=mint_token(SECRET, "alice")) as client:
                answer = await ChatClient(client, user_id="alice").send("bob", "signed in")
                assert answer["seq"] == 1


async def read_until(out: TextReceiveStream, lines: list[str], needle: str) -> None:
    """Read the process's output into ``lines`` until a line contains ``needle``."""
    buffer = ""
    while not any(needle in line for line in lines):
        buffer += await out.receive()
        *complete, buffer = buffer.split("\n")
        lines.extend(complete)


async def test_chat_prints_offline_messages_on_connect_and_sends_a_line(tmp_path: Path) -> None:
    """``imkit chat`` as Bob (stdin piped): Alice's offline messages are printed when it
    connects; a line typed on stdin reaches Alice; end of input quits."""
    args = ("--auth", "token", "--secret", SECRET, "--db", str(tmp_path / "chat.db"))
    with anyio.fail_after(40):
        async with imkit_serve(tmp_path, *args) as (_process, port):
            url = f"ws://127.0.0.1:{port}/ws"
            async with connect(url, token=mint_token(SECRET, "alice")) as client:
                alice = ChatClient(client, user_id="alice")
                for text in ("first", "second <b>bold</b>", "third \u202e"):
                    await alice.send("bob", text)
                command = [sys.executable, "-m", "imkit", "chat", "--url", url]
                command += ["--user", "bob", "--to", "alice", "--secret", SECRET]
                chat: Process = await anyio.open_process(command, env=ENV)
                async with chat:
                    assert chat.stdout is not None and chat.stdin is not None
                    out = TextReceiveStream(chat.stdout)
                    lines: list[str] = []
                    await read_until(out, lines, "third")
                    assert lines[0].startswith("connected to ")
                    assert lines[1:] == [
                        "[1] alice: first",
                        "[2] alice: second <b>bold</b>",
                        "[3] alice: third \u202e",
                    ]
                    await chat.stdin.send(b"hello alice\n")
                    await read_until(out, lines, "me: hello alice")
                    assert lines[-1] == "[4] me: hello alice"
                    (reply,) = await collect(alice, 1)
                    assert (reply["seq"], reply["sendId"], reply["msg"]["content"]) == (
                        4,
                        "bob",
                        "hello alice",
                    )
                    await chat.stdin.aclose()
                    assert await chat.wait() == 0
                log = await client.request(
                    "conversation.getChatLog",
                    {"conversationId": private_conversation_id("alice", "bob")},
                )
                assert [m["seq"] for m in log["list"]] == [1, 2, 3, 4]
