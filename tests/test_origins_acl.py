"""
Production admission and Redis-credential features against a real
redis-server and real sockets:

  - Redis ACL user and password, and the database number, from REDIS_URL;
    a password-only URL against C{requirepass}; wrong or missing
    credentials are reported (503) and retried until they become valid;
  - ALLOWED_ORIGINS;
  - MAX_CONNECTIONS.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import redis as redispy
from twisted.internet import defer, reactor, task
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from wsproxy.config import load_settings

from .support import (
    ProxyTestCase,
    RunningProxy,
    clean_autobahn_timers,
    connect,
    exchange_messages,
    raw_exchange,
    redis_server,
    start_proxy,
    status_of,
    upgrade_request,
    wait_for,
)

ADMIN_PASSWORD = "admin-pw"
#: the name of the test's own Redis connections (CLIENT LIST tells them apart)
TEST_CLIENT = "wsproxy-test"

#: the least a proxy needs: its keys, its channels, its commands
WSP_ACL = (
    "reset", "on", "~session:*", "resetchannels", "&session:*", "&wsproxy:*",
    "+get", "+expire", "+evalsha", "+eval", "+publish", "+subscribe", "+unsubscribe", "+ping",
    "+select",
)


async def exchange_raw(port: int, data: bytes) -> bytes:
    """
    L{raw_exchange} that gives up after 3 s, so that an upgrade wrongly
    accepted (101, connection left open) fails the assertion on its status
    instead of hanging the test.
    """
    return await raw_exchange(port, data, close_after=3.0)


class CredentialsTestCase(TestCase):
    """
    A plain redis-server whose default user needs a password, so that the
    proxy gets nowhere without the credentials from its URL.
    """

    timeout = 60

    def setUp(self) -> None:
        self.redis = redis_server(self)
        self.addCleanup(clean_autobahn_timers)
        # the default user needs a password from here on (like requirepass)
        with self.redis.client() as bootstrap:
            bootstrap.execute_command("ACL", "SETUSER", "default", "resetpass", f">{ADMIN_PASSWORD}")
        self.admin = self.admin_client()

    def admin_client(self, db: int = 0, password: str = ADMIN_PASSWORD) -> redispy.Redis:
        r = redispy.Redis(port=self.redis.port, db=db, password=password, socket_timeout=5,
                          client_name=TEST_CLIENT)
        self.addCleanup(r.close)
        return r

    def url(self, userinfo: str, db: Optional[int] = None) -> str:
        suffix = f"/{db}" if db is not None else ""
        return f"redis://{userinfo}@127.0.0.1:{self.redis.port}{suffix}"

    def start_proxy(self, url: str, **settings: Any) -> RunningProxy:
        return start_proxy(self, url, **settings)

    async def health(self, proxy: RunningProxy) -> tuple[int, dict[str, Any]]:
        response = await raw_exchange(proxy.port, b"GET /health HTTP/1.0\r\n\r\n")
        return status_of(response), json.loads(response.partition(b"\r\n\r\n")[2])

    async def upgrade_status(self, proxy: RunningProxy, session: str, token: str = "tok") -> int:
        response = await exchange_raw(
            proxy.port, upgrade_request(f"/a/ws/{session}", {"Authorization": f"Bearer {token}"})
        )
        return status_of(response)

    async def assert_unusable(self, proxy: RunningProxy, session: str, seconds: float) -> None:
        """
        For C{seconds} the proxy has no usable Redis: /health 503 and an
        upgrade with a valid token 503 (not 403, not 500).
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.assertFalse(proxy.proxy.hub.healthy, "subscriber became healthy")
            await task.deferLater(reactor, 0.05, lambda: None)
        code, body = await self.health(proxy)
        self.assertEqual((code, body["redis"]), (503, "disconnected"))
        self.assertEqual(await self.upgrade_status(proxy, session), 503)

    async def exchange(self, r: redispy.Redis, proxy: RunningProxy, session: str) -> None:
        """
        The client (token already stored) connects, receives a :down message
        and its message arrives on :up.
        """
        await exchange_messages(self, r, proxy.url(session), session)

    def auth_failures(self, username: Optional[str]) -> int:
        """
        How many AUTH attempts Redis has refused for C{username} (ACL LOG
        folds identical entries and counts them).
        """
        total = 0
        for entry in self.admin.acl_log():
            if entry.get("reason") == "auth" and entry.get("username") == username:
                total += int(entry.get("count", 1))
        return total

    def proxy_clients(self) -> list[dict[str, Any]]:
        return [c for c in self.admin.client_list() if c.get("name") != TEST_CLIENT]


class AclTests(CredentialsTestCase):
    async def test_user_password_and_db_from_url(self) -> None:
        """
        REDIS_URL=redis://wsp:pw@host:port/3: the proxy authenticates as the
        ACL user wsp and uses database 3: a token stored in db 3 is
        accepted, the same token stored only in db 0 is refused (403), and
        messages flow both ways.
        """
        self.admin.execute_command("ACL", "SETUSER", "wsp", *WSP_ACL, ">pw")
        db3 = self.admin_client(db=3)
        db3.set("session:in3:auth", "tok", ex=300)
        self.admin.set("session:in0:auth", "tok", ex=300)

        proxy = self.start_proxy(self.url("wsp:pw", db=3))
        await proxy.ready()
        clients = self.proxy_clients()
        self.assertEqual(len(clients), 2, clients)
        self.assertEqual({(c["user"], c["db"]) for c in clients}, {("wsp", "3")})

        self.assertEqual(await self.upgrade_status(proxy, "in0"), 403)
        self.assertLessEqual(self.admin.ttl("session:in0:auth"), 300)
        await self.exchange(db3, proxy, "in3")
        # the successful connect renewed the token in db 3
        self.assertGreater(db3.ttl("session:in3:auth"), 300)

    async def test_wrong_password_reported_and_retried_until_fixed(self) -> None:
        """
        With a password Redis refuses, the proxy reports it (/health 503,
        upgrades 503) and keeps retrying (Redis sees repeated AUTH
        failures, not just one); once the password is made valid with ACL
        SETUSER it recovers within a few seconds, without a restart.
        """
        self.admin.execute_command("ACL", "SETUSER", "wsp", *WSP_ACL, ">other")
        self.admin_client(db=3).set("session:s1:auth", "tok", ex=300)
        proxy = self.start_proxy(self.url("wsp:pw", db=3))
        await wait_for(lambda: self.auth_failures("wsp") >= 1)
        first = self.auth_failures("wsp")
        await self.assert_unusable(proxy, "s1", seconds=2.0)
        self.assertIn("auth", (proxy.proxy.commands.last_error or "").lower())
        # still trying: more refused AUTH attempts after the first ones
        await wait_for(lambda: self.auth_failures("wsp") > first + 2, timeout=5)

        self.admin.execute_command("ACL", "SETUSER", "wsp", ">pw")
        fixed = time.monotonic()
        await proxy.ready()
        self.assertLess(time.monotonic() - fixed, 5.0)
        code, body = await self.health(proxy)
        self.assertEqual((code, body["status"]), (200, "healthy"))
        await self.exchange(self.admin_client(db=3), proxy, "s1")

    async def test_narrow_acl_is_enough(self) -> None:
        """
        An ACL user limited to session:* keys, session:*/wsproxy:* channels
        and the commands GET, EXPIRE, EVALSHA, EVAL, PUBLISH, SUBSCRIBE,
        UNSUBSCRIBE, PING and SELECT is all the proxy needs: the canary,
        token check (its script) and both directions work, and Redis logged
        no permission denial.
        """
        self.admin.execute_command("ACL", "SETUSER", "wsp", *WSP_ACL, ">pw")
        self.admin.set("session:s1:auth", "tok", ex=300)
        proxy = self.start_proxy(self.url("wsp:pw"))
        await proxy.ready()
        await self.exchange(self.admin, proxy, "s1")
        code, _ = await self.health(proxy)
        self.assertEqual(code, 200)
        denied = [e for e in self.admin.acl_log() if e.get("reason") != "auth"]
        self.assertEqual(denied, [])


    async def test_acl_without_scripts(self) -> None:
        """
        An ACL user without EVALSHA and EVAL: the token check falls back
        to GET and EXPIRE (a valid token connects, its TTL reset to the
        grace period; a wrong one is 403), Redis logged the EVALSHA denial
        once, and the proxy warned once.
        """
        self.admin.execute_command(
            "ACL", "SETUSER", "wsp", *WSP_ACL, "-evalsha", "-eval", ">pw")
        self.admin.set("session:s1:auth", "tok", ex=300)
        with capturedLogs() as events:
            proxy = self.start_proxy(self.url("wsp:pw"))
            await proxy.ready()
            await self.exchange(self.admin, proxy, "s1")
            self.assertGreater(self.admin.ttl("session:s1:auth"), 300)
            self.assertEqual(await self.upgrade_status(proxy, "s1", "wrong"), 403)
            await self.exchange(self.admin, proxy, "s1")
        denied = [e for e in self.admin.acl_log() if e.get("reason") != "auth"]
        self.assertEqual([(e["object"], int(e["count"])) for e in denied], [("evalsha", 1)])
        warnings = [e for e in events if "refuses scripts" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)


class PasswordOnlyTests(CredentialsTestCase):
    def setUp(self) -> None:
        super().setUp()
        # requirepass is the password of the default user
        self.admin.config_set("requirepass", "secret")
        self.admin = self.admin_client(password="secret")

    async def test_password_only_url(self) -> None:
        """
        redis://:secret@host:port and the conventional redis://secret@host:port
        authenticate against requirepass; messages flow.
        """
        self.admin.set("session:s1:auth", "tok", ex=300)
        for userinfo in (":secret", "secret"):
            proxy = self.start_proxy(self.url(userinfo))
            await proxy.ready()
            clients = self.proxy_clients()
            self.assertEqual({c["user"] for c in clients}, {"default"}, userinfo)
            await self.exchange(self.admin, proxy, "s1")
            await proxy.stop()

    async def test_wrong_requirepass_recovers_after_config_set(self) -> None:
        """
        A password that requirepass does not match: 503 while it is wrong,
        and the proxy recovers by itself once CONFIG SET requirepass makes
        it right.
        """
        self.admin.set("session:s1:auth", "tok", ex=300)
        proxy = self.start_proxy(self.url(":new-secret"))
        await wait_for(lambda: self.auth_failures("default") >= 1)
        await self.assert_unusable(proxy, "s1", seconds=1.5)
        self.admin.config_set("requirepass", "new-secret")
        self.admin = self.admin_client(password="new-secret")
        fixed = time.monotonic()
        await proxy.ready()
        self.assertLess(time.monotonic() - fixed, 5.0)
        await self.exchange(self.admin, proxy, "s1")

    async def test_missing_password_is_503_not_500(self) -> None:
        """
        No password in the URL although Redis requires one: every Redis
        command would fail with NOAUTH. The proxy treats that connection as
        unusable: /health 503 and upgrades 503 (not a 500 "Internal
        error"), and it recovers once Redis stops requiring a password.
        """
        self.admin.set("session:s1:auth", "tok", ex=300)
        proxy = self.start_proxy(f"redis://127.0.0.1:{self.redis.port}")
        await self.assert_unusable(proxy, "s1", seconds=1.5)
        self.admin.config_set("requirepass", "")
        started = time.monotonic()
        await proxy.ready()
        self.assertLess(time.monotonic() - started, 5.0)
        await self.exchange(self.admin, proxy, "s1")


class AdmissionTestCase(ProxyTestCase):
    async def request(self, raw: bytes) -> bytes:
        return await exchange_raw(self.proxy.port, raw)


class OriginTests(AdmissionTestCase):
    settings = {"allowed_origins": ("https://app.example.com",)}

    async def test_allowed_origin_accepted(self) -> None:
        """
        The allowed origin is accepted as written, and with another case
        and the scheme's default port.
        """
        self.authorize("s1")
        for origin in ("https://app.example.com", "https://APP.example.com:443",
                       "HTTPS://app.Example.COM"):
            c = await self.client("s1", headers={"Origin": origin})
            self.assertEqual(c.state, c.STATE_OPEN, origin)

    async def test_other_origins_403(self) -> None:
        """
        Another host, port or scheme, a look-alike and "null" (not listed)
        are refused with 403 even with a valid token, and the token's TTL is
        not renewed.
        """
        self.authorize("s1", ttl=300)
        for origin in (
            "https://evil.example.com",
            "https://app.example.com:8443",
            "http://app.example.com",
            "https://app.example.com.evil.com",
            "null",
        ):
            headers = {"Authorization": "Bearer tok", "Origin": origin}
            response = await self.request(upgrade_request("/a/ws/s1", headers))
            self.assertEqual(status_of(response), 403, origin)
            self.assertTrue(response.endswith(b"Origin not allowed\n"), response)
        self.assertLessEqual(self.r.ttl("session:s1:auth"), 300)

    async def test_missing_origin_admitted(self) -> None:
        """
        An upgrade without an Origin header (a server, app or CLI client:
        browsers always send one) is admitted with a valid token, and still
        refused without one.
        """
        self.authorize("s1")
        response = await self.request(
            upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"})
        )
        self.assertEqual(status_of(response), 101, response)
        response = await self.request(
            upgrade_request("/a/ws/s1", {"Authorization": "Bearer wrong"})
        )
        self.assertEqual(status_of(response), 403, response)
        self.assertTrue(response.endswith(b"Invalid or expired token\n"), response)

    async def test_null_admitted_when_listed(self) -> None:
        """
        "null" in ALLOWED_ORIGINS admits Origin: null (sandboxed frames,
        file: pages); other origins stay refused.
        """
        await self.proxy.stop()
        origins = load_settings(
            {"ALLOWED_ORIGINS": "https://app.example.com,null"}, environ={}, dotenv_path=None,
        ).allowed_origins
        await self.start(allowed_origins=origins)
        self.authorize("s1")
        for origin, status in (("null", 101), ("https://app.example.com", 101),
                               ("https://evil.example.com", 403)):
            response = await self.request(
                upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok", "Origin": origin})
            )
            self.assertEqual(status_of(response), status, origin)

    async def test_require_origin(self) -> None:
        """
        REQUIRE_ORIGIN=true (a browser-only deployment): an upgrade without
        Origin gets 403 "Origin required"; a listed origin is admitted.
        """
        await self.proxy.stop()
        await self.start(allowed_origins=("https://app.example.com",), require_origin=True)
        self.authorize("s1", ttl=300)
        response = await self.request(
            upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"})
        )
        self.assertEqual(status_of(response), 403, response)
        self.assertTrue(response.endswith(b"Origin required\n"), response)
        self.assertLessEqual(self.r.ttl("session:s1:auth"), 300)
        response = await self.request(upgrade_request(
            "/a/ws/s1", {"Authorization": "Bearer tok", "Origin": "https://app.example.com"}
        ))
        self.assertEqual(status_of(response), 101, response)

    async def test_env_list(self) -> None:
        """
        ALLOWED_ORIGINS as an environment value: a comma list, spaces and a
        trailing slash ignored, non-default ports kept.
        """
        await self.proxy.stop()
        origins = load_settings(
            {"ALLOWED_ORIGINS": " https://app.example.com/ , http://localhost:3000"},
            environ={}, dotenv_path=None,
        ).allowed_origins
        await self.start(allowed_origins=origins)
        self.authorize("s1")
        for origin in ("https://app.example.com", "http://localhost:3000"):
            c = await self.client("s1", headers={"Origin": origin})
            self.assertEqual(c.state, c.STATE_OPEN, origin)
        for origin in ("http://localhost", "http://localhost:3001"):
            response = await self.request(
                upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok", "Origin": origin})
            )
            self.assertEqual(status_of(response), 403, origin)


class AnyOriginTests(AdmissionTestCase):
    async def test_default_accepts_any_origin(self) -> None:
        """
        Without ALLOWED_ORIGINS every origin, "null" and no Origin at all
        are accepted.
        """
        self.authorize("s1")
        for origin in ("https://evil.example.com", "null", None):
            headers = {} if origin is None else {"Origin": origin}
            c = await self.client("s1", headers=headers)
            self.assertEqual(c.state, c.STATE_OPEN, origin)


class MaxConnectionsTests(AdmissionTestCase):
    settings = {"max_connections": 2}

    async def test_third_refused_until_one_closes(self) -> None:
        """
        With MAX_CONNECTIONS=2 and two open sockets the third upgrade gets
        503 (and /health still answers); after one closes a new one is
        accepted.
        """
        self.authorize("s1")
        a = await self.client("s1")
        await self.client("s1")
        for _ in range(2):
            response = await self.request(upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"}))
            self.assertEqual(status_of(response), 503)
            self.assertTrue(response.endswith(b"Too many connections\n"), response)
        response = await self.request(b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(response), 200)
        self.assertEqual(json.loads(response.partition(b"\r\n\r\n")[2])["active_connections"], 2)

        await a.close_and_wait()
        await wait_for(lambda: len(self.proxy.proxy.connections) == 1)
        c = await self.client("s1")
        self.assertEqual(c.state, c.STATE_OPEN)
        response = await self.request(upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"}))
        self.assertEqual(status_of(response), 503)

    async def test_simultaneous_handshakes_counted(self) -> None:
        """
        Three clients connecting at the same moment: exactly two get in,
        handshakes in progress count against the cap.
        """
        self.authorize("s1")
        attempts = [connect(self.proxy.url("s1"), token="tok") for _ in range(3)]
        results = await defer.DeferredList(attempts, consumeErrors=True)
        opened = [value for ok, value in results if ok]
        for c in opened:
            self.addCleanup(c.close_and_wait)
        self.assertEqual(len(opened), 2, results)
