"""Redis and PostgreSQL failing under running nodes.

Redis: the nodes' own connections are killed with ``CLIENT KILL`` (by id, among the
connections named after this test's nodes: no other client is touched, and the Redis
server is never restarted). PostgreSQL: a node reaches it through a TCP gate that the test
closes and opens again, or has its own backends terminated with ``pg_terminate_backend``.
"""

from __future__ import annotations

import anyio
import asyncpg  # type: ignore[import-untyped,unused-ignore]
import pytest
import redis
import websockets

from cluster.harness import (
    Gate,
    RawChat,
    Services,
    chat_client,
    client_name,
    cluster,
    eventually,
    kill_redis_clients,
    stored,
    with_query,
)
from imkit.chat.ids import private_conversation_id

pytestmark = [pytest.mark.anyio, pytest.mark.services]

CONVERSATION = private_conversation_id("alice", "bob")


async def test_nodes_recover_when_their_redis_connections_are_killed(
    services: Services, admin: redis.Redis
) -> None:
    with anyio.fail_after(40):
        async with cluster(services, lease=3.0) as nodes:
            a, b = [await nodes.start(name) for name in "AB"]
            async with (
                chat_client(a.url("alice"), "alice") as alice,
                chat_client(b.url("bob"), "bob") as bob,
            ):
                sent: list[str] = []

                async def send(text: str) -> None:
                    await alice.chat.send("bob", text)
                    sent.append(text)

                for i in range(3):
                    await send(f"before-{i}")
                await eventually(lambda: len(bob.messages) == 3, within=5, what="the pushes")

                names = {client_name(services, "A"), client_name(services, "B")}
                assert kill_redis_clients(admin, "pubsub", names) == 2  # each node's channel
                assert kill_redis_clients(admin, "normal", names) >= 2  # their command pools
                # Messages are stored meanwhile; their pushes may be lost with the channel.
                for i in range(5):
                    await send(f"during-{i}")
                # Cross-node pushes work again within a bounded time.
                began = anyio.current_time()
                probes = 0
                while not any(m["msg"]["content"].startswith("probe") for m in bob.messages):
                    assert anyio.current_time() - began < 10, "pushes did not come back"
                    await send(f"probe-{probes}")
                    probes += 1
                    with anyio.move_on_after(0.3):
                        await eventually(lambda: bob.contents()[-1:] == sent[-1:], within=1)
                # Nothing stored was lost: the client pulled every gap; each message once.
                await send("after")
                await eventually(
                    lambda: bob.contents() == sent, within=5, what="every message at Bob"
                )
                assert bob.seqs() == list(range(1, len(sent) + 1))
                # Both nodes are still registered: the cluster still finds Bob on B.
                found = await a.discover.locate(["bob"])
                assert [x.node_id for x in found["bob"]] == ["B"]


async def test_a_sender_whose_postgres_is_gone_gets_store_unavailable_and_no_seq(
    services: Services,
) -> None:
    with anyio.fail_after(40):
        async with (
            anyio.create_task_group() as tg,
            cluster(services, login_policy="multi") as nodes,
        ):
            gate = Gate(tg, "127.0.0.1", 5432)
            await gate.up()
            via_gate = services.dsn.replace(":5432/", f":{gate.port}/")
            assert via_gate != services.dsn
            a = await nodes.start("A", dsn=via_gate)
            b = await nodes.start("B")
            async with (
                chat_client(a.url("alice", "app"), "alice") as alice,
                chat_client(b.url("bob"), "bob") as bob,
                websockets.connect(a.url("alice", "raw")) as ws,
            ):
                raw = RawChat(ws)
                frames = await raw.chat("m-up", "m-up", "bob", "while up")
                assert frames[-1]["replyTo"] == "m-up"
                assert frames[-1]["data"]["seq"] == 1

                gate.down()  # PostgreSQL is gone for node A (its pool's connections are cut)
                frames = await raw.chat("m-down", "m-down", "bob", "while down")
                err = frames[-1]
                assert err["frameType"] == 9
                assert err["data"]["code"] == "store_unavailable"
                assert not any(f.get("replyTo") == "m-down" for f in frames)  # no seq
                assert "m-down" not in {r.msg_id for r in await stored(services, CONVERSATION)}

                # The library client keeps resending under one msgId through the outage.
                answers: list[dict[str, object]] = []

                async def send_through_outage() -> None:
                    answers.append(await alice.chat.send("bob", "retried", message_id="m-retry"))

                tg.start_soon(send_through_outage)
                await anyio.sleep(1.0)
                assert answers == []  # no answer while nothing could be stored
                await gate.up()  # PostgreSQL is back, same address
                await eventually(lambda: answers, within=10, what="the answer")
                # The raw client resends the failed message: a new frame, the same msgId.
                frames = await raw.chat("m-down#2", "m-down", "bob", "while down")
                assert frames[-1]["replyTo"] == "m-down#2"
                again = await raw.chat("m-down#3", "m-down", "bob", "while down")
                assert again[-1]["data"]["seq"] == frames[-1]["data"]["seq"]  # stored once

                rows = await stored(services, CONVERSATION)
                assert [r.seq for r in rows] == [1, 2, 3]
                assert sorted(r.msg_id for r in rows) == ["m-down", "m-retry", "m-up"]
                assert answers[0]["seq"] in (2, 3)
                await eventually(lambda: len(bob.messages) == 3, within=5, what="Bob's pushes")
                assert sorted(bob.contents()) == ["retried", "while down", "while up"]
                assert bob.seqs() == [1, 2, 3]
            gate.down()


async def test_terminated_backends_never_yield_a_seq_for_an_unstored_message(
    services: Services,
) -> None:
    """Each message follows the termination of the node's backends: depending on whether
    asyncpg noticed first, it is refused (``store_unavailable``) or stored and answered."""
    app_name = f"{services.prefix}-A"
    with anyio.fail_after(30):
        async with cluster(services) as nodes:
            a = await nodes.start("A", dsn=with_query(services.dsn, application_name=app_name))
            async with websockets.connect(a.url("alice")) as ws:
                raw = RawChat(ws)
                assert (await raw.chat("t-0", "t-0", "bob", "first"))[-1]["data"]["seq"] == 1
                outcomes: dict[str, dict[str, object]] = {}
                terminations: list[int] = []
                for i in range(1, 9):
                    admin = await asyncpg.connect(services.dsn)
                    try:
                        terminated = await admin.fetchval(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE application_name = $1",
                            app_name,
                        )
                    finally:
                        await admin.close()
                    terminations.append(terminated)
                    outcomes[f"t-{i}"] = (await raw.chat(f"t-{i}", f"t-{i}", "bob", f"m{i}"))[-1]
                assert terminations[0] >= 1
                rows = {r.msg_id: r.seq for r in await stored(services, CONVERSATION)}
                for msg_id, last in outcomes.items():
                    if last["frameType"] == 9:  # refused: retryable, and truly not stored
                        assert last["data"] == {**last["data"], "code": "store_unavailable"}  # type: ignore[dict-item]
                        assert msg_id not in rows
                    else:  # answered: stored, under the seq the sender was told
                        assert rows[msg_id] == last["data"]["seq"]  # type: ignore[index]
                # And the node serves normally afterwards.
                last = (await raw.chat("t-after", "t-after", "bob", "after"))[-1]
                assert last["data"]["seq"] == max(rows.values()) + 1  # type: ignore[index]
