"""
C{python -m bench.resume cost}: what recovery costs, measured side by side
in one run against one build. The same sessions and messages, once plain
(clients without C{?resume=}, C{PUBLISH session:S:down}) and once resumable
(C{?resume=} clients, C{FCALL wsproxy_publish}), each against a fresh
proxy process (C{RESUME=true} both times) and the same Redis; the rounds
alternate which goes first.

Per measurement: proxy RSS (C{/proc}) and Redis C{used_memory} before and
after every session connected and sat idle (per connection); then
C{--messages} per session (a burst, or paced at C{--rate}), with the
proxy's CPU (user+sys from C{/proc/PID/stat}) per delivered message and
Redis's (C{INFO cpu} used_cpu_sys+used_cpu_user) per message published,
from just before the first message until the last one arrived. (Paced at
a low rate, the figures are mostly the cost of waking up per message and
of idling: compare at rates that keep the proxy busy.)
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.servers import LOOPBACK, ProxyProcess, RedisServer, wait_for_functions

from .children import Children
from .options import CostOptions
from .publisher import Burst, Mode, Paced
from .report import Console, Report, latency_ms
from .sessions import authorize, make_sessions
from .workers import DELIVERED, CloseAll, Closed, Collect, WorkerConfig, WorkerReport

TOKEN_TTL = 6 * 3600

# the figures compared, resume / plain
COMPARED = ("proxy_us_per_msg", "redis_us_per_msg", "rss_kib_per_conn", "redis_kib_per_conn")

SUMMARY_KEYS = ("sessions", "messages_per_session", "rate", "plain", "resume", "live", "ratio",
                "live_ratio", "round_ratios", "ok")


def run_cost(options: CostOptions, workdir: Path, console: Console) -> Report:
    common = options.common
    redis = RedisServer(workdir, common.redis_server)
    rows: list[Report] = []
    try:
        for round_number in range(options.rounds):
            # each round starts with another mode: none is always first
            shift = round_number % len(options.modes)
            for mode in options.modes[shift:] + options.modes[:shift]:
                row = _measure(options, redis, workdir, mode, round_number)
                console.progress(f"round {round_number} {mode}: " + ", ".join(
                    f"{k} {row[k]}" for k in COMPARED), force=True)
                rows.append(row)
    finally:
        redis.stop()
    return _report(options, rows)


def _measure(options: CostOptions, redis: RedisServer, workdir: Path, mode: Mode,
             round_number: int) -> Report:
    common = options.common
    proxy = ProxyProcess(f"{mode}{round_number}", redis.url, workdir, {"RESUME": "true"})
    children: Children | None = None
    try:
        proxy.start()
        proxy.wait_healthy()
        wait_for_functions(redis.client)
        specs = make_sessions(f"rc{round_number}{mode[0]}", common.sessions)
        authorize(redis.client, specs, TOKEN_TTL)
        config = WorkerConfig(LOOPBACK, (proxy.port,), common.agent, mode != "plain",
                              common.connect_timeout, common.concurrency, 0.0, 0.0, common.seed)
        children = Children(specs, common.procs, config, redis.url)
        time.sleep(0.5)
        rss_before = proxy.rss()
        memory_before = redis.used_memory()
        opened = children.connect(common.sessions, f"{mode}: ")
        time.sleep(options.idle_settle)
        rss_idle = proxy.rss()
        memory_idle = redis.used_memory()

        session_ids = tuple(s.session_id for s in specs)
        proxy_cpu = proxy.cpu_seconds()
        redis_cpu = redis.cpu_seconds()
        started = time.monotonic()
        if options.rate:
            duration = common.sessions * options.messages / options.rate
            children.publish(Paced(session_ids, mode, options.rate, duration, common.size))
        else:
            children.publish(Burst(session_ids, mode, options.messages, common.size))
        published = None
        while published is None:
            published = children.published(0.05)
        sent = sum(published.sent)
        arrived_at = _wait_for(children, sent, options.settle_max)
        proxy_cpu = proxy.cpu_seconds() - proxy_cpu
        redis_cpu = redis.cpu_seconds() - redis_cpu
        memory_after = redis.used_memory()
        reports = children.ask_workers(Collect(published.sent), WorkerReport, 300)
        children.ask_workers(CloseAll(5), Closed, 60)
    finally:
        if children is not None:
            children.shutdown()
        proxy.stop()
    delivered = sum(r.delivered for r in reports)
    row: Report = {
        "mode": mode,
        "round": round_number,
        "sent": sent,
        "delivered": delivered,
        "gaps": sum(r.missing for r in reports),
        "duplicates": sum(r.duplicates for r in reports),
        "reordered": sum(r.reordered for r in reports),
        "proxy_us_per_msg": round(proxy_cpu * 1e6 / max(delivered, 1), 2),
        "redis_us_per_msg": round(redis_cpu * 1e6 / max(sent, 1), 2),
        "rss_kib_per_conn": round((rss_idle - rss_before) / 1024 / opened, 2),
        "redis_kib_per_conn": round((memory_idle - memory_before) / 1024 / opened, 2),
        "redis_history_bytes_per_msg": round((memory_after - memory_idle) / max(sent, 1), 1),
        "proxy_cpu_s": round(proxy_cpu, 3),
        "redis_cpu_s": round(redis_cpu, 3),
        "msgs_per_s": round(delivered / max(arrived_at - started, 1e-9)),
        # fractions of one core: which of the two was the bottleneck
        "proxy_cpu_util": round(proxy_cpu / max(arrived_at - started, 1e-9), 2),
        "redis_cpu_util": round(redis_cpu / max(arrived_at - started, 1e-9), 2),
        "proxy_rss_mib_idle": round(rss_idle / 2**20, 1),
    }
    row.update(latency_ms(r.latencies for r in reports))
    return row


def _wait_for(children: Children, sent: int, settle_max: float) -> float:
    """When the last of C{sent} messages arrived (or C{settle_max} seconds passed)."""
    deadline = time.monotonic() + settle_max
    while time.monotonic() < deadline:
        if children.counters.worker_total(DELIVERED) >= sent:
            break
        time.sleep(0.01)
    return time.monotonic()


def _report(options: CostOptions, rows: list[Report]) -> Report:
    def median(mode: str, key: str) -> float:
        values = [_number(row[key]) for row in rows if row["mode"] == mode]
        return float(statistics.median(values))

    def ratios(mode: str) -> Report:
        return {key: _ratio(median(mode, key), median("plain", key)) for key in COMPARED}

    report: Report = {
        "benchmark": "resume-cost",
        "sessions": options.common.sessions,
        "messages_per_session": options.messages,
        "rate": options.rate or "burst",
        "size": options.common.size,
        "rounds": options.rounds,
    }
    for mode in options.modes:
        report[mode] = {key: round(median(mode, key), 2) for key in (
            *COMPARED, "redis_history_bytes_per_msg", "msgs_per_s", "proxy_cpu_util",
            "redis_cpu_util", "p50_ms", "p99_ms")}
    if "plain" in options.modes:
        round_ratios = []
        for round_number in range(options.rounds):
            measured = {str(row["mode"]): row for row in rows if row["round"] == round_number}
            plain = measured["plain"]
            round_ratios.append({
                f"{mode}_{key}": _ratio(_number(row[key]), _number(plain[key]))
                for mode, row in measured.items() if mode != "plain"
                for key in ("proxy_us_per_msg", "redis_us_per_msg")})
        for mode in options.modes:
            if mode != "plain":
                report["ratio" if mode == "resume" else f"{mode}_ratio"] = ratios(mode)
        report["round_ratios"] = round_ratios
    ratio = report.get("ratio")
    if isinstance(ratio, dict):
        proxy_ratio = ratio["proxy_us_per_msg"]
        report["proxy_cpu_goal_1_5x_met"] = proxy_ratio is not None and proxy_ratio <= 1.5
    report["runs"] = rows
    report["ok"] = all(row["gaps"] == 0 and row["duplicates"] == 0 and row["reordered"] == 0
                       and row["delivered"] == row["sent"] for row in rows)
    return report


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 2) if denominator > 0 else None
