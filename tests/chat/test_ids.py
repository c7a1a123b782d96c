"""Private conversation ids: symmetric, injective, invertible, easy-chat compatible."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from imkit.chat.ids import conversation_members, private_conversation_id

# Ids heavy in the characters that matter ("_", "%", digits, hex prefixes), plus anything.
user_ids = st.one_of(
    st.text(alphabet="_%0123456789abxAB5Fo", min_size=1, max_size=8),
    st.text(min_size=1, max_size=12),
    st.text(alphabet="0xX1fF\u212a\u0130\u0663", min_size=1, max_size=6),
    st.integers(min_value=0, max_value=2**70).map(str),
    st.integers(min_value=0, max_value=2**66).map(hex),
)


@given(user_ids, user_ids)
@example("a_b", "c")
@example("a", "b_c")
@example("%5F", "_")
@example("9", "10")
def test_symmetric_and_round_trips(a: str, b: str) -> None:
    conversation = private_conversation_id(a, b)
    assert private_conversation_id(b, a) == conversation
    assert sorted(conversation_members(conversation)) == sorted((a, b))


@given(user_ids, user_ids, user_ids, user_ids)
@example("a_b", "c", "a", "b_c")
@example("a", "b", "_a", "b")
@example("%", "a", "%25", "a")
def test_injective(a: str, b: str, c: str, d: str) -> None:
    same_pair = sorted((a, b)) == sorted((c, d))
    assert (private_conversation_id(a, b) == private_conversation_id(c, d)) == same_pair


@given(user_ids, user_ids)
def test_plain_form_when_no_underscore_or_percent(a: str, b: str) -> None:
    conversation = private_conversation_id(a, b)
    if any(ch in a + b for ch in "_%"):
        assert conversation.startswith("_")
        assert conversation.count("_") == 2
    else:
        assert conversation in (f"{a}_{b}", f"{b}_{a}")
        assert conversation.count("_") == 1
        assert not conversation.startswith("_")


@given(st.text(min_size=0, max_size=20))
def test_members_accepts_only_canonical_ids(text: str) -> None:
    try:
        lo, hi = conversation_members(text)
    except ValueError:
        return
    assert private_conversation_id(lo, hi) == text


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # easy-chat's own ids: "%#016x" of a uint64, ordered by value.
        ("0x0000000100000002", "0x0000000100000001", "0x0000000100000001_0x0000000100000002"),
        # decimal ids order by value, as Go's ParseUint does: 9 < 10
        ("10", "9", "9_10"),
        ("9", "10", "9_10"),
        ("0x1f", "30", "30_0x1f"),
        # not numbers: Go sees 0 for both; imkit breaks the tie by string order
        ("bob", "alice", "alice_bob"),
        # a number beats a non-number only when it is above 0
        ("alice", "5", "alice_5"),
        ("alice", "0", "0_alice"),
        ("same", "same", "same_same"),
        # non-ASCII look-alikes are not digits to Go (it reads bytes)
        ("\u212a", "5", "\u212a_5"),
        ("\u0663", "1", "\u0663_1"),
    ],
)
def test_matches_easy_chat_combine_id(a: str, b: str, expected: str) -> None:
    assert private_conversation_id(a, b) == expected
    assert conversation_members(expected) == tuple(expected.split("_"))


def test_escaped_form() -> None:
    assert private_conversation_id("a_b", "c") == "_a%5Fb_c"
    assert private_conversation_id("c", "a_b") == "_a%5Fb_c"
    assert private_conversation_id("50%", "x") == "_50%25_x"
    assert conversation_members("_a%5Fb_c") == ("a_b", "c")


@pytest.mark.parametrize(
    "bad",
    ["", "_", "a", "a_b_c", "_a_b_c", "a__b", "_a%5fb_c", "_a%zzb_c", "b_a", "a%_b", "_a_b", "__a"],
)
def test_members_rejects_non_canonical(bad: str) -> None:
    with pytest.raises(ValueError):
        conversation_members(bad)


def test_empty_ids_rejected() -> None:
    with pytest.raises(ValueError):
        private_conversation_id("", "a")
    with pytest.raises(ValueError):
        private_conversation_id("a", "")
