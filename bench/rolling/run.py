"""
One run of the benchmark (one mode): the servers, the load, the rolling
deploy under it, and the verdict.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterable
from pathlib import Path

from bench.errors import Fatal
from bench.servers import LOOPBACK, RedisServer, wait_for_functions
from bench.resume.children import Children
from bench.resume.publisher import Paced, Prime, Published
from bench.resume.report import Console, Report, latency_ms, merge_counts
from bench.resume.sessions import authorize, make_sessions
from bench.resume.workers import (CONNECT_FAILURES, DELIVERED, INCOMPLETE, OPEN, RECONNECTS,
                                  CloseAll, Closed, Collect)

from .backend import Backend
from .clients import (ROLLING_COUNTERS, UP_ACKED, UP_PRODUCED, RollingConfig, RollingReport,
                      StartUp, UpStarted, rolling_worker_main)
from .deploy import Containers, HAProxy, Stopped
from .options import Options

TOKEN_TTL = 6 * 3600


def run_mode(options: Options, mode: str, workdir: Path, prefix: str,
             console: Console) -> Report:
    workdir.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(workdir, options.redis_server)
    containers = Containers(options.image, {
        "REDIS_URL": redis.url,
        "RESUME": "true",
        "HISTORY_MAX_LENGTH": str(options.history_max_length),
        "HISTORY_MAX_AGE_SECS": str(options.history_max_age),
        "UPSTREAM": "stream",
        "UPSTREAM_PARTITIONS": str(options.partitions),
        "SHUTDOWN_DRAIN_SECS": str(options.drain),
        "SHUTDOWN_GRACE_PERIOD_SECS": str(options.grace),
        "SHUTDOWN_CLOSE_DELAY_SECS": str(options.close_delay),
        "WORKERS": "1",
        "LOG_LEVEL": "info",
    }, options.containers, workdir, prefix)
    haproxy: HAProxy | None = None
    backend: Backend | None = None
    children: Children | None = None
    try:
        for slot in range(options.containers):
            containers.start(slot)
        for slot in range(options.containers):
            containers.wait_ready(slot)
        haproxy = HAProxy(containers.ports, workdir, options.haproxy, options.lb_retry)
        for slot in range(options.containers):
            haproxy.wait_up(slot)
        wait_for_functions(redis.client)
        backend = Backend(redis.url, options.clients, options.partitions)
        specs = make_sessions("roll", options.clients)
        authorize(redis.client, specs, TOKEN_TTL)
        config = RollingConfig(LOOPBACK, (haproxy.port,), options.agent, True,
                               options.connect_timeout, options.concurrency,
                               options.reconnect_max, options.retry_max, options.seed,
                               options.up_rate, options.size)
        children = Children(specs, options.procs, config, redis.url, rolling_worker_main,
                            ROLLING_COUNTERS)
        session_ids = tuple(s.session_id for s in specs)
        children.publish(Prime(session_ids, options.size))
        if children.published(120) is None:
            raise Fatal("priming the sessions' histories took more than 120 s")
        children.connect(options.clients, "")
        spread = [containers.active_connections(s) for s in range(options.containers)]
        console.progress(f"[{mode}] {options.clients} clients connected through HAProxy: "
                         f"{spread} per container", force=True)
        duration = options.publish_duration
        children.publish(Paced(session_ids, "resume", options.down_rate * options.clients,
                               duration, options.size))
        children.ask_workers(StartUp(duration), UpStarted, 30)
        started = time.monotonic()
        steps, deploy_s = _deploy(options, mode, containers, haproxy, children, started,
                                  console)
        deploy_ended_at = time.monotonic() - started
        published = _wait_published(children, duration, console)
        settle_s = _settle(options, children, backend, published, console)
        reports = children.ask_workers(Collect(published.sent), RollingReport, 300)
        spread_after = [containers.active_connections(s) for s in range(options.containers)]
        lb = haproxy.counters()
        children.ask_workers(CloseAll(5), Closed, 60)
        backend.stop()
        return _report(options, mode, steps, deploy_s, deploy_ended_at, duration, published,
                       reports, backend, settle_s, spread, spread_after, lb)
    finally:
        if children is not None:
            children.shutdown()
        if backend is not None:
            backend.stop()
        if haproxy is not None:
            haproxy.stop()
        containers.remove_all()
        redis.stop()


def _deploy(options: Options, mode: str, containers: Containers, haproxy: HAProxy,
            children: Children, started: float, console: Console) -> tuple[list[Report], float]:
    """The rolling update, one container at a time, after the warm-up."""
    while time.monotonic() - started < options.warmup:
        _progress(console, mode, children, started)
        time.sleep(0.2)
    steps: list[Report] = []
    deploy_started = time.monotonic()
    for slot in range(options.containers):
        at = time.monotonic() - started
        stopped: Stopped = containers.stop(slot, mode == "kill", options.stop_timeout)
        new_name = containers.start(slot)
        ready_s = containers.wait_ready(slot)
        up_s = haproxy.wait_up(slot)
        steps.append({"slot": slot, "at_s": round(at, 1), "old": stopped.name,
                      "signal": stopped.signal, "connections": stopped.connections,
                      "exit_code": stopped.exit_code, "stop_s": stopped.stop_s,
                      "shutdown_complete": stopped.shutdown_complete, "new": new_name,
                      "ready_s": round(ready_s, 2), "haproxy_up_s": round(up_s, 2)})
        console.progress(
            f"[{mode}] t={at:.1f}s {stopped.signal} {stopped.name} ({stopped.connections} "
            f"connections): exit {stopped.exit_code} after {stopped.stop_s:.2f}s"
            f"{', shutdown complete' if stopped.shutdown_complete else ''}; {new_name} ready "
            f"after {ready_s:.2f}s, up in HAProxy {up_s:.2f}s later", force=True)
        if slot < options.containers - 1:
            until = time.monotonic() + options.pause
            while time.monotonic() < until:
                _progress(console, mode, children, started)
                time.sleep(0.2)
    return steps, time.monotonic() - deploy_started


def _progress(console: Console, mode: str, children: Children, started: float) -> None:
    counters = children.counters
    console.progress(
        f"[{mode}] t={time.monotonic() - started:.0f}s down {counters.published_total()} "
        f"published, {counters.worker_total(DELIVERED)} delivered; up "
        f"{counters.worker_total(UP_PRODUCED)} produced, {counters.worker_total(UP_ACKED)} "
        f"acked; open {counters.worker_total(OPEN)}, reconnects "
        f"{counters.worker_total(RECONNECTS)}, failed attempts "
        f"{counters.worker_total(CONNECT_FAILURES)}, incomplete "
        f"{counters.worker_total(INCOMPLETE)}")


def _wait_published(children: Children, duration: float, console: Console) -> Published:
    deadline = time.monotonic() + duration + 120
    while time.monotonic() < deadline:
        published = children.published(1.0)
        if published is not None:
            return published
    raise Fatal("the publisher did not finish")


def _settle(options: Options, children: Children, backend: Backend, published: Published,
            console: Console) -> float:
    """
    Until every message arrived both ways and every client is connected; or
    every client is connected and nothing moved for --settle seconds; or
    --settle-max seconds.
    """
    counters = children.counters
    sent = sum(published.sent)
    start = time.monotonic()
    last_change = start
    last: tuple[int, ...] = ()
    while True:
        now = time.monotonic()
        state = (counters.worker_total(DELIVERED), counters.worker_total(UP_ACKED),
                 backend.total_handled)
        produced = counters.worker_total(UP_PRODUCED)
        open_now = counters.worker_total(OPEN)
        if state != last:
            last, last_change = state, now
        done = state[0] >= sent and state[1] >= produced and state[2] >= produced
        if open_now >= options.clients and (done or now - last_change >= options.settle):
            break
        if now - start >= options.settle_max:
            console.warn(f"gave up waiting after {options.settle_max:.0f}s: down "
                         f"{state[0]}/{sent}, up acked {state[1]}/{produced}, handled "
                         f"{state[2]}/{produced}, {open_now}/{options.clients} connected")
            break
        time.sleep(0.1)
    return time.monotonic() - start


def _ms(values: Iterable[float]) -> Report:
    merged = sorted(values)
    if not merged:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}

    def at(p: float) -> float:
        return round(merged[min(len(merged) - 1, int(len(merged) * p / 100))], 1)

    return {"p50_ms": at(50), "p99_ms": at(99), "max_ms": round(merged[-1], 1)}


def _report(options: Options, mode: str, steps: list[Report], deploy_s: float,
            deploy_ended_at: float, duration: float, published: Published,
            reports: list[RollingReport], backend: Backend, settle_s: float,
            spread: list[int | None], spread_after: list[int | None],
            lb: dict[str, int]) -> Report:
    down = [r.down for r in reports]
    total = {name: sum(getattr(r, name) for r in down) for name in (
        "open", "delivered", "missing", "duplicates", "reordered", "unexpected", "misrouted",
        "corrupt", "position_mismatches", "incomplete", "replayed", "drops", "reconnects")}
    sent = sum(published.sent)
    produced = [0] * options.clients
    for r in reports:
        for index, number in zip(r.indexes, r.produced):
            produced[index] = number
    up_lost = up_unexpected = 0
    lost_examples: list[tuple[int, list[int]]] = []
    for index, ledger in enumerate(backend.handled):
        missing = ledger.missing(produced[index])
        up_lost += len(missing)
        if missing and len(lost_examples) < 5:
            lost_examples.append((index, missing[:10]))
        up_unexpected += ledger.unexpected(produced[index])
    reconnect_ms: array[float] = array("d")
    after_jitter_ms: array[float] = array("d")
    for r in reports:
        reconnect_ms.extend(r.reconnect_ms)
        after_jitter_ms.extend(r.after_jitter_ms)
    up = {
        "produced": sum(produced),
        "acked": sum(r.acks for r in reports) - sum(r.acks_unknown for r in reports),
        "unacked_at_end": sum(r.unacked for r in reports),
        "resent": sum(r.resent for r in reports),
        "nacks": merge_counts(r.nacks for r in reports),
        "acks_unknown": sum(r.acks_unknown for r in reports),
        "acks_out_of_order": sum(r.acks_out_of_order for r in reports),
        "stream_entries": sum(len(l.seen) + l.duplicates for l in backend.raw),
        "duplicates_before_dedup": sum(l.duplicates for l in backend.raw),
        "reordered_before_dedup": sum(l.reordered for l in backend.raw),
        "copies_dropped": backend.copies_dropped,
        "handled": backend.total_handled,
        "lost": up_lost,
        "duplicates": sum(l.duplicates for l in backend.handled),
        "reordered": sum(l.reordered for l in backend.handled),
        "unexpected": up_unexpected,
        "corrupt": backend.corrupt,
        "backend_errors": backend.errors,
        "lost_examples": lost_examples,
    }
    up.update({f"latency_{k}": v for k, v in latency_ms([backend.latencies]).items()})
    sessions_reconnected = sum(r.sessions_reconnected for r in reports)
    report: Report = {
        "mode": mode,
        "clients": options.clients,
        "containers": options.containers,
        "deploy_s": round(deploy_s, 1),
        "exit_codes": [s["exit_code"] for s in steps],
        "shutdown_complete": [s["shutdown_complete"] for s in steps],
        "down_sent": sent,
        "down_delivered": total["delivered"],
        "down_lost": total["missing"],
        "down_duplicates": total["duplicates"],
        "down_reordered": total["reordered"],
        "down_incomplete": total["incomplete"],
        "up_produced": up["produced"],
        "up_handled": up["handled"],
        "up_lost": up["lost"],
        "up_duplicates_before_dedup": up["duplicates_before_dedup"],
        "up_duplicates": up["duplicates"],
        "up_reordered": up["reordered"],
        "up_resent": up["resent"],
        "reconnects": len(reconnect_ms),
        "sessions_reconnected": sessions_reconnected,
        "close_codes": merge_counts(r.close_codes for r in reports),
        "connect_failures": merge_counts(r.down.connect_failures for r in reports),
        "haproxy": lb,
    }
    report.update({f"reconnect_{k}": v for k, v in _ms(reconnect_ms).items()})
    # the same less each client's random wait (U(0, --reconnect-max)) before its first attempt
    report.update({f"reconnect_after_jitter_{k}": v for k, v in _ms(after_jitter_ms).items()})
    down_latency = latency_ms(r.latencies for r in down)
    report.update({
        "down_latency_p50_ms": down_latency["p50_ms"],
        "down_latency_p99_ms": down_latency["p99_ms"],
        "down_latency_max_ms": down_latency["max_ms"],
        "down_replayed": total["replayed"],
        "down_other": {k: total[k] for k in ("unexpected", "misrouted", "corrupt",
                                             "position_mismatches")},
        "incomplete_reasons": merge_counts(r.down.incomplete_reasons for r in reports),
        "up": up,
        "open_at_end": total["open"],
        "connections_before": spread,
        "connections_after": spread_after,
        "steps": steps,
        "traffic_s": duration,
        "deploy_ended_at_s": round(deploy_ended_at, 1),
        "settle_s": round(settle_s, 1),
        "publisher_max_lag_ms": published.max_lag_ms,
        "down_rate_per_client": options.down_rate,
        "up_rate_per_client": options.up_rate,
        "drain_s": options.drain,
        "close_delay_s": options.close_delay,
        "grace_s": options.grace,
        "stop_timeout_s": options.stop_timeout,
        "lb_retry": options.lb_retry,
    })
    if deploy_ended_at > duration:
        report["warning"] = "the deploy outlasted the traffic: raise --duration"
    intact = (all(total[k] == 0 for k in ("missing", "duplicates", "reordered", "incomplete",
                                          "unexpected", "misrouted", "corrupt",
                                          "position_mismatches"))
              and total["delivered"] == sent
              and all(up[k] == 0 for k in ("lost", "duplicates", "reordered", "unexpected",
                                            "corrupt", "unacked_at_end"))
              and up["handled"] == up["produced"])
    report["intact"] = intact
    report["ok"] = (intact and sessions_reconnected == options.clients
                    and total["open"] == options.clients
                    and (mode == "kill" or all(
                        s["exit_code"] == 0 and s["shutdown_complete"] for s in steps)))
    return report
