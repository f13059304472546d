"""
The parent's side of the child processes (L{bench.children}): the client
workers and the publisher, forked once per measurement.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Callable, TypeVar

from bench.children import ChildPool, Counters, expect, reply_within
from bench.errors import Fatal

from .publisher import PublisherCommand, PublisherReply, Published, publisher_main
from .report import merge_counts
from .workers import (COUNTERS_PER_WORKER, Connect, Connected, SessionSpec, WorkerConfig,
                      worker_main)

T = TypeVar("T")


class Children(ChildPool):
    """The client workers (a slice of the sessions each) and one publisher."""

    def __init__(self, specs: list[SessionSpec], procs: int, config: WorkerConfig,
                 redis_url: str, target: Callable[..., None] = worker_main,
                 counters_per_worker: int = COUNTERS_PER_WORKER) -> None:
        """
        C{target} is the workers' body (L{worker_main}'s signature), with
        C{counters_per_worker} progress counters each: bench.rolling forks
        its own L{Worker} subclass.
        """
        super().__init__()
        procs = max(1, min(procs, len(specs)))
        self.counters = Counters(self.context, procs, counters_per_worker, publishers=1)
        self._workers: list[Connection[object, object]] = [
            self.fork(f"resume-worker-{worker_id}", f"worker{worker_id}", target,
                      (worker_id, specs[worker_id::procs], config), self.counters)
            for worker_id in range(procs)]
        self._publisher: Connection[PublisherCommand, PublisherReply] = self.fork(
            "resume-publisher", "publisher", publisher_main, (redis_url,), self.counters)

    def ask_workers(self, command: object, reply_type: type[T], timeout: float) -> list[T]:
        """Sends C{command} to every worker; their replies, in worker order."""
        return self.ask(self._workers, command, reply_type, timeout, what="the workers")

    def connect(self, sessions: int, what: str) -> int:
        """Opens every session's first connection; how many opened, all of them or L{Fatal}."""
        connected = self.ask_workers(Connect(), Connected, 600)
        opened = sum(c.opened for c in connected)
        if opened < sessions:
            failures = merge_counts(c.failures for c in connected)
            raise Fatal(f"{what}only {opened} of {sessions} sessions connected: {failures}")
        return opened

    def publish(self, command: PublisherCommand) -> None:
        """Starts C{command}; L{published} waits for its reply."""
        self._publisher.send(command)

    def published(self, timeout: float) -> Published | None:
        """The publisher's reply, or None if it has not come within C{timeout} seconds."""
        reply = reply_within(self._publisher, timeout, "publisher")
        if reply is None:
            return None
        published = expect(Published, reply, "the publisher")
        if published.errors:
            raise Fatal(f"{published.errors} publish commands failed: {published.error_example}")
        return published
