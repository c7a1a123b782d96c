"""Raw-socket tools for the abuse tests: a real imkit server on loopback, and a client that
writes HTTP and WebSocket bytes by hand (so it can write the bytes a polite client never
would: unmasked frames, reserved opcodes, 64-bit lengths, 2000 headers).

Nothing here uses imkit's own client or codec, so what a test asserts is what any client
on the wire would see.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from imkit import App, ConnLimits, PeerOptions, Server, TokenAuth, mint_token

SECRET = "abuse-test-secret-0123456789"
KEY = base64.b64encode(b"0123456789abcdef").decode()
"""A valid Sec-WebSocket-Key."""

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def token(user: str = "alice", **options: Any) -> str:
    """A valid token for ``user`` (see :func:`imkit.mint_token`)."""
    return mint_token(SECRET, user, **options)


class Recorder:
    """An app whose ``echo`` route records what reached application code."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, str, Any]] = []  # (user, formId, data)
        self.connected: list[str] = []


def make_app(
    *,
    limits: ConnLimits | None = None,
    options: PeerOptions | None = None,
    recorder: Recorder | None = None,
    **app_options: Any,
) -> App:
    """An app with token auth, an ``echo`` route and a ``boom`` route that raises."""
    rec = recorder if recorder is not None else Recorder()
    app = App(
        auth=TokenAuth(SECRET),
        limits=limits or ConnLimits(ping_interval=None),
        options=options,
        **app_options,
    )

    @app.route("echo")
    async def echo(ctx: Any) -> None:
        rec.handled.append((ctx.user_id, ctx.frame.form_id, ctx.data))
        await ctx.reply(ctx.data)

    @app.route("boom")
    async def boom(ctx: Any) -> None:
        raise RuntimeError("handler failure on purpose")

    @app.on_connect
    async def connected(session: Any, server: Any) -> None:
        rec.connected.append(session.user_id)

    return app


@asynccontextmanager
async def running(app: App, **server_options: Any) -> AsyncIterator[tuple[Server, int]]:
    """Serve ``app`` on 127.0.0.1, port 0; yield the server and its port; then shut it
    down gracefully (``serve`` returns once its connections are closed)."""
    server_options.setdefault("shutdown_timeout", 1.0)
    server = Server(app, **server_options)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve, "127.0.0.1", 0)
        try:
            yield server, port
        finally:
            server.shutdown()


def request_head(
    path: str = "/ws",
    *,
    headers: Sequence[tuple[str, str]] = (),
    version: str | None = "13",
    key: str | None = KEY,
    upgrade: bool = True,
    tok: str | None = None,
    origin: str | None = None,
) -> bytes:
    """An HTTP/1.1 upgrade request head (``upgrade=False``: a plain GET)."""
    target = path if tok is None else f"{path}?token={tok}"
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
        if version is not None:
            lines.append(f"Sec-WebSocket-Version: {version}")
        if key is not None:
            lines.append(f"Sec-WebSocket-Key: {key}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Wire:
    """One raw TCP connection to the server."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def http_response(self) -> tuple[int, dict[str, str], bytes]:
        """Read an HTTP response head (and a Content-Length body)."""
        head = await self.reader.receive_until(b"\r\n\r\n", 65536)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        length = int(headers.get("content-length", "0"))
        if length:
            body = await self.reader.receive_exactly(length)
        return status, headers, body

    async def upgrade(self, tok: str | None = None, **head: Any) -> dict[str, str]:
        """Do the opening handshake; assert 101."""
        await self.send(request_head(tok=tok if tok is not None else token(), **head))
        status, headers, _ = await self.http_response()
        assert status == 101, status
        return headers

    async def send_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        length: int | None = None,
    ) -> None:
        """Write one frame; ``length`` overrides the announced payload length."""
        await self.send(frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length))

    async def send_text(self, obj: Any) -> None:
        """Send one JSON object as a text frame."""
        await self.send_frame(OP_TEXT, json.dumps(obj).encode())

    async def read_frame(self) -> tuple[int, bytes]:
        """Read one (unmasked, server) frame: ``(opcode, payload)``."""
        b0, b1 = await self.reader.receive_exactly(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.receive_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.receive_exactly(8))
        payload = await self.reader.receive_exactly(length) if length else b""
        return b0 & 0x0F, payload

    async def read_json(self) -> dict[str, Any]:
        """Read frames until a text frame; return it decoded (fails on a close)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_TEXT:
                result: dict[str, Any] = json.loads(payload)
                return result
            assert opcode != OP_CLOSE, f"closed: {close_code(payload)}"

    async def read_close(self) -> int | None:
        """Read frames until a close frame; return its code (None: no code)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_CLOSE:
                return close_code(payload)

    async def finish_close(self) -> int | None:
        """Read the server's close frame, answer it as a client must, and wait for the
        server to close TCP; return the server's close code."""
        code = await self.read_close()
        try:
            await self.send_frame(OP_CLOSE, struct.pack("!H", code) if code else b"")
        except (anyio.BrokenResourceError, ConnectionError, OSError):
            pass
        assert await self.at_eof()
        return code

    async def at_eof(self) -> bool:
        """Whether the server closed the TCP connection (after reading what is left)."""
        try:
            while True:
                await self.reader.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            return True

    async def aclose(self) -> None:
        await self.stream.aclose()


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """The bytes of one client frame."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 2**16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    head += key
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + masked


@asynccontextmanager
async def wire(port: int) -> AsyncIterator[Wire]:
    """A raw TCP connection to 127.0.0.1:``port``."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    try:
        yield Wire(stream)
    finally:
        await anyio.aclose_forcefully(stream)


def data_frame(method: str, data: Any, frame_id: str, **extra: Any) -> dict[str, Any]:
    """An IM ``Data`` frame (DESIGN §2)."""
    return {"frameType": 0, "id": frame_id, "method": method, "data": data, **extra}
