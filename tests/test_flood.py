"""
Handshake floods (docs/operations/floods.md): the per-address limit on
failed authorization, who the client is behind trusted proxies, refusal
log lines budgeted per address, and what a refusal no longer costs.

Unit tests on L{wsproxy.session.limits} with a L{Clock}; the real site and
admission in memory (L{tests.memory}); and a real daemon against a real
redis-server, whose C{INFO commandstats} proves that a limited upgrade sends
no Redis command. Client addresses are told apart by binding the client's
end to 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import ipaddress
import time
from pprint import pformat
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

import autobahn.websocket.protocol as autobahn_protocol
from wsproxy.session.limits import FailedAuthLimit, client_address
from wsproxy.session.proxy import REFUSAL_LINES
from wsproxy.edge.upgrade import LEAN_HEAD_MAX, LEAN_HEADERS_MAX, lean_upgrade

from .memory import MemoryProxy, MemoryTestCase, client_frame, upgrade_request
from .support import RedisTestCase, attempt, free_port, start_daemon, wait_for

NETWORKS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


def headers(**values: str) -> Any:
    lowered = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return lowered.get


class FailedAuthLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def test_engages_after_limit(self) -> None:
        """
        An address is refused (with the seconds left in its window) once it
        has C{limit} failures in the window, not before.
        """
        limit = FailedAuthLimit(self.clock, 3, 60, 100)
        for _ in range(2):
            limit.failed("192.0.2.1")
        self.assertIsNone(limit.retry_after("192.0.2.1"))
        self.clock.advance(10)
        limit.failed("192.0.2.1")
        self.assertEqual(limit.retry_after("192.0.2.1"), 50)
        self.assertEqual(limit.limited, 1)
        self.assertIsNone(limit.retry_after("192.0.2.2"))

    def test_releases_after_window(self) -> None:
        """
        The window starts at the address's first failure; once it has
        passed the address is admitted again and forgotten.
        """
        limit = FailedAuthLimit(self.clock, 1, 60, 100)
        limit.failed("192.0.2.1")
        self.clock.advance(59.5)
        self.assertEqual(limit.retry_after("192.0.2.1"), 1)
        self.clock.advance(0.5)
        self.assertIsNone(limit.retry_after("192.0.2.1"))
        self.assertEqual(len(limit), 0)

    def test_table_bounded(self) -> None:
        """
        However many addresses fail, the table holds at most
        C{max_addresses}: the least recently failed are forgotten first,
        and an address that keeps failing stays.
        """
        limit = FailedAuthLimit(self.clock, 2, 60, 100)
        limit.failed("198.51.100.1")
        for i in range(100_000):
            limit.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
            if i % 50 == 0:
                limit.failed("198.51.100.1")
            self.assertLessEqual(len(limit), 100)
        self.assertEqual(len(limit), 100)
        self.assertIsNotNone(limit.retry_after("198.51.100.1"))
        self.assertIsNone(limit.retry_after("10.0.0.0"))

    def test_crossing_and_impose(self) -> None:
        """
        failed() says when it made an address limited (the seconds its
        window has left), once; impose() limits an address for the seconds
        another worker's count gave, without a failure of its own.
        """
        limit = FailedAuthLimit(self.clock, 3, 60, 100)
        self.assertIsNone(limit.failed("192.0.2.1", 2))
        self.clock.advance(10)
        self.assertEqual(limit.failed("192.0.2.1"), 50)
        self.assertIsNone(limit.failed("192.0.2.1"))
        limit.impose("192.0.2.9", 20.5)
        self.assertEqual(limit.retry_after("192.0.2.9"), 21)
        self.clock.advance(21)
        self.assertIsNone(limit.retry_after("192.0.2.9"))

    def test_exempt_and_off(self) -> None:
        """
        Exempt networks are never counted; a limit of 0 counts nothing.
        """
        limit = FailedAuthLimit(self.clock, 1, 60, 100, NETWORKS)
        limit.failed("10.1.2.3")
        limit.failed("2001:db8::1")
        self.assertEqual(len(limit), 0)
        off = FailedAuthLimit(self.clock, 0, 60, 100)
        off.failed("192.0.2.1")
        self.assertIsNone(off.retry_after("192.0.2.1"))


class ClientAddressTests(SynchronousTestCase):
    def test_untrusted_peer(self) -> None:
        """
        Headers from a peer that is not a trusted proxy are ignored.
        """
        self.assertEqual(
            client_address("192.0.2.1", headers(x_forwarded_for="10.9.9.9"), NETWORKS),
            "192.0.2.1",
        )
        self.assertEqual(
            client_address("192.0.2.1", headers(forwarded="for=10.9.9.9"), ()), "192.0.2.1"
        )

    def test_x_forwarded_for(self) -> None:
        """
        From a trusted peer: the rightmost X-Forwarded-For address that is
        not a trusted proxy; what a client prepended left of it is not
        believed.
        """
        self.assertEqual(
            client_address(
                "10.0.0.1", headers(x_forwarded_for="6.6.6.6, 203.0.113.9, 10.0.0.2"), NETWORKS
            ),
            "203.0.113.9",
        )
        self.assertEqual(client_address("10.0.0.1", headers(), NETWORKS), "10.0.0.1")

    def test_forwarded(self) -> None:
        """
        C{Forwarded} (RFC 7239) wins over X-Forwarded-For; quoted IPv6
        with port, and IPv4 with port, are understood; an obfuscated node
        stops the walk at the last trusted hop.
        """
        both = headers(forwarded='for="[2001:db9::7]:4711";proto=https', x_forwarded_for="1.1.1.1")
        self.assertEqual(client_address("10.0.0.1", both, NETWORKS), "2001:db9::7")
        self.assertEqual(
            client_address("10.0.0.1", headers(forwarded='for="198.51.100.3:80", for=10.2.2.2'),
                           NETWORKS),
            "198.51.100.3",
        )
        self.assertEqual(
            client_address("10.0.0.1", headers(forwarded="for=6.6.6.6, for=_hidden"), NETWORKS),
            "10.0.0.1",
        )


class LazyPformatTests(SynchronousTestCase):
    def test_formats_when_used(self) -> None:
        """
        Autobahn's C{pformat} (made lazy by wsproxy.websocket.protocol) gives the
        same text as pprint's once it is formatted or turned into a str.
        """
        value = [("autoPingInterval", 30, "ProxyFactory")] * 4
        lazy = autobahn_protocol.pformat(value)
        self.assertEqual(f"{lazy}", pformat(value))
        self.assertEqual(str(lazy), pformat(value))


class MemoryLimitTests(MemoryTestCase):
    """
    The real site and admission on fake Redis links (the memory client's
    address is 198.51.100.7).
    """

    def fail(self, memory: MemoryProxy, n: int) -> None:
        for _ in range(n):
            client = memory.request("/agent/ws/s1", {"Authorization": "Bearer wrong"})
            self.assertEqual(client.response().status, "HTTP/1.1 403 Invalid or expired token")

    def test_429_before_redis(self) -> None:
        """
        After AUTH_FAIL_LIMIT failed token checks, the address's upgrades
        get a complete 429 with Retry-After, counted, and no Redis command
        is sent for them, even with a valid token.
        """
        memory = self.start(auth_fail_limit=2)
        memory.redis.authorize("s1", "tok")
        self.fail(memory, 2)
        sent = len(memory.redis.log)
        with capturedLogs() as events:
            clients = [
                memory.request("/agent/ws/s1", {"Authorization": f"Bearer {token}"})
                for token in ("wrong", "tok")
            ]
        lines = [e for e in events if e.get("code") == 429]
        self.assertEqual([e["peer"] for e in lines], ["tcp4:198.51.100.7:50123"] * 2)
        for client in clients:
            response = client.response()
            self.assertEqual(response.status, "HTTP/1.1 429 Too many failed authorizations")
            self.assertEqual(response.header("Retry-After"), "60")
            self.assertTrue(client.closed)
        self.assertEqual(len(memory.redis.log), sent)
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 2, "429": 2})
        self.assertIn(b"wsproxy_auth_limited_total 2.0", memory.proxy.stats.render())
        self.assertIn(b"wsproxy_auth_failures_total 2.0", memory.proxy.stats.render())

    def test_missing_token_counts(self) -> None:
        """
        A missing token (401) counts as a failure; an origin refusal (403
        before the token check) does not.
        """
        memory = self.start(auth_fail_limit=1, allowed_origins=("https://a.example",))
        origin = memory.request("/agent/ws/s1", {"Origin": "https://b.example",
                                                 "Authorization": "Bearer x"})
        self.assertEqual(origin.response().status, "HTTP/1.1 403 Origin not allowed")
        self.assertEqual(len(memory.proxy.auth_limit), 0)
        missing = memory.request("/agent/ws/s1")
        self.assertEqual(missing.response().status, "HTTP/1.1 401 Missing bearer token")
        again = memory.request("/agent/ws/s1")
        self.assertEqual(again.response().status, "HTTP/1.1 429 Too many failed authorizations")

    def test_valid_tokens_never_count(self) -> None:
        """
        A reconnect storm with valid tokens from one address (1,000
        upgrades, limit 1) is admitted every time.
        """
        memory = self.start(auth_fail_limit=1)
        for i in range(1000):
            client = memory.open(f"s{i}")
            client.leave()
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1000})

    def test_refusal_lines_budgeted(self) -> None:
        """
        A flood of refusals from one address logs REFUSAL_LINES lines a
        minute, then nothing; the first line after the minute says how
        many were left out. The metric counts them.
        """
        memory = self.start(auth_fail_limit=0)
        with capturedLogs() as events:
            self.fail(memory, 50)
            memory.clock.advance(61)
            self.fail(memory, 1)
        lines = [e for e in events if e.get("code") == 403]
        self.assertEqual(len(lines), REFUSAL_LINES + 1)
        self.assertEqual(lines[-1]["suppressed"], 50 - REFUSAL_LINES)
        self.assertIn("198.51.100.7", lines[-1]["client"])
        self.assertEqual(memory.proxy.stats.refusal_lines_suppressed, 50 - REFUSAL_LINES)


# -- a real daemon and a real redis-server ------------------------------------


class DaemonLimitTests(RedisTestCase):
    timeout = 120

    async def start(self, **env: str) -> None:
        self.port = free_port()
        full = {"HOST": "127.0.0.1", "PORT": str(self.port), "REDIS_URL": self.redis.url,
                "SHUTDOWN_DRAIN_SECS": "0", "SHUTDOWN_GRACE_PERIOD_SECS": "1", **env}
        self.daemon = start_daemon(self, full)
        self.r.set("session:s1:auth", "tok", ex=300)
        await self.daemon.healthy(self.port, timeout=30)

    def token_checks(self) -> int:
        """Redis commands a token check sends (EVALSHA, EVAL; GET, EXPIRE), ever."""
        stats = self.r.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0)
                   for name in ("evalsha", "eval", "get", "expire"))

    async def test_engages_without_redis_and_only_there(self) -> None:
        """
        AUTH_FAIL_LIMIT=3: the fourth upgrade from 127.0.0.2 gets 429 with
        Retry-After, and limited upgrades (wrong or valid token) send no
        Redis command (INFO commandstats). Another address, and valid
        tokens from it, are not affected.
        """
        await self.start(AUTH_FAIL_LIMIT="3")
        for _ in range(3):
            self.assertEqual((await attempt(self.port, "127.0.0.2", "wrong"))[0], 403)
        before = self.token_checks()
        for token in ("wrong", "tok", None, "wrong"):
            status, head = await attempt(self.port, "127.0.0.2", token)
            self.assertEqual(status, 429, head)
            retry = int(head.split(b"Retry-After: ")[1].split(b"\r\n")[0])
            self.assertTrue(1 <= retry <= 60, head)
        self.assertEqual(self.token_checks(), before)
        self.assertEqual((await attempt(self.port, "127.0.0.3", "tok"))[0], 101)
        self.assertEqual((await attempt(self.port, "127.0.0.3", "wrong"))[0], 403)
        self.assertEqual((await attempt(self.port, "127.0.0.3", "tok"))[0], 101)

    async def test_reconnect_storm_not_limited(self) -> None:
        """
        AUTH_FAIL_LIMIT=1 (the strictest): 1,000 upgrades with valid tokens
        from one address, 100 at a time, as after a deploy, are all
        admitted; nothing was counted against the address.
        """
        await self.start(AUTH_FAIL_LIMIT="1")
        for i in range(1000):
            self.r.set(f"session:r{i}:auth", "tok", ex=300)
        statuses: list[int] = []
        for batch in range(10):
            results = await defer.gatherResults([
                defer.ensureDeferred(attempt(self.port, "127.0.0.2", "tok", f"r{batch * 100 + i}"))
                for i in range(100)
            ])
            statuses += [status for status, _ in results]
        self.assertEqual(statuses, [101] * 1000)
        self.assertEqual((await attempt(self.port, "127.0.0.2", "wrong"))[0], 403)
        self.assertEqual((await attempt(self.port, "127.0.0.2", "tok"))[0], 429)

    async def test_releases_after_window(self) -> None:
        """
        AUTH_FAIL_WINDOW_SECS=1: a limited address is admitted again once
        the window that began with its first failure has passed.
        """
        await self.start(AUTH_FAIL_LIMIT="2", AUTH_FAIL_WINDOW_SECS="1")
        for _ in range(2):
            await attempt(self.port, "127.0.0.2", "wrong")
        self.assertEqual((await attempt(self.port, "127.0.0.2", "tok"))[0], 429)
        started = time.monotonic()
        statuses: list[int] = []

        async def admitted() -> bool:
            statuses.append((await attempt(self.port, "127.0.0.2", "tok"))[0])
            return statuses[-1] == 101

        while not await admitted():
            self.assertLess(time.monotonic() - started, 20, statuses)
        self.assertEqual(set(statuses), {101} | ({429} if len(statuses) > 1 else set()))

    async def test_trusted_proxy_headers(self) -> None:
        """
        TRUSTED_PROXIES=127.0.0.2: X-Forwarded-For from 127.0.0.3 (not
        trusted) is ignored: the limit is on 127.0.0.3 whatever it claims.
        From 127.0.0.2 it names the client: the forwarded client is limited,
        another client behind the same proxy is not.
        """
        await self.start(AUTH_FAIL_LIMIT="2", TRUSTED_PROXIES="127.0.0.2")
        for spoofed in ("10.9.9.1", "10.9.9.2"):
            await attempt(self.port, "127.0.0.3", "wrong", extra={"X-Forwarded-For": spoofed})
        status, _ = await attempt(self.port, "127.0.0.3", "tok",
                                  extra={"X-Forwarded-For": "10.9.9.3"})
        self.assertEqual(status, 429)
        for _ in range(2):
            status, _ = await attempt(self.port, "127.0.0.2", "wrong",
                                      extra={"X-Forwarded-For": "10.0.0.1"})
            self.assertEqual(status, 403)
        limited, _ = await attempt(self.port, "127.0.0.2", "tok",
                                   extra={"X-Forwarded-For": "10.0.0.1"})
        self.assertEqual(limited, 429)
        other, _ = await attempt(self.port, "127.0.0.2", "tok",
                                 extra={"X-Forwarded-For": "10.0.0.2"})
        self.assertEqual(other, 101)
        await wait_for(lambda: b"client=10.0.0.1" in self.daemon.out.output)


def one_turn(clock: Clock) -> None:
    """
    What a reactor does at the start of an iteration: run the calls due
    now, not those they schedule (L{Clock.advance} would run those too).
    """
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.func(*call.args, **call.kw)


class TurnBudgetTests(MemoryTestCase):
    def test_handshakes_per_turn(self) -> None:
        """
        HANDSHAKES_PER_TURN=2: of five requests arriving in one turn, two
        are read and answered in it; the others wait unread, two per later
        turn, in arrival order, and are all admitted.
        """
        memory = self.start(handshakes_per_turn=2)
        clients = []
        for i in range(5):
            memory.redis.authorize(f"s{i}", "tok")
            client = memory.connect()
            client.transport.receive(upgrade_request(f"/agent/ws/s{i}",
                                                     {"Authorization": "Bearer tok"}))
            clients.append(client)
        answered = [bool(c.transport.value()) for c in clients]
        self.assertEqual(answered, [True, True, False, False, False])
        self.assertEqual(memory.site.budget.waiting, 3)
        self.assertIn(b"wsproxy_handshakes_waiting 3.0", memory.proxy.stats.render())
        one_turn(memory.clock)
        self.assertEqual([bool(c.transport.value()) for c in clients],
                         [True, True, True, True, False])
        one_turn(memory.clock)
        memory.clock.advance(0)
        for client in clients:
            self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(memory.site.budget.waiting, 0)

    def test_client_left_while_waiting(self) -> None:
        """
        A connection that closes while it waits for its turn is never read
        nor answered, and does not hold up the others.
        """
        memory = self.start(handshakes_per_turn=1)
        memory.redis.authorize("s1", "tok")
        first, second = memory.connect(), memory.connect()
        for client in (first, second):
            client.transport.receive(upgrade_request("/agent/ws/s1",
                                                     {"Authorization": "Bearer tok"}))
        second.transport.client_left()
        memory.clock.advance(0)
        memory.clock.advance(0)
        self.assertEqual(first.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(second.transport.value(), b"")
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1})

    def test_waiting_is_not_the_clients_delay(self) -> None:
        """
        The head deadline (HANDSHAKE_TIMEOUT_SECS) counts the client's time
        to send its request, not the proxy's queue: a connection that sent
        its request and waited longer than the deadline for its turn (a
        reconnect storm) is read and admitted; one that sent only part of
        its head before waiting gets the whole deadline again from its turn,
        then is dropped.
        """
        memory = self.start(handshakes_per_turn=1)
        turns = Clock()  # turns that come only when the test says
        memory.site.budget._clock = turns
        for sid in ("s1", "s2", "s3"):
            memory.redis.authorize(sid, "tok")
        first, second, partial = memory.connect(), memory.connect(), memory.connect()
        request = upgrade_request("/agent/ws/s2", {"Authorization": "Bearer tok"})
        first.transport.receive(upgrade_request("/agent/ws/s1", {"Authorization": "Bearer tok"}))
        second.transport.receive(request)
        partial.transport.receive(request[:20])
        self.assertEqual(memory.site.budget.waiting, 2)
        memory.clock.advance(30)  # six head deadlines
        self.assertFalse(second.transport.lost)
        self.assertFalse(partial.transport.lost)
        turns.advance(0)
        memory.clock.advance(0)
        self.assertEqual(second.response().status, "HTTP/1.1 101 Switching Protocols")
        turns.advance(0)
        memory.clock.advance(4.9)
        self.assertFalse(partial.transport.aborted)
        memory.clock.advance(0.2)
        self.assertTrue(partial.transport.aborted)


class CompareFirstTests(MemoryTestCase):
    """
    A token in the Authorization header is compared with the stored one
    before Autobahn builds anything (wsproxy.edge.handoff.HandOff.compare).
    """

    def test_wrong_token_refused_before_autobahn(self) -> None:
        """
        A wrong header token is refused 403 with no WebSocket protocol
        built for it, after one token check (EVALSHA) and nothing else.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        built: list[object] = []
        factory = memory.site.ws_factory
        build = factory.buildProtocol
        self.patch(factory, "buildProtocol", lambda addr: built.append(addr) or build(addr))
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer nope"})
        self.assertEqual(client.response().status, "HTTP/1.1 403 Invalid or expired token")
        self.assertTrue(client.closed)
        self.assertEqual(built, [])
        self.assertEqual([c.name for c in memory.redis.log], ["EVALSHA"])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], 60)
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 1})

    def test_equal_token_checked_once(self) -> None:
        """
        An equal header token is not checked again by the admission: one
        round trip compares it and resets its TTL (EVALSHA), then the
        subscription and the 101.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual([c.name for c in memory.redis.log], ["EVALSHA", "SUBSCRIBE"])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], 10800)

    def test_frames_behind_the_request_kept(self) -> None:
        """
        Frames the client sends right behind its request, while the token
        is being compared, reach the WebSocket once it is open, in order.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA")
        client = memory.connect()
        client.send(upgrade_request("/agent/ws/s1", {"Authorization": "Bearer tok"})
                    + client_frame(b"one"))
        client.send(client_frame(b"two"))
        self.assertEqual(client.transport.value(), b"")
        memory.redis.release("EVALSHA")
        memory.clock.advance(0)
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(memory.redis.published,
                         [(b"session:s1:up", b"one"), (b"session:s1:up", b"two")])


class LeanUpgradeTests(SynchronousTestCase):
    """
    wsproxy.edge.site.lean_upgrade: which request heads the site reads itself,
    and that everything else is left to twisted.web.
    """

    def head(self, request: bytes) -> bytes:
        return request.partition(b"\r\n\r\n")[0]

    def test_plain_upgrade(self) -> None:
        """
        A plain upgrade is read: its target as sent, header names in lower
        case, values without surrounding blanks, repeated headers kept in
        order; C{header} joins them with commas.
        """
        request = upgrade_request("/a/ws/s1?x=1", {"X-Forwarded-For": " 192.0.2.1 ",
                                                   "x-forwarded-for": "192.0.2.2"})
        upgrade = lean_upgrade(self.head(request), request)
        assert upgrade is not None
        self.assertEqual((upgrade.target, upgrade.path), (b"/a/ws/s1?x=1", "/a/ws/s1"))
        self.assertEqual(upgrade.headers[b"upgrade"], [b"websocket"])
        self.assertEqual(upgrade.header("x-forwarded-for"), "192.0.2.1,192.0.2.2")
        self.assertIsNone(upgrade.header("origin"))
        self.assertIs(upgrade.raw, request)

    def test_everything_else_left_to_twisted(self) -> None:
        """
        Anything but a plain GET HTTP/1.1 upgrade with well-formed header
        lines and no body is not read (None): HTTP/1.0, other methods, an
        absolute target, obsolete line folding, blanks before a colon, a
        line without one, a body, no or another Upgrade, control bytes and
        what str.splitlines() would split on, too many headers.
        """
        plain = upgrade_request("/a/ws/s1").decode()
        cases = {
            "HTTP/1.0": plain.replace("HTTP/1.1", "HTTP/1.0"),
            "POST": plain.replace("GET", "POST"),
            "absolute": plain.replace("GET /a", "GET http://h/a"),
            "two spaces": plain.replace("GET /a", "GET  /a"),
            "folded": plain.replace("Upgrade: websocket", "Upgrade:\r\n websocket"),
            "blank before colon": plain.replace("Upgrade:", "Upgrade :"),
            "no colon": plain.replace("Host: proxy.example", "Host proxy.example"),
            "content-length": plain.replace("Host:", "Content-Length: 0\r\nHost:"),
            "chunked": plain.replace("Host:", "Transfer-Encoding: chunked\r\nHost:"),
            "no upgrade": plain.replace("Upgrade: websocket\r\n", ""),
            "h2c": plain.replace("Upgrade: websocket", "Upgrade: h2c"),
            "NUL": plain.replace("Host: proxy", "Host: pro\x00xy"),
            "lone LF": plain.replace("Host: proxy", "Host: pro\nxy"),
            "lone CR": plain.replace("Host: proxy", "Host: pro\rxy"),
            "NEL": plain.replace("Host: proxy", "Host: pro\x85xy"),
            "FF": plain.replace("Host: proxy", "Host: pro\x0cxy"),
            "too many": plain.replace("Host:", "X-A: 1\r\n" * LEAN_HEADERS_MAX + "Host:"),
        }
        for name, text in cases.items():
            request = text.encode("latin-1")
            self.assertIsNone(lean_upgrade(self.head(request), request), name)


class LeanPathTests(MemoryTestCase):
    """
    The site reads plain upgrade requests itself (wsproxy.edge.site.lean_upgrade)
    and leaves every other request to twisted.web: both decide the same.
    """

    def count_requests(self, memory: MemoryProxy) -> list[Any]:
        """The twisted.web Request objects made from now on."""
        made: list[Any] = []
        factory = memory.site.requestFactory

        def counting(*args: Any, **kwargs: Any) -> Any:
            request = factory(*args, **kwargs)
            made.append(request)
            return request

        memory.site.requestFactory = counting
        return made

    def test_no_twisted_request(self) -> None:
        """
        A plain upgrade, admitted (with the frames sent right behind it,
        in the same segment) or refused, makes no twisted.web Request.
        """
        memory = self.start()
        made = self.count_requests(memory)
        memory.redis.authorize("s1", "tok")
        client = memory.connect()
        client.send(upgrade_request("/agent/ws/s1", {"Authorization": "Bearer tok"})
                    + client_frame(b"behind"))
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(memory.redis.published, [(b"session:s1:up", b"behind")])
        refused = memory.request("/agent/ws/s1", {"Authorization": "Bearer nope"})
        self.assertEqual(refused.response().status, "HTTP/1.1 403 Invalid or expired token")
        self.assertEqual(made, [])

    def test_byte_by_byte(self) -> None:
        """
        A request that arrives a byte at a time is read once complete.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        client = memory.connect()
        for byte in upgrade_request("/agent/ws/s1", {"Authorization": "Bearer tok"}):
            self.assertEqual(client.transport.value(), b"")
            client.send(bytes([byte]))
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")

    def test_other_forms_through_twisted(self) -> None:
        """
        An upgrade with an absolute target, one with a folded header, and
        one whose head is longer than the lean parser reads are read by
        twisted.web and admitted as before; an upgrade on /health is the health check; an
        upgrade after a first request on a keep-alive connection is read
        by twisted.web too.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        made = self.count_requests(memory)
        auth = {"Authorization": "Bearer tok"}
        plain = upgrade_request("/agent/ws/s1", auth)
        for request in (
            plain.replace(b"GET /", b"GET http://proxy.example/"),
            plain.replace(b"Connection: Upgrade", b"Connection:\r\n Upgrade"),
            upgrade_request("/agent/ws/s1", {**auth, "X-Pad": "p" * LEAN_HEAD_MAX}),
        ):
            client = memory.connect()
            client.send(request)
            self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols",
                             request[:80])
        self.assertEqual(len(made), 3, made)
        health = memory.request("/health", auth)
        self.assertNotEqual(health.transport.value(), b"")
        self.assertNotIn(b"101", health.transport.value().split(b"\r\n")[0])
        client = memory.connect()
        client.send(b"GET /ready HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(client.response().status, "HTTP/1.1 200 OK")
        client.send(plain)
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 4})

    def test_malformed_handshake_no_redis(self) -> None:
        """
        A matching header token on a request Autobahn refuses (another
        WebSocket version, a short key, no Host) is refused without any
        Redis command: the stored token's TTL is not renewed.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        plain = upgrade_request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        for request in (
            plain.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 9"),
            plain.replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: x"),
            plain.replace(b"Host: proxy.example\r\n", b""),
        ):
            client = memory.connect()
            client.send(request)
            status = client.response().status
            self.assertTrue(status.startswith("HTTP/1.1 4"), (status, request[-120:]))
        self.assertEqual([c.name for c in memory.redis.log], [])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], 60)

    def test_comparisons_counted_while_under_way(self) -> None:
        """
        Proxy.comparing counts the header tokens being compared: one while
        Redis holds the answer, none once it came, or once the client left.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA")
        first = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        second = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual(memory.proxy.comparing, 2)
        second.leave()
        self.assertEqual(memory.proxy.comparing, 1)
        memory.redis.release()
        memory.clock.advance(0)
        self.assertEqual(first.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(memory.proxy.comparing, 0)
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1, "499": 1})
