"""
The other ways in and out, for real: the daemon (C{python -m wsproxy})
listening on a Unix socket (C{LISTEN=unix:...}) and with TLS
(C{LISTEN=ssl:...}), and reaching a redis-server that listens only on a
Unix socket (C{REDIS_URL=unix:///...}); messages go both ways over each.
"""

from __future__ import annotations

import os
import signal
import sys
import shutil
import tempfile
import time

import redis as redispy
from twisted.internet import reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial.unittest import TestCase

from .certs import CertDir, self_signed
from .support import (
    Daemon,
    RedisServer,
    RedisTestCase,
    clean_autobahn_timers,
    exchange_messages,
    raw_exchange,
    status_of,
    wait_for,
)
from .test_tls import tls_endpoint


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


class EndpointTests(RedisTestCase):
    timeout = 60

    def start(self, **env: str) -> Daemon:
        base = {"HOST": "127.0.0.1", "PORT": "0", "REDIS_URL": self.redis.url,
                "SHUTDOWN_DRAIN_SECS": "0"}
        base.update(env)
        daemon = Daemon([sys.executable, "-m", "wsproxy"], base)
        self.addCleanup(daemon.stop)
        return daemon

    async def test_listen_unix_socket(self) -> None:
        """
        LISTEN=unix:PATH: the daemon says it listens on PATH; over that
        socket /health answers and a WebSocket client exchanges messages
        both ways.
        """
        where = tempfile.mkdtemp(prefix="wsproxy-listen-")
        self.addCleanup(shutil.rmtree, where, True)
        path = os.path.join(where, "ws.sock")
        daemon = self.start(LISTEN=f"unix:{path}")
        await wait_for(lambda: f"listening on {path} ".encode() in daemon.out.output, timeout=20)
        await daemon.redis_ready()

        def endpoint() -> UNIXClientEndpoint:
            return UNIXClientEndpoint(reactor, path)

        # healthy once the canary channel is confirmed too, a moment after
        # the connections are ready
        responses: list[bytes] = []

        async def health() -> bool:
            responses.append(await raw_exchange(0, b"GET /health HTTP/1.0\r\n\r\n",
                                                endpoint=endpoint()))
            return status_of(responses[-1]) == 200

        deadline = time.monotonic() + 20
        while not await health():
            self.assertLess(time.monotonic(), deadline, responses[-1])
            await task.deferLater(reactor, 0.05, lambda: None)
        self.r.set("session:s1:auth", "tok", ex=60)
        await exchange_messages(self, self.r, "ws://localhost/a/ws/s1", "s1",
                                endpoint=endpoint())
        await wait_for(lambda: b"opened: session=s1 agent=a peer=unix" in daemon.out.output)

    async def test_listen_tls(self) -> None:
        """
        LISTEN=ssl:0:...:privateKey=KEY:certKey=CERT: a wss:// client that
        trusts only that self-signed certificate connects and exchanges
        messages both ways.
        """
        certs = CertDir()
        self.addCleanup(certs.cleanup)
        cert, key = self_signed(certs, "proxy", ["localhost", "127.0.0.1"])
        daemon = self.start(LISTEN=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        port = await daemon.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        await exchange_messages(self, self.r, f"wss://localhost:{port}/a/ws/s1", "s1",
                                endpoint=tls_endpoint(port, cert))


class UnixRedisTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.unix_redis = UnixRedisServer()
        self.addCleanup(self.unix_redis.cleanup)
        self.addCleanup(clean_autobahn_timers)

    async def test_redis_over_unix_socket(self) -> None:
        """
        REDIS_URL=unix:///PATH?db=2 against a redis-server with no TCP
        port: the token is read from database 2 over the socket, messages go
        both ways, and on SIGTERM the process exits 0.
        """
        server = self.unix_redis
        daemon = Daemon([sys.executable, "-m", "wsproxy"], {
            "HOST": "127.0.0.1", "PORT": "0", "REDIS_URL": f"{server.url}?db=2",
            "SHUTDOWN_DRAIN_SECS": "0"})
        self.addCleanup(daemon.stop)
        port = await daemon.ready()
        await wait_for(lambda: f"(redis unix://{server.path}/2)".encode() in daemon.out.output)
        r = server.client(db=2)
        self.addCleanup(r.close)
        r.set("session:s1:auth", "tok", ex=60)
        await exchange_messages(self, r, f"ws://127.0.0.1:{port}/a/ws/s1", "s1")
        self.assertGreater(r.ttl("session:s1:auth"), 60)
        daemon.signal(signal.SIGTERM)
        self.assertEqual(await daemon.out.ended, 0)
