"""
Autobahn's per-connection deadlines, in buckets that cost O(1) to join and
to leave.

Every open connection keeps a deadline or two on Autobahn's batched timer:
the next ping, then the pong's deadline, which is cancelled when the pong
comes (so, nearly always). txaio's batched timer keeps each one-second
bucket as a list and cancels with C{list.remove}, a walk over the bucket:
with 19,000 idle connections pinging every 30 s a bucket holds about 630
calls and every pong walks it, about an eighth of the process's idle CPU,
growing with the square of the connections. Here a bucket is an
insertion-ordered dict, so a cancel is one removal whatever the bucket's
size, and the calls still run in the order they were made.

Deadlines are rounded up to the bucket's end: a call fires between its
deadline and one bucket later, never early (txaio rounded down, so a
deadline fired up to a second early and a sub-second ping timeout at
once).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: cleared by the start-up check (L{wsproxy.fast.borrowed}) if Autobahn no
#: longer schedules its connections' deadlines on its factory's
#: C{_batched_timer}: the proxy's factory then hands Autobahn its own timer
#: back (L{wsproxy.websocket.protocol.ProxyFactory._batched_timer})
ENABLED = True

#: calls run per reactor turn when a bucket falls due; the rest in the next
#: turns, so that a bucket of thousands does not hold up delivery
CHUNK = 1000


class BucketCall:
    """
    A call made with L{BucketTimer.call_later}; C{cancel} before it runs
    and it never does.
    """

    __slots__ = ("_timer", "_due", "_func", "_args", "_kwargs")

    def __init__(self, timer: BucketTimer, due: float, func: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._timer = timer
        self._due = due
        self._func: Callable[..., Any] | None = func
        self._args = args
        self._kwargs = kwargs

    def active(self) -> bool:
        return self._func is not None

    def cancel(self) -> None:
        if self._func is not None:
            self._func = None
            self._args = ()
            self._kwargs = {}
            self._timer._forget(self)

    def _run(self) -> None:
        func, args, kwargs = self._func, self._args, self._kwargs
        if func is None:
            return
        self._func = None
        self._args = ()
        self._kwargs = {}
        func(*args, **kwargs)


class BucketTimer:
    """
    The C{call_later} of txaio's C{IBatchedTimer} (what Autobahn's factory
    keeps as C{_batched_timer}), on C{clock}.

    @param bucket: seconds per bucket.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, bucket: float = 1.0) -> None:
        self._clock = clock
        self._bucket = bucket
        #: bucket end -> (its timer, its calls in order)
        self._buckets: dict[float, tuple[Any, dict[BucketCall, None]]] = {}

    def __len__(self) -> int:
        """Calls waiting to run."""
        return sum(len(calls) for _, calls in self._buckets.values())

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> BucketCall:
        now = self._clock.seconds()
        due = math.ceil((now + delay) / self._bucket) * self._bucket
        call = BucketCall(self, due, func, args, kwargs)
        bucket = self._buckets.get(due)
        if bucket is None:
            bucket = (self._clock.callLater(max(0.0, due - now), self._fire, due), {})
            self._buckets[due] = bucket
        bucket[1][call] = None
        return call

    def _forget(self, call: BucketCall) -> None:
        bucket = self._buckets.get(call._due)
        if bucket is None:
            return  # its bucket is running: the call is skipped
        calls = bucket[1]
        calls.pop(call, None)
        if not calls:
            del self._buckets[call._due]
            bucket[0].cancel()

    def _fire(self, due: float) -> None:
        _, calls = self._buckets.pop(due)
        self._run(list(calls))

    def _run(self, calls: list[BucketCall]) -> None:
        for call in calls[:CHUNK]:
            try:
                call._run()
            except Exception:
                self._log.failure("a timed call failed")
        if len(calls) > CHUNK:
            self._clock.callLater(0, self._run, calls[CHUNK:])
