"""
Multi-core: C{WORKERS=N} runs N worker processes that share one listening
socket.

The parent opens the socket (so no connection is refused while a worker
restarts: connections wait in the shared accept queue), then starts each
worker as C{python -m wsproxy} with the same configuration and the socket's
file descriptor in C{WSPROXY_LISTEN_FD}. Every worker is a complete proxy
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
from typing import Any, Optional

from twisted.internet import defer, protocol

from .config import Settings
from .daemon import DaemonService

#: environment variable that tells a worker which inherited fd to listen on
LISTEN_FD = "WSPROXY_LISTEN_FD"


def open_listening_socket(settings: Settings) -> socket.socket:
    """
    The shared listening socket for C{HOST}/C{PORT}, inheritable.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family, backlog=1024)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def adopt_listening_socket(reactor: Any, site: Any) -> Optional[Any]:
    """
    In a worker: listen on the socket inherited from the parent, if any.
    """
    fd_text = os.environ.pop(LISTEN_FD, None)
    if fd_text is None:
        return None
    fd = int(fd_text)
    family = socket.socket(fileno=os.dup(fd)).family
    port = reactor.adoptStreamPort(fd, family, site)
    # adoptStreamPort works on its own duplicate
    os.close(fd)
    return port


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred[Any] = defer.Deferred()

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
        super().privilegedStartService()
        try:
            self.sock = open_listening_socket(self.settings)
        except OSError as e:
            raise SystemExit(
                f"wsproxy: cannot listen on {self.settings.host}:{self.settings.port}: {e}"
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
        fd = self.sock.fileno()
        env = dict(os.environ)
        env[LISTEN_FD] = str(fd)
        env["WORKERS"] = "1"
        env["WSPROXY_WORKER_INDEX"] = str(index)
        worker = _Worker(self, index)
        process = self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "wsproxy", *self.argv],
            env=env,
            childFDs={0: 0, 1: 1, 2: 2, fd: fd},
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

    def stopService(self) -> defer.Deferred[Any]:
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
