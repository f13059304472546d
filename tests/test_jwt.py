"""
JWT authentication and single-use tickets against the real daemon and a
real redis-server: the refusals table (each refusal exactly: status,
reason, challenge, log line, never the token), the original project's
token shape, every key source, expiry of open connections, the denylist,
tickets, C{AUTH_MODE=jwt,redis}, SIGHUP reloads, a JWKS URL, and a Redis
outage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from typing import Any, Optional

from twisted.internet import reactor, task
from twisted.web import resource, server

from wsproxy.backend import Backend, sign_token

from .support.base import wait_for
from .support.clients import connect
from .support.daemon import EnvTestCase
from .support.http import raw_upgrade
from .support.jwts import SECRET, Keys, forge, token

KEYS = Keys()


def challenge(head: bytes) -> Optional[str]:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "www-authenticate":
            return value.strip()
    return None


class JwtTestCase(EnvTestCase):
    timeout = 120

    def setUp(self) -> Any:
        self.dir = tempfile.mkdtemp()
        return super().setUp()

    async def upgrade_with(self, credentials: str, session: str = "s1",
                           way: str = "header", agent: str = "a",
                           forwarded: Optional[str] = None) -> Any:
        """
        A raw upgrade presenting C{credentials} one way: the
        C{Authorization} header (decided by the site before the WebSocket
        handshake), C{?access_token=} (by the admission) or C{?ticket=}.
        """
        path = f"/{agent}/ws/{session}"
        headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
        if way == "header":
            headers["Authorization"] = f"Bearer {credentials}"
        elif way == "query":
            path += f"?access_token={credentials}"
        else:
            path += f"?ticket={credentials}"
        c = await raw_upgrade(self.port, path, headers)
        self.addCleanup(c.abort)
        return c

    async def assertAdmitted(self, credentials: str, session: str = "s1",
                             way: str = "header", agent: str = "a") -> None:
        c = await self.upgrade_with(credentials, session, way, agent)
        self.assertEqual(c.status, 101, c.head)

    async def jwt_client(self, jwt_: str, session: str = "s1") -> Any:
        c = await connect(f"ws://127.0.0.1:{self.port}/a/ws/{session}", token=jwt_,
                          endpoint=self.endpoint())
        self.addCleanup(c.close_and_wait)
        return c


class RefusalTableTests(JwtTestCase):
    """
    One daemon with an HS secret, RSA and EC public keys (PEM) and an
    Ed25519 key in a JWK Set: every case of the table, each presented in
    the header and in the query string (the two paths decide the same).
    """

    async def test_refusals_table(self) -> None:
        now = int(time.time())
        pem = KEYS.write_pem(self.dir, KEYS.rsa, KEYS.ec)
        jwks = KEYS.write_jwks(self.dir, ed1=KEYS.ed)
        # each case from an address of its own (X-Forwarded-For from a
        # trusted proxy): each gets its own refusal log line
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_PUBLIC_KEY_FILE=pem,
                         JWT_JWKS_FILE=jwks, JWT_MAX_TOKEN_BYTES="2048", AUTH_FAIL_LIMIT="0",
                         TRUSTED_PROXIES="127.0.0.1")
        good = token()
        head, body, sig = good.split(".")
        cases: list[tuple[str, str, int, str, str]] = [
            # (case, token, status, reason, RFC 6750 error)
            ("alg none", forge({"alg": "none"}, {"session_id": "s1"}), 403,
             "Token algorithm not allowed", "invalid_token"),
            ("HS256 signed with the RSA public key",
             forge({"alg": "HS256"}, {"session_id": "s1"}, secret=Keys.public_pem(KEYS.rsa)),
             403, "Invalid token signature", "invalid_token"),
            ("HS256 signed with the EC public key",
             forge({"alg": "HS256"}, {"session_id": "s1"}, secret=Keys.public_pem(KEYS.ec)),
             403, "Invalid token signature", "invalid_token"),
            ("unknown kid", token(key=KEYS.ed, algorithm="EdDSA", kid="ed2"), 403,
             "Unknown key id", "invalid_token"),
            ("expired", token({"exp": now - 10}), 403, "Token expired", "invalid_token"),
            ("not yet valid", token({"nbf": now + 600}), 403, "Token not yet valid",
             "invalid_token"),
            ("tampered payload",
             f"{head}.{forge({'alg': 'HS256'}, {'session_id': 's1', 'admin': 1}).split('.')[1]}"
             f".{sig}", 403, "Invalid token signature", "invalid_token"),
            ("tampered header", f"{forge({'alg': 'HS384'}, {}).split('.')[0]}.{body}.{sig}",
             403, "Invalid token signature", "invalid_token"),
            ("over the size limit", token({"pad": "x" * 3000}), 403, "Token too large",
             "invalid_token"),
            ("payload not JSON", forge({"alg": "HS256"}, None, raw_payload=b"{session_id"), 403,
             "Token is not JSON", "invalid_token"),
            ("not a JWT", "opaque-redis-token", 403, "Malformed token", "invalid_token"),
            ("session_id a number", token({"session_id": 7}), 403, "Invalid token claims",
             "invalid_token"),
            ("exp a string", token({"exp": "never"}), 403, "Invalid token claims",
             "invalid_token"),
            ("no session_id", token({"session_id": None}), 403, "Token without session_id",
             "invalid_token"),
            ("another session", token(session="s2"), 403, "Token for another session",
             "insufficient_scope"),
            ("another agent", token({"agent_id": "b"}), 403, "Token for another agent",
             "insufficient_scope"),
            ("an audience nobody configured", token({"aud": "x"}), 403,
             "Invalid token audience", "invalid_token"),
            ("a critical header", forge({"alg": "HS256", "crit": ["x"]}, {"session_id": "s1"}),
             403, "Unsupported token header", "invalid_token"),
        ]
        for n, (case, jwt_, status, reason, error) in enumerate(cases):
            for way in ("header", "query"):
                c = await self.upgrade_with(jwt_, way=way, forwarded=f"10.0.{n}.{len(way)}")
                self.assertEqual(c.status, status, (case, way, c.head))
                first = c.head.split(b"\r\n", 1)[0].decode()
                self.assertEqual(first, f"HTTP/1.1 {status} {reason}", (case, way))
                self.assertEqual(
                    challenge(c.head),
                    f'Bearer realm="wsproxy", error="{error}", error_description="{reason}"',
                    (case, way))
        missing = await raw_upgrade(self.port, "/a/ws/s1", {})
        self.addCleanup(missing.abort)
        self.assertEqual(missing.status, 401)
        self.assertEqual(challenge(missing.head), 'Bearer realm="wsproxy"')
        # every refusal logged with its reason; no token, no part of one
        await wait_for(lambda: self.log.count("refused 403") >= 2 * len(cases))
        for n, (case, jwt_, _, reason, _) in enumerate(cases):
            for way in ("header", "query"):
                self.assertRegex(self.log, re.escape(f"refused 403 {reason}: session=s1 agent=a ")
                                 + r"peer=tcp4:127\.0\.0\.1:\d+ "
                                 + re.escape(f"client=10.0.{n}.{len(way)}\n"))
            for part in jwt_.split("."):
                if len(part) > 8:
                    self.assertNotIn(part, self.log, case)
        # and the good ones, of every kind, still pass
        for jwt_ in (good, token(key=KEYS.rsa, algorithm="RS256"),
                     token(key=KEYS.ec, algorithm="ES256"),
                     token(key=KEYS.ed, algorithm="EdDSA", kid="ed1"),
                     token({"agent_id": "a", "exp": now + 60})):
            for way in ("header", "query"):
                await self.assertAdmitted(jwt_, way=way)

    async def test_failures_count_towards_the_address_limit(self) -> None:
        """
        Refused JWTs count towards C{AUTH_FAIL_LIMIT} like wrong Redis
        tokens: past it, 429 before any check.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, AUTH_FAIL_LIMIT="3")
        for _ in range(3):
            c = await self.upgrade_with(token(key="a-wrong-secret-of-32-bytes-or-more"))
            self.assertEqual(c.status, 403)
        c = await self.upgrade_with(token())
        self.assertEqual(c.status, 429)


class AcceptedTests(JwtTestCase):
    async def test_original_project_token(self) -> None:
        """
        The original project's token, unchanged (HS256 with C{JWT_SECRET},
        claims C{session_id} and C{iat}, no C{exp}), in the header, the
        query string and the bearer subprotocol: the session opens and the
        contract holds both ways, with no auth key in Redis.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
        import jwt as pyjwt

        original = pyjwt.encode({"session_id": "s1", "iat": int(time.time())}, SECRET,
                                algorithm="HS256")
        self.r.config_resetstat()
        c = await self.jwt_client(original)
        # no Redis command for the token: only the subscription
        commands = set(self.r.info("commandstats"))
        self.assertEqual(commands & {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_get",
                                     "cmdstat_expire", "cmdstat_exists", "cmdstat_getdel"},
                         set(), commands)
        self.assertIn("cmdstat_subscribe", commands)
        self.assertEqual(self.r.exists("session:s1:auth"), 0)
        self.r.publish("session:s1:down", "hello")
        await c.wait_messages(1)
        self.assertEqual(c.messages, [(b"hello", False)])
        sub = await connect(f"ws://127.0.0.1:{self.port}/a/ws/s1",
                            protocols=["bearer", original], endpoint=self.endpoint())
        self.addCleanup(sub.close_and_wait)
        await self.assertAdmitted(original, way="query")

    async def test_backend_signs(self) -> None:
        """
        L{sign_token} signs what the proxy accepts, with an agent and an
        expiry; with a private key and a kid from a JWK Set too.
        """
        jwks = KEYS.write_jwks(self.dir, k1=KEYS.ec)
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_JWKS_FILE=jwks,
                         JWT_REQUIRE_EXP="true", JWT_AUDIENCE="app", JWT_ISSUER="auth")
        await self.assertAdmitted(sign_token(SECRET, "s1", agent_id="a", expires_in=60,
                                             aud="app", iss="auth"))
        await self.assertAdmitted(sign_token(KEYS.ec, "s1", expires_in=60, algorithm="ES256",
                                             key_id="k1", aud=["x", "app"], iss="auth"))
        for refused, reason in (
            (sign_token(SECRET, "s1", aud="app", iss="auth"), b"Token without expiry"),
            (sign_token(SECRET, "s1", expires_in=60, aud="web", iss="auth"),
             b"Invalid token audience"),
            (sign_token(SECRET, "s1", expires_in=60, aud="app", iss="other"),
             b"Invalid token issuer"),
            (sign_token(SECRET, "s1", agent_id="b", expires_in=60, aud="app", iss="auth"),
             b"Token for another agent"),
        ):
            c = await self.upgrade_with(refused)
            self.assertEqual(c.status, 403)
            self.assertIn(reason, c.head)

    async def test_leeway(self) -> None:
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_LEEWAY_SECS="30")
        now = int(time.time())
        await self.assertAdmitted(token({"exp": now - 10, "nbf": now + 10}))
        c = await self.upgrade_with(token({"exp": now - 60}))
        self.assertEqual(c.status, 403)


class ReportingTests(JwtTestCase):
    async def test_metrics_and_start_up_line(self) -> None:
        """
        With AUTH_MODE=jwt the start-up line says how tokens are checked,
        and /metrics counts JWTs accepted and refused and the keys in use.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
        self.assertIn("tokens: AUTH_MODE=jwt, 1 JWT keys from files", self.log)
        await self.assertAdmitted(token())
        c = await self.upgrade_with(token(key="a-wrong-secret-of-32-bytes-or-more"))
        self.assertEqual(c.status, 403)
        metrics = (await self.get("/metrics")).decode()
        self.assertIn('wsproxy_jwt_checks_total{result="accepted"} 1.0', metrics)
        self.assertIn('wsproxy_jwt_checks_total{result="refused"} 1.0', metrics)
        self.assertIn("wsproxy_jwt_keys 1.0", metrics)

    async def test_keys_without_jwt_mode_warned(self) -> None:
        """
        JWT_SECRET with the default AUTH_MODE=redis (a configuration carried
        over from the original project): one warning that JWTs are not
        accepted, and no JWT metrics.
        """
        await self.start(JWT_SECRET=SECRET)
        await wait_for(lambda: "JWT_SECRET set but AUTH_MODE=redis" in self.log)
        self.assertNotIn("wsproxy_jwt_checks", (await self.get("/metrics")).decode())


class ExpiryTests(JwtTestCase):
    async def test_connections_outlive_tokens_by_default(self) -> None:
        """
        Without C{JWT_EXPIRE_CONNECTIONS}, a connection stays open past
        its token's C{exp} and keeps receiving.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
        exp = time.time() + 2
        c = await self.jwt_client(token({"exp": int(exp) + 1}))
        await wait_for(lambda: time.time() > exp + 1.5, timeout=10)
        self.r.publish("session:s1:down", "after exp")
        await c.wait_messages(1)
        self.assertEqual(c.state, c.STATE_OPEN)

    async def test_expire_connections(self) -> None:
        """
        C{JWT_EXPIRE_CONNECTIONS=true}: at C{exp} the connection is closed
        with 3000 C{token expired} (its close event says
        C{token_expired}); a connection whose token has no C{exp}, and one
        with a later C{exp}, stay open.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_EXPIRE_CONNECTIONS="true",
                         EVENTS="all")
        events = self.r.pubsub()
        events.subscribe("wsproxy:events")
        self.addCleanup(events.close)
        expiring = await self.jwt_client(token({"exp": int(time.time()) + 3}))
        forever = await self.jwt_client(token(session="s2"), session="s2")
        later = await self.jwt_client(token({"exp": int(time.time()) + 600}, session="s3"),
                                      session="s3")
        self.assertEqual(await expiring.factory.closed, (3000, "token expired"))
        self.assertEqual(forever.state, forever.STATE_OPEN)
        self.assertEqual(later.state, later.STATE_OPEN)
        closes: list[dict[str, Any]] = []

        def closed() -> bool:
            message = events.get_message(timeout=0)
            while message is not None:
                if message["type"] == "message":
                    event = json.loads(message["data"])
                    if event.get("event") == "close":
                        closes.append(event)
                message = events.get_message(timeout=0)
            return bool(closes)

        await wait_for(closed)
        self.assertEqual((closes[0]["session_id"], closes[0]["closed_by"], closes[0]["code"]),
                         ("s1", "token_expired", 3000))

    async def test_server_side_close_of_a_jwt_session(self) -> None:
        """
        Revocation of live sockets: the session-control close reaches JWT
        connections as any other.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
        c = await self.jwt_client(token())
        Backend(self.r).close("s1", 4003, "revoked")
        self.assertEqual(await c.factory.closed, (4003, "revoked"))


class DenyListTests(JwtTestCase):
    async def test_by_session(self) -> None:
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_DENYLIST="session")
        await self.assertAdmitted(token())
        Backend(self.r).deny_session("s1", ttl=60)
        c = await self.upgrade_with(token())
        self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 403 Token revoked")
        await self.assertAdmitted(token(session="s2"), session="s2")
        self.r.delete("session:s1:revoked")
        await self.assertAdmitted(token())

    async def test_by_jti(self) -> None:
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_DENYLIST="jti")
        await self.assertAdmitted(token({"jti": "t1"}))
        Backend(self.r).deny_token("t1", ttl=60)
        for way in ("header", "query"):
            c = await self.upgrade_with(token({"jti": "t1"}), way=way)
            self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 403 Token revoked")
        await self.assertAdmitted(token({"jti": "t2"}))
        # a token the denylist cannot name is refused
        c = await self.upgrade_with(token())
        self.assertEqual(c.status, 403)


class TicketTests(JwtTestCase):
    async def test_ticket_works_once(self) -> None:
        """
        A ticket admits one connection (its key is gone after), in the
        default Redis mode; a malformed one is refused without a Redis
        command, an unknown or used one with 403.
        """
        await self.start()
        backend = Backend(self.r)
        ticket = backend.issue_ticket("s1", ttl=30)
        c = await self.upgrade_with(ticket, way="ticket")
        self.assertEqual(c.status, 101, c.head)
        self.assertEqual(self.r.exists(f"session:s1:ticket:{ticket}"), 0)
        again = await self.upgrade_with(ticket, way="ticket")
        self.assertEqual(again.head.split(b"\r\n")[0], b"HTTP/1.1 403 Invalid or used ticket")
        for bad in ("short", "x" * 200, "has%20space-and-more-chars"):
            c = await self.upgrade_with(bad, way="ticket")
            self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 403 Malformed ticket")
        # another session's ticket does not open this one
        other = backend.issue_ticket("s2")
        c = await self.upgrade_with(other, way="ticket")
        self.assertEqual(c.status, 403)
        self.assertNotIn(ticket, self.log)
        self.assertNotIn(other, self.log)

    async def test_ticket_expires(self) -> None:
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
        ticket = "t" * 32
        self.r.set(f"session:s1:ticket:{ticket}", "1", px=50)
        await wait_for(lambda: self.r.exists(f"session:s1:ticket:{ticket}") == 0)
        c = await self.upgrade_with(ticket, way="ticket")
        self.assertEqual(c.status, 403)
        await self.assertAdmitted(Backend(self.r).issue_ticket("s1"), way="ticket")

    async def test_ticket_and_token_together(self) -> None:
        await self.start()
        ticket = Backend(self.r).issue_ticket("s1")
        c = await raw_upgrade(self.port, f"/a/ws/s1?ticket={ticket}",
                              {"Authorization": "Bearer tok"})
        self.addCleanup(c.abort)
        self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 400 Token presented more than once")
        self.assertEqual(self.r.exists(f"session:s1:ticket:{ticket}"), 1)

    async def test_concurrent_use(self) -> None:
        """
        Ten connections race with one ticket: exactly one is admitted.
        """
        await self.start()
        ticket = Backend(self.r).issue_ticket("s1")
        from twisted.internet import defer

        clients = await defer.gatherResults([
            defer.ensureDeferred(self.upgrade_with(ticket, way="ticket")) for _ in range(10)
        ])
        self.assertEqual(sorted(c.status for c in clients), [101] + [403] * 9)


class MixedModeTests(JwtTestCase):
    async def test_either_token(self) -> None:
        """
        C{AUTH_MODE=jwt,redis}: a valid JWT, or a token stored in Redis; a
        forged JWT gets the JWT's reason, an unknown opaque token the Redis
        path's.
        """
        await self.start(AUTH_MODE="jwt,redis", JWT_SECRET=SECRET)
        await self.assertAdmitted(token())
        self.r.set("session:s1:auth", "opaque-token", ex=60)
        await self.assertAdmitted("opaque-token")
        self.assertEqual(self.r.ttl("session:s1:auth"), 10800)
        # a JWT stored as the Redis token (a backend mid-migration) passes too
        other = token(key="an-old-secret-of-at-least-32-bytes!")
        self.r.set("session:s1:auth", other, ex=60)
        await self.assertAdmitted(other)
        c = await self.upgrade_with(token(key="a-wrong-secret-of-32-bytes-or-more"))
        self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 403 Invalid token signature")
        c = await self.upgrade_with("not-stored")
        self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 403 Invalid or expired token")


class KeyRotationTests(JwtTestCase):
    async def test_sighup_reloads_key_files(self) -> None:
        secrets = os.path.join(self.dir, "secrets")
        with open(secrets, "w") as f:
            f.write("old-secret-of-at-least-32-bytes!!!\n")
        pem = KEYS.write_pem(self.dir, KEYS.rsa)
        await self.start(AUTH_MODE="jwt", JWT_SECRET_FILE=secrets, JWT_PUBLIC_KEY_FILE=pem)
        await self.assertAdmitted(token(key="old-secret-of-at-least-32-bytes!!!"))
        new_ec = Keys().ec
        c = await self.upgrade_with(token(key=new_ec, algorithm="ES256"))
        self.assertEqual(c.status, 403)
        with open(secrets, "w") as f:
            f.write("new-secret-of-at-least-32-bytes!!!\nold-secret-of-at-least-32-bytes!!!\n")
        with open(pem, "wb") as f:
            f.write(Keys.public_pem(KEYS.rsa) + Keys.public_pem(new_ec))
        self.daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "keys reloaded" in self.log)
        await self.assertAdmitted(token(key="new-secret-of-at-least-32-bytes!!!"))
        await self.assertAdmitted(token(key="old-secret-of-at-least-32-bytes!!!"))
        await self.assertAdmitted(token(key=new_ec, algorithm="ES256"))
        # a broken file: the keys in use stay, the daemon lives on
        with open(secrets, "w") as f:
            f.write("\n")
        self.daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "keys not reloaded" in self.log)
        await self.assertAdmitted(token(key="new-secret-of-at-least-32-bytes!!!"))

    async def test_jwks_url(self) -> None:
        """
        C{JWT_JWKS_URL}, served over real HTTP: fetched at start; a token
        whose kid appeared later is admitted at its first attempt (the
        unknown kid fetches again, and the check waits for it); a flood of
        made-up kids within the floor fetches nothing more.
        """
        document = {"body": json.dumps(KEYS.jwks(k1=KEYS.ec)).encode()}
        requests: list[float] = []

        class Jwks(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                requests.append(time.time())
                request.setHeader(b"content-type", b"application/json")
                return document["body"]

        listening = reactor.listenTCP(0, server.Site(Jwks()), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        url = f"http://127.0.0.1:{listening.getHost().port}/jwks"
        await self.start(AUTH_MODE="jwt", JWT_JWKS_URL=url, JWT_JWKS_MIN_REFRESH_SECS="0")
        await wait_for(lambda: len(requests) >= 1)
        await wait_for(lambda: "JWKS fetched" in self.log)
        await self.assertAdmitted(token(key=KEYS.ec, algorithm="ES256", kid="k1"))
        rotated = Keys().ec
        document["body"] = json.dumps(KEYS.jwks(k1=KEYS.ec, k2=rotated)).encode()
        await self.assertAdmitted(token(key=rotated, algorithm="ES256", kid="k2"))
        self.assertEqual(len(requests), 2)
        c = await self.upgrade_with(token(key=rotated, algorithm="ES256", kid="k9"))
        self.assertEqual(c.head.split(b"\r\n")[0], b"HTTP/1.1 403 Unknown key id")

    async def test_jwks_url_floor(self) -> None:
        document = json.dumps(KEYS.jwks(k1=KEYS.ec)).encode()
        requests: list[float] = []

        class Jwks(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                requests.append(time.time())
                return document

        listening = reactor.listenTCP(0, server.Site(Jwks()), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        url = f"http://127.0.0.1:{listening.getHost().port}/jwks"
        await self.start(AUTH_MODE="jwt", JWT_JWKS_URL=url, JWT_JWKS_MIN_REFRESH_SECS="3600")
        await wait_for(lambda: "JWKS fetched" in self.log)
        for n in range(20):
            c = await self.upgrade_with(token(key=KEYS.ec, algorithm="ES256", kid=f"x{n}"))
            self.assertEqual(c.status, 403)
        await self.assertAdmitted(token(key=KEYS.ec, algorithm="ES256", kid="k1"))
        self.assertEqual(len(requests), 1)


class RedisOutageTests(JwtTestCase):
    async def test_jwt_while_redis_is_down(self) -> None:
        """
        C{AUTH_MODE=jwt} with Redis down: a valid token is answered 503 at
        once (its subscription cannot be confirmed, and a 101 without one
        would lose messages silently); a forged one still gets its 403
        without waiting for Redis; open connections stay open, and new
        ones are admitted once Redis is back.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET)
        c = await self.jwt_client(token(session="s9"), session="s9")
        self.redis.stop()
        await wait_for(lambda: "connection lost" in self.log)
        started = time.monotonic()
        refused = await self.upgrade_with(token())
        self.assertEqual(refused.head.split(b"\r\n")[0], b"HTTP/1.1 503 Redis unavailable")
        self.assertLess(time.monotonic() - started, 4.0)
        forged = await self.upgrade_with(token(key="a-wrong-secret-of-32-bytes-or-more"))
        self.assertEqual(forged.status, 403)
        self.assertEqual(c.state, c.STATE_OPEN)
        self.redis.start()
        await wait_for(lambda: self.log.count("connection ready") >= 4, timeout=30)

        async def admitted() -> bool:
            again = await self.upgrade_with(token())
            return again.status == 101

        deadline = time.monotonic() + 30
        while not await admitted():
            self.assertLess(time.monotonic(), deadline)
            await task.deferLater(reactor, 0.2, lambda: None)
