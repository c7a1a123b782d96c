"""Read the imkit server's profiles: ``python -m benchmarks.profile_report NEW [BASE]``.

A profile comes from a benchmark run with ``IMKIT_BENCH_PROFILE=<dir>`` (see
:data:`benchmarks.peers.imkit_relay.PROFILE_ENV`): the server ran under cProfile for its
whole life, warm-up included. Every figure is per message, the messages being the Data
frames the server's connections received (calls of ``Peer._receive_data``), or
``--messages N``.

- With one profile: the functions that cost the most (``tottime``, in µs of the profiled
  run per message: cProfile slows every call, so read them as shares, not as times), with
  their calls per message.
- With two: the change from BASE to NEW in calls and in ``tottime`` per message, the
  functions that moved most first. Calls per message do not depend on the machine's
  noise: on a VM without hardware counters they are the steadiest figure there is to
  compare two versions of imkit by (the benchmark's CPU times moved 20 % between runs of
  the same build there).
"""

from __future__ import annotations

import argparse
import pstats
from pathlib import Path

MESSAGE_FUNCTION = ("peer.py", "_receive_data")
"""One call per Data frame a server connection received: the messages of the profile."""

Key = str
Figures = tuple[float, float]  # (calls, tottime in s)


def load(path: Path, messages_given: int | None = None) -> tuple[dict[Key, Figures], int]:
    """The profile's functions (``file:line:name`` -> calls, tottime) and its message
    count (``messages_given`` if not ``None``)."""
    stats = pstats.Stats(str(path))
    functions: dict[Key, Figures] = {}
    messages = 0
    for (filename, line, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        calls, tottime = entry[1], entry[2]
        base = Path(filename).name
        functions[f"{base}:{line}:{name}"] = (calls, tottime)
        if (base, name) == MESSAGE_FUNCTION:
            messages += calls
    if messages_given is not None:
        messages = messages_given
    if not messages:
        raise SystemExit(f"{path}: no {MESSAGE_FUNCTION[1]} calls: not an imkit server profile?")
    return functions, messages


def totals(functions: dict[Key, Figures], messages: int) -> tuple[float, float]:
    """Calls and tottime (µs) per message, all functions together."""
    calls = sum(figures[0] for figures in functions.values())
    tottime = sum(figures[1] for figures in functions.values())
    return calls / messages, tottime / messages * 1e6


def report_one(functions: dict[Key, Figures], messages: int, top: int) -> list[str]:
    """The ``top`` costliest functions by tottime per message."""
    calls, tottime = totals(functions, messages)
    lines = [
        f"{messages:,} messages; per message: {calls:.1f} calls, {tottime:.1f} µs profiled",
        f"{'µs/msg':>8} {'calls/msg':>10}  function",
    ]
    ranked = sorted(functions.items(), key=lambda item: -item[1][1])
    for key, (n, t) in ranked[:top]:
        lines.append(f"{t / messages * 1e6:8.2f} {n / messages:10.2f}  {key}")
    return lines


def report_change(
    new: dict[Key, Figures],
    new_messages: int,
    base: dict[Key, Figures],
    base_messages: int,
    top: int,
) -> list[str]:
    """BASE → NEW per message: the totals, then the functions whose calls or tottime
    moved most."""
    base_calls, base_time = totals(base, base_messages)
    new_calls, new_time = totals(new, new_messages)
    lines = [
        f"calls/msg {base_calls:.1f} -> {new_calls:.1f} ({new_calls - base_calls:+.1f}); "
        f"profiled µs/msg {base_time:.1f} -> {new_time:.1f} ({new_time - base_time:+.1f})",
        f"{'calls/msg':>21} {'µs/msg':>17}  function",
    ]

    def per(figures: Figures | None, messages: int) -> Figures:
        if figures is None:
            return 0.0, 0.0
        return figures[0] / messages, figures[1] / messages * 1e6

    moved = []
    for key in set(new) | set(base):
        (bc, bt), (nc, nt) = per(base.get(key), base_messages), per(new.get(key), new_messages)
        moved.append((abs(nc - bc) * 0.5 + abs(nt - bt), key, bc, nc, bt, nt))
    moved.sort(reverse=True)
    for _weight, key, bc, nc, bt, nt in moved[:top]:
        lines.append(f"{bc:9.2f} -> {nc:7.2f} {bt:7.2f} -> {nt:7.2f}  {key}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("new", type=Path, help="a profile written by the imkit server")
    parser.add_argument("base", type=Path, nargs="?", help="a profile to compare it with")
    parser.add_argument("--top", type=int, default=40, help="functions to list (default 40)")
    parser.add_argument(
        "--messages",
        type=int,
        help="count per this many messages instead of the Data frames received (e.g. "
        "10000 for a profile of the offline catch-up's phase, where none is received)",
    )
    args = parser.parse_args(argv)
    new, new_messages = load(args.new, args.messages)
    if args.base is None:
        lines = report_one(new, new_messages, args.top)
    else:
        base, base_messages = load(args.base, args.messages)
        lines = report_change(new, new_messages, base, base_messages, args.top)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
