"""Many imkit nodes on one machine: in-process servers, ``imkit serve`` processes, a balancer.

Every node is a complete chat server (:func:`imkit.chat.app.create_chat_app`) with its own
:class:`~imkit.integrations.redis.RedisDiscover` (a distinct node id, the test's key prefix)
and its own :class:`~imkit.integrations.postgres.PostgresStore` (the test's schema). Users
authenticate with ``?userId=`` (:class:`~imkit.InsecureDevAuth`), so a test can put any
user on any node. Each node names its Redis connections ``{prefix}-{node}`` so that a test
can kill exactly those connections and no other client of the shared Redis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.abc
import attrs
import redis

from imkit import InsecureDevAuth, Server
from imkit.chat.app import create_chat_app
from imkit.chat.client import ChatClient
from imkit.chat.service import ChatService
from imkit.integrations.postgres import PostgresStore
from imkit.integrations.redis import RedisDiscover
from imkit.transport.client import Client, connect


@attrs.frozen
class Services:
    """Where the nodes of one test keep their state: a Redis key prefix, a Postgres schema."""

    redis_url: str
    dsn: str
    schema: str
    prefix: str


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query string."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return parts._replace(query=query).geturl()


def client_name(services: Services, node: str) -> str:
    """The Redis client name of node ``node``'s connections."""
    return f"{services.prefix}-{node}"


async def eventually(
    check: Callable[[], Any],
    *,
    within: float,
    interval: float = 0.02,
    what: str = "the condition",
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = anyio.current_time() + within
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if anyio.current_time() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        await anyio.sleep(interval)


class Node:
    """An in-process imkit node; run it with :meth:`Cluster.start`."""

    def __init__(
        self,
        services: Services,
        name: str,
        *,
        ack_mode: str = "only",
        login_policy: str = "single",
        lease: float = 5.0,
        dsn: str | None = None,
    ) -> None:
        self.name = name
        redis_url = with_query(services.redis_url, client_name=client_name(services, name))
        self.discover = RedisDiscover(
            redis_url, node_id=name, key_prefix=services.prefix, lease_seconds=lease
        )
        self.store = PostgresStore(
            dsn or services.dsn,
            schema=services.schema,
            min_size=1,
            max_size=4,
            connect_timeout=2.0,
            command_timeout=5.0,
        )
        app, service = create_chat_app(
            self.store,
            auth=InsecureDevAuth(quiet=True),
            auth_kind="dev",
            ack_mode=ack_mode,
            login_policy=login_policy,
            discover=self.discover,
            serve_page=False,
        )
        self.service: ChatService = service
        self.server = Server(app, shutdown_timeout=3.0)
        self.port = 0
        self.stopped = anyio.Event()

    def url(self, user: str, device: str = "") -> str:
        """The WebSocket URL that logs ``user`` (and ``device``) in on this node."""
        query = {"userId": user, **({"deviceId": device} if device else {})}
        return f"ws://127.0.0.1:{self.port}/ws?{urlencode(query)}"

    async def run(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        try:
            await self.server.serve("127.0.0.1", 0, task_status=task_status)
        finally:
            self.stopped.set()


class Cluster:
    """In-process nodes, each serving in its own task until :meth:`stop` or the end."""

    def __init__(self, services: Services, tg: anyio.abc.TaskGroup, **node_options: Any) -> None:
        self.services = services
        self._tg = tg
        self._options = node_options
        self.nodes: list[Node] = []

    async def start(self, name: str, **options: Any) -> Node:
        node = Node(self.services, name, **{**self._options, **options})
        await self._tg.start(node.run)
        node.port = node.server.port or 0
        self.nodes.append(node)
        return node

    async def stop(self, node: Node) -> None:
        """Graceful stop: close the connections with 1001, say goodbye to Redis."""
        node.server.shutdown()
        with anyio.fail_after(10):
            await node.stopped.wait()

    async def stop_all(self) -> None:
        for node in self.nodes:
            node.server.shutdown()
        with anyio.fail_after(15):
            for node in self.nodes:
                await node.stopped.wait()


@asynccontextmanager
async def cluster(services: Services, **node_options: Any) -> AsyncIterator[Cluster]:
    """A :class:`Cluster` whose nodes are stopped gracefully at the end."""
    async with anyio.create_task_group() as tg:
        group = Cluster(services, tg, **node_options)
        try:
            yield group
        finally:
            with anyio.CancelScope(shield=True):
                await group.stop_all()


class Inbox:
    """What one client received: raw pushes, or chat messages through :class:`ChatClient`."""

    def __init__(self, client: Client, user: str) -> None:
        self.client = client
        self.chat = ChatClient(client, user_id=user)
        self.messages: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []

    async def read_chat(self) -> None:
        """Collect each chat message once, in seq order, gaps pulled (the client library)."""
        async for message in self.chat.messages():
            self.messages.append(message)

    async def read_raw(self) -> None:
        """Collect every ``push`` frame's data exactly as the server sent it."""
        async for frame in self.client:
            if frame.method == "push" and isinstance(frame.data, dict):
                self.frames.append(frame.data)

    def seqs(self, raw: bool = False) -> list[int]:
        return [int(m["seq"]) for m in (self.frames if raw else self.messages)]

    def contents(self, raw: bool = False) -> list[str]:
        return [str(m["msg"]["content"]) for m in (self.frames if raw else self.messages)]


@asynccontextmanager
async def chat_client(
    url: str,
    user: str,
    *,
    raw: bool = False,
    **options: Any,
) -> AsyncIterator[Inbox]:
    """A connected client for ``user`` whose received messages are collected in the Inbox:
    raw push frames (``raw``), or chat messages as :class:`ChatClient` hands them out."""
    options.setdefault("keepalive", None)
    options.setdefault("reconnect_delay", 0.05)
    options.setdefault("max_reconnect_delay", 0.5)
    async with connect(url, **options) as client, anyio.create_task_group() as tg:
        inbox = Inbox(client, user)
        tg.start_soon(inbox.read_raw if raw else inbox.read_chat)
        try:
            yield inbox
        finally:
            tg.cancel_scope.cancel()


class Balancer:
    """A TCP load balancer on loopback: round robin over the backends, skipping those that
    refuse the connection (as HAProxy or nginx do with a dead upstream)."""

    def __init__(self, tg: anyio.abc.TaskGroup, backends: list[int]) -> None:
        self._tg = tg
        self.backends = list(backends)
        self._next = 0
        self.port = 0
        self.picked: list[int] = []  # the backend port of each accepted connection

    async def start(self) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._tg.start_soon(listener.serve, self._handle)

    def url(self, user: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?{urlencode({'userId': user})}"

    async def _connect(self) -> anyio.abc.SocketStream | None:
        for _ in range(len(self.backends)):
            port = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                continue
            self.picked.append(port)
            return stream
        return None

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            upstream = await self._connect()
            if upstream is None:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pipe, client, upstream, tg.cancel_scope)
                tg.start_soon(_pipe, upstream, client, tg.cancel_scope)


class Gate:
    """A TCP proxy to one server that can be taken down (connections cut, new ones
    refused: the port is closed) and brought back on the same port."""

    def __init__(self, tg: anyio.abc.TaskGroup, host: str, port: int) -> None:
        self._tg = tg
        self._target = (host, port)
        self._scope = anyio.CancelScope()
        self.port = 0

    async def up(self) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._scope = anyio.CancelScope()
        self._tg.start_soon(self._serve, listener, self._scope)

    def down(self) -> None:
        self._scope.cancel()

    async def _serve(self, listener: anyio.abc.Listener[Any], scope: anyio.CancelScope) -> None:
        with scope:
            async with listener:
                await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self._target)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pipe, client, upstream, tg.cancel_scope)
                tg.start_soon(_pipe, upstream, client, tg.cancel_scope)


async def _pipe(
    src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope
) -> None:
    try:
        async for chunk in src:
            await dst.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    scope.cancel()


# The line ``imkit serve`` logs once it listens (the server's, or the command's own).
_SERVING = re.compile(r"(?:serving on |listening on http://)[^\s:/]+:(\d+)")


class ProcessNode:
    """A node run as a real process: ``python -m imkit serve --redis ... --postgres ...``."""

    def __init__(
        self, services: Services, name: str, *, lease: float, ack_mode: str = "only"
    ) -> None:
        self.name = name
        redis_url = with_query(services.redis_url, client_name=client_name(services, name))
        self.argv = [
            sys.executable,
            "-m",
            "imkit",
            "serve",
            "--auth",
            "dev",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ack",
            ack_mode,
            "--redis",
            redis_url,
            "--redis-prefix",
            services.prefix,
            "--postgres",
            services.dsn,
            "--postgres-schema",
            services.schema,
            "--node-id",
            name,
            "--lease",
            str(lease),
        ]
        self.process: anyio.abc.Process | None = None
        self.port = 0
        self.log: list[str] = []

    def url(self, user: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?{urlencode({'userId': user})}"

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the process and wait until it listens (the port comes from its log)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = await anyio.open_process(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
        )
        listening = anyio.Event()
        tg.start_soon(self._read_log, listening)
        try:
            with anyio.fail_after(20):
                await listening.wait()
        except BaseException as exc:
            await self.ensure_dead()  # never leave a process behind
            if isinstance(exc, TimeoutError):
                raise AssertionError("node did not start:\n" + "\n".join(self.log)) from None
            raise

    async def _read_log(self, listening: anyio.Event) -> None:
        assert self.process is not None and self.process.stderr is not None
        pending = b""
        async for chunk in self.process.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.log.append(text)
                found = _SERVING.search(text)
                if found:
                    self.port = int(found.group(1))
                    listening.set()

    async def kill(self) -> float:
        """SIGKILL: no goodbye, no close frames. Returns the time of death (monotonic)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(5):
            await self.process.wait()
        return time.monotonic()

    async def terminate(self) -> int:
        """SIGTERM: a graceful stop. Returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            return await self.process.wait()

    async def ensure_dead(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()


def kill_redis_clients(admin: redis.Redis, kind: str, names: set[str]) -> int:
    """``CLIENT KILL TYPE kind ID id`` for each connection named in ``names``; the count.

    Restricted by id to this test's own nodes: no other client of the Redis is touched.
    """
    killed = 0
    for info in admin.client_list(_type=kind):
        if info.get("name") in names:
            command = ("CLIENT", "KILL", "TYPE", kind, "ID", info["id"])
            killed += int(admin.execute_command(*command))  # type: ignore[no-untyped-call]
    return killed


@attrs.frozen
class Row:
    """One stored message, read straight from PostgreSQL (not through imkit's store)."""

    seq: int
    sender: str
    msg_id: str
    content: str


async def stored(services: Services, conversation_id: str) -> list[Row]:
    """The conversation's messages as PostgreSQL holds them, by seq."""
    import asyncpg  # type: ignore[import-untyped,unused-ignore]

    conn = await asyncpg.connect(services.dsn)
    try:
        rows = await conn.fetch(
            f'SELECT seq, sender_id, msg_id, content FROM "{services.schema}".imkit_messages'
            " WHERE conversation_id = $1 ORDER BY seq",
            conversation_id,
        )
    finally:
        await conn.close()
    return [Row(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]).decode()) for r in rows]


class RawChat:
    """A chat client imkit did not write (the ``websockets`` library, JSON by hand), to see
    exactly which frames the server answers a message with."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def chat(self, frame_id: str, msg_id: str, to: str, content: str) -> list[dict[str, Any]]:
        """Send one chat message; return the frames about it up to the reply or the Err.

        Pushes and replies (``Data`` frames) are acked with ``ackSeq: 1``, as the protocol asks.
        """
        import json

        frame = {
            "frameType": 0,
            "id": frame_id,
            "method": "conversation.chat",
            "data": {"chatType": 2, "recvId": to, "msgId": msg_id, "msg": {"content": content}},
        }
        await self.ws.send(json.dumps(frame))
        about: list[dict[str, Any]] = []
        while True:
            got = json.loads(await self.ws.recv())
            if got.get("frameType") == 0:  # a Data frame from the server: ack it
                await self.ws.send(json.dumps({"frameType": 2, "id": got["id"], "ackSeq": 1}))
            if got.get("id") == frame_id or got.get("replyTo") == frame_id:
                about.append(got)
                if got.get("frameType") == 9 or got.get("replyTo") == frame_id:
                    return about
