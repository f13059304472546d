"""
wsproxy.fast.poll: the epoll reactor's turn without a legacy log context, on the
real reactor and real loopback sockets.
"""

from __future__ import annotations

import signal
import socket
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from wsproxy.fast import poll
from wsproxy.process.daemon import ProxyService

from .support import wait_for
from .support.fakes import FakeEndpoint, FakeProxy


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"boom"):
            raise ZeroDivisionError("a handler that raises")
        self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        # wrapped: a Failure given to callback would fire the errbacks
        self.factory.lost.callback([reason])  # type: ignore[attr-defined]


class Collect(protocol.Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[list[Failure]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.done.called:
            self.done.callback(self.received)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback([reason])


class OtherReactorTests(SynchronousTestCase):
    def test_leaves_other_reactors_alone(self) -> None:
        """
        A reactor that is not the epoll reactor (here the test doubles) is
        not changed, and install says so.
        """
        for other in (MemoryReactor(), Clock()):
            self.assertFalse(poll.install(other))
            self.assertNotIn("doIteration", other.__dict__)


class EpollTests(TestCase):
    """
    The suite runs on Linux under Twisted's default reactor, epoll: these
    tests install the lean turn on it for their own duration.
    """

    def setUp(self) -> None:
        self.assertIsInstance(reactor, EPollReactor, "the suite runs on the epoll reactor")
        self.contexts = 0
        original = log.callWithLogger

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.contexts += 1
            return original(*args, **kwargs)

        self.patch(log, "callWithLogger", counting)

    def install(self) -> None:
        self.assertTrue(poll.install(reactor))
        self.addCleanup(poll.uninstall, reactor)

    def serve(self) -> tuple[Any, defer.Deferred[list[Failure]]]:
        factory = protocol.Factory.forProtocol(Echo)
        factory.lost = defer.Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port, factory.lost  # type: ignore[attr-defined]

    async def connect(self, port: Any, expected: int) -> Collect:
        client = Collect(expected)
        endpoint = protocol.ClientCreator(reactor, lambda: client)
        await endpoint.connectTCP("127.0.0.1", port.getHost().port)
        self.addCleanup(lambda: client.transport.loseConnection())
        return client

    async def test_the_reactor_turn_skips_the_log_context(self) -> None:
        """
        Without install every event goes through callWithLogger (which
        shows that this test can see it); once installed, reads and
        writes of real sockets (a megabyte both ways, so that the writes
        wait for the socket to be writable) are all handled without it.
        """
        port, _ = self.serve()
        data = bytes(range(256)) * 4096
        client = await self.connect(port, len(data))
        client.transport.write(b"x")
        await wait_for(lambda: len(client.received) == 1, timeout=30)
        self.assertGreater(self.contexts, 0)

        self.install()
        client.received = b""
        client.expected = len(data)
        self.contexts = 0
        client.transport.write(data)
        echoed = await client.done
        self.assertEqual(echoed, data)
        self.assertEqual(self.contexts, 0)

    async def test_waits_again_without_the_reactors_loop(self) -> None:
        """
        Installed, the turn waits for the next events itself while the
        reactor's loop would have nothing to do (no timed call due or
        added, no call from a thread): 100 round trips one at a time take
        far fewer passes of that loop than without it, which takes at
        least one per round trip. Timed calls and calls from threads are
        still run, by the reactor's loop.
        """
        port, _ = self.serve()
        client = await self.connect(port, 1)
        passes = 0
        original = reactor.runUntilCurrent  # type: ignore[attr-defined]

        def counting() -> None:
            nonlocal passes
            passes += 1
            original()

        self.patch(reactor, "runUntilCurrent", counting)

        async def round_trips() -> None:
            # each waits on the echo itself (no timed call to poll with)
            for i in range(100):
                client.received = b""
                client.done = defer.Deferred()
                client.transport.write(b"%d" % (i % 10))
                await client.done

        await round_trips()
        without = passes
        self.assertGreaterEqual(without, 100)
        self.install()
        passes = 0
        await round_trips()
        self.assertLess(passes, without // 2)

        timed: defer.Deferred[str] = defer.Deferred()
        reactor.callLater(0.05, timed.callback, "timed")  # type: ignore[attr-defined]
        self.assertEqual(await timed, "timed")
        threaded: defer.Deferred[str] = defer.Deferred()
        thread = threading.Thread(
            target=reactor.callFromThread,  # type: ignore[attr-defined]
            args=(threaded.callback, "from a thread"))
        thread.start()
        self.assertEqual(await threaded, "from a thread")
        thread.join()

    async def test_a_handler_that_raises_loses_only_its_connection(self) -> None:
        """
        A protocol whose dataReceived raises is disconnected with that
        error (as Twisted's own turn does), the error is logged, and the
        other connections keep working.
        """
        self.install()
        port, server_lost = self.serve()
        other_port, _ = self.serve()
        victim = await self.connect(port, 1)
        bystander = await self.connect(other_port, 5)
        victim.transport.write(b"boom")
        bystander.transport.write(b"hello")
        [reason] = await server_lost
        self.assertTrue(reason.check(ZeroDivisionError))
        await victim.lost
        self.assertEqual(await bystander.done, b"hello")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.contexts, 0)

    def test_uninstall_restores_the_reactors_own_turn(self) -> None:
        """
        uninstall gives the reactor back its class's doIteration.
        """
        poll.install(reactor)
        self.assertIn("doIteration", reactor.__dict__)
        poll.uninstall(reactor)
        self.assertNotIn("doIteration", reactor.__dict__)
        self.assertEqual(reactor.doIteration, reactor.doPoll)  # type: ignore[attr-defined]

    def test_the_daemon_installs_it_once_running(self) -> None:
        """
        A ProxyService built with lean_poll (as twistd's and every worker's
        are) installs the lean turn once the reactor runs; one built
        without it (as in tests) leaves the reactor alone.
        """
        plain = ProxyService(FakeProxy(), object(), FakeEndpoint(defer.Deferred()),  # type: ignore[arg-type]
                             reactor)
        plain._running()
        self.assertNotIn("doIteration", reactor.__dict__)
        lean = ProxyService(FakeProxy(), object(), FakeEndpoint(defer.Deferred()),  # type: ignore[arg-type]
                            reactor, lean_poll=True)
        self.addCleanup(poll.uninstall, reactor)
        lean._running()
        self.assertIn("doIteration", reactor.__dict__)


class LongWaitTests(SynchronousTestCase):
    def test_a_timed_call_weeks_away_is_waited_for_in_bounds(self) -> None:
        """
        The turn's own wait is capped as the reactor's loop caps it:
        epoll_wait takes at most 2**31 ms, and with a timed call 40 days
        away an uncapped wait would raise OverflowError. Here on a reactor
        of its own, marked running: a socket event, then the turn waits
        again (the far call is the only one) until a thread's write makes
        the next event, whose handler adds a timed call: back to the loop.
        """
        from twisted.internet.epollreactor import EPollReactor

        own = EPollReactor()
        self.addCleanup(own._poller.close)
        self.addCleanup(own.waker.connectionLost, None)  # its pipe
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reads: list[bytes] = []

        class Reader:
            def fileno(self) -> int:
                return ours.fileno()

            def doRead(self) -> None:
                reads.append(ours.recv(100))
                if len(reads) == 2:
                    own.callLater(0, lambda: None)

            def logPrefix(self) -> str:
                return "reader"

        own.addReader(Reader())  # type: ignore[arg-type]
        far = own.callLater(40 * 86400, lambda: None)
        self.addCleanup(far.cancel)
        own._insertNewDelayedCalls()
        own.running = True
        self.assertTrue(poll.install(own))
        theirs.send(b"first")
        later = threading.Timer(0.2, theirs.send, (b"second",))
        later.start()
        self.addCleanup(later.join)
        with _bounded(own, 10):
            own.doIteration(None)
        self.assertEqual(reads, [b"first", b"second"])


class _TurnTookTooLong(Exception):
    pass


@contextmanager
def _bounded(own: Any, seconds: float) -> Iterator[None]:
    """
    Fail (rather than hang the suite) if C{own}'s turn has not come back
    within C{seconds}: SIGALRM breaks the wait with L{_TurnTookTooLong},
    and marks the reactor stopped so that a turn that caught it returns
    at its next check.
    """
    fired = []

    def alarm(signum: int, frame: Any) -> None:
        fired.append(True)
        own.running = False
        raise _TurnTookTooLong(f"the turn did not come back within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:
        raise _TurnTookTooLong(f"the turn did not come back within {seconds} s")


class BoundedWaitTests(SynchronousTestCase):
    def test_a_turn_that_never_returns_fails(self) -> None:
        """
        The bound of the long-wait test works: a turn with nothing to wake
        it fails with _TurnTookTooLong after the bound instead of hanging.
        """
        from twisted.internet.epollreactor import EPollReactor

        own = EPollReactor()
        self.addCleanup(own._poller.close)
        self.addCleanup(own.waker.connectionLost, None)
        own.running = True
        self.assertTrue(poll.install(own))
        with self.assertRaises(_TurnTookTooLong):
            with _bounded(own, 0.3):
                own.doIteration(None)


class _Abort(BaseException):
    """Not an Exception: Twisted's turn catches it all the same."""


class _Selectable:
    """
    One end of a socket pair as a reactor selectable that records what
    the reactor does to it; C{behaviour} says what doRead does.
    """

    def __init__(self, sock: socket.socket, record: list[Any], behaviour: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.record = record
        self.behaviour = behaviour
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def logPrefix(self) -> str:
        return "selectable"

    def doRead(self) -> Any:
        self.record.append("doRead")
        self.sock.recv(100)
        if self.behaviour == "abort":
            raise _Abort()
        if self.behaviour == "done":
            raise error.ConnectionDone()
        if self.behaviour == "says-lost":
            return error.ConnectionLost()
        return None

    def doWrite(self) -> None:
        self.record.append("doWrite")

    def connectionLost(self, reason: Failure) -> None:
        self.record.append(("connectionLost", reason.type))


@implementer(IHalfCloseableDescriptor)
class _HalfCloseable(_Selectable):
    def readConnectionLost(self, reason: Failure) -> None:
        self.record.append(("readConnectionLost", reason.type))


class TwistedSemanticsMixin:
    """
    A readable socket's event under the lean turn is handled as Twisted's
    own turn handles it; each test runs under both (the subclasses).
    """

    lean: bool

    def turn(self, behaviour: str, closed: bool = False,
             kind: type[_Selectable] = _Selectable) -> list[Any]:
        from twisted.internet.epollreactor import EPollReactor

        case: Any = self
        own = EPollReactor()
        case.addCleanup(own._poller.close)
        case.addCleanup(own.waker.connectionLost, None)
        ours, theirs = socket.socketpair()
        case.addCleanup(ours.close)
        case.addCleanup(theirs.close)
        record: list[Any] = []
        selectable = kind(ours, record, behaviour)
        own.addReader(selectable)  # type: ignore[arg-type]
        selectable.closed = closed
        if self.lean:
            case.assertTrue(poll.install(own))
        theirs.send(b"x")
        with _bounded(own, 10):
            own.doIteration(0)
        return record

    def test_closed_descriptor_loses_its_connection(self) -> None:
        """
        A readable selectable whose fileno() is -1 is not read: its
        connection is lost with ConnectionFdescWentAway.
        """
        case: Any = self
        case.assertEqual(self.turn("ok", closed=True),
                         [("connectionLost", error.ConnectionFdescWentAway)])

    def test_base_exception_from_doRead_loses_the_connection(self) -> None:
        """
        doRead raising a BaseException that is not an Exception loses the
        connection with it, and is logged.
        """
        case: Any = self
        case.assertEqual(self.turn("abort"), ["doRead", ("connectionLost", _Abort)])
        case.assertEqual(len(case.flushLoggedErrors(_Abort)), 1)

    def test_doRead_saying_lost(self) -> None:
        """
        doRead returning a reason loses the connection with it.
        """
        case: Any = self
        case.assertEqual(self.turn("says-lost"),
                         ["doRead", ("connectionLost", error.ConnectionLost)])

    def test_raised_connection_done_is_not_a_half_close(self) -> None:
        """
        ConnectionDone I{raised} by doRead of a half-closeable selectable
        loses the whole connection (Twisted's inRead is still False then),
        where one I{returned} would only close the read side.
        """
        case: Any = self
        case.assertEqual(self.turn("done", kind=_HalfCloseable),
                         ["doRead", ("connectionLost", error.ConnectionDone)])
        case.flushLoggedErrors(error.ConnectionDone)

    def test_error_while_losing_the_connection_is_logged(self) -> None:
        """
        connectionLost raising is logged; the turn ends normally.
        """
        case: Any = self
        case.assertEqual(self.turn("says-lost", kind=_LostRaises),
                         ["doRead", ("connectionLost", error.ConnectionLost)])
        case.assertEqual(len(case.flushLoggedErrors(ValueError)), 1)

    def test_keyboard_interrupt_while_losing_the_connection_propagates(self) -> None:
        """
        KeyboardInterrupt raised while losing the connection leaves the
        turn (callWithLogger re-raises it).
        """
        case: Any = self
        with case.assertRaises(KeyboardInterrupt):
            self.turn("says-lost", kind=_LostInterrupts)


class _LostRaises(_Selectable):
    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        raise ValueError("connectionLost failed")


class _LostInterrupts(_Selectable):
    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        raise KeyboardInterrupt()


class TwistedTurnSemanticsTests(TwistedSemanticsMixin, SynchronousTestCase):
    """The reference: Twisted's own doPoll."""

    lean = False


class LeanTurnSemanticsTests(TwistedSemanticsMixin, SynchronousTestCase):
    """The lean turn, expected to do exactly the same."""

    lean = True
