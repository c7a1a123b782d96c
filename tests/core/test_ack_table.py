"""The ack transition table, checked whole: every (role, mode, state, input) combination.

Each combination is either a row of ``TRANSITIONS`` or one of the absent kinds listed
explicitly below; an absent one raises ``LocalProtocolError`` when looked up. Then the
rules users rely on are checked over every row, and over random input sequences.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imkit.core.ack import (
    TRANSITIONS,
    AckMode,
    AckTimers,
    Action,
    Delivered,
    Dispatch,
    GaveUp,
    Input,
    Receiver,
    Role,
    Sender,
    SendFrame,
    State,
    iter_table,
    transition,
)
from imkit.core.frames import Frame, FrameType
from imkit.exceptions import LocalProtocolError

S, R = Role.SENDER, Role.RECEIVER
ALL = set(itertools.product(Role, AckMode, State, Input))

# Inputs each end can be given at all: the peer routes Data and Ack{2} to the receiver,
# Ack{1} and a final Err (REFUSED) to the sender; SEND is the application's call on the
# sender.
INPUTS_OF = {
    S: {Input.SEND, Input.ACK, Input.RESEND_DUE, Input.TIMEOUT, Input.REFUSED},
    R: {Input.DATA, Input.CONFIRM, Input.RESEND_DUE, Input.TIMEOUT},
}
# States each machine can hold, per mode. A NoAck sender remembers nothing; only a
# RigorAck receiver waits for a confirmation; a sender never does, a receiver never
# waits for an ack.
STATES_OF = {
    (S, AckMode.NONE): {State.NEW},
    (S, AckMode.ONLY): {State.NEW, State.AWAIT_ACK, State.DONE},
    (S, AckMode.RIGOR): {State.NEW, State.AWAIT_ACK, State.DONE},
    (R, AckMode.NONE): {State.NEW, State.DONE},
    (R, AckMode.ONLY): {State.NEW, State.DONE},
    (R, AckMode.RIGOR): {State.NEW, State.AWAIT_CONFIRM, State.DONE},
}
WAITING = {State.AWAIT_ACK, State.AWAIT_CONFIRM}
TIMERS = {Input.RESEND_DUE, Input.TIMEOUT}
PEER_INPUTS = {Input.DATA, Input.ACK, Input.CONFIRM}


def absent_kind(role: Role, mode: AckMode, state: State, event: Input) -> str | None:
    """Why a combination is (rightly) missing from the table, or ``None`` if it must exist."""
    if event not in INPUTS_OF[role]:
        return "input for the other end"
    if state not in STATES_OF[role, mode]:
        return "state this machine never holds"
    if event in TIMERS and state not in WAITING:
        return "no deadline runs in this state"
    if event is Input.SEND and state is not State.NEW:
        return "local misuse: the id is still in use"
    return None


def test_every_combination_is_a_row_or_an_explained_absence() -> None:
    assert set(TRANSITIONS) <= ALL
    for key in sorted(ALL, key=str):
        kind = absent_kind(*key)
        if kind is None:
            assert key in TRANSITIONS, f"{key} must be in the table"
        else:
            assert key not in TRANSITIONS, f"{key} is in the table but {kind}"


@pytest.mark.parametrize("key", sorted(ALL - set(TRANSITIONS), key=str))
def test_absent_combinations_raise_local_protocol_error(
    key: tuple[Role, AckMode, State, Input],
) -> None:
    with pytest.raises(LocalProtocolError, match="not allowed"):
        transition(*key)


def test_local_misuse_is_the_only_absent_input_in_a_reachable_state() -> None:
    # Peer input in a reachable state is never missing: a stale or duplicate frame is
    # ignored by an explicit row, never a crash. Only the application's SEND can be wrong.
    for role, mode, state, event in ALL - set(TRANSITIONS):
        if state in STATES_OF[role, mode] and event in INPUTS_OF[role] - TIMERS:
            assert event is Input.SEND and role is S
    for (role, mode), states in STATES_OF.items():
        for state in states:
            for event in INPUTS_OF[role] & PEER_INPUTS:
                assert (role, mode, state, event) in TRANSITIONS


def test_rows_land_in_states_the_machine_can_hold() -> None:
    for (role, mode, state, _event), (_actions, new_state) in TRANSITIONS.items():
        assert state in STATES_OF[role, mode]
        assert new_state in STATES_OF[role, mode]


def test_acks_never_exceed_receipts() -> None:
    # A receiver sends an ack only for data in hand: on a Data frame, or while it holds
    # the id (waiting for a confirmation, or done). Never for an id it does not know.
    for (role, _mode, state, event), (actions, _new) in TRANSITIONS.items():
        if Action.SEND_ACK in actions:
            assert role is R
            assert event is Input.DATA or state in (State.AWAIT_CONFIRM, State.DONE)
            assert state is not State.NEW or event is Input.DATA


def test_sender_confirms_only_what_was_acked_and_not_given_up() -> None:
    for (role, mode, state, event), (actions, _new) in TRANSITIONS.items():
        if Action.SEND_CONFIRM in actions:
            assert role is S and mode is AckMode.RIGOR and event is Input.ACK
            # NEW means given up or forgotten: confirming then would contradict the
            # DeliveryFailed already reported.
            assert state in (State.AWAIT_ACK, State.DONE)


def test_dispatch_happens_once_and_only_at_the_receiver() -> None:
    for (role, mode, state, event), (actions, new_state) in TRANSITIONS.items():
        if Action.DISPATCH in actions:
            assert role is R and state is not State.DONE and new_state is State.DONE
            if mode is AckMode.RIGOR:
                assert event is Input.CONFIRM  # RigorAck waits for the confirmation
            else:
                assert event is Input.DATA
        if state is State.DONE:
            assert Action.DISPATCH not in actions


def test_give_ups_are_visible_and_forget_the_id() -> None:
    for (role, _mode, state, event), (actions, new_state) in TRANSITIONS.items():
        if event is Input.TIMEOUT:
            assert actions == (Action.GIVE_UP,) and new_state is State.NEW
            assert state in WAITING
        if Action.GIVE_UP in actions:
            assert event is Input.TIMEOUT
        if Action.DELIVERED in actions:
            assert role is S and state is State.AWAIT_ACK and event is Input.ACK


def test_a_refusal_stops_only_a_waiting_message_visibly() -> None:
    """A final Err ends a message still waiting for its ack (a visible REFUSE, the id
    forgotten, so no more resends); after the ack, or for an unknown id, it changes
    nothing."""
    for (role, _mode, state, event), (actions, new_state) in TRANSITIONS.items():
        if event is Input.REFUSED:
            assert role is S
            if state is State.AWAIT_ACK:
                assert (actions, new_state) == ((Action.REFUSE,), State.NEW)
            else:
                assert (actions, new_state) == ((), state)
        if Action.REFUSE in actions:
            assert event is Input.REFUSED


def test_modes_differ_as_documented() -> None:
    # NoAck sends once and never acks; OnlyAck acks then dispatches; RigorAck confirms.
    for (_role, mode, _state, _event), (actions, _new) in TRANSITIONS.items():
        if mode is AckMode.NONE:
            assert not set(actions) & {Action.SEND_ACK, Action.SEND_CONFIRM}
        if mode is AckMode.ONLY:
            assert Action.SEND_CONFIRM not in actions
    assert TRANSITIONS[R, AckMode.ONLY, State.NEW, Input.DATA] == (
        (Action.SEND_ACK, Action.DISPATCH),
        State.DONE,
    )
    assert TRANSITIONS[R, AckMode.RIGOR, State.NEW, Input.DATA] == (
        (Action.SEND_ACK,),
        State.AWAIT_CONFIRM,
    )


def test_iter_table_yields_every_row_once() -> None:
    rows = list(iter_table())
    assert len(rows) == len(TRANSITIONS)
    for role, mode, state, event, actions, new_state in rows:
        assert TRANSITIONS[role, mode, state, event] == (actions, new_state)


# ---------------------------------------------------------------------- random sequences
TIMING = AckTimers(resend_interval=1.0, ack_timeout=4.0, remember_for=10.0, window=2)
IDS = ["a", "b", "c"]

receiver_ops = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.sampled_from(IDS), st.booleans()),
        st.tuples(st.just("confirm"), st.sampled_from(IDS), st.booleans()),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 3.0, 11.0]), st.booleans()),
    ),
    max_size=40,
)


@given(mode=st.sampled_from(AckMode), ops=receiver_ops)
def test_receiver_acks_only_received_ids_and_dispatches_once(
    mode: AckMode, ops: list[tuple[str, object, bool]]
) -> None:
    receiver = Receiver(mode, TIMING)
    now = 0.0
    received: set[str] = set()
    dispatched: list[str] = []
    for op, arg, acked in ops:
        if op == "data":
            assert isinstance(arg, str)
            received.add(arg)
            effects = receiver.on_data(Frame(FrameType.DATA, id=arg), now, acked=acked)
        elif op == "confirm":
            assert isinstance(arg, str)
            effects = receiver.on_confirm(arg, now)
        else:
            assert isinstance(arg, float)
            now += arg
            deadline = receiver.next_deadline()
            assert deadline is None or deadline > now - arg
            effects = receiver.handle_timeout(now)
        for effect in effects:
            if isinstance(effect, SendFrame):
                assert effect.frame.frame_type is FrameType.ACK
                assert effect.frame.id in received, "acked an id never received"
                assert mode is not AckMode.NONE
            elif isinstance(effect, Dispatch):
                dispatched.append(effect.frame.id)
            else:
                assert isinstance(effect, GaveUp) and effect.role is R
                assert mode is AckMode.RIGOR
    # Every id is remembered longer than this run can resend it: no id twice.
    if now < TIMING.remember_for:
        assert len(dispatched) == len(set(dispatched))


sender_ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from(IDS)),
        st.tuples(st.just("ack"), st.sampled_from(IDS)),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 3.0, 11.0])),
    ),
    max_size=40,
)


@given(mode=st.sampled_from(AckMode), ops=sender_ops)
def test_sender_confirms_and_delivers_only_acked_ids(
    mode: AckMode, ops: list[tuple[str, object]]
) -> None:
    sender = Sender(mode, TIMING)
    now = 0.0
    sent: set[str] = set()
    acked: set[str] = set()
    outcome: dict[str, str] = {}
    confirmed: set[str] = set()
    for op, arg in ops:
        if op == "send":
            assert isinstance(arg, str)
            try:
                effects = sender.send(Frame(FrameType.DATA, id=arg), now)
            except LocalProtocolError:
                # Only an id still in flight, queued or remembered is refused.
                assert mode is not AckMode.NONE and arg in sent
                assert sender.state_of(arg) is not State.NEW or sender.backlog
                continue
            sent.add(arg)
            # A given-up or long-forgotten id may be sent again (the application's retry).
            outcome.pop(arg, None)
            confirmed.discard(arg)
        elif op == "ack":
            assert isinstance(arg, str)
            acked.add(arg)
            effects = sender.on_ack(arg, now)
        else:
            assert isinstance(arg, float)
            now += arg
            effects = sender.handle_timeout(now)
        for effect in effects:
            frame = effect.frame
            if isinstance(effect, SendFrame) and frame.frame_type is FrameType.ACK:
                assert mode is AckMode.RIGOR and frame.ack_seq == 2
                assert frame.id in acked and outcome.get(frame.id) != "failed"
                confirmed.add(frame.id)
            elif isinstance(effect, SendFrame):
                assert frame.id in sent
            elif isinstance(effect, Delivered):
                assert frame.id in acked and frame.id not in outcome
                outcome[frame.id] = "delivered"
            else:
                assert isinstance(effect, GaveUp) and effect.role is S
                assert frame.id not in outcome
                outcome[frame.id] = "failed"
    # A confirmation goes out only with (or after) the Delivered of the same id.
    assert all(outcome.get(message_id) == "delivered" for message_id in confirmed)
    if mode is AckMode.NONE:
        assert not outcome
