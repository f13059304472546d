"""
What the run prints: a progress line and warnings while it runs, then a
readable table on stderr (unless ``--json-only``) and exactly one JSON line
on stdout. The exit status is 0 when no problem was found, else 1.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from typing import TypedDict

PROG = "loadtest"

# a phase's figures: what was measured, keyed as in the JSON line
PhaseReport = dict[str, object]

LABEL_WIDTH = 24


class Console:
    """
    The progress line on stderr (rewritten in place on a terminal, a line
    every 5 s otherwise) and warnings, which always print.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tty = sys.stderr.isatty()
        self._last_print = 0.0
        self._line_open = False

    def progress(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            if force or now - self._last_print >= 0.2:
                sys.stderr.write("\r" + text + "\x1b[K")
                sys.stderr.flush()
                self._last_print = now
                self._line_open = True
        elif force or now - self._last_print >= 5.0:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last_print = now

    def done(self) -> None:
        """Ends the progress line, so that the next output starts on a line of its own."""
        if self.enabled and self._tty and self._line_open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._line_open = False

    def warn(self, message: str) -> None:
        self.done()
        sys.stderr.write(f"{PROG}: warning: {message}\n")


# -- latency figures


def percentile(sorted_values: Sequence[int], p: float) -> int | None:
    n = len(sorted_values)
    if not n:
        return None
    i = min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))
    return sorted_values[i]


class LatencySummary(TypedDict):
    p50: float | None
    p99: float | None
    max: float | None
    n: int


def latency_summary(latencies_ns: Sequence[int]) -> LatencySummary:
    """p50/p99/max in ms (3 decimals) of nanosecond values."""
    if not latencies_ns:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(latencies_ns)

    def ms(value: int | None) -> float | None:
        return None if value is None else round(value / 1e6, 3)

    return {"p50": ms(percentile(ordered, 50)), "p99": ms(percentile(ordered, 99)),
            "max": ms(ordered[-1]), "n": len(ordered)}


# -- the result


class RunConfig(TypedDict):
    clients: int
    concurrency: int
    procs: int
    publishers: int
    burst: int
    size: int
    rate: float
    duration: float
    upstream: int
    phases: list[str]
    binary: bool
    auth: str
    jwt_algorithm: str | None  # the minted JWTs' alg (--jwt-key-file), None: Redis tokens
    pid: int
    idle: float
    source_addresses: list[str]


class RunResult(TypedDict):
    tool: str
    url: str
    redis_url: str
    run_id: str
    config: RunConfig
    health: object
    phases: dict[str, PhaseReport]
    close: PhaseReport
    ok: bool
    problems: list[str]


def emit(result: RunResult, json_only: bool) -> int:
    """Prints the table and the JSON line; the exit status."""
    if not json_only:
        sys.stderr.write(format_table(result) + "\n")
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


# -- the table


def format_value(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_latency(summary: object) -> str:
    if not isinstance(summary, dict) or summary.get("p50") is None:
        return "-"
    return f"p50 {summary['p50']:.3f}  p99 {summary['p99']:.3f}  max {summary['max']:.3f} ms"


class _Table:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def row(self, label: str, value: str) -> None:
        self.lines.append(f"  {label:<{LABEL_WIDTH}} {value}")

    def cpu_rows(self, phase: PhaseReport, per: str) -> None:
        for name in ("proxy", "redis"):
            key = f"{name}_cpu_us_per_{per}"
            if key in phase:
                self.row(f"{name} CPU / {per}", f"{phase[key]:,.2f} us  (busy "
                         f"{phase.get(f'{name}_cpu_util', 0):.0%} of a core)")
        tool_cpu = phase.get("tool_cpu")
        if isinstance(tool_cpu, dict):
            text = "  ".join(f"{role} {busy:.0%}" for role, busy in tool_cpu.items())
            host = phase.get("host_cpu")
            self.row("tool CPU (max/process)",
                     text + (f"   host {host:.0%} of all cores" if host is not None else ""))
        if phase.get("tool_saturated"):
            self.row("!! SATURATED", str(phase.get("tool_note", "load tool saturated")))
        if phase.get("host_saturated"):
            self.row("!! host CPU", "all cores busy during the phase: proxy, Redis, this tool and "
                     "other processes competed for CPU")


def _connect_rows(table: _Table, phase: PhaseReport) -> None:
    table.line("connect")
    table.row("opened / requested",
              f"{format_value(phase['ok'])} / {format_value(phase['clients'])}"
              f"   failed {format_value(phase['failed'])}"
              + (f"  {phase['failures']}" if phase["failures"] else ""))
    table.row("connect rate", f"{format_value(phase['rate_per_s'])} /s"
              f"   ({format_value(phase['seconds'], 2)} s)")
    table.row("handshake latency", format_latency(phase["latency_ms"]))
    table.cpu_rows(phase, "conn")
    if "proxy_rss_kib_per_conn" in phase:
        table.row("proxy RSS / conn", f"{phase['proxy_rss_kib_per_conn']:,.2f} KiB  "
                  f"({phase['proxy_rss_mib_before']} -> {phase['proxy_rss_mib_after']} MiB)")


def _idle_rows(table: _Table, phase: PhaseReport) -> None:
    table.line("idle")
    table.row("connections held", f"{format_value(phase['connections'])} for "
              f"{phase['seconds']} s, dropped {format_value(phase['dropped'])}")
    if "proxy_cpu_util" in phase:
        table.row("proxy CPU while idle", f"{phase['proxy_cpu_util']:.1%} of a core"
                  + (f"  ({phase['proxy_cpu_us_per_conn_s']} µs per connection-second)"
                     if "proxy_cpu_us_per_conn_s" in phase else ""))
    if "proxy_rss_mib" in phase:
        table.row("proxy RSS", f"{phase['proxy_rss_mib']} MiB  "
                  f"({phase['proxy_rss_kib_per_conn_total']:,.2f} KiB / conn, whole process)")


def _phase_title(table: _Table, direction: str, phase: PhaseReport, who: str,
                 per_key: str) -> None:
    """A message phase's first line: a burst's size, or a paced phase's rate."""
    if per_key in phase:
        table.line(f"{direction} burst  ({phase[who]:,} {who}, {phase[per_key]} msgs each)")
    else:
        table.line(f"paced {direction}  ({phase[who]:,} {who}, "
                   f"{phase['rate']}/s for {phase['duration']} s)")


def _downstream_rows(table: _Table, kind: str, phase: PhaseReport) -> None:
    _phase_title(table, "downstream", phase, "sessions", "per_session")
    if "sent" not in phase:
        return
    table.row("delivered / sent", f"{format_value(phase['delivered'])} / "
              f"{format_value(phase['sent'])}   lost {format_value(phase['lost'])}"
              + (f"  duplicates {phase['duplicates']}" if phase["duplicates"] else ""))
    if kind == "down":
        table.row("publish rate", f"{format_value(phase.get('publish_rate_per_s'))} /s")
        table.row("delivery rate", f"{format_value(phase.get('delivery_rate_per_s'))} /s")
    else:
        table.row("achieved rate", f"{format_value(phase.get('achieved_rate_per_s'))} /s"
                  f"   (publisher lag max {phase.get('publisher_max_lag_ms')} ms)")
    table.row("latency", format_latency(phase["latency_ms"]))
    table.cpu_rows(phase, "msg")


def _upstream_rows(table: _Table, kind: str, phase: PhaseReport) -> None:
    _phase_title(table, "upstream", phase, "clients", "per_client")
    if "sent" in phase:
        table.row("arrived / sent", f"{format_value(phase['arrived'])} / "
                  f"{format_value(phase['sent'])}   lost {format_value(phase['lost'])}")
        table.row("rate", f"{format_value(phase.get('rate_per_s'))} /s"
                  + (f"   (sender lag max {phase.get('sender_max_lag_ms')} ms)"
                     if kind == "uppaced" else ""))
        table.row("latency", format_latency(phase["latency_ms"]))
        table.cpu_rows(phase, "msg")


def format_table(result: RunResult) -> str:
    table = _Table()
    config = result["config"]
    table.line(f"wsproxy load test  run {result['run_id']}  {result['url']}"
               f"  redis {result['redis_url']}")
    table.line(f"  clients {config['clients']}  concurrency {config['concurrency']}"
               f"  procs {config['procs']}  publishers {config['publishers']}"
               f"  size {config['size']} B{'  binary' if config['binary'] else ''}")
    phases = result["phases"]
    if "connect" in phases:
        _connect_rows(table, phases["connect"])
    if "idle" in phases:
        _idle_rows(table, phases["idle"])
    for kind in ("down", "paced"):
        if kind in phases:
            _downstream_rows(table, kind, phases[kind])
    for kind in ("up", "uppaced"):
        if kind in phases:
            _upstream_rows(table, kind, phases[kind])
    close = result["close"]
    table.line(f"close: {close.get('clean', 0):,} clean, {close.get('no_close_frame', 0):,}"
               f" without close frame, {close.get('timed_out', 0):,} timed out;"
               f" dropped during run {close.get('dropped', 0):,}")
    table.line("RESULT: " + ("OK" if result["ok"] else "FAIL"))
    for problem in result["problems"]:
        table.line("  - " + problem)
    return "\n".join(table.lines)
