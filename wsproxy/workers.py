"""
Multi-core: C{WORKERS=N} runs N worker processes that share one listening
socket.

The parent opens the socket (so no connection is refused while a worker
restarts: connections wait in the shared accept queue), then starts each
worker as C{python -m wsproxy} with the same configuration, the socket as
file descriptor 3 and its index and that descriptor in its environment
(L{Seat}). Every worker is a complete proxy
with its own Redis connections; the kernel hands each new connection to
whichever worker accepts first. The parent restarts a worker that dies and,
on SIGTERM or SIGINT, forwards the signal so that every worker shuts down
gracefully, then exits 0 once they all have.

Each worker answers C{/health}, C{/ready} and C{/metrics} for itself.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, MutableMapping, Optional

from twisted.internet import defer, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint

from .config import Settings
from .daemon import DaemonService, ProxyService, StartupError
from .proxy import Proxy
from .site import ProxySite

#: environment variables that make a process a worker (see L{Seat})
INDEX_ENV = "WSPROXY_WORKER_INDEX"
LISTEN_FD_ENV = "WSPROXY_LISTEN_FD"

#: the file descriptor a worker receives the listening socket on
_LISTEN_FD = 3


@dataclass(frozen=True)
class Seat:
    """
    What makes this process a worker: its index and the listening socket it
    inherited from the supervisor.
    """

    index: int
    listen_fd: int

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
        )


def open_listening_socket(settings: Settings) -> socket.socket:
    """
    The shared listening socket for C{HOST}/C{PORT}, inheritable.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family, backlog=1024)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


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
    The proxy of one worker: it listens on the inherited socket.
    """
    return ProxyService(
        proxy,
        ProxySite(proxy),
        inherited_endpoint(reactor, seat.listen_fd),
        reactor,
        log_observer=log_observer,
        handle_signals=True,
        worker=seat.index,
    )


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason.value)


class Supervisor(DaemonService):
    """
    Starts and watches the workers.
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
        self.sock: Optional[socket.socket] = None
        self.workers: dict[int, tuple[_Worker, Any]] = {}

    def privilegedStartService(self) -> None:
        """
        Open the shared socket before the reactor runs (as root, with
        C{--uid}); a port that cannot be bound ends start-up with one line
        and exit status 1 (L{StartupError}).
        """
        super().privilegedStartService()
        try:
            self.sock = open_listening_socket(self.settings)
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
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        self._log.info(
            "wsproxy supervisor: {n} workers listening on {host}:{port}",
            n=self.settings.workers, host=host, port=port,
        )

    def _spawn(self, index: int) -> None:
        assert self.sock is not None
        env = dict(os.environ)
        env["WORKERS"] = "1"
        env[INDEX_ENV] = str(index)
        env[LISTEN_FD_ENV] = str(_LISTEN_FD)
        worker = _Worker(self, index)
        process = self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "wsproxy", *self.argv],
            env=env,
            childFDs={0: 0, 1: 1, 2: 2, _LISTEN_FD: self.sock.fileno()},
        )
        self.workers[index] = (worker, process)
        self._log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def _ended(self, worker: _Worker, why: Any) -> None:
        index = worker.index
        if self.workers.get(index, (None,))[0] is worker:
            del self.workers[index]
        if self.stopping:
            return
        self._log.error(
            "worker {index} exited ({why}); restarting in {delay:g}s",
            index=index, why=why, delay=self.restart_delay,
        )
        self.reactor.callLater(self.restart_delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> defer.Deferred:
        self.stopping = True
        super().stopService()
        waiting = [worker.ended for worker, _ in self.workers.values()]
        self._signal_workers("TERM")
        if self.sock is not None:
            self.sock.close()
        # workers keep listening for SHUTDOWN_DRAIN_SECS and wait up to
        # SHUTDOWN_GRACE_PERIOD_SECS for their clients; past that (plus a
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
