"""
The run's child processes (L{bench.children}): a client worker per slice of
the sessions, the publishers and, for the upstream phases, the subscriber.
"""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

from bench.children import ChildPool, Counters

from .redis_io import (PublisherCommand, PublisherReply, SubscriberCommand, SubscriberReply,
                       publisher_main, subscriber_main)
from .workers import ClientSpec, WorkerCommand, WorkerConfig, WorkerReply, worker_main

T = TypeVar("T")


class ChildProcesses(ChildPool):
    """The run's worker, publisher and subscriber processes and the parent's pipe ends."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[Connection[WorkerCommand, WorkerReply]] = []
        self.publishers: list[Connection[PublisherCommand, PublisherReply]] = []
        self.subscriber: Connection[SubscriberCommand, SubscriberReply] | None = None

    def start(self, specs: list[list[ClientSpec]], config: WorkerConfig, publishers: int,
              subscriber: bool, redis_url: str, counters: Counters) -> None:
        """Forks a worker per slice of ``specs``, the publishers and, if asked, the subscriber."""
        for worker_id, worker_specs in enumerate(specs):
            self.workers.append(self.fork(f"lt-worker-{worker_id}", f"worker{worker_id}",
                                          worker_main, (worker_id, worker_specs, config),
                                          counters))
        for publisher_id in range(publishers):
            self.publishers.append(self.fork(f"lt-publisher-{publisher_id}",
                                             f"publisher{publisher_id}", publisher_main,
                                             (publisher_id, redis_url), counters))
        if subscriber:
            self.subscriber = self.fork("lt-subscriber", "subscriber", subscriber_main,
                                        (redis_url,), counters)

    def ask_workers(self, command: WorkerCommand, reply_type: type[T], timeout: float,
                    tick: Callable[[], None] | None = None,
                    what: str = "worker replies") -> list[T]:
        """Sends ``command`` to every worker; their replies, in worker order."""
        return self.ask(self.workers, command, reply_type, timeout, tick, what)
