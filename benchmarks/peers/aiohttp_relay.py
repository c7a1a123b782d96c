"""Relay peer on aiohttp's WebSocket server (reference).

Same protocol as the websockets relay (:class:`benchmarks.wire.RelayJsonCodec`).
Access logging is off, so the server does not format a log line per connection.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from benchmarks.peers._common import PeerOptions, announce_ready, peer_main, run_forever
from benchmarks.wire import RelayJsonCodec

if TYPE_CHECKING:
    from aiohttp import web

MODES = ("noack", "ack")


def client_codec(variant: str) -> RelayJsonCodec:
    """The load generator's codec for this peer."""
    return RelayJsonCodec()


def check() -> str | None:
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        return f"aiohttp not installed ({exc})"
    return None


async def serve(options: PeerOptions) -> None:
    from aiohttp import WSMsgType, web

    ack = options.mode == "ack"
    conns: dict[str, web.WebSocketResponse] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        user = request.query.get("user")
        if user is None:
            raise web.HTTPBadRequest(text="missing ?user=")
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        conns[user] = ws
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                msg = json.loads(frame.data)
                msg_id = msg["id"]
                target = conns.get(msg["to"])
                if target is not None and not target.closed:
                    out = json.dumps(
                        {"id": msg_id, "from": user, "text": msg["text"]}, separators=(",", ":")
                    )
                    try:
                        await target.send_str(out)
                    except ConnectionError:
                        pass
                if ack:
                    await ws.send_str(json.dumps({"ack": msg_id}, separators=(",", ":")))
        finally:
            if conns.get(user) is ws:
                del conns[user]
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
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
