"""
The real daemon as a child process: L{Daemon} runs a command line
(C{python -m wsproxy}, C{twistd -n wsproxy}, C{bin/dev run}, ...) in its
own empty working directory with a clean environment, records its output
and tells when it listens and when its Redis connections are ready;
L{start_daemon} starts one for a test and always stops it at clean-up.

A clean environment: this process's, minus every wsproxy setting variable
(L{wsproxy.config.SETTINGS}), plus what the test passes. So a setting
exported in the shell that runs the suite (C{WORKERS}, C{LOG_FORMAT}, ...)
never reaches a daemon, and each test's daemon has exactly the settings
the test names; PATH, PYTHONPATH, HOME and the rest are kept.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Optional

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from wsproxy.config import SETTINGS

from .base import ROOT, free_port, wait_for
from .clients import connect
from .http import raw_exchange, raw_upgrade, status_of
from .redis import RedisTestCase

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(rb"listening on [\d.]+:(\d+)")


class ProcessOutput(protocol.ProcessProtocol):
    """
    Everything a child process writes (stdout and stderr together), and
    its exit status once it ends.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.status: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value.exitCode
        self.ended.callback(self.status)


def run_process(argv: list[str], path: str = ROOT) -> ProcessOutput:
    """
    Start a tool (a bench script, the conformance run) in C{path} with this
    process's environment; its output, whose C{ended} fires with its exit
    status.
    """
    out = ProcessOutput()
    reactor.spawnProcess(out, argv[0], argv, env=dict(os.environ), path=path)
    return out


#: every wsproxy setting variable: none reaches a daemon unless a test names it
SETTING_VARIABLES = tuple(s.env for s in SETTINGS)

#: the daemon's two command lines
PYTHON_M_WSPROXY = (sys.executable, "-m", "wsproxy")
TWISTD_WSPROXY = (TWISTD, "-n", "--pidfile=", "wsproxy")


def clean_environ(env: dict[str, str], unset: tuple[str, ...] = ()) -> dict[str, str]:
    """
    This process's environment without any wsproxy setting variable (nor
    C{unset}), plus C{env}.
    """
    dropped = {*SETTING_VARIABLES, *unset}
    full_env = {k: v for k, v in os.environ.items() if k not in dropped}
    full_env.update(env)
    return full_env


def daemon_env(redis_url: str, **env: str) -> dict[str, str]:
    """
    What most daemons get: loopback, a port the kernel picks, C{redis_url},
    no drain at shutdown; C{env} on top.
    """
    return {"HOST": "127.0.0.1", "PORT": "0", "REDIS_URL": redis_url,
            "SHUTDOWN_DRAIN_SECS": "0", **env}


class Daemon:
    """
    A wsproxy child process (C{args}) in its own empty working directory,
    with a clean environment (L{clean_environ}) plus C{env}.
    """

    def __init__(self, args: list[str], env: dict[str, str], unset: tuple[str, ...] = ()) -> None:
        self.cwd = tempfile.mkdtemp(prefix="wsproxy-run-")
        self.out = ProcessOutput()
        full_env = clean_environ(env, unset)
        self.process = reactor.spawnProcess(
            self.out, args[0], args, env=full_env, path=self.cwd
        )

    async def port(self) -> int:
        match = await wait_for(lambda: LISTENING.search(self.out.output), timeout=20)
        return int(match.group(1))

    async def redis_ready(self) -> None:
        """
        Wait until both Redis connections are usable (as logged at info).
        """
        await wait_for(lambda: b"commands connection ready" in self.out.output
                       and b"subscriber connection ready" in self.out.output, timeout=20)

    async def ready(self) -> int:
        """
        The port, once the daemon listens there and its Redis connections
        are usable.
        """
        port = await self.port()
        await self.redis_ready()
        return port

    async def healthy(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        """
        Wait until C{GET /health} at C{host:port} answers 200: listening,
        Redis connected, canary confirmed. (For daemons whose log does not
        say where they listen: LOG_LEVEL=warn, LOG_FORMAT=json, a port
        chosen by the test.) Fails with the log if the process ends or
        C{timeout} passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await raw_exchange(
                    0, b"GET /health HTTP/1.0\r\n\r\n",
                    endpoint=TCP4ClientEndpoint(reactor, host, port))
                if status_of(response) == 200:
                    return
            except (error.ConnectionRefusedError, IndexError, ValueError):
                pass
            if self.out.ended.called:
                raise AssertionError(f"exited with {self.out.status}: {self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy within {timeout:g}s: {self.log}")
            await task.deferLater(reactor, 0.05, lambda: None)

    def signal(self, signum: int) -> None:
        if not self.out.ended.called:
            self.process.signalProcess(signum)

    def kill(self) -> None:
        """
        SIGKILL, unless it has exited. (Twisted reports the end of a process
        once its output pipes are closed too, which its own children, if
        any, may hold open.)
        """
        try:
            self.process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    async def stop(self) -> None:
        if not self.out.ended.called:
            self.kill()
            await wait_for(lambda: self.out.ended.called, timeout=20)
        shutil.rmtree(self.cwd, ignore_errors=True)

    @property
    def log(self) -> str:
        return self.out.output.decode(errors="replace")


def start_daemon(test: TestCase, env: dict[str, str],
                 argv: tuple[str, ...] = PYTHON_M_WSPROXY) -> Daemon:
    """
    Start C{argv} (C{python -m wsproxy} by default) with C{env} in a clean
    environment; it is stopped (and its directory removed) at C{test}'s
    clean-up, however the test ends.
    """
    daemon = Daemon(list(argv), env)
    test.addCleanup(daemon.stop)
    return daemon


class EnvTestCase(RedisTestCase):
    """
    The real daemon (C{python -m wsproxy}) against a fresh redis-server,
    started by L{start} with exactly the settings a test names, and ways
    to reach it from outside.
    """

    timeout = 60

    async def start(self, reach: Optional[tuple[str, int]] = None,
                    launcher: tuple[str, ...] = (), **env: str) -> Daemon:
        """
        Start the daemon on a free port of 127.0.0.1 with C{env} on top of
        the defaults below, and wait until C{/health} answers 200 at
        C{reach} (HOST:PORT by default): listening, Redis connected. (The
        port is chosen here, not read from the log, which LOG_LEVEL=warn
        and LOG_FORMAT=json change.) C{launcher} is a command line put in
        front of the daemon's (e.g. C{prlimit}).
        """
        full = daemon_env(self.redis.url, PORT=str(free_port()), SHUTDOWN_GRACE_PERIOD_SECS="2")
        full.update(env)
        self.daemon = start_daemon(self, full, (*launcher, *PYTHON_M_WSPROXY))
        self.host, self.port = reach or (full["HOST"], int(full["PORT"]))
        await self.daemon.healthy(self.port, self.host)
        return self.daemon

    @property
    def log(self) -> str:
        return self.daemon.log

    def endpoint(self, host: Optional[str] = None, port: Optional[int] = None) -> Any:
        return TCP4ClientEndpoint(reactor, host or self.host, port or self.port)

    async def get(self, path: str, host: Optional[str] = None,
                  port: Optional[int] = None) -> bytes:
        return await raw_exchange(0, f"GET {path} HTTP/1.0\r\n\r\n".encode(),
                                  endpoint=self.endpoint(host, port))

    async def health(self) -> Optional[int]:
        try:
            return status_of(await self.get("/health"))
        except (error.ConnectionRefusedError, IndexError, ValueError):
            return None

    def url(self, session: str = "s1") -> str:
        return f"ws://{self.host}:{self.port}/a/ws/{session}"

    async def client(self, session: str = "s1", token: str = "tok", **kwargs: Any) -> Any:
        """
        An Autobahn client of C{session}, whose token is stored first.
        """
        self.r.set(f"session:{session}:auth", token, ex=300)
        c = await connect(self.url(session), token=token, endpoint=self.endpoint(), **kwargs)
        self.addCleanup(c.close_and_wait)
        return c

    async def upgrade(self, headers: Optional[dict[str, str]] = None, session: str = "s1") -> Any:
        """
        A raw upgrade with the session's (stored) token; the raw client,
        once the response head is in.
        """
        self.r.set(f"session:{session}:auth", "tok", ex=300)
        c = await raw_upgrade(self.port, f"/a/ws/{session}",
                              {"Authorization": "Bearer tok", **(headers or {})})
        self.addCleanup(c.abort)
        return c
