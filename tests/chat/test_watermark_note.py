"""The delivered-watermark bookkeeping of :class:`~imkit.chat.service.ChatService`:
the fast path for one seq at a time gives what the general path gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imkit.chat.service import ChatService, _Device

CONVERSATION = "p:alice:bob"

# One step: a seq acked or answered (True: sent by the device's own user); a set of seqs
# the store said the peer sent (what _climb records); or a seq 1-3 above the watermark
# that the device's user just sent, noted as its own before its answer is noted (what
# _answer does).
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("note"), st.integers(0, 12), st.booleans()),
        st.tuples(st.just("peer"), st.frozensets(st.integers(1, 12), max_size=3)),
        st.tuples(st.just("own"), st.integers(1, 3)),
    ),
    max_size=30,
)


def _state(device: _Device) -> tuple[object, ...]:
    """What the device remembers of the conversation (an empty set = none)."""

    def seen(sets: dict[str, set[int]]) -> frozenset[int]:
        return frozenset(sets.get(CONVERSATION, ()))

    return (
        device.level.get(CONVERSATION),
        seen(device.acked),
        seen(device.own),
        seen(device.peer),
        CONVERSATION in device.dirty,
    )


@given(start=st.integers(0, 3), steps=_steps)
def test_one_seq_at_a_time_as_the_general_path(start: int, steps: list[tuple[object, ...]]) -> None:
    fast, general = _Device(), _Device()
    for device in (fast, general):
        device.level[CONVERSATION] = start
    for step in steps:
        if step[0] == "own":
            above = step[1]
            assert isinstance(above, int)
            for device in (fast, general):
                sent = device.level[CONVERSATION] + above
                device.own.setdefault(CONVERSATION, set()).add(sent)
            continue
        if step[0] == "peer":
            for device in (fast, general):
                level = device.level[CONVERSATION]
                above = {seq for seq in step[1] if isinstance(seq, int) and seq > level}
                device.peer.setdefault(CONVERSATION, set()).update(above)
            continue
        _, seq, own = step
        assert isinstance(seq, int) and isinstance(own, bool)
        # A tuple of one pair may take the fast path; a list never does.
        got = ChatService._note(fast, CONVERSATION, fast.level[CONVERSATION], ((seq, own),))
        want = ChatService._note(general, CONVERSATION, general.level[CONVERSATION], [(seq, own)])
        assert got == want
        assert _state(fast) == _state(general)


def test_the_next_seq_moves_the_watermark_and_marks_a_peer_message() -> None:
    device = _Device()
    device.level[CONVERSATION] = 4
    assert ChatService._note(device, CONVERSATION, 4, ((5, True),)) == 5
    assert CONVERSATION not in device.dirty  # the device's own message: nothing to write
    assert ChatService._note(device, CONVERSATION, 5, ((6, False),)) == 6
    assert CONVERSATION in device.dirty  # the peer's message passed: write it in time
    assert ChatService._note(device, CONVERSATION, 6, ((3, False),)) == 6  # old: no change
    assert ChatService._note(device, CONVERSATION, 6, ((8, False),)) == 6  # a hole at 7
    assert device.acked[CONVERSATION] == {8}
    assert ChatService._note(device, CONVERSATION, 6, ((7, True),)) == 8
    assert not device.acked[CONVERSATION] and not device.own[CONVERSATION]
    device.own[CONVERSATION].add(9)  # the device's user sent 9 (_answer notes it)
    assert ChatService._note(device, CONVERSATION, 8, ((9, True),)) == 9
    assert not device.own[CONVERSATION]
