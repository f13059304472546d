"""
The proxy as one twistd service, so that start-up and shutdown happen in a
fixed order (twistd's C{MultiService} would stop children concurrently).

Shutdown (SIGTERM, SIGINT or C{stopService}):

  1. stop accepting: C{/ready} answers 503 C{draining}, new upgrades get 503
     with C{Retry-After};
  2. after C{SHUTDOWN_CLOSE_DELAY_SECS} (0 by default; at most the drain
     window), in which open clients are still served while load balancers
     notice the 503, send close 1001 ("server shutting down") to every open
     client, drop handshakes in progress;
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
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from ..fast import borrowed, heap, poll
from ..fast.heap import CollectorPolicy
from .fdlimit import DescriptorLimit, raise_soft_limit
from ..session.proxy import Proxy


class ListenError(Exception):
    """
    The listening endpoint could not be opened.
    """


class StartupError(SystemExit, Exception):
    """
    Start-up failed (the port cannot be bound): the process prints this one
    line and exits with status 1.

    A C{SystemExit}, so that C{twistd -n} ends with the line instead of a
    traceback; and an C{Exception}, because twistd without C{-n} (it
    daemonizes) learns that its child failed only through a status pipe that
    its C{except Exception} writes to: a bare C{SystemExit} would leave the
    parent waiting forever.
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

        def hangup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, hangup)

    def reload(self) -> None:
        """
        SIGHUP: read the key files again (C{AUTH_MODE=jwt}); nothing else
        is reloaded.
        """

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

    @param endpoint: where to listen: C{serverFromString(LISTEN)}, or in a
        worker the socket inherited from the supervisor (L{wsproxy.process.workers}).
    @param worker: the worker's index, if this process is one of several
        (only named in the log).
    @param manage_heap: keep long-lived objects out of the cycle
        collector's scans once running (L{wsproxy.fast.heap}); for a process of
        its own, not for a proxy inside a test run.
    @param lean_poll: once running, have the reactor dispatch ready sockets
        without a legacy log context (L{wsproxy.fast.poll}); also for a process
        of its own.

    A service with either of those (a process of its own) first checks
    every internal of Twisted, Autobahn and CPython the fast path borrows
    (L{wsproxy.fast.borrowed}): one that is missing or changed is logged
    once and replaced by the framework's own path, before any connection
    is accepted.
    """

    name = "wsproxy"

    def reload(self) -> None:
        if self.proxy.key_source is None:
            self._log.info("SIGHUP: nothing to reload (no JWT keys: AUTH_MODE={mode})",
                           mode=",".join(self.proxy.settings.auth_mode))
            return
        self.proxy.reload_keys()

    def __init__(
        self,
        proxy: Proxy,
        site: Any,
        endpoint: IStreamServerEndpoint,
        reactor: Any,
        log_observer: Optional[ILogObserver] = None,
        handle_signals: bool = False,
        worker: Optional[int] = None,
        manage_heap: bool = False,
        lean_poll: bool = False,
    ) -> None:
        self.proxy = proxy
        self.site = site
        self.endpoint = endpoint
        self.reactor = reactor
        self.log_observer = log_observer
        self.handle_signals = handle_signals
        self.worker = worker
        if manage_heap or lean_poll:
            borrowed.check(reactor if lean_poll else None)
        self.heap = (
            CollectorPolicy(reactor, interval=proxy.settings.gc_full_collection,
                            observe=proxy.stats.gc_pause.labels)
            if manage_heap and heap.ENABLED else None
        )
        self.lean_poll = lean_poll
        self.port: Optional[IListeningPort] = None
        self.drain = proxy.settings.shutdown_drain
        self.close_delay = proxy.settings.shutdown_close_delay
        self._listening: Optional[defer.Deferred[None]] = None
        self._running_now = False
        self._stopping: Optional[defer.Deferred[Any]] = None
        self._drain_window: Optional[defer.Deferred[Any]] = None
        self._close_window: Optional[defer.Deferred[Any]] = None
        self.descriptors: Optional[DescriptorLimit] = None

    def privilegedStartService(self) -> None:
        """
        twistd calls this before the reactor runs (and, with C{--uid},
        before dropping root): listen now, like Twisted's own C{strports}
        services. A port that cannot be bound ends start-up with one line
        and exit status 1 (L{StartupError}).
        """
        super().privilegedStartService()
        try:
            self.listen()
        except ListenError as e:
            raise StartupError(f"wsproxy: {e}") from None

    def listen(self) -> None:
        """
        Start listening on the endpoint (once).

        Every endpoint wsproxy is documented with (C{tcp}, C{tcp6}, C{ssl},
        C{unix}, the inherited socket of a worker) binds inside
        C{endpoint.listen()} and has fired its Deferred by the time that
        returns: a failure then (port in use, permission denied) is raised
        here as L{ListenError}, before the reactor runs. An endpoint that
        answers later (some third-party endpoint plugins do) cannot fail
        start-up that way; its failure is logged as critical and stops the
        daemon once it arrives, but twistd then exits with status 0.
        """
        if self._listening is not None:
            return
        self._fit_descriptor_limit()
        synchronous = True
        early: list[Failure] = []

        def failed(reason: Failure) -> None:
            if synchronous:
                early.append(reason)
            elif not reason.check(defer.CancelledError):
                self._log.critical("{why}", why=_cannot_listen(reason))
                if self.reactor.running:
                    self.reactor.stop()

        listening: defer.Deferred[IListeningPort] = defer.maybeDeferred(
            lambda: self.endpoint.listen(self.site)
        )
        self._listening = listening.addCallbacks(self._listened, failed)
        synchronous = False
        if early:
            raise ListenError(_cannot_listen(early[0]))

    def _fit_descriptor_limit(self) -> None:
        """
        Raise the soft descriptor limit to the hard one and cap connections
        below it (L{wsproxy.process.fdlimit}); logged with the listening line.
        """
        self.descriptors = raise_soft_limit()
        self.proxy.connection_cap = self.descriptors.cap(self.proxy.settings.max_connections)

    #: a worker accepts once its Redis connections are ready, or after this
    #: many seconds whatever their state (then it answers 503 as usual)
    accept_wait = 5.0

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        budget = getattr(self.site, "budget", None)
        if budget is not None:
            budget.port = port
        if self.worker is not None:
            self._accept_when_ready(port)
        if self._running_now:
            self._announce()

    def _accept_when_ready(self, port: IListeningPort) -> None:
        """
        A worker's socket is its own (C{SO_REUSEPORT}, see
        L{wsproxy.process.workers}): what the kernel queued on it while the worker
        (re)started waits there, not taken by another worker, so accepting
        it before Redis is connected would answer it 503. Accept once the
        command and subscriber connections are ready, or after
        L{accept_wait} seconds.
        """
        pausable: Any = port
        if not hasattr(pausable, "stopReading"):
            return
        pausable.stopReading()
        deadline = self.reactor.seconds() + self.accept_wait

        def ready(link: Any) -> bool:
            return getattr(link, "ready", True) is not None

        def check() -> None:
            if self._stopping is not None:
                return
            links_ready = ready(self.proxy.commands) and ready(self.proxy.subscriber)
            if links_ready or self.reactor.seconds() >= deadline:
                pausable.startReading()
            else:
                self.reactor.callLater(0.05, check)

        self.reactor.callLater(0, check)

    def startService(self) -> None:
        self.listen()
        super().startService()
        self.proxy.start()
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        self._running_now = True
        if self.heap is not None:
            self.heap.install()
        if self.lean_poll:
            poll.install(self.reactor)
        if self.handle_signals:
            self.install_signal_handlers()
        if self.port is not None:
            self._announce()

    def _announce(self) -> None:
        assert self.port is not None
        address = self.port.getHost()
        if isinstance(address, (IPv4Address, IPv6Address)):
            where = f"{address.host}:{address.port}"
        else:
            name = getattr(address, "name", address)
            where = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        self._log.info(
            "wsproxy {role}listening on {where} (redis {redis})",
            role="" if self.worker is None else f"worker {self.worker} (pid {os.getpid()}) ",
            where=where,
            redis=self.proxy.settings.redis_description,
        )
        if self.descriptors is not None:
            info, warning = self.descriptors.describe(self.proxy.settings.max_connections)
            self._log.info("{info}", info=info)
            if warning is not None:
                self._log.warn("{warning}", warning=warning)
        self._announce_auth()

    def _announce_auth(self) -> None:
        """
        How tokens are checked, and a warning for JWT settings that have no
        effect (a JWT_SECRET with AUTH_MODE=redis is most likely a
        configuration carried over from the original project: its tokens
        would all be refused).
        """
        settings = self.proxy.settings
        mode = ",".join(settings.auth_mode)
        if "jwt" in settings.auth_mode:
            verifier = self.proxy.authn.verifier
            keys = 0 if verifier is None else len(verifier.keys)
            self._log.info(
                "tokens: AUTH_MODE={mode}, {keys} JWT keys from files{url}",
                mode=mode, keys=keys,
                url=" and a JWKS URL" if settings.jwt_jwks_url else "",
            )
            return
        given = settings.jwt_key_sources
        if given:
            self._log.warn(
                "{names} set but AUTH_MODE={mode}: JSON Web Tokens are not accepted "
                "(set AUTH_MODE=jwt, or jwt,redis to accept both)",
                names=", ".join(given), mode=mode,
            )

    def stop_without_drain(self) -> None:
        """
        Shut down now, with no drain window: for a worker whose supervisor
        is gone, so that the port is free for the next supervisor at once.
        """
        self.drain = 0.0
        if self.stopping:
            self.hurry()
        elif self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> defer.Deferred[Any]:
        if self._stopping is None:
            self.stopping = True
            if self.heap is not None and self._running_now:
                self.heap.uninstall()
            if self.lean_poll and self._running_now:
                poll.uninstall(self.reactor)
            super().stopService()
            self._stopping = defer.ensureDeferred(self.shutdown())
        return self._stopping

    def hurry(self) -> None:
        for window in (self._close_window, self._drain_window):
            if window is not None and not window.called:
                window.callback(None)

    async def shutdown(self) -> None:
        proxy = self.proxy
        clock = proxy.clock
        settings = proxy.settings
        proxy.draining = True
        # the drain window counts from the signal, the clients' close may
        # wait part of it (a second signal ends both)
        self._drain_window = _window(clock, self.drain)
        delay = min(self.close_delay, self.drain)
        if delay > 0:
            self._log.info(
                "not ready; serving {n} connections {delay:g}s more, then closing them",
                n=len(proxy.connections), delay=delay,
            )
            self._close_window = _window(clock, delay)
            await self._close_window
        connections = list(proxy.connections)
        self._log.info(
            "draining {n} connections; still listening for {drain:g}s",
            n=len(connections), drain=max(0.0, self.drain - delay),
        )
        for protocol in connections:
            protocol.going_away()
        closed = _all_or_timeout(
            clock,
            settings.shutdown_grace_period,
            [p.closed for p in connections if not p.closed.called],
        )
        await self._drain_window
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
        await closed
        # each dropped connection logs its close and unsubscribes a reactor
        # turn later: let that happen before Redis is closed
        await _all_or_timeout(clock, 1.0, [
            p.drop("shutdown grace period over") for p in list(proxy.connections)
        ])
        await proxy.stop()
        self._log.info("shutdown complete")


def _cannot_listen(reason: Failure) -> str:
    """
    One line saying why listening failed.
    """
    e = reason.value
    if isinstance(e, CannotListenError):
        where = f"{e.interface}:{e.port}" if e.interface else e.port
        return f"cannot listen on {where}: {e.socketError}"
    return f"cannot listen: {reason.getErrorMessage()}"


def _all_or_timeout(clock: Any, seconds: float, pending: list[defer.Deferred[Any]]) -> defer.Deferred[Any]:
    """
    Fires once all of C{pending} have fired, or after C{seconds}, whichever
    comes first (at once if nothing is pending).
    """
    done: defer.Deferred[Any] = _window(clock, seconds) if pending else defer.succeed(None)
    if pending:
        defer.DeferredList(pending, consumeErrors=True).addBoth(
            lambda _: None if done.called else done.callback(None)
        )
    return done


def _window(clock: Any, seconds: float) -> defer.Deferred[Any]:
    """
    Fires after C{seconds}, or earlier if someone calls it back (the timer
    is then cancelled).
    """
    done: defer.Deferred[Any] = defer.Deferred()
    if seconds <= 0:
        done.callback(None)
        return done
    timer = clock.callLater(seconds, lambda: None if done.called else done.callback(None))
    done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
    return done
