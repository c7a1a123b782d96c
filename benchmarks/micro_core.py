"""Microbenchmark of the sans-IO message layer: ``python -m benchmarks.micro_core``.

Times, in µs per operation, what the server's core does for each message of the
``imkit onlyack`` relay (no sockets, no event loop, no WebSocket framing):

- decoding the sender's Data frame and the recipient's Ack;
- encoding the push and the upstream Ack;
- a server :class:`~imkit.core.peer.Peer` receiving a Data frame (Ack out, event in);
- a server Peer sending a push and then receiving the recipient's Ack for it.

Each figure is the best of ``--repeat`` rounds of ``--number`` operations, in CPU time of
this process (``time.process_time``: time spent descheduled on a busy machine does not
count, and the minimum is the least disturbed round). The frames are the ones the load
generator of :mod:`benchmarks.peers.imkit_relay` sends: ids like ``s3-17``, a 100-byte text.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from imkit.core.frames import Frame, FrameType, decode_frame, encode_frame
from imkit.core.peer import Peer, PeerOptions

TEXT = "s3-17|" + "x" * 94
"""A message text as the load generator makes it: a token, then padding to 100 bytes."""


def data_text(message_id: str) -> str:
    """The sender's Data frame for the ``relay`` route, as the load generator sends it."""
    return json.dumps(
        {
            "frameType": 0,
            "id": message_id,
            "ackSeq": 0,
            "method": "relay",
            "formId": "",
            "transpondUid": "",
            "data": {"to": "r3", "text": TEXT},
        },
        separators=(",", ":"),
    )


def ack_text(message_id: str) -> str:
    """The recipient's Ack of a push, as the load generator sends it."""
    return json.dumps({"frameType": 2, "id": message_id, "ackSeq": 1}, separators=(",", ":"))


def _options() -> PeerOptions:
    # As in the benchmark server: machine clients, no rate limit, no idle timeout.
    return PeerOptions(rate_limit=None, idle_timeout=None)


def _time(setup: Callable[[int], Callable[[], None]], number: int, repeat: int) -> float:
    """Best µs/op over ``repeat`` rounds; ``setup(number)`` returns the round to time."""
    best = float("inf")
    for _ in range(repeat):
        run = setup(number)
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best / number * 1e6


def bench_decode_data(number: int) -> Callable[[], None]:
    """Decode a typical Data frame."""
    text = data_text("s3-17")

    def run() -> None:
        for _ in range(number):
            decode_frame(text)

    return run


def bench_decode_ack(number: int) -> Callable[[], None]:
    """Decode the recipient's Ack of a push."""
    text = ack_text("0a1b2c3d-17")

    def run() -> None:
        for _ in range(number):
            decode_frame(text)

    return run


def bench_encode_push(number: int) -> Callable[[], None]:
    """Encode the push of a relayed message."""
    frame = Frame(
        FrameType.DATA,
        id="0a1b2c3d-17",
        method="relay",
        form_id="s3",
        data={"to": "r3", "text": TEXT},
    )

    def run() -> None:
        for _ in range(number):
            encode_frame(frame)

    return run


def bench_encode_ack(number: int) -> Callable[[], None]:
    """Encode the upstream Ack of a Data frame."""
    frame = Frame(FrameType.ACK, id="s3-17", ack_seq=1)

    def run() -> None:
        for _ in range(number):
            encode_frame(frame)

    return run


def bench_peer_receive(number: int) -> Callable[[], None]:
    """A server Peer receives a Data frame: one Ack out, one MessageReceived event."""
    texts = [data_text(f"s3-{i}") for i in range(number)]
    peer = Peer(_options(), server=True, now=0.0, user_id="s3", accepts_method=lambda m: True)

    def run() -> None:
        now = 0.0
        for text in texts:
            now += 1e-4
            peer.receive_text(text, now)
            peer.outgoing()
            peer.events()

    return run


def bench_peer_push(number: int) -> Callable[[], None]:
    """A server Peer sends a push, then receives the Ack for it (Delivered event)."""
    acks = [ack_text(f"p-{i}") for i in range(1, number + 1)]
    peer = Peer(_options(), server=True, now=0.0, user_id="r3", id_prefix="p-")
    data: dict[str, Any] = {"to": "r3", "text": TEXT}

    def run() -> None:
        now = 0.0
        for ack in acks:
            now += 1e-4
            peer.send("relay", data, now, form_id="s3")
            peer.outgoing()
            peer.receive_text(ack, now)
            peer.events()

    return run


CASES: tuple[tuple[str, Callable[[int], Callable[[], None]]], ...] = (
    ("decode Data frame", bench_decode_data),
    ("decode Ack frame", bench_decode_ack),
    ("encode push (Data)", bench_encode_push),
    ("encode Ack", bench_encode_ack),
    ("Peer: receive Data -> Ack + event", bench_peer_receive),
    ("Peer: send push + receive its Ack", bench_peer_push),
)


def main(argv: list[str] | None = None) -> None:
    """Print a Markdown table of µs/op for every case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--number", type=int, default=20_000, help="operations per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best is reported")
    args = parser.parse_args(argv)
    rows = [(name, _time(setup, args.number, args.repeat)) for name, setup in CASES]
    width = max(len(name) for name, _ in rows)
    print(f"| {'case':<{width}} | µs/op |")
    print(f"|{'-' * (width + 2)}|------:|")
    for name, micros in rows:
        print(f"| {name:<{width}} | {micros:5.2f} |")


if __name__ == "__main__":
    main()
