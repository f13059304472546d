"""
RedisLink's deadline sweep, with a fake connection and a fake clock.
"""

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import Settings
from wsproxy.redis import RedisLink, RedisUnavailable


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


class FakeProtocol:
    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.replies: list[defer.Deferred] = []

    stuck = False
    sent = answered = 0

    def command(self, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.sent += 1

        def answered(result: Any) -> Any:
            self.answered += 1
            return result

        self.replies.append(d)
        return d.addBoth(answered)


class SweepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.link = RedisLink("commands", None, Settings(auth_timeout=5), self.clock)
        self.proto = FakeProtocol()
        self.link.ready = self.proto

    def sweep_for(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.5)):
            self.clock.advance(0.5)
            self.link.sweep()

    def test_unanswered_command_aborts_connection(self) -> None:
        """
        A command left unanswered for longer than the deadline, while the
        process sweeps on time, aborts the connection.
        """
        self.link.execute("PING").addErrback(lambda f: None)
        self.sweep_for(5)
        self.assertEqual(self.proto.transport.aborted, 0)
        self.sweep_for(1)
        self.assertEqual(self.proto.transport.aborted, 1)

    def test_progress_keeps_connection(self) -> None:
        """
        As long as replies keep coming the connection is kept, however many
        commands are outstanding and however old the newest is.
        """
        for _ in range(20):
            self.link.execute("PUBLISH", "c", b"x")
        for reply in self.proto.replies:
            self.sweep_for(1)
            reply.callback(1)
        self.assertEqual(self.proto.transport.aborted, 0)

    def test_stalled_process_does_not_blame_redis(self) -> None:
        """
        If the sweep itself ran late (the process was busy), the wait starts
        over instead of aborting.
        """
        self.link.execute("PING").addErrback(lambda f: None)
        self.link.sweep()
        self.clock.advance(30)
        self.link.sweep()
        self.assertEqual(self.proto.transport.aborted, 0)

    def test_not_connected_fails_at_once(self) -> None:
        """
        With no usable connection a command fails immediately.
        """
        self.link.ready = None
        self.failureResultOf(self.link.execute("PING"), RedisUnavailable)
