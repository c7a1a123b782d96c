"""Server processes under test and what /proc says about them.

- :class:`ServerProcess` starts a peer (``python -m <module> ...``) in its own session,
  waits for its ``READY <port>`` line, and kills its process group on stop: SIGTERM,
  then SIGKILL after a grace period. Every live server is also killed at interpreter
  exit, and peers die with the harness (``PR_SET_PDEATHSIG``), so none is orphaned.
- :func:`cpu_times` reads utime and stime from ``/proc/<pid>/stat`` (clock ticks,
  usually 10 ms); :func:`cpu_ns_schedstat` sums ``/proc/<pid>/task/*/schedstat`` (ns,
  live threads only) as a finer cross-check; :func:`rss_kib` reads ``VmRSS``;
  :func:`nofile_limit` the server's open-file limit.
- :class:`InstructionCounter` counts the instructions a process retires over a phase
  with Linux ``perf stat`` (when the machine has it and allows it): on a shared machine
  the CPU time of the same work moves by tens of percent from run to run, its
  instruction count by about one. :class:`CallgrindCounter` counts them where perf
  cannot (a VM without hardware counters): the server runs under valgrind's callgrind
  (``ServerProcess.start(callgrind_dir=...)``), instrumented over the phase only.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.peers._common import PARENT_PID_ENV, READY_PREFIX

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO_ROOT = Path(__file__).resolve().parent.parent

_live_groups: set[int] = set()


def _kill_leftovers() -> None:
    for pgid in list(_live_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _live_groups.discard(pgid)


atexit.register(_kill_leftovers)


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid`` in seconds (all its threads, dead ones included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 of proc(5) ("state"); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds."""
    return sum(cpu_times(pid))


def cpu_ns_schedstat(pid: int) -> int | None:
    """On-CPU nanoseconds of the live threads of ``pid``, or None if unavailable."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


class InstructionCounter:
    """``perf stat -e instructions:u,instructions:k -p <pid>`` from :meth:`start` to
    :meth:`stop`: the instructions the process retired in user space and in the kernel.
    Every method returns ``None`` instead of a count where ``perf`` is missing or not
    allowed (:meth:`available` says which, once per run)."""

    _available: bool | None = None
    EVENTS = ("instructions:u", "instructions:k")

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    @classmethod
    def available(cls) -> bool:
        """Whether ``perf stat`` can count instructions here."""
        if cls._available is None:
            perf = shutil.which("perf")
            ok = False
            if perf is not None:
                try:
                    done = subprocess.run(
                        [perf, "stat", "-x,", "-e", ",".join(cls.EVENTS), "true"],
                        capture_output=True,
                        text=True,
                        timeout=20,
                        check=False,
                    )
                    ok = done.returncode == 0 and all(
                        v is not None for v in _perf_counts(done.stderr, cls.EVENTS).values()
                    )
                except (OSError, subprocess.SubprocessError):
                    ok = False
            cls._available = ok
        return cls._available

    async def start(self, pid: int) -> None:
        """Attach to ``pid`` (a no-op where perf is not available)."""
        if not self.available():
            return
        self._proc = await asyncio.create_subprocess_exec(
            "perf",
            "stat",
            "-x,",
            "-e",
            ",".join(self.EVENTS),
            "-p",
            str(pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.3)  # perf attaches (the counts start) in a few ms

    async def stop(self) -> dict[str, int | None]:
        """Detach; the counts by event (``None`` for one perf could not count)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return dict.fromkeys(self.EVENTS)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return dict.fromkeys(self.EVENTS)
        return _perf_counts(err.decode(errors="replace"), self.EVENTS)


def _perf_counts(text: str, events: Sequence[str]) -> dict[str, int | None]:
    """The counts ``perf stat -x,`` printed for ``events`` (CSV: value, unit, event, ...)."""
    counts: dict[str, int | None] = dict.fromkeys(events)
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[2] in counts and fields[0].isdigit():
            counts[fields[2]] = int(fields[0])
    return counts


class CallgrindCounter:
    """The instructions a server started under callgrind (``ServerProcess.start(
    callgrind_dir=...)``, instrumentation off) executes from :meth:`start` to :meth:`stop`:
    ``callgrind_control`` turns the instrumentation on and zeroes the counts, then dumps
    them and turns it off. User space only (valgrind does not see the kernel): the count
    comes back as ``instructions:u``, the only event. The same code and inputs give the same count
    whatever else the machine does; the server runs ~50x slower while counted."""

    EVENTS = ("instructions:u",)

    def __init__(self, out_dir: Path) -> None:
        self._out_dir = out_dir
        self._pid: int | None = None

    @staticmethod
    def available() -> bool:
        """Whether valgrind and callgrind_control are installed."""
        return all(shutil.which(tool) is not None for tool in ("valgrind", "callgrind_control"))

    async def start(self, pid: int) -> None:
        """Instrument ``pid`` from now on, from zero."""
        await _callgrind_control(pid, "--instr=on")
        await _callgrind_control(pid, "--zero")
        self._pid = pid

    async def stop(self) -> dict[str, int | None]:
        """Dump the counts since :meth:`start` and stop instrumenting; the count by event."""
        counts: dict[str, int | None] = dict.fromkeys(self.EVENTS)
        pid, self._pid = self._pid, None
        if pid is None:
            return counts
        before = set(self._out_dir.glob(f"callgrind.{pid}.*"))
        await _callgrind_control(pid, "--dump")
        await _callgrind_control(pid, "--instr=off")
        dumps = sorted(set(self._out_dir.glob(f"callgrind.{pid}.*")) - before)
        if dumps:
            counts["instructions:u"] = _callgrind_total(dumps[-1].read_text(errors="replace"))
        return counts


async def _callgrind_control(pid: int, command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control",
        command,
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(proc.wait(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


def _callgrind_total(text: str) -> int | None:
    """The instruction count of a callgrind dump (its ``totals:`` or ``summary:`` line)."""
    for prefix in ("totals:", "summary:"):
        for line in text.splitlines():
            if line.startswith(prefix):
                value = line[len(prefix) :].split()
                if value and value[0].isdigit():
                    return int(value[0])
    return None


def callgrind_command(out_dir: Path) -> list[str]:
    """The valgrind command a server runs under for :class:`CallgrindCounter`: callgrind,
    instrumentation off until asked, one dump file per request in ``out_dir``."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--dump-line=no",
        "--dump-instr=no",
        "--compress-strings=no",
        f"--callgrind-out-file={out_dir / 'callgrind.%p'}",
        "-q",
    ]


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def nofile_limit(pid: int) -> int | None:
    """The soft open-file limit of ``pid`` (``Max open files`` in /proc/<pid>/limits)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


PROFILED_PEER = "benchmarks.peers.imkit_relay"
"""The peer that runs under cProfile with ``IMKIT_BENCH_PROFILE`` (the imkit server)."""

IMKIT_SRC: Path | None = None
"""The ``src/`` whose imkit the peers import (``--imkit-src``); ``None``: this checkout's."""


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a peer: the repo root and ``src/`` (or :data:`IMKIT_SRC`) first
    on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(IMKIT_SRC or REPO_ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[PARENT_PID_ENV] = str(os.getpid())
    env.pop("PYTHONSTARTUP", None)
    if extra:
        env.update(extra)
    return env


def imkit_framing() -> str:
    """How the imkit the peers import frames its messages: "C" (its extension
    ``imkit._speedups``, see imkit.core._framing), "Python", or "Python (before
    imkit.core._framing)" for a checkout older than the extension."""
    probe = (
        "try:\n import imkit.core._framing as f\nexcept ImportError:\n"
        " print('Python (before imkit.core._framing)')\n"
        "else:\n print('C' if f.SPEEDUPS else 'Python')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


async def check_peer(module: str, *, timeout: float = 30.0) -> str | None:
    """Run ``python -m module --check``; None if the peer can run, else the reason."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--check",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=server_env(),
        start_new_session=True,
    )
    _live_groups.add(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        return f"{module} --check timed out after {timeout:.0f} s"
    finally:
        await _reap(proc, grace=1.0)
    if proc.returncode == 0:
        return None
    lines = (out.decode(errors="replace") + err.decode(errors="replace")).strip().splitlines()
    return lines[-1] if lines else f"{module} --check exited {proc.returncode}"


async def _reap(proc: asyncio.subprocess.Process, *, grace: float) -> None:
    """Kill the process group of ``proc`` (SIGTERM, then SIGKILL) and wait for it."""
    pgid = proc.pid
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 5.0)
        # Children the peer may have started share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    finally:
        _live_groups.discard(pgid)


class ServerProcess:
    """One peer server process, started by :meth:`start`, ended by :meth:`stop`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        port: int,
        log_path: Path,
        callgrind_dir: Path | None = None,
        module: str = "",
    ) -> None:
        self.proc = proc
        self.module = module
        """The peer's module (``python -m module``)."""
        self.pid = proc.pid
        self.port = port
        self.log_path = log_path
        self.callgrind_dir = callgrind_dir
        """Where its callgrind dumps go when it runs under callgrind, else ``None``."""
        self._drain = asyncio.ensure_future(self._drain_stdout())

    @classmethod
    async def start(
        cls,
        module: str,
        args: Sequence[str],
        *,
        log_path: Path,
        timeout: float = 30.0,
        callgrind_dir: Path | None = None,
    ) -> ServerProcess:
        """Start ``python -m module`` (under callgrind, its dumps in ``callgrind_dir``,
        when that is given) and wait for its ``READY`` line."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        wrapper: list[str] = []
        if callgrind_dir is not None:
            callgrind_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, tiny
            wrapper = callgrind_command(callgrind_dir)
            timeout *= 4  # the interpreter starts several times slower under valgrind
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *wrapper,
                sys.executable,
                "-m",
                module,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO_ROOT,
                env=server_env(),
                start_new_session=True,
            )
        _live_groups.add(proc.pid)
        try:
            port = await asyncio.wait_for(_read_ready(proc), timeout)
        except BaseException as exc:
            await _reap(proc, grace=1.0)
            if isinstance(exc, asyncio.TimeoutError):
                raise RuntimeError(
                    f"{module} not ready after {timeout:.0f} s; log: {tail(log_path)}"
                ) from None
            if isinstance(exc, Exception):
                raise RuntimeError(f"{module}: {exc}; log: {tail(log_path, 3)}") from exc
            raise
        return cls(proc, port, log_path, callgrind_dir, module)

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.returncode is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_times(self) -> tuple[float, float]:
        return cpu_times(self.pid)

    def profile_phase(self, on: bool) -> None:
        """Turn the imkit server's profiler on (the measured phase starts) or off (it
        ended), when the run profiles phases only (``IMKIT_BENCH_PROFILE`` and
        ``IMKIT_BENCH_PROFILE_PHASE`` set; benchmarks/README.md, "Profiling"). Other
        peers have no profiler: nothing is sent to them."""
        if (
            self.module == PROFILED_PEER
            and os.environ.get("IMKIT_BENCH_PROFILE")
            and os.environ.get("IMKIT_BENCH_PROFILE_PHASE")
            and self.alive()
        ):
            os.kill(self.pid, signal.SIGUSR1 if on else signal.SIGUSR2)

    def cpu_ns_schedstat(self) -> int | None:
        return cpu_ns_schedstat(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def nofile_limit(self) -> int | None:
        return nofile_limit(self.pid)

    async def stop(self, grace: float = 3.0) -> None:
        try:
            await _reap(self.proc, grace=grace)
        finally:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    async def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        while await self.proc.stdout.read(65536):
            pass


async def _read_ready(proc: asyncio.subprocess.Process) -> int:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited with {await proc.wait()} before READY")
        text = line.decode(errors="replace").strip()
        if text.startswith(READY_PREFIX):
            return int(text[len(READY_PREFIX) :])


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log file, joined with `` | `` (for error messages)."""
    try:
        content = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(content[-lines:]) or "(empty log)"
