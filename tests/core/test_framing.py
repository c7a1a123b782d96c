"""The framing functions of ``imkit.core._framing``: the Python ones against hand-made
frames, the C ones (``imkit._speedups``) against the Python ones on generated input,
byte for byte and refusal for refusal, and the choice between the two.

(How a connection uses them, against wsproto alone, is tests/core/test_lean_framing.py,
which runs on both.)
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imkit.core import _framing
from imkit.core._framing import py_frame_texts, py_read_text, py_xor_mask

from .helpers import naive_mask, speedups

KEY = b"\x01\x80\xfe\x7f"


def head(first: int, n: int, *, masked: bool, encoding: str = "") -> bytes:
    """A frame header announcing ``n`` bytes (``encoding`` "16"/"64" forces a longer
    length encoding than needed)."""
    bit = 0x80 if masked else 0
    if encoding == "64" or (not encoding and n >= 2**16):
        return bytes([first, bit | 127]) + struct.pack("!Q", n)
    if encoding == "16" or (not encoding and n >= 126):
        return bytes([first, bit | 126]) + struct.pack("!H", n)
    return bytes([first, bit | n])


def text_frame(text: str, key: bytes | None = None) -> bytes:
    payload = text.encode()
    if key is None:
        return head(0x81, len(payload), masked=False) + payload
    return head(0x81, len(payload), masked=True) + key + naive_mask(payload, key)


# ---------------------------------------------------------------- the Python functions
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70001])
@pytest.mark.parametrize("key", [None, KEY])
def test_a_whole_text_frame_is_read_back(size: int, key: bytes | None) -> None:
    text = ("é" * size)[: size // 2] + "x" * (size - 2 * (size // 2))
    wire = b"junk" + text_frame(text, key) + b"next"
    assert py_read_text(wire, 4, len(wire), 0x80 if key else 0, 2**20) == (text, len(wire) - 4)


REFUSED: dict[str, tuple[bytes, int, int]] = {
    # name: (frame, mask_bit, max_size); each would be read but for the one fault.
    "one byte": (b"\x81", 0, 100),
    "not FIN": (head(0x01, 2, masked=False) + b"hi", 0, 100),
    "binary": (head(0x82, 2, masked=False) + b"hi", 0, 100),
    "RSV1": (head(0xC1, 2, masked=False) + b"hi", 0, 100),
    "ping": (head(0x89, 2, masked=False) + b"hi", 0, 100),
    "unmasked to a server": (text_frame("hi"), 0x80, 100),
    "masked to a client": (text_frame("hi", KEY), 0, 100),
    "16-bit length for a short text": (
        head(0x81, 5, masked=False, encoding="16") + b"hello",
        0,
        100,
    ),
    "16-bit length for 125 bytes": (
        head(0x81, 125, masked=True, encoding="16") + KEY + naive_mask(b"x" * 125, KEY),
        0x80,
        1000,
    ),
    "64-bit length for a short text": (
        head(0x81, 300, masked=False, encoding="64") + b"x" * 300,
        0,
        1000,
    ),
    "64-bit length for 65535 bytes": (
        head(0x81, 65535, masked=False, encoding="64") + b"x" * 65535,
        0,
        2**20,
    ),
    "16-bit length cut": (b"\x81\x7e\x01", 0, 1000),
    "64-bit length cut": (b"\x81\x7f\x00\x00\x00", 0, 2**20),
    "64-bit length, top bit set": (head(0x81, 2**63 + 5, masked=False), 0, 2**64),
    "over max_size": (text_frame("x" * 101), 0, 100),
    "max_size negative": (text_frame(""), 0, -1),
    "payload cut": (text_frame("hello")[:-1], 0, 100),
    "mask key cut": (text_frame("hello", KEY)[:4], 0x80, 100),
    "bad UTF-8": (head(0x81, 3, masked=False) + b"ok\xff", 0, 100),
    "surrogate": (head(0x81, 3, masked=False) + b"\xed\xa0\x80", 0, 100),
    "masked bad UTF-8": (head(0x81, 3, masked=True) + KEY + naive_mask(b"ok\xff", KEY), 0x80, 100),
}


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("impl", ["python", "c"])
def test_anything_but_a_simple_frame_is_refused(name: str, impl: str) -> None:
    read_text = py_read_text if impl == "python" else speedups().read_text
    wire, mask_bit, max_size = REFUSED[name]
    assert read_text(wire, 0, len(wire), mask_bit, max_size) is None


def test_a_frame_past_end_is_refused() -> None:
    wire = text_frame("hello") + text_frame("world")
    assert py_read_text(wire, 0, 6, 0, 100) is None
    assert py_read_text(wire, 0, 7, 0, 100) == ("hello", 7)
    assert py_read_text(wire, 7, len(wire), 0, 100) == ("world", 14)


@pytest.mark.parametrize("key", [None, KEY])
def test_texts_are_framed_one_after_another(key: bytes | None) -> None:
    texts = ["", "a", "é" * 70, "x" * 65536]
    keys = None if key is None else key * len(texts)
    assert py_frame_texts(texts, keys) == b"".join(text_frame(t, key) for t in texts)
    assert py_frame_texts([], keys and b"") == b""


def test_framing_needs_four_key_bytes_per_text() -> None:
    with pytest.raises(ValueError, match="4 bytes per text"):
        py_frame_texts(["a", "b"], b"1234")


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_masking_is_a_byte_wise_xor(payload: bytes, key: bytes) -> None:
    assert py_xor_mask(payload, key) == naive_mask(payload, key)


# ----------------------------------------------------------- the C ones, the same
SIZES = st.one_of(st.integers(0, 300), st.sampled_from([125, 126, 127, 65535, 65536, 65537]))


@st.composite
def wires(draw: Any) -> tuple[bytes, int, int, int, int]:
    """A run of frames (some masked, some not), perhaps mangled at one byte, and a
    window into it with the mask bit and limit to read with."""
    texts = draw(
        st.lists(
            st.one_of(
                st.text(max_size=40),
                SIZES.map(lambda n: "x" * n),
                st.binary(max_size=8).map(lambda b: b.decode("latin-1")),
            ),
            max_size=3,
        )
    )
    masked = draw(st.booleans())
    keys = draw(st.binary(min_size=4 * len(texts), max_size=4 * len(texts))) if masked else None
    wire = bytearray(py_frame_texts(texts, keys))
    if draw(st.booleans()):  # and a frame with a longer length encoding than needed
        n = draw(SIZES)
        encoding = draw(st.sampled_from(["16", "64"]))
        wire += head(0x81, n, masked=masked, encoding=encoding)
        if masked:
            key = draw(st.binary(min_size=4, max_size=4))
            wire += key + naive_mask(b"y" * n, key)
        else:
            wire += b"y" * n
    if wire and draw(st.booleans()):
        wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    wire += draw(st.binary(max_size=4))
    end = draw(st.integers(0, len(wire)))
    pos = draw(st.integers(0, end))
    mask_bit = draw(st.sampled_from([0, 0x80]))
    max_size = draw(st.one_of(SIZES, st.sampled_from([-1, 2**20, 2**63, 2**64])))
    return bytes(wire), pos, end, mask_bit, max_size


@given(wires())
def test_c_reads_what_python_reads(case: tuple[bytes, int, int, int, int]) -> None:
    c = speedups()
    wire, pos, end, mask_bit, max_size = case
    assert c.read_text(wire, pos, end, mask_bit, max_size) == py_read_text(*case)
    # Any readable buffer will do (what a transport hands over).
    assert c.read_text(bytearray(wire), pos, end, mask_bit, max_size) == py_read_text(*case)


@given(
    st.lists(st.one_of(st.text(max_size=200), SIZES.map(lambda n: "é" * n)), max_size=4),
    st.booleans(),
    st.data(),
)
def test_c_frames_what_python_frames(texts: list[str], masked: bool, data: Any) -> None:
    c = speedups()
    n = 4 * len(texts)
    keys = data.draw(st.binary(min_size=n, max_size=n)) if masked else None
    wire = c.frame_texts(texts, keys)
    assert wire == py_frame_texts(texts, keys)
    pos, mask_bit = 0, 0x80 if masked else 0
    for text in texts:
        read = c.read_text(wire, pos, len(wire), mask_bit, 2**20)
        assert read is not None and read[0] == text
        pos = read[1]
    assert pos == len(wire)


def test_c_unmasks_a_long_frame_off_the_stack() -> None:
    c = speedups()
    text = "é" * 3000  # 6,000 bytes: past the C side's stack buffer
    wire = text_frame(text, KEY)
    assert c.read_text(wire, 0, len(wire), 0x80, 2**20) == (text, len(wire))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.read_text(b"\x81\x00", 1, 0, 0, 10), ValueError, "pos <= end"),
        (lambda c: c.read_text(b"\x81\x00", -1, 2, 0, 10), ValueError, "pos <= end"),
        (lambda c: c.read_text(b"\x81\x00", 0, 3, 0, 10), ValueError, "len\\(data\\)"),
        (lambda c: c.read_text(b"\x81\x00", 0, 2, 0), TypeError, "takes 5 positional"),
        (lambda c: c.read_text("text", 0, 2, 0, 10), TypeError, "bytes-like"),
        (lambda c: c.read_text(b"", 0.5, 0, 0, 10), TypeError, "integer"),
        (lambda c: c.read_text(b"", 0, 0, 0, "10"), TypeError, "integer"),
        (lambda c: c.frame_texts(["a"]), TypeError, "takes 2 positional"),
        (lambda c: c.frame_texts(["a"], "1234"), TypeError, "bytes-like"),
        (lambda c: c.frame_texts(("a",), None), TypeError, "list of str"),
        (lambda c: c.frame_texts([b"a"], None), TypeError, "list of str"),
        (lambda c: c.frame_texts(["a"], b"12345"), ValueError, "4 bytes per text"),
        (lambda c: c.frame_texts(["\ud800"], None), UnicodeEncodeError, "surrogate"),
    ],
)
def test_c_refuses_bad_arguments_with_a_clear_error(call: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(speedups())


def test_c_read_text_takes_any_limit() -> None:
    c = speedups()
    wire = text_frame("hi")
    assert c.read_text(wire, 0, len(wire), 0, 2**200) == ("hi", len(wire))
    assert c.read_text(wire, 0, len(wire), 0, -(2**200)) is None
    assert c.read_text(wire, 0, len(wire), 0, 1) is None


# ------------------------------------------------------------------- the choice
def test_the_c_functions_are_chosen_when_built() -> None:
    c = speedups()
    chosen, functions = _framing._choose({})
    assert chosen is True
    assert functions == (c.read_text, c.frame_texts)


def test_imkit_no_speedups_chooses_the_python_functions() -> None:
    chosen, functions = _framing._choose({"IMKIT_NO_SPEEDUPS": "1"})
    assert chosen is False
    assert functions == (py_read_text, py_frame_texts)
    # An empty value is no setting.
    assert _framing._choose({"IMKIT_NO_SPEEDUPS": ""}) == _framing._choose({})


def test_without_the_extension_the_python_functions_are_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "imkit._speedups", None)  # import raises ImportError
    assert _framing._choose({}) == (False, (py_read_text, py_frame_texts))


def test_the_module_exports_the_chosen_functions() -> None:
    chosen, functions = _framing._choose(os.environ)
    assert _framing.SPEEDUPS is chosen
    assert (_framing.read_text, _framing.frame_texts) == functions
