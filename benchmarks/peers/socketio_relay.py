"""Relay peer on python-socketio (AsyncServer on aiohttp).

A user connects with ``?user=<id>`` in the URL (websocket transport only, no long
polling) and emits ``chat`` with ``{"id", "to", "text"}``; the server emits ``chat``
with ``{"id", "from", "text"}`` to the recipient's sid. In ``--mode ack`` the sender
emits with a callback and the handler's return value (the message id) is the ack.
(Socket.IO acks are requested by the client; the server only decides the ack's value.)
Access logging and the Socket.IO/Engine.IO loggers are off. ``--ping-interval S`` sets
Engine.IO's ``ping_interval`` (the server pings every client every S seconds; default 25).
"""

from __future__ import annotations

from typing import Any

from benchmarks.peers._common import (
    PeerOptions,
    announce_ready,
    peer_main,
    run_forever,
    user_from_target,
)

MODES = ("noack", "ack")


def check() -> str | None:
    try:
        import aiohttp  # noqa: F401
        import socketio  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        return f"python-socketio / aiohttp not installed ({exc})"
    return None


async def serve(options: PeerOptions) -> None:
    import socketio
    from aiohttp import web

    ack = options.mode == "ack"
    # Engine.IO's heartbeat is server-initiated: "2" every ping_interval, answered "3".
    ping = {} if options.ping_interval is None else {"ping_interval": options.ping_interval}
    sio = socketio.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False, **ping)
    sid_of: dict[str, str] = {}
    user_of: dict[str, str] = {}

    async def on_connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        user = user_from_target("/?" + environ.get("QUERY_STRING", ""))
        if user is None:
            return False
        sid_of[user] = sid
        user_of[sid] = user
        return True

    async def on_disconnect(sid: str, reason: Any = None) -> None:
        user = user_of.pop(sid, None)
        if user is not None and sid_of.get(user) == sid:
            del sid_of[user]

    async def on_chat(sid: str, data: dict[str, Any]) -> str | None:
        msg_id = data["id"]
        target = sid_of.get(data["to"])
        if target is not None:
            out = {"id": msg_id, "from": user_of.get(sid), "text": data["text"]}
            await sio.emit("chat", out, to=target)
        return msg_id if ack else None

    sio.on("connect", on_connect)
    sio.on("disconnect", on_disconnect)
    sio.on("chat", on_chat)

    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    try:
        announce_ready(runner.addresses[0][1])
        await run_forever()
    finally:
        await runner.cleanup()


def main() -> None:
    peer_main(serve, modes=MODES, check=check)


if __name__ == "__main__":
    main()
