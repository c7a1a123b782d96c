"""Nodes that die: ``imkit serve --redis ... --postgres ...`` processes killed with SIGKILL
(no goodbye to Redis, no close frames) or stopped with SIGTERM.

Clients reach the nodes through a round-robin TCP balancer that skips a backend refusing
connections, as HAProxy or nginx would, so a client's own reconnect lands on a live node.
"""

from __future__ import annotations

import time

import anyio
import pytest
import redis
import websockets

from cluster.harness import (
    Balancer,
    Inbox,
    ProcessNode,
    Services,
    chat_client,
    cluster,
    eventually,
    stored,
)
from imkit.chat.ids import private_conversation_id
from imkit.core.interfaces import Binding, Forward
from imkit.integrations.redis import RedisDiscover

pytestmark = [pytest.mark.anyio, pytest.mark.services]

CONVERSATION = private_conversation_id("alice", "bob")
LEASE = 1.5


async def test_a_killed_node_releases_its_users_and_loses_nothing_acknowledged(
    services: Services,
) -> None:
    per_sender = 30
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            x = ProcessNode(services, "X", lease=LEASE)
            try:
                await x.start(tg)
                async with cluster(services) as nodes:
                    y = await nodes.start("Y")
                    balancer = Balancer(tg, [x.port, y.port])
                    await balancer.start()

                    async def nodes_of(user: str) -> list[str]:
                        found = await y.discover.locate([user])
                        return sorted(b.node_id for b in found.get(user, []))

                    async with (
                        chat_client(balancer.url("bob"), "bob") as bob,
                        chat_client(balancer.url("alice"), "alice") as alice,
                    ):
                        assert balancer.picked == [x.port, y.port]  # Bob on X, Alice on Y
                        await eventually(lambda: nodes_of("bob"), within=5, what="Bob bound")
                        assert await nodes_of("bob") == ["X"]
                        answered: dict[str, int] = {}

                        async def write(me: Inbox, name: str, to: str) -> None:
                            for i in range(per_sender):
                                msg_id = f"{name}-{i}"
                                answer = await me.chat.send(to, msg_id, message_id=msg_id)
                                answered[msg_id] = int(answer["seq"])
                                await anyio.sleep(0.01)

                        async with anyio.create_task_group() as writers:
                            writers.start_soon(write, alice, "alice", "bob")
                            writers.start_soon(write, bob, "bob", "alice")
                            await eventually(
                                lambda: sum(k.startswith("bob") for k in answered) >= 8,
                                within=10,
                                what="Bob writing through X",
                            )
                            died = await x.kill()  # mid-stream: Bob has messages in flight

                            # X never said goodbye: its lease lapses, and Bob's binding on X
                            # stops counting; Bob's client meanwhile reconnects, onto Y.
                            async def bob_off_x() -> bool:
                                return "X" not in await nodes_of("bob")

                            await eventually(
                                bob_off_x,
                                within=LEASE + 1.5,
                                what="the release of Bob's binding on X",
                            )
                            released_after = time.monotonic() - died
                        assert released_after <= LEASE + 1.5
                        assert bob.client.connections == 2
                        assert balancer.picked[-1] == y.port
                        assert await nodes_of("bob") == ["Y"]

                        # Everything answered with a seq is stored, under that seq, once.
                        rows = await stored(services, CONVERSATION)
                        total = 2 * per_sender
                        assert [r.seq for r in rows] == list(range(1, total + 1))
                        assert {r.msg_id: r.seq for r in rows} == answered
                        # Each side received the other's messages once, in the stored order.
                        from_alice = [r.content for r in rows if r.sender == "alice"]
                        from_bob = [r.content for r in rows if r.sender == "bob"]
                        await eventually(
                            lambda: len(bob.messages) >= per_sender, within=10, what="Bob's"
                        )
                        await eventually(
                            lambda: len(alice.messages) >= per_sender, within=10, what="Alice's"
                        )
                        await anyio.sleep(0.2)
                        assert bob.contents() == from_alice
                        assert alice.contents() == from_bob
                        # And Bob, now on Y, is reached live.
                        await alice.chat.send("bob", "after the failover")
                        await eventually(
                            lambda: bob.contents()[-1] == "after the failover", within=5
                        )
            finally:
                await x.ensure_dead()
                tg.cancel_scope.cancel()


async def test_a_terminated_node_says_goodbye_and_its_clients_see_1001(
    services: Services,
) -> None:
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            z = ProcessNode(services, "Z", lease=30.0)  # a lease too long to be what frees Bob
            try:
                await z.start(tg)
                async with cluster(services) as nodes:
                    y = await nodes.start("Y")
                    async with websockets.connect(z.url("bob")) as ws:

                        async def bob_on_z() -> bool:
                            found = await y.discover.locate(["bob"])
                            return [b.node_id for b in found.get("bob", [])] == ["Z"]

                        await eventually(bob_on_z, within=5, what="Bob bound on Z")
                        began = anyio.current_time()
                        assert await z.terminate() == 0
                        await ws.wait_closed()
                        assert ws.close_code == 1001
                        assert await y.discover.locate(["bob"]) == {}
                        assert anyio.current_time() - began < 15
                    assert any("unregistered" in line for line in z.log)
            finally:
                await z.ensure_dead()
                tg.cancel_scope.cancel()


async def test_discovery_stops_cleanly_from_a_shielded_cleanup(
    services: Services, admin: redis.Redis
) -> None:
    """``Server.serve`` stops discovery inside a shielded scope entered after ``start``:
    the goodbye must still happen (the lease and the bindings are deleted at once)."""

    async def ignore(message: Forward) -> None:
        pass

    node = RedisDiscover(
        services.redis_url, node_id="S", key_prefix=services.prefix, lease_seconds=30
    )
    with anyio.fail_after(10):
        await node.start(ignore)
        try:
            assert await node.bind(Binding("bob", "S", "S:1")) == []
            assert admin.exists(f"{services.prefix}:node:S")
        finally:
            with anyio.CancelScope(shield=True):
                await node.stop()
    assert not admin.exists(f"{services.prefix}:node:S")
    assert admin.hgetall(f"{services.prefix}:user:bob") == {}
