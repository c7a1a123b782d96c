"""Relay peer on the websockets library (its asyncio implementation).

Protocol: :class:`benchmarks.wire.RelayJsonCodec`. A user connects to ``/?user=<id>``
and sends ``{"id", "to", "text"}``; the server relays ``{"id", "from", "text"}`` to the
recipient's socket and, in ``--mode ack``, then answers ``{"ack": id}`` to the sender.
Compression is off, as for every peer (the load generator never offers it anyway).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from benchmarks.peers._common import (
    PeerOptions,
    announce_ready,
    peer_main,
    run_forever,
    user_from_target,
)
from benchmarks.wire import RelayJsonCodec

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

MODES = ("noack", "ack")


def client_codec(variant: str) -> RelayJsonCodec:
    """The load generator's codec for this peer."""
    return RelayJsonCodec()


def check() -> str | None:
    try:
        import websockets  # noqa: F401
    except ImportError as exc:
        return f"websockets not installed ({exc})"
    return None


async def serve(options: PeerOptions) -> None:
    from websockets.asyncio.server import serve as ws_serve
    from websockets.exceptions import ConnectionClosed

    ack = options.mode == "ack"
    conns: dict[str, ServerConnection] = {}

    async def handler(ws: ServerConnection) -> None:
        user = user_from_target(ws.request.path) if ws.request is not None else None
        if user is None:
            await ws.close(1008, "missing ?user=")
            return
        conns[user] = ws
        try:
            async for raw in ws:
                msg = json.loads(raw)
                msg_id = msg["id"]
                target = conns.get(msg["to"])
                if target is not None:
                    out = json.dumps(
                        {"id": msg_id, "from": user, "text": msg["text"]}, separators=(",", ":")
                    )
                    try:
                        await target.send(out)
                    except ConnectionClosed:
                        pass
                if ack:
                    await ws.send(json.dumps({"ack": msg_id}, separators=(",", ":")))
        finally:
            if conns.get(user) is ws:
                del conns[user]

    async with ws_serve(handler, options.host, options.port, compression=None) as server:
        announce_ready(server.sockets[0].getsockname()[1])
        await run_forever()


def main() -> None:
    peer_main(serve, modes=MODES, check=check)


if __name__ == "__main__":
    main()
