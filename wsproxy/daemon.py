"""
The proxy as one twistd service, so that start-up and shutdown happen in a
fixed order (twistd's C{MultiService} would stop children concurrently).

Shutdown (SIGTERM, SIGINT or C{stopService}):

  1. stop accepting: C{/ready} answers 503 C{draining}, new upgrades get 503
     with C{Retry-After};
  2. send close 1001 ("server shutting down") to every open client, drop
     handshakes in progress;
  3. keep listening for C{SHUTDOWN_DRAIN_SECS}, so that a load balancer's
     readiness probe sees 503 (not a refused connection) and stops sending
     clients here; a second signal ends this window early;
  4. stop listening;
  5. wait until every client has closed, or C{SHUTDOWN_GRACE_PERIOD_SECS}
     after step 2;
  6. drop whatever is left (which unsubscribes its channels);
  7. close the Redis connections.

The process then exits with status 0.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.logger import ILogObserver, Logger

from .proxy import Proxy


class ListenError(Exception):
    """
    The listening endpoint could not be opened.
    """


class DaemonService(Service):
    """
    What the top-level service of a C{twistd wsproxy} process does either
    way (one proxy, or the supervisor of several): install its log observer
    as the application's, and turn SIGTERM/SIGINT into a graceful stop.

    @ivar log_observer: if set, installed as the application's log observer
        when this service is added to a twistd application.
    """

    _log = Logger()
    reactor: Any
    log_observer: Optional[ILogObserver] = None
    handle_signals = False
    stopping = False

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            # twistd's AppLogger uses the application's ILogObserver
            parent.setComponent(ILogObserver, self.log_observer)

    def install_signal_handlers(self) -> None:
        """
        Once the reactor runs: twistd re-raises SIGTERM after a clean
        shutdown (exit status 143); a graceful shutdown is a success, so
        handle the signals ourselves and exit 0.
        """

        def handler(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._signalled, signum)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _signalled(self, signum: int) -> None:
        if self.stopping:
            self._log.info("received signal {signum} again: ending the drain window",
                           signum=signum)
            self.hurry()
        elif self.reactor.running:
            self._log.info("received signal {signum}: shutting down", signum=signum)
            self.reactor.stop()

    def hurry(self) -> None:
        """
        A second signal during shutdown: skip what is left of the drain
        window.
        """


class ProxyService(DaemonService):
    """
    Listens on C{endpoint} with C{site} and runs C{proxy}.
    """

    name = "wsproxy"

    def __init__(
        self,
        proxy: Proxy,
        site: Any,
        endpoint: str,
        reactor: Any,
        log_observer: Optional[ILogObserver] = None,
        handle_signals: bool = False,
    ) -> None:
        self.proxy = proxy
        self.site = site
        self.endpoint = endpoint
        self.reactor = reactor
        self.log_observer = log_observer
        self.handle_signals = handle_signals
        self.port: Any = None
        self._stopping: Optional[defer.Deferred] = None
        self._drain_window: Optional[defer.Deferred] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listen()

    def listen(self) -> None:
        """
        Listen now; a failure (port in use, bad endpoint) raises
        L{ListenError} so that start-up fails loudly.
        """
        if self.port is not None:
            return
        from .workers import adopt_listening_socket

        self.port = adopt_listening_socket(self.reactor, self.site)
        if self.port is not None:
            return
        try:
            endpoint = endpoints.serverFromString(self.reactor, self.endpoint)
            d = endpoint.listen(self.site)
        except Exception as e:
            raise ListenError(f"LISTEN: cannot use endpoint {self.endpoint!r}: {e}") from None
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise ListenError(f"cannot listen on {self.endpoint!r}: no answer")
        if isinstance(result[0], Exception) or hasattr(result[0], "getErrorMessage"):
            why = result[0].getErrorMessage() if hasattr(result[0], "getErrorMessage") else result[0]
            raise ListenError(f"cannot listen on {self.endpoint!r}: {why}")
        self.port = result[0]

    def startService(self) -> None:
        self.listen()
        super().startService()
        self.proxy.start()
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        if self.handle_signals:
            self.install_signal_handlers()
        address = self.port.getHost()
        if hasattr(address, "port"):
            where = f"{address.host}:{address.port}"
        else:
            name = getattr(address, "name", address)
            where = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        worker = os.environ.get("WSPROXY_WORKER_INDEX")
        self._log.info(
            "wsproxy {role}listening on {where} (redis {redis})",
            role="" if worker is None else f"worker {worker} (pid {os.getpid()}) ",
            where=where,
            redis=self.proxy.settings.redis.describe(),
        )

    def stopService(self) -> defer.Deferred:
        if self._stopping is None:
            self.stopping = True
            super().stopService()
            self._stopping = defer.ensureDeferred(self.shutdown())
        return self._stopping

    def hurry(self) -> None:
        window = self._drain_window
        if window is not None and not window.called:
            window.callback(None)

    async def shutdown(self) -> None:
        proxy = self.proxy
        clock = proxy.clock
        settings = proxy.settings
        proxy.draining = True
        connections = list(proxy.connections)
        self._log.info(
            "draining {n} connections; still listening for {drain:g}s",
            n=len(connections), drain=settings.shutdown_drain,
        )
        for protocol in connections:
            protocol.going_away()
        closed = _all_or_timeout(
            clock,
            settings.shutdown_grace_period,
            [p.closed for p in connections if not p.closed.called],
        )
        self._drain_window = _window(clock, settings.shutdown_drain)
        await self._drain_window
        if self.port is not None:
            await self.port.stopListening()
        await closed
        # each dropped connection logs its close and unsubscribes a reactor
        # turn later: let that happen before Redis is closed
        await _all_or_timeout(clock, 1.0, [
            p.drop("shutdown grace period over") for p in list(proxy.connections)
        ])
        await proxy.stop()
        self._log.info("shutdown complete")


def _all_or_timeout(clock: Any, seconds: float, pending: list[defer.Deferred]) -> defer.Deferred:
    """
    Fires once all of C{pending} have fired, or after C{seconds}, whichever
    comes first (at once if nothing is pending).
    """
    done: defer.Deferred = _window(clock, seconds) if pending else defer.succeed(None)
    if pending:
        defer.DeferredList(pending, consumeErrors=True).addBoth(
            lambda _: None if done.called else done.callback(None)
        )
    return done


def _window(clock: Any, seconds: float) -> defer.Deferred:
    """
    Fires after C{seconds}, or earlier if someone calls it back (the timer
    is then cancelled).
    """
    done: defer.Deferred = defer.Deferred()
    if seconds <= 0:
        done.callback(None)
        return done
    timer = clock.callLater(seconds, lambda: None if done.called else done.callback(None))
    done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
    return done
