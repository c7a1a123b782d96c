"""Relay peer on picows (Cython WebSocket library): the near-ceiling reference.

Same protocol as the websockets relay (:class:`benchmarks.wire.RelayJsonCodec`), and
the same JSON work per message (stdlib ``json`` parse + dump); what remains is how
cheap picows' framing and callback model are. picows hands over frames, not messages:
this relay assumes unfragmented text frames, which is what the load generator sends.
picows' own defaults apply (it uses aiofastnet for its sockets when that is installed).
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
    from picows import WSListener, WSUpgradeRequest

MODES = ("noack", "ack")


def client_codec(variant: str) -> RelayJsonCodec:
    """The load generator's codec for this peer."""
    return RelayJsonCodec()


def check() -> str | None:
    try:
        import picows  # noqa: F401
    except ImportError as exc:
        return f"picows not installed ({exc})"
    return None


async def serve(options: PeerOptions) -> None:
    import picows
    from picows import WSMsgType

    ack = options.mode == "ack"
    conns: dict[str, picows.WSTransport] = {}
    text = WSMsgType.TEXT
    close = WSMsgType.CLOSE

    class RelayListener(picows.WSListener):
        def __init__(self, user: str) -> None:
            super().__init__()
            self.user = user

        def on_ws_connected(self, transport: picows.WSTransport) -> None:
            conns[self.user] = transport

        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            msg_type = frame.msg_type
            if msg_type == text:
                msg = json.loads(frame.get_payload_as_bytes())
                msg_id = msg["id"]
                target = conns.get(msg["to"])
                if target is not None:
                    out = json.dumps(
                        {"id": msg_id, "from": self.user, "text": msg["text"]},
                        separators=(",", ":"),
                    )
                    target.send(text, out.encode())
                if ack:
                    transport.send(
                        text, json.dumps({"ack": msg_id}, separators=(",", ":")).encode()
                    )
            elif msg_type == close:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
            if conns.get(self.user) is transport:
                del conns[self.user]

    def listener_factory(request: WSUpgradeRequest) -> WSListener | None:
        user = user_from_target(request.path.decode("latin-1"))
        return None if user is None else RelayListener(user)

    server = await picows.ws_create_server(listener_factory, options.host, options.port)
    async with server:
        announce_ready(server.sockets[0].getsockname()[1])
        await run_forever()


def main() -> None:
    peer_main(serve, modes=MODES, check=check)


if __name__ == "__main__":
    main()
