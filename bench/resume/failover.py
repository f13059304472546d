"""
C{python -m bench.resume failover}: resuming sessions receive a steady
numbered stream while the proxies they are connected to are killed and
restarted one at a time; at the end, every session's numbers are checked.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.errors import Fatal
from bench.servers import LOOPBACK, ProxyProcess, RedisServer, wait_for_functions

from .children import Children
from .options import FailoverOptions
from .publisher import Paced, Prime, Published
from .report import Console, Report, latency_ms, merge_counts
from .sessions import authorize, make_sessions
from .workers import (CONNECT_FAILURES, DELIVERED, INCOMPLETE, OPEN, RECONNECTS, CloseAll,
                      Closed, Collect, WorkerConfig, WorkerReport)

# tokens outlive any run
TOKEN_TTL = 6 * 3600

# what run.sh shows on stderr
SUMMARY_KEYS = ("sessions", "proxies", "kills", "sent", "delivered", "gaps", "duplicates",
                "reordered", "incomplete", "p50_ms", "p99_ms", "max_ms", "live_p99_ms",
                "drops", "reconnects", "replayed", "connect_failures", "ok")


def run_failover(options: FailoverOptions, workdir: Path, console: Console) -> Report:
    common = options.common
    redis = RedisServer(workdir, common.redis_server)
    proxies = [ProxyProcess(f"proxy{i}", redis.url, workdir, {
        "RESUME": "true",
        "HISTORY_MAX_LENGTH": str(options.history_max_length),
        "HISTORY_MAX_AGE_SECS": str(options.history_max_age),
    }) for i in range(options.proxies)]
    children: Children | None = None
    try:
        for proxy in proxies:
            proxy.start()
        for proxy in proxies:
            proxy.wait_healthy()
        wait_for_functions(redis.client)
        specs = make_sessions("rb", common.sessions)
        authorize(redis.client, specs, TOKEN_TTL)
        config = WorkerConfig(LOOPBACK, tuple(p.port for p in proxies), common.agent, True,
                              common.connect_timeout, common.concurrency,
                              options.reconnect_max, options.retry_max, common.seed)
        children = Children(specs, common.procs, config, redis.url)
        session_ids = tuple(s.session_id for s in specs)
        # every session gets a history before its client connects: a client
        # that has no position yet could not ask for what it missed
        children.publish(Prime(session_ids, common.size))
        if children.published(120) is None:
            raise Fatal("priming the sessions' histories took more than 120 s")
        opened = children.connect(common.sessions, "")
        console.progress(f"{opened} sessions connected to {len(proxies)} proxies", force=True)
        kills, published = _publish_and_kill(options, children, proxies, session_ids, console)
        sent = sum(published.sent)
        settle_s = _settle(options, children, sent, console)
        reports = children.ask_workers(Collect(published.sent), WorkerReport, 300)
        children.ask_workers(CloseAll(5), Closed, 60)
        return _report(options, kills, published, reports, settle_s)
    finally:
        if children is not None:
            children.shutdown()
        for proxy in proxies:
            proxy.stop()
        redis.stop()


def _publish_and_kill(options: FailoverOptions, children: Children, proxies: list[ProxyProcess],
                      session_ids: tuple[str, ...],
                      console: Console) -> tuple[list[Report], Published]:
    """
    Publishes the stream; meanwhile kills a proxy every --kill-every seconds
    and starts it again --down seconds later (the next kill waits until it
    is healthy again: one at a time).
    """
    common = options.common
    counters = children.counters
    children.publish(Paced(session_ids, "resume", options.rate, options.duration, common.size))
    start = time.monotonic()
    next_kill = start + options.kill_every
    kills: list[Report] = []
    published: Published | None = None
    while published is None:
        now = time.monotonic()
        if now >= next_kill and now < start + options.duration:
            proxy = proxies[len(kills) % len(proxies)]
            connections = _active_connections(proxy)
            at = now - start
            proxy.kill()
            time.sleep(options.down)
            proxy.start()
            restart_s = proxy.wait_healthy()
            kills.append({"proxy": proxy.name, "at_s": round(at, 1),
                          "connections": connections, "restart_s": round(restart_s, 2)})
            console.progress(f"t={at:.1f}s killed {proxy.name} ({connections} connections), "
                             f"healthy again after {options.down:.1f}+{restart_s:.2f}s",
                             force=True)
            next_kill = max(next_kill + options.kill_every, time.monotonic())
        console.progress(
            f"t={now - start:.0f}s published {counters.published_total()} "
            f"delivered {counters.worker_total(DELIVERED)} open {counters.worker_total(OPEN)} "
            f"reconnects {counters.worker_total(RECONNECTS)} "
            f"failed attempts {counters.worker_total(CONNECT_FAILURES)} "
            f"incomplete {counters.worker_total(INCOMPLETE)}")
        published = children.published(0.1)
    return kills, published


def _active_connections(proxy: ProxyProcess) -> int | None:
    """The victim's open connections just before the kill (its /health says)."""
    count = (proxy.health() or {}).get("active_connections")
    return count if isinstance(count, int) else None


def _settle(options: FailoverOptions, children: Children, sent: int, console: Console) -> float:
    """
    Waits until every message arrived and every session is connected; or
    until every session is connected and nothing arrived for --settle
    seconds; or --settle-max seconds. Returns how long it waited.
    """
    counters = children.counters
    sessions = options.common.sessions
    start = time.monotonic()
    last_change = start
    last = -1
    while True:
        now = time.monotonic()
        delivered = counters.worker_total(DELIVERED)
        open_now = counters.worker_total(OPEN)
        if delivered != last:
            last, last_change = delivered, now
        if open_now >= sessions and (delivered >= sent or now - last_change >= options.settle):
            break
        if now - start >= options.settle_max:
            console.warn(f"gave up waiting after {options.settle_max:.0f}s: "
                         f"{delivered}/{sent} delivered, {open_now}/{sessions} connected")
            break
        console.progress(f"settling: {delivered}/{sent} delivered, {open_now} open")
        time.sleep(0.1)
    return time.monotonic() - start


def _report(options: FailoverOptions, kills: list[Report], published: Published,
            reports: list[WorkerReport], settle_s: float) -> Report:
    common = options.common
    total = {name: sum(getattr(r, name) for r in reports) for name in (
        "open", "delivered", "missing", "gap_sessions", "duplicates", "reordered", "unexpected",
        "misrouted", "corrupt", "position_mismatches", "epoch_changes", "recoveries",
        "incomplete", "replayed", "drops", "reconnects")}
    sent = sum(published.sent)
    report: Report = {
        "benchmark": "resume-failover",
        "sessions": common.sessions,
        "proxies": options.proxies,
        "rate": options.rate,
        "duration_s": options.duration,
        "kills": len(kills),
        "sent": sent,
        "delivered": total["delivered"],
        "gaps": total["missing"],
        "duplicates": total["duplicates"],
        "reordered": total["reordered"],
        "incomplete": total["incomplete"],
    }
    report.update(latency_ms(r.latencies for r in reports))
    report.update(latency_ms((r.live_latencies for r in reports), "live_"))
    report.update({
        "gap_sessions": total["gap_sessions"],
        "incomplete_reasons": merge_counts(r.incomplete_reasons for r in reports),
        "drops": total["drops"],
        "reconnects": total["reconnects"],
        "recoveries": total["recoveries"],
        "replayed": total["replayed"],
        "connect_failures": merge_counts(r.connect_failures for r in reports),
        "open_at_end": total["open"],
        "unexpected": total["unexpected"],
        "misrouted": total["misrouted"],
        "corrupt": total["corrupt"],
        "position_mismatches": total["position_mismatches"],
        "epoch_changes": total["epoch_changes"],
        "publish_s": round((published.ended_ns - published.started_ns) / 1e9, 2),
        "publisher_max_lag_ms": published.max_lag_ms,
        "settle_s": round(settle_s, 2),
        "kill_log": kills,
        "reconnect_max_s": options.reconnect_max,
        "down_s": options.down,
        "gap_examples": [e for r in reports for e in r.gap_examples][:10],
    })
    report["ok"] = (all(total[k] == 0 for k in (
        "missing", "duplicates", "reordered", "incomplete", "unexpected", "misrouted",
        "corrupt", "position_mismatches")) and total["delivered"] == sent
        and total["open"] == common.sessions)
    return report
