"""The argument checks of ``MessageStore.append`` (``imkit.chat.store.check_append``):
the one-call answer for the common case, in C and in Python, against the checks that
say what is wrong."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tests.core.helpers import speedups

from imkit.chat import store
from imkit.chat.store import _py_plain_append, check_append
from imkit.core import _framing


class _Str(str):
    """A str subclass: valid, but not of the common kind."""


class _Int(int):
    """An int subclass: valid, but not of the common kind."""


_ids = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=8),  # NUL, empty included
    st.text(max_size=4),  # non-ASCII, lone surrogates
    st.sampled_from(["a", "r1_s1", "x\x00y", "é", "\ud800", _Str("a"), b"a", None, 1]),
)
_ints = st.one_of(
    st.integers(-(2**65), 2**65),
    st.sampled_from(
        [
            -(2**31) - 1,
            -(2**31),
            2**31 - 1,
            2**31,
            -(2**63) - 1,
            -(2**63),
            2**63 - 1,
            2**63,
            True,
            _Int(2),
            2.0,
            "2",
            None,
        ]
    ),
)
_contents = st.one_of(_ids, st.text(max_size=20))


_NAMES = (
    "conversation_id",
    "sender_id",
    "recv_id",
    "msg_id",
    "chat_type",
    "m_type",
    "content",
    "send_time",
)


def _arguments() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(_ids, _ids, _ids, _ids, _ints, _ints, _contents, _ints)


def _refused(args: tuple[Any, ...]) -> Exception | None:
    """What check_append's full checks raise for ``args`` (``None``: accepted)."""
    try:
        # (The fast answer skipped: a False from it runs exactly these.)
        store.check_text(_NAMES[0], args[0])
        store.check_text(_NAMES[1], args[1])
        store.check_text(_NAMES[2], args[2])
        store.check_text(_NAMES[3], args[3])
        store.check_int(_NAMES[4], args[4], bits=32)
        store.check_int(_NAMES[5], args[5], bits=32)
        if not isinstance(args[6], str):
            raise TypeError("content must be a str")
        store.check_unicode(_NAMES[6], args[6])
        store.check_int(_NAMES[7], args[7])
    except (TypeError, ValueError) as exc:
        return exc
    return None


_COMMON = ("r1_s1", "s1", "r1", "1.2", 2, 0, "hello", 1_700_000_000_000)


@given(_arguments())
@example(_COMMON)
@example(("", "s1", "r1", "m", 2, 0, "", 0))  # an empty id
@example(("c", "s1", "r1", "m", 2, 0, "", 0))  # empty content: allowed
@example(("c", "s1", "r1", "m", 2, 0, "a\x00b", 0))  # NUL in content: allowed
@example(("c", "s\x00", "r1", "m", 2, 0, "", 0))  # NUL in an id
@example(("c", "s1", "r1", "m", 2**31, 0, "", 0))
@example(("c", "s1", "r1", "m", 2, 0, "", 2**63))
@example(("c", "s1", "r1", "m", True, 0, "", 0))
def test_the_common_case_answer_accepts_only_what_the_checks_accept(
    args: tuple[Any, ...],
) -> None:
    """``_py_plain_append`` says yes only to arguments the full checks accept (and to
    those of the common kind: exact ASCII str ids without NUL, exact ints in range);
    the C ``plain_append`` answers as it does."""
    plain = _py_plain_append(*args)
    if plain:
        assert _refused(args) is None
        assert all(type(a) is str and a.isascii() for a in args[:4] + args[6:7])
        assert all(type(a) is int for a in (args[4], args[5], args[7]))
    assert speedups().plain_append(*args) is plain


@given(_arguments())
def test_check_append_raises_what_the_full_checks_raise(args: tuple[Any, ...]) -> None:
    """Whichever answers the common case, check_append accepts what the full checks
    accept and raises the same error for the rest."""
    expected = _refused(args)
    if expected is None:
        check_append(**dict(zip(_NAMES, args, strict=True)))
    else:
        with pytest.raises(type(expected)) as raised:
            check_append(**dict(zip(_NAMES, args, strict=True)))
        assert str(raised.value).split(" ")[0] == str(expected).split(" ")[0]  # the field


def test_the_c_answer_checks_its_arguments() -> None:
    c = speedups()
    with pytest.raises(TypeError, match="8 arguments"):
        c.plain_append(*_COMMON[:7])


def test_the_common_case_answer_follows_the_choice() -> None:
    if _framing.SPEEDUPS:
        assert store.plain_append is speedups().plain_append
    else:
        assert store.plain_append is _py_plain_append
