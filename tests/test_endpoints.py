"""
The other ways in and out, for real: the daemon (C{python -m wsproxy})
listening on a Unix socket (C{LISTEN=unix:...}) and with TLS
(C{LISTEN=ssl:...}), and reaching a redis-server that listens only on a
Unix socket (C{REDIS_URL=unix:///...}); messages go both ways over each.
"""

from __future__ import annotations

import os
import signal
import shutil
import tempfile
import time

from twisted.internet import reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial.unittest import TestCase

from .certs import CertDir, self_signed
from .support import (
    Daemon,
    RedisTestCase,
    UnixRedisServer,
    clean_autobahn_timers,
    daemon_env,
    exchange_messages,
    raw_exchange,
    redis_server,
    start_daemon,
    status_of,
    tls_endpoint,
    wait_for,
)


class EndpointTests(RedisTestCase):
    timeout = 60

    def start(self, **env: str) -> Daemon:
        return start_daemon(self, daemon_env(self.redis.url, **env))

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
        self.unix_redis = redis_server(self, UnixRedisServer())
        self.addCleanup(clean_autobahn_timers)

    async def test_redis_over_unix_socket(self) -> None:
        """
        REDIS_URL=unix:///PATH?db=2 against a redis-server with no TCP
        port: the token is read from database 2 over the socket, messages go
        both ways, and on SIGTERM the process exits 0.
        """
        server = self.unix_redis
        daemon = start_daemon(self, daemon_env(f"{server.url}?db=2"))
        port = await daemon.ready()
        await wait_for(lambda: f"(redis unix://{server.path}/2)".encode() in daemon.out.output)
        r = server.client(db=2)
        self.addCleanup(r.close)
        r.set("session:s1:auth", "tok", ex=60)
        await exchange_messages(self, r, f"ws://127.0.0.1:{port}/a/ws/s1", "s1")
        self.assertGreater(r.ttl("session:s1:auth"), 60)
        daemon.signal(signal.SIGTERM)
        self.assertEqual(await daemon.out.ended, 0)
