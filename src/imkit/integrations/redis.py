"""Multi-node discovery on Redis: :class:`RedisDiscover`, a ``Discover`` implementation.

Presence is a lease: each node keeps a key alive by renewing it, so when a node dies its
users vanish with it. Each binding is keyed by its connection epoch, so the late close of
an old connection can only ever remove its own binding. Each node listens on its own
pub/sub channel for :class:`~imkit.core.interfaces.Forward` messages.

Key layout (``P`` is ``key_prefix``)::

    P:node:{node_id}         lease: the node's incarnation id, PX expiry, renewed
    P:node:{node_id}:users   set of the node's bindings (JSON ``[user_id, epoch]``), same expiry
    P:node:{node_id}:fwd     the node's pub/sub channel
    P:user:{user_id}         hash: field = epoch, value = JSON ``{"node", "device", "inc"}``

A binding is live while its node's lease holds the incarnation (``inc``) that wrote it: a
dead node's bindings, and those of a previous run of a node restarted under the same id,
are filtered out with one ``MGET`` and deleted lazily by whoever sees them, by a script
that re-checks the lease, so that a node coming back never loses a binding it re-wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.abc

try:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised in a test with redis hidden
    raise ImportError(
        "imkit.integrations.redis needs redis-py; install it with: pip install 'imkit[redis]'"
    ) from exc

from imkit.core.frames import Frame, decode_frame, encode_frame
from imkit.core.interfaces import Binding, Forward, ForwardHandler
from imkit.exceptions import ConfigurationError, DiscoverError

__all__ = ("RedisDiscover", "decode_forward", "encode_forward")

_LOG = logging.getLogger("imkit.integrations.redis")

# Publish only to a node whose lease is alive: -1 = dead, else the number of subscribers.
_FORWARD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""
# KEYS[1] = a user's hash; KEYS[i] (i >= 2) = the lease of the node of the binding whose
# epoch and incarnation are ARGV[2i-3] and ARGV[2i-2]. Delete it if the lease moved on.
_PRUNE_LUA = """
local removed = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[2 * i - 2] then
    removed = removed + redis.call('HDEL', KEYS[1], ARGV[2 * i - 3])
  end
end
return removed
"""
_UNLEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1], KEYS[2]) end
return -1
"""
_CHUNK = 500  # commands per pipeline when re-writing many bindings
_RETRY_FIRST = 0.05  # first back-off delay of the background tasks, doubled up to a cap
_RECONNECT_CAP = 5.0  # cap of the pub/sub reconnection back-off


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _drop(message: Forward) -> None:
    """The forward handler until :meth:`RedisDiscover.start` sets the real one."""


def _backoff(failures: int, cap: float) -> float:
    """Exponential back-off with jitter, never below half the first delay, never above cap."""
    delay: float = min(cap, _RETRY_FIRST * 2.0 ** min(failures - 1, 20))
    return delay * random.uniform(0.5, 1.0)


def encode_forward(message: Forward) -> str:
    """Serialize ``message`` as the JSON text published on a node's channel."""
    frame = None if message.frame is None else encode_frame(message.frame)
    return _json(
        {
            "v": 1,
            "kind": message.kind,
            "user_id": message.user_id,
            "origin_node": message.origin_node,
            "epoch": message.epoch,
            "frame": frame,
        }
    )


def decode_forward(text: str | bytes) -> Forward:
    """Parse what :func:`encode_forward` produced; raise ``ValueError`` on anything else."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("forward is not a JSON object")
    fields = {name: obj.get(name, "") for name in ("kind", "user_id", "origin_node", "epoch")}
    if not all(isinstance(value, str) for value in fields.values()) or not fields["kind"]:
        raise ValueError("forward has a missing or non-string field")
    raw = obj.get("frame")
    frame: Frame | None = None
    if raw is not None:
        if not isinstance(raw, str):
            raise ValueError("forward frame is not a string")
        decoded = decode_frame(raw)
        if not isinstance(decoded, Frame):
            raise ValueError(f"forward frame does not decode: {decoded.message}")
        frame = decoded
    return Forward(frame=frame, **fields)


class RedisDiscover:
    """A :class:`~imkit.core.interfaces.Discover` for a cluster of nodes sharing one Redis.

    ``url`` is a redis-py URL (``redis://host:port/db``); or pass ``client=`` (or use
    :meth:`from_client`) to share an existing ``redis.asyncio.Redis``, which is then not
    closed by :meth:`stop`. ``node_id`` defaults to a random uuid; it may not contain ``:``.
    A node is alive while its lease (``lease_seconds``) is renewed, every ``renew_interval``
    seconds (default: a third of the lease).

    The background tasks (lease renewal, forward reader) run in an asyncio task of their
    own (redis-py is asyncio-only), so :meth:`start` and :meth:`stop` may be called from
    any task and inside any cancel scopes, e.g. :meth:`stop` from a shielded cleanup. Failing
    Redis operations raise :class:`~imkit.exceptions.DiscoverError`; the background tasks
    survive Redis restarts and killed connections, and re-register the lease, resubscribe
    and re-write this node's bindings once Redis is back.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        client: aioredis.Redis | None = None,
        node_id: str | None = None,
        lease_seconds: float = 10.0,
        renew_interval: float | None = None,
        key_prefix: str = "imkit",
        logger: logging.Logger | None = None,
    ) -> None:
        if not (lease_seconds > 0 and math.isfinite(lease_seconds)):
            raise ConfigurationError(f"lease_seconds must be positive, got {lease_seconds!r}")
        renew = lease_seconds / 3 if renew_interval is None else renew_interval
        if not 0 < renew < lease_seconds:
            raise ConfigurationError(
                f"renew_interval must be positive and below lease_seconds, got {renew!r}"
            )
        self._node_id = node_id if node_id is not None else uuid.uuid4().hex
        if not self._node_id or ":" in self._node_id:
            raise ConfigurationError(f"node_id must be non-empty without ':', got {node_id!r}")
        self._owns_client = client is None
        if client is None:
            retry = Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), retries=3)
            client = aioredis.Redis.from_url(url, decode_responses=True, retry=retry)
        self._client = client
        self._incarnation = uuid.uuid4().hex  # tells this run's bindings from a previous one's
        self._lease_seconds = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._renew_interval = renew
        self._prefix = key_prefix
        self._logger = logger if logger is not None else _LOG
        self._forward_script = client.register_script(_FORWARD_LUA)
        self._local: dict[tuple[str, str], Binding] = {}  # this node's bindings by (user, epoch)
        self._unbound: dict[tuple[str, str], Binding] = {}  # unbinds Redis has not confirmed
        self._write_lock = anyio.Lock()  # orders binding writes against a full re-write
        self._on_forward: ForwardHandler = _drop
        self._runner: asyncio.Task[None] | None = None  # hosts the background tasks
        self._first_pubsub: PubSub | None = None  # until the reader task takes it over
        self._renew_scope: anyio.CancelScope | None = None  # set by the background tasks
        self._reader_scope: anyio.CancelScope | None = None
        self._reregister = False

    @classmethod
    def from_client(cls, client: aioredis.Redis, **kwargs: Any) -> RedisDiscover:
        """Build on an existing client (not closed by :meth:`stop`); ``kwargs`` as for the class."""
        return cls(client=client, **kwargs)

    @property
    def node_id(self) -> str:
        """This node's id, unique in the cluster."""
        return self._node_id

    def _node_key(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}"

    def _users_key(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}:users"

    def _channel(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}:fwd"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}:user:{user_id}"

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise DiscoverError(f"Redis {what} failed: {type(exc).__name__}: {exc}") from exc

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, on_forward: ForwardHandler) -> None:
        """Register the node and subscribe to its channel; ``on_forward`` gets each forward.

        Returns once the lease is written and Redis has confirmed the subscription.
        """
        if self._runner is not None:
            raise RuntimeError("RedisDiscover is already started")
        self._on_forward = on_forward
        await self._register()
        self._first_pubsub = await self._open_pubsub()
        runner = asyncio.get_running_loop().create_task(
            self._background(), name=f"imkit-redis-{self._node_id}"
        )
        runner.add_done_callback(self._background_done)
        self._runner = runner
        self._logger.info("node %s registered (lease %.3g s)", self._node_id, self._lease_seconds)

    async def _background(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_loop, name=f"imkit-redis-lease-{self._node_id}")
            tg.start_soon(self._reader_loop, name=f"imkit-redis-reader-{self._node_id}")

    def _background_done(self, runner: asyncio.Task[None]) -> None:
        if not runner.cancelled() and runner.exception() is not None:
            self._logger.error(
                "node %s: background tasks failed", self._node_id, exc_info=runner.exception()
            )

    async def stop(self) -> None:
        """Stop the background tasks, delete the lease and release this node's users.

        Never raises for Redis failures: they are logged, and the lease expires by itself.
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({runner})
        pubsub, self._first_pubsub = self._first_pubsub, None
        if pubsub is not None:  # cancelled before the reader task ever ran
            await self._close_pubsub(pubsub)
        with anyio.move_on_after(max(self._lease_seconds, 1.0), shield=True) as scope:
            try:
                await self._goodbye()
            except (RedisError, OSError) as exc:
                self._logger.warning("node %s: could not unregister: %s", self._node_id, exc)
        if scope.cancelled_caught:
            self._logger.warning("node %s: unregistering timed out", self._node_id)
        self._local.clear()
        self._unbound.clear()
        if self._owns_client:
            with anyio.CancelScope(shield=True):
                await self._client.aclose()

    async def _goodbye(self) -> None:
        node_key, users_key = self._node_key(self._node_id), self._users_key(self._node_id)
        async with self._write_lock:
            mine = [*self._local, *self._unbound]
            # Delete the lease and the set only if still ours (not a newer run's, same id).
            pipe = self._client.pipeline(transaction=False)
            pipe.smembers(users_key)
            pipe.eval(_UNLEASE_LUA, 2, node_key, users_key, self._incarnation)
            members, owned = await pipe.execute()
            if int(owned) >= 0:
                mine += [tuple(json.loads(_text(m))) for m in members]
            released = set(mine)
            pipe = self._client.pipeline(transaction=True)
            for user_id, epoch in released:
                pipe.hdel(self._user_key(user_id), epoch)
            await pipe.execute()
        self._logger.info(
            "node %s unregistered, %d bindings released", self._node_id, len(released)
        )

    async def _register(self) -> None:
        """Write the lease, then make Redis hold exactly this node's local bindings."""
        users_key, lease = self._users_key(self._node_id), self._lease_ms
        with self._translate("node registration"):
            async with self._write_lock:
                members = await self._client.smembers(users_key)
                stored = {tuple(json.loads(_text(m))) for m in members}
                unbound = dict(self._unbound)
                stale = (stored | unbound.keys()) - self._local.keys()
                commands: list[tuple[str, tuple[Any, ...]]] = []
                for user_id, epoch in stale:
                    commands.append(("hdel", (self._user_key(user_id), epoch)))
                    commands.append(("srem", (users_key, _json([user_id, epoch]))))
                for (user_id, epoch), binding in self._local.items():
                    commands.append(("hset", (self._user_key(user_id), *self._field(binding))))
                    commands.append(("sadd", (users_key, _json([user_id, epoch]))))
                for start in range(0, len(commands) + 1, _CHUNK):
                    pipe = self._client.pipeline(transaction=False)
                    if start == 0:  # the lease first, or the bindings could be pruned as dead
                        pipe.set(self._node_key(self._node_id), self._incarnation, px=lease)
                    for name, args in commands[start : start + _CHUNK]:
                        getattr(pipe, name)(*args)
                    pipe.pexpire(users_key, lease)
                    await pipe.execute()
                for key, binding in unbound.items():
                    if self._unbound.get(key) is binding:
                        del self._unbound[key]

    def _failed(self, what: str, exc: Exception, failures: int) -> None:
        """Log a background failure: a warning the first time, then debug; bugs in full."""
        if not isinstance(exc, (RedisError, OSError, DiscoverError)):
            self._logger.error("node %s: %s", self._node_id, what, exc_info=exc)
        else:
            log = self._logger.warning if failures == 1 else self._logger.debug
            log("node %s: %s (%s)", self._node_id, what, exc)

    async def _renew(self) -> bool:
        """Extend the lease if it still exists; ``False`` if it was lost."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._node_key(self._node_id), self._incarnation, px=self._lease_ms, xx=True)
        pipe.pexpire(self._users_key(self._node_id), self._lease_ms)
        renewed, _ = await pipe.execute()
        return bool(renewed)

    async def _renew_loop(self) -> None:
        failures = 0
        with anyio.CancelScope() as self._renew_scope:
            while True:
                try:
                    if self._reregister:
                        await self._register()
                        self._reregister = False
                        n = len(self._local)
                        self._logger.info("node %s re-registered, %d bindings", self._node_id, n)
                    elif not await self._renew():
                        self._logger.warning(
                            "node %s: lease lost (expired, or Redis restarted); re-registering",
                            self._node_id,
                        )
                        self._reregister = True
                        continue
                    failures, delay = 0, self._renew_interval
                except Exception as exc:  # noqa: BLE001 - logged by _failed; must survive
                    failures += 1
                    self._reregister = True
                    delay = _backoff(failures, self._renew_interval)
                    self._failed("lease renewal failed; retrying", exc, failures)
                await anyio.sleep(delay)

    # -- receiving forwards -------------------------------------------------------------

    async def _open_pubsub(self) -> PubSub:
        """Subscribe to this node's channel and wait until Redis confirms it."""
        pubsub = self._client.pubsub()
        try:
            with self._translate("subscribe"), anyio.fail_after(max(self._lease_seconds, 1.0)):
                await pubsub.subscribe(self._channel(self._node_id))
                while True:
                    msg = await pubsub.get_message(timeout=self._renew_interval)
                    if msg is not None and _text(msg["type"]) == "subscribe":
                        return pubsub
        except BaseException:
            await self._close_pubsub(pubsub)
            raise

    async def _close_pubsub(self, pubsub: PubSub) -> None:
        with anyio.move_on_after(1.0, shield=True):
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                self._logger.debug("closing the pub/sub connection failed: %s", exc)

    async def _reader_loop(self) -> None:
        pubsub, self._first_pubsub = self._first_pubsub, None
        failures = 0
        with anyio.CancelScope() as self._reader_scope:
            while True:
                began = anyio.current_time()
                try:
                    if pubsub is None:
                        pubsub = await self._open_pubsub()
                        self._logger.info("node %s resubscribed to its channel", self._node_id)
                    await self._read(pubsub)
                except Exception as exc:  # noqa: BLE001 - logged by _failed; must survive
                    # A connection that worked for a while starts the back-off afresh.
                    failures = 1 if anyio.current_time() - began > 10 else failures + 1
                    self._failed("pub/sub connection lost; reconnecting", exc, failures)
                finally:
                    if pubsub is not None:
                        await self._close_pubsub(pubsub)
                        pubsub = None
                await anyio.sleep(_backoff(failures, _RECONNECT_CAP))

    async def _read(self, pubsub: PubSub) -> None:
        """Dispatch messages; PING when idle, and give up on a connection that stops answering."""
        ping_deadline: float | None = None
        while True:
            msg = await pubsub.get_message(timeout=self._renew_interval)
            if msg is not None:
                ping_deadline = None  # anything received proves the connection alive
                kind = _text(msg["type"])
                if kind == "message":
                    await self._dispatch(msg["data"])
                elif kind == "subscribe":  # redis-py reconnected by itself and resubscribed
                    self._logger.warning("node %s: pub/sub reconnected", self._node_id)
            elif ping_deadline is None:
                await pubsub.ping()
                ping_deadline = anyio.current_time() + max(self._lease_seconds, 1.0)
            elif anyio.current_time() > ping_deadline:
                raise RedisConnectionError("the pub/sub connection stopped answering PING")

    async def _dispatch(self, data: bytes | str) -> None:
        try:
            message = decode_forward(data)
        except (ValueError, RecursionError) as exc:
            self._logger.warning("node %s: dropping a malformed forward: %s", self._node_id, exc)
            return
        try:
            await self._on_forward(message)
        except Exception:
            self._logger.exception("node %s: forward handler failed", self._node_id)

    # -- bindings -----------------------------------------------------------------------

    def _field(self, binding: Binding) -> tuple[str, str]:
        value = {"node": binding.node_id, "device": binding.device_id, "inc": self._incarnation}
        return binding.epoch, _json(value)

    def _parse(self, user_id: str, raw: dict[Any, Any]) -> list[tuple[Binding, str]]:
        """The stored bindings of ``user_id``, each with the incarnation that wrote it."""
        found = []
        for field, value in raw.items():
            try:
                obj = json.loads(value)
                binding = Binding(user_id, obj["node"], _text(field), obj.get("device", ""))
                found.append((binding, str(obj.get("inc", ""))))
            except (ValueError, TypeError, KeyError, AttributeError):
                self._logger.debug("ignoring a malformed binding of %r: %r", user_id, value)
        return found

    async def _live(
        self, candidates: dict[str, list[tuple[Binding, str]]]
    ) -> dict[str, list[Binding]]:
        """Keep the bindings written by their node's current lease; prune the others."""
        nodes = sorted({b.node_id for found in candidates.values() for b, _ in found})
        if not nodes:
            return {}
        values = await self._client.mget([self._node_key(n) for n in nodes])
        leases = {n: _text(v) for n, v in zip(nodes, values, strict=True) if v is not None}
        live: dict[str, list[Binding]] = {}
        dead: dict[str, list[tuple[Binding, str]]] = {}
        for user_id, found in candidates.items():
            for b, inc in found:
                if leases.get(b.node_id) == inc:
                    live.setdefault(user_id, []).append(b)
                else:
                    dead.setdefault(user_id, []).append((b, inc))
        if dead:
            await self._prune(dead)
        return live

    async def _prune(self, dead: dict[str, list[tuple[Binding, str]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for user_id, found in dead.items():
            keys = [self._user_key(user_id)] + [self._node_key(b.node_id) for b, _ in found]
            pipe.eval(
                _PRUNE_LUA, len(keys), *keys, *(x for b, inc in found for x in (b.epoch, inc))
            )
        try:
            removed = await pipe.execute()
        except (RedisError, OSError) as exc:  # only housekeeping: the answer is still right
            self._logger.debug("pruning dead bindings failed: %s", exc)
            return
        self._logger.debug("pruned %d bindings of dead nodes", sum(int(n) for n in removed))

    async def bind(self, binding: Binding) -> list[Binding]:
        """Record ``binding`` (of this node); return the user's *other* live bindings.

        The binding is also kept locally and re-written after Redis loses it (restart,
        lapsed lease), even when this call fails with :class:`~imkit.exceptions.DiscoverError`.
        """
        if binding.node_id != self._node_id:
            raise ValueError(f"binding is for node {binding.node_id!r}, not {self._node_id!r}")
        user_key, users_key = self._user_key(binding.user_id), self._users_key(self._node_id)
        self._local[binding.user_id, binding.epoch] = binding
        with self._translate("bind"):
            async with self._write_lock:
                pipe = self._client.pipeline(transaction=True)
                pipe.hset(user_key, *self._field(binding))
                pipe.sadd(users_key, _json([binding.user_id, binding.epoch]))
                pipe.pexpire(users_key, self._lease_ms)
                pipe.hgetall(user_key)
                raw = (await pipe.execute())[-1]
            others = [f for f in self._parse(binding.user_id, raw) if f[0].epoch != binding.epoch]
            live = await self._live({binding.user_id: others})
        return live.get(binding.user_id, [])

    async def unbind(self, binding: Binding) -> None:
        """Remove ``binding`` if it is still recorded with its epoch; newer ones are untouched.

        If Redis fails, the removal is retried when it is back (after the ``DiscoverError``).
        """
        key = (binding.user_id, binding.epoch)
        self._local.pop(key, None)
        if binding.node_id == self._node_id:
            self._unbound[key] = binding
        with self._translate("unbind"):
            async with self._write_lock:
                pipe = self._client.pipeline(transaction=True)
                pipe.hdel(self._user_key(binding.user_id), binding.epoch)
                pipe.srem(self._users_key(binding.node_id), _json([*key]))
                await pipe.execute()
        self._unbound.pop(key, None)

    async def locate(self, user_ids: Sequence[str]) -> dict[str, list[Binding]]:
        """The live bindings of each user in ``user_ids`` (users with none are left out)."""
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        with self._translate("locate"):
            pipe = self._client.pipeline(transaction=False)
            for user_id in unique:
                pipe.hgetall(self._user_key(user_id))
            raws = await pipe.execute()
            found = {u: self._parse(u, raw) for u, raw in zip(unique, raws, strict=True) if raw}
            return await self._live(found)

    async def forward(self, node_id: str, message: Forward) -> None:
        """Publish ``message`` on ``node_id``'s channel.

        Raises :class:`~imkit.exceptions.DiscoverError` when it was not delivered: the node is
        dead (no lease), nobody listens on its channel, or Redis failed.
        """
        payload = encode_forward(message)
        with self._translate("forward"):
            keys, args = [self._node_key(node_id)], [self._channel(node_id), payload]
            receivers = int(await self._forward_script(keys=keys, args=args))
        if receivers < 0:
            raise DiscoverError(f"node {node_id!r} is dead (no lease); forward not delivered")
        if receivers == 0:
            raise DiscoverError(f"node {node_id!r} is not listening; forward not delivered")
