"""Test helpers for the sans-IO core: raw handshakes, a masking client, coroutine runner."""

from __future__ import annotations

import base64
import json
from collections.abc import Coroutine, Sequence
from typing import Any

from wsproto.frame_protocol import Frame as WSFrame
from wsproto.frame_protocol import FrameProtocol, Opcode

from imkit.core.conn import ConnLimits, ServerConn
from imkit.core.events import Event
from imkit.core.frames import Frame, FrameType, decode_frame, encode_frame
from imkit.core.interfaces import Identity
from imkit.core.peer import PeerOptions

KEY = base64.b64encode(b"0123456789abcdef").decode()
"""A valid Sec-WebSocket-Key (16 bytes, base64)."""


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (the core's protocols' simple implementations)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine suspended")


def upgrade_request(
    path: str = "/ws",
    *,
    method: str = "GET",
    host: str | None = "chat.example.com",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    version: str | None = "13",
    key: str | None = KEY,
    origin: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The bytes of a WebSocket upgrade request; ``None`` leaves a header out."""
    lines = [f"{method} {path} HTTP/1.1"]
    for name, value in (
        ("Host", host),
        ("Upgrade", upgrade),
        ("Connection", connection),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
        ("Origin", origin),
    ):
        if value is not None:
            lines.append(f"{name}: {value}")
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(response: bytes) -> int:
    """The status code of an HTTP response the server wrote."""
    assert response.startswith(b"HTTP/1.1 "), response[:60]
    return int(response[9:12])


def header_of(response: bytes, name: str) -> str | None:
    """A header value of an HTTP response (case-insensitive name)."""
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


class WireClient:
    """A client's WebSocket framing, by hand: masked frames out, server frames decoded."""

    def __init__(self) -> None:
        self.proto = FrameProtocol(client=True, extensions=[])
        self.reader = FrameProtocol(client=True, extensions=[])

    def text(self, text: str, *, fin: bool = True) -> bytes:
        return self.proto.send_data(text, fin)

    def frame(self, frame: Frame) -> bytes:
        return self.text(encode_frame(frame))

    def obj(self, obj: Any) -> bytes:
        return self.text(json.dumps(obj))

    def binary(self, data: bytes) -> bytes:
        return self.proto.send_data(data, True)

    def ping(self, payload: bytes = b"hi") -> bytes:
        return self.proto.ping(payload)

    def pong(self, payload: bytes = b"") -> bytes:
        return self.proto.pong(payload)

    def close(self, code: int | None = 1000, reason: str = "") -> bytes:
        return self.proto.close(code, reason)

    def read(self, data: bytes) -> list[WSFrame]:
        """Decode what the server wrote (after the 101 response) into WebSocket frames."""
        self.reader.receive_bytes(data)
        return list(self.reader.received_frames())

    def read_frames(self, data: bytes) -> list[Frame]:
        """The imkit frames among what the server wrote (text messages only)."""
        frames = []
        for ws in self.read(data):
            if ws.opcode is Opcode.TEXT:
                decoded = decode_frame(ws.payload)
                assert isinstance(decoded, Frame), decoded
                frames.append(decoded)
        return frames

    def read_close(self, data: bytes) -> tuple[int, str] | None:
        """The close code and reason the server sent, if it sent a close frame."""
        for ws in self.read(data):
            if ws.opcode is Opcode.CLOSE:
                code, reason = ws.payload
                return int(code), reason
        return None


def open_server(
    *,
    options: PeerOptions | None = None,
    limits: ConnLimits | None = None,
    now: float = 0.0,
    user: str = "alice",
    **accept: Any,
) -> tuple[ServerConn, WireClient]:
    """A ServerConn past an accepted handshake, and the client's framing to talk to it."""
    conn = ServerConn(now=now, limits=limits or ConnLimits(ping_interval=None))
    conn.receive_data(upgrade_request(), now)
    conn.events()
    conn.accept(Identity(user), now, options=options or quiet_options(), **accept)
    response = conn.data_to_send()
    assert status_of(response) == 101
    return conn, WireClient()


def quiet_options(**overrides: Any) -> PeerOptions:
    """PeerOptions with no idle timeout and no rate limit (they are tested on their own)."""
    base: dict[str, Any] = {"idle_timeout": None, "rate_limit": None}
    base.update(overrides)
    return PeerOptions(**base)


def data(frame_id: str, method: str = "echo", payload: Any = None, **kw: Any) -> Frame:
    """A client Data frame."""
    return Frame(FrameType.DATA, id=frame_id, method=method, data=payload, **kw)


def kinds(events: Sequence[Event]) -> list[str]:
    """The class names of ``events``, for compact assertions."""
    return [type(e).__name__ for e in events]


def built_extension(name: str, needs: str = "a C compiler") -> Any:
    """The C extension ``imkit.<name>``, or skip the test when it was not built (fail
    instead under ``IMKIT_REQUIRE_SPEEDUPS=1``, as CI sets: there it must be built);
    ``needs``: what its build needs, for the reason given."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(f"imkit.{name}")
    except ImportError as exc:
        reason = f"imkit.{name} is not built ({exc}); `pip install -e .` with {needs}"
        if os.environ.get("IMKIT_REQUIRE_SPEEDUPS"):
            pytest.fail(reason)
        pytest.skip(reason)


def speedups() -> Any:
    """The C extension ``imkit._speedups`` (see :func:`built_extension`)."""
    return built_extension("_speedups")


def naive_mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3 masking, byte by byte: the reference for both implementations."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))
