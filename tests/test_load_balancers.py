"""
wsproxy behind the load balancers whose configurations ship in
C{deploy/}: HAProxy (C{deploy/haproxy/haproxy.cfg}) and nginx
(C{deploy/nginx/wsproxy.conf}), each run for real by the test, with the
committed file, in front of two real daemons sharing one real
redis-server.

For each balancer: a WebSocket through it works both ways; connections
spread over both daemons and a session may be on either or both; a
draining daemon is taken out and its clients reconnect to the other
without seeing an error; the client's own address reaches wsproxy in
X-Forwarded-For. Through HAProxy, with its tunnel timeout made short, an
idle WebSocket lives on wsproxy's pings alone. L{ConfigurationTests} reads
the committed files: their idle timeouts are far above the daemon's ping
interval and HAProxy notices a drain within the daemon's drain window.

A missing haproxy or nginx fails these tests; nothing here is skipped.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any, Callable, Coroutine

from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import SETTINGS

from .support import (
    Daemon,
    RedisTestCase,
    attempt,
    connect,
    daemon_env,
    exchange_messages,
    free_port,
    raw_exchange,
    start_daemon,
    status_of,
    up_listener,
    wait_for,
)
from .support.balancers import HAPROXY_CFG, NGINX_CONF, Balancer, start_haproxy, start_nginx

#: the balancers reach the daemons from here, and tell them who the client is
TRUSTED = "127.0.0.1"
#: how long a daemon told to drain keeps listening in these tests: far
#: longer than anything they wait for
DRAIN = "60"


def default(env: str) -> float:
    """
    A wsproxy setting's default, as a number.
    """
    return float(next(s for s in SETTINGS if s.env == env).default)


class Instance:
    """
    A daemon behind the balancer, and what its log says about sessions.
    """

    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.address = f"127.0.0.1:{port}"

    def opened(self, session: str, agent: str = "") -> int:
        """
        How many sockets of C{session} (of C{agent}, if named) this daemon
        has opened.
        """
        agent = f"agent={agent} " if agent else ""
        return self.daemon.log.count(f"opened: session={session} {agent}")

    async def opened_now(self, session: str, n: int = 1) -> None:
        """
        Wait until this daemon's log says it opened C{n} sockets of
        C{session} (the line may come a little after the client's 101).
        """
        await wait_for(lambda: self.opened(session) >= n, timeout=10)

    async def get(self, path: str) -> bytes:
        return await raw_exchange(0, f"GET {path} HTTP/1.0\r\n\r\n".encode(),
                                  endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))

    async def upgrades(self) -> int:
        """
        Every upgrade request this daemon has answered, whatever the outcome.
        """
        body = (await self.get("/metrics")).decode()
        return sum(int(float(n)) for n in
                   re.findall(r"^wsproxy_connections_total\{[^}]*\} (\S+)$", body, re.M))


class BalancerTests:
    """
    What every balancer must do: mixed into a L{RedisTestCase} that names
    the balancer.
    """

    start_balancer: Callable[[Any, tuple[str, str]], Coroutine[Any, Any, Balancer]]
    #: whether the balancer asks /ready itself (an active health check)
    checks_readiness: bool

    async def instances(self, n: int = 2, **env: str) -> list[Instance]:
        """
        C{n} daemons sharing the test's redis-server, which trust the
        balancer's X-Forwarded-For; each healthy.
        """
        started = []
        for _ in range(n):
            port = free_port()
            full = daemon_env(self.redis.url, PORT=str(port), TRUSTED_PROXIES=TRUSTED,
                              SHUTDOWN_GRACE_PERIOD_SECS="2", **env)
            daemon = start_daemon(self, full)  # type: ignore[arg-type]
            started.append(Instance(daemon, port))
        for instance in started:
            await instance.daemon.healthy(instance.port)
        return started

    async def balancer(self, instances: list[Instance]) -> Balancer:
        """
        The balancer in front of the first and the last of C{instances}
        (of a single one, both server lines name it).
        """
        servers = (instances[0].address, instances[-1].address)
        return await type(self).start_balancer(self, servers)

    async def client(self, lb: Balancer, session: str, agent: str = "a") -> Any:
        """
        A WebSocket of C{session} through the balancer, its token stored.
        """
        self.r.set(f"session:{session}:auth", "tok", ex=300)
        c = await connect(f"ws://127.0.0.1:{lb.port}/{agent}/ws/{session}", token="tok")
        self.addCleanup(c.close_and_wait)
        return c

    async def test_messages_flow_both_ways(self) -> None:
        """
        A WebSocket through the balancer is admitted; a message published
        on the session's :down channel reaches it, and its own message
        arrives on :up.
        """
        instances = await self.instances()
        lb = await self.balancer(instances)
        self.r.set("session:s1:auth", "tok", ex=300)
        await exchange_messages(self, self.r, f"ws://127.0.0.1:{lb.port}/a/ws/s1", "s1")
        await wait_for(lambda: sum(i.opened("s1") for i in instances) == 1)

    async def test_spread_without_stickiness(self) -> None:
        """
        Four sockets of one session opened through the balancer land two
        on each daemon (least connections, no stickiness); each gets the
        session's messages and each one's messages reach :up, wherever it
        landed. A socket closed and opened again lands on the other daemon
        (now the one with fewer) and works there just the same.
        """
        instances = await self.instances()
        lb = await self.balancer(instances)
        received = up_listener(self.r, "s1", self)
        clients = [await self.client(lb, "s1", agent=f"a{n}") for n in range(4)]
        await landed(instances, "s1", [2, 2])
        self.r.publish("session:s1:down", "to-all")
        for c in clients:
            await c.wait_messages(1)
            self.assertEqual(c.messages, [(b"to-all", False)])
        for n, c in enumerate(clients):
            c.sendMessage(f"from-{n}".encode())
        await wait_for(lambda: sorted(received()) == [f"from-{n}".encode() for n in range(4)])

        # the first socket's daemon keeps it and one more; the other's two
        # close, then the first socket reconnects: it lands on the other
        # daemon and gets the session's messages there
        first = next(i for i in instances if i.opened("s1", "a0"))
        other = next(i for i in instances if i is not first)
        for n, c in enumerate(clients):
            if other.opened("s1", f"a{n}"):
                await c.close_and_wait()
        await clients[0].close_and_wait()
        again = await self.client(lb, "s1", agent="a0")
        await wait_for(lambda: other.opened("s1", "a0") == 1)
        self.r.publish("session:s1:down", "again")
        await again.wait_messages(1)
        self.assertEqual(again.messages, [(b"again", False)])

    async def test_drain(self) -> None:
        """
        A daemon told to stop (SIGTERM, drain window far longer than the
        test) answers /ready 503 while it keeps listening; its clients get
        1001 and reconnect through the balancer, all of them successfully,
        to the other daemon: a handshake the balancer still sends to the
        draining one gets 503 there and is tried on the other. With an
        active health check (HAProxy), new connections then stop reaching
        the draining daemon at all (L{ConfigurationTests} checks that the
        checks' timing fits the default SHUTDOWN_DRAIN_SECS; this test
        allows a busy machine four times that). Without one (nginx), the
        503 is all the balancer learns: the first reconnect reaches the
        draining daemon and is passed on.
        """
        instances = await self.instances(SHUTDOWN_DRAIN_SECS=DRAIN)
        draining, other = instances
        lb = await self.balancer(instances)
        sessions = [f"d{n}" for n in range(4)]
        clients = {s: await self.client(lb, s) for s in sessions}
        await wait_for(lambda: all(draining.opened(s) + other.opened(s) for s in sessions))
        on_draining = [s for s in sessions if draining.opened(s)]
        self.assertEqual(len(on_draining), 2)
        self.assertEqual(status_of(await draining.get("/ready")), 200)

        draining.daemon.signal(signal.SIGTERM)
        for s in on_draining:
            await wait_for(lambda: hasattr(clients[s], "close_code"), timeout=10)
            self.assertEqual(clients[s].close_code, 1001)
        self.assertEqual(status_of(await draining.get("/ready")), 503)

        # the clients come back at once, most likely before a health check
        # has noticed: none of them sees a 503, all land on the other daemon
        for s in on_draining:
            await exchange_messages(self, self.r, f"ws://127.0.0.1:{lb.port}/a/ws/{s}", s)
            await landed(instances, s, [1, 1])

        if self.checks_readiness:
            # leastconn would pick the empty daemon if it were up: once a
            # handshake does not reach it, the health check has taken it out
            async def passes_it_by() -> bool:
                before = await draining.upgrades()
                await self.client(lb, "probe")
                return await draining.upgrades() == before

            await poll(passes_it_by, timeout=default("SHUTDOWN_DRAIN_SECS") * 4)
            before = await draining.upgrades()
            for n in range(3):
                await self.client(lb, f"later{n}")
                await other.opened_now(f"later{n}")
            self.assertEqual(await draining.upgrades(), before)
        else:
            # least_conn sent the first reconnect to the empty (draining)
            # daemon: it answered 503, and nginx passed the handshake on
            self.assertGreaterEqual(await draining.upgrades(), 3)
            self.assertIn("refused 503 Server shutting down", draining.daemon.log)
        # all this happened while the daemon was still draining
        self.assertEqual(status_of(await draining.get("/ready")), 503)

    async def test_client_address_from_x_forwarded_for(self) -> None:
        """
        Behind the balancer, wsproxy limits failed authorizations per
        client address, taken from the balancer's X-Forwarded-For
        (TRUSTED_PROXIES names the balancer): after AUTH_FAIL_LIMIT
        failures from 127.0.0.2, its upgrades get 429, even with a
        valid token and a forged X-Forwarded-For of its own, while
        127.0.0.3, through the same balancer, is admitted. The refusal
        lines and the opened line name the client.
        """
        (instance,) = await self.instances(1, AUTH_FAIL_LIMIT="2")
        lb = await self.balancer([instance])
        self.r.set("session:s1:auth", "tok", ex=300)
        for _ in range(2):
            status, _ = await attempt(lb.port, "127.0.0.2", "wrong")
            self.assertIn(status, (401, 403))
        self.assertEqual((await attempt(lb.port, "127.0.0.2", "tok"))[0], 429)
        forged = {"X-Forwarded-For": "198.51.100.7"}
        self.assertEqual((await attempt(lb.port, "127.0.0.2", "tok", extra=forged))[0], 429)
        self.assertEqual((await attempt(lb.port, "127.0.0.3", "tok"))[0], 101)
        self.assertIn("client=127.0.0.2", instance.daemon.log)
        await wait_for(lambda: "opened: session=s1" in instance.daemon.log)
        self.assertRegex(instance.daemon.log, r"opened: session=s1 agent=\S+ peer=\S+ client=127\.0\.0\.3\n")
        self.assertNotIn("198.51.100.7", instance.daemon.log)


async def landed(instances: list[Instance], session: str, counts: list[int]) -> None:
    """
    Wait until the daemons' logs say they opened C{counts} sockets of
    C{session}, in order; fail with what they say after 10 s.
    """
    try:
        await wait_for(lambda: [i.opened(session) for i in instances] == counts, timeout=10)
    except AssertionError:
        raise AssertionError(f"{session} opened {[i.opened(session) for i in instances]} "
                             f"times on the daemons, not {counts}") from None


async def poll(condition: Callable[[], Coroutine[Any, Any, bool]], timeout: float) -> None:
    """
    Await C{condition} again and again until it is true; fail after
    C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {condition}")
        await task.deferLater(reactor, 0.2, lambda: None)


class HAProxyTests(BalancerTests, RedisTestCase):
    start_balancer = staticmethod(start_haproxy)  # type: ignore[assignment]
    checks_readiness = True
    timeout = 90

    async def test_idle_websocket_lives_on_pings(self) -> None:
        """
        With HAProxy's tunnel timeout shortened to 4 s
        (WSPROXY_LB_TUNNEL_TIMEOUT), a WebSocket that carries no messages
        is still open after 12 s when wsproxy pings it every second (up
        to 2 s apart: one-second buckets) and the client answers; the
        same WebSocket through a daemon that does not ping
        (WS_PING_INTERVAL_SECS=0) is cut by HAProxy.
        """
        (pinging,) = await self.instances(1, WS_PING_INTERVAL_SECS="1")
        (silent,) = await self.instances(1, WS_PING_INTERVAL_SECS="0")
        kept = await start_haproxy(self, (pinging.address,) * 2,
                                   WSPROXY_LB_TUNNEL_TIMEOUT="4s")
        cut = await start_haproxy(self, (silent.address,) * 2,
                                  WSPROXY_LB_TUNNEL_TIMEOUT="4s")
        alive = await self.client(kept, "idle1")
        dropped = await self.client(cut, "idle2")
        started = time.monotonic()
        await wait_for(lambda: hasattr(dropped, "close_code"), timeout=30)
        self.assertEqual(dropped.close_code, 1006)
        self.assertGreaterEqual(time.monotonic() - started, 3)
        # the timeout has struck; the pinged one must outlive it thrice
        await task.deferLater(reactor, max(0, 12 - (time.monotonic() - started)), lambda: None)
        self.assertFalse(hasattr(alive, "close_code"))
        self.r.publish("session:idle1:down", "still here")
        await alive.wait_messages(1)
        self.assertEqual(alive.messages, [(b"still here", False)])


class NginxTests(BalancerTests, RedisTestCase):
    start_balancer = staticmethod(start_nginx)  # type: ignore[assignment]
    checks_readiness = False
    timeout = 90


def seconds(value: str, bare: float) -> float:
    """
    A duration in HAProxy's or nginx's notation (C{500ms}, C{30s},
    C{5m}, C{1h}, C{1d}); a bare number counts in C{bare} seconds
    (HAProxy: milliseconds, nginx: seconds).
    """
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match is not None, f"not a duration: {value!r}"
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    unit = match.group(2)
    return int(match.group(1)) * (units[unit] if unit else bare)


def directives(path: str) -> dict[str, list[str]]:
    """
    Each directive of a configuration file (comments dropped, a trailing
    C{;} too), by its words before the value: C{"timeout tunnel"},
    C{"proxy_read_timeout"}; the values of repeated ones in order.
    """
    found: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].strip().rstrip(";").split()
            if not words:
                continue
            key = " ".join(words[:2]) if words[0] in ("timeout", "option", "http-check") else words[0]
            found.setdefault(key, []).append(" ".join(words[len(key.split()):]))
    return found


class ConfigurationTests(SynchronousTestCase):
    """
    The committed configurations against the daemon's defaults: no idle
    timeout of a balancer can cut a live WebSocket, whose only traffic may
    be wsproxy's pings.
    """

    #: how long wsproxy lets a WebSocket go without hearing from it: a
    #: live one answers every ping; a dead one is dropped by wsproxy
    #: itself this long after the last ping before it
    silence = default("WS_PING_INTERVAL_SECS") + default("WS_PING_TIMEOUT_SECS")

    def test_haproxy_timeouts(self) -> None:
        """
        HAProxy: C{timeout tunnel} (an upgraded connection's idle limit)
        is above the ping interval plus the ping timeout, with a wide
        margin; C{timeout client-fin}, C{server-fin} and C{http-request}
        are set.
        """
        cfg = directives(HAPROXY_CFG)
        # "${WSPROXY_LB_TUNNEL_TIMEOUT-1h}": the default counts
        tunnel = re.sub(r'^"\$\{\w+-(\w+)\}"$', r"\1", cfg["timeout tunnel"][0])
        self.assertGreater(seconds(tunnel, 0.001), 10 * self.silence)
        for name in ("timeout client-fin", "timeout server-fin", "timeout http-request"):
            self.assertIn(name, cfg)
        self.assertEqual(cfg["option forwardfor"], [""])

    def test_haproxy_notices_a_drain_within_the_window(self) -> None:
        """
        HAProxy checks /ready and marks an instance down after C{fall}
        failed checks C{inter} apart: at most C{fall} x C{inter} after the
        drain began, plus C{timeout check} for an instance slow to answer,
        which is within the default SHUTDOWN_DRAIN_SECS.
        """
        cfg = directives(HAPROXY_CFG)
        self.assertEqual(cfg["option httpchk"], ["GET /ready"])
        self.assertEqual(cfg["http-check expect"], ["status 200"])
        words = cfg["default-server"][0].split()
        inter = seconds(words[words.index("inter") + 1], 0.001)
        fall = int(words[words.index("fall") + 1])
        check = seconds(cfg["timeout check"][0], 0.001)
        self.assertIn("check", words)
        self.assertLessEqual(fall * inter + check, default("SHUTDOWN_DRAIN_SECS"))

    def test_nginx_timeouts(self) -> None:
        """
        nginx: HTTP/1.1 upstream with the Upgrade and Connection headers
        passed on (from a map), no buffering, and C{proxy_read_timeout} /
        C{proxy_send_timeout} above the ping interval plus the ping
        timeout, with a wide margin.
        """
        conf = directives(NGINX_CONF)
        self.assertEqual(conf["proxy_http_version"], ["1.1"])
        self.assertEqual(conf["proxy_buffering"], ["off"])
        self.assertIn("Upgrade $http_upgrade", conf["proxy_set_header"])
        self.assertIn("Connection $connection_upgrade", conf["proxy_set_header"])
        self.assertEqual(conf["map"], ["$http_upgrade $connection_upgrade {"])
        for name in ("proxy_read_timeout", "proxy_send_timeout"):
            self.assertGreater(seconds(conf[name][0], 1), 10 * self.silence)
