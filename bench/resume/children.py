"""
The parent's side of the child processes: the client workers and the
publisher, forked once per measurement, their pipes, and stopping them.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TypeVar

from bench.errors import Fatal
from .ipc import ChildFailed, Counters, Exit
from .publisher import PublisherCommand, PublisherReply, Published, publisher_main
from .workers import SessionSpec, WorkerCommand, WorkerConfig, WorkerReply, worker_main

T = TypeVar("T")

# how long the children have to exit before they are terminated
EXIT_GRACE_SECS = 5


def _expect(reply_type: type[T], reply: object, what: str) -> T:
    if isinstance(reply, ChildFailed):
        raise Fatal(f"{what} failed: {reply.message}")
    if not isinstance(reply, reply_type):
        raise Fatal(f"unexpected reply from {what}: {reply!r:.200}")
    return reply


class Children:
    """The client workers (a slice of the sessions each) and one publisher."""

    def __init__(self, specs: list[SessionSpec], procs: int, config: WorkerConfig,
                 redis_url: str) -> None:
        context = mp.get_context("fork")
        procs = max(1, min(procs, len(specs)))
        self.counters = Counters(context, procs)
        self._processes: list[BaseProcess] = []
        self._workers: list[Connection[WorkerCommand, WorkerReply]] = []
        for worker_id in range(procs):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main, name=f"resume-worker-{worker_id}", daemon=True,
                args=(worker_id, specs[worker_id::procs], config, child_end, self.counters))
            process.start()
            child_end.close()
            self._processes.append(process)
            self._workers.append(parent_end)
        parent_end, child_end = context.Pipe()
        process = context.Process(target=publisher_main, name="resume-publisher", daemon=True,
                                  args=(redis_url, child_end, self.counters))
        process.start()
        child_end.close()
        self._processes.append(process)
        self._publisher: Connection[PublisherCommand, PublisherReply] = parent_end

    def ask_workers(self, command: WorkerCommand, reply_type: type[T], timeout: float) -> list[T]:
        """Sends C{command} to every worker; their replies, in worker order."""
        for conn in self._workers:
            conn.send(command)
        replies: dict[int, T] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self._workers):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fatal(f"timed out after {timeout:.0f}s waiting for the workers")
            waiting = {id(c): i for i, c in enumerate(self._workers) if i not in replies}
            ready = mpc.wait([self._workers[i] for i in waiting.values()], timeout=min(left, 0.5))
            for answered in ready:
                i = waiting[id(answered)]
                try:
                    reply = self._workers[i].recv()
                except (EOFError, OSError):
                    raise Fatal("a worker process died") from None
                replies[i] = _expect(reply_type, reply, "a worker")
        return [replies[i] for i in range(len(self._workers))]

    def publish(self, command: PublisherCommand) -> None:
        """Starts C{command}; L{published} waits for its reply."""
        self._publisher.send(command)

    def published(self, timeout: float) -> Published | None:
        """The publisher's reply, or None if it has not come within C{timeout} seconds."""
        if not self._publisher.poll(timeout):
            return None
        try:
            reply = self._publisher.recv()
        except (EOFError, OSError):
            raise Fatal("the publisher process died") from None
        published = _expect(Published, reply, "the publisher")
        if published.errors:
            raise Fatal(f"{published.errors} publish commands failed: {published.error_example}")
        return published

    def shutdown(self) -> None:
        """Tells every child to exit, then terminates those still running after a grace period."""
        conns: list[Connection[Exit, object]] = [*self._workers, self._publisher]
        for conn in conns:
            try:
                conn.send(Exit())
            except Exception:  # noqa: BLE001 - it may have exited already
                pass
        deadline = time.monotonic() + EXIT_GRACE_SECS
        for process in self._processes:
            process.join(max(0.05, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # one of our own children, by its own handle
                process.join(2)
