"""
TLS on both sides, against real processes and sockets:

  - clients: the proxy listening with C{LISTEN=ssl:...} and a self-signed
    certificate, reached by C{wss://} clients that trust only that
    certificate;
  - Redis: a TLS-only redis-server (C{--port 0 --tls-port N}) reached with
    C{rediss://}: certificate chain and host name are verified, untrusted
    servers are refused, and client certificates are presented when Redis
    asks for them.

All certificates come from L{tests.certs}, generated per test in a
temporary directory.
"""

from __future__ import annotations

import json
import re
import socket
import ssl as stdlib_ssl
import time
from typing import Any

import redis as redispy
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from .certs import Authority, CertDir, self_signed
from .support import (
    RedisServer,
    RunningProxy,
    TlsRedisServer,
    clean_autobahn_timers,
    connect,
    daemon_env,
    exchange_messages,
    free_port,
    raw_exchange,
    redis_server,
    settings_for,
    start_daemon,
    status_of,
    tls_endpoint,
    up_listener,
    upgrade_request,
    wait_for,
)


def tls_exchange(port: int, trust_file: str, data: bytes) -> defer.Deferred:
    """
    L{raw_exchange} over TLS (server certificate verified); gives up after
    3 s (an upgrade wrongly accepted stays open).
    """
    return raw_exchange(port, data, close_after=3.0, endpoint=tls_endpoint(port, trust_file))


def connect_wss(port: int, session: str, token: str, trust_file: str) -> defer.Deferred:
    """
    Open a C{wss://} WebSocket that trusts only C{trust_file}; fires with the
    L{Client} once open.
    """
    return connect(
        f"wss://localhost:{port}/agent/ws/{session}", token=token,
        endpoint=tls_endpoint(port, trust_file),
    )


class TlsTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.certs = CertDir()
        self.addCleanup(self.certs.cleanup)
        self.addCleanup(clean_autobahn_timers)

    def start_proxy(self, redis_url: str, **settings: Any) -> RunningProxy:
        proxy = RunningProxy(settings_for(redis_url, **settings))
        self.addCleanup(self.stop_proxy, proxy, False)
        return proxy

    async def stop_proxy(self, proxy: RunningProxy, strict: bool = True) -> float:
        """
        Stop the proxy; if its shutdown has not completed within 5 s, drop
        its Redis connections so that it does (and fail, if C{strict}).

        @return: how long the shutdown took.
        """
        started = time.monotonic()
        stopped = proxy.stop()
        try:
            await wait_for(lambda: stopped.called, timeout=5.0)
        except AssertionError:
            for link in (proxy.proxy.commands, proxy.proxy.subscriber):
                proto = link.ready or link._connecting
                if proto is not None and proto.transport is not None:
                    proto.transport.abortConnection()
            await stopped
            if strict:
                self.fail("proxy shutdown did not complete within 5 s")
        await stopped
        return time.monotonic() - started

    def start_redis(self, server: RedisServer) -> redispy.Redis:
        r = redis_server(self, server).client()
        self.addCleanup(r.close)
        return r

    async def exchange_messages(
        self, r: redispy.Redis, proxy: RunningProxy, session: str = "s1"
    ) -> None:
        """
        A client authenticates with a token stored through C{r}, receives a
        message published on :down, and its message arrives on :up.
        """
        r.set(f"session:{session}:auth", "tok", ex=300)
        await exchange_messages(self, r, proxy.url(session), session)

    async def get(self, proxy: RunningProxy, path: str) -> tuple[int, bytes]:
        response = await raw_exchange(proxy.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return status_of(response), response.partition(b"\r\n\r\n")[2]

    async def assert_refused_by_proxy(
        self, proxy: RunningProxy, r: redispy.Redis, seconds: float = 2.5
    ) -> None:
        """
        For C{seconds} (several reconnect attempts) the proxy never has a
        usable Redis connection: not ready, /health 503, an upgrade with a
        valid token 503.
        """
        r.set("session:s1:auth", "tok", ex=300)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.assertFalse(proxy.proxy.hub.healthy, "subscriber became healthy")
            await task.deferLater(reactor, 0.05, lambda: None)
        code, body = await self.get(proxy, "/health")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["redis"], "disconnected")
        response = await raw_exchange(
            proxy.port, upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"}),
            close_after=3.0,
        )
        self.assertEqual(status_of(response), 503, response)
        # nothing got through to Redis: the token's TTL was never renewed
        self.assertLessEqual(r.ttl("session:s1:auth"), 300)
        self.assertGreater(r.ttl("session:s1:auth"), 290)


class ListenTlsTests(TlsTestCase):
    """
    LISTEN=ssl:...: clients reach the proxy over TLS.
    """

    def setUp(self) -> None:
        super().setUp()
        self.redis = RedisServer()
        self.r = self.start_redis(self.redis)
        self.cert, self.key = self_signed(self.certs, "proxy", ["localhost", "127.0.0.1"])
        self.proxy = self.start_proxy(
            self.redis.url,
            listen=f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
        )
        return self.proxy.ready()

    async def test_wss_client_messages_both_ways(self) -> None:
        """
        A wss:// client that trusts only the proxy's self-signed certificate
        authenticates with its token, receives a message published on
        :down and sends one that arrives on :up.
        """
        self.r.set("session:s1:auth", "tok", ex=300)
        received = up_listener(self.r, "s1", self)
        c = await connect_wss(self.proxy.port, "s1", "tok", self.cert)
        self.addCleanup(c.close_and_wait)
        self.assertEqual(c.state, c.STATE_OPEN)
        self.r.publish("session:s1:down", "hello over tls")
        await c.wait_messages(1)
        self.assertEqual(c.messages, [(b"hello over tls", False)])
        c.sendMessage(b'{"from":"client"}')
        c.sendMessage(b"\x00\x01", isBinary=True)
        await wait_for(lambda: len(received()) >= 2)
        self.assertEqual(received(), [b'{"from":"client"}', b"\x00\x01"])
        # the TLS session really used the proxy's certificate
        peer = c.transport.getPeerCertificate()
        self.assertEqual(peer.get_subject().CN, "localhost")

    async def test_closes_over_tls(self) -> None:
        """
        Over TLS the server ends connections itself, promptly: after a
        client-initiated closing handshake and at shutdown (1001). The
        clients never drop the connection themselves.
        """
        self.r.set("session:s1:auth", "tok", ex=300)
        a = await connect_wss(self.proxy.port, "s1", "tok", self.cert)
        b = await connect_wss(self.proxy.port, "s1", "tok", self.cert)
        for c in (a, b):
            c.serverConnectionDropTimeout = 0
        started = time.monotonic()
        a.sendClose(1000)
        self.assertEqual(await a.factory.closed, (1000, None))
        self.assertTrue(a.wasClean)
        self.assertLess(time.monotonic() - started, 1.0)
        await wait_for(lambda: len(self.proxy.proxy.connections) == 1)
        started = time.monotonic()
        await self.proxy.stop()
        self.assertLess(time.monotonic() - started, 2.0)
        code, _ = await b.factory.closed
        self.assertEqual(code, 1001)
        self.assertTrue(b.wasClean)

    async def test_refusals_and_health_over_tls(self) -> None:
        """
        Over TLS the HTTP side works too: /health is 200, a wrong token 403;
        a plain-text request to the TLS port gets no HTTP answer.
        """
        self.r.set("session:s1:auth", "tok", ex=300)
        response = await tls_exchange(self.proxy.port, self.cert, b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(response), 200)
        self.assertEqual(json.loads(response.partition(b"\r\n\r\n")[2])["status"], "healthy")
        response = await tls_exchange(
            self.proxy.port, self.cert,
            upgrade_request("/a/ws/s1", {"Authorization": "Bearer wrong"}),
        )
        self.assertEqual(status_of(response), 403)
        plain = await raw_exchange(
            self.proxy.port, b"GET /health HTTP/1.0\r\n\r\n", close_after=2.0
        )
        self.assertFalse(plain.startswith(b"HTTP/"), plain[:40])


class RedisTlsTests(TlsTestCase):
    """
    rediss://: the proxy verifies Redis's certificate and host name.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ca = Authority(self.certs)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def ready_events(self) -> list[dict[str, Any]]:
        return [
            e for e in self.events
            if "connection ready" in str(e.get("log_format", ""))
        ]

    def assert_never_reported_ready(self, proxy: RunningProxy) -> None:
        events = self.ready_events()
        self.assertEqual(
            len(events), 0,
            f"{len(events)} 'redis ... connection ready' log lines for a connection "
            "that was never usable",
        )
        self.assertEqual(proxy.proxy.stats.redis_reconnects(), 0)
        del self.events[:]

    async def test_verified_connection_messages_both_ways(self) -> None:
        """
        With REDIS_URL=rediss://localhost:PORT and REDIS_TLS_CA_FILE, the
        proxy connects (healthy), a client authenticates and messages flow
        both ways. An IP address in the URL is verified against the
        certificate's IP subjectAltName.
        """
        cert, key = self.ca.issue("redis", ["localhost", "127.0.0.1"])
        server = TlsRedisServer(self.ca.ca_file, cert, key)
        r = self.start_redis(server)
        for host, session in (("localhost", "s1"), ("127.0.0.1", "s2")):
            proxy = self.start_proxy(server.url(host), redis_tls_ca_file=self.ca.ca_file)
            await proxy.ready()
            code, body = await self.get(proxy, "/health")
            self.assertEqual((code, json.loads(body)["status"]), (200, "healthy"), host)
            await self.exchange_messages(r, proxy, session)
            await self.stop_proxy(proxy, False)

    async def test_shutdown_completes(self) -> None:
        """
        With rediss:// the proxy shuts down promptly (a TLS connection to
        Redis closes cleanly) with a client connected, and Redis sees its
        connections go.
        """
        cert, key = self.ca.issue("redis", ["localhost"])
        server = TlsRedisServer(self.ca.ca_file, cert, key)
        r = self.start_redis(server)
        proxy = self.start_proxy(server.url(), redis_tls_ca_file=self.ca.ca_file)
        await proxy.ready()
        await self.exchange_messages(r, proxy)
        self.assertEqual(len(r.client_list()), 2 + 2)  # test client + pubsub, proxy's two
        took = await self.stop_proxy(proxy)
        self.assertLess(took, 2.0)
        await wait_for(lambda: len(r.client_list()) == 2)

    async def test_wrong_hostname_refused(self) -> None:
        """
        A certificate from the trusted CA but issued for redis.test only:
        with the URL host 127.0.0.1 or localhost the proxy refuses the
        connection; it never becomes ready, /health is 503 and upgrades 503.
        """
        cert, key = self.ca.issue("redis", ["redis.test"])
        server = TlsRedisServer(self.ca.ca_file, cert, key)
        r = self.start_redis(server)
        # control: the certificate is valid for redis.test and chains to the CA
        context = stdlib_ssl.create_default_context(cafile=self.ca.ca_file)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="redis.test") as tls:
                self.assertEqual(tls.getpeercert()["subjectAltName"], (("DNS", "redis.test"),))
        for host in ("127.0.0.1", "localhost"):
            proxy = self.start_proxy(server.url(host), redis_tls_ca_file=self.ca.ca_file)
            await self.assert_refused_by_proxy(proxy, r)
            await self.stop_proxy(proxy, False)

    async def test_untrusted_server_refused(self) -> None:
        """
        A self-signed Redis certificate (right host name) is refused without
        REDIS_TLS_CA_FILE (system CAs) and with an unrelated CA file; with
        the certificate itself as REDIS_TLS_CA_FILE it is accepted.
        """
        cert, key = self_signed(self.certs, "redis-self", ["localhost"])
        server = TlsRedisServer(cert, cert, key)
        r = self.start_redis(server)
        other = Authority(self.certs, "other-ca")
        for ca_file in (None, other.ca_file):
            proxy = self.start_proxy(server.url("localhost"), redis_tls_ca_file=ca_file)
            await self.assert_refused_by_proxy(proxy, r)
            await self.stop_proxy(proxy, False)
        proxy = self.start_proxy(server.url("localhost"), redis_tls_ca_file=cert)
        await proxy.ready()
        await self.exchange_messages(r, proxy)

    async def test_client_certificate(self) -> None:
        """
        Redis with --tls-auth-clients yes: with REDIS_TLS_CERT_FILE and
        REDIS_TLS_KEY_FILE the proxy connects and messages flow; without a
        client certificate it never gets a usable connection.
        """
        cert, key = self.ca.issue("redis", ["localhost"])
        backend = self.ca.issue("backend", ["backend"], client=True)
        proxy_cert, proxy_key = self.ca.issue("proxy-client", ["wsproxy"], client=True)
        server = TlsRedisServer(self.ca.ca_file, cert, key, "yes", client_cert=backend)
        r = self.start_redis(server)

        proxy = self.start_proxy(server.url(), redis_tls_ca_file=self.ca.ca_file)
        await self.assert_refused_by_proxy(proxy, r)
        await self.stop_proxy(proxy, False)

        proxy = self.start_proxy(
            server.url(),
            redis_tls_ca_file=self.ca.ca_file,
            redis_tls_cert_file=proxy_cert,
            redis_tls_key_file=proxy_key,
        )
        await proxy.ready()
        await self.exchange_messages(r, proxy)

    async def test_unverified_connection_never_reported_ready(self) -> None:
        """
        While TLS verification fails (wrong host name) or Redis rejects the
        proxy's (missing) client certificate, the proxy never logs a Redis
        connection as ready and does not count reconnects: a connection
        only becomes usable after Redis has answered over it.
        """
        cert, key = self.ca.issue("redis", ["redis.test"])
        server = TlsRedisServer(self.ca.ca_file, cert, key)
        r = self.start_redis(server)
        proxy = self.start_proxy(server.url("localhost"), redis_tls_ca_file=self.ca.ca_file)
        await self.assert_refused_by_proxy(proxy, r, seconds=2.0)
        self.assert_never_reported_ready(proxy)
        await self.stop_proxy(proxy, False)

        cert, key = self.ca.issue("redis2", ["localhost"])
        backend = self.ca.issue("backend", ["backend"], client=True)
        server = TlsRedisServer(self.ca.ca_file, cert, key, "yes", client_cert=backend)
        r = self.start_redis(server)
        proxy = self.start_proxy(server.url("localhost"), redis_tls_ca_file=self.ca.ca_file)
        await self.assert_refused_by_proxy(proxy, r, seconds=2.0)
        self.assert_never_reported_ready(proxy)


class RedisFailureReportTests(TlsTestCase):
    """
    The real daemon (C{python -m wsproxy}) against a TLS-only redis-server
    it cannot verify, and against a closed port: the log names the Redis
    address and the actual reason in one line (not once per attempt), the
    metric counts every attempt by reason, and Twisted's own retry chatter
    is not in the log.
    """

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        self.ca = Authority(self.certs)

    async def run_failing(self, redis_url: str, reason: str, **env: str) -> bytes:
        """
        Run the daemon until at least 6 connection attempts have failed
        with C{reason}; return its output so far.
        """
        daemon = start_daemon(self, daemon_env(redis_url, LOG_LEVEL="debug", **env))
        port = await daemon.port()
        pattern = re.compile(
            rb'wsproxy_redis_connect_failures_total\{reason="%s"\} (\d+)' % reason.encode()
        )
        deadline = time.monotonic() + 30
        while True:
            response = await raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            found = pattern.search(response)
            if found and float(found.group(1)) >= 6:
                break
            self.assertLess(time.monotonic(), deadline, response)
            await task.deferLater(reactor, 0.2, lambda: None)
        health = await raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(health), 503)
        output = daemon.out.output
        self.assertNotIn(b"Scheduling retry", output)
        self.assertNotIn(b"Endpoint object at", output)
        return output

    def failure_lines(self, output: bytes) -> list[str]:
        return [line for line in output.decode().splitlines() if "connection failed" in line]

    async def test_untrusted_certificate_reason_logged_once(self) -> None:
        """
        A certificate from a CA the proxy does not trust: one line naming
        rediss://localhost:PORT and OpenSSL's verification error.
        """
        cert, key = self.ca.issue("redis", ["localhost"])
        server = TlsRedisServer(self.ca.ca_file, cert, key)
        self.start_redis(server)
        output = await self.run_failing(server.url("localhost"), "tls_verify")
        lines = self.failure_lines(output)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"redis rediss://localhost:{server.port}: connection failed: ", lines[0])
        self.assertRegex(
            lines[0],
            "TLS certificate verify failed: (unable to get local issuer certificate"
            "|self-signed certificate in certificate chain)",
        )

    async def test_hostname_mismatch_logged_once(self) -> None:
        """
        A trusted certificate for another host name: one line saying so.
        """
        cert, key = self.ca.issue("redis", ["redis.test"])
        server = TlsRedisServer(self.ca.ca_file, cert, key)
        self.start_redis(server)
        output = await self.run_failing(
            server.url("localhost"), "tls_hostname", REDIS_TLS_CA_FILE=self.ca.ca_file
        )
        lines = self.failure_lines(output)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"rediss://localhost:{server.port}", lines[0])
        self.assertIn("does not match the host name 'localhost'", lines[0])

    async def test_missing_client_certificate_logged_once(self) -> None:
        """
        Redis demands a client certificate the proxy does not have: one
        line with the TLS alert.
        """
        cert, key = self.ca.issue("redis", ["localhost"])
        backend = self.ca.issue("backend", ["backend"], client=True)
        server = TlsRedisServer(self.ca.ca_file, cert, key, "yes", client_cert=backend)
        self.start_redis(server)
        output = await self.run_failing(
            server.url("localhost"), "tls", REDIS_TLS_CA_FILE=self.ca.ca_file
        )
        lines = self.failure_lines(output)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("TLS handshake failed: ", lines[0])
        self.assertIn("certificate", lines[0].split("TLS handshake failed: ")[1])

    async def test_connection_refused_logged_once(self) -> None:
        """
        Nothing listening at REDIS_URL: one "connection refused" line.
        """
        port = free_port()
        output = await self.run_failing(f"redis://127.0.0.1:{port}", "refused")
        lines = self.failure_lines(output)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"redis redis://127.0.0.1:{port}: connection failed: connection refused",
                      lines[0])
