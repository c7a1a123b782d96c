"""The servers under test and the suite's rows (cases).

A :class:`Case` is one run: a server, a variant (which server flags, which client
codec, what counts against the sender's window) and the scenario function that
drives it (see :mod:`benchmarks.scenarios`). To add a figure, register a scenario
function and append cases that name it; the runner needs no other change.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from benchmarks.wire import WireCodec

PICOWS_CLIENT = "picows"
SOCKETIO_CLIENT = "socketio"

WINDOW_ON_DELIVERY = "delivery"
"""The sender may have W messages not yet received by its partner (noack variants)."""
WINDOW_ON_ACK = "ack"
"""The sender may have W messages not yet acknowledged by the server (ack variants)."""

WORKDIR = "{workdir}"
"""Placeholder in server arguments: a temporary directory, removed after the case."""
HB_INTERVAL = "{hb_interval}"
"""Placeholder in server arguments: the heartbeat interval in seconds (``--hb-interval``)."""

HB_WS_PING = "ws-ping"
"""Heartbeat: the client sends a WebSocket Ping frame, the server's library answers Pong."""
HB_IMKIT_PING = "imkit-ping"
"""Heartbeat: the client sends an easy-chat Ping frame (``frameType`` 1), the server
echoes it (what ``imkit.connect``'s keepalive does)."""
HB_ENGINEIO = "engineio"
"""Heartbeat: the Engine.IO server sends ``2`` (ping) every ``pingInterval``, the client
answers ``3`` (pong): what every Socket.IO client does."""


@dataclass(frozen=True)
class ServerSpec:
    name: str
    module: str
    client: str = PICOWS_CLIENT
    heartbeat: str = HB_WS_PING
    """How this server's clients keep a connection alive (the ``heartbeat`` scenario)."""

    def codec(self, variant: str) -> WireCodec:
        """The load generator's codec for this server (picows client only)."""
        module = importlib.import_module(self.module)
        codec: WireCodec = module.client_codec(variant)
        return codec


@dataclass(frozen=True)
class Case:
    server: ServerSpec
    variant: str
    scenario: str
    server_args: tuple[str, ...] = ()
    window_on: str = WINDOW_ON_DELIVERY
    baseline: str = "noack"
    """Variant of the websockets / socketio rows this row's ratios compare with."""

    @property
    def name(self) -> str:
        return f"{self.server.name} {self.variant}"

    def matches(self, selector: str) -> bool:
        """``--only`` selectors: a server, a full row name, a variant or a scenario."""
        selector = selector.strip().lower()
        return selector in (
            self.server.name.lower(),
            self.name.lower(),
            self.variant.lower(),
            self.scenario.lower(),
        )


WEBSOCKETS = ServerSpec("websockets", "benchmarks.peers.websockets_relay")
SOCKETIO = ServerSpec(
    "socketio", "benchmarks.peers.socketio_relay", client=SOCKETIO_CLIENT, heartbeat=HB_ENGINEIO
)
PICOWS = ServerSpec("picows", "benchmarks.peers.picows_relay")
AIOHTTP = ServerSpec("aiohttp", "benchmarks.peers.aiohttp_relay")
IMKIT = ServerSpec("imkit", "benchmarks.peers.imkit_relay", heartbeat=HB_IMKIT_PING)

SERVERS: tuple[ServerSpec, ...] = (WEBSOCKETS, SOCKETIO, PICOWS, AIOHTTP, IMKIT)

BASELINE_SERVERS = ("websockets", "socketio")
"""Ratio columns of the table: CPU per message relative to these servers' rows."""


def _peer_cases(server: ServerSpec) -> list[Case]:
    hb_args: tuple[str, ...] = ("--mode", "noack")
    if server.heartbeat == HB_ENGINEIO:  # the server pings: at the harness' interval
        hb_args += ("--ping-interval", HB_INTERVAL)
    return [
        Case(server, "noack", "relay", ("--mode", "noack"), WINDOW_ON_DELIVERY, "noack"),
        Case(server, "ack", "relay", ("--mode", "ack"), WINDOW_ON_ACK, "ack"),
        Case(server, "idle", "idle", ("--mode", "noack")),
        Case(server, "heartbeat", "heartbeat", hb_args),
    ]


def _imkit_cases() -> list[Case]:
    sqlite_args = ("--mode", "onlyack", "--store", "sqlite", "--db", f"{WORKDIR}/imkit-bench.db")
    # The same chat service on the in-memory store: the chat layer's cost without SQL.
    chat_args = ("--mode", "onlyack", "--store", "chat-memory")
    return [
        Case(IMKIT, "noack", "relay", ("--mode", "noack"), WINDOW_ON_DELIVERY, "noack"),
        Case(IMKIT, "onlyack", "relay", ("--mode", "onlyack"), WINDOW_ON_ACK, "ack"),
        Case(IMKIT, "onlyack+chat", "relay", chat_args, WINDOW_ON_ACK, "ack"),
        Case(IMKIT, "onlyack+sqlite", "relay", sqlite_args, WINDOW_ON_ACK, "ack"),
        Case(IMKIT, "idle", "idle", ("--mode", "onlyack")),
        # A fresh database per case: the offline user's catch-up from SQLite.
        Case(
            IMKIT,
            "offline",
            "offline",
            ("--mode", "onlyack", "--store", "sqlite", "--db", f"{WORKDIR}/imkit-offline.db"),
        ),
        Case(IMKIT, "heartbeat", "heartbeat", ("--mode", "onlyack")),
    ]


CASES: tuple[Case, ...] = (
    *_peer_cases(WEBSOCKETS),
    *_peer_cases(SOCKETIO),
    *_peer_cases(PICOWS),
    *_peer_cases(AIOHTTP),
    *_imkit_cases(),
)


def select(selectors: list[str] | None) -> list[Case]:
    """The cases matching any selector (all cases when there is none)."""
    if not selectors:
        return list(CASES)
    return [case for case in CASES if any(case.matches(s) for s in selectors)]
