"""
RedisLink's deadline sweep, with a fake connection and a fake clock.
"""

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from wsproxy.config import Settings
from wsproxy.redis.redisendpoint import ConnectFailures, ReportingEndpoint, describe_failure
from wsproxy.redis.redislink import RedisLink, RedisUnavailable
from .support import wait_for


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


class ConnectFailureReportTests(SynchronousTestCase):
    """
    L{ConnectFailures}: every failed attempt counted by category; one log
    line per distinct reason, then at most one per interval.
    """

    def setUp(self) -> None:
        from twisted.logger import globalLogPublisher

        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.failures = ConnectFailures(self.clock, "rediss://redis.example:6380", interval=60)

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if "connection failed" in formatEvent(e)]

    def test_repeated_failure_logged_once_per_interval(self) -> None:
        """
        The same reason a second apart is logged once; after the interval,
        once more with the number of attempts in between. Every attempt is
        counted.
        """
        for _ in range(10):
            self.failures.failed("refused", "connection refused")
            self.clock.advance(1)
        self.assertEqual(self.lines(), [
            "redis rediss://redis.example:6380: connection failed: connection refused; retrying",
        ])
        self.clock.advance(60)
        self.failures.failed("refused", "connection refused")
        self.assertEqual(len(self.lines()), 2)
        self.assertIn("(9 more failed attempts since the last report)", self.lines()[1])
        self.assertEqual(self.failures.counts, {"refused": 11})

    def test_new_reason_logged_at_once(self) -> None:
        """
        A different reason is news: logged at once, whatever came before.
        """
        self.failures.failed("refused", "connection refused")
        self.failures.failed("auth", "WRONGPASS invalid username-password pair")
        self.assertEqual(len(self.lines()), 2)
        self.assertIn("WRONGPASS", self.lines()[1])

    def test_recovery_makes_the_next_failure_news(self) -> None:
        """
        After a connection became usable, the same failure is logged again
        at once.
        """
        self.failures.failed("refused", "connection refused")
        self.failures.recovered()
        self.failures.failed("refused", "connection refused")
        self.assertEqual(len(self.lines()), 2)


class ReportingEndpointTests(SynchronousTestCase):
    """
    L{ReportingEndpoint} reports failed attempts, not cancelled ones.
    """

    def attempt(self, exc: BaseException) -> list[Any]:
        from twisted.python.failure import Failure

        reported: list[Any] = []

        class Failing:
            def connect(self, factory: Any) -> defer.Deferred:
                return defer.fail(Failure(exc))

        endpoint = ReportingEndpoint(Failing(), lambda f: reported.append(f.value))
        self.failureResultOf(endpoint.connect(None))
        return reported

    def test_cancelled_attempt_not_reported(self) -> None:
        """
        An attempt cancelled because its link stops (shutdown, a retired
        cluster node) is not a connection failure: a TCP attempt then fails
        with ConnectingCancelledError, whose text is only the address, and
        was logged as "connection failed: HostnameAddress(...); retrying".
        """
        from twisted.internet import address, error

        cancelled = error.ConnectingCancelledError(address.HostnameAddress(b"127.0.0.1", 7000))
        self.assertEqual(self.attempt(cancelled), [])
        self.assertEqual(self.attempt(defer.CancelledError()), [])
        refused = error.ConnectionRefusedError()
        self.assertEqual(self.attempt(refused), [refused])


class DescribeFailureTests(SynchronousTestCase):
    """
    describe_failure names the cause of a failed attempt in one line.
    """

    def describe(self, exc: BaseException) -> tuple[str, str]:
        from twisted.python.failure import Failure

        return describe_failure(Failure(exc), None, Settings())

    def test_tcp(self) -> None:
        from twisted.internet import error

        self.assertEqual(self.describe(error.ConnectionRefusedError()),
                         ("refused", "connection refused"))
        self.assertEqual(self.describe(error.DNSLookupError("no such host"))[0], "dns")
        self.assertEqual(self.describe(error.TimeoutError())[0], "timeout")

    def test_tls(self) -> None:
        from OpenSSL import SSL
        from service_identity import VerificationError

        category, text = self.describe(VerificationError(errors=[]))
        self.assertEqual(category, "tls_hostname")
        self.assertIn("'127.0.0.1'", text)
        category, text = self.describe(
            SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")])
        )
        self.assertEqual(
            (category, text), ("tls", "TLS handshake failed: tlsv13 alert certificate required")
        )


class _Reader:
    """
    A socket the reactor reads: C{received} is called with what arrives.
    """

    def __init__(self, sock: Any, received: Any) -> None:
        self.sock = sock
        self.received = received

    def fileno(self) -> int:
        fileno: int = self.sock.fileno()
        return fileno

    def doRead(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.received(data)

    def logPrefix(self) -> str:
        return "reader"

    def connectionLost(self, reason: Any) -> None:
        pass


class DeadlineTests(SynchronousTestCase):
    """
    with_deadline against the real reactor: what decides a timeout is
    whether the reply has arrived, not whether the process ran in time.
    """

    def deadline_over_stall(self, seconds: float, stall: float) -> list[Any]:
        """
        A command with a C{seconds} deadline whose reply arrives in time,
        while the process is held up (for C{stall}, in an I/O handler)
        until after the deadline: the reactor then sees the due timer
        before the socket the reply waits in. The outcome of the command.
        """
        import socket
        import time

        from twisted.internet import reactor

        from wsproxy.redis.redislink import with_deadline

        redis_end, proxy_end = socket.socketpair()
        trigger, stalled = socket.socketpair()
        reply: defer.Deferred[bytes] = defer.Deferred()
        outcome: list[Any] = []

        def stall_here(_: bytes) -> None:
            redis_end.sendall(b"+OK\r\n")  # Redis answers in time...
            time.sleep(stall)  # ...while the proxy is held up past the deadline

        readers = [_Reader(proxy_end, reply.callback), _Reader(stalled, stall_here)]
        for reader in readers:
            reactor.addReader(reader)  # type: ignore[attr-defined]
        try:
            with_deadline(reply, seconds, reactor).addBoth(outcome.append)
            trigger.sendall(b"go")
            until = time.monotonic() + 30
            while not outcome and time.monotonic() < until:
                reactor.iterate(0.05)  # type: ignore[attr-defined]
        finally:
            for reader in readers:
                reactor.removeReader(reader)  # type: ignore[attr-defined]
            for sock in (redis_end, proxy_end, trigger, stalled):
                sock.close()
        return outcome

    def test_reply_waiting_after_a_stall(self) -> None:
        """
        A reply that arrived while the process was held up past the
        deadline is read before the deadline is decided: no RedisTimeout.
        """
        self.assertEqual(self.deadline_over_stall(0.05, 0.3), [b"+OK\r\n"])

    def test_no_reply(self) -> None:
        """
        Without a reply, the deadline still ends the wait with RedisTimeout.
        """
        import time

        from twisted.internet import reactor

        from wsproxy.redis.redislink import RedisTimeout, with_deadline

        outcome: list[Any] = []
        with_deadline(defer.Deferred(), 0.05, reactor).addBoth(outcome.append)
        until = time.monotonic() + 30
        while not outcome and time.monotonic() < until:
            reactor.iterate(0.05)  # type: ignore[attr-defined]
        self.assertEqual(len(outcome), 1)
        outcome[0].trap(RedisTimeout)

    def test_caller_cancels(self) -> None:
        """
        A caller's own cancel (the client left) stays a CancelledError,
        and the deadline's timer goes with it.
        """
        clock = Clock()
        from wsproxy.redis.redislink import with_deadline

        d = with_deadline(defer.Deferred(), 5, clock)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class ClosedBeforeReadyTests(TestCase):
    """
    A plain TCP connection that the server closes before it is usable is
    reported as such (category "closed"): by then Twisted has dropped the
    transport's socket, so the failure must be described without it (it
    once raised AttributeError from getHandle and went unreported; seen
    when a replica being promoted dropped wsproxy's connection).
    """

    async def test_closed_by_server_before_ready(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol

        class Slammer(Protocol):
            def connectionMade(self) -> None:
                self.transport.loseConnection()  # type: ignore[attr-defined]

        port = reactor.listenTCP(0, Factory.forProtocol(Slammer), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        link = RedisLink("commands", endpoint, Settings(auth_timeout=5), reactor)
        link.start()
        self.addCleanup(link.stop)
        await wait_for(lambda: link.failures.counts["closed"] >= 2, timeout=20)
        self.assertIn("connection closed before Redis answered", link.last_error or "")
