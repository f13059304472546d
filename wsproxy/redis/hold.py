"""
Holding client messages while a Redis command connection is replaced for a
known reason, so that a planned failover closes no client.

Without a hold, a command sent while a link has no usable connection fails
at once (L{wsproxy.redis.redislink.RedisUnavailable}), and a client whose
message cannot be published is closed with 1011. That is right when Redis
was lost (nobody knows for how long), and wrong when the proxy itself is
moving to another master it has just been told about: a failover the
sentinels announce (C{+selected-slave}, before the promotion, or
C{+switch-master}; L{wsproxy.redis.sentinel}, L{wsproxy.session.proxy.Proxy}),
or, on a cluster, a master new to the slot map or named by a C{MOVED}
whose connection is still being made (L{wsproxy.redis.cluster}). Then the link holds the lean commands
(C{PUBLISH}, C{SPUBLISH}, C{XADD}, the token check, events) that meet it
without a connection, and writes them, in the order they came, to the next
connection as soon as it is usable, before anything else; each reply goes
to the callback that came with its command, as if nothing had happened.

The hold is bounded, so that it never hides a real outage:

  - in time, L{HOLD_SECS} from its start: what is still held then fails as
    it would have at once without a hold (1011, or a nack), and the link
    stops holding;
  - in bytes, L{HOLD_BYTES} over every link of the process
    (L{HoldBudget}): a command that does not fit fails at once, and so does
    every later one of that hold (so that what a client sees is still in
    order: a prefix of its messages held and written, the rest failed);
  - per connection, by the upstream valve
    (L{wsproxy.session.backpressure.UpstreamValve}): from the first
    command held until the last is written, no client is read from, as when
    the command connection's send buffer is full. What is held is what the
    clients had already sent, not what they might send meanwhile.

Nothing of this runs while a link is connected: the lean paths only look
for a hold in the branch where there is no connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: the longest a link holds commands. The hold starts once the new master
#: is known (the sentinels name the replica they are about to promote, one
#: sentinel tick before they promote it; a MOVED or a slot map names it),
#: so it only has to cover the promotion and making a connection there:
#: TCP, TLS, AUTH, ROLE or PING, tried every 50 ms meanwhile (about 0.1 s
#: measured on loopback for SENTINEL FAILOVER, 20 ms for CLUSTER FAILOVER).
#: Five seconds is that with a wide margin for a slow network or a busy
#: host, and still under the default WS_PING_TIMEOUT_SECS (10 s: a client
#: not read meanwhile has its pong read late) and AUTH_TIMEOUT_SECS (5 s: a
#: token check held meanwhile). Not a setting: it does not depend on how
#: long Redis takes to fail over, only on reaching a master already named.
HOLD_SECS = 5.0

#: the most bytes (RESP-encoded commands) held at once in a process, over
#: every link: twice the command connection's send buffer at which the
#: valve pauses the clients (L{wsproxy.redis.redislink.TRANSPORT_BUFFER_SIZE}),
#: i.e. no more memory than a Redis slower than the clients may already
#: cost. With the valve pausing every client from the first command held,
#: only what was already read is held; reached only with many clients each
#: mid-burst.
HOLD_BYTES = 8 << 20


class HoldBudget:
    """
    What every hold of one process shares: the byte bound, the valve (paused
    while anything is held) and the figures.

    @ivar held: commands held so far (all holds).
    @ivar failed: commands that failed past a bound.
    @ivar holds: holds ended with a connection.
    @ivar longest: the longest such hold, in seconds.
    """

    def __init__(
        self,
        max_bytes: int = HOLD_BYTES,
        pause: Callable[[], None] = lambda: None,
        resume: Callable[[], None] = lambda: None,
    ) -> None:
        self.max_bytes = max_bytes
        self.pause = pause
        self.resume = resume
        self.bytes = 0
        #: commands held right now, over every link
        self.waiting = 0
        self.held = 0
        self.failed = 0
        self.holds = 0
        self.longest = 0.0

    def take(self, size: int) -> bool:
        """
        Room for a command of C{size} bytes: C{False} if it does not fit.
        """
        if self.bytes + size > self.max_bytes:
            return False
        if self.waiting == 0:
            self.pause()
        self.bytes += size
        self.waiting += 1
        self.held += 1
        return True

    def give(self, size: int) -> None:
        """
        A command held is written or failed.
        """
        self.bytes -= size
        self.waiting -= 1
        if self.waiting == 0:
            self.resume()


class Hold:
    """
    One link's held commands, oldest first, until L{flush} or L{fail}.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        reason: str,
        clock: IReactorTime,
        budget: HoldBudget,
        on_expired: Callable[["Hold"], None],
        seconds: float = HOLD_SECS,
    ) -> None:
        self.name = name
        self.reason = reason
        self.seconds = seconds
        self._clock = clock
        self._budget = budget
        self.started = clock.seconds()
        self._queue: Deque[tuple[bytes, Callable[[Any], None]]] = deque()
        #: a command did not fit: every later one fails too
        self.full = False
        self._deadline: Optional[IDelayedCall] = clock.callLater(
            seconds, on_expired, self
        )

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, command: bytes, on_reply: Callable[[Any], None]) -> bool:
        """
        Hold C{command} (RESP): C{False} if it is past the byte bound (the
        caller fails it at once).
        """
        if self.full or not self._budget.take(len(command)):
            self._budget.failed += 1
            if not self.full:
                self.full = True
                self._log.warn(
                    "redis {name}: more than {limit} bytes held while {reason}: client "
                    "messages fail from now on until the connection is ready",
                    name=self.name, limit=self._budget.max_bytes, reason=self.reason,
                )
            return False
        self._queue.append((command, on_reply))
        return True

    def _end(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def flush(self, write: Callable[[bytes, Callable[[Any], None]], None]) -> None:
        """
        The new connection is usable: write every command held, in order,
        with C{write(command, on_reply)}.
        """
        self._end()
        queue = self._queue
        budget = self._budget
        count = len(queue)
        size = 0
        while queue:
            command, on_reply = queue.popleft()
            size += len(command)
            write(command, on_reply)
            budget.give(len(command))
        took = self._clock.seconds() - self.started
        budget.holds += 1
        budget.longest = max(budget.longest, took)
        self._log.info(
            "redis {name}: connection ready {secs:.3f}s after {reason}; {n} commands "
            "({size} bytes) held meanwhile, now sent",
            name=self.name, secs=took, reason=self.reason, n=count, size=size,
        )

    def fail(self, error: Exception) -> None:
        """
        Past the time bound, or the link stops: every command held gets
        C{error}, in order.
        """
        self._end()
        queue = self._queue
        budget = self._budget
        count = len(queue)
        while queue:
            command, on_reply = queue.popleft()
            budget.failed += 1
            budget.give(len(command))
            on_reply(error)
        if count:
            self._log.error(
                "redis {name}: {n} held commands failed ({why})",
                name=self.name, n=count, why=str(error),
            )
