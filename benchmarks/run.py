"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

Each case starts its server as a separate process (so its CPU and memory can be read
from /proc), runs its scenario with the load generator in this process, and kills
the server. Prints a Markdown table and writes JSON (and the table) into
``benchmarks/results/`` (git-ignored). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procs, scenarios
from benchmarks.calibration import REFERENCE_VARIANT, MachineFactor, machine_factor
from benchmarks.peers._common import raise_nofile_limit
from benchmarks.procs import REPO_ROOT, CallgrindCounter, ServerProcess, check_peer, tail
from benchmarks.scenarios import OFFLINE_TARGET_US, QUICK, SCENARIOS, Config, RunContext
from benchmarks.suite import BASELINE_SERVERS, HB_INTERVAL, WORKDIR, Case, select

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 540.0
LIBRARIES = ("websockets", "python-socketio", "python-engineio", "aiohttp", "picows", "imkit")


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
        "libraries": versions,
    }


async def run_case(case: Case, config: Config, log_dir: Path) -> dict[str, Any]:
    """Start the case's server, run its scenario (bounded), always stop the server."""
    fn = SCENARIOS[case.scenario].fn
    workdir = Path(tempfile.mkdtemp(prefix="imkit-bench-"))
    args = [
        a.replace(WORKDIR, str(workdir)).replace(HB_INTERVAL, f"{config.hb_interval:g}")
        for a in case.server_args
    ]
    log_path = log_dir / f"{case.name.replace(' ', '_').replace('+', '_')}.log"
    server: ServerProcess | None = None
    ctx: RunContext | None = None
    try:
        server = await ServerProcess.start(
            case.server.module,
            args,
            log_path=log_path,
            callgrind_dir=log_dir / "callgrind" if config.callgrind else None,
        )
        ctx = RunContext(case, config, server)
        try:
            figures = await asyncio.wait_for(fn(ctx), config.case_timeout)
        except asyncio.TimeoutError:
            raise scenarios.ScenarioError(
                f"case timed out after {config.case_timeout:.0f} s"
            ) from None
        if not server.alive():
            raise scenarios.ScenarioError(f"server exited; log: {tail(log_path)}")
        return figures
    except scenarios.ScenarioError as exc:
        if server is not None and not server.alive():
            raise scenarios.ScenarioError(f"{exc}; server exited; log: {tail(log_path)}") from exc
        raise
    finally:
        if ctx is not None:
            await ctx.aclose()
        if server is not None:
            await server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def median_run(case: Case, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of a case's runs (by its scenario's headline figure), with every run's
    headline under ``repeats``; the one run when there is one."""
    headline = SCENARIOS[case.scenario].headline
    if len(runs) == 1 or headline is None:
        return runs[0]
    ordered = sorted(runs, key=lambda figures: float(figures[headline]))
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["repeats"] = [figures[headline] for figures in runs]
    return median


async def run_suite(
    cases: list[Case], config: Config, budget: float, log_dir: Path, repeat: int = 1
) -> list[dict[str, Any]]:
    """Run every case ``repeat`` times, in rounds (each round runs every case once, in
    order), so that a slow spell of a shared machine falls on every server's runs alike
    instead of on one server's repeats; each case's record holds its median run."""
    started = time.monotonic()
    modules = sorted({case.server.module for case in cases})
    reasons = dict(
        zip(modules, await asyncio.gather(*(check_peer(m) for m in modules)), strict=True)
    )
    records: list[dict[str, Any]] = []
    runs: list[list[dict[str, Any]]] = []
    for case in cases:
        record: dict[str, Any] = {
            "name": case.name,
            "server": case.server.name,
            "variant": case.variant,
            "scenario": case.scenario,
            "baseline": case.baseline,
            "status": "ok",
            "reason": None,
            "figures": None,
            "wall_s": 0.0,
        }
        reason = reasons[case.server.module]
        if reason is not None:
            record.update(status="skipped", reason=reason)
            print(f"-- {case.name}: skipped: {reason}", flush=True)
        records.append(record)
        runs.append([])
    for round_no in range(repeat):
        for case, record, done in zip(cases, records, runs, strict=True):
            if record["status"] != "ok":
                continue
            if time.monotonic() - started > budget:
                if not done:
                    spent = f"suite time budget ({budget:.0f} s) spent"
                    record.update(status="skipped", reason=spent)
                    print(f"-- {case.name}: skipped: {record['reason']}", flush=True)
                continue
            which = f" (run {round_no + 1} of {repeat})" if repeat > 1 else ""
            print(f"-- {case.name}{which} ...", end=" ", flush=True)
            t0 = time.monotonic()
            try:
                figures = await run_case(case, config, log_dir)
            except Exception as exc:
                record.update(status="error", reason=str(exc) or repr(exc))
                record["partial_figures"] = getattr(exc, "figures", None)
                figures = None
            else:
                done.append(figures)
            took = time.monotonic() - t0
            record["wall_s"] = round(record["wall_s"] + took, 2)
            print(_summary({**record, "figures": figures, "wall_s": round(took, 2)}), flush=True)
    for case, record, done in zip(cases, records, runs, strict=True):
        if record["status"] == "ok" and done:
            record["figures"] = median_run(case, done)
            if len(done) > 1:
                record["runs"] = done
    return records


def _kinstr(figures: dict[str, Any]) -> str:
    """``", <n> kinstr/msg"`` for a case whose instructions were counted, else ``""``."""
    kinstr = figures.get("server_kinstr_per_msg")
    return "" if kinstr is None else f", {kinstr:.1f} kinstr/msg"


def _summary(record: dict[str, Any]) -> str:
    figures = record["figures"]
    if record["status"] != "ok" or figures is None:
        return f"{record['status']}: {record['reason']}"
    if record["scenario"] == "relay":
        return (
            f"{figures['msgs_per_s']:.0f} msgs/s, "
            f"{figures['server_cpu_us_per_msg']:.1f} us/msg{_kinstr(figures)}"
            f" ({record['wall_s']} s)"
        )
    if record["scenario"] == "idle":
        return f"{figures['kib_per_conn']:.1f} KiB/conn ({record['wall_s']} s)"
    if record["scenario"] == "offline":
        return (
            f"{figures['messages']:,} in {figures['catchup_s']:.2f} s, "
            f"{figures['server_cpu_us_per_msg']:.1f} us/msg{_kinstr(figures)}"
            f" ({record['wall_s']} s)"
        )
    if record["scenario"] == "heartbeat":
        return (
            f"{figures['conns_held']:,}/{figures['conns_wanted']:,} held, "
            f"{figures['server_cpu_us_per_hb']:.1f} us/heartbeat, "
            f"{figures['kib_per_conn']:.1f} KiB/conn ({record['wall_s']} s)"
        )
    return f"done ({record['wall_s']} s)"


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def render_table(records: list[dict[str, Any]], machine: MachineFactor | None = None) -> str:
    """The Markdown tables: one row per relay case with idle memory per server, then
    the offline catch-up and heartbeat tables (those present); ``machine``: the run's
    machine factor, for the offline target on this machine."""
    ok = [r for r in records if r["status"] == "ok" and r["figures"] is not None]
    idle_kib = {r["server"]: r["figures"]["kib_per_conn"] for r in ok if r["scenario"] == "idle"}
    idle_notes = {
        r["server"]: r["reason"] for r in records if r["scenario"] == "idle" and r["status"] != "ok"
    }
    cpu = {
        (r["server"], r["variant"]): r["figures"]["server_cpu_us_per_msg"]
        for r in ok
        if r["scenario"] == "relay"
    }
    kinstr = {
        (r["server"], r["variant"]): r["figures"].get("server_kinstr_per_msg")
        for r in ok
        if r["scenario"] == "relay"
    }
    header = (
        "| server | variant | msgs/s | p50 ms | p99 ms | server CPU µs/msg | "
        + " | ".join(f"CPU vs {b}" for b in BASELINE_SERVERS)
        + " | server kinstr/msg | "
        + " | ".join(f"instr vs {b}" for b in BASELINE_SERVERS)
        + " | KiB/idle conn | note |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    if not any(r["scenario"] in ("relay", "idle") for r in records):
        lines = []
    relay_servers = []
    for record in records:
        if record["scenario"] != "relay":
            continue
        relay_servers.append(record["server"])
        kib = _fmt(idle_kib.get(record["server"]))
        cells = [record["server"], record["variant"]]
        figures = record["figures"] if record["status"] == "ok" else None
        if figures is None:
            cells += ["-"] * (5 + 2 * len(BASELINE_SERVERS))
            note = f"{record['status']}: {record['reason']}"
        else:
            mine = figures["server_cpu_us_per_msg"]
            cells += [
                _fmt(figures["msgs_per_s"], 0),
                _fmt(figures["latency_ms"]["p50"], 2),
                _fmt(figures["latency_ms"]["p99"], 2),
                _fmt(mine, 1),
            ]
            for base in BASELINE_SERVERS:
                ref = cpu.get((base, record["baseline"]))
                cells.append(f"{mine / ref:.2f}x" if ref else "-")
            mine_instr = figures.get("server_kinstr_per_msg")
            cells.append(_fmt(mine_instr, 1))
            for base in BASELINE_SERVERS:
                ref = kinstr.get((base, record["baseline"]))
                cells.append(f"{mine_instr / ref:.2f}x" if ref and mine_instr else "-")
            notes = []
            if figures["capped"]:
                notes.append(f"send phase capped ({figures['sent']:,} sent)")
            if figures["incomplete"]:
                notes.append(f"incomplete: {figures['incomplete']}")
            if figures["unexpected_deliveries"] or figures["unexpected_acks"]:
                notes.append(
                    f"unexpected: {figures['unexpected_deliveries']} deliveries, "
                    f"{figures['unexpected_acks']} acks"
                )
            note = "; ".join(notes)
        if record["server"] in idle_notes and record["status"] == "ok":
            note = "; ".join(filter(None, [note, f"idle: {idle_notes[record['server']]}"]))
        cells += [kib, note]
        lines.append(_row(cells))
    for server, kib_value in idle_kib.items():
        if server not in relay_servers:
            row = [server, "idle", *["-"] * (5 + 2 * len(BASELINE_SERVERS)), _fmt(kib_value), ""]
            lines.append(_row(row))
    for extra in (_offline_table(records, machine), _heartbeat_table(records)):
        if extra:
            lines += ["", *extra] if lines else extra
    others = [r for r in records if r["scenario"] not in ("relay", "idle", *EXTRA_TABLES)]
    for record in others:
        lines.append("")
        lines.append(f"{record['name']} ({record['scenario']}): {record['status']}")
        if record["figures"]:
            lines.append("    " + json.dumps(record["figures"]))
    return "\n".join(lines)


CALLGRIND_SCENARIOS = ("relay", "offline")
"""The scenarios that count instructions (``--callgrind`` runs only these)."""

EXTRA_TABLES = ("offline", "heartbeat")
"""Scenarios with a table of their own, below the relay table."""


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table_head(title: str, header: list[str]) -> list[str]:
    """A table's title line, a blank line, its header row and the separator."""
    return [title, "", _row(header), "|" + "---|" * len(header)]


def _failed_row(record: dict[str, Any], width: int) -> list[str]:
    """The cells of a case that measured nothing: the server, dashes, why."""
    return [record["server"], *["-"] * (width - 2), f"{record['status']}: {record['reason']}"]


def _offline_table(records: list[dict[str, Any]], machine: MachineFactor | None) -> list[str]:
    """Offline catch-up: one row per case (imkit only: the peers have no offline store)."""
    rows = [r for r in records if r["scenario"] == "offline"]
    if not rows:
        return []
    header = [
        "server",
        "messages",
        "catch-up s",
        "msgs/s",
        "server CPU µs/msg",
        f"vs target ({OFFLINE_TARGET_US:g} µs)",
        "target on this machine",
        "vs it",
        "server kinstr/msg",
        "storing msgs/s",
        "note",
    ]
    lines = _table_head(
        "Offline catch-up: a user reconnects to messages stored while away (SQLite store; "
        "imkit only: peers have no offline store)",
        header,
    )
    scaled = None if machine is None else machine.scaled(OFFLINE_TARGET_US)
    for record in rows:
        figures = record["figures"] if record["status"] == "ok" else None
        if figures is None:
            cells = _failed_row(record, len(header))
        else:
            mine = figures["server_cpu_us_per_msg"]
            cells = [
                record["server"],
                _fmt(figures["messages"], 0),
                _fmt(figures["catchup_s"], 2),
                _fmt(figures["msgs_per_s"], 0),
                _fmt(mine, 1),
                f"{mine / OFFLINE_TARGET_US:.2f}x",
                "-" if scaled is None else f"{scaled:.1f} µs",
                "-" if scaled is None else f"{mine / scaled:.2f}x",
                _fmt(figures.get("server_kinstr_per_msg"), 1),
                _fmt(figures["store_msgs_per_s"], 0),
                "every message once" if figures["received"] == figures["messages"] else "",
            ]
        lines.append(_row(cells))
    lines.append("")
    lines.append(
        f"Target on this machine: {OFFLINE_TARGET_US:g} µs x the {machine.describe()}"
        " (benchmarks/calibration.py)."
        if machine is not None
        else "Target on this machine: - (no machine factor: no peer's ack relay in this"
        " run, or its CPU figures were taken under valgrind)."
    )
    return lines


def run_machine_factor(records: list[dict[str, Any]]) -> MachineFactor | None:
    """The machine factor (:mod:`benchmarks.calibration`) from the peers' acked-relay
    rows of ``records`` (``None`` without any)."""
    return machine_factor(
        {
            r["server"]: r["figures"]["server_cpu_us_per_msg"]
            for r in records
            if r["scenario"] == "relay"
            and r["variant"] == REFERENCE_VARIANT
            and r["status"] == "ok"
            and r["figures"] is not None
        }
    )


def _heartbeat_table(records: list[dict[str, Any]]) -> list[str]:
    """Connections held with heartbeats: one row per server."""
    rows = [r for r in records if r["scenario"] == "heartbeat"]
    if not rows:
        return []
    ok = [r for r in rows if r["status"] == "ok" and r["figures"] is not None]
    reference = {r["server"]: r["figures"]["server_cpu_us_per_hb"] for r in ok}.get("websockets")
    header = [
        "server",
        "heartbeat",
        "conns held",
        "connect failures",
        "heartbeats/s",
        "server CPU µs/hb",
        "CPU vs websockets",
        "server CPU %",
        "KiB/conn",
        "RTT p50 ms",
        "RTT p99 ms",
        "note",
    ]
    lines = _table_head(
        "Connections held with heartbeats (each connection beats once per interval)", header
    )
    for record in rows:
        figures = record["figures"] if record["status"] == "ok" else None
        if figures is None:
            lines.append(_row(_failed_row(record, len(header))))
            continue
        mine = figures["server_cpu_us_per_hb"]
        rtt = figures["rtt_ms"] or {}
        notes = []
        if figures["dropped"]:
            notes.append(f"{figures['dropped']} dropped ({'; '.join(figures['drop_reasons'])})")
        if figures["connect_failures"]:
            notes.append("failed: " + "; ".join(figures["connect_failure_reasons"]))
        if figures["heartbeats_per_s"] < 0.95 * figures["expected_per_s"]:
            notes.append(f"below the set rate ({figures['expected_per_s']:,.0f}/s)")
        if figures["late"] or figures["unanswered"]:
            notes.append(f"{figures['late']} late, {figures['unanswered']} unanswered")
        if figures["client_errors"]:
            notes.append(f"client saw: {figures['client_errors'][0]}")
        if figures["rtt_ms"] is None:
            notes.append("server-sent pings: RTT not seen by the client")
        cells = [
            record["server"],
            f"{figures['protocol']} every {figures['interval_s']:g} s",
            f"{figures['conns_held']:,}/{figures['conns_wanted']:,}",
            _fmt(figures["connect_failures"], 0),
            _fmt(figures["heartbeats_per_s"], 0),
            _fmt(mine, 1),
            f"{mine / reference:.2f}x" if reference else "-",
            _fmt(figures["server_cpu_share"] * 100, 0),
            _fmt(figures["kib_per_conn"]),
            _fmt(rtt.get("p50"), 2),
            _fmt(rtt.get("p99"), 2),
            "; ".join(notes),
        ]
        lines.append(_row(cells))
    return lines


def _prune_logs(log_dir: Path) -> None:
    """Remove empty server logs (and the directory, if none is left)."""
    with contextlib.suppress(OSError):
        for path in log_dir.iterdir():
            if path.stat().st_size == 0:
                path.unlink()
        log_dir.rmdir()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Private-chat relay benchmark: imkit against peer WebSocket servers.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run < 1 min")
    parser.add_argument("--pairs", type=int, help="sender/recipient pairs (default 50)")
    parser.add_argument("--window", type=int, help="outstanding messages per sender (default 10)")
    parser.add_argument("--messages", type=int, help="messages per sender (default 2000)")
    parser.add_argument("--idle-conns", type=int, help="idle connections (default 5000)")
    parser.add_argument("--max-seconds", type=float, help="send-phase cap, s (default 20)")
    parser.add_argument("--text-size", type=int, help="message text size in bytes (default 100)")
    parser.add_argument(
        "--offline-messages",
        type=int,
        help="offline: messages caught up by the reconnecting user (default 10000)",
    )
    parser.add_argument(
        "--hb-conns", type=int, help="heartbeat: connections held open (default 10000)"
    )
    parser.add_argument(
        "--hb-interval", type=float, help="heartbeat: seconds between heartbeats (default 2)"
    )
    parser.add_argument(
        "--hb-seconds", type=float, help="heartbeat: measured period, s (default 10)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these: servers, rows ('imkit onlyack'), variants or scenarios",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="start no new case after this many seconds (default %(default).0f)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each case N times and report the median run (default 1)",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="relay and offline cases only, every server under valgrind's callgrind: count"
        " its instructions per message (user space) where perf cannot; slow",
    )
    parser.add_argument(
        "--imkit-src",
        type=Path,
        metavar="DIR",
        help="run the imkit servers on the imkit in DIR (another checkout's src/), to"
        " compare two versions with one harness",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    config = QUICK if args.quick else Config()
    if args.callgrind:
        # A counted server runs ~50x slower: small counts unless asked, generous bounds.
        config = replace(
            config,
            pairs=10,
            messages=300,
            warmup=20,
            max_seconds=120.0,
            drain_timeout=60.0,
            connect_timeout=60.0,
            case_timeout=600.0,
            callgrind=True,
        )
    overrides = {
        "pairs": args.pairs,
        "window": args.window,
        "messages": args.messages,
        "idle_conns": args.idle_conns,
        "max_seconds": args.max_seconds,
        "text_size": args.text_size,
        "offline_messages": args.offline_messages,
        "hb_conns": args.hb_conns,
        "hb_interval": args.hb_interval,
        "hb_seconds": args.hb_seconds,
    }
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


async def amain(args: argparse.Namespace) -> int:
    config = build_config(args)
    cases = select(args.only)
    if args.imkit_src is not None:
        if not (args.imkit_src / "imkit" / "__init__.py").is_file():
            print(f"--imkit-src: no imkit package in {args.imkit_src}", file=sys.stderr)
            return 2
        procs.IMKIT_SRC = args.imkit_src.resolve()
    if config.callgrind:
        if not CallgrindCounter.available():
            print("--callgrind needs valgrind (apt-get install valgrind)", file=sys.stderr)
            return 2
        counted = [case for case in cases if case.scenario in CALLGRIND_SCENARIOS]
        if cases and not counted:
            print(
                "--callgrind counts the relay and offline cases only; none is selected",
                file=sys.stderr,
            )
            return 2
        cases = counted
    if args.list or not cases:
        for case in cases:
            print(f"{case.name:28} scenario={case.scenario}")
        if not cases:
            print(f"no case matches {args.only}", file=sys.stderr)
        return 0 if cases else 2
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    nofile = raise_nofile_limit()
    needed = max(config.idle_conns, config.hb_conns) + 4 * config.pairs + 100
    if nofile < needed:
        print(
            f"warning: open-file limit {nofile} < {needed} needed (raise the hard limit, "
            "ulimit -Hn); cases that need more will fail and say so",
            file=sys.stderr,
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / f"logs-{stamp}"
    info = machine_info()
    framing = procs.imkit_framing()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"load {info['loadavg_start'][0]:.2f}; imkit framing: {framing}; "
        f"config: {config.as_dict()}",
        flush=True,
    )
    started = time.monotonic()
    records = await run_suite(cases, config, args.budget, log_dir, max(1, args.repeat))
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = round(time.monotonic() - started, 1)
    # (Under callgrind the CPU figures measure valgrind: no machine factor.)
    machine = None if config.callgrind else run_machine_factor(records)
    table = render_table(records, machine)
    print()
    print(table)
    result = {
        "started": stamp,
        "quick": args.quick,
        "repeat": args.repeat,
        "machine": info,
        "config": config.as_dict(),
        "imkit_src": str(procs.IMKIT_SRC or REPO_ROOT / "src"),
        "imkit_framing": framing,
        "cases": records,
        "machine_factor": None if machine is None else asdict(machine),
        "table": table,
    }
    out = args.out / f"run-{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    (args.out / "latest.md").write_text(table + "\n")
    _prune_logs(log_dir)
    print(f"\nwall {info['wall_s']} s; results: {out}")
    return 1 if any(r["status"] == "error" for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
