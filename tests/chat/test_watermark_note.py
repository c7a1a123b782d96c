"""The delivered-watermark bookkeeping of :class:`~imkit.chat.service.ChatService`:
the path for one seq at a time (``_advance_one``) gives what the general path
(``_advance_now`` with a list, through ``_note``'s loops) gives."""

from __future__ import annotations

import anyio
from hypothesis import given
from hypothesis import strategies as st

from imkit.chat.memory import MemoryStore
from imkit.chat.service import ChatService, _Device

CONVERSATION = "p:alice:bob"
KEY = ("alice", "phone")

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


def _service(device: _Device, now: list[float]) -> ChatService:
    """A service whose only connected device is ``device`` (as ``KEY``), on the clock
    ``now[0]``, writing a watermark every 4 messages or 5 s after the last write."""
    service = ChatService(
        MemoryStore(), flush_every=4, watermark_interval=5.0, monotonic=lambda: now[0]
    )
    service._devices[KEY] = device
    return service


@given(
    start=st.integers(0, 3),
    steps=_steps,
    expect=st.integers(0, 14),
    written=st.none() | st.integers(0, 3),
)
def test_one_seq_at_a_time_as_the_general_path(
    start: int, steps: list[tuple[object, ...]], expect: int, written: int | None
) -> None:
    fast, general = _Device(), _Device()
    now = [100.0]
    one, many = _service(fast, now), _service(general, now)
    for device in (fast, general):
        device.level[CONVERSATION] = start
        device.expect[CONVERSATION] = expect
        if written is not None:
            device.written[CONVERSATION] = written
            device.written_at[CONVERSATION] = 97.0
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
        got = one._advance_one(KEY, CONVERSATION, seq, own)
        want = many._advance_now(KEY, CONVERSATION, [(seq, own)])
        # Both answer None (done), () (a write is due) or the seqs to note under the lock.
        assert (got is None, got == ()) == (want is None, want == ())
        if got:
            assert list(got) == list(want or ())
        assert _state(fast) == _state(general)
        now[0] += 1.0


def test_one_seq_goes_the_general_way_while_the_device_is_busy() -> None:
    device = _Device()
    device.level[CONVERSATION] = 4
    service = _service(device, [0.0])
    assert service._advance_one(("bob", "x"), CONVERSATION, 5, False) is None  # not here
    assert service._advance_one(KEY, "p:alice:carol", 1, False) == ((1, False),)  # no level
    assert service._advance_one(KEY, CONVERSATION, 5, True) is None
    assert device.level[CONVERSATION] == 5


def test_the_next_seq_moves_the_watermark_and_marks_a_peer_message() -> None:
    device = _Device()
    device.level[CONVERSATION] = 4
    service = _service(device, [0.0])
    assert service._advance_one(KEY, CONVERSATION, 5, True) is None
    assert device.level[CONVERSATION] == 5
    assert CONVERSATION not in device.dirty  # the device's own message: nothing to write
    assert service._advance_one(KEY, CONVERSATION, 6, False) == ()  # never written: due
    assert device.level[CONVERSATION] == 6
    assert CONVERSATION in device.dirty  # the peer's message passed: write it in time
    device.written[CONVERSATION], device.written_at[CONVERSATION] = 6, 0.0
    assert service._advance_one(KEY, CONVERSATION, 3, False) is None  # old: no change
    assert service._advance_one(KEY, CONVERSATION, 8, False) == ()  # a hole at 7: general
    assert device.acked[CONVERSATION] == {8} and device.level[CONVERSATION] == 6
    assert ChatService._note(device, CONVERSATION, 6, ((7, True),)) == 8
    assert not device.acked[CONVERSATION] and not device.own[CONVERSATION]
    device.own[CONVERSATION].add(9)  # the device's user sent 9 (_answer notes it)
    assert service._advance_one(KEY, CONVERSATION, 9, True) is None
    assert device.level[CONVERSATION] == 9 and not device.own[CONVERSATION]


def test_a_due_write_is_queued_once_until_its_run_starts() -> None:
    """With a write due, the ack that found it hands it to _advance_slow (``()``); the
    acks read before that runs queue nothing more (``None``); once it has run (and
    written), the next due write is queued again. A disconnect's flush clears a queued
    write that never ran."""
    device = _Device()
    device.level[CONVERSATION] = 0
    device.expect[CONVERSATION] = 100  # more was sent: only flush_every (4) makes it due
    service = _service(device, [0.0])

    def acks(seqs: range) -> list[object]:
        return [service._advance_one(KEY, CONVERSATION, seq, False) for seq in seqs]

    async def main() -> None:
        async with service.store:
            assert acks(range(1, 8)) == [None, None, None, (), None, None, None]
            assert CONVERSATION in device.queued
            await service._advance_slow(KEY, CONVERSATION, ())
            assert CONVERSATION not in device.queued
            assert device.written[CONVERSATION] == 7  # (set once the store took it)
            assert acks(range(8, 12)) == [None, None, None, ()]  # 11 - 7 >= 4: queued again
            await service._flush(KEY, device)
            assert not device.queued and device.written[CONVERSATION] == 11

    anyio.run(main)
