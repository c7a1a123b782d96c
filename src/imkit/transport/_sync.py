"""Light synchronisation for the hot path: the reader→worker queue, the handler limit.

Messages (route calls) are bounded: the reader waits for room, so a client that sends
faster than its handlers run is pushed back by TCP. Delivery events (hook calls) are not
bounded: they come from pushes and acks, which the reader must never wait on. Both go
through one queue so the worker sees everything in order.

Unlike an anyio memory stream and semaphore, taking an item that is ready and making room
that exists cost no trip through the event loop; a task waits only when it must.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import anyio

__all__ = ("EventFactory", "Flag", "Inbox", "Slots")

T = TypeVar("T")
D = TypeVar("D")


class EventFactory:
    """Makes :class:`anyio.Event` objects of the running backend's class directly.

    ``anyio.Event()`` looks the backend up on every call; a connection makes one each time
    its worker waits, so the class found the first time is kept.
    """

    __slots__ = ("_cls",)

    def __init__(self) -> None:
        self._cls: type[anyio.Event] | None = None

    def __call__(self) -> anyio.Event:
        """A new, unset event."""
        cls = self._cls
        if cls is None:
            event = anyio.Event()
            self._cls = type(event)
            return event
        return cls()


class Flag:
    """A one-way flag tasks can wait for, like :class:`anyio.Event`, that makes its event
    only when a task waits before it is set: a connection has several of these, and most
    are set without anyone waiting (an idle connection keeps them all)."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        """Set the flag and wake the waiters."""
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._set

    async def wait(self) -> None:
        """Wait until the flag is set (return at once if it is)."""
        if self._set:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class Slots:
    """A counting limit shared by many tasks (the server's concurrent handlers).

    Like :class:`anyio.CapacityLimiter` without per-task bookkeeping: taking a free slot
    costs no trip through the event loop, and waiters are served first come, first served
    (a released slot goes straight to the oldest waiter).
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("total must be at least 1")
        self.total = total
        self.borrowed = 0
        """Slots in use."""
        self._waiters: deque[anyio.Event] = deque()
        self._event = EventFactory()

    @property
    def waiting(self) -> int:
        """Tasks waiting for a slot."""
        return len(self._waiters)

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free and nobody waits for one; say whether it did."""
        if self.borrowed < self.total and not self._waiters:
            self.borrowed += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting for one if none is free."""
        if self.acquire_nowait():
            return
        event = self._event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        """Give a slot back (to the oldest waiter, if any)."""
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self.borrowed -= 1


class _Waker(Protocol):
    """What :class:`Inbox` needs of an event: set it, wait for it."""

    def set(self) -> None:
        """Wake the waiters."""
        ...

    def wait(self) -> Awaitable[None]:
        """Wait until :meth:`set` (a fresh one: never set before)."""
        ...


class _LoopWaker:
    """A wake-up on a known asyncio loop: a bare future. An :class:`anyio.Event` there
    wraps an :class:`asyncio.Event`, which finds the loop, takes a lock and makes the same
    future for each wait."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        """Wake the waiters (none if their wait was cancelled)."""
        if not self._future.done():
            self._future.set_result(None)

    def wait(self) -> Awaitable[None]:
        """Wait until :meth:`set`."""
        return self._future


class Inbox(Generic[T]):
    """A FIFO of items for one consumer; ``limit`` bounds the messages in it.

    A message counts from :meth:`put_message` until the consumer calls
    :meth:`message_done` (so one being handled still takes its place).
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the asyncio event loop every waiter runs in, if known (a wait is then
        a bare future of that loop instead of an :class:`anyio.Event`)."""
        self._items: list[T] = []  # short (``limit`` messages and a few events): a list
        # costs less memory than a deque on an idle connection
        self._limit = limit
        self._messages = 0
        self._ready: _Waker | None = None
        self._room: _Waker | None = None
        self._loop = loop
        self._events = EventFactory() if loop is None else None
        self._on_room: Callable[[], None] | None = None
        self._on_first: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def _event(self) -> _Waker:
        loop = self._loop
        if loop is not None:
            return _LoopWaker(loop)
        assert self._events is not None
        return self._events()

    def when_first_item(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) when the first item is queued (the consumer can be
        started lazily: an idle connection then has none)."""
        if self._items:
            callback()
        else:
            self._on_first = callback

    def put(self, item: T) -> None:
        """Queue an item that is not counted against the limit (an event, the end)."""
        self._items.append(item)
        self._wake()

    async def put_message(self, item: T) -> None:
        """Queue a message, first waiting while ``limit`` messages are queued or handled."""
        while self._messages >= self._limit:
            room = self._room
            if room is None:
                room = self._room = self._event()
            await room.wait()
        self._messages += 1
        self.put(item)

    def put_message_nowait(self, item: T) -> None:
        """Queue a message without waiting for room (it still counts)."""
        self._messages += 1
        self.put(item)

    def put_messages_nowait(self, items: Sequence[T]) -> None:
        """Queue messages without waiting for room (they still count), in order: as many
        :meth:`put_message_nowait` calls, with the consumer woken once."""
        if not items:
            return
        self._messages += len(items)
        self._items.extend(items)
        self._wake()

    def _wake(self) -> None:
        """Items were queued: start the consumer (the first time), wake it if it waits."""
        on_first = self._on_first
        if on_first is not None:
            self._on_first = None
            on_first()
        ready = self._ready
        if ready is not None:
            self._ready = None
            ready.set()

    @property
    def full(self) -> bool:
        """Whether ``limit`` messages are queued or being handled."""
        return self._messages >= self._limit

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) as soon as the queue is no longer :attr:`full`."""
        if not self.full:
            callback()
        else:
            self._on_room = callback

    def message_done(self) -> None:
        """The consumer is done with one message: room for the next."""
        if self._messages > 0:
            self._messages -= 1
        on_room = self._on_room
        if on_room is not None and self._messages < self._limit:
            self._on_room = None
            on_room()
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
                ready = self._ready = self._event()
            await ready.wait()
        return items.pop(0)

    def get_nowait_or(self, default: D) -> T | D:
        """Take the next item, or return ``default`` if there is none."""
        items = self._items
        return items.pop(0) if items else default

    def get_nowait(self) -> T:
        """Take the next item; raises :class:`anyio.WouldBlock` if there is none."""
        if not self._items:
            raise anyio.WouldBlock
        return self._items.pop(0)
