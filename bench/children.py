"""
The child processes that make a benchmark's load (client workers,
publishers, a subscriber), for every scenario that forks its load
(L{bench.loadtest}, L{bench.resume}): forking each with its own pipe,
asking them a command and gathering one reply each, the command loop a
child serves, progress counters in shared memory, and stopping them all at
the end.

Parent and child talk over pipes in typed command and reply objects; a
child that fails replies L{ChildFailed}, and every child stops on L{Exit}
(or when its pipe closes). Besides the pipes, each child writes its own
progress counters (L{Counters}) and the parent sums them, without a round
trip: to show progress and to tell when a phase has settled.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
import multiprocessing.connection as mpc
import resource
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext, ForkContext
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from bench.errors import Fatal

T = TypeVar("T")
SendT = TypeVar("SendT")
ReplyT = TypeVar("ReplyT")
R = TypeVar("R")

# how long the children have to exit before they are terminated
EXIT_GRACE_SECS = 5


@dataclass(frozen=True)
class Exit:
    """Sent to every child process at the end of a run: stop now."""


@dataclass(frozen=True)
class ChildFailed:
    """A child's command failed (or the child crashed); the run cannot go on."""

    message: str


class Counters:
    """
    One int64 per counter in shared memory: C{per_worker} per client worker
    (which counters, the worker module says), one per publisher (messages
    published) and, if asked, one for the subscriber (messages arrived).
    """

    def __init__(self, context: BaseContext, workers: int, per_worker: int, publishers: int,
                 subscriber: bool = False) -> None:
        self._workers = workers
        self._per_worker = per_worker
        self._publishers = publishers
        self._first_publisher = workers * per_worker
        self._subscriber = self._first_publisher + publishers
        self._values = context.RawArray(ctypes.c_int64, self._subscriber + int(subscriber))

    def set_worker(self, worker_id: int, counter: int, value: int) -> None:
        self._values[worker_id * self._per_worker + counter] = value

    def worker_total(self, counter: int) -> int:
        per_worker = self._per_worker
        return sum(self._values[w * per_worker + counter] for w in range(self._workers))

    def set_published(self, publisher_id: int, value: int) -> None:
        self._values[self._first_publisher + publisher_id] = value

    def published_total(self) -> int:
        return sum(self._values[self._first_publisher + p] for p in range(self._publishers))

    def set_arrived(self, value: int) -> None:
        self._values[self._subscriber] = value

    def arrived(self) -> int:
        return int(self._values[self._subscriber])


def raise_open_files_limit(needed: int = 0) -> str | None:
    """
    The soft limit of open files up to the hard one (and the hard one to
    C{needed}, where the process may): client workers hold one descriptor
    per connection, and the proxies a run starts inherit the limit. Why
    C{needed} could not be had, or None.
    """
    problem = None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return None
        except (ValueError, OSError):
            problem = f"RLIMIT_NOFILE hard limit {hard} < {needed} descriptors needed"
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return problem


# -- the parent's side


def expect(reply_type: type[T], reply: object, what: str) -> T:
    """The reply, if it is of the type the parent asked for."""
    if isinstance(reply, ChildFailed):
        raise Fatal(f"{what} failed: {reply.message}")
    if not isinstance(reply, reply_type):
        raise Fatal(f"unexpected reply while waiting for {what}: {reply!r:.200}")
    return reply


def gather(conns: Sequence[Connection[SendT, ReplyT]], timeout: float,
           tick: Callable[[], None] | None, what: str) -> list[ReplyT]:
    """One reply from each pipe, in order, within C{timeout} seconds; C{tick} every 0.1 s."""
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
            if isinstance(reply, ChildFailed):
                raise Fatal(f"{what} failed: {reply.message}")
            replies[i] = reply
        if tick:
            tick()
    return [replies[i] for i in range(len(conns))]


def reply_within(conn: Connection[SendT, ReplyT], timeout: float, what: str) -> ReplyT | None:
    """The next reply on C{conn}, or None if it has not come within C{timeout} seconds."""
    if not conn.poll(timeout):
        return None
    try:
        return conn.recv()
    except (EOFError, OSError):
        raise Fatal(f"the {what} process died") from None


class PendingReplies(Generic[SendT, ReplyT]):
    """
    The replies the parent awaits while it watches a phase settle (the
    publishers', or the workers' that send), which arrive once they have
    sent everything.
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
        """Sleeps C{seconds}, taking replies meanwhile."""
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
        """The reply from C{conn}, or None if it never came."""
        return self.replies.get(id(conn))


class ChildPool:
    """The run's child processes (forked) and the parent's ends of their pipes."""

    def __init__(self) -> None:
        self.context: ForkContext = mp.get_context("fork")
        self.pids: dict[str, int] = {}  # for CPU sampling: worker0, publisher0, ...
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection[Any, Any]] = []

    def fork(self, process_name: str, sample_name: str, target: Callable[..., None],
             args: tuple[object, ...], counters: Counters) -> Connection[Any, Any]:
        """
        Starts C{target(*args, pipe, counters)} in a child process; the
        parent's end of its pipe.
        """
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(target=target, args=(*args, child_end, counters),
                                       name=process_name, daemon=True)
        process.start()
        child_end.close()
        self._processes.append(process)
        self._conns.append(parent_end)
        if process.pid is not None:
            self.pids[sample_name] = process.pid
        return parent_end

    def ask(self, conns: Sequence[Connection[SendT, object]], command: SendT,
            reply_type: type[T], timeout: float, tick: Callable[[], None] | None = None,
            what: str = "worker replies") -> list[T]:
        """Sends C{command} to every child of C{conns}; their replies, in order."""
        for conn in conns:
            conn.send(command)
        return [expect(reply_type, reply, what) for reply in gather(conns, timeout, tick, what)]

    def shutdown(self) -> None:
        """Tells every child to exit, then terminates those still running after a grace period."""
        for conn in self._conns:
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


# -- the child's side


def child_main(conn: Connection[Any, Any], body: Callable[[], None]) -> None:
    """
    A child process's body, SIGINT ignored (the parent stops it); a crash
    is reported to the parent as L{ChildFailed}.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        body()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(ChildFailed(f"{type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001
            pass


async def commands(loop: asyncio.AbstractEventLoop,
                   conn: Connection[Any, T]) -> AsyncIterator[T | Exit]:
    """
    The parent's commands to a child running an asyncio loop, as they
    arrive, up to and including L{Exit} (also when the pipe closes).
    """
    queue: asyncio.Queue[T | Exit] = asyncio.Queue()

    def on_readable() -> None:
        try:
            queue.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            queue.put_nowait(Exit())

    loop.add_reader(conn.fileno(), on_readable)
    while True:
        command = await queue.get()
        yield command
        if isinstance(command, Exit):
            return


def serve(conn: Connection[Any, Any], start: Callable[[], R],
          handle: Callable[[R, Any], object]) -> None:
    """
    A blocking child's command loop: one reply per command until L{Exit}
    or the pipe closes. C{start()} makes what C{handle} works with (a Redis
    connection, say) when the first command comes, and again after a
    command failed, which is replied as L{ChildFailed}.
    """
    resource: R | None = None
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(command, Exit):
            return
        reply: object
        try:
            if resource is None:
                resource = start()
            reply = handle(resource, command)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply = ChildFailed(f"{type(e).__name__}: {e}")
            resource = None
        conn.send(reply)
