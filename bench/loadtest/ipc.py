"""
What the parent and its child processes share besides their pipes: progress
counters in shared memory, and the command that ends every child.

Each child writes only its own counters; the parent sums them to show
progress and to tell when a phase has settled, without a round trip.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from multiprocessing.context import BaseContext

# a client worker's counters, in this order
OPENED, FAILED, DELIVERED, DROPPED = range(4)
COUNTERS_PER_WORKER = 4


@dataclass(frozen=True)
class Exit:
    """Sent to every child process at the end of a run: stop now."""


class SharedCounters:
    """
    One int64 per counter: four per client worker (connections opened,
    failed, messages delivered, connections dropped), one per publisher
    (messages published) and one for the subscriber (messages arrived).
    """

    def __init__(self, context: BaseContext, workers: int, publishers: int) -> None:
        self._workers = workers
        self._publishers = publishers
        self._first_publisher = workers * COUNTERS_PER_WORKER
        self._subscriber = self._first_publisher + publishers
        self._values = context.RawArray(ctypes.c_int64, self._subscriber + 1)

    def set_worker(self, worker_id: int, counter: int, value: int) -> None:
        self._values[worker_id * COUNTERS_PER_WORKER + counter] = value

    def worker_total(self, counter: int) -> int:
        return sum(self._values[w * COUNTERS_PER_WORKER + counter] for w in range(self._workers))

    def set_published(self, publisher_id: int, value: int) -> None:
        self._values[self._first_publisher + publisher_id] = value

    def published_total(self) -> int:
        return sum(self._values[self._first_publisher + p] for p in range(self._publishers))

    def set_arrived(self, value: int) -> None:
        self._values[self._subscriber] = value

    def arrived(self) -> int:
        return int(self._values[self._subscriber])
