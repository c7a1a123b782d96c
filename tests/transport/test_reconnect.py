"""Reconnect and resend: the connection dies under the client with messages unacked; the
client reconnects with backoff and resends them with their ids; the server dispatches
each message exactly once."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest
from tests.transport.helpers import make_app

import imkit
from imkit import AckMode
from imkit.testing import MemoryByteStream, MemoryServer

pytestmark = pytest.mark.anyio


class LossyLink(anyio.abc.ByteStream):
    """A client-side stream that can lose bytes in either direction, then be cut."""

    def __init__(self, inner: MemoryByteStream) -> None:
        self.inner = inner
        self.drop_out = False
        self.drop_in = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            data = await self.inner.receive(max_bytes)
            if not self.drop_in:
                return data

    async def send(self, item: bytes) -> None:
        if not self.drop_out:
            await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("mode", [AckMode.ONLY, AckMode.RIGOR])
async def test_unacked_messages_are_resent_and_dispatched_once(mode: AckMode) -> None:
    app, seen = make_app(ack_mode=mode)
    links: list[LossyLink] = []
    with anyio.fail_after(15):
        async with MemoryServer(app) as server:

            async def open_link() -> anyio.abc.ByteStream:
                links.append(LossyLink(server.open_stream()))
                return links[-1]

            client = imkit.Client(
                "ws://imkit.test/ws?userId=alice",
                stream_factory=open_link,
                reconnect_delay=0.05,
                keepalive=None,
            )
            async with client, anyio.create_task_group() as tg:
                for n in range(3):  # delivered normally
                    await client.send("count", n, message_id=f"m{n}")
                await anyio.wait_all_tasks_blocked()  # RigorAck: m2's confirmation is out
                link = links[-1]
                link.drop_out = True  # these never reach the server
                for n in (3, 4):
                    tg.start_soon(lambda n=n: client.send("count", n, message_id=f"m{n}"))
                await anyio.sleep(0.05)
                link.drop_out, link.drop_in = False, True  # these arrive; their acks are lost
                for n in (5, 6):
                    tg.start_soon(lambda n=n: client.send("count", n, message_id=f"m{n}"))
                await anyio.wait_all_tasks_blocked()  # in memory: everything arrived
                if mode is AckMode.ONLY:  # acked and dispatched at once; only the acks lost
                    assert seen.dispatched["alice", "m5"] == seen.dispatched["alice", "m6"] == 1
                else:  # RigorAck waits for a confirmation that cannot come before the cut
                    assert seen.dispatched["alice", "m5"] == seen.dispatched["alice", "m6"] == 0
                assert seen.dispatched["alice", "m3"] == 0
                link.inner.cut()  # the network fails under the client
            # Every send() above returned: each message was acked after the reconnect.
            assert client.connections == 2
            assert len(links) == 2
            assert [seen.dispatched["alice", f"m{n}"] for n in range(7)] == [1] * 7
            assert sorted(d for u, d in seen.order if u == "alice") == list(range(7))


async def test_client_gives_up_after_max_reconnect_attempts() -> None:
    app, _seen = make_app()
    attempts = 0
    with anyio.fail_after(10):
        async with MemoryServer(app) as server:

            async def flaky() -> anyio.abc.ByteStream:
                nonlocal attempts
                attempts += 1
                if attempts > 1:
                    raise OSError("connection refused")
                return server.open_stream()

            client = imkit.Client(
                "ws://imkit.test/ws?userId=z",
                stream_factory=flaky,
                reconnect_delay=0.01,
                max_reconnect_attempts=3,
            )
            async with client:
                server.streams[-1].cut()
                with pytest.raises(imkit.ConnectionClosed) as closed:
                    await client.receive()
                assert "gave up" in closed.value.reason
                with pytest.raises(imkit.ConnectionClosed):
                    await client.send("echo", 1)
    assert attempts == 4  # the first connection, then three failed attempts


async def test_reconnect_after_server_restart_resends_in_flight() -> None:
    """A server that goes away (1001) and comes back: the client reconnects on its own."""
    app, seen = make_app()
    with anyio.fail_after(10):
        async with MemoryServer(app) as first:
            servers = [first]

            async def open_stream() -> anyio.abc.ByteStream:
                return servers[-1].open_stream()

            client = imkit.Client(
                "ws://imkit.test/ws?userId=al", stream_factory=open_stream, reconnect_delay=0.01
            )
            async with client:
                await client.send("count", 1, message_id="before")
                async with MemoryServer(app) as second:
                    servers.append(second)
                    await first.drain()  # closes with 1001: the client reconnects to "second"
                    assert client.last_close is not None and client.last_close.code == 1001
                    await client.send("count", 2, message_id="after")
                    assert len(second.sessions("al")) == 1
    assert seen.dispatched["al", "before"] == 1 and seen.dispatched["al", "after"] == 1
