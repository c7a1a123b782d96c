"""The tutorial's chat server and client (examples/tutorial_chat.py) on loopback."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from tests.docs.helpers import assert_blocks_are_example_code, load_example

import imkit

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_tutorial_shows_the_example_code() -> None:
    assert_blocks_are_example_code("tutorial.md", "tutorial_chat")


async def test_echo_and_chat_between_two_users(monkeypatch: pytest.MonkeyPatch) -> None:
    tutorial = load_example("tutorial_chat")
    printed: list[str] = []
    changed = anyio.Event()

    def fake_print(*args: Any) -> None:
        nonlocal changed
        printed.append(" ".join(map(str, args)))
        changed.set()
        changed = anyio.Event()

    monkeypatch.setattr(tutorial, "print", fake_print, raising=False)

    async def printed_line(line: str) -> None:
        while line not in printed:
            await changed.wait()

    alice_done = anyio.Event()

    async def alice_terminal(url: str) -> None:
        # as `python examples/tutorial_chat.py alice bob "hello bob"`
        await tutorial.chat(url, "alice", "bob", "hello bob")
        alice_done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(imkit.serve, tutorial.app)
            url = f"ws://127.0.0.1:{port}/ws"
            async with imkit.connect(f"{url}?userId=bob", reconnect=False) as bob:
                assert await bob.request("echo", {"n": 1}) == {"n": 1}
                tg.start_soon(alice_terminal, url)
                push = await bob.receive()
                assert push.method == "chat.message"
                assert push.data == {"from": "alice", "text": "hello bob"}
                await printed_line("sent to 1 connection(s) of bob")
                answer = await bob.request("chat.send", {"to": "alice", "text": "hi alice"})
                assert answer == {"reached": 1}
                await printed_line("bob: hi alice")
                nobody = await bob.request("chat.send", {"to": "carol", "text": "?"})
                assert nobody == {"reached": 0}
                # alice logs in again elsewhere: the "single" login policy closes her first
                # connection with 4000, after which the client does not reconnect, and
                # chat() returns normally.
                async with imkit.connect(f"{url}?userId=alice", reconnect=False):
                    await alice_done.wait()
            tg.cancel_scope.cancel()
