"""Private chat across in-process nodes sharing one Redis and one PostgreSQL.

Each node is an ``imkit.Server`` running the chat app with its own ``RedisDiscover``
(node ids A, B, C; one key prefix) and its own ``PostgresStore`` (one schema). What the
clients see: pushes from users on other nodes, offline catch-up on whatever node they come
back to, one gapless order per conversation, and a 4000 close for a replaced session.
"""

from __future__ import annotations

import anyio
import pytest
import websockets

from cluster.harness import Inbox, Services, chat_client, cluster, eventually, stored
from imkit.chat.ids import private_conversation_id

pytestmark = [pytest.mark.anyio, pytest.mark.services]

CONVERSATION = private_conversation_id("alice", "bob")


@pytest.mark.parametrize("ack_mode", ["only", "rigor"])
async def test_users_on_different_nodes_chat_and_catch_up_on_a_third(
    services: Services, ack_mode: str
) -> None:
    with anyio.fail_after(30):
        async with cluster(services, ack_mode=ack_mode) as nodes:
            a, b, c = [await nodes.start(name) for name in "ABC"]
            by_alice: list[int] = []
            by_bob: list[int] = []
            async with (
                chat_client(a.url("alice"), "alice", raw=True) as alice,
                chat_client(b.url("bob"), "bob", raw=True) as bob,
            ):
                assert alice.client.ack_mode is not None
                assert alice.client.ack_mode.value == ack_mode
                # Alice (on A) and Bob (on B) take turns; each push crosses Redis.
                for i in range(6):
                    by_alice.append((await alice.chat.send("bob", f"a{i}"))["seq"])
                    by_bob.append((await bob.chat.send("alice", f"b{i}"))["seq"])
                await eventually(lambda: len(bob.frames) == 6, within=5, what="Bob's pushes")
                await eventually(lambda: len(alice.frames) == 6, within=5, what="Alice's pushes")
                await anyio.sleep(0.2)  # and nothing more: each push arrived once
                assert bob.contents(raw=True) == [f"a{i}" for i in range(6)]
                assert bob.seqs(raw=True) == by_alice
                assert {f["sendId"] for f in bob.frames} == {"alice"}
                assert alice.contents(raw=True) == [f"b{i}" for i in range(6)]
                assert alice.seqs(raw=True) == by_bob
            # Bob is offline (his binding on B is gone); Alice goes on writing from A.
            assert await a.discover.locate(["bob"]) == {}
            async with chat_client(a.url("alice"), "alice") as alice:
                for i in range(6, 15):
                    by_alice.append((await alice.chat.send("bob", f"a{i}"))["seq"])
            # Bob comes back on node C: exactly what he missed, from PostgreSQL, in order.
            async with chat_client(c.url("bob"), "bob", raw=True) as bob:
                await eventually(lambda: len(bob.frames) >= 9, within=5, what="the catch-up")
                await anyio.sleep(0.3)  # and nothing more
                assert bob.contents(raw=True) == [f"a{i}" for i in range(6, 15)]
                assert bob.seqs(raw=True) == by_alice[6:]
                # A live push to Bob on C, from Alice on A, after the catch-up.
                async with chat_client(a.url("alice"), "alice") as alice:
                    by_alice.append((await alice.chat.send("bob", "live"))["seq"])
                await eventually(lambda: len(bob.frames) == 10, within=5, what="the push")
                assert bob.contents(raw=True)[-1] == "live"
            rows = await stored(services, CONVERSATION)
            n = len(by_alice) + len(by_bob)
            assert [r.seq for r in rows] == list(range(1, n + 1))
            assert sorted(by_alice + by_bob) == list(range(1, n + 1))
            assert [r.seq for r in rows if r.sender == "alice"] == by_alice


async def test_concurrent_senders_on_three_nodes_get_one_gapless_order(
    services: Services,
) -> None:
    """Alice's phone on A, her laptop on C and Bob on B all write at once ("multi" policy)."""
    per_sender, in_flight = 20, 4
    with anyio.fail_after(40):
        async with cluster(services, login_policy="multi") as nodes:
            a, b, c = [await nodes.start(name) for name in "ABC"]
            async with (
                chat_client(a.url("alice", "phone"), "alice") as phone,
                chat_client(c.url("alice", "laptop"), "alice") as laptop,
                chat_client(b.url("bob"), "bob") as bob,
            ):
                answers: list[dict[str, object]] = []

                async def write(inbox: Inbox, name: str, to: str, lane: int) -> None:
                    for i in range(lane, per_sender, in_flight):
                        answer = await inbox.chat.send(to, f"{name}-{i}", message_id=f"{name}-{i}")
                        answers.append(answer)

                async with anyio.create_task_group() as tg:
                    for inbox, name, to in (
                        (phone, "phone", "bob"),
                        (laptop, "laptop", "bob"),
                        (bob, "bob", "alice"),
                    ):
                        for lane in range(in_flight):
                            tg.start_soon(write, inbox, name, to, lane)
                total = 3 * per_sender
                # Every sender got a distinct seq; together they are 1..N, no gap, no twin.
                assert sorted(int(str(x["seq"])) for x in answers) == list(range(1, total + 1))
                rows = await stored(services, CONVERSATION)
                assert [r.seq for r in rows] == list(range(1, total + 1))
                assert len({r.msg_id for r in rows}) == total
                assert {r.msg_id for r in rows} == {
                    f"{name}-{i}" for name in ("phone", "laptop", "bob") for i in range(per_sender)
                }
                # Each device sees the other side's messages once, in the stored order.
                from_alice = [r.content for r in rows if r.sender == "alice"]
                from_bob = [r.content for r in rows if r.sender == "bob"]

                def got(inbox: Inbox, sender: str, n: int) -> bool:
                    return sum(str(m["sendId"]) == sender for m in inbox.messages) >= n

                await eventually(lambda: got(bob, "alice", 2 * per_sender), within=10)
                await eventually(lambda: got(phone, "bob", per_sender), within=10)
                await eventually(lambda: got(laptop, "bob", per_sender), within=10)
                await anyio.sleep(0.2)
                assert bob.contents() == from_alice
                for device in (phone, laptop):
                    seqs = device.seqs()
                    assert seqs == sorted(set(seqs))  # increasing: no duplicate, no reorder
                    seen_from_bob = [m for m in device.messages if m["sendId"] == "bob"]
                    assert [m["msg"]["content"] for m in seen_from_bob] == from_bob


async def test_logging_in_on_another_node_closes_the_old_session_with_4000(
    services: Services,
) -> None:
    """The "single" policy across nodes, seen from a client imkit did not write."""
    with anyio.fail_after(20):
        async with cluster(services) as nodes:
            a, b, c = [await nodes.start(name) for name in "ABC"]
            async with websockets.connect(a.url("alice")) as old:

                async def alice_on(node: str) -> bool:
                    found = await c.discover.locate(["alice"])
                    return [x.node_id for x in found.get("alice", [])] == [node]

                await eventually(lambda: alice_on("A"), within=5, what="the bind on A")
                async with (
                    chat_client(b.url("alice"), "alice") as alice,
                    chat_client(c.url("bob"), "bob") as bob,
                ):
                    with anyio.fail_after(5):
                        await old.wait_closed()
                    assert old.close_code == 4000
                    assert "session replaced" in (old.close_reason or "")
                    # The old session's late close did not unbind the new one.
                    await eventually(lambda: alice_on("B"), within=5, what="only B")
                    assert a.server.sessions("alice") == []
                    assert len(b.server.sessions("alice")) == 1
                    await bob.chat.send("alice", "to the new session")
                    await eventually(lambda: alice.messages, within=5, what="the push")
                    assert alice.contents() == ["to the new session"]
                    assert alice.client.connected
