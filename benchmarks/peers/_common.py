"""Process bootstrap shared by the peer servers.

The harness starts each peer as its own process::

    python -m benchmarks.peers.<name> --port 0 --mode ack

and a peer must then:

- raise its open-file limit (``RLIMIT_NOFILE`` soft limit up to the hard one), so
  thousands of idle connections fit;
- die with the harness (``PR_SET_PDEATHSIG``), so a killed harness leaves no orphan;
- listen on 127.0.0.1 (``--port 0``: a free port the kernel picks) and print
  ``READY <port>`` on stdout once it accepts connections; nothing else goes to stdout;
- run until killed. The harness ends it with SIGTERM (default action: exit at once),
  then SIGKILL; there is no graceful shutdown to wait for.

``--check`` prints ``OK`` and exits 0 when the peer can run on this machine, or prints
the reason it cannot and exits 3; the harness then skips the peer with that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

READY_PREFIX = "READY "
CHECK_FAILED_EXIT = 3
PARENT_PID_ENV = "IMKIT_BENCH_PARENT_PID"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class PeerOptions:
    host: str
    port: int
    mode: str
    store: str
    db: str | None
    ping_interval: float | None = None
    """Server-initiated keepalive interval, s (``--ping-interval``; used by the socketio
    peer, whose Engine.IO server pings its clients); None: the library's default."""


def raise_nofile_limit(want: int | None = None) -> int:
    """Raise the soft open-file limit to ``want`` (default: the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else want
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when the harness dies (Linux only)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is not None and os.getppid() != int(expected):
        # The harness died before the prctl call took effect.
        sys.exit(1)


def announce_ready(port: int) -> None:
    """Tell the harness the server accepts connections on ``port``."""
    sys.stdout.write(f"{READY_PREFIX}{port}\n")
    sys.stdout.flush()


def user_from_target(target: str, param: str = "user") -> str | None:
    """The ``param`` query parameter of a request target such as ``/?user=a``."""
    values = parse_qs(urlsplit(target).query).get(param)
    return values[0] if values else None


async def run_forever() -> None:
    """Park the main task; the process ends when the harness kills it."""
    await asyncio.get_running_loop().create_future()


def peer_main(
    serve: Callable[[PeerOptions], Coroutine[Any, Any, None]],
    *,
    modes: Sequence[str],
    check: Callable[[], str | None] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse the common command line, then run ``serve`` (which calls :func:`announce_ready`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=list(modes), default=modes[0])
    parser.add_argument("--store", choices=["memory", "sqlite", "chat-memory"], default="memory")
    parser.add_argument("--db", default=None, help="SQLite file (imkit, --store sqlite)")
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=None,
        help="server-initiated ping interval, s (socketio's Engine.IO heartbeat)",
    )
    parser.add_argument("--check", action="store_true", help="exit 0 if this peer can run")
    args = parser.parse_args(argv)
    if args.check:
        reason = check() if check is not None else None
        print("OK" if reason is None else reason)
        sys.exit(0 if reason is None else CHECK_FAILED_EXIT)
    raise_nofile_limit()
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    options = PeerOptions(args.host, args.port, args.mode, args.store, args.db, args.ping_interval)
    try:
        asyncio.run(serve(options))
    except KeyboardInterrupt:
        pass
