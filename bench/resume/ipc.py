"""
Progress counters the parent reads without a round trip: each child writes
only its own slots in shared memory, the parent sums them (to show progress
and to tell when every message has arrived).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from multiprocessing.context import BaseContext

# a client worker's counters, in this order
OPEN, DELIVERED, RECONNECTS, CONNECT_FAILURES, INCOMPLETE = range(5)
PER_WORKER = 5


@dataclass(frozen=True)
class Exit:
    """Sent to every child process at the end of a run: stop now."""


@dataclass(frozen=True)
class ChildFailed:
    """A child's command failed; the run cannot go on."""

    message: str


class Counters:
    """Five int64 per client worker, one for the publisher (messages published)."""

    def __init__(self, context: BaseContext, workers: int) -> None:
        self._workers = workers
        self._values = context.RawArray(ctypes.c_int64, workers * PER_WORKER + 1)

    def set(self, worker_id: int, counter: int, value: int) -> None:
        self._values[worker_id * PER_WORKER + counter] = value

    def total(self, counter: int) -> int:
        return sum(self._values[w * PER_WORKER + counter] for w in range(self._workers))

    def set_published(self, value: int) -> None:
        self._values[self._workers * PER_WORKER] = value

    def published(self) -> int:
        return int(self._values[self._workers * PER_WORKER])
