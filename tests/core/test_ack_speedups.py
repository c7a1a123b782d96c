"""The ack machines' methods in C (``imkit._speedups.ack_methods``) against the Python ones.

``_Machine._apply``, ``Receiver._data``, ``_Machine._on_id`` and ``Sender._send`` are C
methods when the extension is built: each carries out its common case itself and hands
every other case to the Python method it replaces (``_py_apply``, ...) before changing
anything. These tests drive a pair of machines of each kind with the same inputs and
require the same results and the same insides (live entries, heap, tokens, remembered ids
and their expiries, backlog), with bounds small enough that the uncommon cases (a full
memory, an id remembered again, a heap due for compaction, pruning, a full window, a
backlog, a step missing from the table) come up all the time.
"""

from __future__ import annotations

import gc
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.core.helpers import speedups
from tests.core.test_core_differential import (
    ack_timers,
    machine_calls,
    machine_op_lists,
    machine_view,
    outcome,
)

from imkit.core import ack
from imkit.core.ack import AckMode, AckTimers, Input, Receiver, Sender, State
from imkit.core.frames import Frame, FrameType
from imkit.exceptions import LocalProtocolError

METHODS = ("_apply", "_data", "_on_id", "_send")
PY_METHODS = (
    ack._Machine._py_apply,
    ack.Receiver._py_data,
    ack._Machine._py_on_id,
    ack.Sender._py_send,
)


def c_methods() -> tuple[Any, ...]:
    """The C methods, made as imkit.core.ack makes them (fail the test without the build)."""
    made = ack._c_methods(speedups())
    assert made is not None
    return made


def machines(
    methods: tuple[Any, ...], mode: AckMode, timers: AckTimers, partner: bool
) -> tuple[Any, Any]:
    """A Sender and a Receiver with ``methods`` (as :data:`METHODS`), the heap compacted
    early."""
    mine = dict(zip(METHODS, methods, strict=True))
    TestSender = type("TestSender", (Sender,), mine)
    TestReceiver = type("TestReceiver", (Receiver,), mine)

    receiver = TestReceiver(mode, timers)
    sender = TestSender(mode, timers, partner=receiver if partner else None)
    for machine in (sender, receiver):
        machine._compact_at = 2  # (the heap is compacted at its 2nd item, not its 64th)
    return sender, receiver


def insides(machine: Any) -> tuple[Any, ...]:
    """What a machine holds: its entries, heap, tokens, memory (ids, expiries, head)."""
    entries = [
        (message_id, entry.frame, entry.state, entry.give_up_at, entry.token)
        for message_id, entry in machine._live.items()
    ]
    memory = machine._memory
    backlog = getattr(machine, "_backlog", None)
    return (
        list(backlog or ()),
        entries,
        sorted(machine._heap),
        machine._tokens,
        machine._compact_at,
        list(memory.items()),
        memory.head,
    )


IDS = [f"m{i}" for i in range(6)] + [""]
timers = ack_timers(4)
ids = st.sampled_from(IDS)
# Time goes on, stands still, jumps past every deadline, even goes back; ints as well.
steps = st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.5, 6.0, -0.5, 1, 0])
ops = machine_op_lists(
    ids,
    steps,
    max_size=60,
    extra=(st.tuples(st.just("retry"), ids, st.sampled_from([0.0, 0.4, 2.0]), st.none() | steps),),
)


def calls(sender: Any, receiver: Any, op: tuple[Any, ...], now: float) -> list[Any]:
    """:func:`machine_calls`, and a rate limit's wait (``retry``: the sender paces)."""
    if op[0] == "retry":
        _kind, message_id, delay, every = op
        return [outcome(sender.retry_after, message_id, delay, now, every=every)]
    return machine_calls(sender, receiver, op, now)


@given(
    mode=st.sampled_from(AckMode),
    timers=timers,
    partner=st.booleans(),
    start=st.sampled_from([0, 0.0]),  # (an int clock: the Python methods' case)
    ops=ops,
)
def test_the_c_methods_do_what_the_python_ones_do(
    mode: AckMode, timers: AckTimers, partner: bool, start: float, ops: list[tuple[Any, ...]]
) -> None:
    c_sender, c_receiver = machines(c_methods(), mode, timers, partner)
    py_sender, py_receiver = machines(PY_METHODS, mode, timers, partner)
    now = start
    for op in ops:
        if op[0] == "tick":
            now += op[1]
        got = calls(c_sender, c_receiver, op, now)
        assert got == calls(py_sender, py_receiver, op, now), op
        for c_machine, py_machine in ((c_sender, py_sender), (c_receiver, py_receiver)):
            assert machine_view(c_machine) == machine_view(py_machine), op
            assert insides(c_machine) == insides(py_machine), op


def test_the_c_methods_are_the_machines_own_when_built() -> None:
    owners = (ack._Machine, ack.Receiver, ack._Machine, ack.Sender)
    installed = [owner.__dict__[name] for owner, name in zip(owners, METHODS, strict=True)]
    if ack._speedups is None:  # IMKIT_NO_SPEEDUPS: the Python methods themselves
        assert installed == list(PY_METHODS)
    else:
        assert all(isinstance(m, speedups().AckMethod) for m in installed)
        apply = installed[0]
        # A method: bound to a machine, called on the class with the machine first.
        sender = Sender(AckMode.ONLY)
        frame = Frame(FrameType.DATA, "a")
        assert sender._apply(frame, State.NEW, Input.SEND, 0.0) == (ack.Action.SEND_DATA,)
        assert apply.__get__(None, Sender) is apply
        entry = sender._live["a"]
        assert ack._Machine._apply(sender, frame, State.AWAIT_ACK, Input.ACK, 0.5, entry) == (
            ack.Action.DELIVERED,
        )
        assert sender.state_of("a") is State.DONE


def test_without_the_extension_there_are_no_c_methods() -> None:
    assert ack._c_methods(None) is None


def test_a_step_missing_from_the_table_raises_through_the_c_transition() -> None:
    sender, _receiver = machines(c_methods(), AckMode.ONLY, AckTimers(), False)
    sender.send(Frame(FrameType.DATA, "a"), 0.0)
    entry = sender._live["a"]
    with pytest.raises(LocalProtocolError, match="'send' is not allowed for a sender"):
        sender._apply(entry.frame, entry.state, Input.SEND, 0.0, entry)
    assert insides(sender)[1] == [("a", entry.frame, State.AWAIT_ACK, 30.0, 1)]


def test_the_memory_at_its_bound_forgets_its_oldest_id_in_c() -> None:
    timers = AckTimers(max_remembered=3)
    _sender, receiver = machines(c_methods(), AckMode.ONLY, timers, False)
    for i in range(5):
        receiver.on_data(Frame(FrameType.DATA, f"m{i}"), float(i))
    assert list(receiver._memory.items()) == [("m2", 302.0), ("m3", 303.0), ("m4", 304.0)]
    assert receiver._memory.head == 302.0
    # A forgotten id is news again; a remembered one is acked, not dispatched.
    assert [type(e).__name__ for e in receiver.on_data(Frame(FrameType.DATA, "m0"), 5.0)] == [
        "SendFrame",
        "Dispatch",
    ]
    assert [type(e).__name__ for e in receiver.on_data(Frame(FrameType.DATA, "m4"), 5.0)] == [
        "SendFrame"
    ]


def test_odd_arguments_and_slots_go_to_the_python_method() -> None:
    methods = c_methods()
    sender, _receiver = machines(methods, AckMode.ONLY, AckTimers(), False)
    # now as an int, an entry of another class, a keyword: all the Python method's.
    assert sender._apply(Frame(FrameType.DATA, "a"), State.NEW, Input.SEND, 0) == (
        ack.Action.SEND_DATA,
    )
    assert sender._heap == [(2, 1, "a")]  # (the int arithmetic of the Python method)
    with pytest.raises(AttributeError):
        sender._apply(Frame(FrameType.DATA, "a"), State.AWAIT_ACK, Input.ACK, 0.0, object())
    assert sender._apply(Frame(FrameType.DATA, "b"), State.NEW, Input.SEND, 0.0, entry=None) == (
        ack.Action.SEND_DATA,
    )
    # A slot holding something else than the Python code puts there: Python's too.
    sender._tokens = 2**70
    sender._apply(Frame(FrameType.DATA, "c"), State.NEW, Input.SEND, 1.0)
    assert sender._tokens == 2**70 + 1
    # A frame whose id is not a str.
    odd = Frame(FrameType.DATA, 5)  # type: ignore[arg-type]
    sender._apply(odd, State.NEW, Input.SEND, 1.0)
    assert 5 in sender._live
    # An expiry no later than now (a huge now): remembered, then pruned at once.
    _s, receiver = machines(methods, AckMode.ONLY, AckTimers(), False)
    receiver.on_data(Frame(FrameType.DATA, "x"), 1e300)
    assert receiver.remembered == 0 and receiver._memory.head == math.inf


def test_ack_methods_refuses_what_it_cannot_use() -> None:
    make = speedups().ack_methods
    machine_slots = ack._slots(
        ack._Machine,
        "_steps _live _memory _heap _tokens _compact_at _resend_interval _ack_timeout _window mode",
    )
    sender_slots = ack._slots(ack.Sender, "_backlog _backlog_ids _retry_slot")
    entry_slots = ack._slots(ack._Entry, "frame state give_up_at token")
    memory_slots = ack._slots(ack._Memory, "_max _remember_for head")
    constants = (State.NEW, State.DONE, Input.SEND, Input.DATA, AckMode.NONE)
    good = [
        ack._Machine,
        machine_slots,
        ack.Sender,
        sender_slots,
        ack._Entry,
        entry_slots,
        ack._Memory,
        memory_slots,
        constants,
        ack.heapq.heappush,
        PY_METHODS,
    ]
    assert len(make(*good)) == 4
    bad: list[tuple[int, Any, str]] = [
        (1, machine_slots[:3], "10 slots of a class expected"),
        (3, machine_slots[:3], "each slot must be one of the class's own"),
        (1, (*machine_slots[:9], "x"), "each slot must be one of the class's own"),
        (6, dict, "each slot must be one of the class's own"),  # (the slots are _Memory's)
        (8, constants[:4], "5 constants, heappush, 4 methods"),
        (9, None, "5 constants, heappush, 4 methods"),
        (10, PY_METHODS[:3], "5 constants, heappush, 4 methods"),
        (10, (*PY_METHODS[:3], None), "5 constants, heappush, 4 methods"),
    ]
    for index, value, message in bad:
        args = list(good)
        args[index] = value
        with pytest.raises(TypeError, match=message):
            make(*args)
    with pytest.raises(TypeError, match="takes 11 positional arguments"):
        make(*good[:10])

    class NotADict:
        __slots__ = ("_max", "_remember_for", "head")

    args = list(good)
    args[6:8] = [NotADict, ack._slots(NotADict, "_max _remember_for head")]
    with pytest.raises(TypeError, match="a sender machine, a plain entry class, a dict memory"):
        make(*args)

    class Lone:  # not a machine
        __slots__ = ("_backlog", "_backlog_ids", "_retry_slot")

    args = list(good)
    args[2:4] = [Lone, ack._slots(Lone, "_backlog _backlog_ids _retry_slot")]
    with pytest.raises(TypeError, match="a sender machine"):
        make(*args)


def test_no_entry_or_frame_outlives_its_id() -> None:
    sender, receiver = machines(c_methods(), AckMode.ONLY, AckTimers(max_remembered=50), False)
    for i in range(2000):
        now = i * 0.01
        sender.send(Frame(FrameType.DATA, f"s{i}"), now)
        sender.on_ack(f"s{i}", now)
        receiver.on_data(Frame(FrameType.DATA, f"r{i}"), now)
    gc.collect()
    assert sender.in_flight == 0 and receiver.in_flight == 0
    assert not any(type(o) is ack._Entry for o in gc.get_objects())
    frames_alive = sum(type(o) is Frame for o in gc.get_objects())
    for i in range(2000, 4000):
        now = i * 0.01
        sender.send(Frame(FrameType.DATA, f"s{i}"), now)
        sender.on_ack(f"s{i}", now)
    gc.collect()
    assert sum(type(o) is Frame for o in gc.get_objects()) <= frames_alive


def test_a_machines_timers_are_fixed_when_it_is_made() -> None:
    # The methods read the resend interval, ack timeout and window from the machine's
    # slots, set from its timers once: the timers cannot be swapped under them.
    timers = AckTimers(resend_interval=1.0, ack_timeout=4.0, window=2)
    for machine in (Sender(AckMode.ONLY, timers), Receiver(AckMode.RIGOR, timers)):
        assert machine.timers is timers
        assert (machine._resend_interval, machine._ack_timeout, machine._window) == (1.0, 4.0, 2)
        with pytest.raises(AttributeError):
            machine.timers = AckTimers()  # type: ignore[misc]
