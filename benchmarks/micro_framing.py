"""Microbenchmark of the WebSocket framing path of imkit's sans-IO connection.

``python -m benchmarks.micro_framing [--messages N] [--repeat R]`` prints µs per message
(best of ``R`` runs) for:

- ``recv raw``: N masked client text frames (100-byte JSON), one per ``receive_data``
  call, through a raw-mode :class:`~imkit.core.conn.ServerConn` (framing only);
- ``recv im``: the same through an IM-mode ServerConn in ack mode "only" (the Peer parses
  each frame, dispatches it and answers with an Ack, so the send path is in it too);
- ``send raw``: N ``send_raw`` text messages on a raw-mode ServerConn (unmasked frames);
- ``send client``: N ``send`` calls on a :class:`~imkit.core.conn.ClientConn` in ack
  mode "none" (masked frames).

Compare figures from the same machine and run only: they move with the machine's load.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import time
from collections.abc import Callable

from imkit.core.ack import AckMode
from imkit.core.conn import ClientConn, ConnLimits, ServerConn
from imkit.core.interfaces import Identity
from imkit.core.peer import PeerOptions

LIMITS = ConnLimits(ping_interval=None)
OPTIONS = PeerOptions(ack_mode=AckMode.ONLY, idle_timeout=None, rate_limit=None)
KEY = base64.b64encode(b"0123456789abcdef").decode()
REQUEST = (
    "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


def masked_text_frame(text: str) -> bytes:
    """A client's masked, unfragmented text frame (payload under 126 bytes)."""
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    body = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return struct.pack("!BB", 0x81, 0x80 | n) + mask + body


def message(i: int) -> str:
    """A 100-byte JSON Data frame (the relay's upstream message, roughly)."""
    head = {"frameType": 0, "id": f"m{i:08d}", "method": "relay", "data": {"to": "bob", "t": ""}}
    pad = 100 - len(json.dumps(head, separators=(",", ":")))
    head["data"]["t"] = "x" * pad  # type: ignore[index]
    text = json.dumps(head, separators=(",", ":"))
    assert len(text) == 100, len(text)
    return text


def open_server(*, raw: bool) -> ServerConn:
    conn = ServerConn(now=0.0, limits=LIMITS, raw=raw)
    conn.receive_data(REQUEST, 0.0)
    conn.events()
    conn.accept(Identity("alice"), 0.0, options=OPTIONS)
    conn.data_to_send()
    return conn


def open_client() -> ClientConn:
    client = ClientConn(
        host="bench",
        target="/ws",
        now=0.0,
        limits=LIMITS,
        options=PeerOptions(ack_mode=AckMode.NONE, idle_timeout=None, rate_limit=None),
        ack_mode=AckMode.NONE,
    )
    server = ServerConn(now=0.0, limits=LIMITS)
    server.receive_data(client.data_to_send(), 0.0)
    server.events()
    server.accept(Identity("alice"), 0.0, options=OPTIONS)
    client.receive_data(server.data_to_send(), 0.0)
    client.events()
    return client


def bench_recv(n: int, *, raw: bool) -> float:
    frames = [masked_text_frame(message(i)) for i in range(n)]
    conn = open_server(raw=raw)
    start = time.perf_counter()
    for wire in frames:
        conn.receive_data(wire, 1.0)
        conn.events()
        conn.data_to_send()
    elapsed = time.perf_counter() - start
    assert not conn.closed
    return elapsed


def bench_send_raw(n: int) -> float:
    texts = [message(i) for i in range(n)]
    conn = open_server(raw=True)
    start = time.perf_counter()
    for text in texts:
        conn.send_raw(text)
        conn.data_to_send()
    return time.perf_counter() - start


def bench_send_client(n: int) -> float:
    client = open_client()
    start = time.perf_counter()
    for i in range(n):
        client.send("relay", {"to": "bob", "t": "x" * 40, "i": i}, 1.0)
        client.events()
        client.data_to_send()
    elapsed = time.perf_counter() - start
    assert not client.closed and not client.events()
    return elapsed


def best(run: Callable[[int], float], n: int, repeat: int) -> float:
    """Best µs per message of ``repeat`` runs."""
    return min(run(n) for _ in range(repeat)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, repeat = args.messages, args.repeat
    cases: list[tuple[str, Callable[[int], float]]] = [
        ("recv raw", lambda k: bench_recv(k, raw=True)),
        ("recv im", lambda k: bench_recv(k, raw=False)),
        ("send raw", bench_send_raw),
        ("send client", bench_send_client),
    ]
    print(f"{n} messages, best of {repeat}")
    for name, run in cases:
        print(f"{name:12} {best(run, n, repeat):8.2f} µs/msg")


if __name__ == "__main__":
    main()
