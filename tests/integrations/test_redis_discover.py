"""RedisDiscover against a real Redis (``tests/services.py``: 127.0.0.1:6379, db 15).

Each test uses a unique key prefix and deletes its keys. Skipped when Redis is unreachable,
unless ``IMKIT_REQUIRE_SERVICES=1``, which makes it fail.
Connections are killed with ``CLIENT KILL`` restricted (by id) to this test's own clients, so
other users of the same Redis are not disturbed; the server itself is never restarted.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import anyio.abc
import pytest
import redis
import redis.asyncio as aioredis

from imkit.core.frames import Frame, FrameType
from imkit.core.interfaces import Binding, Discover, Forward
from imkit.exceptions import ConfigurationError, DiscoverError
from imkit.integrations.redis import RedisDiscover, decode_forward, encode_forward
from services import require_redis_url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    """A synchronous client on the test database, for inspecting keys and killing clients."""
    with redis.Redis.from_url(require_redis_url(), decode_responses=True) as client:
        yield client


@pytest.fixture
def prefix(admin: redis.Redis) -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test."""
    value = f"imkit-test-{uuid.uuid4().hex[:12]}"
    yield value
    keys = list(admin.scan_iter(f"{value}:*"))
    if keys:
        admin.delete(*keys)


class Inbox:
    """A forward handler that records what it receives."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Forward](100)

    async def __call__(self, message: Forward) -> None:
        await self.send.send(message)

    def close(self) -> None:
        self.send.close()
        self.receive.close()

    async def get(self) -> Forward:
        with anyio.fail_after(3):
            return await self.receive.receive()


def make_node(prefix: str, name: str, url: str = "", **kwargs: object) -> RedisDiscover:
    """A node whose Redis connections are named ``{prefix}-{name}`` (to kill them by name)."""
    url = url or require_redis_url()
    url += f"{'&' if '?' in url else '?'}client_name={prefix}-{name}"
    return RedisDiscover(url, node_id=f"{name}-{uuid.uuid4().hex[:6]}", key_prefix=prefix, **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def running(node: RedisDiscover) -> AsyncIterator[Inbox]:
    inbox = Inbox()
    await node.start(inbox)
    try:
        yield inbox
    finally:
        await node.stop()
        inbox.close()


class Proxy:
    """A TCP proxy to the test Redis that can go down and come back, as a restart would."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self._scope = anyio.CancelScope()
        self.port = 0

    @property
    def url(self) -> str:
        return urlsplit(require_redis_url())._replace(netloc=f"127.0.0.1:{self.port}").geturl()

    async def up(self) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._scope = anyio.CancelScope()
        self._tg.start_soon(self._serve, listener, self._scope)

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        self._scope.cancel()

    async def _serve(self, listener: anyio.abc.SocketListener, scope: anyio.CancelScope) -> None:
        with scope:
            async with listener:
                await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async def pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
            try:
                async for chunk in src:
                    await dst.send(chunk)
            except anyio.BrokenResourceError:
                pass
            tg.cancel_scope.cancel()

        target = urlsplit(require_redis_url())
        async with client:
            upstream = await anyio.connect_tcp(target.hostname or "127.0.0.1", target.port or 6379)
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, upstream)
                tg.start_soon(pipe, upstream, client)


def kill(admin: redis.Redis, kind: str, name: str) -> int:
    """``CLIENT KILL TYPE kind ID id`` for each connection named ``name``; how many died."""
    killed = 0
    for info in admin.client_list(_type=kind):
        if info.get("name") == name:
            killed += admin.execute_command("CLIENT", "KILL", "TYPE", kind, "ID", info["id"])
    return killed


async def eventually_forward(src: RedisDiscover, dst: RedisDiscover, inbox: Inbox) -> float:
    """Forward until delivered (DiscoverError while dst is resubscribing); seconds taken."""
    began = anyio.current_time()
    while True:
        try:
            await src.forward(dst.node_id, Forward("push", "alice", src.node_id, epoch="x"))
        except DiscoverError:
            await anyio.sleep(0.05)
            continue
        await inbox.get()
        return anyio.current_time() - began


async def wait_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it is true (the caller's ``fail_after`` bounds the wait)."""
    while True:
        if await check():
            return
        await anyio.sleep(0.02)


async def located(node: RedisDiscover, user: str, expected: list[Binding] | None) -> bool:
    return (await node.locate([user])).get(user) == expected


def binding(node: RedisDiscover, user: str, epoch: str, device: str = "") -> Binding:
    return Binding(user_id=user, node_id=node.node_id, epoch=epoch, device_id=device)


# -- no Redis needed ---------------------------------------------------------------------


def test_forward_codec_round_trip() -> None:
    frame = Frame(
        FrameType.DATA, id="m1", ack_seq=3, method="chat", form_id="bob", data={"t": "héllo"}
    )
    for message in (
        Forward("push", "alice", "n1", frame=frame, epoch="e1"),
        Forward("kick", "alice", "n1", epoch="e2"),
    ):
        assert decode_forward(encode_forward(message)) == message
    for bad in (
        '"x"',
        '{"kind": 1}',
        '{"kind": "push", "frame": 3}',
        '{"kind": "push", "frame": "{"}',
    ):
        with pytest.raises(ValueError):
            decode_forward(bad)


def test_configuration_is_validated() -> None:
    with pytest.raises(ConfigurationError):
        RedisDiscover(lease_seconds=0)
    with pytest.raises(ConfigurationError):
        RedisDiscover(lease_seconds=1, renew_interval=1)
    with pytest.raises(ConfigurationError):
        RedisDiscover(node_id="a:b")
    node = RedisDiscover()
    assert isinstance(node, Discover)
    assert node.node_id and node.node_id != RedisDiscover().node_id


def test_import_without_redis_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "imkit.integrations.redis")
    with pytest.raises(ImportError, match=r"pip install 'imkit\[redis\]'"):
        importlib.import_module("imkit.integrations.redis")


# -- against Redis -----------------------------------------------------------------------

services = pytest.mark.services


@services
@pytest.mark.anyio
async def test_bind_locate_unbind(admin: redis.Redis, prefix: str) -> None:
    with anyio.fail_after(10):
        node = make_node(prefix, "a")
        async with running(node):
            phone, laptop = (
                binding(node, "alice", "e1", "phone"),
                binding(node, "alice", "e2", "pc"),
            )
            assert await node.bind(phone) == []
            assert await node.locate(["alice", "bob", "alice"]) == {"alice": [phone]}
            assert await node.locate([]) == {}
            assert await node.bind(laptop) == [phone]
            assert sorted((await node.locate(["alice"]))["alice"], key=lambda b: b.epoch) == [
                phone,
                laptop,
            ]
            await node.unbind(phone)
            await node.unbind(phone)  # twice is harmless
            assert await node.locate(["alice"]) == {"alice": [laptop]}
            await node.unbind(laptop)
            assert await node.locate(["alice"]) == {}
            assert not admin.exists(f"{prefix}:user:alice")
            with pytest.raises(ValueError):
                await node.bind(Binding("alice", "some-other-node", "e3"))


@services
@pytest.mark.anyio
async def test_two_nodes_forward_to_each_other(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(10):
        a, b = make_node(prefix, "a"), make_node(prefix, "b")
        async with running(a) as inbox_a, running(b) as inbox_b:
            frame = Frame(FrameType.DATA, id="m1", ack_seq=7, method="chat", form_id="bob",
                          transpond_uid="alice", data={"text": "héllo ✓", "n": [1, 2]})  # fmt: skip
            push = Forward("push", "alice", a.node_id, frame=frame, epoch="e9")
            await a.forward(b.node_id, push)  # b's subscription is live as soon as start returns
            assert await inbox_b.get() == push
            kick = Forward("kick", "carol", b.node_id, epoch="e1")
            await b.forward(a.node_id, kick)
            assert await inbox_a.get() == kick


@services
@pytest.mark.anyio
async def test_late_unbind_never_removes_the_newer_binding(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(10):
        a, b = make_node(prefix, "a"), make_node(prefix, "b")
        async with running(a), running(b):
            # Same node: the old connection's close arrives after the new login.
            old, new = binding(a, "alice", "e1"), binding(a, "alice", "e2")
            await a.bind(old)
            assert await a.bind(new) == [old]
            await a.unbind(old)
            assert await b.locate(["alice"]) == {"alice": [new]}
            await a.unbind(new)
            # Across nodes: alice moves from a to b, then a's close arrives late.
            old, new = binding(a, "bob", "e3"), binding(b, "bob", "e4")
            await a.bind(old)
            assert await b.bind(new) == [old]
            await a.unbind(old)
            assert await a.locate(["bob"]) == {"bob": [new]}
            assert await b.locate(["bob"]) == {"bob": [new]}
            # Concurrently, many times: the newer binding always survives.
            for i in range(20):
                old, new = binding(a, f"u{i}", f"old{i}"), binding(b, f"u{i}", f"new{i}")
                await a.bind(old)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(a.unbind, old)
                    tg.start_soon(b.bind, new)
                assert await a.locate([f"u{i}"]) == {f"u{i}": [new]}


@services
@pytest.mark.anyio
async def test_dead_node_users_vanish_within_the_lease(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(10):
        lease = 0.5
        a, b = (
            make_node(prefix, "a", lease_seconds=lease),
            make_node(prefix, "b", lease_seconds=lease),
        )
        async with running(a), running(b):
            stale = binding(a, "alice", "e1")
            await a.bind(stale)
            assert await b.locate(["alice"]) == {"alice": [stale]}
            assert a._renew_scope is not None
            a._renew_scope.cancel()  # a "crashes": no more renewals, no goodbye
            began = anyio.current_time()
            await wait_until(lambda: located(b, "alice", None))
            assert anyio.current_time() - began <= lease + 0.3
            fresh = binding(b, "alice", "e2")
            assert await b.bind(fresh) == []
            assert set(admin.hkeys(f"{prefix}:user:alice")) == {"e2"}  # pruned lazily
            with pytest.raises(DiscoverError, match="dead"):
                await b.forward(a.node_id, Forward("push", "alice", b.node_id))


@services
@pytest.mark.anyio
async def test_node_restarted_under_the_same_id_drops_its_old_bindings(
    prefix: str, admin: redis.Redis
) -> None:
    with anyio.fail_after(10):
        first, b = make_node(prefix, "a"), make_node(prefix, "b")
        async with running(first), running(b):
            await first.bind(Binding("alice", first.node_id, "e1"))
            assert first._renew_scope is not None and first._reader_scope is not None
            first._renew_scope.cancel()  # crash, and come back at once with the same id
            first._reader_scope.cancel()
            again = RedisDiscover(require_redis_url(), node_id=first.node_id, key_prefix=prefix)
            async with running(again):
                assert await b.locate(["alice"]) == {}
                fresh = Binding("alice", again.node_id, "e2")
                assert await again.bind(fresh) == []
                # A binding left by an earlier run is never taken for a live one.
                ghost = {"node": again.node_id, "device": "", "inc": "an-earlier-run"}
                admin.hset(f"{prefix}:user:alice", "e0", json.dumps(ghost))
                assert await b.locate(["alice"]) == {"alice": [fresh]}
                assert set(admin.hkeys(f"{prefix}:user:alice")) == {"e2"}


@services
@pytest.mark.anyio
async def test_forward_to_a_node_nobody_listens_for_raises(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(10):
        a, b = make_node(prefix, "a"), make_node(prefix, "b")
        async with running(a), running(b):
            with pytest.raises(DiscoverError, match="dead"):
                await a.forward("never-started", Forward("push", "alice", a.node_id))
            assert b._reader_scope is not None
            b._reader_scope.cancel()  # lease alive, but nobody subscribed
            with anyio.fail_after(3):
                while True:
                    try:
                        await a.forward(b.node_id, Forward("push", "alice", a.node_id))
                    except DiscoverError as exc:
                        assert "not listening" in str(exc)
                        break
                    await anyio.sleep(0.02)


@services
@pytest.mark.anyio
async def test_stop_releases_this_nodes_users(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(10):
        a, b = make_node(prefix, "a"), make_node(prefix, "b")
        async with running(b):
            kept = binding(b, "carol", "e9")
            await b.bind(kept)
            async with running(a):
                for user in ("alice", "bob", "carol"):
                    await a.bind(binding(a, user, f"{user}-1"))
                assert set(await b.locate(["alice", "bob", "carol"])) == {"alice", "bob", "carol"}
            assert await b.locate(["alice", "bob", "carol"]) == {"carol": [kept]}
            assert not admin.exists(
                f"{prefix}:node:{a.node_id}", f"{prefix}:node:{a.node_id}:users"
            )
            assert not admin.exists(f"{prefix}:user:alice", f"{prefix}:user:bob")
            with pytest.raises(DiscoverError):
                await b.forward(a.node_id, Forward("push", "alice", b.node_id))


@services
@pytest.mark.anyio
async def test_forward_handler_errors_and_bad_messages_do_not_stop_the_reader(
    prefix: str, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[Forward] = []

    async def handler(message: Forward) -> None:
        received.append(message)
        if message.user_id == "boom":
            raise RuntimeError("handler bug")

    with anyio.fail_after(10):
        a = make_node(prefix, "a")
        await a.start(handler)
        try:
            admin.publish(f"{prefix}:node:{a.node_id}:fwd", "not json")
            await a.forward(a.node_id, Forward("push", "boom", a.node_id))
            await a.forward(a.node_id, Forward("push", "fine", a.node_id))

            async def both_received() -> bool:
                return len(received) == 2

            await wait_until(both_received)
        finally:
            await a.stop()
    assert [m.user_id for m in received] == ["boom", "fine"]
    messages = [r.getMessage() for r in caplog.records if r.name == "imkit.integrations.redis"]
    assert any("malformed forward" in m for m in messages)
    assert any("handler failed" in m for m in messages)


@services
@pytest.mark.anyio
async def test_killed_pubsub_connection_is_resubscribed(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(15):
        a, b = make_node(prefix, "a"), make_node(prefix, "b")
        async with running(a), running(b) as inbox_b:
            for _ in range(2):  # twice: the reconnected subscription must itself survive a kill
                assert kill(admin, "pubsub", f"{prefix}-b") == 1
                assert await eventually_forward(a, b, inbox_b) < 5


@services
@pytest.mark.anyio
async def test_killed_normal_connections_recover(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(15):
        lease = 0.6
        a, b = make_node(prefix, "a", lease_seconds=lease), make_node(prefix, "b")
        async with running(a) as inbox_a, running(b):
            alice = binding(a, "alice", "e1")
            await a.bind(alice)
            assert kill(admin, "normal", f"{prefix}-a") >= 1
            assert kill(admin, "pubsub", f"{prefix}-a") == 1
            # Operations work again, the lease keeps being renewed, forwards arrive.
            assert await a.locate(["alice"]) == {"alice": [alice]}
            assert await eventually_forward(b, a, inbox_a) < 5
            await anyio.sleep(lease * 2)
            assert await b.locate(["alice"]) == {"alice": [alice]}


@services
@pytest.mark.anyio
async def test_lost_state_is_rewritten(prefix: str, admin: redis.Redis) -> None:
    """What a Redis restart without persistence does to a node: its keys vanish."""
    with anyio.fail_after(10):
        a, b = make_node(prefix, "a", lease_seconds=0.6), make_node(prefix, "b")
        async with running(a), running(b):
            alice, gone = binding(a, "alice", "e1", "phone"), binding(a, "bob", "e2")
            await a.bind(alice)
            await a.bind(gone)
            admin.delete(*admin.scan_iter(f"{prefix}:*"))
            await a.unbind(gone)
            assert await b.locate(["alice"]) == {}
            await wait_until(lambda: located(b, "alice", [alice]))
            assert await b.locate(["bob"]) == {}
            assert admin.pttl(f"{prefix}:node:{a.node_id}:users") > 0


@services
@pytest.mark.anyio
async def test_redis_outage_then_recovery(
    prefix: str, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes away (connections cut, then refused) and comes back empty, as after a
    restart without persistence: operations fail with DiscoverError meanwhile, then the node
    re-registers, re-writes its bindings and receives forwards again, without help."""
    caplog.set_level(logging.DEBUG, "imkit.integrations.redis")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            proxy = Proxy(tg)
            await proxy.up()
            a = make_node(prefix, "a", url=proxy.url, lease_seconds=0.6)
            b = make_node(prefix, "b")
            async with running(a) as inbox_a, running(b):
                alice, bob = binding(a, "alice", "e1", "phone"), binding(a, "bob", "e2")
                await a.bind(alice)
                proxy.down()
                admin.delete(*admin.scan_iter(f"{prefix}:*"))  # the "restart" lost everything
                with pytest.raises(DiscoverError, match="Redis locate failed"):
                    await a.locate(["alice"])
                with pytest.raises(DiscoverError, match="Redis forward failed"):
                    await a.forward(b.node_id, Forward("kick", "alice", a.node_id))
                with pytest.raises(DiscoverError, match="Redis bind failed"):
                    await a.bind(bob)  # kept locally: written once Redis is back
                await anyio.sleep(0.5)  # let the background tasks fail and back off
                await proxy.up()
                await wait_until(lambda: located(b, "alice", [alice]))
                await wait_until(lambda: located(b, "bob", [bob]))
                assert await eventually_forward(b, a, inbox_a) < 6
                # A close during an outage: the binding is removed once Redis is back.
                proxy.down()
                with pytest.raises(DiscoverError, match="Redis unbind failed"):
                    await a.unbind(alice)
                await anyio.sleep(0.5)
                await proxy.up()
                # a is back once its lease is renewed (bob is located again); it writes
                # the removal of alice's binding then too, maybe a moment later.
                await wait_until(lambda: located(b, "bob", [bob]))
                await wait_until(lambda: located(b, "alice", None))
                assert await b.locate(["alice"]) == {}
                assert not admin.exists(f"{prefix}:user:alice")  # deleted, not just hidden
            tg.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records if r.name == "imkit.integrations.redis"]
    assert any("lease renewal failed" in m for m in messages)
    assert any("pub/sub connection lost" in m for m in messages)
    assert any("re-registered" in m for m in messages)
    assert any("resubscribed" in m for m in messages)
    # Backed off, not busy-looping: few renewal attempts while Redis was away.
    assert sum("lease renewal failed" in m for m in messages) < 60


@pytest.mark.anyio
async def test_unreachable_redis_raises_discover_error(caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(10):
        node = RedisDiscover("redis://127.0.0.1:1/0", key_prefix="imkit-unreachable")
        with pytest.raises(DiscoverError, match="Redis locate failed"):
            await node.locate(["alice"])
        with pytest.raises(DiscoverError, match="Redis bind failed"):
            await node.bind(binding(node, "alice", "e1"))
        with pytest.raises(DiscoverError):
            await node.forward("other", Forward("kick", "alice", node.node_id))
        inbox = Inbox()
        with pytest.raises(DiscoverError):
            await node.start(inbox)
        inbox.close()
        with caplog.at_level(logging.WARNING, "imkit.integrations.redis"):
            await node.stop()  # logs, never raises
        assert any("could not unregister" in r.getMessage() for r in caplog.records)


@services
@pytest.mark.anyio
async def test_from_client_shares_the_client(prefix: str, admin: redis.Redis) -> None:
    with anyio.fail_after(10):
        client = aioredis.Redis.from_url(
            require_redis_url()
        )  # bytes responses, not owned by the node
        try:
            node = RedisDiscover.from_client(client, key_prefix=prefix, node_id="shared")
            async with running(node) as inbox:
                alice = binding(node, "alice", "e1", "phone")
                assert await node.bind(alice) == []
                assert await node.locate(["alice"]) == {"alice": [alice]}
                await node.forward("shared", Forward("kick", "alice", "shared", epoch="e1"))
                assert (await inbox.get()).epoch == "e1"
            assert await client.ping()  # still usable after stop()
        finally:
            await client.aclose()
