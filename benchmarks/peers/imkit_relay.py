"""imkit entry of the relay benchmark.

The client side is :class:`ImkitCodec` (the wire protocol of ``DESIGN.md`` §2-§3);
:func:`serve` runs imkit's server. ``--check`` fails (and the harness skips every imkit
row, saying why) if imkit's transport cannot be imported.

Server contract the harness expects (``python -m benchmarks.peers.imkit_relay ...``):

- ``--mode noack|onlyack``: imkit's ack mode, upstream and downstream alike;
- ``--store memory|sqlite|chat-memory`` and ``--db PATH`` (the "imkit onlyack+sqlite" row
  passes ``--store sqlite --db <temp dir>/imkit-bench.db``; the file is removed
  afterwards; "imkit onlyack+chat" passes ``--store chat-memory``: the same chat service
  on the in-memory store);
- WebSocket path ``/ws``; development auth from the query parameter ``?userId=<user>``;
- a route ``relay``: ``data = {"to": <user>, "text": <text>}``; the server pushes a
  Data frame ``{"frameType": 0, "id": <server id>, "ackSeq": 0, "method": "relay",
  "formId": <sender>, "data": {... "text": <text> ...}}`` to the recipient;
- for the sqlite row and the ``offline`` case, imkit.chat's ``conversation.chat`` on
  the SQLite store, answering the sender with a Data frame whose ``replyTo`` (top level,
  or inside ``data``) is the id of the sender's frame, and pushing stored messages
  (``push``, ``data.msg.content`` = the text), live or in the catch-up on connect;
- the ``heartbeat`` case sends only easy-chat Ping frames, which the server echoes;
- bind ``--host``/``--port`` (0 = any free port), then call
  :func:`benchmarks.peers._common.announce_ready` with the bound port; run until killed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from benchmarks.peers._common import PeerOptions, announce_ready, peer_main
from benchmarks.wire import ACK, DELIVERY, ERROR, IGNORE, Decoded, dumps, token_of

MODES = ("noack", "onlyack")

SERVER_WIRED = True
"""Set to True once :func:`serve` starts imkit's server."""

WS_PATH = "/ws"

# frameType values (DESIGN.md §2)
FRAME_DATA = 0
FRAME_PING = 1
FRAME_ACK = 2
FRAME_NOACK = 3
FRAME_ERR = 9

RELAY_METHOD = "relay"
CHAT_METHOD = "conversation.chat"

WINDOW_NONE = "none"
"""Nothing the sender receives is counted as an ack (NoAck: window on deliveries)."""
WINDOW_TRANSPORT_ACK = "transport"
"""The server's upstream ``Ack{id, ackSeq: 1}`` acks the sender's message."""
WINDOW_REPLY = "reply"
"""The route's answer (a Data frame with ``replyTo`` = our id) acks the message."""


class ImkitCodec:
    """The load generator's side of imkit's wire protocol.

    - connect: ``ws://host:port/ws?userId=<user>`` (dev auth);
    - send ``{"frameType": 0, "id": <unique>, "ackSeq": 0, "method": <method>,
      "formId": "", "transpondUid": "", "data": <payload>}`` where the payload is
      ``{"to", "text"}`` for ``relay`` and ``{"chatType": 2, "recvId", "msgId", "msg":
      {"mType": 0, "content"}}`` for ``conversation.chat`` (``msgId`` = the frame id, as
      :class:`~imkit.chat.ChatClient` names its messages);
    - with ``ack_downstream``, answer every received Data frame (frameType 0) with
      ``{"frameType": 2, "id": <its id>, "ackSeq": 1}`` (OnlyAck downstream);
    - classify received frames as described in :mod:`benchmarks.wire`; an ``Err``
      frame is an ``ERROR`` (the harness stops the run and reports it).
    """

    def __init__(self, *, method: str, ack_downstream: bool, window_ack: str) -> None:
        if method not in (RELAY_METHOD, CHAT_METHOD):
            raise ValueError(f"unknown method {method!r}")
        if window_ack not in (WINDOW_NONE, WINDOW_TRANSPORT_ACK, WINDOW_REPLY):
            raise ValueError(f"unknown window_ack {window_ack!r}")
        self.method = method
        self.ack_downstream = ack_downstream
        self.window_ack = window_ack

    def url(self, base: str, user: str) -> str:
        return f"{base}{WS_PATH}?userId={user}"

    def encode(self, msg_id: str, to: str, text: str) -> bytes:
        data: dict[str, Any]
        if self.method == RELAY_METHOD:
            data = {"to": to, "text": text}
        else:
            # As ChatClient sends it: the message named by a msgId (its answer: NoAck).
            data = {
                "chatType": 2,
                "recvId": to,
                "msgId": msg_id,
                "msg": {"mType": 0, "content": text},
            }
        return dumps(
            {
                "frameType": FRAME_DATA,
                "id": msg_id,
                "ackSeq": 0,
                "method": self.method,
                "formId": "",
                "transpondUid": "",
                "data": data,
            }
        )

    def decode(self, payload: bytes) -> Decoded:
        try:
            frame = json.loads(payload)
        except ValueError:
            return ERROR, f"not JSON: {payload[:80]!r}", None
        if not isinstance(frame, dict):
            return ERROR, f"not an object: {payload[:80]!r}", None
        frame_type = frame.get("frameType", FRAME_DATA)
        frame_id = str(frame.get("id", ""))
        if frame_type == FRAME_ACK:
            if self.window_ack == WINDOW_TRANSPORT_ACK and frame.get("ackSeq") == 1:
                return ACK, frame_id, None
            return IGNORE, frame_id, None
        if frame_type in (FRAME_DATA, FRAME_NOACK):
            reply = None
            if self.ack_downstream and frame_type == FRAME_DATA:
                reply = dumps({"frameType": FRAME_ACK, "id": frame_id, "ackSeq": 1})
            data = frame.get("data")
            reply_to = frame.get("replyTo")
            if reply_to is None and isinstance(data, dict):
                reply_to = data.get("replyTo")
            if reply_to is not None:
                kind = ACK if self.window_ack == WINDOW_REPLY else IGNORE
                return kind, str(reply_to), reply
            text = _message_text(data)
            if text is None:
                return ERROR, f"Data frame without a message text: {payload[:120]!r}", reply
            return DELIVERY, token_of(text), reply
        if frame_type == FRAME_ERR:
            data = frame.get("data")
            detail = data if not isinstance(data, dict) else (data.get("code"), data.get("message"))
            return ERROR, f"Err frame for id {frame_id!r}: {detail}", None
        if frame_type == FRAME_PING:
            return IGNORE, frame_id, None
        return ERROR, f"unexpected frameType {frame_type!r}: {payload[:80]!r}", None


def _message_text(data: object) -> str | None:
    """The message text in a pushed payload: ``text`` (relay) or ``msg.content`` (chat)."""
    if not isinstance(data, dict):
        return None
    text = data.get("text")
    if isinstance(text, str):
        return text
    msg = data.get("msg")
    if isinstance(msg, dict) and isinstance(msg.get("content"), str):
        return str(msg["content"])
    content = data.get("content")
    return content if isinstance(content, str) else None


def client_codec(variant: str) -> ImkitCodec:
    """The load generator's codec for an imkit row of the suite."""
    if variant == "noack":
        return ImkitCodec(method=RELAY_METHOD, ack_downstream=False, window_ack=WINDOW_NONE)
    if variant in ("onlyack", "idle", "heartbeat"):
        return ImkitCodec(method=RELAY_METHOD, ack_downstream=True, window_ack=WINDOW_TRANSPORT_ACK)
    if variant in ("onlyack+sqlite", "onlyack+chat", "offline"):
        return ImkitCodec(method=CHAT_METHOD, ack_downstream=True, window_ack=WINDOW_REPLY)
    raise ValueError(f"unknown imkit variant {variant!r}")


def check() -> str | None:
    try:
        import imkit.transport as transport
    except ImportError as exc:
        return f"imkit server not available yet (import imkit.transport failed: {exc})"
    if getattr(transport, "__file__", None) is None:
        return "imkit server not available yet (imkit.transport is still an empty package)"
    if not SERVER_WIRED:
        return "imkit server not available yet (imkit_relay.serve() not wired)"
    return None


async def serve(options: PeerOptions) -> None:
    """Run the imkit relay (or the SQLite chat service) until killed."""
    import anyio

    import imkit
    from imkit.chat.app import create_chat_app

    mode = "none" if options.mode == "noack" else "only"
    auth = imkit.InsecureDevAuth(quiet=True)
    # Machine clients: no per-connection rate limit, no idle timeout.
    peer_options = imkit.PeerOptions(rate_limit=None, idle_timeout=None)
    if options.store in ("sqlite", "chat-memory"):
        from imkit.chat.memory import MemoryStore
        from imkit.chat.sqlite import SQLiteStore
        from imkit.chat.store import MessageStore

        store: MessageStore = MemoryStore()
        if options.store == "sqlite":
            assert options.db is not None
            store = SQLiteStore(options.db)
        app, _service = create_chat_app(
            store, auth=auth, auth_kind="dev", ack_mode=mode, serve_page=False
        )
        app.options = imkit.PeerOptions(
            ack_mode=app.ack_mode, rate_limit=None, idle_timeout=None, timers=app.options.timers
        )
    else:
        app = imkit.App(auth=auth, ack_mode=mode, options=peer_options)

        @app.route(RELAY_METHOD)
        async def relay(ctx: imkit.Context) -> None:
            await ctx.server.send_to_users(
                [ctx.data["to"]], RELAY_METHOD, ctx.data, form_id=ctx.user_id
            )

    app.max_connections_per_ip = 10**6  # every benchmark client comes from 127.0.0.1
    server = imkit.Server(app)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve, options.host, options.port)
        announce_ready(port)


PROFILE_ENV = "IMKIT_BENCH_PROFILE"
"""Set to a directory: the server runs under cProfile and writes
``<dir>/imkit-<mode>-<store>-<pid>.prof`` when it is stopped (SIGTERM); read it with
``python -m benchmarks.profile_report`` (benchmarks/README.md, "Profiling")."""

PROFILE_PHASE_ENV = "IMKIT_BENCH_PROFILE_PHASE"
"""Set (with :data:`PROFILE_ENV`) to profile the measured phase only: the profiler starts
off; SIGUSR1 turns it on and SIGUSR2 off (the harness sends them around each case's
measured phase: ``ServerProcess.profile_phase``)."""


def _profile_until_stopped(directory: str, argv: list[str]) -> None:
    """Profile this process from now on; write the profile and exit on SIGTERM."""
    import cProfile
    import signal
    from pathlib import Path

    def arg(name: str, default: str) -> str:
        return argv[argv.index(name) + 1] if name in argv[:-1] else default

    path = Path(directory) / (
        f"imkit-{arg('--mode', MODES[0])}-{arg('--store', 'memory')}-{os.getpid()}.prof"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = cProfile.Profile()

    def stop(signum: int, frame: object) -> None:
        profile.disable()
        profile.dump_stats(path)
        print(f"profile written to {path}", file=sys.stderr, flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if os.environ.get(PROFILE_PHASE_ENV):
        signal.signal(signal.SIGUSR1, lambda signum, frame: profile.enable())
        signal.signal(signal.SIGUSR2, lambda signum, frame: profile.disable())
    else:
        profile.enable()


def main() -> None:
    directory = os.environ.get(PROFILE_ENV)
    if directory:
        _profile_until_stopped(directory, sys.argv[1:])
    peer_main(serve, modes=MODES, check=check)


if __name__ == "__main__":
    main()
