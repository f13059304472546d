"""
The parent's side of one measured run: the client workers (forked, a
slice of the sockets each), their connection, and the delivery phases
that publish, wait until every socket has every message (or the settle
time is over) and read the proxy's and Redis's CPU from C{/proc} around
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.children import ChildPool, Counters
from bench.errors import Fatal
from bench.loadtest.procstat import CLOCK_TICKS, cpu_seconds, host_jiffies, process_family
from bench.loadtest.report import percentile
from bench.resume.report import merge_counts

from .workers import (COUNTERS_PER_WORKER, DELIVERED, Collect, Connect, Connected, Expect,
                      Ready, SocketSpec, WorkerConfig, WorkerReport, worker_main)

Figures = dict[str, Any]

# how often the parent looks at the workers' delivery counters while waiting
POLL_SECS = 0.002


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its children (from /proc)."""
    user = system = 0.0
    for member in process_family(pid):
        try:
            with open(f"/proc/{member}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        user += int(fields[11]) / CLOCK_TICKS
        system += int(fields[12]) / CLOCK_TICKS
    return user, system


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 2)


class Fleet(ChildPool):
    """The client workers of one run."""

    def __init__(self, specs: list[SocketSpec], procs: int, config: WorkerConfig) -> None:
        super().__init__()
        procs = max(1, min(procs, len(specs)))
        self.sockets = len(specs)
        self.counters = Counters(self.context, procs, COUNTERS_PER_WORKER, publishers=0)
        self._workers: list[Connection[Any, Any]] = [
            self.fork(f"topics-worker-{i}", f"worker{i}", worker_main,
                      (i, specs[i::procs], config), self.counters)
            for i in range(procs)]

    def connect(self) -> Figures:
        """Opens every socket; L{Fatal} unless all of them opened."""
        started = time.monotonic()
        replies = self.ask(self._workers, Connect(), Connected, 900, what="the workers")
        opened = sum(r.opened for r in replies)
        if opened < self.sockets:
            failures = merge_counts(r.failures for r in replies)
            raise Fatal(f"only {opened} of {self.sockets} sockets connected: {failures}")
        return {"connected": opened, "connect_s": round(time.monotonic() - started, 2)}

    def delivered(self) -> int:
        return self.counters.worker_total(DELIVERED)

    def phase(self, server_pid: int, redis_pid: int, expected_indices: int, batches: int,
              per_batch: int, publish: Callable[[int], None], settle: float,
              quiet: float = 0.3) -> Figures:
        """
        One delivery phase: every socket is to receive the indices 0 ..
        C{expected_indices}-1. C{publish(b)} publishes batch C{b} (of
        C{batches}), which makes C{per_batch} deliveries; the next batch
        goes out once they have all arrived (or after C{settle} seconds).
        The proxy's and Redis's CPU is read before the first batch and
        after the last one's deliveries.
        """
        self.ask(self._workers, Expect(expected_indices), Ready, 60, what="the workers")
        time.sleep(quiet)  # what the previous phase or the connections left behind
        base = self.delivered()
        late = 0
        proxy0, redis0, host0 = cpu_seconds(server_pid), cpu_seconds(redis_pid), host_jiffies()
        split0 = user_system(server_pid)
        started = time.monotonic()
        for batch in range(batches):
            publish(batch)
            goal = base + (batch + 1) * per_batch
            deadline = time.monotonic() + settle
            while self.delivered() < goal:
                if time.monotonic() > deadline:
                    late += 1
                    break
                time.sleep(POLL_SECS)
        elapsed = time.monotonic() - started
        proxy1, redis1, host1 = cpu_seconds(server_pid), cpu_seconds(redis_pid), host_jiffies()
        split1 = user_system(server_pid)
        reports = self.ask(self._workers, Collect(), WorkerReport, 120, what="the workers")
        figures = self._figures(reports, batches * per_batch)
        deliveries = figures["delivered"]
        if proxy0 is None or proxy1 is None:
            raise Fatal(f"the server (pid {server_pid}) is gone")
        proxy_cpu = proxy1 - proxy0
        figures.update({
            "seconds": round(elapsed, 3),
            "proxy_cpu_s": round(proxy_cpu, 3),
            "cpu_us_per_delivery": round(proxy_cpu * 1e6 / deliveries, 3) if deliveries else None,
            "deliveries_per_cpu_s": round(deliveries / proxy_cpu) if proxy_cpu > 0 else None,
            # the proxy's user-mode and kernel (system) CPU per delivery: the
            # kernel's share is mostly the send system calls (and, on
            # loopback, the receiving side's TCP work they carry)
            "user_us_per_delivery": (round((split1[0] - split0[0]) * 1e6 / deliveries, 3)
                                     if deliveries else None),
            "sys_us_per_delivery": (round((split1[1] - split0[1]) * 1e6 / deliveries, 3)
                                    if deliveries else None),
            "host_busy": (round((host1[0] - host0[0]) / (host1[1] - host0[1]), 3)
                          if host1[1] > host0[1] else None),
            "late_batches": late,
        })
        if redis0 is not None and redis1 is not None:
            figures["redis_cpu_s"] = round(redis1 - redis0, 3)
            figures["redis_cpu_us_per_delivery"] = (
                round((redis1 - redis0) * 1e6 / deliveries, 3) if deliveries else None)
        return figures

    @staticmethod
    def _figures(reports: list[WorkerReport], expected: int) -> Figures:
        last: dict[int, int] = {}
        sent: dict[int, int] = {}
        for report in reports:
            for index, at in report.last_receipt.items():
                if at > last.get(index, 0):
                    last[index] = at
                    sent[index] = report.sent[index]
        to_last = sorted(last[i] - sent[i] for i in last)
        every = sorted(v for r in reports for v in r.latencies)
        delivered = sum(r.delivered for r in reports)
        return {
            "expected": expected, "delivered": delivered,
            "lost": sum(r.missing for r in reports),
            "duplicates": sum(r.duplicates for r in reports),
            "corrupt": sum(r.corrupt for r in reports),
            "still_open": sum(r.open for r in reports),
            # from each publish to its last socket's receipt
            "last_p50_ms": _ms(percentile(to_last, 50.0)),
            "last_p99_ms": _ms(percentile(to_last, 99.0)),
            # from each publish to each socket's receipt
            "p50_ms": _ms(percentile(every, 50.0)),
            "p99_ms": _ms(percentile(every, 99.0)),
        }
