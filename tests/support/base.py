"""
What every fixture needs: the checkout's root, waiting on a condition
against a deadline, and leaving the test reactor clean of Autobahn's
timers.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from twisted.internet import defer, reactor, task

from bench.ports import free_port

__all__ = ["ROOT", "clean_autobahn_timers", "free_port", "wait_for"]

#: the checkout (tests/support/ is two levels below it)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01
) -> defer.Deferred:
    """
    Poll C{condition} until it is true; fail with an AssertionError after
    C{timeout} seconds. (A deadline on a condition, not a sleep.)
    """

    async def poll() -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s: {condition}")
            await task.deferLater(reactor, interval, lambda: None)

    return defer.ensureDeferred(poll())


def clean_autobahn_timers() -> None:
    """
    Autobahn schedules its handshake and close timeouts on a batched timer
    (txaio's, or the proxy's L{wsproxy.fast.timers.BucketTimer}), whose delayed
    calls outlive the connections; cancel them so the test reactor is left
    clean.
    """
    for call in reactor.getDelayedCalls():
        module = getattr(call.func, "__module__", "") or ""
        if module.startswith(("txaio", "autobahn", "wsproxy.fast.timers")) and call.active():
            call.cancel()
