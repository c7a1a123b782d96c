"""Microbenchmark of the SQLite store's write rounds: ``python -m benchmarks.store_rounds``.

What the relay's ``imkit onlyack+sqlite`` row pays for the store, without sockets or an
event loop: rounds of ``--size`` appends spread over ``--conversations`` conversations
(the relay's 50 pairs give rounds of ~170), each round as the store runs it
(``BEGIN IMMEDIATE``, :func:`imkit.chat.sqlite._append_all`, ``COMMIT``) on a connection
the store opened (its pragmas, its VFS). Per message, in CPU time of this process (the
worker's fsync included): the total, its user and system parts, and the share of each
statement; and the write-ahead-log writes SQLite asked for and the writes made, when
``imkit._sqlite_wal`` is in use.

Two variants in the same run, interleaved ``--repeat`` times (medians printed): the
store as it opens its file (``imkit-wal``: the C VFS, when built) and the same through
SQLite's default VFS (``default``, as with ``IMKIT_NO_SPEEDUPS=1``). The file is made
afresh under ``--dir`` for each run, then ``--warm`` rounds before the measured ones.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from imkit.chat import sqlite as store_module
from imkit.chat.ids import private_conversation_id


class _Timed:
    """A connection whose statements are timed (process CPU), by their first words."""

    def __init__(self, conn: Any, times: Counter[str]) -> None:
        self.conn = conn
        self.times = times

    def execute(self, sql: str, *args: Any) -> Any:
        start = time.process_time()
        result = self.conn.execute(sql, *args)
        self.times[_label(sql)] += time.process_time() - start
        return result

    def executemany(self, sql: str, rows: Any) -> Any:
        start = time.process_time()
        result = self.conn.executemany(sql, rows)
        self.times[_label(sql)] += time.process_time() - start
        return result


def _label(sql: str) -> str:
    """``INSERT <table>``, ``SELECT <table of the outermost FROM>``, or the first word."""
    words = sql.split()
    if words[0] == "INSERT":
        return f"INSERT {words[2]}"
    if words[0] == "SELECT" and "FROM" in words:
        last_from = len(words) - 1 - words[::-1].index("FROM")
        return f"SELECT {words[last_from + 1]}"
    return words[0]


def _rounds(first: int, count: int, size: int, conversations: int) -> list[list[Any]]:
    pairs = [(f"user{2 * i}", f"user{2 * i + 1}") for i in range(conversations)]
    rounds = []
    for r in range(first, first + count):
        appends = []
        for j in range(size):
            n = r * size + j
            sender, recipient = pairs[n % conversations]
            appends.append(
                store_module._Append(
                    private_conversation_id(sender, recipient),
                    sender,
                    recipient,
                    f"c{n % conversations}-{n}",  # (msg_id: as the benchmark's clients)
                    2,
                    0,
                    f"c{n}|" + "x" * 94,
                    1_700_000_000_000 + n,
                )
            )
        rounds.append(appends)
    return rounds


def run_once(args: argparse.Namespace, vfs: bool) -> dict[str, float]:
    """One measured run: figures per message."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        saved = os.environ.get("IMKIT_NO_SPEEDUPS")
        if not vfs:
            os.environ["IMKIT_NO_SPEEDUPS"] = "1"  # (read by the store when it connects)
        try:
            store = store_module.SQLiteStore(Path(tmp) / "rounds.db")
            conn = store._connect_once()
        finally:
            if saved is None:
                os.environ.pop("IMKIT_NO_SPEEDUPS", None)
            else:
                os.environ["IMKIT_NO_SPEEDUPS"] = saved
        times: Counter[str] = Counter()
        timed = _Timed(conn, times)
        for appends in _rounds(0, args.warm, args.size, args.conversations):
            timed.execute("BEGIN IMMEDIATE")
            assert store_module._append_all(timed, appends, probe=False) is not None  # type: ignore[arg-type]
            timed.execute("COMMIT")
        measured = _rounds(args.warm, args.rounds, args.size, args.conversations)
        times.clear()
        counts = _wal_counts()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.process_time()
        for appends in measured:
            timed.execute("BEGIN IMMEDIATE")
            assert store_module._append_all(timed, appends, probe=False) is not None  # type: ignore[arg-type]
            timed.execute("COMMIT")
        total = time.process_time() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        counts_after = _wal_counts()
        conn.close()
    messages = args.rounds * args.size
    per = 1e6 / messages
    figures = {
        "cpu": total * per,
        "user": (after.ru_utime - usage.ru_utime) * per,
        "sys": (after.ru_stime - usage.ru_stime) * per,
        "python": (total - sum(times.values())) * per,
    }
    if vfs:
        figures["log writes asked"] = (counts_after[0] - counts[0]) / args.rounds
        figures["log writes made"] = (counts_after[1] - counts[1]) / args.rounds
    for label, seconds in times.items():
        figures[label] = seconds * per
    return figures


def _wal_counts() -> tuple[int, int]:
    try:
        from imkit import _sqlite_wal
    except ImportError:
        return (0, 0)
    seen, issued, _journals = _sqlite_wal.counts()
    return (seen, issued)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="measured rounds per run")
    parser.add_argument("--warm", type=int, default=30, help="rounds before the measured")
    parser.add_argument("--size", type=int, default=170, help="appends per round")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant")
    parser.add_argument("--dir", default=None, help="where the files go (default: TMPDIR)")
    args = parser.parse_args(argv)
    has_vfs = store_module.wal_vfs(os.environ) is not None
    variants = {"imkit-wal": True, "default": False} if has_vfs else {"default": False}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, vfs in variants.items():
            results[name].append(run_once(args, vfs))
    labels = list(dict.fromkeys(k for runs in results.values() for run in runs for k in run))
    print(
        f"SQLite store rounds: {args.rounds} rounds of {args.size} appends over "
        f"{args.conversations} conversations, synchronous=FULL; medians of {args.repeat}; "
        "µs of process CPU per message (statements: their share), log writes per round"
    )
    print()
    print("| figure | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for label in labels:
        cells = []
        for name in variants:
            values = [run[label] for run in results[name] if label in run]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
