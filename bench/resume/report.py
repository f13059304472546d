"""
What a run prints: progress and warnings on stderr while it runs, a short
summary on stderr at the end, and exactly one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from array import array
from collections.abc import Iterable, Mapping

from bench.loadtest.report import percentile

PROG = "bench.resume"

Report = dict[str, object]


class Console:
    """A progress line on stderr at most every C{interval} seconds; warnings always."""

    def __init__(self, interval: float = 2.0, prog: str = PROG) -> None:
        self._interval = interval
        self._prog = prog
        self._last = 0.0

    def progress(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            sys.stderr.write(f"{self._prog}: {text}\n")
            sys.stderr.flush()

    def warn(self, text: str) -> None:
        sys.stderr.write(f"{self._prog}: warning: {text}\n")
        sys.stderr.flush()


def latency_ms(values: Iterable[array[int]], prefix: str = "") -> Report:
    """p50, p99 and max in milliseconds of the latencies (ns) of several workers."""
    merged = sorted(v for part in values for v in part)
    out: Report = {}
    for name, p in (("p50", 50.0), ("p99", 99.0)):
        value = percentile(merged, p)
        out[f"{prefix}{name}_ms"] = None if value is None else round(value / 1e6, 2)
    out[f"{prefix}max_ms"] = round(merged[-1] / 1e6, 2) if merged else None
    return out


def merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items(), key=lambda item: -item[1]))


def summary(report: Report, keys: Iterable[str]) -> None:
    """The selected figures, one per line, on stderr."""
    for key in keys:
        if key in report:
            sys.stderr.write(f"  {key:<24} {json.dumps(report[key])}\n")
    sys.stderr.flush()


def emit(report: Report) -> None:
    sys.stdout.write(json.dumps(report, separators=(", ", ": ")) + "\n")
    sys.stdout.flush()
