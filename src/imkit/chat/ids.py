"""Private conversation ids: one id per pair of users, whichever side asks.

easy-chat names a private conversation ``"<min>_<max>"``: the two user ids, smaller
first, joined by ``"_"``. Its ``wuid.CombineId`` compares the ids as Go unsigned
integers (``strconv.ParseUint(id, 0, 64)``, so ``"0x1f"``, ``"9"`` and ``"10"`` compare by
value); :func:`private_conversation_id` orders ids the same way, so any pair of ids
easy-chat orders unambiguously gets exactly easy-chat's conversation id. Where easy-chat
is itself ambiguous (two ids with the same numeric value, such as two non-numeric ids,
which it keeps in argument order) imkit breaks the tie by plain string order, so the
result never depends on who sends.

That plain form is only unambiguous while neither id contains ``"_"``: ``"a_b"`` + ``"c"``
and ``"a"`` + ``"b_c"`` would both give ``"a_b_c"``. When an id contains ``"_"`` or ``"%"``
the id takes an escaped form instead, ``"_" + esc(lo) + "_" + esc(hi)``, where ``esc``
percent-encodes ``"%"`` (``%25``) and ``"_"`` (``%5F``). An escaped id starts with
``"_"`` and holds exactly two underscores; a plain one holds exactly one and never starts
with ``"_"``; so the two forms never collide, and each is decoded by splitting at its
underscores. :func:`conversation_members` is the inverse and accepts only canonical ids.
"""

from __future__ import annotations

__all__ = ("conversation_members", "private_conversation_id")

_MAX_UINT64 = (1 << 64) - 1


def _go_parse_uint_key(user_id: str) -> int:
    """The value easy-chat's ``strconv.ParseUint(user_id, 0, 64)`` yields, errors ignored.

    Go returns 0 on a syntax error and the largest uint64 on overflow (it stops at the
    first digit that overflows, before checking the rest). Ids holding ``"_"`` (which Go
    accepts as a digit separator) never reach the plain form, so they simply map to 0.
    """
    if "_" in user_id:
        return 0
    base = 10
    digits = user_id
    if len(user_id) > 1 and user_id[0] == "0":
        prefix = user_id[1].lower()
        if prefix == "x":
            base, digits = 16, user_id[2:]
        elif prefix == "o":
            base, digits = 8, user_id[2:]
        elif prefix == "b":
            base, digits = 2, user_id[2:]
        else:
            base, digits = 8, user_id[1:]
    if not digits:
        return 0
    value = 0
    for char in digits:
        # Go walks bytes: anything outside ASCII letters and digits is a syntax error.
        if "0" <= char <= "9":
            digit = ord(char) - ord("0")
        elif "a" <= char <= "z" or "A" <= char <= "Z":
            digit = ord(char.lower()) - ord("a") + 10
        else:
            return 0
        if digit >= base:
            return 0
        value = value * base + digit
        if value > _MAX_UINT64:
            return _MAX_UINT64
    return value


def _order(a: str, b: str) -> tuple[str, str]:
    """``(a, b)`` ordered as easy-chat orders them, ties broken by string order."""
    if (_go_parse_uint_key(a), a) <= (_go_parse_uint_key(b), b):
        return a, b
    return b, a


def _escape(user_id: str) -> str:
    return user_id.replace("%", "%25").replace("_", "%5F")


def _unescape(part: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(part):
        char = part[i]
        if char != "%":
            out.append(char)
            i += 1
            continue
        code = part[i + 1 : i + 3].upper()
        if code == "25":
            out.append("%")
        elif code == "5F":
            out.append("_")
        else:
            raise ValueError(f"invalid escape {part[i : i + 3]!r} in conversation id")
        i += 3
    return "".join(out)


def _needs_escape(user_id: str) -> bool:
    return "_" in user_id or "%" in user_id


def private_conversation_id(a: str, b: str) -> str:
    """The id of the private conversation between users ``a`` and ``b``.

    The same whichever order the ids come in, distinct for distinct pairs, and equal to
    easy-chat's ``"<min>_<max>"`` when neither id contains ``"_"`` or ``"%"``.
    ``a == b`` (a user's notes to self) is allowed.

    Raises:
        ValueError: an id is empty.
    """
    if not a or not b:
        raise ValueError("user ids must be non-empty")
    lo, hi = _order(a, b)
    if _needs_escape(lo) or _needs_escape(hi):
        return f"_{_escape(lo)}_{_escape(hi)}"
    return f"{lo}_{hi}"


def conversation_members(conversation_id: str) -> tuple[str, str]:
    """The two user ids of a private conversation id made by :func:`private_conversation_id`.

    Returns them in the conversation's canonical order (easy-chat's smaller id first).

    Raises:
        ValueError: ``conversation_id`` is not a canonical private conversation id.
    """
    if conversation_id.startswith("_"):
        parts = conversation_id[1:].split("_")
        if len(parts) != 2:
            raise ValueError(f"not a private conversation id: {conversation_id!r}")
        lo, hi = _unescape(parts[0]), _unescape(parts[1])
    else:
        parts = conversation_id.split("_")
        if len(parts) != 2:
            raise ValueError(f"not a private conversation id: {conversation_id!r}")
        lo, hi = parts
    if not lo or not hi or private_conversation_id(lo, hi) != conversation_id:
        raise ValueError(f"not a canonical private conversation id: {conversation_id!r}")
    return lo, hi
