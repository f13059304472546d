"""
L{wsproxy.fast.timers.BucketTimer}, the timer Autobahn's per-connection
deadlines run on, with a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.fast import timers
from wsproxy.fast.timers import BucketTimer

from .memory import MemoryTestCase

PING = 0x9


class TurnClock(Clock):
    """
    A clock whose C{advance} is one reactor turn: what is due runs, but
    not what those calls schedule for now (that waits for the next turn,
    as with the reactor).
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        due = [call for call in self.calls if call.getTime() <= self.rightNow]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class BucketTimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100.3)
        self.timer = BucketTimer(self.clock)
        self.ran: list[Any] = []

    def test_never_early(self) -> None:
        """
        A call fires at the end of its deadline's bucket: not before its
        deadline, less than a bucket after it.
        """
        self.timer.call_later(0.4, self.ran.append, "a")  # due 100.7 -> 101
        self.timer.call_later(0.8, self.ran.append, "b")  # due 101.1 -> 102
        self.clock.advance(0.39)
        self.assertEqual(self.ran, [])
        self.clock.advance(0.31)  # 101.0
        self.assertEqual(self.ran, ["a"])
        self.clock.advance(0.99)
        self.assertEqual(self.ran, ["a"])
        self.clock.advance(0.01)
        self.assertEqual(self.ran, ["a", "b"])

    def test_one_timer_per_bucket_in_order(self) -> None:
        """
        Calls due in the same bucket share one reactor timer and run in the
        order they were made, with their arguments.
        """
        for i in range(5):
            self.timer.call_later(0.5, self.ran.append, i)
        self.timer.call_later(0.6, lambda **kw: self.ran.append(kw), key="v")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.timer), 6)
        self.clock.advance(1)
        self.assertEqual(self.ran, [0, 1, 2, 3, 4, {"key": "v"}])
        self.assertEqual(len(self.timer), 0)

    def test_cancel(self) -> None:
        """
        A cancelled call never runs; cancelling twice is harmless; when a
        bucket's last call is cancelled its reactor timer goes too.
        """
        first = self.timer.call_later(0.5, self.ran.append, 1)
        second = self.timer.call_later(0.5, self.ran.append, 2)
        first.cancel()
        first.cancel()
        self.assertFalse(first.active())
        self.assertTrue(second.active())
        second.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2)
        self.assertEqual(self.ran, [])

    def test_cancel_while_its_bucket_runs(self) -> None:
        """
        A call cancelled by an earlier call of the same bucket (a pong's
        deadline cancelled as the ping is sent) does not run.
        """
        self.timer.call_later(0.5, self.ran.append, "first")
        self.timer.call_later(0.5, lambda: victim.cancel())
        victim = self.timer.call_later(0.5, self.ran.append, "victim")
        self.clock.advance(1)
        self.assertEqual(self.ran, ["first"])

    def test_chunks(self) -> None:
        """
        A bucket of more than CHUNK calls runs CHUNK per reactor turn, in
        order, and all of them.
        """
        clock = TurnClock()
        self.timer = BucketTimer(clock)
        for i in range(timers.CHUNK * 2 + 5):
            self.timer.call_later(0.5, self.ran.append, i)
        clock.advance(1)
        self.assertEqual(len(self.ran), timers.CHUNK)
        clock.advance(0)
        self.assertEqual(len(self.ran), timers.CHUNK * 2)
        clock.advance(0)
        self.assertEqual(self.ran, list(range(timers.CHUNK * 2 + 5)))

    def test_failure_logged_others_run(self) -> None:
        """
        A call that raises is logged; the calls after it still run.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.timer.call_later(0.5, lambda: 1 / 0)
        self.timer.call_later(0.5, self.ran.append, "after")
        self.clock.advance(1)
        self.assertEqual(self.ran, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(any(e.get("log_format") == "a timed call failed" for e in events))


class AutobahnSchedulesOnItTests(MemoryTestCase):
    """
    The proxy's Autobahn connections really schedule their deadlines on
    the factory's BucketTimer (not txaio's): the auto-ping, the pong's
    deadline, the closing handshake's deadline.
    """

    def test_ping_pong_and_close_deadlines(self) -> None:
        """
        An open connection's next ping waits on the BucketTimer; once sent,
        so does the pong's deadline, and the closing handshake's; when
        they run out the connection is closed and nothing is left.
        """
        memory = self.start(ping_interval=10.0, ping_timeout=5.0)
        client = memory.open()
        factory = memory.site.ws_factory
        timer = factory._batched_timer
        self.assertIsInstance(timer, BucketTimer)
        protocol = client.protocol
        self.assertIsInstance(protocol.autoPingPendingCall, timers.BucketCall)
        self.assertEqual(len(timer), 1, "the next ping")
        memory.clock.advance(11)
        self.assertIn(PING, [f.opcode for f in client.frames()], "the ping was sent")
        self.assertIsInstance(protocol.autoPingTimeoutCall, timers.BucketCall)
        self.assertTrue(protocol.autoPingTimeoutCall.active())
        self.assertEqual(len(timer), 1, "the pong's deadline")
        protocol.sendClose(1000)
        self.assertIsInstance(protocol.closeHandshakeTimeoutCall, timers.BucketCall)
        memory.clock.advance(6)  # no pong, no close answered: the deadlines run
        self.assertTrue(client.closed)
        self.assertEqual(len(timer), 0)
