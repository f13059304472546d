"""
The proxy's deadlines, timed from outside against the real daemon
(C{python -m wsproxy}) and a real redis-server: the shutdown grace period
for a client that ignores the close 1001, and the ping timeout for a client
that stops answering pings.

Every bound is of the form "not before the deadline (less 0.1 s of clock
granularity), and not more than a generous margin after it": the machine
running the suite may be busy, so lateness is allowed for, earliness never.
Autobahn's timers may be up to a second late (see
L{wsproxy.fast.timers.BucketTimer}), which the margins include.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

from .support import (
    Daemon,
    RedisTestCase,
    connect,
    daemon_env,
    raw_upgrade,
    start_daemon,
    wait_for,
)

#: how late a deadline may be met on a busy 2-core machine
MARGIN = 3.0


class DeadlineTestCase(RedisTestCase):
    timeout = 60

    def start(self, **env: str) -> Daemon:
        return start_daemon(self, daemon_env(self.redis.url, **env))


class ShutdownGraceTests(DeadlineTestCase):
    #: longer than Autobahn's 5 s closing-handshake timeout, which must not
    #: cut the grace period short
    GRACE = 7.0

    async def test_client_ignoring_close_dropped_after_grace_period(self) -> None:
        """
        SIGTERM with SHUTDOWN_DRAIN_SECS=0: a client that completed the
        opening handshake and never answers the close 1001 gets the close
        frame at once and is dropped when SHUTDOWN_GRACE_PERIOD_SECS runs
        out (not before, not much after), which is logged; the process then
        exits 0.
        """
        daemon = self.start(SHUTDOWN_GRACE_PERIOD_SECS=f"{self.GRACE:g}")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        c = await raw_upgrade(port, "/a/ws/s1", {"Authorization": "Bearer tok"})
        self.addCleanup(c.abort)
        self.assertEqual(c.status, 101, c.data)
        await wait_for(lambda: b"opened: session=s1" in daemon.out.output)

        signalled = time.monotonic()
        daemon.signal(signal.SIGTERM)
        await wait_for(lambda: c.close_code() is not None or c.lost_at is not None)
        self.assertEqual(c.close_code(), (1001, b"server shutting down"))
        self.assertLess(time.monotonic() - signalled, MARGIN)
        # the client does not answer; the proxy waits for the grace period
        await wait_for(lambda: c.lost_at is not None, timeout=self.GRACE + 2 * MARGIN)
        assert c.lost_at is not None
        held = c.lost_at - signalled
        self.assertGreaterEqual(held, self.GRACE - 0.1)
        self.assertLess(held, self.GRACE + MARGIN)
        self.assertEqual(await daemon.out.ended, 0)
        log = daemon.out.output.decode()
        # the session ended with the 1001 (its close line then, with that
        # code); the connection, dropped after the grace period, is gone
        # before Redis is closed
        self.assertRegex(log, r"closed: session=s1 .* code=1001(.|\n)*"
                              r"abort=True: shutdown grace period over(.|\n)*"
                              r"redis commands connection closed(.|\n)*shutdown complete")


class PingTimeoutTests(DeadlineTestCase):
    INTERVAL = 1.0
    TIMEOUT = 2.0

    async def test_silent_client_dropped_after_ping_timeout(self) -> None:
        """
        WS_PING_INTERVAL_SECS=1, WS_PING_TIMEOUT_SECS=2: a client that
        receives the ping but never answers it is dropped WS_PING_TIMEOUT_SECS
        after the ping, so interval + timeout after it opened. The proxy
        sends no close frame: it drops the TCP connection, so the client
        sees close code 1006 (abnormal closure, not clean), and the proxy
        logs Autobahn's "ping timeout" line and "closed: ... code=1006", and
        releases the session's subscription.
        """
        daemon = self.start(WS_PING_INTERVAL_SECS=f"{self.INTERVAL:g}",
                            WS_PING_TIMEOUT_SECS=f"{self.TIMEOUT:g}")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        c = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok", auto_ping=False)
        opened = time.monotonic()
        client_port = c.transport.getHost().port
        pings: list[float] = []
        # a deaf client that notes when each ping arrived
        c.onPing = lambda payload: pings.append(time.monotonic())
        closed_at: list[float] = []
        c.factory.closed.addCallback(lambda result: (closed_at.append(time.monotonic()), result)[1])

        code, _ = await c.factory.closed
        self.assertEqual(code, 1006)
        self.assertFalse(c.wasClean)
        self.assertEqual(len(pings), 1, pings)
        first_ping = pings[0] - opened
        self.assertGreaterEqual(first_ping, self.INTERVAL - 0.1)
        self.assertLess(first_ping, self.INTERVAL + MARGIN)
        after_ping = closed_at[0] - pings[0]
        self.assertGreaterEqual(after_ping, self.TIMEOUT - 0.1)
        self.assertLess(after_ping, self.TIMEOUT + MARGIN)
        total = closed_at[0] - opened
        self.assertGreaterEqual(total, self.INTERVAL + self.TIMEOUT - 0.1)
        self.assertLess(total, self.INTERVAL + self.TIMEOUT + 2 * MARGIN)

        await wait_for(lambda: re.search(rb"closed: session=s1 .* code=1006", daemon.out.output))
        log = daemon.out.output.decode()
        self.assertRegex(
            log,
            rf"dropping connection to peer tcp4:127\.0\.0\.1:{client_port} with abort=True: "
            r"WebSocket ping timeout \(peer did not respond with pong in time\)",
        )
        await wait_for(lambda: self.r.pubsub_numsub("session:s1:down")
                       == [(b"session:s1:down", 0)])

    async def test_answering_client_kept_with_subsecond_timeout(self) -> None:
        """
        WS_PING_TIMEOUT_SECS=0.5: a client that answers every ping stays
        connected over several ping intervals (the timeout is not rounded
        down to nothing).
        """
        daemon = self.start(WS_PING_INTERVAL_SECS="1", WS_PING_TIMEOUT_SECS="0.5")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        c = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")
        self.addCleanup(c.close_and_wait)
        pings: list[Any] = []
        answer = c.onPing
        c.onPing = lambda payload: (pings.append(payload), answer(payload))
        await wait_for(lambda: len(pings) >= 3 or c.state != c.STATE_OPEN, timeout=20)
        self.assertEqual(c.state, c.STATE_OPEN)
        self.assertNotIn(b"ping timeout", daemon.out.output)
        self.assertIsNone(re.search(rb"closed: session=s1", daemon.out.output))
