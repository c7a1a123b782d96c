"""A plain WebSocket echo server on imkit's transport (raw mode: no IM framing).

Every text message comes back as text and every binary message as binary. This is what
the Autobahn conformance run (``tests/conformance/test_autobahn.py``, through kosoku)
drives: it exercises imkit's WebSocket layer (wsproto, the limits of
:class:`imkit.ConnLimits`, the closing handshake, keepalive) without the IM layer.

Run it::

    python examples/echo_server.py --port 9001
    kosoku ws://127.0.0.1:9001/ -x '12.*' -x '13.*'

Anyone may connect (the handshake needs no credential); each connection gets its own
anonymous identity. Do not expose it beyond a test machine.
"""

from __future__ import annotations

import argparse
import itertools
import re

import anyio

from imkit import App, ConnLimits, HandshakeRequest, Identity, Server
from imkit.transport.session import ServerSession

# Autobahn's 9.* cases send messages of up to 16 MiB; leave room above that. The
# fragment cap stays at imkit's default (4096), which cases 9.3.1, 9.3.2, 9.4.1 and
# 9.4.2 exceed on purpose (see docs/security.md, "Fragments").
ECHO_LIMITS = ConnLimits(max_message_size=20 * 2**20, ping_interval=None)


class AnonymousAuth:
    """Admits every handshake, giving each connection a fresh user id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Return a new anonymous identity."""
        return Identity(user_id=f"anonymous-{next(self._ids)}")


async def echo(session: ServerSession, data: str | bytes) -> None:
    """Send the message back as it came: text as text, binary as binary."""
    session.send_raw(data)


def build_server(limits: ConnLimits = ECHO_LIMITS) -> Server:
    """An echo :class:`~imkit.Server` answering on every path."""
    app = App(
        auth=AnonymousAuth(),
        path=re.compile(r"/.*"),
        login_policy="multi",
        limits=limits,
        max_connections_per_user=1,
    )
    # An echo holds a whole message in its send buffer: let it hold a few of the largest.
    return Server(
        app, raw_handler=echo, shutdown_timeout=1.0, max_write_buffer=4 * limits.max_message_size
    )


def main() -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description="imkit WebSocket echo server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()

    async def serve() -> None:
        server = build_server()
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, args.host, args.port)
            print(f"echo server on ws://{args.host}:{port}/", flush=True)

    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
