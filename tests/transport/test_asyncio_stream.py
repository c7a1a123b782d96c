"""The lean asyncio socket stream the server uses on asyncio (real sockets on 127.0.0.1).

Each test accepts one connection through :func:`accept_stream` from an anyio listener, as
the server does, and talks to it with a plain anyio client stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from tests.transport.helpers import RawWS, make_app, serve_tcp

import imkit
from imkit import PeerOptions
from imkit.transport._asyncio_stream import (
    AsyncioSocketStream,
    _Flusher,
    _loop_clock,
    accept_stream,
    running_on_asyncio,
)
from imkit.transport._writer import abort_stream
from imkit.transport.session import ServerSession

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """The lean stream exists on asyncio only: the standard loop and uvloop (which
    ``imkit.run`` uses when it is installed; its transports are not asyncio's classes)."""
    return request.param


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[AsyncioSocketStream, anyio.abc.SocketStream]]:
    """(server side as the server accepts it, client side as a plain anyio stream)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            accepted: list[AsyncioSocketStream] = []

            async def accept() -> None:
                accepted.append(await accept_stream(listener))

            tg.start_soon(accept)
            client = await anyio.connect_tcp("127.0.0.1", port)
        server = accepted[0]
        try:
            yield server, client
        finally:
            await anyio.aclose_forcefully(client)
            await anyio.aclose_forcefully(server)


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (a socket state no event reports) until it holds (10 s at most)."""
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - the kernel's progress has no event
            await anyio.sleep(0.005)


async def read_exactly(stream: anyio.abc.ByteStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive()
    return bytes(data)


async def test_bytes_flow_both_ways_and_the_socket_has_no_nagle_delay() -> None:
    async with pair() as (server, client):
        await client.send(b"hello")
        assert await server.receive() == b"hello"
        await server.send(b"world")
        assert await read_exactly(client, 5) == b"world"
        sock = server.extra(SocketAttribute.raw_socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert server.extra(SocketAttribute.remote_address) == client.extra(
            SocketAttribute.local_address
        )
        assert server.extra(SocketAttribute.local_port) == client.extra(SocketAttribute.remote_port)
        assert server.extra(SocketAttribute.family) == socket.AF_INET


async def test_write_soon_sends_what_one_loop_iteration_queued_in_order() -> None:
    async with pair() as (server, client):
        drained: list[int] = []
        server.on_drained = lambda: drained.append(server.write_buffered)
        server.set_write_limit(1 << 20)
        for i in range(100):
            server.write_soon(b"%03d;" % i)
        assert server.write_buffered == 400  # queued, not written yet
        data = await read_exactly(client, 400)
        assert data == b"".join(b"%03d;" % i for i in range(100))
        assert server.write_buffered == 0
        assert drained, "the writer is told when the queue is written out"


async def test_the_streams_of_a_loop_are_flushed_in_one_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    async with pair() as (first, first_client), pair() as (second, second_client):
        scheduled: list[object] = []
        if not isinstance(loop, asyncio.BaseEventLoop):
            pytest.skip("uvloop's call_soon cannot be wrapped")
        call_soon = loop.call_soon

        def counting(callback: Callable[..., object], *args: object, **kw: object) -> object:
            scheduled.append(callback)
            return call_soon(callback, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(loop, "call_soon", counting)
        for i in range(3):
            first.write_soon(b"a%d;" % i)
            second.write_soon(b"b%d;" % i)
        monkeypatch.undo()
        assert len(scheduled) == 1
        assert await read_exactly(first_client, 9) == b"a0;a1;a2;"
        assert await read_exactly(second_client, 9) == b"b0;b1;b2;"


async def test_a_stream_whose_flush_fails_does_not_hold_back_the_others() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with pair() as (first, first_client), pair() as (second, second_client):

            def fail() -> None:
                raise RuntimeError("on_drained failed")

            first.on_drained = fail
            first.write_soon(b"first")
            second.write_soon(b"second")
            assert await read_exactly(first_client, 5) == b"first"
            with anyio.fail_after(5):
                assert await read_exactly(second_client, 6) == b"second"
            assert [type(c.get("exception")) for c in reported] == [RuntimeError]
            first.on_drained = lambda: None
            first.write_soon(b"again")  # the failure left it flushable
            with anyio.fail_after(5):
                assert await read_exactly(first_client, 5) == b"again"
    finally:
        loop.set_exception_handler(None)


class Producer:
    """An OutputProducer that queues what it was given since its last call."""

    def __init__(self, stream: AsyncioSocketStream) -> None:
        self.stream = stream
        self.made: list[bytes] = []
        self.calls = 0

    def make(self, data: bytes) -> None:
        self.made.append(data)
        self.stream.produce_soon(self)

    def produce_output(self) -> None:
        self.calls += 1
        self.stream.write_soon(b"".join(self.made))
        self.made.clear()


async def test_a_producer_queues_its_bytes_once_just_before_the_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifty messages made in one iteration: the producer is called once, as the stream
    flushes (not before), its bytes follow those queued with write_soon earlier, and
    they go out in the same flush: one callback scheduled, none for its write_soon."""
    loop = asyncio.get_running_loop()
    async with pair() as (server, client):
        if not isinstance(loop, asyncio.BaseEventLoop):
            pytest.skip("uvloop's call_soon cannot be wrapped")
        producer = Producer(server)
        scheduled: list[object] = []
        call_soon = loop.call_soon

        def counting(callback: Callable[..., object], *args: object, **kw: object) -> object:
            scheduled.append(callback)
            return call_soon(callback, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(loop, "call_soon", counting)
        server.write_soon(b"first;")
        for i in range(50):
            producer.make(b"%02d;" % i)
        assert producer.calls == 0 and server.producer is producer
        assert server.write_buffered == 6  # the producer's bytes are not queued yet
        expected = b"first;" + b"".join(b"%02d;" % i for i in range(50))
        assert await read_exactly(client, len(expected)) == expected
        monkeypatch.undo()
        assert producer.calls == 1 and server.producer is None
        flushes = [cb for cb in scheduled if getattr(cb, "__func__", None) is _Flusher._run]
        assert len(flushes) == 1
        producer.make(b"again;")  # due again once it was called
        assert await read_exactly(client, 6) == b"again;"
        assert producer.calls == 2


async def test_wait_flushed_writes_what_a_due_producer_makes() -> None:
    async with pair() as (server, client):
        producer = Producer(server)
        producer.make(b"made")
        await server.wait_flushed()  # calls the producer first: nothing is left behind
        assert producer.calls == 1 and server.write_buffered == 0
        assert await read_exactly(client, 4) == b"made"


@asynccontextmanager
async def open_client(app: imkit.App, user_id: str) -> AsyncIterator[RawWS]:
    """``app`` served on 127.0.0.1 (the lean stream), and a raw client of ``user_id``
    past its handshake; everything within 5 s."""
    async with serve_tcp(app) as server:
        assert server.port is not None
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            client = RawWS(stream)
            with anyio.fail_after(5):
                assert await client.handshake(f"/ws?userId={user_id}") == 101
                yield client


async def test_a_sessions_messages_of_one_iteration_reach_the_stream_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A route that sends thirty messages with ``send_now`` without awaiting: the session
    moves its output to the stream once, when the stream flushes; the client reads the
    thirty in order, then the route's reply."""
    app, _seen = make_app(options=PeerOptions(rate_limit=None))
    produced: list[int] = []
    original = ServerSession.produce_output

    def counting(session: ServerSession) -> None:
        produced.append(1)
        original(session)

    monkeypatch.setattr(ServerSession, "produce_output", counting)
    during: list[int] = []

    @app.route("burst")
    async def burst(ctx: imkit.Context) -> None:
        before = len(produced)
        for n in range(30):
            ctx.session.send_now("n", {"n": n}, acked=False)
        during.append(len(produced) - before)
        await ctx.reply("done")

    async with open_client(app, "bursty") as client:
        await client.send_json({"frameType": 0, "id": "b1", "method": "burst"})
        got = [await client.recv_json() for _ in range(32)]
    assert all(frame is not None for frame in got)
    assert got[0] is not None and (got[0]["frameType"], got[0]["id"]) == (2, "b1")  # the ack
    assert [f["data"] for f in got[1:31] if f is not None] == [{"n": n} for n in range(30)]
    assert got[31] is not None and (got[31]["data"], got[31]["replyTo"]) == ("done", "b1")
    assert during == [0], "nothing is moved to the stream while the route runs"
    assert produced, "the session's output went through produce_output"


async def test_messages_sent_just_before_a_close_reach_the_client_before_the_close() -> None:
    """A route sends five messages and closes the connection in the same iteration (its
    messages still wait to be moved to the stream): the client reads the five, in
    order, then the close frame."""
    app, _seen = make_app(options=PeerOptions(rate_limit=None))

    @app.route("bye")
    async def bye(ctx: imkit.Context) -> None:
        for n in range(5):
            ctx.session.send_now("n", {"n": n}, acked=False)
        await ctx.session.close(1000, "bye")

    async with open_client(app, "leaving") as client:
        await client.send_json({"frameType": 0, "id": "b1", "method": "bye"})
        got = [await client.recv_json() for _ in range(6)]
        closed = await client.wait_closed()
    assert got[0] is not None and (got[0]["frameType"], got[0]["id"]) == (2, "b1")  # the ack
    assert [f["data"] for f in got[1:] if f is not None] == [{"n": n} for n in range(5)]
    assert (closed.code, closed.reason) == (1000, "bye")


async def test_receive_splits_a_chunk_larger_than_max_bytes() -> None:
    async with pair() as (server, client):
        await client.send(b"abcdefgh")
        await until(lambda: server.unread >= 8)
        assert await server.receive(3) == b"abc"
        assert await server.receive(100) == b"defgh"
        assert server.unread == 0


async def test_a_client_that_floods_stops_being_read_at_the_read_limit() -> None:
    """Nobody reads the server side: it stops reading from the socket once the limit is
    buffered (TCP then pushes back on the client), and reads on once it is consumed."""
    async with pair() as (server, client):
        limit = server._max_read_buffer
        block = b"x" * 65536
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await client.send(block)
                sent += len(block)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await until(lambda: server.reading_paused)
            await anyio.sleep(0.2)
            # Bounded: the limit plus at most one read's worth.
            assert limit <= server.unread <= limit + 256 * 1024
            assert sent > server.unread  # the rest waits in the kernel buffers
            tg.cancel_scope.cancel()
        received = 0
        with anyio.fail_after(10):
            while received < sent:
                received += len(await server.receive())
        assert not server.reading_paused  # consumed: reading goes on


async def test_end_of_stream_comes_after_the_buffered_bytes() -> None:
    async with pair() as (server, client):
        await client.send(b"last words")
        await client.send_eof()
        assert await read_until_eof(server) == b"last words"
        # Our side stays open after the client's EOF: we can still answer.
        await server.send(b"bye")
        assert await read_exactly(client, 3) == b"bye"


async def read_until_eof(stream: anyio.abc.ByteStream) -> bytes:
    data = bytearray()
    with anyio.fail_after(5):
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return bytes(data)


async def test_send_eof_reaches_the_client_after_the_queued_bytes() -> None:
    async with pair() as (server, client):
        server.write_soon(b"queued")
        await server.send_eof()
        assert await read_until_eof(client) == b"queued"


async def test_wait_flushed_returns_once_the_kernel_took_everything() -> None:
    async with pair() as (server, client):
        big = b"y" * (8 * 2**20)  # more than the socket buffers hold
        server.set_write_limit(2**20)
        server.write_soon(big)
        done = anyio.Event()

        async def flush() -> None:
            await server.wait_flushed()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
            await anyio.sleep(0.2)
            assert not done.is_set(), "the client has not read: bytes are still queued"
            assert server.write_buffered > 0
            assert len(await read_exactly(client, len(big))) == len(big)
            with anyio.fail_after(5):
                await done.wait()
        assert server.write_buffered == 0


async def test_write_soon_says_whether_the_unwritten_bytes_are_within_the_limit() -> None:
    async with pair() as (server, client):
        assert server.write_soon(b"a" * 100) is True  # no limit set: always within
        await anyio.sleep(0.05)
        limit = 2**20
        server.set_write_limit(limit)
        assert server.write_soon(b"b" * (limit // 2)) is True
        assert server.write_soon(b"c" * (limit // 2)) is True  # exactly the limit
        assert server.write_soon(b"d") is False  # queued bytes alone pass it
        await read_exactly(client, 100 + limit + 1)
        await until(lambda: server.write_buffered == 0)
        assert server.write_soon(b"e" * 10) is True


async def test_write_soon_counts_the_bytes_the_transport_still_holds() -> None:
    """A few queued bytes pass the limit when the transport holds the rest (the client
    does not read): the check must ask the transport, not only count the queue."""
    async with pair() as (server, _client):
        server.write_soon(b"f" * (8 * 2**20))  # more than the socket buffers take
        await anyio.sleep(0.2)
        held = server.write_buffered  # what the transport holds: the kernel is full
        assert held > 2**20
        limit = held + 1000
        server.set_write_limit(limit)  # the transport holds more than half of it
        assert server.write_soon(b"g" * 1000) is True  # exactly the limit
        assert server.write_soon(b"h") is False
        assert server.write_soon(b"i") is False


async def test_a_slow_reader_is_reported_drained_only_when_it_catches_up() -> None:
    async with pair() as (server, client):
        limit = 2**20
        drained: list[int] = []
        server.set_write_limit(limit)
        server.write_soon(b"z" * (6 * 2**20))
        await anyio.sleep(0.2)
        server.on_drained = lambda: drained.append(server.write_buffered)
        assert server.write_buffered > limit // 2
        assert drained == []
        await read_exactly(client, 6 * 2**20)
        await until(lambda: bool(drained))
        assert drained[0] <= limit // 2


async def test_closing_with_unsent_bytes_drops_them() -> None:
    async with pair() as (server, client):
        big = 8 * 2**20
        server.write_soon(b"w" * big)
        await anyio.sleep(0.1)
        assert server.write_buffered > 0
        await server.aclose()
        got = 0
        with anyio.fail_after(5):
            while True:
                try:
                    got += len(await client.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        assert got < big, "what the kernel had not taken was dropped"
        with pytest.raises(anyio.ClosedResourceError):
            await server.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await server.send(b"after close")
        server.write_soon(b"ignored after close")
        assert server.write_buffered == 0


async def test_abort_stream_resets_a_lean_stream_with_unsent_bytes() -> None:
    """The writer's cut-off of a slow consumer: the client sees a reset, not an EOF."""
    async with pair() as (server, client):
        server.write_soon(b"w" * (8 * 2**20))
        await anyio.sleep(0.1)
        await abort_stream(server)
        with pytest.raises(anyio.BrokenResourceError):
            with anyio.fail_after(5):
                while True:
                    await client.receive()


async def test_closing_with_nothing_unsent_is_a_clean_end_of_stream() -> None:
    async with pair() as (server, client):
        await server.send(b"done")
        await server.wait_flushed()
        await server.aclose()
        await server.aclose()  # twice is harmless
        assert await read_until_eof(client) == b"done"


async def test_a_client_reset_breaks_receive_send_and_wait_flushed() -> None:
    async with pair() as (server, client):
        sock = client.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.aclose()
        with anyio.fail_after(5):
            while not server.lost:
                try:
                    await server.receive()
                except (anyio.BrokenResourceError, anyio.EndOfStream):
                    break
        with pytest.raises(anyio.BrokenResourceError):
            await server.send(b"to nobody")
        with pytest.raises(anyio.BrokenResourceError):
            await server.send_eof()
        server.write_soon(b"dropped")
        assert server.write_buffered == 0


def test_the_loop_clock_skips_asyncios_method_but_keeps_a_loops_own() -> None:
    class OwnClock(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return 42.0

    plain, own = asyncio.new_event_loop(), OwnClock()
    try:
        assert _loop_clock(plain) is time.monotonic  # what BaseEventLoop.time returns
        assert _loop_clock(own)() == 42.0
        patched = asyncio.new_event_loop()
        patched.time = lambda: 7.0  # type: ignore[method-assign]
        assert _loop_clock(patched)() == 7.0
        patched.close()
    finally:
        plain.close()
        own.close()


def test_running_on_asyncio_tells_the_backends_apart() -> None:
    async def probe() -> bool:
        return running_on_asyncio()

    assert anyio.run(probe, backend="asyncio") is True
    assert anyio.run(probe, backend="trio") is False
    assert running_on_asyncio() is False  # no loop at all


def test_push_mode_works_under_plain_asyncio_run() -> None:
    """The session takes bytes from the stream's callback (no reader task), where no
    task is current. Under ``asyncio.run`` (not ``anyio.run``, which marks the whole
    context as asyncio) a request that arrives once the connection is being served is
    decided from that callback too: the client gets its 101 and its answers."""

    async def main() -> None:
        app, _seen = make_app(options=PeerOptions(rate_limit=None))
        async with serve_tcp(app) as server:
            assert server.port is not None
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                await anyio.sleep(0.2)  # the session is running, waiting for bytes
                client = RawWS(stream)
                with anyio.fail_after(5):
                    await client.handshake("/ws?userId=late")
                    assert client.status == 101
                    frame = {"frameType": 0, "id": "e1", "method": "echo", "data": {"n": 1}}
                    await client.send_json(frame)
                    answers = [await client.recv_json(), await client.recv_json()]
                assert answers[0] is not None and answers[1] is not None
                assert {"frameType": 2, "id": "e1"}.items() <= answers[0].items()  # the ack
                assert answers[1]["data"] == {"n": 1}
                assert answers[1]["replyTo"] == "e1"

    asyncio.run(main())
