"""Scenario functions: the registry, and the ``relay`` and ``idle`` scenarios.

A scenario is ``async def fn(ctx: RunContext) -> dict[str, Any]``: the runner has
started the case's server (``ctx.server``) and will stop it afterwards, and bounds
the whole call by ``config.case_timeout``; the scenario opens its connections with
``ctx.connect_many`` and must close them (``close_all``) before returning. The dict
it returns is the case's figures (JSON-ready). Register with ``@scenario("name")``.

relay (private chat)
    ``pairs`` senders ``s<i>`` each send to their partner ``r<i>`` through the server.
    A sender keeps at most ``window`` messages outstanding: *not yet received by the
    partner* (noack variants: deliveries are observed in this same process) or *not
    yet acknowledged by the server* (ack variants). After a warm-up round
    (``warmup`` messages per sender, not measured), the measured phase sends
    ``messages`` per sender, or stops sending at ``max_seconds`` (whichever comes
    first), then waits for every outstanding delivery and ack. Figures: deliveries
    per second over the phase, send→receive latency (``perf_counter`` in this process
    at both ends), server CPU (utime+stime from /proc) per delivered message.

idle (memory per idle connection)
    After a warm-up (a few connections opened and closed), the server's RSS with no
    connection is the baseline; ``idle_conns`` connections are opened and left idle;
    after ``settle_seconds`` the RSS is read again; the difference over the count is
    the memory per idle connection. Also reported: handshake CPU per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from benchmarks.clients import (
    IDLE_HANDLERS,
    ClientConn,
    Closable,
    Handlers,
    HeartbeatBook,
    HeartbeatConn,
    PicowsConn,
    SocketIOConn,
    new_socketio_session,
)
from benchmarks.procs import CallgrindCounter, InstructionCounter
from benchmarks.suite import HB_ENGINEIO, SOCKETIO_CLIENT, WINDOW_ON_ACK, Case
from benchmarks.wire import WireCodec, make_text

if TYPE_CHECKING:
    import aiohttp

    from benchmarks.procs import ServerProcess


@dataclass(frozen=True)
class Config:
    pairs: int = 50
    window: int = 10
    messages: int = 2000
    warmup: int = 100
    text_size: int = 100
    max_seconds: float = 20.0
    """Cap on the measured send phase of one relay case."""
    drain_timeout: float = 15.0
    """After the last send: how long outstanding deliveries and acks may take."""
    idle_conns: int = 5000
    settle_seconds: float = 1.0
    connect_concurrency: int = 100
    connect_timeout: float = 15.0
    """One connection's handshake."""
    phase_timeout: float = 180.0
    """Opening (or closing) all the connections of one phase."""
    case_timeout: float = 300.0
    """One whole case, server start and stop excluded."""
    offline_messages: int = 10_000
    """offline: messages stored for the offline user, then caught up on connect."""
    offline_window: int = 100
    """offline: the sender's outstanding messages while storing (not measured)."""
    offline_timeout: float = 120.0
    """offline: bound on storing them, and on the catch-up."""
    hb_conns: int = 10_000
    """heartbeat: connections held open."""
    hb_interval: float = 2.0
    """heartbeat: each connection's heartbeat period, s (the same for every server)."""
    hb_seconds: float = 10.0
    """heartbeat: the measured period, s (after one unmeasured interval of heartbeats)."""
    callgrind: bool = False
    """Count the servers' instructions with valgrind's callgrind (``--callgrind``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Config(
    pairs=10,
    messages=300,
    warmup=20,
    max_seconds=5.0,
    drain_timeout=10.0,
    idle_conns=500,
    settle_seconds=0.5,
    phase_timeout=60.0,
    case_timeout=90.0,
    offline_messages=1000,
    offline_timeout=30.0,
    hb_conns=500,
    hb_interval=1.0,
    hb_seconds=3.0,
)


class ScenarioError(RuntimeError):
    """The scenario could not produce figures (the message says why).

    ``figures``: what was measured anyway, if anything (kept in the JSON output).
    """

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures


class RunContext:
    """What a scenario gets: the case, the configuration, the running server."""

    def __init__(self, case: Case, config: Config, server: ServerProcess) -> None:
        self.case = case
        self.config = config
        self.server = server
        self._codec: WireCodec | None = None
        self._session: aiohttp.ClientSession | None = None

    async def connect(self, user: str, handlers: Handlers) -> ClientConn:
        timeout = self.config.connect_timeout
        if self.case.server.client == SOCKETIO_CLIENT:
            if self._session is None:
                self._session = new_socketio_session()
            return await SocketIOConn.open(
                self.server.base_url,
                user,
                handlers,
                session=self._session,
                want_ack=self.case.window_on == WINDOW_ON_ACK,
                timeout=timeout,
            )
        if self._codec is None:
            self._codec = self.case.server.codec(self.case.variant)
        return await PicowsConn.open(
            self._codec, self.server.base_url, user, handlers, timeout=timeout
        )

    async def connect_many(
        self, users: Sequence[str], handlers_for: Callable[[int], Handlers]
    ) -> list[ClientConn]:
        """Open one connection per user (bounded concurrency); all or none."""
        limit = asyncio.Semaphore(self.config.connect_concurrency)
        opened: dict[int, ClientConn] = {}

        async def one(index: int) -> None:
            async with limit:
                try:
                    opened[index] = await self.connect(users[index], handlers_for(index))
                except asyncio.TimeoutError:
                    raise ConnectionError(
                        f"{users[index]}: no handshake in {self.config.connect_timeout:.0f} s"
                    ) from None

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(users))]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), self.config.phase_timeout)
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close_all(list(opened.values()))
            if isinstance(exc, asyncio.TimeoutError):
                raise ScenarioError(
                    f"opened {len(opened)}/{len(users)} connections in "
                    f"{self.config.phase_timeout:.0f} s"
                ) from None
            if isinstance(exc, Exception):
                raise ScenarioError(
                    f"connecting failed after {len(opened)}/{len(users)}: {exc!r}"
                ) from exc
            raise
        return [opened[i] for i in range(len(users))]

    async def close_all(self, conns: Sequence[Closable]) -> None:
        """Close connections concurrently, bounded by ``phase_timeout``."""
        if conns:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True),
                    self.config.phase_timeout,
                )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


ScenarioFn = Callable[[RunContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Scenario:
    fn: ScenarioFn
    headline: str | None
    """The figure that picks the median run when a case is repeated (``--repeat``)."""


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, *, headline: str | None = None) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under ``name`` (the ``scenario`` of a Case)."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(fn, headline)
        return fn

    return register


# ---------------------------------------------------------------------------- relay


class _RelayPhase:
    """Bookkeeping of one relay phase: windows, send times, deliveries, acks."""

    def __init__(self, pairs: int, window: int, window_on_ack: bool, text_size: int) -> None:
        self.window_on_ack = window_on_ack
        self.text_size = text_size
        self.windows = [asyncio.Semaphore(window) for _ in range(pairs)]
        self.next_seq = [0] * pairs
        self.send_times: dict[str, float] = {}
        self.unacked: set[str] = set()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.unexpected_deliveries = 0
        self.unexpected_acks = 0
        self.sent = 0
        self.delivered = 0
        self.acked = 0
        self.last_event = 0.0
        self.senders_done = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def reset(self) -> None:
        self.latencies = []
        self.sent = self.delivered = self.acked = 0
        self.unexpected_deliveries = self.unexpected_acks = 0
        self.senders_done = False
        self.done = asyncio.get_running_loop().create_future()

    def receiver_handlers(self, pair: int) -> Handlers:
        window = self.windows[pair]

        def on_delivery(token: str) -> None:
            now = time.perf_counter()
            sent_at = self.send_times.pop(token, None)
            if sent_at is None:
                self.unexpected_deliveries += 1
                return
            self.latencies.append(now - sent_at)
            self.delivered += 1
            self.last_event = now
            if not self.window_on_ack:
                window.release()
            if self.senders_done:
                self._check_done()

        return Handlers(on_delivery, self._on_stray_ack, self._on_error)

    def sender_handlers(self, pair: int) -> Handlers:
        window = self.windows[pair]

        def on_ack(msg_id: str) -> None:
            if not self.window_on_ack or msg_id not in self.unacked:
                self.unexpected_acks += 1
                return
            self.unacked.discard(msg_id)
            self.acked += 1
            self.last_event = time.perf_counter()
            window.release()
            if self.senders_done:
                self._check_done()

        return Handlers(self._on_stray_delivery, on_ack, self._on_error)

    def _on_stray_delivery(self, token: str) -> None:
        self.unexpected_deliveries += 1

    def _on_stray_ack(self, msg_id: str) -> None:
        self.unexpected_acks += 1

    def _on_error(self, text: str) -> None:
        self.errors.append(text)
        if not self.done.done():
            self.done.set_exception(ScenarioError(f"client saw: {text}"))

    def _check_done(self) -> None:
        if self.done.done() or self.delivered < self.sent:
            return
        if self.window_on_ack and self.acked < self.sent:
            return
        self.done.set_result(None)

    async def sender(self, pair: int, conn: ClientConn, count: int, stop_at: float | None) -> None:
        window = self.windows[pair]
        to = f"r{pair}"
        size = self.text_size
        for _ in range(count):
            await window.acquire()
            now = time.perf_counter()
            if stop_at is not None and now >= stop_at:
                window.release()
                return
            seq = self.next_seq[pair]
            self.next_seq[pair] = seq + 1
            token = f"{pair}.{seq}"
            self.send_times[token] = now
            if self.window_on_ack:
                self.unacked.add(token)
            self.sent += 1
            await conn.send(token, to, make_text(token, size))

    async def run(
        self,
        senders: Sequence[ClientConn],
        count: int,
        *,
        stop_at: float | None,
        send_timeout: float,
        drain_timeout: float,
    ) -> str | None:
        """Send ``count`` per sender and wait for the outcome; None, or why incomplete."""
        self.reset()
        tasks = asyncio.gather(
            *(self.sender(i, conn, count, stop_at) for i, conn in enumerate(senders))
        )
        waited: set[asyncio.Future[Any]] = {tasks, self.done}
        try:
            finished, _ = await asyncio.wait(
                waited, timeout=send_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if self.done.done():
                self.done.result()  # only an error completes it this early
            if tasks not in finished:
                return (
                    f"senders blocked after {send_timeout:.0f} s "
                    f"(sent {self.sent}, delivered {self.delivered}, acked {self.acked})"
                )
            tasks.result()
            self.senders_done = True
            self._check_done()
            try:
                await asyncio.wait_for(asyncio.shield(self.done), drain_timeout)
            except asyncio.TimeoutError:
                return (
                    f"not drained {drain_timeout:.0f} s after the last send "
                    f"(sent {self.sent}, delivered {self.delivered}, acked {self.acked})"
                )
            return None
        finally:
            tasks.cancel()
            with contextlib.suppress(BaseException):
                await tasks


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def _per_message(
    counts: dict[str, int | None], messages: int, event: str | None = None
) -> float | None:
    """Thousands of ``event`` (all counted events when None) per message."""
    values = [v for k, v in counts.items() if event is None or k == event]
    if not values or any(v is None for v in values) or not messages:
        return None
    return sum(v for v in values if v is not None) / messages / 1e3


def _instruction_counter(server: ServerProcess) -> InstructionCounter | CallgrindCounter:
    """perf's counter, or callgrind's for a server started under it (``--callgrind``)."""
    if server.callgrind_dir is None:
        return InstructionCounter()
    return CallgrindCounter(server.callgrind_dir)


@scenario("relay", headline="server_cpu_us_per_msg")
async def relay(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.config
    server = ctx.server
    phase = _RelayPhase(cfg.pairs, cfg.window, ctx.case.window_on == WINDOW_ON_ACK, cfg.text_size)
    conns: list[ClientConn] = []
    try:
        conns += await ctx.connect_many(
            [f"r{i}" for i in range(cfg.pairs)], phase.receiver_handlers
        )
        senders = await ctx.connect_many([f"s{i}" for i in range(cfg.pairs)], phase.sender_handlers)
        conns += senders
        if cfg.warmup > 0:
            problem = await phase.run(
                senders,
                cfg.warmup,
                stop_at=None,
                send_timeout=cfg.max_seconds + 30.0,
                drain_timeout=cfg.drain_timeout,
            )
            if problem is not None:
                raise ScenarioError(f"warm-up: {problem}")

        counter = _instruction_counter(server)
        await counter.start(server.pid)
        server.profile_phase(True)
        user0, sys0 = server.cpu_times()
        ns0 = server.cpu_ns_schedstat()
        client0 = time.process_time()
        t0 = time.perf_counter()
        problem = await phase.run(
            senders,
            cfg.messages,
            stop_at=t0 + cfg.max_seconds,
            send_timeout=cfg.max_seconds + 30.0,
            drain_timeout=cfg.drain_timeout,
        )
        t1 = phase.last_event if problem is None else time.perf_counter()
        user1, sys1 = server.cpu_times()
        ns1 = server.cpu_ns_schedstat()
        client1 = time.process_time()
        server.profile_phase(False)
        instructions = await counter.stop()
    finally:
        await ctx.close_all(conns)

    delivered = phase.delivered
    if delivered == 0:
        raise ScenarioError(problem or "no message delivered")
    elapsed = max(t1 - t0, 1e-9)
    cpu = (user1 - user0) + (sys1 - sys0)
    lat = sorted(phase.latencies)
    figures: dict[str, Any] = {
        "pairs": cfg.pairs,
        "window": cfg.window,
        "window_on": ctx.case.window_on,
        "messages_per_sender": cfg.messages,
        "sent": phase.sent,
        "delivered": delivered,
        "acked": phase.acked,
        "capped": phase.sent < cfg.pairs * cfg.messages,
        "incomplete": problem,
        "elapsed_s": elapsed,
        "msgs_per_s": delivered / elapsed,
        "latency_ms": {
            "p50": _percentile(lat, 0.50) * 1e3,
            "p90": _percentile(lat, 0.90) * 1e3,
            "p99": _percentile(lat, 0.99) * 1e3,
            "max": lat[-1] * 1e3,
            "mean": sum(lat) / len(lat) * 1e3,
        },
        "server_cpu_s": cpu,
        "server_cpu_us_per_msg": cpu / delivered * 1e6,
        "server_user_us_per_msg": (user1 - user0) / delivered * 1e6,
        "server_sys_us_per_msg": (sys1 - sys0) / delivered * 1e6,
        "server_cpu_us_per_msg_schedstat": (
            (ns1 - ns0) / delivered / 1e3 if ns0 is not None and ns1 is not None else None
        ),
        "client_cpu_us_per_msg": (client1 - client0) / delivered * 1e6,
        # Thousands of instructions the server retired per message (perf, user and kernel
        # space; None without it; with --callgrind, valgrind's count of user space): the
        # figure that holds when the machine's speed moves between runs.
        "server_kinstr_per_msg": _per_message(instructions, delivered),
        "server_kinstr_user_per_msg": _per_message(instructions, delivered, "instructions:u"),
        "unexpected_deliveries": phase.unexpected_deliveries,
        "unexpected_acks": phase.unexpected_acks,
    }
    return figures


# ----------------------------------------------------------------------------- idle


@scenario("idle", headline="kib_per_conn")
async def idle(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.config
    server = ctx.server
    warm = await ctx.connect_many([f"w{i}" for i in range(10)], lambda _: IDLE_HANDLERS)
    await ctx.close_all(warm)
    await asyncio.sleep(cfg.settle_seconds)
    rss0 = server.rss_kib()
    cpu0 = server.cpu_seconds()
    t0 = time.perf_counter()
    conns = await ctx.connect_many(
        [f"idle{i}" for i in range(cfg.idle_conns)], lambda _: IDLE_HANDLERS
    )
    try:
        connect_s = time.perf_counter() - t0
        cpu1 = server.cpu_seconds()
        await asyncio.sleep(cfg.settle_seconds)
        rss1 = server.rss_kib()
        if not server.alive():
            raise ScenarioError("server died while holding the idle connections")
    finally:
        await ctx.close_all(conns)
    count = len(conns)
    return {
        "idle_conns": count,
        "rss_base_kib": rss0,
        "rss_loaded_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / count,
        "connect_s": connect_s,
        "conns_per_s": count / max(connect_s, 1e-9),
        "handshake_cpu_us_per_conn": (cpu1 - cpu0) / count * 1e6,
    }


# -------------------------------------------------------------------------- offline

OFFLINE_SENDER = "offA"
OFFLINE_RECIPIENT = "offB"
OFFLINE_TARGET_US = 25.0
"""Issue 6: at most 25 µs of server CPU per message caught up."""


async def _store_offline(ctx: RunContext, tokens: Sequence[str]) -> dict[str, Any]:
    """Phase 1 (not the headline): the sender stores every token's message for the
    offline recipient, at most ``offline_window`` unanswered at a time."""
    cfg = ctx.config
    server = ctx.server
    window = asyncio.Semaphore(cfg.offline_window)
    unanswered: set[str] = set()
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sending = True
    strays = 0

    def on_answer(msg_id: str) -> None:
        nonlocal strays
        if msg_id not in unanswered:
            strays += 1
            return
        unanswered.discard(msg_id)
        window.release()
        if not sending and not unanswered and not finished.done():
            finished.set_result(None)

    def on_stray(_: str) -> None:
        nonlocal strays
        strays += 1

    def on_error(text: str) -> None:
        if not finished.done():
            finished.set_exception(ScenarioError(f"sender saw: {text}"))

    conn = await ctx.connect(OFFLINE_SENDER, Handlers(on_stray, on_answer, on_error))
    cpu0 = server.cpu_seconds()
    t0 = time.perf_counter()
    try:

        async def send_all() -> None:
            nonlocal sending
            for token in tokens:
                await window.acquire()
                if finished.done():
                    return
                unanswered.add(token)
                await conn.send(token, OFFLINE_RECIPIENT, make_text(token, cfg.text_size))
            sending = False
            if not unanswered and not finished.done():
                finished.set_result(None)

        sender = asyncio.ensure_future(send_all())
        try:
            await asyncio.wait_for(asyncio.shield(finished), cfg.offline_timeout)
        except asyncio.TimeoutError:
            raise ScenarioError(
                f"storing: {len(tokens) - len(unanswered)}/{len(tokens)} answered "
                f"in {cfg.offline_timeout:.0f} s"
            ) from None
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        elapsed = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
    finally:
        await ctx.close_all([conn])
    return {
        "store_s": elapsed,
        "store_msgs_per_s": len(tokens) / max(elapsed, 1e-9),
        "store_cpu_us_per_msg": cpu / len(tokens) * 1e6,
        "store_unexpected_frames": strays,
    }


@scenario("offline", headline="server_cpu_us_per_msg")
async def offline(ctx: RunContext) -> dict[str, Any]:
    """imkit.chat's catch-up: a user reconnects to ``offline_messages`` stored messages.

    Phase 1 (not measured): ``offA`` sends the messages to ``offB``, who is not
    connected, through ``conversation.chat`` on the SQLite store, waiting for each answer
    (a window of ``offline_window``). Phase 2 (measured): ``offB`` connects; from the
    start of its connect until it has received every message (each push acked at once,
    OnlyAck): wall time, messages/s and the server's CPU per message. Each message
    must arrive exactly once: duplicates, missing or unknown messages are an error.
    """
    cfg = ctx.config
    server = ctx.server
    total = cfg.offline_messages
    tokens = [f"off.{i}" for i in range(total)]
    expected = set(tokens)
    figures: dict[str, Any] = {"messages": total, "target_us_per_msg": OFFLINE_TARGET_US}
    figures.update(await _store_offline(ctx, tokens))
    await asyncio.sleep(cfg.settle_seconds)  # let the server finish the sender's close

    received: set[str] = set()
    counts = {"duplicates": 0, "unexpected": 0, "acks": 0}
    first_at: float | None = None
    last_at = 0.0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_push(token: str) -> None:
        nonlocal first_at, last_at
        if token not in expected:
            counts["unexpected"] += 1
            return
        if token in received:
            counts["duplicates"] += 1
            return
        received.add(token)
        last_at = time.perf_counter()
        if first_at is None:
            first_at = last_at
        if len(received) == total and not done.done():
            done.set_result(None)

    def on_ack(_: str) -> None:
        counts["acks"] += 1

    def on_error(text: str) -> None:
        if not done.done():
            done.set_exception(ScenarioError(f"recipient saw: {text}"))

    conns: list[ClientConn] = []
    counter = _instruction_counter(server)
    await counter.start(server.pid)
    server.profile_phase(True)
    user0, sys0 = server.cpu_times()
    ns0 = server.cpu_ns_schedstat()
    client0 = time.process_time()
    t0 = time.perf_counter()
    try:

        async def catch_up() -> float:
            conns.append(await ctx.connect(OFFLINE_RECIPIENT, Handlers(on_push, on_ack, on_error)))
            connected = time.perf_counter()
            await asyncio.shield(done)
            return connected

        try:
            connected_at = await asyncio.wait_for(catch_up(), cfg.offline_timeout)
        except asyncio.TimeoutError:
            raise ScenarioError(
                f"catch-up: {len(received)}/{total} messages in {cfg.offline_timeout:.0f} s "
                f"({counts['duplicates']} duplicates)"
            ) from None
        user1, sys1 = server.cpu_times()
        ns1 = server.cpu_ns_schedstat()
        client1 = time.process_time()
        server.profile_phase(False)
        instructions = await counter.stop()
        await asyncio.sleep(cfg.settle_seconds)  # a duplicate would arrive meanwhile
    finally:
        await ctx.close_all(conns)

    elapsed = max(last_at - t0, 1e-9)
    cpu = (user1 - user0) + (sys1 - sys0)
    figures.update(
        {
            "received": len(received),
            "missing": total - len(received),
            "duplicates": counts["duplicates"],
            "unexpected": counts["unexpected"] + counts["acks"],
            "connect_ms": (connected_at - t0) * 1e3,
            "first_message_ms": ((first_at or t0) - t0) * 1e3,
            "catchup_s": elapsed,
            "msgs_per_s": total / elapsed,
            "server_cpu_s": cpu,
            "server_cpu_us_per_msg": cpu / total * 1e6,
            "server_user_us_per_msg": (user1 - user0) / total * 1e6,
            "server_sys_us_per_msg": (sys1 - sys0) / total * 1e6,
            "server_cpu_us_per_msg_schedstat": (
                (ns1 - ns0) / total / 1e3 if ns0 is not None and ns1 is not None else None
            ),
            "client_cpu_us_per_msg": (client1 - client0) / total * 1e6,
            "server_kinstr_per_msg": _per_message(instructions, total),
        }
    )
    figures["meets_target"] = figures["server_cpu_us_per_msg"] <= OFFLINE_TARGET_US
    if figures["duplicates"] or figures["missing"] or figures["unexpected"]:
        raise ScenarioError(
            f"catch-up not exactly once: {figures['duplicates']} duplicates, "
            f"{figures['missing']} missing, {figures['unexpected']} unexpected frames",
            figures,
        )
    return figures


# ------------------------------------------------------------------------ heartbeat

HEARTBEAT_GRACE_S = 2.0
"""After the measured period: how long unanswered heartbeats may still be answered."""


async def _open_heartbeats(
    ctx: RunContext, protocol: str, users: Sequence[str], book: HeartbeatBook
) -> tuple[list[HeartbeatConn], list[str]]:
    """Open a heartbeat connection per user, bounded in concurrency, per connection
    (``connect_timeout``) and in all (``phase_timeout``); the opened ones and the
    failures (one reason each)."""
    cfg = ctx.config
    codec = None if protocol == HB_ENGINEIO else ctx.case.server.codec(ctx.case.variant)
    base = ctx.server.base_url
    limit = asyncio.Semaphore(cfg.connect_concurrency)
    opened: dict[int, HeartbeatConn] = {}
    failures: list[str] = []

    async def one(index: int) -> None:
        async with limit:
            url = HeartbeatConn.url(protocol, base, users[index], codec)
            try:
                opened[index] = await HeartbeatConn.open(
                    protocol, url, book, timeout=cfg.connect_timeout
                )
            except asyncio.TimeoutError:
                failures.append(f"no handshake in {cfg.connect_timeout:.0f} s")
            except Exception as exc:
                failures.append(repr(exc))

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(users))]
    try:
        _, pending = await asyncio.wait(tasks, timeout=cfg.phase_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failures += [f"not opened within {cfg.phase_timeout:.0f} s"] * len(pending)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ctx.close_all(list(opened.values()))
        raise
    return [opened[i] for i in sorted(opened)], failures


async def _beat(conns: Sequence[HeartbeatConn], interval: float, rounds: float) -> None:
    """Every connection beats once per ``interval``, evenly spread over it, for
    ``rounds`` intervals."""
    count = len(conns)
    total = int(rounds * count)
    start = time.perf_counter()
    done = 0
    while done < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / interval * count))
        while done < due:
            conns[done % count].beat(now)
            done += 1
        await asyncio.sleep(0.005)


def _check_fd_limits(ctx: RunContext, conns: int) -> None:
    """Both ends need a descriptor per connection; fail clearly if either limit is short."""
    needed = conns + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ScenarioError(
            f"the harness may open {soft} files (hard limit {hard}); {needed} are needed for "
            f"{conns} connections: raise the hard limit (ulimit -Hn) or lower --hb-conns"
        )
    server_limit = ctx.server.nofile_limit()
    if server_limit is not None and server_limit < needed:
        raise ScenarioError(
            f"the server may open {server_limit} files; {needed} are needed for {conns} "
            "connections: raise the hard limit (ulimit -Hn) or lower --hb-conns"
        )


@scenario("heartbeat", headline="server_cpu_us_per_hb")
async def heartbeat(ctx: RunContext) -> dict[str, Any]:
    """``hb_conns`` connections held open, each beating once every ``hb_interval``.

    After a warm-up (a few connections opened and closed), the server's RSS with no
    connection is the baseline; the connections are opened (bounded; failures counted,
    not fatal); heartbeats run for one unmeasured interval, then ``hb_seconds`` are
    measured: server CPU per heartbeat, heartbeat round trips (client-sent protocols),
    and at the end RSS per connection and how many connections are still open.
    """
    cfg = ctx.config
    server = ctx.server
    protocol = ctx.case.server.heartbeat
    _check_fd_limits(ctx, cfg.hb_conns)
    book = HeartbeatBook()

    warm, _ = await _open_heartbeats(ctx, protocol, [f"hbw{i}" for i in range(10)], book)
    await ctx.close_all(warm)
    await asyncio.sleep(cfg.settle_seconds)
    rss0 = server.rss_kib()
    cpu_c0 = server.cpu_seconds()
    tc0 = time.perf_counter()
    conns, failures = await _open_heartbeats(
        ctx, protocol, [f"hb{i}" for i in range(cfg.hb_conns)], book
    )
    beats: asyncio.Future[None] | None = None
    try:
        connect_s = time.perf_counter() - tc0
        cpu_c1 = server.cpu_seconds()
        if not conns:
            raise ScenarioError(f"no connection opened: {failures[:1]}")
        dropped_connecting = book.dropped
        start = time.perf_counter()
        beats = asyncio.ensure_future(
            _beat(conns, cfg.hb_interval, 1 + cfg.hb_seconds / cfg.hb_interval)
        )
        await asyncio.sleep(max(0.0, start + cfg.hb_interval - time.perf_counter()))
        book.reset()
        user0, sys0 = server.cpu_times()
        ns0 = server.cpu_ns_schedstat()
        client0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.sleep(max(0.0, t0 + cfg.hb_seconds - time.perf_counter()))
        user1, sys1 = server.cpu_times()
        ns1 = server.cpu_ns_schedstat()
        client1 = time.process_time()
        t1 = time.perf_counter()
        counts = book.snapshot()
        rtts = sorted(book.rtts)
        rss1 = server.rss_kib()
        await asyncio.wait_for(beats, cfg.hb_interval + 5.0)
        for _ in range(int(max(HEARTBEAT_GRACE_S, cfg.hb_interval) / 0.05)):
            if not any(c.waiting for c in conns):
                break
            await asyncio.sleep(0.05)
        unanswered = sum(1 for c in conns if c.waiting)
        held = sum(1 for c in conns if c.open_)
        if not server.alive():
            raise ScenarioError("server died while holding the connections")
    finally:
        if beats is not None:
            beats.cancel()
            with contextlib.suppress(BaseException):
                await beats
        await ctx.close_all(conns)

    window = max(t1 - t0, 1e-9)
    client_sent = protocol != HB_ENGINEIO
    beats_counted = counts["answered"] if client_sent else counts["server_pings"]
    cpu = (user1 - user0) + (sys1 - sys0)
    per_beat = 1e6 / max(beats_counted, 1)
    failure_kinds: dict[str, int] = {}
    for reason in failures:
        failure_kinds[reason] = failure_kinds.get(reason, 0) + 1
    return {
        "protocol": protocol,
        "conns_wanted": cfg.hb_conns,
        "conns_opened": len(conns),
        "connect_failures": len(failures),
        "connect_failure_reasons": dict(list(failure_kinds.items())[:5]),
        "dropped": book.dropped,
        "dropped_while_connecting": dropped_connecting,
        "drop_reasons": book.drop_reasons,
        "conns_held": held,
        "all_held": held == cfg.hb_conns,
        "interval_s": cfg.hb_interval,
        "measured_s": window,
        "heartbeats": beats_counted,
        "heartbeats_sent": counts["sent"] if client_sent else counts["server_pings"],
        "heartbeats_per_s": beats_counted / window,
        "expected_per_s": len(conns) / cfg.hb_interval,
        "late": counts["late"],
        "unanswered": unanswered,
        "client_errors": book.errors,
        "rtt_ms": (
            {
                "p50": _percentile(rtts, 0.50) * 1e3,
                "p90": _percentile(rtts, 0.90) * 1e3,
                "p99": _percentile(rtts, 0.99) * 1e3,
                "max": rtts[-1] * 1e3,
            }
            if rtts
            else None
        ),
        "server_cpu_s": cpu,
        "server_cpu_us_per_hb": cpu * per_beat,
        "server_user_us_per_hb": (user1 - user0) * per_beat,
        "server_sys_us_per_hb": (sys1 - sys0) * per_beat,
        "server_cpu_us_per_hb_schedstat": (
            (ns1 - ns0) / 1e3 / max(beats_counted, 1)
            if ns0 is not None and ns1 is not None
            else None
        ),
        "server_cpu_share": cpu / window,
        "client_cpu_us_per_hb": (client1 - client0) * per_beat,
        "rss_base_kib": rss0,
        "rss_loaded_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / len(conns),
        "connect_s": connect_s,
        "conns_per_s": len(conns) / max(connect_s, 1e-9),
        "handshake_cpu_us_per_conn": (cpu_c1 - cpu_c0) / len(conns) * 1e6,
    }
