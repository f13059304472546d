"""
Every setting of L{wsproxy.config.SETTINGS} through the environment of the
real daemon (C{python -m wsproxy}), table-driven:

  - L{VALID}: one case per variable. It starts the daemon with that
    variable set in its environment (against a real redis-server) and
    observes the effect from outside: where it listens, what a WebSocket
    or raw HTTP client gets, what lands in Redis, the log, the process
    table. Each case becomes a test method, C{test_<VARIABLE>}.
  - L{INVALID}: one invalid value per variable; each is refused at
    start-up with exactly one line of output naming the variable and exit
    status 2.

L{CoverageTests} fails when a setting has no case in either table, so a new
setting cannot be added without them.

Every daemon gets an environment from which all of the suite's own
settings variables are removed, so that only the case's values count.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import redis as redispy
from twisted.internet import defer, error, reactor, task
from twisted.trial.unittest import SynchronousTestCase

from .certs import Authority, CertDir
from .support import (
    SETTING_VARIABLES,
    RedisTestCase,
    SentinelServer,
    TlsRedisServer,
    attempt,
    connect,
    free_port,
    raw_exchange,
    raw_upgrade,
    redis_server,
    stalled_socket,
    start_daemon,
    start_rig,
    status_of,
    up_listener,
    wait_for,
)
from .support.daemon import EnvTestCase
from .support.http import raw_upgrade
from .support.jwts import SECRET, Keys, token
from .support.sse import open_stream

#: how late an effect may show on a busy 2-core machine
MARGIN = 3.0


# -- what each variable does, observed from outside ---------------------------


async def host(t: EnvTestCase) -> None:
    """
    HOST=127.0.0.2: the proxy listens there and not on 127.0.0.1.
    """
    await t.start(HOST="127.0.0.2")
    with t.assertRaises(error.ConnectionRefusedError):
        await t.get("/health", "127.0.0.1")
    await wait_for(lambda: f"listening on 127.0.0.2:{t.port} " in t.log)


async def port(t: EnvTestCase) -> None:
    """
    PORT=N: the proxy answers on port N.
    """
    number = free_port()
    await t.start(PORT=str(number))
    t.assertEqual(t.port, number)
    await wait_for(lambda: f"listening on 127.0.0.1:{number} " in t.log)


async def listen(t: EnvTestCase) -> None:
    """
    LISTEN=tcp:N:interface=127.0.0.1 wins over HOST/PORT: the proxy answers
    on N, nothing on PORT.
    """
    ignored, used = free_port(), free_port()
    await t.start(PORT=str(ignored), LISTEN=f"tcp:{used}:interface=127.0.0.1",
                  reach=("127.0.0.1", used))
    with t.assertRaises(error.ConnectionRefusedError):
        await t.get("/health", port=ignored)


async def redis_url(t: EnvTestCase) -> None:
    """
    REDIS_URL=redis://127.0.0.1:N/3: the token is read from database 3
    (and its TTL reset there), messages flow both ways.
    """
    await t.start(REDIS_URL=f"{t.redis.url}/3")
    await wait_for(lambda: f"(redis {t.redis.url}/3)" in t.log)
    db3 = redispy.Redis(port=t.redis.port, db=3, socket_timeout=5)
    t.addCleanup(db3.close)
    db3.set("session:s1:auth", "tok", ex=60)
    received = up_listener(t.r, "s1", t)
    c = await connect(t.url(), token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    t.assertGreater(db3.ttl("session:s1:auth"), 60)
    t.assertEqual(t.r.keys("session:*"), [])
    t.r.publish("session:s1:down", "down")
    c.sendMessage(b"up")
    await c.wait_messages(1)
    await wait_for(lambda: received() == [b"up"])


async def redis_tls(t: EnvTestCase, client_auth: bool, separate_key: bool) -> None:
    certs = CertDir()
    t.addCleanup(certs.cleanup)
    ca = Authority(certs)
    cert, key = ca.issue("redis", ["localhost"])
    env = {}
    client_cert = None
    if client_auth:
        client_cert = ca.issue("client", ["wsproxy"], client=True)
        if separate_key:
            env = {"REDIS_TLS_CERT_FILE": client_cert[0], "REDIS_TLS_KEY_FILE": client_cert[1]}
        else:
            combined = certs.path("client-combined.pem")
            with open(combined, "wb") as out:
                for path in client_cert:
                    with open(path, "rb") as f:
                        out.write(f.read())
            env = {"REDIS_TLS_CERT_FILE": combined}
    server = redis_server(t, TlsRedisServer(ca.ca_file, cert, key,
                                            auth_clients="yes" if client_auth else "no",
                                            client_cert=client_cert))
    r = server.client()
    t.addCleanup(r.close)
    await t.start(REDIS_URL=server.url("localhost"), REDIS_TLS_CA_FILE=ca.ca_file, **env)
    r.set("session:s1:auth", "tok", ex=60)
    received = up_listener(r, "s1", t)
    c = await connect(t.url(), token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    r.publish("session:s1:down", "down")
    c.sendMessage(b"up")
    await c.wait_messages(1)
    await wait_for(lambda: received() == [b"up"])


async def redis_tls_ca_file(t: EnvTestCase) -> None:
    """
    REDIS_TLS_CA_FILE with rediss://localhost: the proxy trusts a TLS-only
    redis-server whose certificate that private CA issued (healthy,
    messages both ways). That it refuses without it, or with the wrong CA,
    is in test_tls.
    """
    await redis_tls(t, client_auth=False, separate_key=False)


async def redis_tls_cert_file(t: EnvTestCase) -> None:
    """
    REDIS_TLS_CERT_FILE (certificate and key in one PEM file): the proxy
    presents it to a redis-server that demands client certificates.
    """
    await redis_tls(t, client_auth=True, separate_key=False)


async def redis_tls_key_file(t: EnvTestCase) -> None:
    """
    REDIS_TLS_KEY_FILE: the client certificate's key, in a file of its own.
    """
    await redis_tls(t, client_auth=True, separate_key=True)


class OneSentinel(SentinelServer):
    """
    A sentinel watching the test's Redis as master C{wsp}, stopped at
    clean-up; C{password} is asked of its clients.
    """

    def __init__(self, t: "EnvTestCase", password: Optional[str] = None) -> None:
        super().__init__("wsp", t.redis.port, password)
        t.addCleanup(self.cleanup)


async def sentinel_session(t: EnvTestCase) -> None:
    """
    A client admitted and messages both ways through the master the
    sentinel named.
    """
    received = up_listener(t.r, "s1", t)
    c = await t.client()
    t.r.publish("session:s1:down", "down")
    c.sendMessage(b"up")
    await c.wait_messages(1)
    await wait_for(lambda: received() == [b"up"])


async def redis_sentinels(t: EnvTestCase) -> None:
    """
    REDIS_SENTINELS (with REDIS_SENTINEL_MASTER): the master is found
    through the sentinels (REDIS_URL's host and port are not used; an
    unreachable sentinel listed first is skipped).
    """
    sentinel = OneSentinel(t)
    await t.start(REDIS_URL="redis://127.0.0.1:1", REDIS_SENTINEL_MASTER="wsp",
                  REDIS_SENTINELS=f"127.0.0.1:1,{sentinel.address}")
    t.assertIn("sentinel master 'wsp'", t.log)
    await sentinel_session(t)


async def redis_sentinel_master(t: EnvTestCase) -> None:
    """
    REDIS_SENTINEL_MASTER names the master: an unknown name leaves the
    proxy unhealthy with one line saying so; the right one works.
    """
    sentinel = OneSentinel(t)
    env = {"REDIS_URL": "redis://127.0.0.1:1", "REDIS_SENTINELS": sentinel.address}
    full = {"HOST": "127.0.0.1", "PORT": str(free_port()), "SHUTDOWN_DRAIN_SECS": "0",
            "REDIS_SENTINEL_MASTER": "nosuch", **env}
    wrong = start_daemon(t, full)
    await wait_for(lambda: b"sentinels do not know master 'nosuch'" in wrong.out.output,
                   timeout=20)
    t.assertIsNone(wrong.out.status)
    await t.start(REDIS_SENTINEL_MASTER="wsp", **env)
    await sentinel_session(t)


async def redis_sentinel_password(t: EnvTestCase) -> None:
    """
    REDIS_SENTINEL_PASSWORD (and REDIS_SENTINEL_USERNAME): sentinels that
    require a password are asked with it.
    """
    sentinel = OneSentinel(t, password="s3ntinel")
    await t.start(REDIS_URL="redis://127.0.0.1:1", REDIS_SENTINEL_MASTER="wsp",
                  REDIS_SENTINELS=sentinel.address, REDIS_SENTINEL_PASSWORD="s3ntinel",
                  REDIS_SENTINEL_USERNAME="default")
    await sentinel_session(t)


async def redis_sentinel_username(t: EnvTestCase) -> None:
    """
    REDIS_SENTINEL_USERNAME: a user the sentinel does not know is refused,
    and the refusal is the reason the proxy gives.
    """
    sentinel = OneSentinel(t, password="s3ntinel")
    full = {"HOST": "127.0.0.1", "PORT": str(free_port()), "SHUTDOWN_DRAIN_SECS": "0",
            "REDIS_URL": "redis://127.0.0.1:1", "REDIS_SENTINEL_MASTER": "wsp",
            "REDIS_SENTINELS": sentinel.address, "REDIS_SENTINEL_USERNAME": "nobody",
            "REDIS_SENTINEL_PASSWORD": "s3ntinel"}
    daemon = start_daemon(t, full)
    await wait_for(lambda: b"refused" in daemon.out.output and b"sentinel" in daemon.out.output,
                   timeout=20)


async def redis_sentinel_tls(t: EnvTestCase) -> None:
    """
    REDIS_SENTINEL_TLS=true: the sentinels are spoken to over TLS (a
    plain-text sentinel then never names a master: the proxy stays
    unhealthy and says why).
    """
    sentinel = OneSentinel(t)
    full = {"HOST": "127.0.0.1", "PORT": str(free_port()), "SHUTDOWN_DRAIN_SECS": "0",
            "REDIS_URL": "redis://127.0.0.1:1", "REDIS_SENTINEL_MASTER": "wsp",
            "REDIS_SENTINELS": sentinel.address, "REDIS_SENTINEL_TLS": "true"}
    daemon = start_daemon(t, full)
    await wait_for(lambda: b"no sentinel answered" in daemon.out.output, timeout=20)
    t.assertIsNone(daemon.out.status)


async def auth_timeout(t: EnvTestCase) -> None:
    """
    AUTH_TIMEOUT_SECS=1: with Redis paused, an upgrade gets 504 after about
    a second (not the default 5).
    """
    await t.start(AUTH_TIMEOUT_SECS="1")
    t.r.set("session:s1:auth", "tok", ex=60)
    t.redis.pause()
    t.addCleanup(t.redis.resume)
    started = time.monotonic()
    c = await raw_upgrade(t.port, "/a/ws/s1", {"Authorization": "Bearer tok"}, timeout=15)
    t.addCleanup(c.abort)
    elapsed = time.monotonic() - started
    t.assertEqual(c.status, 504, c.data)
    t.assertGreaterEqual(elapsed, 0.9)
    t.assertLess(elapsed, 1 + MARGIN)


async def auth_grace_period(t: EnvTestCase) -> None:
    """
    AUTH_GRACE_PERIOD_SECS=1234: a successful connect sets the token's TTL
    to 1234 s.
    """
    await t.start(AUTH_GRACE_PERIOD_SECS="1234")
    await t.client()
    ttl = t.r.ttl("session:s1:auth")
    t.assertGreater(ttl, 1200)
    t.assertLessEqual(ttl, 1234)


async def ping_interval(t: EnvTestCase) -> None:
    """
    WS_PING_INTERVAL_SECS=1: a client receives a ping about every second
    (and, answering them, stays connected).
    """
    await t.start(WS_PING_INTERVAL_SECS="1")
    c = await t.client()
    opened = time.monotonic()
    pings: list[float] = []
    answer = c.onPing
    c.onPing = lambda payload: (pings.append(time.monotonic()), answer(payload))
    await wait_for(lambda: len(pings) >= 2, timeout=2 * (1 + MARGIN))
    t.assertGreaterEqual(pings[0] - opened, 0.9)
    t.assertGreaterEqual(pings[1] - pings[0], 0.9)
    t.assertLess(pings[1] - opened, 2 * (1 + MARGIN))
    t.assertEqual(c.state, c.STATE_OPEN)


async def sse_retry_ms(t: EnvTestCase) -> None:
    """
    SSE_RETRY_MS=750: an SSE stream's first line tells EventSource to wait
    750 ms before it reconnects.
    """
    await t.start(SSE_RETRY_MS="750")
    t.r.set("session:s1:auth", "tok", ex=60)
    stream = await open_stream(t.port, "/a/sse/s1?access_token=tok", test=t)
    await wait_for(lambda: stream.retry is not None)
    t.assertEqual(stream.retry, 750)
    t.assertTrue(stream.body.startswith(b"retry: 750\n\n"))


async def ping_timeout(t: EnvTestCase) -> None:
    """
    WS_PING_TIMEOUT_SECS=1 (pings every second): a client that does not
    answer is dropped (1006) within seconds, not after the default 10 s.
    Timed precisely in test_deadlines.
    """
    await t.start(WS_PING_INTERVAL_SECS="1", WS_PING_TIMEOUT_SECS="1")
    c = await t.client(auto_ping=False)
    opened = time.monotonic()
    code, _ = await c.factory.closed
    t.assertEqual(code, 1006)
    t.assertLess(time.monotonic() - opened, 4 + MARGIN)
    await wait_for(lambda: "ping timeout" in t.log)


async def shutdown_grace_period(t: EnvTestCase) -> None:
    """
    SHUTDOWN_GRACE_PERIOD_SECS=1: on SIGTERM, a client that ignores the
    close 1001 is dropped after a second; the process exits 0. Timed
    precisely in test_deadlines.
    """
    await t.start(SHUTDOWN_GRACE_PERIOD_SECS="1")
    c = await t.upgrade()
    t.assertEqual(c.status, 101)
    signalled = time.monotonic()
    t.daemon.signal(signal.SIGTERM)
    await wait_for(lambda: c.lost_at is not None, timeout=1 + 2 * MARGIN)
    t.assertGreaterEqual(c.lost_at - signalled, 0.9)
    t.assertEqual(c.close_code(), (1001, b"server shutting down"))
    t.assertEqual(await t.daemon.out.ended, 0)


async def shutdown_drain(t: EnvTestCase) -> None:
    """
    SHUTDOWN_DRAIN_SECS=1: after SIGTERM /ready answers 503 "draining"; the
    process exits 0 a second later.
    """
    await t.start(SHUTDOWN_DRAIN_SECS="1")
    signalled = time.monotonic()
    t.daemon.signal(signal.SIGTERM)
    await wait_for(lambda: "still listening for 1s" in t.log)
    response = await t.get("/ready")
    t.assertEqual(status_of(response), 503)
    t.assertEqual(json.loads(response.partition(b"\r\n\r\n")[2]), {"status": "draining"})
    t.assertEqual(await t.daemon.out.ended, 0)
    t.assertGreaterEqual(time.monotonic() - signalled, 0.9)


async def shutdown_close_delay(t: EnvTestCase) -> None:
    """
    SHUTDOWN_CLOSE_DELAY_SECS=2 (drain 4): after SIGTERM /ready answers 503
    at once, while the open client is still served both ways; it gets 1001
    only about 2 s after the signal; the process exits 0.
    """
    await t.start(SHUTDOWN_DRAIN_SECS="4", SHUTDOWN_CLOSE_DELAY_SECS="2")
    received = up_listener(t.r, "s1", t)
    c = await t.client()
    signalled = time.monotonic()
    t.daemon.signal(signal.SIGTERM)
    await wait_for(lambda: "serving 1 connections 2s more, then closing them" in t.log)
    t.assertEqual(status_of(await t.get("/ready")), 503)
    t.r.publish("session:s1:down", "still here")
    await c.wait_messages(1)
    t.assertEqual(c.messages, [(b"still here", False)])
    c.sendMessage(b"me too")
    await wait_for(lambda: received() == [b"me too"])
    t.assertFalse(c.factory.closed.called)
    code, _ = await c.factory.closed
    t.assertEqual(code, 1001)
    t.assertGreaterEqual(time.monotonic() - signalled, 1.9)
    t.assertEqual(await t.daemon.out.ended, 0)


async def max_message_size(t: EnvTestCase) -> None:
    """
    MAX_MESSAGE_SIZE_BYTES=100: a 100-byte message is published, a 101-byte
    one closes the socket with 1009.
    """
    await t.start(MAX_MESSAGE_SIZE_BYTES="100")
    received = up_listener(t.r, "s1", t)
    c = await t.client()
    c.sendMessage(b"x" * 100)
    await wait_for(lambda: received() == [b"x" * 100])
    c.sendMessage(b"y" * 101)
    code, _ = await c.factory.closed
    t.assertEqual(code, 1009)


async def max_send_buffer(t: EnvTestCase) -> None:
    """
    WS_MAX_SEND_BUFFER_BYTES=50000: a client that stops reading is closed
    as a slow consumer as soon as more than 50,000 bytes wait for it (one
    60 kB message), not 1 MiB.
    """
    await t.start(WS_MAX_SEND_BUFFER_BYTES="50000")
    t.r.set("session:slow:auth", "tok", ex=60)
    stalled = stalled_socket(t.port, "/a/ws/slow", "tok")
    t.addCleanup(stalled.close)
    payload = b"\xff" * 60000
    for _ in range(1000):  # at most 60 MB, far beyond the kernel's buffers
        t.r.publish("session:slow:down", payload)
        await task.deferLater(reactor, 0.002, lambda: None)
        if "slow consumer" in t.log:
            break
    match = re.search(r"slow consumer, closing with 1008: session=slow .* unsent=(\d+)B", t.log)
    t.assertIsNotNone(match, t.log[-2000:])
    assert match is not None
    t.assertGreater(int(match.group(1)), 50000)
    t.assertLess(int(match.group(1)), 50000 + len(payload) + 16)


async def handshake_timeout(t: EnvTestCase) -> None:
    """
    HANDSHAKE_TIMEOUT_SECS=1: a connection that sends nothing is dropped
    after a second (not the default 5).
    """
    await t.start(HANDSHAKE_TIMEOUT_SECS="1")
    started = time.monotonic()
    data = await raw_exchange(t.port, b"", close_after=1 + 2 * MARGIN)
    elapsed = time.monotonic() - started
    t.assertEqual(data, b"")
    t.assertGreaterEqual(elapsed, 0.9)
    t.assertLess(elapsed, 1 + MARGIN)
    await wait_for(lambda: "dropped a client that did not send its request in 1s" in t.log)


async def gc_full_collection(t: EnvTestCase) -> None:
    """
    GC_FULL_COLLECTION_SECS=1: the daemon collects everything, long-lived
    objects too, every second and logs it; its pauses are in /metrics.
    """
    await t.start(GC_FULL_COLLECTION_SECS="1")
    await wait_for(lambda: t.log.count("full garbage collection:") >= 2, timeout=10 * MARGIN)
    metrics = (await t.get("/metrics")).decode()
    t.assertIn('wsproxy_gc_pause_seconds_count{generation="2"}', metrics)


async def max_connections(t: EnvTestCase) -> None:
    """
    MAX_CONNECTIONS=1: a second connection gets 503 "Too many connections"
    while the first is open, and is admitted once it has closed.
    """
    await t.start(MAX_CONNECTIONS="1")
    first = await t.client()
    second = await t.upgrade()
    t.assertEqual(second.status, 503, second.data)
    t.assertIn(b"Too many connections", second.data)
    await first.close_and_wait()
    await wait_for(lambda: "closed: session=s1" in t.log)
    third = await t.upgrade()
    t.assertEqual(third.status, 101, third.data)


async def auth_fail_limit(t: EnvTestCase) -> None:
    """
    AUTH_FAIL_LIMIT=2: two wrong tokens from one address get 403, the
    third upgrade from it 429 with Retry-After, even with a valid token.
    """
    await t.start(AUTH_FAIL_LIMIT="2")
    t.r.set("session:s1:auth", "tok", ex=300)
    for _ in range(2):
        t.assertEqual((await attempt(t.port, "127.0.0.2", "wrong"))[0], 403)
    status, head = await attempt(t.port, "127.0.0.2", "tok")
    t.assertEqual(status, 429, head)
    t.assertIn(b"\r\nRetry-After: ", head)


async def auth_fail_window(t: EnvTestCase) -> None:
    """
    AUTH_FAIL_WINDOW_SECS=1: a limited address is admitted again about a
    second after its first failure.
    """
    await t.start(AUTH_FAIL_LIMIT="1", AUTH_FAIL_WINDOW_SECS="1")
    t.r.set("session:s1:auth", "tok", ex=300)
    await attempt(t.port, "127.0.0.2", "wrong")
    t.assertEqual((await attempt(t.port, "127.0.0.2", "tok"))[0], 429)
    deadline = time.monotonic() + 1 + MARGIN * 3
    while (await attempt(t.port, "127.0.0.2", "tok"))[0] != 101:
        t.assertLess(time.monotonic(), deadline)


async def auth_fail_table_size(t: EnvTestCase) -> None:
    """
    AUTH_FAIL_TABLE_SIZE=1: a failure from a second address makes the
    proxy forget the first one (no longer limited); the second is.
    """
    await t.start(AUTH_FAIL_LIMIT="1", AUTH_FAIL_TABLE_SIZE="1")
    t.r.set("session:s1:auth", "tok", ex=300)
    await attempt(t.port, "127.0.0.2", "wrong")
    await attempt(t.port, "127.0.0.3", "wrong")
    t.assertEqual((await attempt(t.port, "127.0.0.2", "tok"))[0], 101)
    t.assertEqual((await attempt(t.port, "127.0.0.3", "tok"))[0], 429)


async def auth_fail_exempt(t: EnvTestCase) -> None:
    """
    AUTH_FAIL_EXEMPT=127.0.0.2/32: failures from 127.0.0.2 never limit it;
    127.0.0.3 is limited as usual.
    """
    await t.start(AUTH_FAIL_LIMIT="1", AUTH_FAIL_EXEMPT="127.0.0.2/32")
    for source in ("127.0.0.2", "127.0.0.3"):
        await attempt(t.port, source, "wrong")
    t.assertEqual((await attempt(t.port, "127.0.0.2", "wrong"))[0], 403)
    t.assertEqual((await attempt(t.port, "127.0.0.3", "wrong"))[0], 429)


async def trusted_proxies(t: EnvTestCase) -> None:
    """
    TRUSTED_PROXIES=127.0.0.0/8: the client is the X-Forwarded-For address:
    after a failure as 10.0.0.1 that client is limited, 10.0.0.2 is not.
    """
    await t.start(AUTH_FAIL_LIMIT="1", TRUSTED_PROXIES="127.0.0.0/8")
    t.r.set("session:s1:auth", "tok", ex=300)
    await attempt(t.port, "127.0.0.2", "wrong", extra={"X-Forwarded-For": "10.0.0.1"})
    limited = await attempt(t.port, "127.0.0.2", "tok", extra={"X-Forwarded-For": "10.0.0.1"})
    t.assertEqual(limited[0], 429)
    other = await attempt(t.port, "127.0.0.2", "tok", extra={"X-Forwarded-For": "10.0.0.2"})
    t.assertEqual(other[0], 101)
    await wait_for(lambda: "client=10.0.0.1" in t.log)


async def handshakes_per_turn(t: EnvTestCase) -> None:
    """
    HANDSHAKES_PER_TURN=1: thirty upgrades sent at once are read one per
    event-loop turn, and all of them are admitted.
    """
    await t.start(HANDSHAKES_PER_TURN="1")
    t.r.set("session:s1:auth", "tok", ex=300)
    results = await defer.gatherResults([
        defer.ensureDeferred(attempt(t.port, "127.0.0.2", "tok")) for _ in range(30)
    ])
    t.assertEqual([status for status, _ in results], [101] * 30)


async def listen_backlog(t: EnvTestCase) -> None:
    """
    LISTEN_BACKLOG=2: while the proxy accepts nothing (stopped), the kernel
    completes the handshakes of at most three of ten clients (backlog + 1)
    and leaves the others' SYNs unanswered; with 4096 all ten would be
    queued at once.
    """
    import select
    import socket

    await t.start(LISTEN_BACKLOG="2")
    t.daemon.signal(signal.SIGSTOP)
    clients = []
    try:
        for _ in range(10):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((t.host, t.port))
            clients.append(sock)

        def completed() -> int:
            _, writable, _ = select.select([], clients, [], 0)
            return len(writable)

        await wait_for(lambda: completed() >= 3)
        await task.deferLater(reactor, 1.0, lambda: None)  # room for more to (wrongly) complete
        t.assertEqual(completed(), 3)
    finally:
        t.daemon.signal(signal.SIGCONT)
        for sock in clients:
            sock.close()


async def allowed_origins(t: EnvTestCase) -> None:
    """
    ALLOWED_ORIGINS=https://app.example.com: that origin is admitted,
    another one gets 403 "Origin not allowed".
    """
    await t.start(ALLOWED_ORIGINS="https://app.example.com")
    other = await t.upgrade({"Origin": "https://evil.example.com"})
    t.assertEqual(other.status, 403, other.data)
    t.assertIn(b"Origin not allowed", other.data)
    listed = await t.upgrade({"Origin": "https://app.example.com"})
    t.assertEqual(listed.status, 101, listed.data)


async def require_origin(t: EnvTestCase) -> None:
    """
    REQUIRE_ORIGIN=true: an upgrade without Origin gets 403 "Origin
    required", one with an Origin is admitted.
    """
    await t.start(REQUIRE_ORIGIN="true")
    without = await t.upgrade()
    t.assertEqual(without.status, 403, without.data)
    t.assertIn(b"Origin required", without.data)
    with_origin = await t.upgrade({"Origin": "https://app.example.com"})
    t.assertEqual(with_origin.status, 101, with_origin.data)


async def require_json(t: EnvTestCase) -> None:
    """
    REQUIRE_JSON=true: a text message that is not JSON is answered
    {"error":"Invalid JSON format"} and not published; JSON is.
    """
    await t.start(REQUIRE_JSON="true")
    received = up_listener(t.r, "s1", t)
    c = await t.client()
    c.sendMessage(b"not json")
    await c.wait_messages(1)
    t.assertEqual(c.messages, [(b'{"error":"Invalid JSON format"}', False)])
    c.sendMessage(b'{"a":1}')
    await wait_for(lambda: received() == [b'{"a":1}'])


async def compression(t: EnvTestCase) -> None:
    """
    WS_COMPRESSION=true: a permessage-deflate offer is accepted in the 101.
    """
    await t.start(WS_COMPRESSION="true")
    c = await t.upgrade({"Sec-WebSocket-Extensions": "permessage-deflate"})
    t.assertEqual(c.status, 101, c.data)
    t.assertRegex(c.head.decode(), r"(?i)\r\nSec-WebSocket-Extensions: permessage-deflate")


async def frame_mode(t: EnvTestCase) -> None:
    """
    FRAME_MODE=tagged: client text and binary messages reach :up with a
    t/b tag byte; a b-tagged payload reaches the client as a binary frame.
    """
    await t.start(FRAME_MODE="tagged")
    received = up_listener(t.r, "s1", t)
    c = await t.client()
    c.sendMessage(b"hello")
    c.sendMessage(b"\x00\x01", isBinary=True)
    await wait_for(lambda: len(received()) >= 2)
    t.assertEqual(received(), [b"thello", b"b\x00\x01"])
    t.r.publish("session:s1:down", b"b\x02")
    await c.wait_messages(1)
    t.assertEqual(c.messages, [(b"\x02", True)])


async def workers(t: EnvTestCase) -> None:
    """
    WORKERS=2: two worker processes (python -m wsproxy) under the parent,
    which on SIGTERM stops them both and exits 0.
    """
    daemon = await t.start(WORKERS="2")
    pid = daemon.process.pid

    def children() -> list[int]:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]

    await wait_for(lambda: len(children()) == 2, timeout=20)
    workers = children()
    # a parent killed by the cleanup would leave its workers running (and
    # holding the output pipe open): kill them first
    t.addCleanup(_kill, workers)
    for child in workers:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            t.assertIn(b"\0-m\0wsproxy", f.read())
    await wait_for(lambda: "2 workers listening on" in t.log)
    daemon.signal(signal.SIGTERM)
    t.assertEqual(await daemon.out.ended, 0)
    t.assertFalse([w for w in workers if os.path.exists(f"/proc/{w}")])


def _kill(pids: list[int]) -> None:
    """
    SIGKILL those of C{pids} that are still wsproxy processes.
    """
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"wsproxy" in f.read():
                    os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


async def log_level(t: EnvTestCase) -> None:
    """
    LOG_LEVEL=warn: connections opening and closing (info) print nothing;
    Redis going away (a warning) does.
    """
    await t.start(LOG_LEVEL="warn")
    c = await t.client()
    await c.close_and_wait()
    t.redis.stop()
    await wait_for(lambda: "connection lost" in t.log)
    t.assertNotIn("#info]", t.log)
    t.assertNotIn("opened:", t.log)


async def log_format(t: EnvTestCase) -> None:
    """
    LOG_FORMAT=json: every line is a JSON object; a connection's lines
    carry its session id.
    """
    await t.start(LOG_FORMAT="json")
    c = await t.client()
    await c.close_and_wait()
    await wait_for(lambda: "closed: session=s1" in t.log)
    records = [json.loads(line) for line in t.log.splitlines() if line.strip()]
    opened = [r for r in records if r["message"].startswith("opened:")]
    t.assertEqual([(r["session_id"], r["level"]) for r in opened], [("s1", "info")])


def fcall_publish(t: EnvTestCase, message: str, session: str = "s1") -> bytes:
    reply: bytes = t.r.fcall(
        "wsproxy_publish", 2, f"session:{session}:history", f"session:{session}:meta", message
    )
    return reply


async def functions_loaded(t: EnvTestCase) -> None:
    await wait_for(lambda: "wsproxy" in str(t.r.function_list()))


async def resume(t: EnvTestCase) -> None:
    """
    RESUME=true: the wsproxy functions are loaded into Redis, and a client
    asking ?resume= gets a resumable session (its first frame is the
    recovery control frame); without it that request is 400.
    """
    await t.start(RESUME="true")
    await functions_loaded(t)
    t.r.set("session:s1:auth", "tok", ex=300)
    c = await connect(t.url() + "?resume=", token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    await c.wait_messages(1)
    t.assertTrue(c.messages[0][0].startswith(b'!{"type":"recovery","recovered":true'))
    position = fcall_publish(t, "hello")
    await c.wait_messages(2)
    t.assertEqual(c.messages[1], (position + b"\n" + b"hello", False))


async def history_max_length(t: EnvTestCase) -> None:
    """
    HISTORY_MAX_LENGTH=10: the history is trimmed near 10 entries (whole
    stream nodes of 100 at a time), not kept to the default 1000.
    """
    await t.start(RESUME="true", HISTORY_MAX_LENGTH="10")
    await functions_loaded(t)
    for i in range(600):
        fcall_publish(t, f"m{i}")
    t.assertLess(t.r.xlen("session:s1:history"), 300)


async def history_max_age(t: EnvTestCase) -> None:
    """
    HISTORY_MAX_AGE_SECS=7: a session's history expires 7 s after its
    last message (the default is 300 s).
    """
    await t.start(RESUME="true", HISTORY_MAX_AGE_SECS="7")
    await functions_loaded(t)
    fcall_publish(t, "m")
    ttl = t.r.pttl("session:s1:history")
    t.assertGreater(ttl, 0)
    t.assertLessEqual(ttl, 7000)


async def topics(t: EnvTestCase) -> None:
    """
    TOPICS=true: a session in the set session:s1:topics receives a PUBLISH
    on its topic's channel; with the default (false) the set is not read
    and ?labels=1 is 400.
    """
    await t.start(TOPICS="true")
    t.r.sadd("session:s1:topics", "room")
    t.r.set("session:s1:auth", "tok", ex=300)
    c = await connect(t.url() + "?labels=1", token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    t.r.publish("topic:room:down", "hello")
    await c.wait_messages(1)
    t.assertEqual(c.messages[0], (b"#room\nhello", False))


async def topics_max_per_connection(t: EnvTestCase) -> None:
    """
    TOPICS_MAX_PER_CONNECTION=2: of three topics in the session's set, the
    first two (sorted) are joined and a warning names the session.
    """
    await t.start(TOPICS="true", TOPICS_MAX_PER_CONNECTION="2")
    t.r.sadd("session:s1:topics", "c", "a", "b")
    c = await t.client()
    await wait_for(lambda: t.r.pubsub_numsub("topic:a:down", "topic:b:down", "topic:c:down")
                   == [(b"topic:a:down", 1), (b"topic:b:down", 1), (b"topic:c:down", 0)])
    await wait_for(lambda: "session s1: 1 topics not joined" in t.log)
    t.r.publish("topic:a:down", "to a")
    await c.wait_messages(1)
    t.assertEqual(c.messages, [(b"to a", False)])


def topic_publish(t: EnvTestCase, message: str, topic: str = "room") -> bytes:
    reply: bytes = t.r.fcall(
        "wsproxy_publish", 2, f"topic:{topic}:history", f"topic:{topic}:meta", message
    )
    return reply


async def topic_history_max_length(t: EnvTestCase) -> None:
    """
    TOPIC_HISTORY_MAX_LENGTH=10: a topic's history is trimmed near 10
    entries, while a session's keeps HISTORY_MAX_LENGTH (1000).
    """
    await t.start(RESUME="true", TOPICS="true", TOPIC_HISTORY_MAX_LENGTH="10")
    await functions_loaded(t)
    for i in range(600):
        topic_publish(t, f"m{i}")
        fcall_publish(t, f"m{i}")
    t.assertLess(t.r.xlen("topic:room:history"), 300)
    t.assertEqual(t.r.xlen("session:s1:history"), 600)


async def topic_history_max_age(t: EnvTestCase) -> None:
    """
    TOPIC_HISTORY_MAX_AGE_SECS=7: a topic's history expires 7 s after its
    last message; a session's keeps HISTORY_MAX_AGE_SECS (300 s).
    """
    await t.start(RESUME="true", TOPICS="true", TOPIC_HISTORY_MAX_AGE_SECS="7")
    await functions_loaded(t)
    topic_publish(t, "m")
    fcall_publish(t, "m")
    ttl = t.r.pttl("topic:room:history")
    t.assertGreater(ttl, 0)
    t.assertLessEqual(ttl, 7000)
    t.assertGreater(t.r.pttl("session:s1:history"), 7000)


async def events(t: EnvTestCase) -> None:
    """
    EVENTS=all: opening a socket publishes an open event on wsproxy:events.
    """
    await t.start(EVENTS="all")
    pubsub = t.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("wsproxy:events")
    pubsub.get_message(timeout=1)
    t.addCleanup(pubsub.close)
    await t.client()
    got: list[bytes] = []

    def poll() -> bool:
        message = pubsub.get_message(timeout=0)
        if message is not None:
            got.append(message["data"])
        return bool(got)

    await wait_for(poll)
    t.assertIn(b'"event":"open"', got[0])


async def events_stream_max_length(t: EnvTestCase) -> None:
    """
    EVENTS_STREAM_MAX_LENGTH=10 (with EVENTS=stream): 120 events leave the
    stream trimmed near 10 entries (whole nodes of 100), not all 120.
    """
    await t.start(EVENTS="stream", EVENTS_STREAM_MAX_LENGTH="10")
    for i in range(60):
        c = await t.client(f"s{i}")
        await c.close_and_wait()
    await wait_for(lambda: t.r.xinfo_stream("wsproxy:events:stream")["entries-added"] == 120)
    t.assertLess(t.r.xlen("wsproxy:events:stream"), 100)


async def cluster_session(t: EnvTestCase, setup: Any) -> None:
    """
    A client of a session admitted through a cluster, messages both ways
    (SPUBLISH to :down, SSUBSCRIBE to :up on the masters that own them).
    """
    from wsproxy.names import auth_key, down_channel, up_channel

    from .support.cluster import HOST

    backend = redispy.cluster.RedisCluster(host=HOST, port=setup.nodes[0].port)
    t.addCleanup(backend.close)
    backend.set(auth_key("s1"), "tok", ex=300)
    owner = setup.node_at(setup.owner(up_channel("s1").decode())).client()
    t.addCleanup(owner.close)
    pubsub = owner.pubsub(ignore_subscribe_messages=True)
    t.addCleanup(pubsub.close)
    pubsub.ssubscribe(up_channel("s1").decode())
    c = await connect(t.url(), token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    backend.spublish(down_channel("s1"), "down")
    c.sendMessage(b"up")
    await c.wait_messages(1)
    got: list[bytes] = []

    def poll() -> bool:
        message = pubsub.get_sharded_message(timeout=0)
        if message is not None:
            got.append(message["data"])
        return bool(got)

    await wait_for(poll)
    t.assertEqual(got, [b"up"])


def start_cluster(t: EnvTestCase) -> Any:
    from .support.cluster import ClusterSetup

    return start_rig(t, ClusterSetup())


async def redis_cluster(t: EnvTestCase) -> None:
    """
    REDIS_CLUSTER=true with REDIS_URL naming one node of a 3-master
    cluster: the proxy finds every master and serves a session through
    the shards that own its key and channels.
    """
    setup = start_cluster(t)
    await t.start(REDIS_URL=setup.url, REDIS_CLUSTER="true")
    await wait_for(lambda: "3 masters serve all slots" in t.log)
    await cluster_session(t, setup)


async def redis_cluster_nodes(t: EnvTestCase) -> None:
    """
    REDIS_CLUSTER_NODES: with REDIS_URL's node unreachable, the cluster is
    found through the nodes listed.
    """
    setup = start_cluster(t)
    nodes = ",".join(f"127.0.0.1:{n.port}" for n in setup.nodes[1:])
    await t.start(REDIS_URL="redis://127.0.0.1:1", REDIS_CLUSTER="true",
                  REDIS_CLUSTER_NODES=nodes)
    await cluster_session(t, setup)


async def key_hash_tags(t: EnvTestCase) -> None:
    """
    KEY_HASH_TAGS=true: the token is read from session:{s1}:auth (and its
    TTL reset there), messages flow on session:{s1}:down and
    session:{s1}:up; the untagged key is not read.
    """
    await t.start(KEY_HASH_TAGS="true")
    t.r.set("session:s1:auth", "tok", ex=300)
    refused = await raw_exchange(t.port, ("GET /a/ws/s1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket"
                                          "\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
                                          "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
                                          "\r\nAuthorization: Bearer tok\r\n\r\n").encode())
    t.assertEqual(status_of(refused), 403)
    t.r.set("session:{s1}:auth", "tok", ex=60)
    pubsub = t.r.pubsub(ignore_subscribe_messages=True)
    t.addCleanup(pubsub.close)
    pubsub.subscribe("session:{s1}:up")
    c = await connect(t.url(), token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    t.assertGreater(t.r.ttl("session:{s1}:auth"), 60)
    t.r.publish("session:{s1}:down", "down")
    c.sendMessage(b"up")
    await c.wait_messages(1)
    got: list[bytes] = []

    def poll() -> bool:
        message = pubsub.get_message(timeout=0)
        if message is not None:
            got.append(message["data"])
        return bool(got)

    await wait_for(poll)
    t.assertEqual(got, [b"up"])


async def upstream(t: EnvTestCase) -> None:
    """
    UPSTREAM=stream: a client message is appended to its session's
    partition stream (16 by default) with its fields, not published on
    session:s1:up; ?ack=1 gets it acknowledged with its entry id.
    """
    await t.start(UPSTREAM="stream")
    listen = up_listener(t.r, "s1", t)
    t.r.set("session:s1:auth", "tok", ex=300)
    c = await connect(t.url() + "?ack=1", token="tok", endpoint=t.endpoint())
    t.addCleanup(c.close_and_wait)
    c.sendMessage(b"m1\nhello", False)
    await c.wait_messages(1)
    key = f"wsproxy:up:{{p{zlib.crc32(b's1') % 16}}}"
    [(entry_id, fields)] = t.r.xrange(key)
    t.assertEqual((fields[b"session"], fields[b"data"], fields[b"id"]), (b"s1", b"hello", b"m1"))
    t.assertEqual(json.loads(c.messages[0][0][1:]),
                  {"type": "ack", "id": "m1", "position": entry_id.decode()})
    t.assertEqual(listen(), [])


async def upstream_partitions(t: EnvTestCase) -> None:
    """
    UPSTREAM_PARTITIONS=3: session s1's messages go to partition
    crc32("s1") mod 3, and only there.
    """
    await t.start(UPSTREAM="stream", UPSTREAM_PARTITIONS="3")
    c = await t.client()
    c.sendMessage(b"hello", False)
    key = f"wsproxy:up:{{p{zlib.crc32(b's1') % 3}}}"
    await wait_for(lambda: t.r.xlen(key) == 1)
    t.assertEqual(sorted(k.decode() for k in t.r.keys("wsproxy:up:*")), [key])


async def upstream_stream_max_length(t: EnvTestCase) -> None:
    """
    UPSTREAM_STREAM_MAX_LENGTH=10: 600 client messages leave the partition
    stream trimmed near 10 entries (whole nodes of 100), not all 600.
    """
    await t.start(UPSTREAM="stream", UPSTREAM_STREAM_MAX_LENGTH="10")
    c = await t.client()
    for i in range(600):
        c.sendMessage(b"m%d" % i, False)
    key = f"wsproxy:up:{{p{zlib.crc32(b's1') % 16}}}"
    await wait_for(lambda: t.r.exists(key) and
                   t.r.xinfo_stream(key)["entries-added"] == 600)
    t.assertLess(t.r.xlen(key), 300)


def _gauge(metrics: bytes, name: str) -> float:
    match = re.search(rb"^%b (\S+)$" % name.encode(), metrics, re.M)
    return float(match.group(1)) if match else -1.0


async def upstream_max_in_flight(t: EnvTestCase) -> None:
    """
    UPSTREAM_MAX_IN_FLIGHT=2: with Redis stopped, a client sending 100
    messages of 10 KB has at most 2 appends in flight, plus what one
    socket read held (64 KiB: 7 more), not all 100 (the default, 128,
    would take them all).
    """
    await t.start(UPSTREAM="stream", UPSTREAM_MAX_IN_FLIGHT="2")
    c = await t.client()
    t.redis.pause()
    t.addCleanup(t.redis.resume)
    for i in range(100):
        c.sendMessage(b"x" * 10_000, False)
    deadline = time.monotonic() + 20
    while (in_flight := _gauge(await t.get("/metrics"), "wsproxy_upstream_in_flight")) < 2:
        t.assertLess(time.monotonic(), deadline, "no append in flight within 20s")
        await task.deferLater(reactor, 0.05, lambda: None)
    t.assertLessEqual(in_flight, 2 + 7)


# -- JWT settings (docs/guide/authentication.md) -------------------------------

JWT_KEYS = Keys()


async def jwt_status(t: EnvTestCase, jwt_: str, session: str = "s1") -> tuple[int, bytes]:
    """
    The status and status line of an upgrade presenting C{jwt_} in the header.
    """
    c = await raw_upgrade(t.port, f"/a/ws/{session}", {"Authorization": f"Bearer {jwt_}"})
    t.addCleanup(c.abort)
    assert c.head is not None
    return c.status or 0, c.head.split(b"\r\n", 1)[0]


def jwks_server(t: EnvTestCase, document: dict[str, bytes]) -> tuple[str, list[float]]:
    """
    A JWK Set served over HTTP from this process: its URL and the times it
    was fetched.
    """
    from twisted.web import resource, server

    fetched: list[float] = []

    class Jwks(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            fetched.append(time.monotonic())
            return document["body"]

    listening = reactor.listenTCP(0, server.Site(Jwks()), interface="127.0.0.1")
    t.addCleanup(listening.stopListening)
    return f"http://127.0.0.1:{listening.getHost().port}/jwks", fetched


async def auth_mode(t: EnvTestCase) -> None:
    """
    AUTH_MODE=jwt: a JWT signed with JWT_SECRET is admitted with nothing in
    Redis; a token stored in Redis is not a JWT (403 Malformed token).
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
    t.assertEqual((await jwt_status(t, token()))[0], 101)
    t.r.set("session:s1:auth", "tok", ex=60)
    t.assertEqual((await jwt_status(t, "tok"))[1], b"HTTP/1.1 403 Malformed token")


async def jwt_secret(t: EnvTestCase) -> None:
    """
    JWT_SECRET: tokens signed with it are admitted, others refused.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
    t.assertEqual((await jwt_status(t, token()))[0], 101)
    refused = await jwt_status(t, token(key="another-secret-of-at-least-32-bytes"))
    t.assertEqual(refused[1], b"HTTP/1.1 403 Invalid token signature")


async def jwt_secret_file(t: EnvTestCase) -> None:
    """
    JWT_SECRET_FILE: every secret in it is accepted.
    """
    path = os.path.abspath(t.mktemp())
    with open(path, "w") as f:
        f.write("first-secret-of-at-least-32-bytes!!\n# a comment\n"
                "second-secret-of-at-least-32-bytes!\n")
    await t.start(AUTH_MODE="jwt", JWT_SECRET_FILE=path)
    for secret in ("first-secret-of-at-least-32-bytes!!", "second-secret-of-at-least-32-bytes!"):
        t.assertEqual((await jwt_status(t, token(key=secret)))[0], 101)


async def jwt_public_key_file(t: EnvTestCase) -> None:
    """
    JWT_PUBLIC_KEY_FILE: RS256 and ES256 tokens verified with the PEM
    public keys of two files; an HS256 token is an algorithm without a key.
    """
    directory = os.path.abspath(t.mktemp())
    os.makedirs(directory)
    rsa = JWT_KEYS.write_pem(directory, JWT_KEYS.rsa)
    ec = JWT_KEYS.write_pem(directory, JWT_KEYS.ec)
    await t.start(AUTH_MODE="jwt", JWT_PUBLIC_KEY_FILE=f"{rsa},{ec}")
    t.assertEqual((await jwt_status(t, token(key=JWT_KEYS.rsa, algorithm="RS256")))[0], 101)
    t.assertEqual((await jwt_status(t, token(key=JWT_KEYS.ec, algorithm="ES256")))[0], 101)
    t.assertEqual((await jwt_status(t, token()))[1],
                  b"HTTP/1.1 403 Token algorithm not allowed")


async def jwt_jwks_file(t: EnvTestCase) -> None:
    """
    JWT_JWKS_FILE: the token's kid chooses the key; an unknown kid is 403.
    """
    directory = os.path.abspath(t.mktemp())
    os.makedirs(directory)
    path = JWT_KEYS.write_jwks(directory, ed1=JWT_KEYS.ed, ec1=JWT_KEYS.ec)
    await t.start(AUTH_MODE="jwt", JWT_JWKS_FILE=path)
    t.assertEqual((await jwt_status(t, token(key=JWT_KEYS.ed, algorithm="EdDSA",
                                             kid="ed1")))[0], 101)
    t.assertEqual((await jwt_status(t, token(key=JWT_KEYS.ec, algorithm="ES256",
                                             kid="nope")))[1], b"HTTP/1.1 403 Unknown key id")


async def jwt_jwks_url(t: EnvTestCase) -> None:
    """
    JWT_JWKS_URL: the set is fetched at start; its keys admit tokens.
    """
    url, fetched = jwks_server(t, {"body": json.dumps(JWT_KEYS.jwks(k1=JWT_KEYS.ec)).encode()})
    await t.start(AUTH_MODE="jwt", JWT_JWKS_URL=url)
    await wait_for(lambda: "JWKS fetched" in t.log)
    t.assertEqual((await jwt_status(t, token(key=JWT_KEYS.ec, algorithm="ES256",
                                             kid="k1")))[0], 101)


async def jwt_jwks_refresh(t: EnvTestCase) -> None:
    """
    JWT_JWKS_REFRESH_SECS=1: the set is fetched again every second, and a
    key published meanwhile is in use without a token asking for it.
    """
    document = {"body": json.dumps(JWT_KEYS.jwks(k1=JWT_KEYS.ec)).encode()}
    url, fetched = jwks_server(t, document)
    await t.start(AUTH_MODE="jwt", JWT_JWKS_URL=url, JWT_JWKS_REFRESH_SECS="1",
                  JWT_JWKS_MIN_REFRESH_SECS="3600")
    await wait_for(lambda: len(fetched) >= 1)
    document["body"] = json.dumps(JWT_KEYS.jwks(k1=JWT_KEYS.ec, k2=JWT_KEYS.ed)).encode()
    seen = len(fetched)
    await wait_for(lambda: len(fetched) >= seen + 2, timeout=20)
    t.assertEqual((await jwt_status(t, token(key=JWT_KEYS.ed, algorithm="EdDSA",
                                             kid="k2")))[0], 101)


async def jwt_jwks_min_refresh(t: EnvTestCase) -> None:
    """
    JWT_JWKS_MIN_REFRESH_SECS=3600: after the fetch at start, tokens with
    unknown kids fetch nothing more (refused at once).
    """
    url, fetched = jwks_server(t, {"body": json.dumps(JWT_KEYS.jwks(k1=JWT_KEYS.ec)).encode()})
    await t.start(AUTH_MODE="jwt", JWT_JWKS_URL=url, JWT_JWKS_MIN_REFRESH_SECS="3600")
    await wait_for(lambda: "JWKS fetched" in t.log)
    for n in range(5):
        status = await jwt_status(t, token(key=JWT_KEYS.ec, algorithm="ES256", kid=f"x{n}"))
        t.assertEqual(status[1], b"HTTP/1.1 403 Unknown key id")
    t.assertEqual(len(fetched), 1)


async def jwt_algorithms(t: EnvTestCase) -> None:
    """
    JWT_ALGORITHMS=HS512: an HS256 token is refused, an HS512 one admitted.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET="x" * 64, JWT_ALGORITHMS="HS512")
    t.assertEqual((await jwt_status(t, token(key="x" * 64, algorithm="HS512")))[0], 101)
    t.assertEqual((await jwt_status(t, token(key="x" * 64)))[1],
                  b"HTTP/1.1 403 Token algorithm not allowed")


async def jwt_require_exp(t: EnvTestCase) -> None:
    """
    JWT_REQUIRE_EXP=true: a token without exp is refused.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_REQUIRE_EXP="true")
    t.assertEqual((await jwt_status(t, token()))[1], b"HTTP/1.1 403 Token without expiry")
    t.assertEqual((await jwt_status(t, token({"exp": int(time.time()) + 60})))[0], 101)


async def jwt_leeway(t: EnvTestCase) -> None:
    """
    JWT_LEEWAY_SECS=60: a token expired 30 s ago is admitted, one expired
    90 s ago is not.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_LEEWAY_SECS="60")
    now = int(time.time())
    t.assertEqual((await jwt_status(t, token({"exp": now - 30})))[0], 101)
    t.assertEqual((await jwt_status(t, token({"exp": now - 90})))[1],
                  b"HTTP/1.1 403 Token expired")


async def jwt_audience(t: EnvTestCase) -> None:
    """
    JWT_AUDIENCE=app,web: a token for web is admitted; one for another
    audience, or without one, is not.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_AUDIENCE="app,web")
    t.assertEqual((await jwt_status(t, token({"aud": "web"})))[0], 101)
    for claims in ({"aud": "other"}, {}):
        t.assertEqual((await jwt_status(t, token(claims)))[1],
                      b"HTTP/1.1 403 Invalid token audience")


async def jwt_issuer(t: EnvTestCase) -> None:
    """
    JWT_ISSUER=auth: only tokens whose iss is auth are admitted.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_ISSUER="auth")
    t.assertEqual((await jwt_status(t, token({"iss": "auth"})))[0], 101)
    t.assertEqual((await jwt_status(t, token({"iss": "evil"})))[1],
                  b"HTTP/1.1 403 Invalid token issuer")


async def jwt_max_token_bytes(t: EnvTestCase) -> None:
    """
    JWT_MAX_TOKEN_BYTES=300: a longer token is refused unread.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_MAX_TOKEN_BYTES="300")
    t.assertEqual((await jwt_status(t, token()))[0], 101)
    t.assertEqual((await jwt_status(t, token({"pad": "x" * 300})))[1],
                  b"HTTP/1.1 403 Token too large")


async def jwt_expire_connections(t: EnvTestCase) -> None:
    """
    JWT_EXPIRE_CONNECTIONS=true: the connection is closed with 3000 when
    its token's exp passes.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_EXPIRE_CONNECTIONS="true")
    c = await connect(f"ws://127.0.0.1:{t.port}/a/ws/s1", token=token(
        {"exp": int(time.time()) + 2}), endpoint=t.endpoint())
    t.assertEqual(await c.factory.closed, (3000, "token expired"))


async def jwt_denylist(t: EnvTestCase) -> None:
    """
    JWT_DENYLIST=session: while session:s1:revoked exists, s1's tokens are
    refused; other sessions are not affected.
    """
    await t.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_DENYLIST="session")
    t.r.set("session:s1:revoked", "1", ex=60)
    t.assertEqual((await jwt_status(t, token()))[1], b"HTTP/1.1 403 Token revoked")
    t.assertEqual((await jwt_status(t, token(session="s2"), "s2"))[0], 101)


@dataclass(frozen=True)
class Case:
    variable: str
    check: Callable[[EnvTestCase], Awaitable[None]]


VALID = [
    Case("HOST", host),
    Case("PORT", port),
    Case("LISTEN", listen),
    Case("REDIS_URL", redis_url),
    Case("REDIS_SENTINELS", redis_sentinels),
    Case("REDIS_SENTINEL_MASTER", redis_sentinel_master),
    Case("REDIS_SENTINEL_USERNAME", redis_sentinel_username),
    Case("REDIS_SENTINEL_PASSWORD", redis_sentinel_password),
    Case("REDIS_SENTINEL_TLS", redis_sentinel_tls),
    Case("REDIS_CLUSTER", redis_cluster),
    Case("REDIS_CLUSTER_NODES", redis_cluster_nodes),
    Case("KEY_HASH_TAGS", key_hash_tags),
    Case("REDIS_TLS_CA_FILE", redis_tls_ca_file),
    Case("REDIS_TLS_CERT_FILE", redis_tls_cert_file),
    Case("REDIS_TLS_KEY_FILE", redis_tls_key_file),
    Case("AUTH_TIMEOUT_SECS", auth_timeout),
    Case("AUTH_GRACE_PERIOD_SECS", auth_grace_period),
    Case("SSE_RETRY_MS", sse_retry_ms),
    Case("WS_PING_INTERVAL_SECS", ping_interval),
    Case("WS_PING_TIMEOUT_SECS", ping_timeout),
    Case("SHUTDOWN_GRACE_PERIOD_SECS", shutdown_grace_period),
    Case("SHUTDOWN_DRAIN_SECS", shutdown_drain),
    Case("SHUTDOWN_CLOSE_DELAY_SECS", shutdown_close_delay),
    Case("MAX_MESSAGE_SIZE_BYTES", max_message_size),
    Case("WS_MAX_SEND_BUFFER_BYTES", max_send_buffer),
    Case("HANDSHAKE_TIMEOUT_SECS", handshake_timeout),
    Case("MAX_CONNECTIONS", max_connections),
    Case("GC_FULL_COLLECTION_SECS", gc_full_collection),
    Case("AUTH_FAIL_LIMIT", auth_fail_limit),
    Case("AUTH_FAIL_WINDOW_SECS", auth_fail_window),
    Case("AUTH_FAIL_TABLE_SIZE", auth_fail_table_size),
    Case("AUTH_FAIL_EXEMPT", auth_fail_exempt),
    Case("TRUSTED_PROXIES", trusted_proxies),
    Case("HANDSHAKES_PER_TURN", handshakes_per_turn),
    Case("LISTEN_BACKLOG", listen_backlog),
    Case("ALLOWED_ORIGINS", allowed_origins),
    Case("REQUIRE_ORIGIN", require_origin),
    Case("REQUIRE_JSON", require_json),
    Case("WS_COMPRESSION", compression),
    Case("RESUME", resume),
    Case("EVENTS", events),
    Case("EVENTS_STREAM_MAX_LENGTH", events_stream_max_length),
    Case("HISTORY_MAX_LENGTH", history_max_length),
    Case("HISTORY_MAX_AGE_SECS", history_max_age),
    Case("TOPICS", topics),
    Case("TOPICS_MAX_PER_CONNECTION", topics_max_per_connection),
    Case("TOPIC_HISTORY_MAX_LENGTH", topic_history_max_length),
    Case("TOPIC_HISTORY_MAX_AGE_SECS", topic_history_max_age),
    Case("UPSTREAM", upstream),
    Case("UPSTREAM_PARTITIONS", upstream_partitions),
    Case("UPSTREAM_STREAM_MAX_LENGTH", upstream_stream_max_length),
    Case("UPSTREAM_MAX_IN_FLIGHT", upstream_max_in_flight),
    Case("FRAME_MODE", frame_mode),
    Case("WORKERS", workers),
    Case("LOG_LEVEL", log_level),
    Case("LOG_FORMAT", log_format),
    Case("AUTH_MODE", auth_mode),
    Case("JWT_SECRET", jwt_secret),
    Case("JWT_SECRET_FILE", jwt_secret_file),
    Case("JWT_PUBLIC_KEY_FILE", jwt_public_key_file),
    Case("JWT_JWKS_FILE", jwt_jwks_file),
    Case("JWT_JWKS_URL", jwt_jwks_url),
    Case("JWT_JWKS_REFRESH_SECS", jwt_jwks_refresh),
    Case("JWT_JWKS_MIN_REFRESH_SECS", jwt_jwks_min_refresh),
    Case("JWT_ALGORITHMS", jwt_algorithms),
    Case("JWT_REQUIRE_EXP", jwt_require_exp),
    Case("JWT_LEEWAY_SECS", jwt_leeway),
    Case("JWT_AUDIENCE", jwt_audience),
    Case("JWT_ISSUER", jwt_issuer),
    Case("JWT_MAX_TOKEN_BYTES", jwt_max_token_bytes),
    Case("JWT_EXPIRE_CONNECTIONS", jwt_expire_connections),
    Case("JWT_DENYLIST", jwt_denylist),
]


class SettingTests(EnvTestCase):
    """
    One test per L{VALID} case, C{test_<VARIABLE>} (added below).
    """


def _add_test(case: Case) -> None:
    async def test(self: SettingTests) -> None:
        await case.check(self)

    test.__name__ = f"test_{case.variable}"
    test.__doc__ = case.check.__doc__
    setattr(SettingTests, test.__name__, test)


for _case in VALID:
    _add_test(_case)


# -- invalid values ------------------------------------------------------------


@dataclass(frozen=True)
class Invalid:
    variable: str
    value: str
    #: other variables the value needs to be judged on its own
    context: dict[str, str] = field(default_factory=dict)


REDISS = {"REDIS_URL": "rediss://127.0.0.1:6380"}

INVALID = [
    Invalid("HOST", "127.0.0.1:8080"),
    Invalid("PORT", "http"),
    Invalid("LISTEN", "tcp:http"),
    Invalid("REDIS_URL", "http://127.0.0.1:6379"),
    Invalid("REDIS_SENTINELS", "127.0.0.1", {"REDIS_SENTINEL_MASTER": "m"}),
    Invalid("REDIS_SENTINEL_MASTER", "my master", {"REDIS_SENTINELS": "127.0.0.1:26379"}),
    Invalid("REDIS_SENTINEL_USERNAME", "wsproxy"),
    Invalid("REDIS_SENTINEL_PASSWORD", "secret"),
    Invalid("REDIS_SENTINEL_TLS", "sometimes"),
    Invalid("REDIS_CLUSTER", "sometimes"),
    Invalid("REDIS_CLUSTER_NODES", "127.0.0.1", {"REDIS_CLUSTER": "true"}),
    Invalid("KEY_HASH_TAGS", "braces"),
    Invalid("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem", REDISS),
    Invalid("REDIS_TLS_CERT_FILE", "/nonexistent/client.pem", REDISS),
    Invalid("REDIS_TLS_KEY_FILE", "/nonexistent/client.key", REDISS),
    Invalid("AUTH_TIMEOUT_SECS", "0"),
    Invalid("AUTH_GRACE_PERIOD_SECS", "1.5"),
    Invalid("SSE_RETRY_MS", "2s"),
    Invalid("WS_PING_INTERVAL_SECS", "-1"),
    Invalid("WS_PING_TIMEOUT_SECS", "0"),
    Invalid("SHUTDOWN_GRACE_PERIOD_SECS", "soon"),
    Invalid("SHUTDOWN_DRAIN_SECS", "-5"),
    Invalid("SHUTDOWN_CLOSE_DELAY_SECS", "-1"),
    Invalid("MAX_MESSAGE_SIZE_BYTES", "0"),
    Invalid("WS_MAX_SEND_BUFFER_BYTES", "1MB"),
    Invalid("HANDSHAKE_TIMEOUT_SECS", "inf"),
    Invalid("MAX_CONNECTIONS", "-1"),
    Invalid("GC_FULL_COLLECTION_SECS", "hourly"),
    Invalid("AUTH_FAIL_LIMIT", "-1"),
    Invalid("AUTH_FAIL_WINDOW_SECS", "0"),
    Invalid("AUTH_FAIL_TABLE_SIZE", "0"),
    Invalid("AUTH_FAIL_EXEMPT", "10.0.0.0/33"),
    Invalid("TRUSTED_PROXIES", "proxy.example.com"),
    Invalid("HANDSHAKES_PER_TURN", "many"),
    Invalid("LISTEN_BACKLOG", "0"),
    Invalid("ALLOWED_ORIGINS", "app.example.com"),
    Invalid("REQUIRE_ORIGIN", "maybe"),
    Invalid("REQUIRE_JSON", "2"),
    Invalid("WS_COMPRESSION", "gzip"),
    Invalid("RESUME", "perhaps"),
    Invalid("EVENTS", "everything"),
    Invalid("EVENTS_STREAM_MAX_LENGTH", "0"),
    Invalid("HISTORY_MAX_LENGTH", "0"),
    Invalid("HISTORY_MAX_AGE_SECS", "-1"),
    Invalid("TOPICS", "maybe"),
    Invalid("TOPICS_MAX_PER_CONNECTION", "0"),
    Invalid("TOPIC_HISTORY_MAX_LENGTH", "0"),
    Invalid("TOPIC_HISTORY_MAX_AGE_SECS", "0"),
    Invalid("UPSTREAM", "kafka"),
    Invalid("UPSTREAM_PARTITIONS", "2000"),
    Invalid("UPSTREAM_STREAM_MAX_LENGTH", "0"),
    Invalid("UPSTREAM_MAX_IN_FLIGHT", "-1"),
    Invalid("FRAME_MODE", "binary"),
    Invalid("WORKERS", "0"),
    Invalid("LOG_LEVEL", "chatty"),
    Invalid("LOG_FORMAT", "xml"),
    Invalid("AUTH_MODE", "ldap"),
    # a public key as an HMAC secret: how algorithm confusion is configured
    Invalid("JWT_SECRET", Keys.public_pem(JWT_KEYS.rsa).decode(), {"AUTH_MODE": "jwt"}),
    Invalid("JWT_SECRET_FILE", "/nonexistent/secrets", {"AUTH_MODE": "jwt"}),
    Invalid("JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem", {"AUTH_MODE": "jwt"}),
    Invalid("JWT_JWKS_FILE", "/nonexistent/jwks.json", {"AUTH_MODE": "jwt"}),
    Invalid("JWT_JWKS_URL", "ftp://keys.example.com/jwks"),
    Invalid("JWT_JWKS_REFRESH_SECS", "0"),
    Invalid("JWT_JWKS_MIN_REFRESH_SECS", "-1"),
    Invalid("JWT_ALGORITHMS", "none"),
    Invalid("JWT_REQUIRE_EXP", "sometimes"),
    Invalid("JWT_LEEWAY_SECS", "-1"),
    Invalid("JWT_AUDIENCE", "app,we\tb"),
    Invalid("JWT_ISSUER", "auth\nserver"),
    Invalid("JWT_MAX_TOKEN_BYTES", "0"),
    Invalid("JWT_EXPIRE_CONNECTIONS", "at-exp"),
    Invalid("JWT_DENYLIST", "redis"),
]


class InvalidValueTests(RedisTestCase):
    timeout = 60

    async def test_each_invalid_value_refused(self) -> None:
        """
        Each value of L{INVALID}, in the environment of its own daemon, stops
        start-up with exactly one line of output, naming the variable, and
        exit status 2. (The daemons run side by side; the failure lists
        every variable that was not refused so.)
        """
        daemons = []
        for case in INVALID:
            env = {"HOST": "127.0.0.1", "PORT": "0", "REDIS_URL": self.redis.url,
                   **case.context, case.variable: case.value}
            daemon = start_daemon(self, env)
            daemons.append((case, daemon))
        try:
            await wait_for(lambda: all(d.out.status is not None for _, d in daemons), timeout=40)
        except AssertionError:
            pass  # those still running are listed below
        problems = []
        for case, daemon in daemons:
            lines = daemon.out.output.decode(errors="replace").splitlines()
            prefix = f"wsproxy: configuration error: {case.variable}"
            if daemon.out.status != 2 or len(lines) != 1 or not lines[0].startswith(prefix):
                problems.append(f"{case.variable}={case.value!r}: exit {daemon.out.status}, "
                                f"output {lines[:5]!r}")
        self.assertEqual(problems, [])


class CoverageTests(SynchronousTestCase):
    def test_every_setting_has_a_case(self) -> None:
        """
        Both tables have exactly one case for every setting: a setting
        added to wsproxy.config without them fails here.
        """
        valid = [case.variable for case in VALID]
        invalid = [case.variable for case in INVALID]
        self.assertEqual(sorted(valid), sorted(SETTING_VARIABLES))
        self.assertEqual(sorted(invalid), sorted(SETTING_VARIABLES))
