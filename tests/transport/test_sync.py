"""The reader→worker queue (:class:`imkit.transport._sync.Inbox`)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from imkit.transport._sync import Inbox

pytestmark = pytest.mark.anyio


def test_put_messages_nowait_queues_in_order_and_counts_each() -> None:
    inbox: Inbox[str] = Inbox(3)
    started: list[str] = []
    inbox.when_first_item(lambda: started.append("worker"))
    inbox.put("event")
    inbox.put_messages_nowait(["a", "b"])
    inbox.put_messages_nowait([])
    assert started == ["worker"]  # once, with the first item
    assert not inbox.full
    inbox.put_messages_nowait(["c"])
    assert inbox.full
    assert [inbox.get_nowait() for _ in range(4)] == ["event", "a", "b", "c"]
    assert inbox.full  # taken is not done: a message counts until message_done
    inbox.message_done()
    assert not inbox.full


def test_the_first_item_may_come_in_a_batch() -> None:
    inbox: Inbox[str] = Inbox(8)
    started: list[int] = []
    inbox.put_messages_nowait([])
    inbox.when_first_item(lambda: started.append(len(inbox)))
    assert started == []
    inbox.put_messages_nowait(["a", "b"])
    assert started == [2]
    inbox.put_messages_nowait(["c"])
    assert started == [2]


def test_get_nowait_or_returns_the_default_when_empty() -> None:
    inbox: Inbox[str] = Inbox(2)
    assert inbox.get_nowait_or(None) is None
    inbox.put_messages_nowait(["x", "y"])
    assert inbox.get_nowait_or(None) == "x"
    assert inbox.get_nowait_or(None) == "y"
    assert inbox.get_nowait_or(0) == 0


async def test_a_batch_wakes_a_waiting_consumer_once_with_every_message() -> None:
    inbox: Inbox[str] = Inbox(8)
    got: list[str] = []

    async def consume() -> None:
        got.append(await inbox.get())
        while (item := inbox.get_nowait_or(None)) is not None:
            got.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        inbox.put_messages_nowait(["a", "b", "c"])
    assert got == ["a", "b", "c"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_a_known_loop_a_wait_is_woken_by_a_put_and_survives_cancellation() -> None:
    inbox: Inbox[str] = Inbox(1, asyncio.get_running_loop())
    with anyio.move_on_after(0.01):
        await inbox.get()  # cancelled while waiting
    inbox.put("after the cancelled wait")  # wakes no one, and does not fail
    assert await inbox.get() == "after the cancelled wait"
    got: list[str] = []

    async def consume() -> None:
        got.append(await inbox.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        inbox.put_messages_nowait(["woken"])
    assert got == ["woken"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_a_known_loop_put_message_waits_for_room() -> None:
    inbox: Inbox[str] = Inbox(1, asyncio.get_running_loop())
    await inbox.put_message("first")
    put = anyio.Event()

    async def second() -> None:
        await inbox.put_message("second")
        put.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert not put.is_set()
        assert inbox.get_nowait() == "first"
        inbox.message_done()
    assert put.is_set()
    assert inbox.get_nowait() == "second"
