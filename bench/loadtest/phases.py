"""
The phases of a run, in order: connect, then any of down (burst), paced,
up (burst) and uppaced, then close. Each one tells the child processes what to do, watches
the shared counters until the phase has settled, collects the children's
results and turns them into the phase's figures and problems.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bench.children import ChildFailed, Counters, PendingReplies, expect, gather
from bench.errors import Fatal

from .messages import PHASE_TAGS
from .options import Options
from .pool import ChildProcesses
from .procstat import (CpuSample, Sampler, add_cpu_cost, add_cpu_load, cpu_seconds,
                       listen_overflows, rss_bytes, runnable)
from .redis_io import Arrivals, Burst, Paced, Published, StopSubscriber, Subscribe, Subscribed
from .report import Console, PhaseReport, latency_summary
from .target import Sessions
from .workers import (DELIVERED, DROPPED, FAILED, OPENED, CloseAll, CloseResult, Collect,
                      Connect, ConnectResult, Deliveries, PhaseStarted, SendPaced, SendUpstream,
                      StartPhase, UpstreamSent)

SendT = TypeVar("SendT")
ReplyT = TypeVar("ReplyT")

# a proxy burning more than this fraction of a core, or a pipeline with a process
# runnable in more than this fraction of the samples, is still working through a backlog
PROXY_BUSY = 0.3
# the phases that send as fast as they can (the others are paced)
BURSTS = ("down", "up")
# a paced publisher this far behind schedule is worth a warning
PACED_LAG_WARNING_MS = 50


@dataclass
class Run:
    """Everything the phases share."""

    options: Options
    console: Console
    proxy_is_local: bool
    sessions: Sessions
    children: ChildProcesses
    counters: Counters
    sampler: Sampler
    problems: list[str] = field(default_factory=list)

    def add_cpu_figures(self, report: PhaseReport, start: CpuSample, active_end: CpuSample,
                        end: CpuSample, per: str, count: int) -> None:
        """
        CPU use while the phase was active, and the proxy's and Redis's CPU
        cost per message or connection up to its end.
        """
        add_cpu_load(report, self.sampler, start, active_end, self.options.saturation)
        add_cpu_cost(report, self.sampler, start, end, per, count)


def _compare(expected: dict[int, int], received: Callable[[int], int]) -> tuple[int, int, int]:
    """(lost, duplicates, sessions with loss) of messages per session."""
    lost = sum(max(0, sent - received(i)) for i, sent in expected.items())
    duplicates = sum(max(0, received(i) - sent) for i, sent in expected.items())
    sessions_with_loss = sum(1 for i, sent in expected.items() if received(i) < sent)
    return lost, duplicates, sessions_with_loss


# -- connect


def connect(run: Run) -> tuple[PhaseReport, int]:
    """Opens every client's connection; the report and how many opened."""
    options = run.options
    report: PhaseReport = {"clients": options.clients, "concurrency": options.concurrency}
    rss_before = rss_bytes(options.pid) if options.pid else None
    overflows_before = listen_overflows() if run.proxy_is_local else None
    start = run.sampler.sample()
    started = time.monotonic()

    def show_progress(elapsed: float, force: bool = False) -> None:
        opened, failed = run.counters.worker_total(OPENED), run.counters.worker_total(FAILED)
        run.console.progress(f"[connect] open {opened}/{options.clients}  failed {failed}"
                             f"  {elapsed:5.1f}s", force)

    timeout = (options.connect_timeout
               + options.clients / max(1.0, options.concurrency) * options.connect_timeout + 60)
    results = run.children.ask_workers(Connect(), ConnectResult, timeout,
                                       lambda: show_progress(time.monotonic() - started),
                                       "worker connect results")
    seconds = time.monotonic() - started
    end = run.sampler.sample()
    show_progress(seconds, force=True)
    run.console.done()
    rss_after = rss_bytes(options.pid) if options.pid else None
    overflows_after = listen_overflows() if run.proxy_is_local else None

    opened = sum(r.opened for r in results)
    failed = sum(r.failed for r in results)
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    latencies: array[int] = array("q")
    for result in results:
        failures.update(result.failures)
        for reason, session_id in result.examples.items():
            examples.setdefault(reason, session_id)
        latencies.extend(result.latencies)
    report.update({"ok": opened, "failed": failed, "failures": dict(failures),
                   "seconds": round(seconds, 3),
                   "rate_per_s": round(opened / seconds, 1) if seconds > 0 else None,
                   "latency_ms": latency_summary(latencies)})
    if overflows_before is not None and overflows_after is not None:
        _check_listen_overflows(run, report, overflows_after - overflows_before)
    if failed:
        some = ", ".join(f"{reason} (e.g. {sid})" for reason, sid in list(examples.items())[:3])
        run.problems.append(f"connect: {failed} of {options.clients} connections failed: {some}")
    run.add_cpu_figures(report, start, end, end, "conn", opened)
    if rss_before is not None and rss_after is not None:
        report["proxy_rss_mib_before"] = round(rss_before / 2**20, 1)
        report["proxy_rss_mib_after"] = round(rss_after / 2**20, 1)
        if opened:
            report["proxy_rss_kib_per_conn"] = round((rss_after - rss_before) / 1024 / opened, 2)
    return report, opened


def _check_listen_overflows(run: Run, report: PhaseReport, overflows: int) -> None:
    report["listen_overflows"] = overflows
    if overflows > 0:
        run.console.warn(
            f"connect: the kernel dropped {overflows} SYNs because a "
            "listen backlog was full (host-wide TcpExt ListenOverflows); each costs the "
            "client a ~1 s retry: the proxy's listen backlog is likely too small "
            "for --concurrency")


# -- idle


def idle(run: Run, opened: int) -> PhaseReport:
    """
    Holds every connection open and silent for --idle seconds: what the
    proxy spends on idle connections (heartbeats, timers), its RSS per
    connection at the end, and whether any connection dropped.
    """
    options = run.options
    dropped_before = run.counters.worker_total(DROPPED)
    start = run.sampler.sample()
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < options.idle:
        run.console.progress(f"[idle] {opened} connections  {elapsed:5.1f}s")
        time.sleep(min(1.0, options.idle - elapsed))
    end = run.sampler.sample()
    run.console.done()
    dropped = run.counters.worker_total(DROPPED) - dropped_before
    report: PhaseReport = {"connections": opened, "seconds": round(time.monotonic() - started, 1),
                           "dropped": dropped}
    add_cpu_load(report, run.sampler, start, end, options.saturation)
    proxy_before, proxy_after = start.cpu.get("proxy"), end.cpu.get("proxy")
    if proxy_before is not None and proxy_after is not None and opened:
        seconds = time.monotonic() - started
        report["proxy_cpu_us_per_conn_s"] = round(
            (proxy_after - proxy_before) * 1e6 / opened / seconds, 3)
    rss = rss_bytes(options.pid) if options.pid else None
    if rss is not None and opened:
        report["proxy_rss_mib"] = round(rss / 2**20, 1)
        report["proxy_rss_kib_per_conn_total"] = round(rss / 1024 / opened, 2)
    if dropped:
        run.problems.append(f"idle: {dropped} connections dropped while idle")
    return report


# -- what the message phases share


def start_phase(run: Run, tag: int) -> list[int]:
    """Resets the workers' counters; the indexes of the sessions with an open client."""
    replies = run.children.ask_workers(StartPhase(tag), PhaseStarted, 30)
    return sorted(index for reply in replies for index in reply.open_clients)


def settle(run: Run, pending: PendingReplies[SendT, ReplyT], sent: Callable[[], int],
           arrived: Callable[[], int], label: str, started: float) -> tuple[CpuSample, CpuSample]:
    """
    Waits for a phase to finish: everything arrived, or arrivals stopped for
    ``--settle`` seconds after sending ended (longer while the proxy is still
    busy), or ``--settle-max`` seconds passed since then. Returns CPU samples
    at the last change of the arrival count and at the end.
    """
    options = run.options
    last_count = -1
    last_change = time.monotonic()
    active_end: CpuSample | None = None
    hard_deadline = time.monotonic() + options.phase_timeout
    # (time, proxy CPU seconds, whether a process of the pipeline was runnable)
    # over the last --settle seconds: tells a stalled proxy from an idle one,
    # and a proxy (or Redis, or the tool's readers) starved of CPU by a busy
    # host from one that is done
    pipeline = list(run.sampler.pids.values())
    samples: list[tuple[float, float | None, bool]] = []
    while True:
        now = time.monotonic()
        samples.append((now, cpu_seconds(options.pid) if options.pid else None,
                        runnable(pipeline)))
        while len(samples) > 2 and samples[1][0] <= now - options.settle:
            samples.pop(0)
        count = arrived()
        target = sent()
        busy = pending.busy()
        if count != last_count:
            last_count = count
            last_change = now
            active_end = None
        if active_end is None:
            active_end = run.sampler.sample()
        open_now = run.counters.worker_total(OPENED) - run.counters.worker_total(DROPPED)
        run.console.progress(f"[{label}] conns {open_now}  sent {target}  delivered {count}"
                             f"  {now - started:5.1f}s")
        if not busy and _finished(options, count, target, now, last_change, pending.done_at,
                                  samples):
            break
        if now > hard_deadline:
            run.problems.append(f"{label}: phase timed out after {options.phase_timeout}s")
            break
        pending.wait(0.05 if busy else 0.02)
    end = run.sampler.sample()
    run.console.progress(f"[{label}] sent {sent()}  delivered {arrived()}", force=True)
    run.console.done()
    return (active_end if active_end is not None else end), end


def _finished(options: Options, count: int, target: int, now: float, last_change: float,
              sending_ended: float, samples: list[tuple[float, float | None, bool]]) -> bool:
    """
    Whether a phase whose sending has ended is over: everything arrived, or
    arrivals stopped for --settle (counted from the end of sending; before
    the first arrival, wait the whole --settle-max: a busy proxy may hold
    everything back for a while) while the proxy burnt little CPU and the
    processes of the pipeline were mostly waiting for input, not for a CPU.
    """
    if count >= target:
        return True
    quiet = now - max(last_change, sending_ended)
    if quiet >= options.settle and len(samples) > 1:
        (first_at, first_cpu, _), (_, last_cpu, _) = samples[0], samples[-1]
        if first_cpu is not None and last_cpu is not None and now - first_at > 0:
            if (last_cpu - first_cpu) / (now - first_at) > PROXY_BUSY:
                quiet = 0.0  # still burning CPU: it is working through a backlog
        if sum(1 for _, _, ready in samples if ready) / len(samples) > PROXY_BUSY:
            quiet = 0.0  # still has work, maybe waiting for a core of a busy host
    return (count > 0 and quiet >= options.settle) or now - sending_ended >= options.settle_max


# -- what the message phases share


def _phase_report(options: Options, kind: str, who: str, count: int, per_key: str,
                  per: int) -> PhaseReport:
    """
    A message phase's report so far: how many sessions or clients take
    part, and the burst per session or client (down, up) or the rate and
    duration (paced, uppaced).
    """
    report: PhaseReport = {who: count, "size": options.size}
    if kind in BURSTS:
        report[per_key] = per
    else:
        report["rate"] = options.rate
        report["duration"] = options.duration
    return report


# -- down and paced


def downstream(run: Run, kind: str) -> PhaseReport:
    """The down (burst) or paced phase: publish to the open sessions, count what arrives."""
    options = run.options
    tag = PHASE_TAGS[kind]
    sessions = start_phase(run, tag)
    report = _phase_report(options, kind, "sessions", len(sessions), "per_session",
                           options.burst)
    if not sessions:
        run.problems.append(f"{kind}: no open connection to publish to")
        return report
    publishers = run.children.publishers[:min(options.publishers, len(sessions))]
    for publisher_id in range(options.publishers):
        run.counters.set_published(publisher_id, 0)
    start = run.sampler.sample()
    started = time.monotonic()
    for i, conn in enumerate(publishers):
        share = [(index, run.sessions.ids[index]) for index in sessions[i::len(publishers)]]
        if kind == "down":
            conn.send(Burst(share, options.burst, options.size, tag, options.binary))
        else:
            conn.send(Paced(share, options.rate / len(publishers), options.duration,
                            options.size, tag, options.binary))
    pending = PendingReplies(publishers, "publisher")
    active_end, end = settle(run, pending, run.counters.published_total,
                             lambda: run.counters.worker_total(DELIVERED), kind, started)
    published: list[Published] = []
    for conn in publishers:
        reply = pending.reply(conn)
        if not isinstance(reply, Published):
            raise Fatal("Redis error while publishing: "
                        f"{reply.message if isinstance(reply, ChildFailed) else reply}")
        published.append(reply)
    deliveries = run.children.ask_workers(Collect(), Deliveries, 60)
    delivered = _downstream_figures(run, kind, report, published, deliveries)
    run.add_cpu_figures(report, start, active_end, end, "msg", delivered)
    return report


def _downstream_figures(run: Run, kind: str, report: PhaseReport, published: list[Published],
                        deliveries: list[Deliveries]) -> int:
    """Adds what was published and delivered to the report, records problems; how many arrived."""
    sent = sum(p.sent for p in published)
    sent_per_session: dict[int, int] = {}
    for p in published:
        sent_per_session.update(p.per_session)
    received: dict[int, int] = {}
    latencies: array[int] = array("q")
    anomalies: Counter[str] = Counter()
    for d in deliveries:
        received.update(d.per_session)
        latencies.extend(d.latencies)
        anomalies.update(d.anomalies())
    first = min((d.first_ns for d in deliveries if d.first_ns), default=0)
    last = max((d.last_ns for d in deliveries), default=0)
    delivered = sum(d.delivered for d in deliveries)
    lost, duplicates, lossy = _compare(sent_per_session, lambda i: received.get(i, 0))
    publish_start = min(p.started_ns for p in published)
    publish_end = max(p.ended_ns for p in published)
    publish_seconds = max(1e-9, (publish_end - publish_start) / 1e9)
    report.update({"sent": sent, "delivered": delivered, "lost": lost,
                   "sessions_with_loss": lossy, "duplicates": duplicates,
                   "publish_no_receiver": sum(p.no_receivers for p in published),
                   "publish_seconds": round((publish_end - publish_start) / 1e9, 3)})
    if kind == "down":
        report["publish_rate_per_s"] = round(sent / publish_seconds, 1)
        if delivered and last > publish_start:
            report["delivery_rate_per_s"] = round(delivered / ((last - publish_start) / 1e9), 1)
    else:
        report["achieved_rate_per_s"] = round(sent / publish_seconds, 1)
        max_lag = max(p.max_lag_ms for p in published)
        report["publisher_max_lag_ms"] = max_lag
        if max_lag > PACED_LAG_WARNING_MS:
            run.console.warn(f"paced: publishers fell {max_lag} ms behind schedule")
    report["latency_ms"] = latency_summary(latencies)
    for name, count in anomalies.items():
        if count:
            report[name] = count
    if first:
        report["first_delivery_ms"] = round((first - publish_start) / 1e6, 3)
    if lost:
        run.problems.append(f"{kind}: {lost} of {sent} messages lost ({lossy} sessions affected)")
    if duplicates:
        run.problems.append(f"{kind}: {duplicates} duplicate deliveries")
    for name in ("misrouted", "out_of_order", "corrupt", "wrong_opcode", "bad_size",
                 "protocol_errors"):
        if anomalies[name]:
            run.problems.append(f"{kind}: {anomalies[name]} messages {name.replace('_', ' ')}")
    if anomalies["stray"]:
        run.console.warn(f"{kind}: {anomalies['stray']} late messages from an earlier phase "
                         "arrived")
    return delivered


# -- up


def upstream(run: Run, kind: str) -> PhaseReport:
    """
    The up (burst) or uppaced phase: every open client sends, the subscriber
    counts what Redis delivers.
    """
    options = run.options
    tag = PHASE_TAGS[kind]
    sessions = start_phase(run, tag)
    report = _phase_report(options, kind, "clients", len(sessions), "per_client",
                           options.upstream)
    if not sessions:
        run.problems.append(f"{kind}: no open connection to send from")
        return report
    subscriber = run.children.subscriber
    if subscriber is None:
        raise Fatal("the up phase has no subscriber process")
    channels = {index: f"session:{run.sessions.ids[index]}:up".encode() for index in sessions}
    subscriber.send(Subscribe(f"session:lt-{run.sessions.run_id}-*:up", options.clients, tag,
                              channels, options.phase_timeout + 60))
    expect(Subscribed, gather([subscriber], 15, None, "subscriber start")[0], "subscriber start")
    start = run.sampler.sample()
    started = time.monotonic()
    workers = run.children.workers
    command: SendUpstream | SendPaced
    if kind == "up":
        command = SendUpstream(options.upstream, options.size, tag, options.binary)
    else:
        command = SendPaced(options.rate / len(workers), options.duration, options.size, tag,
                            options.binary)
    for conn in workers:
        conn.send(command)
    pending = PendingReplies(workers, "worker")

    def sent_so_far() -> int:
        return sum(r.sent for r in pending.replies.values() if isinstance(r, UpstreamSent))

    active_end, end = settle(run, pending, sent_so_far, run.counters.arrived, kind, started)
    sent_replies = [expect(UpstreamSent, pending.reply(conn), "upstream results")
                    for conn in workers]
    subscriber.send(StopSubscriber())
    arrivals = expect(Arrivals, gather([subscriber], 60, None, "subscriber results")[0],
                      "subscriber results")
    _upstream_figures(run, kind, report, sent_replies, arrivals)
    run.add_cpu_figures(report, start, active_end, end, "msg", arrivals.arrived)
    return report


def _upstream_figures(run: Run, kind: str, report: PhaseReport,
                      sent_replies: list[UpstreamSent], arrivals: Arrivals) -> None:
    sent = sum(r.sent for r in sent_replies)
    counts = arrivals.per_session
    sent_per_session: dict[int, int] = {}
    for r in sent_replies:
        sent_per_session.update(r.per_session)
    lost, duplicates, lossy = _compare(sent_per_session, lambda i: counts[i])
    send_start = min(r.started_ns for r in sent_replies)
    send_seconds = (max(r.ended_ns for r in sent_replies) - send_start) / 1e9
    report.update({"sent": sent, "arrived": arrivals.arrived, "lost": lost,
                   "sessions_with_loss": lossy, "duplicates": duplicates,
                   "send_seconds": round(send_seconds, 3)})
    if arrivals.arrived and arrivals.last_ns > send_start:
        report["rate_per_s"] = round(arrivals.arrived / ((arrivals.last_ns - send_start) / 1e9), 1)
    if kind == "uppaced":
        report["achieved_rate_per_s"] = round(sent / max(1e-9, send_seconds), 1)
        max_lag = max(r.max_lag_ms for r in sent_replies)
        report["sender_max_lag_ms"] = max_lag
        if max_lag > PACED_LAG_WARNING_MS:
            run.console.warn(f"uppaced: clients fell {max_lag} ms behind schedule")
    report["latency_ms"] = latency_summary(arrivals.latencies)
    for name, count in (("misrouted", arrivals.misrouted), ("corrupt", arrivals.corrupt),
                        ("stray", arrivals.stray)):
        if count:
            report[name] = count
    if lost:
        run.problems.append(f"{kind}: {lost} of {sent} messages lost ({lossy} sessions affected)")
    if duplicates:
        run.problems.append(f"{kind}: {duplicates} duplicate messages")
    if arrivals.misrouted:
        run.problems.append(f"{kind}: {arrivals.misrouted} messages on the wrong channel")


# -- close


def close(run: Run) -> PhaseReport:
    """Closes every connection; counts clean closes and connections dropped during the run."""
    timeout = run.options.close_timeout
    results = run.children.ask_workers(CloseAll(timeout), CloseResult, timeout + 30)
    codes: Counter[int] = Counter()
    for result in results:
        codes.update(result.server_close_codes)
    dropped = sum(r.dropped for r in results)
    report: PhaseReport = {"closed": sum(r.closed for r in results),
                           "clean": sum(r.clean for r in results),
                           "no_close_frame": sum(r.no_close_frame for r in results),
                           "timed_out": sum(r.timed_out for r in results),
                           "dropped": dropped}
    if codes:
        report["server_close_codes"] = {str(code): n for code, n in codes.items()}
    if dropped:
        run.problems.append(f"{dropped} open connections were dropped during the run"
                            + (f" (server close codes {dict(codes)})" if codes else ""))
    return report
