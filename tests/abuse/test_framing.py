"""CASES.md B9-B18: RFC 6455 framing faults, written byte by byte on a raw socket.

Autobahn (tests/conformance) covers most of these through an echo server; these run the
same faults against the IM server itself, and the ones Autobahn cannot send (an unmasked
client frame, a 2**62-byte header).
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from imkit import ConnLimits

from .wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Recorder,
    Wire,
    frame,
    make_app,
    running,
    wire,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def ws(
    limits: ConnLimits | None = None, recorder: Recorder | None = None
) -> AsyncIterator[Wire]:
    """A server and one raw, upgraded connection to it (user alice)."""
    app = make_app(limits=limits, recorder=recorder)
    async with running(app) as (_, port), wire(port) as w:
        await w.upgrade()
        yield w


async def expect_close(w: Wire, code: int) -> None:
    """The server sends a close frame with ``code`` and then closes TCP."""
    assert await w.read_close() == code
    assert await w.at_eof()


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


# ---------------------------------------------------------------------------- B9
async def test_b9_unmasked_client_frame_closes_1002() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_TEXT, b'{"frameType": 1}', mask=False)
            await expect_close(w, 1002)


# ---------------------------------------------------------------------------- B10
@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
async def test_b10_rsv_bits_without_extension_close_1002(rsv: int) -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_TEXT, b'{"frameType": 1}', rsv=rsv)
            await expect_close(w, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
async def test_b10_reserved_opcodes_close_1002(opcode: int) -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(opcode, b"x")
            await expect_close(w, 1002)


# ---------------------------------------------------------------------------- B11
async def test_b11_control_frame_over_125_bytes_closes_1002() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_PING, b"p" * 126)
            await expect_close(w, 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
async def test_b11_fragmented_control_frame_closes_1002(opcode: int) -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(opcode, b"\x03\xe8" if opcode == OP_CLOSE else b"p", fin=False)
            await expect_close(w, 1002)


# ---------------------------------------------------------------------------- B12
async def test_b12_continuation_with_nothing_to_continue_closes_1002() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_CONT, b"{}")
            await expect_close(w, 1002)


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
async def test_b12_new_data_frame_inside_a_fragmented_message_closes_1002(second: int) -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_TEXT, b'{"frameType":', fin=False)
            await w.send_frame(second, b" 1}")
            await expect_close(w, 1002)


# ---------------------------------------------------------------------------- B13
async def test_b13_invalid_utf8_closes_1007() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_TEXT, b'{"frameType": 1, "id": "\xff"}')
            await expect_close(w, 1007)


async def test_b13_bad_utf8_split_across_fragments_closes_1007() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_TEXT, b'{"id": "\xe2\x82', fin=False)  # a code point begins
            await w.send_frame(OP_CONT, b'\x28"}')  # ... and does not continue
            await expect_close(w, 1007)


async def test_b13_utf8_fails_fast_before_the_message_ends() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_TEXT, b'{"id": "ok \xc0\xaf', fin=False)  # overlong: invalid
            # The message is still open: the server must not wait for its end.
            with anyio.fail_after(2):
                await expect_close(w, 1007)


async def test_b13_code_point_split_across_fragments_is_fine() -> None:
    recorder = Recorder()
    with anyio.fail_after(10):
        async with ws(recorder=recorder) as w:
            await w.send_frame(
                OP_TEXT, b'{"frameType": 0, "id": "m1", "method": "echo", ', fin=False
            )
            await w.send_frame(OP_CONT, b'"data": "\xe2\x82', fin=False)
            await w.send_frame(OP_CONT, b'\xac \xf0\x9f\x98\x80"}')
            assert (await w.read_json())["frameType"] == 2
            reply = await w.read_json()
            assert reply["data"] == "\u20ac \U0001f600"
    assert recorder.handled == [("alice", "alice", "\u20ac \U0001f600")]


# ---------------------------------------------------------------------------- B14
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x03", id="1-byte"),
        *[
            pytest.param(close_payload(code), id=str(code))
            for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
        ],
    ],
)
async def test_b14_bad_close_payload_closes_1002(payload: bytes) -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_CLOSE, payload)
            await expect_close(w, 1002)


async def test_b14_non_utf8_close_reason_closes_1007() -> None:
    """CASES.md lists 1002; imkit (wsproto) answers 1007 "invalid payload data", which is
    what Autobahn 7.5.1 requires and RFC 6455 7.4.1 defines for non-UTF-8 text."""
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_CLOSE, close_payload(1000, b"\xff\xfe"))
            await expect_close(w, 1007)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 3000, 4000, 4999])
async def test_b14_valid_close_is_echoed_then_tcp_closed(code: int) -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_CLOSE, close_payload(code, "bye \u00e9".encode()))
            await expect_close(w, code)


async def test_b14_empty_close_is_answered_without_a_code() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            await w.send_frame(OP_CLOSE, b"")
            opcode, payload = await w.read_frame()
            assert opcode == OP_CLOSE
            assert payload in (b"", close_payload(1000))
            assert await w.at_eof()


# ---------------------------------------------------------------------------- B15
async def test_b15_ping_inside_a_fragmented_message_is_answered_at_once() -> None:
    recorder = Recorder()
    with anyio.fail_after(10):
        async with ws(recorder=recorder) as w:
            await w.send_frame(OP_TEXT, b'{"frameType": 0, "id": "m1", ', fin=False)
            await w.send_frame(OP_PING, b"ping-payload-\x00\xff")
            opcode, payload = await w.read_frame()  # before the message is finished
            assert (opcode, payload) == (OP_PONG, b"ping-payload-\x00\xff")
            await w.send_frame(OP_PONG, b"unsolicited")  # ignored
            await w.send_frame(OP_CONT, b'"method": "echo", ', fin=False)
            await w.send_frame(OP_PING, b"")
            assert await w.read_frame() == (OP_PONG, b"")
            await w.send_frame(OP_CONT, b'"data": "intact"}')
            assert (await w.read_json())["frameType"] == 2
            assert (await w.read_json())["data"] == "intact"
    assert recorder.handled == [("alice", "alice", "intact")]


# ---------------------------------------------------------------------------- B16
async def test_b16_frames_after_close_are_ignored() -> None:
    recorder = Recorder()
    with anyio.fail_after(10):
        async with ws(recorder=recorder) as w:
            await w.send(
                frame(OP_CLOSE, close_payload(1000))
                + frame(OP_TEXT, b'{"frameType": 0, "id": "late", "method": "echo", "data": 1}')
                + frame(OP_PING, b"late")
                + frame(OP_CLOSE, close_payload(1001))
            )
            frames = []
            try:
                while True:
                    frames.append(await w.read_frame())
            except (anyio.IncompleteRead, anyio.EndOfStream, ConnectionError):
                pass
            assert frames == [(OP_CLOSE, close_payload(1000))]  # one close, nothing else
    assert recorder.handled == []


async def test_b16_close_mid_fragment_is_echoed_with_its_code() -> None:
    """Documented choice (docs/security.md): a close frame inside a fragmented message is
    a valid close (control frames may interleave), answered with the same code, like
    Autobahn expects; the unfinished message is dropped."""
    recorder = Recorder()
    with anyio.fail_after(10):
        async with ws(recorder=recorder) as w:
            await w.send_frame(OP_TEXT, b'{"frameType": 0, "id": "m1", ', fin=False)
            await w.send_frame(OP_CLOSE, close_payload(1000))
            await expect_close(w, 1000)
    assert recorder.handled == []


# ---------------------------------------------------------------------------- B17
async def test_b17_huge_64_bit_length_closes_1009_at_the_header() -> None:
    with anyio.fail_after(10):
        async with ws() as w:
            started = time.monotonic()
            # Only the header (and a few bytes): the payload never comes.
            await w.send(frame(OP_TEXT, b"{}", length=2**62)[:16])
            await expect_close(w, 1009)
            assert time.monotonic() - started < 2


async def test_b17_header_over_max_size_closes_1009_before_the_payload() -> None:
    limits = ConnLimits(max_message_size=64 * 1024, ping_interval=None)
    with anyio.fail_after(10):
        async with ws(limits=limits) as w:
            await w.send(frame(OP_TEXT, b"", length=64 * 1024 + 1)[:14])
            await expect_close(w, 1009)


async def test_b17_message_over_max_size_closes_1009() -> None:
    limits = ConnLimits(max_message_size=4096, ping_interval=None)
    with anyio.fail_after(10):
        async with ws(limits=limits) as w:
            body = b'{"frameType": 3, "method": "echo", "data": "' + b"a" * 4096 + b'"}'
            await w.send_frame(OP_TEXT, body)
            await expect_close(w, 1009)


async def test_b17_fragments_adding_up_over_max_size_close_1009() -> None:
    limits = ConnLimits(max_message_size=4096, ping_interval=None)
    with anyio.fail_after(10):
        async with ws(limits=limits) as w:
            await w.send_frame(OP_TEXT, b'{"data": "' + b"a" * 2000, fin=False)
            await w.send_frame(OP_CONT, b"a" * 2000, fin=False)
            await w.send_frame(OP_CONT, b"a" * 2000, fin=False)  # 6010 bytes > 4096
            await expect_close(w, 1009)


async def test_b17_a_message_at_max_size_is_accepted() -> None:
    limits = ConnLimits(max_message_size=4096, ping_interval=None)
    prefix = b'{"frameType": 3, "id": "m", "method": "echo", "data": "'
    body = prefix + b"a" * (4096 - len(prefix) - 2) + b'"}'
    assert len(body) == 4096
    with anyio.fail_after(10):
        async with ws(limits=limits) as w:
            await w.send_frame(OP_TEXT, body)
            assert (await w.read_json())["replyTo"] == "m"


# ---------------------------------------------------------------------------- B18
async def test_b18_65536_fragments_close_1009_at_the_fragment_cap() -> None:
    """4 MiB in 64-byte fragments: closed with 1009 once the 4096-fragment cap passes
    (ConnLimits.max_fragments), not after buffering 4 MiB, and quickly."""
    limits = ConnLimits(max_message_size=8 * 2**20, ping_interval=None)
    chunk = b"a" * 64
    sent = 0
    with anyio.fail_after(20):
        async with ws(limits=limits) as w:
            started = time.monotonic()
            first = frame(OP_TEXT, b'{"data": "' + chunk[10:], fin=False)
            batch = b"".join(frame(OP_CONT, chunk, fin=False) for _ in range(256))
            try:
                await w.send(first)
                sent = 1
                while sent < 65536:
                    await w.send(batch)
                    sent += 256
            except (anyio.BrokenResourceError, ConnectionError, OSError):
                pass
            # 4 MiB is under max_message_size (8 MiB): only the fragment cap can close it.
            assert await w.read_close() == 1009
            assert time.monotonic() - started < 10
    assert sent > 4096


async def test_b18_fragments_under_the_cap_are_reassembled() -> None:
    recorder = Recorder()
    with anyio.fail_after(20):
        async with ws(recorder=recorder) as w:
            await w.send_frame(
                OP_TEXT, b'{"frameType": 3, "id": "f", "method": "echo", "data": "', fin=False
            )
            await w.send(b"".join(frame(OP_CONT, b"b" * 16, fin=False) for _ in range(4000)))
            await w.send_frame(OP_CONT, b'"}')
            reply = await w.read_json()
            assert reply["data"] == "b" * 64000
    assert len(recorder.handled) == 1
