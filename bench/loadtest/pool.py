"""
The parent's side of the child processes: forking the client workers, the
publishers and the subscriber, talking to them over their pipes, and
stopping them all at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext
from multiprocessing.process import BaseProcess
from typing import Generic, TypeVar

from bench.errors import Fatal
from .ipc import Exit, SharedCounters
from .redis_io import (PublisherCommand, PublisherReply, SubscriberCommand, SubscriberReply,
                       publisher_main, subscriber_main)
from .workers import (ClientSpec, WorkerCommand, WorkerConfig, WorkerFailed, WorkerReply,
                      worker_main)

T = TypeVar("T")
SendT = TypeVar("SendT")
ReplyT = TypeVar("ReplyT")

# how long the children have to exit before they are terminated
EXIT_GRACE_SECS = 5


def expect(reply_type: type[T], reply: object, what: str) -> T:
    """The reply, if it is of the type the parent asked for."""
    if isinstance(reply, WorkerFailed):
        raise Fatal(f"worker failed: {reply.message}")
    if not isinstance(reply, reply_type):
        raise Fatal(f"unexpected reply while waiting for {what}: {reply!r}")
    return reply


def gather(conns: Sequence[Connection[SendT, ReplyT]], timeout: float,
           tick: Callable[[], None] | None, what: str) -> list[ReplyT]:
    """One reply from each pipe, in order, within ``timeout`` seconds; ``tick`` every 0.1 s."""
    replies: dict[int, ReplyT] = {}
    pending = {id(conn): i for i, conn in enumerate(conns)}
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise Fatal(f"timed out after {timeout:.0f}s waiting for {what}")
        for ready in mpc.wait([conns[i] for i in pending.values()], timeout=0.1):
            i = pending.pop(id(ready))
            try:
                reply = conns[i].recv()
            except (EOFError, OSError):
                raise Fatal(f"a {what.split()[0]} process died") from None
            if isinstance(reply, WorkerFailed):
                raise Fatal(f"worker failed: {reply.message}")
            replies[i] = reply
        if tick:
            tick()
    return [replies[i] for i in range(len(conns))]


class PendingReplies(Generic[SendT, ReplyT]):
    """
    The replies the parent awaits while it watches a phase settle: the
    publishers' (down, paced) or the workers' (up), which arrive once they
    have sent everything.
    """

    def __init__(self, conns: Sequence[Connection[SendT, ReplyT]], role: str) -> None:
        self.replies: dict[int, ReplyT] = {}
        # when the last reply came; until then, far in the future
        self.done_at = time.monotonic() + 1e9
        self._conns = {id(conn): conn for conn in conns}
        self._role = role

    def busy(self) -> bool:
        return len(self.replies) < len(self._conns)

    def wait(self, seconds: float) -> None:
        """Sleeps ``seconds``, taking replies meanwhile."""
        waiting = [conn for key, conn in self._conns.items() if key not in self.replies]
        if not waiting:
            time.sleep(seconds)
            return
        for ready in mpc.wait(waiting, timeout=seconds):
            try:
                self.replies[id(ready)] = self._conns[id(ready)].recv()
            except (EOFError, OSError):
                raise Fatal(f"a {self._role} process died") from None
            if not self.busy():
                self.done_at = time.monotonic()

    def reply(self, conn: Connection[SendT, ReplyT]) -> ReplyT | None:
        """The reply from ``conn``, or None if it never came."""
        return self.replies.get(id(conn))


class ChildProcesses:
    """The run's worker, publisher and subscriber processes and the parent's pipe ends."""

    def __init__(self) -> None:
        self.workers: list[Connection[WorkerCommand, WorkerReply]] = []
        self.publishers: list[Connection[PublisherCommand, PublisherReply]] = []
        self.subscriber: Connection[SubscriberCommand, SubscriberReply] | None = None
        self.pids: dict[str, int] = {}  # for CPU sampling: worker0, publisher0, subscriber
        self._processes: list[BaseProcess] = []
        self._context: ForkContext = mp.get_context("fork")

    @property
    def context(self) -> ForkContext:
        return self._context

    def start(self, specs: list[list[ClientSpec]], config: WorkerConfig, publishers: int,
              subscriber: bool, redis_url: str, counters: SharedCounters) -> None:
        """Forks a worker per slice of ``specs``, the publishers and, if asked, the subscriber."""
        for worker_id, worker_specs in enumerate(specs):
            worker_end, child_end = self._context.Pipe()
            self._fork(f"lt-worker-{worker_id}", f"worker{worker_id}", worker_main,
                       worker_id, worker_specs, config, child_end, counters)
            child_end.close()
            self.workers.append(worker_end)
        for publisher_id in range(publishers):
            publisher_end, child_end = self._context.Pipe()
            self._fork(f"lt-publisher-{publisher_id}", f"publisher{publisher_id}",
                       publisher_main, publisher_id, redis_url, child_end, counters)
            child_end.close()
            self.publishers.append(publisher_end)
        if subscriber:
            subscriber_end, child_end = self._context.Pipe()
            self._fork("lt-subscriber", "subscriber", subscriber_main,
                       redis_url, child_end, counters)
            child_end.close()
            self.subscriber = subscriber_end

    def _fork(self, process_name: str, sample_name: str, target: Callable[..., None],
              *args: object) -> None:
        """Starts a child process; the caller then closes its copy of the child's pipe end."""
        process = self._context.Process(target=target, args=args, name=process_name, daemon=True)
        process.start()
        self._processes.append(process)
        if process.pid is not None:
            self.pids[sample_name] = process.pid

    def ask_workers(self, command: WorkerCommand, reply_type: type[T], timeout: float,
                    tick: Callable[[], None] | None = None,
                    what: str = "worker replies") -> list[T]:
        """Sends ``command`` to every worker; their replies, in worker order."""
        for conn in self.workers:
            conn.send(command)
        return [expect(reply_type, reply, what)
                for reply in gather(self.workers, timeout, tick, what)]

    def shutdown(self) -> None:
        """Tells every child to exit, then terminates those still running after a grace period."""
        conns: list[Connection[Exit, object]] = [*self.workers, *self.publishers]
        if self.subscriber is not None:
            conns.append(self.subscriber)
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
