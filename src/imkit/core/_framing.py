"""The WebSocket framing of an open connection's common case: whole text frames in
and out, and the masking (RFC 6455 §5.2-5.3).

Two plain functions, written here in Python and, optionally, in C
(``imkit._speedups``, built with the package when a C compiler is at hand). The module
exports the C ones when that extension imports and the environment variable
``IMKIT_NO_SPEEDUPS`` is not set (to a non-empty value), else the Python ones below;
:data:`SPEEDUPS` says which (:func:`load_speedups` decides, for the codec of
:mod:`imkit.core.frames` too). Both agree byte for byte and on every refusal
(tests/core/test_framing.py compares them on generated frames).

Private to the core: :mod:`imkit.core._wsconn` frames with these.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SPEEDUPS", "frame_texts", "read_text"]

_TEXT = 0x81
_MASK_BIT = 0x80
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")

# int.from_bytes is a classmethod: looking it up on int builds a bound method every time.
_from_bytes = int.from_bytes


def frame_head(first: int, mask_bit: int, n: int) -> bytes:
    """The header of a whole frame of ``n`` payload bytes (``first``: FIN, no RSV bits,
    the opcode; ``mask_bit`` 0 or 0x80), with the shortest length encoding, as wsproto
    writes it; a masked frame's key follows it."""
    if n < 126:
        return bytes((first, mask_bit | n))
    if n < 0x10000:
        return _HEAD16.pack(first, mask_bit | 126, n)
    return _HEAD64.pack(first, mask_bit | 127, n)


def py_xor_mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the 4-byte masking ``key`` repeated (RFC 6455 §5.3), as one big
    integer operation instead of a loop over bytes. Masking and unmasking are the same."""
    n = len(payload)
    keys = (key * ((n + 3) >> 2))[:n]
    return (_from_bytes(payload, "little") ^ _from_bytes(keys, "little")).to_bytes(n, "little")


def py_read_text(
    data: bytes, pos: int, end: int, mask_bit: int, max_size: int
) -> tuple[str, int] | None:
    """The whole text frame at ``data[pos:end]`` as ``(text, stop)``, ``stop`` where it
    ends; ``None`` unless it is a simple one: FIN and the text opcode with no RSV bits,
    the mask bit equal to ``mask_bit`` (0 or 0x80), the shortest length encoding, at most
    ``max_size`` bytes (a negative ``max_size`` refuses every frame), complete before
    ``end``, and valid UTF-8.
    """
    if end - pos < 2 or data[pos] != _TEXT:
        return None
    second = data[pos + 1]
    if second & _MASK_BIT != mask_bit:
        return None
    size = second & 0x7F
    at = pos + 2
    if size >= 126:  # a 16-bit (126) or 64-bit (127) length follows, at its shortest
        at += 2 if size == 126 else 8
        if at > end:
            return None
        shortest = 126 if size == 126 else 0x10000
        # (A 64-bit length with the top bit set, refused by wsproto, is never within
        # max_size.)
        size = _from_bytes(data[pos + 2 : at], "big")
        if size < shortest:
            return None
    if size > max_size:
        return None
    if mask_bit:
        at += 4
        stop = at + size
        if stop > end:
            return None
        payload = py_xor_mask(data[at:stop], data[at - 4 : at])
    else:
        stop = at + size
        if stop > end:
            return None
        payload = data[at:stop]
    try:
        return payload.decode(), stop
    except UnicodeDecodeError:
        return None


def py_frame_texts(texts: list[str], keys: bytes | None) -> bytes:
    """Each text as one whole text frame (FIN, the shortest length encoding), all in one
    ``bytes``. ``keys`` ``None``: unmasked (a server's frames); else 4 bytes per text,
    the masking key of each frame in turn (a client's)."""
    parts: list[bytes] = []
    append = parts.append
    mask_bit = 0 if keys is None else _MASK_BIT
    if keys is not None and len(keys) != 4 * len(texts):
        raise ValueError("keys must hold 4 bytes per text")
    for i, text in enumerate(texts):
        payload = text.encode()
        append(frame_head(_TEXT, mask_bit, len(payload)))
        if keys is None:
            append(payload)
        else:
            key = keys[4 * i : 4 * i + 4]
            append(key)
            append(py_xor_mask(payload, key))
    return b"".join(parts)


def load_speedups(environ: Mapping[str, str]) -> Any:
    """The C extension ``imkit._speedups`` if it imports and ``environ`` does not set
    ``IMKIT_NO_SPEEDUPS`` (to a non-empty value), else ``None``: the one decision for
    every user of the extension (this framing, and the codec of :mod:`imkit.core.frames`:
    ``encode_frame`` and the reading of Acks and Pings)."""
    if environ.get("IMKIT_NO_SPEEDUPS"):
        return None
    try:
        import imkit._speedups as _speedups
    except ImportError:
        return None
    return _speedups


def _choose(environ: Mapping[str, str]) -> tuple[bool, tuple[Callable[..., Any], ...]]:
    """Whether the C functions are used, and the two functions (read_text, frame_texts):
    the C ones if :func:`load_speedups` gives the extension, else the Python ones."""
    speedups = load_speedups(environ)
    if speedups is None:
        return False, (py_read_text, py_frame_texts)
    return True, (speedups.read_text, speedups.frame_texts)


SPEEDUPS: bool
"""Whether the framing runs on the C extension ``imkit._speedups``."""
SPEEDUPS, _chosen = _choose(os.environ)
read_text: Callable[[bytes, int, int, int, int], tuple[str, int] | None] = _chosen[0]
frame_texts: Callable[[list[str], bytes | None], bytes] = _chosen[1]
del _chosen
