"""
The daemon's plumbing, without processes: how L{ProxyService} listens on
the endpoint it is given and reports a failure (the package's import graph
is checked by test_layout).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.process.daemon import ListenError, ProxyService, StartupError

from .support.fakes import FakeEndpoint, FakePort, FakeProxy, FakeReactor


def service(result: defer.Deferred) -> tuple[ProxyService, FakeReactor]:
    reactor = FakeReactor()
    site = object()
    return ProxyService(FakeProxy(), site, FakeEndpoint(result), reactor), reactor  # type: ignore[arg-type]


def in_use() -> defer.Deferred:
    return defer.fail(CannotListenError("127.0.0.1", 8080, OSError(98, "Address already in use")))


class ListenTests(SynchronousTestCase):
    def test_listens_on_the_endpoint_it_is_given(self) -> None:
        """
        listen() hands the site to the endpoint and keeps the port it
        answers with; a second call does nothing.
        """
        port = FakePort()
        proxy_service, _ = service(defer.succeed(port))
        proxy_service.listen()
        proxy_service.listen()
        self.assertIs(proxy_service.port, port)
        self.assertEqual(proxy_service.endpoint.factories, [proxy_service.site])

    def test_failure_during_listen_raises(self) -> None:
        """
        An endpoint that fails inside listen() (every stock endpoint binds
        there) raises ListenError with one line naming the address.
        """
        proxy_service, _ = service(in_use())
        with self.assertRaises(ListenError) as caught:
            proxy_service.listen()
        self.assertEqual(
            str(caught.exception),
            "cannot listen on 127.0.0.1:8080: [Errno 98] Address already in use",
        )

    def test_twistd_gets_one_line_and_its_status_pipe(self) -> None:
        """
        privilegedStartService (what twistd calls) turns the failure into a
        StartupError: a SystemExit carrying the one line (exit status 1, no
        traceback), and an Exception, which twistd's daemonizing path needs
        to report the failure to its waiting parent.
        """
        proxy_service, _ = service(in_use())
        with self.assertRaises(StartupError) as caught:
            proxy_service.privilegedStartService()
        self.assertIsInstance(caught.exception, SystemExit)
        self.assertIsInstance(caught.exception, Exception)
        self.assertEqual(
            caught.exception.code,
            "wsproxy: cannot listen on 127.0.0.1:8080: [Errno 98] Address already in use",
        )

    def test_late_failure_is_logged_and_stops_the_daemon(self) -> None:
        """
        An endpoint that answers after listen() returned cannot fail
        start-up: its failure is logged as critical and stops the reactor.
        """
        pending: defer.Deferred = defer.Deferred()
        proxy_service, reactor = service(pending)
        proxy_service.listen()
        self.assertIsNone(proxy_service.port)
        with capturedLogs() as events:
            pending.errback(CannotListenError("", 8080, OSError(13, "Permission denied")))
        critical = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertEqual(critical[0]["why"], "cannot listen on 8080: [Errno 13] Permission denied")
        self.assertEqual(reactor.stopped, 1)

    def test_late_port_is_announced(self) -> None:
        """
        A port that arrives once the reactor runs is kept and announced
        with the usual "listening on" line.
        """
        pending: defer.Deferred = defer.Deferred()
        proxy_service, _ = service(pending)
        proxy_service.listen()
        proxy_service._running()
        with capturedLogs() as events:
            pending.callback(FakePort())
        self.assertIsNotNone(proxy_service.port)
        self.assertEqual(
            [e["where"] for e in events if "where" in e], ["127.0.0.1:8080"]
        )
