"""
Multi-core: C{WORKERS=N} runs N worker processes on one port.

The supervisor (the parent) opens one listening socket per worker, all on
the same address with C{SO_REUSEPORT}, and keeps them: the kernel hashes
each new connection to one of the sockets (so the workers get even shares,
and only the worker whose socket has a connection is woken), and a worker
that restarts gets its socket back, so the connections that waited in its
queue meanwhile are served by its replacement instead of being refused.
(One shared socket, as before, let the kernel wake every worker for every
connection and hand it to whichever accepted first: with 100,000
connections over 6 workers the busiest held 19,664 and the quietest
14,806, close to the 19,872 a worker can hold before it answers 503.)
Before the sockets the supervisor binds the port once without
C{SO_REUSEPORT}, so that a port held by anything else, another wsproxy
included, still fails start-up with "Address already in use" instead of
quietly sharing its connections. Then it starts each worker as C{python -m
wsproxy} with the same configuration. Every worker is a complete proxy
with its own Redis connections. The supervisor restarts a worker that dies
and, on SIGTERM or SIGINT, forwards the signal so that every worker shuts
down gracefully, then exits 0 once they all have.

A worker inherits two file descriptors, named in its environment (L{Seat}):
its listening socket and its end of a private Unix socket pair to the
supervisor. Over that channel, length-prefixed JSON messages:

  - worker -> supervisor C{{"op": "scrape", "id": n}}: a client asked this
    worker for C{/metrics};
  - supervisor -> every worker C{{"op": "snapshot", "id": m}}, answered with
    C{{"op": "snapshot", "id": m, "metrics": <snapshot>}} (the worker's
    counters, read at that moment: nothing is sent per message);
  - supervisor -> worker C{{"op": "metrics", "id": n, "text": ...}}: the
    sum over all workers, which the worker serves.

The channel is also how a worker learns that its supervisor is gone,
however it died (even SIGKILL): the kernel closes the supervisor's end, the
worker reads end-of-file and shuts down at once, without a drain window, so
that the port is free for the next supervisor. No worker outlives its
supervisor by more than C{SHUTDOWN_GRACE_PERIOD_SECS}.

Counters of a worker that exited keep counting in the sum (with the values
of its last snapshot), so the instance's counters never go backwards when
a worker is restarted; what a killed worker counted after the last scrape
is lost.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from ..config import Settings
from .daemon import DaemonService, ProxyService, StartupError
from ..session.limits import FailedAuthLimit
from ..metrics import Snapshot, merge, monotonic_part, render, snapshot_of
from ..session.proxy import Proxy
from ..edge.site import ProxySite

#: environment variables that make a process a worker (see L{Seat})
INDEX_ENV = "WSPROXY_WORKER_INDEX"
LISTEN_FD_ENV = "WSPROXY_LISTEN_FD"
CHANNEL_FD_ENV = "WSPROXY_CHANNEL_FD"

#: the file descriptors a worker receives them on
_LISTEN_FD = 3
_CHANNEL_FD = 4


@dataclass(frozen=True)
class Seat:
    """
    What makes this process a worker: its index and the file descriptors it
    inherited from the supervisor.
    """

    index: int
    listen_fd: int
    channel_fd: int

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Optional["Seat"]:
        """
        The seat the supervisor gave this process, if it is a worker; the
        variables are removed so that nothing else inherits them.
        """
        if INDEX_ENV not in environ:
            return None
        return cls(
            index=int(environ.pop(INDEX_ENV)),
            listen_fd=int(environ.pop(LISTEN_FD_ENV)),
            channel_fd=int(environ.pop(CHANNEL_FD_ENV)),
        )


def open_listening_sockets(settings: Settings) -> list[socket.socket]:
    """
    One listening socket per worker on C{HOST}/C{PORT} (a free port chosen
    for all if C{PORT} is 0), in one C{SO_REUSEPORT} group.

    @raise OSError: the port is in use (by anything, another C{SO_REUSEPORT}
        group of the same user included) or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # a plain bind fails if anything listens there; the group's would not
    with socket.create_server((settings.host, settings.port), family=family) as probe:
        port = probe.getsockname()[1]
    socks: list[socket.socket] = []
    try:
        for _ in range(settings.workers):
            sock = socket.create_server((settings.host, port), family=family,
                                        backlog=settings.listen_backlog, reuse_port=True)
            socks.append(sock)
            sock.setblocking(False)
            sock.set_inheritable(True)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def inherited_endpoint(reactor: Any, fd: int) -> AdoptedStreamServerEndpoint:
    """
    The server endpoint of a listening socket inherited as C{fd} (Twisted's
    own adopted-socket endpoint: it listens on it, then closes C{fd}).
    """
    with socket.socket(fileno=os.dup(fd)) as probe:
        family = probe.family
    return AdoptedStreamServerEndpoint(reactor, fd, family)


def worker_service(seat: Seat, proxy: Proxy, reactor: Any, log_observer: Any) -> ProxyService:
    """
    The proxy of one worker: it listens on the inherited socket, serves
    C{/metrics} summed over all workers, and stops when its supervisor is
    gone.
    """
    link = SupervisorLink(proxy.stats.snapshot, reactor)
    link.auth_limit = proxy.auth_limit
    proxy.auth_limit.relay = link.auth_failed
    service = ProxyService(
        proxy,
        ProxySite(proxy, metrics=link.scrape),
        inherited_endpoint(reactor, seat.listen_fd),
        reactor,
        log_observer=log_observer,
        handle_signals=True,
        worker=seat.index,
        manage_heap=True,
        lean_poll=True,
    )
    link.service = service
    _adopt_channel(reactor, seat.channel_fd, link)
    return service


def _adopt_channel(reactor: Any, fd: int, link: "_Channel") -> None:
    os.set_blocking(fd, False)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, protocol.Factory.forProtocol(lambda: link))
    # adoptStreamConnection works on its own duplicate
    os.close(fd)


class _Channel(Int32StringReceiver):
    """
    One JSON object per length-prefixed string.
    """

    MAX_LENGTH = 64 * 1024 * 1024
    _log = Logger()

    def send(self, message: dict[str, Any]) -> None:
        self.sendString(json.dumps(message, separators=(",", ":")).encode())

    def stringReceived(self, data: bytes) -> None:
        self.received(json.loads(data))

    def received(self, message: dict[str, Any]) -> None:
        raise NotImplementedError


class SupervisorLink(_Channel):
    """
    The worker's end of the channel.

    @ivar service: stopped (without drain window) when the supervisor is
        gone.
    """

    #: how long a C{/metrics} request waits for the supervisor's sum
    scrape_timeout = 5.0

    def __init__(self, snapshot: Callable[[], Snapshot], clock: Any) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._pending: dict[int, defer.Deferred[bytes]] = {}
        self._ids = itertools.count()
        self.service: Optional[ProxyService] = None
        self.lost = False
        #: this worker's failed-authorization table, which the supervisor
        #: tells of addresses limited over all workers
        self.auth_limit: Optional[FailedAuthLimit] = None
        #: failed token checks not yet reported: address -> count
        self._failures: dict[str, int] = {}

    def auth_failed(self, address: str) -> None:
        """
        A token check from C{address} failed in this worker: reported to
        the supervisor, which counts over all workers, once per reactor
        turn (one message for a turn's failures, however many).
        """
        if not self._failures:
            self._clock.callLater(0, self._report_failures)
        self._failures[address] = self._failures.get(address, 0) + 1

    def _report_failures(self) -> None:
        failures, self._failures = self._failures, {}
        if failures and not self.lost:
            self.send({"op": "failed", "addresses": failures})

    def scrape(self) -> defer.Deferred[bytes]:
        """
        The metrics of all workers, summed by the supervisor, as Prometheus
        text; fails if the supervisor does not answer in time.
        """
        if self.lost:
            return defer.fail(error.ConnectionLost("the supervisor is gone"))
        n = next(self._ids)
        d: defer.Deferred[bytes] = defer.Deferred()
        self._pending[n] = d
        d.addTimeout(self.scrape_timeout, self._clock)
        d.addBoth(lambda result: (self._pending.pop(n, None), result)[1])
        self.send({"op": "scrape", "id": n})
        return d

    def received(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "snapshot":
            self.send({"op": "snapshot", "id": message["id"], "metrics": self._snapshot()})
        elif op == "metrics":
            d = self._pending.pop(message["id"], None)
            if d is not None:
                d.callback(message["text"].encode())
        elif op == "limit":
            if self.auth_limit is not None:
                self.auth_limit.impose(message["address"], message["left"])

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(error.ConnectionLost("the supervisor is gone"))
        service = self.service
        if service is None:
            return
        if not service.stopping:
            self._log.warn("the supervisor is gone: shutting down now, without drain window")
        service.stop_without_drain()


class _WorkerLink(_Channel):
    """
    The supervisor's end of one worker's channel.
    """

    #: how long a scrape waits for each worker's counters; a worker that is
    #: slower (busy, stuck) contributes the values of its previous snapshot
    refresh_timeout = 1.0

    def __init__(self, supervisor: "Supervisor", worker: "_Worker") -> None:
        self.supervisor = supervisor
        self.worker = worker
        self._pending: dict[int, defer.Deferred[None]] = {}
        self._ids = itertools.count()
        self.lost = False

    def refresh(self) -> defer.Deferred[None]:
        """
        Fires once the worker has sent fresh counters, or has not in time,
        or is gone (never fails).
        """
        if self.lost:
            return defer.succeed(None)
        n = next(self._ids)
        d: defer.Deferred[None] = defer.Deferred()
        self._pending[n] = d
        d.addTimeout(self.refresh_timeout, self.supervisor.reactor)
        d.addErrback(self._late, n)
        self.send({"op": "snapshot", "id": n})
        return d

    def _late(self, reason: Any, n: int) -> None:
        self._pending.pop(n, None)
        if reason.check(defer.TimeoutError):
            self._log.warn(
                "worker {index} did not send its metrics within {t:g}s: "
                "serving its previous values",
                index=self.worker.index, t=self.refresh_timeout,
            )

    def received(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "snapshot":
            self.worker.snapshot = message["metrics"]
            d = self._pending.pop(message["id"], None)
            if d is not None:
                d.callback(None)
        elif op == "failed":
            self.supervisor.auth_failed(message["addresses"])
        elif op == "scrape":
            n = message["id"]
            defer.ensureDeferred(self.supervisor.metrics()).addCallback(
                lambda text: self.send({"op": "metrics", "id": n, "text": text.decode()})
            )

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.callback(None)


class _Worker(protocol.ProcessProtocol):
    """
    One worker process: its index, its channel and its last counters.
    """

    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.link: Optional[_WorkerLink] = None
        self.snapshot: Snapshot = []

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason.value)


class Supervisor(DaemonService):
    """
    Starts and watches the workers, and sums their metrics.
    """

    name = "wsproxy-supervisor"
    restart_delay = 1.0

    def __init__(self, settings: Settings, reactor: Any, argv: list[str],
                 handle_signals: bool = True, log_observer: Any = None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.argv = argv
        self.handle_signals = handle_signals
        self.log_observer = log_observer
        #: the listening socket of each worker, by index
        self.socks: list[socket.socket] = []
        self.workers: dict[int, tuple[_Worker, Any]] = {}
        self.restarts = 0
        #: counters of the workers that have exited
        self._retired: Snapshot = []
        #: failed token checks over all workers (each counts its own too)
        self.auth_limit = FailedAuthLimit(
            reactor, settings.auth_fail_limit, settings.auth_fail_window,
            settings.auth_fail_table_size,
        )

    def privilegedStartService(self) -> None:
        """
        Open the workers' sockets before the reactor runs (as root, with
        C{--uid}); a port that cannot be bound ends start-up with one line
        and exit status 1 (L{StartupError}).
        """
        super().privilegedStartService()
        try:
            self.socks = open_listening_sockets(self.settings)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise StartupError(
                f"wsproxy: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"[Errno {e.errno}] {why}"
            ) from None

    def startService(self) -> None:
        super().startService()
        for index in range(self.settings.workers):
            self._spawn(index)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        if self.handle_signals:
            self.install_signal_handlers()
        host, port = self.socks[0].getsockname()[:2]
        self._log.info(
            "wsproxy supervisor: {n} workers listening on {host}:{port}",
            n=self.settings.workers, host=host, port=port,
        )

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["WORKERS"] = "1"
        env[INDEX_ENV] = str(index)
        env[LISTEN_FD_ENV] = str(_LISTEN_FD)
        env[CHANNEL_FD_ENV] = str(_CHANNEL_FD)
        worker = _Worker(self, index)
        try:
            process = self.reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "wsproxy", *self.argv],
                env=env,
                childFDs={0: 0, 1: 1, 2: 2,
                          _LISTEN_FD: self.socks[index].fileno(), _CHANNEL_FD: theirs.fileno()},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.link = _WorkerLink(self, worker)
        _adopt_channel(self.reactor, ours.detach(), worker.link)
        self.workers[index] = (worker, process)
        self._log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def _ended(self, worker: _Worker, why: Any) -> None:
        index = worker.index
        if self.workers.get(index, (None,))[0] is worker:
            del self.workers[index]
        self._retired = merge([self._retired, monotonic_part(worker.snapshot)])
        if self.stopping:
            return
        self.restarts += 1
        self._log.error(
            "worker {index} exited ({why}); restarting in {delay:g}s",
            index=index, why=why, delay=self.restart_delay,
        )
        self.reactor.callLater(self.restart_delay, self._respawn, index)

    def auth_failed(self, failures: dict[str, int]) -> None:
        """
        Failed token checks reported by a worker (address -> count): an
        address that reaches C{AUTH_FAIL_LIMIT} over all workers is limited
        in every worker for the rest of its window. (Each worker counts on
        its own too, so one that sees all of an address's failures limits it
        without waiting for this; exempt addresses are never reported.)
        """
        for address, count in failures.items():
            left = self.auth_limit.failed(address, count)
            if left is None:
                continue
            message = {"op": "limit", "address": address, "left": left}
            for worker, _ in self.workers.values():
                if worker.link is not None and not worker.link.lost:
                    worker.link.send(message)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self._spawn(index)

    async def metrics(self) -> bytes:
        """
        The instance's metrics: fresh counters from every worker, plus those
        of the workers that have exited, plus the supervisor's own.
        """
        await defer.gatherResults(
            [w.link.refresh() for w, _ in self.workers.values() if w.link is not None]
        )
        return render(merge([
            *(w.snapshot for w, _ in self.workers.values()),
            self._retired,
            snapshot_of([
                GaugeMetricFamily("wsproxy_workers", "Worker processes running",
                                  value=len(self.workers)),
                CounterMetricFamily("wsproxy_worker_restarts",
                                    "Workers that exited unexpectedly and were restarted",
                                    value=self.restarts),
            ]),
        ]))

    def stopService(self) -> defer.Deferred[Any]:
        self.stopping = True
        super().stopService()
        waiting = [worker.ended for worker, _ in self.workers.values()]
        self._signal_workers("TERM")
        for sock in self.socks:
            sock.close()
        # workers keep listening for SHUTDOWN_DRAIN_SECS and wait up to
        # SHUTDOWN_GRACE_PERIOD_SECS for their clients (after at most the
        # drain window's SHUTDOWN_CLOSE_DELAY_SECS); past that (plus a
        # margin) whatever is left is killed
        killer = self.reactor.callLater(
            self.settings.shutdown_drain + self.settings.shutdown_grace_period + 10,
            self._kill_remaining,
        )

        def done(_: Any) -> None:
            if killer.active():
                killer.cancel()
            self._log.info("all workers stopped")

        return defer.DeferredList(waiting).addCallback(done)

    def hurry(self) -> None:
        """
        A second signal: pass it on, so that the workers end their drain
        window too.
        """
        self._signal_workers("TERM")

    def reload(self) -> None:
        """
        SIGHUP: every worker reloads its keys.
        """
        self._signal_workers("HUP")

    def _signal_workers(self, name: str) -> None:
        for _, process in list(self.workers.values()):
            try:
                process.signalProcess(name)
            except Exception:
                pass  # already gone

    def _kill_remaining(self) -> None:
        for worker, process in list(self.workers.values()):
            self._log.error("worker {index} did not stop in time: killing it", index=worker.index)
            try:
                process.signalProcess("KILL")
            except Exception:
                pass
