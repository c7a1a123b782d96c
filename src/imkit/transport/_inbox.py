"""The queue between a connection's reader and its worker.

Messages (route calls) are bounded: the reader waits for room, so a client that sends
faster than its handlers run is pushed back by TCP. Delivery events (hook calls) are not
bounded: they come from pushes and acks, which the reader must never wait on. Both go
through one queue so the worker sees everything in order.

Unlike an anyio memory stream and semaphore, taking an item that is ready and making room
that exists cost no trip through the event loop; a task waits only when it must.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

__all__ = ("Inbox",)

T = TypeVar("T")


class Inbox(Generic[T]):
    """A FIFO of items for one consumer; ``limit`` bounds the messages in it.

    A message counts from :meth:`put_message` until the consumer calls
    :meth:`message_done` (so one being handled still takes its place).
    """

    def __init__(self, limit: int) -> None:
        self._items: deque[T] = deque()
        self._limit = limit
        self._messages = 0
        self._ready: anyio.Event | None = None
        self._room: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Queue an item that is not counted against the limit (an event, the end)."""
        self._items.append(item)
        ready = self._ready
        if ready is not None:
            self._ready = None
            ready.set()

    async def put_message(self, item: T) -> None:
        """Queue a message, first waiting while ``limit`` messages are queued or handled."""
        while self._messages >= self._limit:
            room = self._room
            if room is None:
                room = self._room = anyio.Event()
            await room.wait()
        self._messages += 1
        self.put(item)

    def put_message_nowait(self, item: T) -> None:
        """Queue a message without waiting for room (it still counts)."""
        self._messages += 1
        self.put(item)

    def message_done(self) -> None:
        """The consumer is done with one message: room for the next."""
        if self._messages > 0:
            self._messages -= 1
        room = self._room
        if room is not None and self._messages < self._limit:
            self._room = None
            room.set()

    async def get(self) -> T:
        """Take the next item, waiting if there is none."""
        items = self._items
        while not items:
            ready = self._ready
            if ready is None:
                ready = self._ready = anyio.Event()
            await ready.wait()
        return items.popleft()

    def get_nowait(self) -> T:
        """Take the next item; raises :class:`anyio.WouldBlock` if there is none."""
        if not self._items:
            raise anyio.WouldBlock
        return self._items.popleft()
