"""Multi-node discovery on Redis: :class:`RedisDiscover`, a ``Discover`` implementation.

Presence is a lease: each node keeps a key alive by renewing it, so when a node dies its
users vanish with it. Each binding is keyed by its connection epoch, so the late close of
an old connection can only ever remove its own binding. Each node listens on its own
pub/sub channel for :class:`~imkit.core.interfaces.Forward` messages.

Key layout (``P`` is ``key_prefix``)::

    P:node:{node_id}         lease (string, PX expiry), renewed every ``renew_interval``
    P:node:{node_id}:users   set of the node's bindings (JSON ``[user_id, epoch]``), same expiry
    P:node:{node_id}:fwd     the node's pub/sub channel
    P:user:{user_id}         hash: field = epoch, value = JSON ``{"node": ..., "device": ...}``

Bindings of dead nodes are filtered out by checking the leases (one ``MGET``) and deleted
lazily by whoever notices, with a script that re-checks the lease so that a node that comes
back never loses a binding it has just re-written.
"""

from __future__ import annotations

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

__all__ = ("RedisDiscover",)

_LOG = logging.getLogger("imkit.integrations.redis")

# Publish only to a node whose lease is alive: -1 = dead, else the number of subscribers.
_FORWARD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""
# KEYS[1] = a user's hash, KEYS[i+1] = the lease of the node of binding ARGV[i] (an epoch).
_PRUNE_LUA = """
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return removed
"""
_CHUNK = 500  # commands per pipeline when re-writing many bindings
_RETRY_FIRST = 0.05  # first back-off delay of the background tasks, doubled up to a cap
_RECONNECT_CAP = 5.0  # cap of the pub/sub reconnection back-off


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _backoff(failures: int, cap: float) -> float:
    """Exponential back-off with jitter, never below half the first delay, never above cap."""
    delay: float = min(cap, _RETRY_FIRST * 2.0 ** min(failures - 1, 20))
    return delay * random.uniform(0.5, 1.0)


def encode_forward(message: Forward) -> str:
    """Serialize ``message`` as the JSON text published on a node's channel."""
    obj = {
        "v": 1,
        "kind": message.kind,
        "user_id": message.user_id,
        "origin_node": message.origin_node,
        "epoch": message.epoch,
        "frame": None if message.frame is None else encode_frame(message.frame),
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


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

    :meth:`start` and :meth:`stop` must be called from the same task: the background tasks
    (lease renewal, forward reader) run in a task group entered by :meth:`start`. Failing
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
        if client is None:
            retry = Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), retries=3)
            client = aioredis.Redis.from_url(url, decode_responses=True, retry=retry)
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._lease_seconds = lease_seconds
        self._renew_interval = renew
        self._prefix = key_prefix
        self._logger = logger if logger is not None else _LOG
        self._forward_script = client.register_script(_FORWARD_LUA)
        self._local: dict[tuple[str, str], Binding] = {}  # this node's bindings, by (user, epoch)
        self._write_lock = anyio.Lock()  # orders binding writes against a full re-write
        self._on_forward: ForwardHandler | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._renew_scope: anyio.CancelScope | None = None  # created by start()
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

    @property
    def client(self) -> aioredis.Redis:
        """The redis-py client in use."""
        return self._client

    # -- keys ---------------------------------------------------------------------------

    def _node_key(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}"

    def _users_key(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}:users"

    def _channel(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}:fwd"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}:user:{user_id}"

    @staticmethod
    def _member(user_id: str, epoch: str) -> str:
        return json.dumps([user_id, epoch], ensure_ascii=False, separators=(",", ":"))

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise DiscoverError(f"Redis {what} failed: {type(exc).__name__}: {exc}") from exc

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, on_forward: ForwardHandler) -> None:
        """Register the node and subscribe to its channel; ``on_forward`` gets each forward.

        Returns once the lease is written and the subscription is confirmed by Redis.
        """
        if self._tg is not None:
            raise RuntimeError("RedisDiscover is already started")
        self._on_forward = on_forward
        await self._register()
        pubsub = await self._open_pubsub()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._renew_loop, name=f"imkit-redis-lease-{self._node_id}")
        tg.start_soon(self._reader_loop, pubsub, name=f"imkit-redis-reader-{self._node_id}")
        self._logger.info("node %s registered (lease %.3g s)", self._node_id, self._lease_seconds)

    async def stop(self) -> None:
        """Stop the background tasks, delete the lease and release this node's users.

        Never raises for Redis failures: they are logged, and the lease expires by itself.
        """
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        with anyio.move_on_after(max(self._lease_seconds, 1.0), shield=True) as scope:
            try:
                await self._goodbye()
            except (RedisError, OSError) as exc:
                self._logger.warning(
                    "node %s: could not unregister from Redis: %s", self._node_id, exc
                )
        if scope.cancelled_caught:
            self._logger.warning("node %s: unregistering from Redis timed out", self._node_id)
        self._local.clear()
        if self._owns_client:
            with anyio.CancelScope(shield=True):
                await self._client.aclose()

    async def _goodbye(self) -> None:
        async with self._write_lock:
            users_key = self._users_key(self._node_id)
            members = {_text(m) for m in await self._client.smembers(users_key)}
            members.update(self._member(u, e) for u, e in self._local)
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._node_key(self._node_id))
            for member in members:
                user_id, epoch = json.loads(member)
                pipe.hdel(self._user_key(user_id), epoch)
            pipe.delete(users_key)
            await pipe.execute()
        self._logger.info("node %s unregistered, %d bindings released", self._node_id, len(members))

    async def _register(self) -> None:
        """Write the lease, then make Redis hold exactly this node's local bindings."""
        node = self._node_id
        users_key = self._users_key(node)
        with self._translate("node registration"):
            async with self._write_lock:
                stored = {_text(m) for m in await self._client.smembers(users_key)}
                wanted = {self._member(u, e): b for (u, e), b in self._local.items()}
                commands: list[tuple[str, tuple[Any, ...]]] = []
                for member in stored - wanted.keys():
                    user_id, epoch = json.loads(member)
                    commands += [("hdel", (self._user_key(user_id), epoch))]
                    commands += [("srem", (users_key, member))]
                for member, binding in wanted.items():
                    commands += [("hset", (self._user_key(binding.user_id), *self._field(binding)))]
                    commands += [("sadd", (users_key, member))]
                for start in range(0, len(commands) + 1, _CHUNK):
                    pipe = self._client.pipeline(transaction=False)
                    if start == 0:  # lease first: a binding of a "dead" node may be pruned
                        pipe.set(self._node_key(node), node, px=self._lease_ms)
                    for name, args in commands[start : start + _CHUNK]:
                        getattr(pipe, name)(*args)
                    pipe.pexpire(users_key, self._lease_ms)
                    await pipe.execute()

    async def _renew_loop(self) -> None:
        failures = 0
        with anyio.CancelScope() as self._renew_scope:
            while True:
                try:
                    if self._reregister:
                        await self._register()
                        self._reregister = False
                        self._logger.warning(
                            "node %s re-registered with %d bindings",
                            self._node_id,
                            len(self._local),
                        )
                    else:
                        pipe = self._client.pipeline(transaction=False)
                        pipe.set(
                            self._node_key(self._node_id), self._node_id, px=self._lease_ms, xx=True
                        )
                        pipe.pexpire(self._users_key(self._node_id), self._lease_ms)
                        renewed, _ = await pipe.execute()
                        if not renewed:
                            self._logger.warning(
                                "node %s: lease was lost (expired or Redis restarted); "
                                "re-registering",
                                self._node_id,
                            )
                            self._reregister = True
                            continue
                    failures = 0
                    delay = self._renew_interval
                except (RedisError, OSError, DiscoverError) as exc:
                    failures += 1
                    self._reregister = True
                    log = self._logger.warning if failures == 1 else self._logger.debug
                    log("node %s: lease renewal failed (%s), retrying", self._node_id, exc)
                    delay = _backoff(failures, self._renew_interval)
                except Exception:
                    failures += 1
                    self._reregister = True
                    self._logger.exception(
                        "node %s: unexpected error renewing lease", self._node_id
                    )
                    delay = _backoff(failures, self._renew_interval)
                await anyio.sleep(delay)

    # -- receiving forwards -------------------------------------------------------------

    async def _open_pubsub(self) -> PubSub:
        """Subscribe to this node's channel and wait until Redis confirms it."""
        pubsub = self._client.pubsub()
        try:
            with self._translate("subscribe"):
                with anyio.fail_after(max(self._lease_seconds, 1.0)):
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

    async def _reader_loop(self, first: PubSub) -> None:
        pubsub: PubSub | None = first
        failures = 0
        with anyio.CancelScope() as self._reader_scope:
            while True:
                healthy_since = anyio.current_time()
                try:
                    if pubsub is None:
                        pubsub = await self._open_pubsub()
                        self._logger.warning("node %s resubscribed to its channel", self._node_id)
                    await self._read(pubsub)
                except (RedisError, OSError, DiscoverError, TimeoutError) as exc:
                    failures = 1 if anyio.current_time() - healthy_since > 10 else failures + 1
                    log = self._logger.warning if failures == 1 else self._logger.debug
                    log("node %s: pub/sub connection lost (%s), reconnecting", self._node_id, exc)
                except Exception:
                    failures += 1
                    self._logger.exception(
                        "node %s: unexpected error in the pub/sub reader", self._node_id
                    )
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
                if _text(msg["type"]) == "message":
                    await self._dispatch(msg["data"])
                continue
            if ping_deadline is None:
                await pubsub.ping()
                ping_deadline = anyio.current_time() + max(self._lease_seconds, 1.0)
            elif anyio.current_time() > ping_deadline:
                raise RedisConnectionError("the pub/sub connection stopped answering PING")

    async def _dispatch(self, data: bytes | str) -> None:
        try:
            message = decode_forward(data)
        except ValueError as exc:
            self._logger.warning("node %s: dropping a malformed forward: %s", self._node_id, exc)
            return
        handler = self._on_forward
        if handler is None:  # pragma: no cover - start() sets it before subscribing
            return
        try:
            await handler(message)
        except Exception:
            self._logger.exception(
                "node %s: forward handler failed on %s for %r",
                self._node_id,
                message.kind,
                message.user_id,
            )

    # -- bindings -----------------------------------------------------------------------

    @staticmethod
    def _field(binding: Binding) -> tuple[str, str]:
        value = {"node": binding.node_id, "device": binding.device_id}
        return binding.epoch, json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def _parse(self, user_id: str, raw: dict[Any, Any]) -> list[Binding]:
        bindings = []
        for field, value in raw.items():
            try:
                obj = json.loads(value)
                binding = Binding(
                    user_id, str(obj["node"]), _text(field), str(obj.get("device", ""))
                )
            except (ValueError, TypeError, KeyError):
                self._logger.debug("ignoring a malformed binding of %r: %r", user_id, value)
                continue
            bindings.append(binding)
        return bindings

    async def _live(self, candidates: dict[str, list[Binding]]) -> dict[str, list[Binding]]:
        """Keep the bindings whose node lease is alive; prune the others lazily."""
        nodes = sorted({b.node_id for bs in candidates.values() for b in bs})
        if not nodes:
            return {}
        values = await self._client.mget([self._node_key(n) for n in nodes])
        alive = {n for n, v in zip(nodes, values, strict=True) if v is not None}
        live: dict[str, list[Binding]] = {}
        dead: dict[str, list[Binding]] = {}
        for user_id, bindings in candidates.items():
            for b in bindings:
                (live if b.node_id in alive else dead).setdefault(user_id, []).append(b)
        if dead:
            await self._prune(dead)
        return live

    async def _prune(self, dead: dict[str, list[Binding]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for user_id, bindings in dead.items():
            keys = [self._user_key(user_id)] + [self._node_key(b.node_id) for b in bindings]
            pipe.eval(_PRUNE_LUA, len(keys), *keys, *(b.epoch for b in bindings))
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
                pipe.sadd(users_key, self._member(binding.user_id, binding.epoch))
                pipe.pexpire(users_key, self._lease_ms)
                pipe.hgetall(user_key)
                raw = (await pipe.execute())[-1]
            others = [b for b in self._parse(binding.user_id, raw) if b.epoch != binding.epoch]
            live = await self._live({binding.user_id: others})
        return live.get(binding.user_id, [])

    async def unbind(self, binding: Binding) -> None:
        """Remove ``binding`` if it is still recorded with its epoch; newer ones are untouched."""
        self._local.pop((binding.user_id, binding.epoch), None)
        with self._translate("unbind"):
            async with self._write_lock:
                pipe = self._client.pipeline(transaction=True)
                pipe.hdel(self._user_key(binding.user_id), binding.epoch)
                pipe.srem(
                    self._users_key(binding.node_id), self._member(binding.user_id, binding.epoch)
                )
                await pipe.execute()

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
            keys = [self._node_key(node_id)]
            receivers = int(
                await self._forward_script(keys=keys, args=[self._channel(node_id), payload])
            )
        if receivers < 0:
            raise DiscoverError(
                f"node {node_id!r} is dead (its lease expired); forward not delivered"
            )
        if receivers == 0:
            raise DiscoverError(
                f"node {node_id!r} is not listening on its channel; forward not delivered"
            )
