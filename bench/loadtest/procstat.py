"""
CPU and memory of processes, read from ``/proc``: the proxy (its workers
included when ``WORKERS>1``), a local Redis and the tool's own processes,
sampled at the start and end of each phase.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# a host busier than this (all cores together) competed for CPU
HOST_SATURATED = 0.95


def process_family(pid: int) -> list[int]:
    """The process and its direct children (WORKERS>1: the supervisor and its workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(c) for c in f.read().split()]
    except OSError:
        return [pid]


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (the state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    return data[data.rindex(b")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """user+sys CPU seconds of a process and its children, or None if it is not readable."""
    if not pid:
        return None
    total = 0.0
    for i, member in enumerate(process_family(pid)):
        fields = _stat(member)
        if fields is None:
            if i == 0:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def runnable(pids: list[int]) -> bool:
    """
    Whether one of the processes (or a child of one) is running or waiting
    for a CPU right now (state R): it has work, whether or not a busy host
    gives it a core.
    """
    return any((fields := _stat(member)) is not None and fields[0] == b"R"
               for pid in pids for member in process_family(pid))


def rss_bytes(pid: int) -> int | None:
    """VmRSS in bytes of a process and its children, or None."""
    if not pid:
        return None
    total: int | None = None
    for member in process_family(pid):
        try:
            with open(f"/proc/{member}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total = (total or 0) + int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def listen_overflows() -> int | None:
    """
    Host-wide TcpExt ListenOverflows (accept queue full: the SYN is dropped
    and retried after ~1 s), or None.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:]))
            if "ListenOverflows" in counters:
                return int(counters["ListenOverflows"])
    return None


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            parts = f.readline().split()
    except OSError:
        return (0, 0)
    values = [int(x) for x in parts[1:9]]
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle, total)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of the sampled processes and the host's jiffies at one instant."""

    at: float  # time.monotonic()
    cpu: dict[str, float | None]
    host: tuple[int, int]


class Sampler:
    """Samples named processes: the tool's own, and optionally ``proxy`` and ``redis``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def sample(self) -> CpuSample:
        return CpuSample(time.monotonic(),
                         {name: cpu_seconds(pid) for name, pid in self.pids.items()},
                         host_jiffies())

    def tool_names(self) -> list[str]:
        """The tool's own processes (worker0, publisher0, subscriber, ...)."""
        return [name for name in self.pids if name not in ("proxy", "redis")]


def utilisation(start: CpuSample, end: CpuSample) -> tuple[dict[str, float | None], float | None]:
    """
    Each process's CPU use between two samples (fraction of one core) and the
    host's busy fraction.
    """
    elapsed = end.at - start.at
    per_process: dict[str, float | None] = {}
    for name, before in start.cpu.items():
        after = end.cpu.get(name)
        if before is None or after is None or elapsed <= 0:
            per_process[name] = None
        else:
            per_process[name] = (after - before) / elapsed
    busy = end.host[0] - start.host[0]
    total = end.host[1] - start.host[1]
    return per_process, (busy / total if total > 0 else None)


def add_cpu_load(report: dict[str, object], sampler: Sampler, start: CpuSample, end: CpuSample,
                 saturation: float) -> None:
    """
    Adds to a phase's report how busy the proxy, Redis, the tool's processes
    (the busiest of each role) and the host were between two samples, and
    whether the tool or the host was saturated, which makes the phase's
    figures a lower bound.
    """
    per_process, host = utilisation(start, end)
    tool: dict[str, float] = {}
    for name in sampler.tool_names():
        busy = per_process.get(name)
        if busy is not None:
            tool[name] = busy
    by_role: dict[str, float] = {}
    for name, busy in tool.items():
        role = name.rstrip("0123456789")
        by_role[role] = max(by_role.get(role, 0.0), busy)
    busiest = max(tool.values()) if tool else 0.0
    report["tool_cpu"] = {role: round(busy, 3) for role, busy in by_role.items()}
    report["host_cpu"] = round(host, 3) if host is not None else None
    report["tool_saturated"] = busiest >= saturation
    # every core busy: the proxy, Redis and this tool (and anything else on the
    # host) compete for CPU, so the figures describe the host as much as the proxy
    report["host_saturated"] = host is not None and host >= HOST_SATURATED
    if busiest >= saturation:
        name = max(tool, key=tool.__getitem__)
        report["tool_note"] = (f"load tool saturated: {name} at {busiest:.0%} CPU; "
                               "figures are a lower bound (try more --procs/--publishers)")
    for name in ("proxy", "redis"):
        busy = per_process.get(name)
        if name in sampler.pids and busy is not None:
            report[f"{name}_cpu_util"] = round(busy, 3)


def add_cpu_cost(report: dict[str, object], sampler: Sampler, start: CpuSample, end: CpuSample,
                 per: str, count: int) -> None:
    """Adds the proxy's and Redis's CPU microseconds per message or connection (``per``)."""
    for name in ("proxy", "redis"):
        if name not in sampler.pids:
            continue
        before, after = start.cpu.get(name), end.cpu.get(name)
        if before is None or after is None or not count:
            continue
        report[f"{name}_cpu_us_per_{per}"] = round((after - before) * 1e6 / count, 2)
        report[f"{name}_cpu_seconds"] = round(after - before, 3)
