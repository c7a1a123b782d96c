"""Types of the optional C extension ``imkit._speedups`` (see ``imkit.core._framing``
and the codec of ``imkit.core.frames``)."""

from typing import Any

def read_text(
    data: bytes, pos: int, end: int, mask_bit: int, max_size: int, /
) -> tuple[str, int] | None: ...
def frame_texts(texts: list[str], keys: bytes | None, /) -> bytes: ...
def encode_frame(
    frame_type: int,
    id: str,
    ack_seq: int,
    method: str,
    form_id: str,
    transpond_uid: str,
    data: Any,
    reply_to: str,
    /,
) -> str | None: ...
def read_control(
    text: str, ack: Any, ping: Any, /
) -> tuple[Any, str, int, str, str, str, None, str] | None: ...
def read_frame(
    text: str, data_form_id: str | None, types: tuple[Any, ...], form_types: int, /
) -> tuple[Any, str, int, str, str, str, Any, str] | None: ...
def read_fields(
    text: str | bytes,
    data_form_id: str | None,
    types: tuple[Any, ...],
    form_types: int,
    ack: Any,
    ping: Any,
    /,
) -> tuple[Any, str, int, str, str, str, Any, str] | None: ...

class SlotMaker:
    """Makes instances of one class with its slots set (see ``slot_maker``)."""

    def __call__(self, *values: Any) -> Any: ...

def slot_maker(cls: type, slots: tuple[Any, ...], /) -> SlotMaker: ...
def plain_append(
    conversation_id: Any,
    sender_id: Any,
    recv_id: Any,
    msg_id: Any,
    chat_type: Any,
    m_type: Any,
    content: Any,
    send_time: Any,
    /,
) -> bool: ...

class AckMethod:
    """A method of the ack machines, its common case in C (see ``ack_methods``)."""

    def __call__(self, *args: Any) -> Any: ...
    def __get__(self, obj: Any, cls: Any = None) -> Any: ...

def ack_methods(
    machine_cls: type,
    machine_slots: tuple[Any, ...],
    sender_cls: type,
    sender_slots: tuple[Any, ...],
    entry_cls: type,
    entry_slots: tuple[Any, ...],
    memory_cls: type,
    memory_slots: tuple[Any, ...],
    constants: tuple[Any, Any, Any, Any, Any],
    heappush: Any,
    py_methods: tuple[Any, Any, Any, Any],
    /,
) -> tuple[AckMethod, AckMethod, AckMethod, AckMethod]: ...
