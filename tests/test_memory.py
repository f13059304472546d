"""
The proxy's behaviour as a client and a backend see it, in memory: the real
site, admission and WebSocket protocol over memory transports, fake Redis
links and a L{Clock} (see L{tests.memory}). No redis-server, no socket, no
real time: the whole module runs in about a second.

The same behaviours against a real redis-server and real sockets are in
C{test_integration}, C{test_faults} and C{test_hostile}.
"""

from __future__ import annotations

import json
from typing import Any

import txredisapi
from twisted.logger import capturedLogs

from tests.memory import (
    BINARY,
    CLOSE,
    TEXT,
    WS_ACCEPT,
    Frame,
    MemoryClient,
    MemoryProxy,
    MemoryTestCase,
    close_payload,
)
from wsproxy.session.auth import CHECK_SHA, token_digest
from wsproxy.names import upstream_partition, upstream_stream
from wsproxy.redis.redislink import RedisTimeout, RedisUnavailable

GRACE = 10800  # the default AUTH_GRACE_PERIOD_SECS

#: Redis's answer to a user whose ACL has no EVALSHA
NO_SCRIPTS = txredisapi.ResponseError(
    "NOPERM User wsproxy has no permissions to run the 'evalsha' command")
TEXT_PLAIN = ("Content-Type", "text/plain; charset=utf-8")


class AdmissionTestCase(MemoryTestCase):
    """
    Assertions about an upgrade's answer and what it left behind.
    """

    def assertAccepted(self, client: MemoryClient, subprotocol: str | None = None) -> None:
        response = client.response()
        self.assertEqual(response.status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(response.header("Sec-WebSocket-Accept"), WS_ACCEPT)
        self.assertEqual(response.header("Sec-WebSocket-Protocol"), subprotocol)
        self.assertFalse(client.closed)

    def assertRefused(
        self,
        client: MemoryClient,
        code: int,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """
        The whole answer is a plain-text refusal, with C{headers} first,
        and the connection is closed.
        """
        body = (reason + "\n").encode()
        response = client.response()
        self.assertEqual(response.status, f"HTTP/1.1 {code} {reason}")
        self.assertEqual(
            response.headers,
            [*headers, TEXT_PLAIN, ("Content-Length", str(len(body))), ("Connection", "close")],
        )
        self.assertEqual(response.body, body)
        self.assertEqual(client.read(), b"")
        self.assertTrue(client.closed)

    def assertNothingLeft(self, memory: MemoryProxy) -> None:
        """
        No connection is counted open and no session channel stays
        subscribed, in the hub or in Redis.
        """
        self.assertEqual(memory.proxy.connections, set())
        self.assertEqual(memory.proxy.stats.open_connections, 0)
        self.assertEqual(memory.proxy.hub.channel_count(), 0)
        self.assertEqual(
            [c for c in memory.subscriber.channels if c.startswith("session:")], []
        )

    def assertTokenUntouched(self, memory: MemoryProxy, session_id: str = "s1") -> None:
        """
        Neither an EXPIRE nor a matching token check (the script resets the
        TTL) was seen: the stored token keeps the TTL the backend set.
        """
        self.assertEqual(memory.redis.sent("EXPIRE"), [])
        key = f"session:{session_id}:auth"
        if key in memory.redis.data:
            self.assertEqual(memory.redis.ttl[key], 60)


class AcceptTests(AdmissionTestCase):
    def test_header_token(self) -> None:
        """
        C{Authorization: Bearer <token>} matching the stored token gets a
        101 with no subprotocol; the connection counts as accepted and open,
        and the token's TTL is set to the grace period.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertAccepted(client)
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1})
        self.assertEqual(memory.proxy.stats.open_connections, 1)
        # one round trip: compared and renewed by the token check's script
        self.assertEqual(memory.redis.sent("EVALSHA", "EVAL", "GET", "EXPIRE"), [
            ("EVALSHA", CHECK_SHA, "1", "session:s1:auth", token_digest("tok"), str(GRACE))])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], GRACE)

    def test_subprotocol_token(self) -> None:
        """
        C{Sec-WebSocket-Protocol: bearer, <token>} (browsers) gets a 101
        that answers with the subprotocol C{bearer}, never the token.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", {"Sec-WebSocket-Protocol": "bearer, tok"})
        self.assertAccepted(client, subprotocol="bearer")
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1})

    def test_query_token(self) -> None:
        """
        C{?access_token=<token>} (percent-encoded) gets a 101 with no
        subprotocol.
        """
        memory = self.start()
        memory.redis.authorize("s1", "t/k=")
        client = memory.request("/agent/ws/s1?access_token=t%2Fk%3D")
        self.assertAccepted(client)
        self.assertEqual([a[3] for a in memory.redis.sent("EVALSHA")], ["session:s1:auth"])
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1})

    def test_origin_in_list(self) -> None:
        """
        With C{ALLOWED_ORIGINS} set, an C{Origin} in the list is admitted,
        compared after normalizing case and the default port.
        """
        memory = self.start(allowed_origins=("https://app.example.com",))
        client = memory.open(headers={"Origin": "https://App.Example.com:443"})
        self.assertFalse(client.closed)

    def test_no_origin_admitted(self) -> None:
        """
        With C{ALLOWED_ORIGINS} set, a request without C{Origin} (a server,
        an app, a CLI client) is admitted.
        """
        memory = self.start(allowed_origins=("https://app.example.com",))
        client = memory.open()
        self.assertFalse(client.closed)
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1})

    def test_sockets_of_a_session_share_one_subscription(self) -> None:
        """
        The first socket of a session subscribes its down channel and the
        last one to close unsubscribes it; the ones between send nothing.
        """
        memory = self.start()
        first = memory.open()
        second = memory.open()
        self.assertEqual(memory.redis.sent("SUBSCRIBE"), [("SUBSCRIBE", "session:s1:down")])
        first.leave()
        self.assertEqual(memory.redis.sent("UNSUBSCRIBE"), [])
        self.assertEqual(memory.proxy.hub.channel_count(), 1)
        second.leave()
        self.assertEqual(memory.redis.sent("UNSUBSCRIBE"), [("UNSUBSCRIBE", "session:s1:down")])
        self.assertNothingLeft(memory)


    def test_options_are_the_classs(self) -> None:
        """
        Every option Autobahn would copy onto a new connection
        (CONFIG_ATTRS) is an attribute of the factory's protocol class, with
        the factory's value, so the class's own list of them is empty (its
        connectionMade walks nothing) and an open connection sees each
        option as the factory set it.
        """
        from autobahn.twisted.websocket import WebSocketServerProtocol

        memory = self.start()
        factory = memory.site.ws_factory
        cls = factory.protocol
        self.assertEqual(cls.CONFIG_ATTRS, ())
        client = memory.open()
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertIn(name, cls.__dict__, name)
            self.assertEqual(getattr(client.protocol, name), getattr(factory, name), name)


class SubscribeBeforeOpenTests(AdmissionTestCase):
    def test_no_101_before_the_subscription_is_confirmed(self) -> None:
        """
        The 101 is sent only once Redis has confirmed the subscription to
        the session's down channel: while the confirmation is held back
        nothing at all has been sent to the client, and the connection is
        neither accepted nor open yet.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("SUBSCRIBE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual(memory.redis.sent("SUBSCRIBE"), [("SUBSCRIBE", "session:s1:down")])
        self.assertEqual(client.read(), b"")
        self.assertEqual(memory.proxy.stats.outcomes, {})
        self.assertEqual(memory.proxy.stats.open_connections, 0)
        memory.redis.release()
        self.assertAccepted(client)
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1})


class RefusalTests(AdmissionTestCase):
    def test_not_a_websocket_path(self) -> None:
        """
        An upgrade for any path other than C{/{agent}/ws/{session}} is
        refused 404 by its admission: nothing reaches Redis, and like every
        other refusal of an upgrade it is counted.
        """
        memory = self.start()
        client = memory.request("/agent/wss/s1", {"Authorization": "Bearer tok"})
        response = client.response()
        self.assertEqual(response.status, "HTTP/1.1 404 Not Found")
        self.assertEqual(response.header("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(response.header("Connection"), "close")
        self.assertEqual(response.body, b"Not Found\n")
        self.assertTrue(client.closed)
        self.assertEqual(memory.redis.log, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"404": 1})

    def test_invalid_session_id(self) -> None:
        """
        A session id outside C{[A-Za-z0-9._~-]{1,128}} (after
        percent-decoding) is 400 before Redis is touched.
        """
        memory = self.start()
        for path in ("/agent/ws/a:b", "/agent/ws/a%2A", "/agent/ws/" + "x" * 129):
            client = memory.request(path, {"Authorization": "Bearer tok"})
            self.assertRefused(client, 400, "Invalid session id")
        self.assertEqual(memory.redis.log, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"400": 3})
        self.assertNothingLeft(memory)

    def test_missing_token(self) -> None:
        """
        No token in any form is 401 with C{WWW-Authenticate: Bearer}, and
        Redis is not asked.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"},
                        {"Sec-WebSocket-Protocol": "bearer"}):
            client = memory.request("/agent/ws/s1", headers)
            self.assertRefused(client, 401, "Missing bearer token",
                               (("WWW-Authenticate", 'Bearer realm="wsproxy"'),))
        self.assertEqual(memory.redis.log, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"401": 3})
        self.assertNothingLeft(memory)

    def test_wrong_token(self) -> None:
        """
        A token that differs from the stored one is 403, and the stored
        token's TTL is not touched.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok2"})
        self.assertRefused(client, 403, "Invalid or expired token")
        self.assertEqual([a[3] for a in memory.redis.sent("EVALSHA")], ["session:s1:auth"])
        self.assertTokenUntouched(memory)
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 1})
        self.assertNothingLeft(memory)

    def test_unknown_session(self) -> None:
        """
        A session with no stored token (never authorized, or expired) is 403.
        """
        memory = self.start()
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 403, "Invalid or expired token")
        self.assertTokenUntouched(memory)
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 1})

    def test_token_expired_between_get_and_expire(self) -> None:
        """
        Where Redis refuses scripts (GET, then EXPIRE): if the token
        expires between the check and the TTL reset (EXPIRE finds no key),
        the upgrade is 403 and nothing is subscribed. (The script does both
        at once: no such window.)
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.fail("EVALSHA", NO_SCRIPTS)
        memory.redis.hold("EXPIRE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        del memory.redis.data["session:s1:auth"]
        memory.redis.release()
        self.assertRefused(client, 403, "Invalid or expired token")
        self.assertEqual(memory.redis.sent("SUBSCRIBE"), [])
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 1})

    def test_origin_not_allowed(self) -> None:
        """
        With C{ALLOWED_ORIGINS} set, another C{Origin} (C{null} included) is
        403 "Origin not allowed", before Redis is asked.
        """
        memory = self.start(allowed_origins=("https://app.example.com",))
        memory.redis.authorize("s1", "tok")
        for origin in ("https://evil.example", "https://app.example.com:8443", "null"):
            client = memory.request(
                "/agent/ws/s1", {"Authorization": "Bearer tok", "Origin": origin}
            )
            self.assertRefused(client, 403, "Origin not allowed")
        self.assertEqual(memory.redis.log, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 3})

    def test_origin_required(self) -> None:
        """
        With C{REQUIRE_ORIGIN=true}, a request without C{Origin} is 403
        "Origin required".
        """
        memory = self.start(require_origin=True)
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 403, "Origin required")
        self.assertEqual(memory.redis.log, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 1})

    def test_draining(self) -> None:
        """
        Once shutdown has begun, an upgrade is 503 with C{Retry-After: 1},
        before Redis is asked.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.proxy.draining = True
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Server shutting down", (("Retry-After", "1"),))
        self.assertEqual(memory.redis.log, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"503": 1})

    def test_too_many_connections(self) -> None:
        """
        With C{MAX_CONNECTIONS=1}, an upgrade while one connection is open
        is 503 "Too many connections"; once it has closed, the next one is
        admitted.
        """
        memory = self.start(max_connections=1)
        first = memory.open()
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Too many connections")
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 1, "503": 1})
        first.leave()
        memory.open()
        self.assertEqual(memory.proxy.stats.outcomes, {"accepted": 2, "503": 1})

    def test_redis_unavailable(self) -> None:
        """
        With no command connection to Redis the upgrade is 503 "Redis
        unavailable" at once.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.commands.lose()
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Redis unavailable")
        self.assertTokenUntouched(memory)
        self.assertEqual(memory.proxy.stats.outcomes, {"503": 1})

    def test_subscriber_unavailable(self) -> None:
        """
        With no subscriber connection the session cannot be subscribed:
        503, and nothing is left in the hub.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.subscriber.lose()
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Redis unavailable")
        self.assertEqual(memory.proxy.stats.outcomes, {"503": 1})
        self.assertNothingLeft(memory)

    def test_redis_error_reply(self) -> None:
        """
        An error reply to the token check (NOPERM after an ACL change) is
        the server's problem, not the client's: 503, and the error's text
        is not sent to the client.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.fail("EVALSHA", txredisapi.ResponseError(
            "NOPERM this user has no permissions to access one of the keys used as arguments"))
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Redis unavailable")
        self.assertTokenUntouched(memory)
        self.assertEqual(memory.proxy.stats.outcomes, {"503": 1})

    def test_subscribe_error_reply(self) -> None:
        """
        An error reply to SUBSCRIBE is 503 and the listener is released.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.fail("SUBSCRIBE", txredisapi.ResponseError("NOPERM no permissions on channel"))
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Redis unavailable")
        self.assertEqual(memory.proxy.stats.outcomes, {"503": 1})
        self.assertNothingLeft(memory)

    def test_token_check_deadline(self) -> None:
        """
        If Redis does not answer the token check within
        C{AUTH_TIMEOUT_SECS}, the upgrade is 504 "Redis timeout", not a
        hanging handshake.
        """
        memory = self.start(auth_timeout=2.0)
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        memory.clock.advance(1.99)
        self.assertEqual(client.read(), b"")
        memory.clock.advance(0.01)
        self.assertRefused(client, 504, "Redis timeout")
        self.assertEqual(memory.proxy.stats.outcomes, {"504": 1})
        memory.redis.release()
        # the script reached Redis: it has renewed the (matching) token
        self.assertEqual(memory.redis.ttl["session:s1:auth"], GRACE)
        self.assertNothingLeft(memory)

    def test_link_deadline(self) -> None:
        """
        A token check that fails because the command link itself gave up
        waiting (its own deadline) is 504 as well.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.fail("EVALSHA", RedisTimeout("no reply within 5s"))
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 504, "Redis timeout")
        self.assertEqual(memory.proxy.stats.outcomes, {"504": 1})

    def test_one_deadline_for_token_and_subscription(self) -> None:
        """
        The token check and the subscription share one deadline: a slow
        token check leaves the subscription only the rest of it. On
        expiry the listener is released and the channel unsubscribed.
        """
        memory = self.start(auth_timeout=2.0)
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA", "SUBSCRIBE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        memory.clock.advance(1.5)
        memory.redis.release("EVALSHA")
        self.assertEqual(memory.redis.sent("SUBSCRIBE"), [("SUBSCRIBE", "session:s1:down")])
        memory.clock.advance(0.5)
        self.assertRefused(client, 504, "Redis timeout")
        self.assertEqual(memory.proxy.stats.outcomes, {"504": 1})
        self.assertEqual(memory.redis.sent("UNSUBSCRIBE"), [("UNSUBSCRIBE", "session:s1:down")])
        memory.redis.release()
        self.assertNothingLeft(memory)

    def test_refusal_logged_without_token(self) -> None:
        """
        A refusal is logged once, with its code, reason, session, agent and
        peer, and never the token.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        with capturedLogs() as events:
            memory.request("/agent7/ws/s1?access_token=secret-token")
        refused = [e for e in events if e.get("code") == 403]
        self.assertEqual(len(refused), 1)
        event = refused[0]
        self.assertEqual(
            (event["reason"], event["session_id"], event["agent_id"], event["peer"]),
            ("Invalid or expired token", "s1", "agent7", "tcp4:198.51.100.7:50123"),
        )
        self.assertNotIn("secret-token", repr(events))


class ClientLeavesTests(AdmissionTestCase):
    def test_leaves_during_token_check(self) -> None:
        """
        A client that leaves while its token is being checked counts as
        outcome 499; the check is abandoned, so nothing is subscribed, even
        when Redis answers later. (The one round trip that compares the
        token also resets its TTL: a matching token sent before the client
        left has renewed it.)
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        client.leave()
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})
        memory.redis.release()
        self.assertEqual(memory.redis.sent("SUBSCRIBE"), [])
        self.assertEqual(memory.redis.sent("EXPIRE"), [])
        self.assertNothingLeft(memory)

    def test_leaves_during_subscription(self) -> None:
        """
        A client that leaves while its subscription awaits confirmation
        counts as outcome 499; the hub releases its listener and
        unsubscribes the channel, and the late confirmation changes nothing.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("SUBSCRIBE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        client.leave()
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})
        self.assertEqual(memory.proxy.hub.channel_count(), 0)
        self.assertEqual(memory.redis.sent("UNSUBSCRIBE"), [("UNSUBSCRIBE", "session:s1:down")])
        memory.redis.release()
        self.assertNothingLeft(memory)
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})


class TokenScriptTests(AdmissionTestCase):
    """
    The token check's one round trip (wsproxy.session.auth.CHECK_SCRIPT), and what
    happens when Redis has not cached it or refuses scripts.
    """

    def auth_commands(self, memory: MemoryProxy) -> list[str]:
        return [c.name for c in memory.redis.log if c.name in ("EVALSHA", "EVAL", "GET", "EXPIRE")]

    def test_noscript_then_eval(self) -> None:
        """
        A Redis that has not cached the script (a failover to a new master,
        a restart, SCRIPT FLUSH) answers EVALSHA with NOSCRIPT: the script
        is sent once with EVAL (which caches it), the client gets its 101,
        and the next connection is one EVALSHA again.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.scripts.clear()
        for path in ("/agent/ws/s1", "/agent/ws/s1?access_token=tok"):
            client = memory.request(path, {"Authorization": "Bearer tok"}
                                    if "access_token" not in path else {})
            self.assertAccepted(client)
        self.assertEqual(self.auth_commands(memory), ["EVALSHA", "EVAL", "EVALSHA"])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], GRACE)

    def test_scripts_refused_fall_back(self) -> None:
        """
        An ACL user without EVALSHA (NOPERM): the check falls back to GET
        and EXPIRE (the header token at the site, a query token in the
        admission, both admitted with the TTL reset; a wrong token 403 with
        the TTL untouched), with one warning and no further EVALSHA until
        the command connection is made again, when the script is tried
        once more.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.fail("EVALSHA", NO_SCRIPTS)
        with capturedLogs() as events:
            self.assertAccepted(memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"}))
            self.assertAccepted(memory.request("/agent/ws/s1?access_token=tok"))
        self.assertEqual(self.auth_commands(memory),
                         ["EVALSHA", "GET", "EXPIRE", "GET", "EXPIRE"])
        self.assertEqual(memory.redis.ttl["session:s1:auth"], GRACE)
        warnings = [e for e in events if "refuses scripts" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        memory.redis.ttl["session:s1:auth"] = 60
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer nope"})
        self.assertRefused(client, 403, "Invalid or expired token")
        self.assertEqual(memory.redis.ttl["session:s1:auth"], 60)
        memory.commands.lose()
        memory.commands.connect()
        del memory.redis.log[:]
        self.assertAccepted(memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"}))
        self.assertEqual(self.auth_commands(memory), ["EVALSHA", "GET", "EXPIRE"])

    def test_script_errors_are_redis_errors(self) -> None:
        """
        An error in what the script does (a key of another type: WRONGTYPE)
        is not a refusal of scripts: 503, as a GET's error would be, and
        the next check still uses the script.
        """
        memory = self.start()
        memory.redis.fail("EVALSHA", txredisapi.ResponseError(
            "WRONGTYPE Operation against a key holding the wrong kind of value"))
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertRefused(client, 503, "Redis unavailable")
        self.assertTrue(memory.proxy.token_script.usable)

    def test_hash_tags(self) -> None:
        """
        With KEY_HASH_TAGS the script's one key is the tagged
        C{session:{id}:auth} (a Redis Cluster routes it by that slot).
        """
        memory = self.start(key_hash_tags=True)
        memory.redis.data["session:{s1}:auth"] = b"tok"
        self.assertAccepted(memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"}))
        self.assertEqual([a[3] for a in memory.redis.sent("EVALSHA")], ["session:{s1}:auth"])
        self.assertEqual(memory.redis.ttl["session:{s1}:auth"], GRACE)


class DownstreamTests(MemoryTestCase):
    def test_auto_frame_types_in_order(self) -> None:
        """
        C{FRAME_MODE=auto}: each message on the down channel becomes one
        frame, in publish order; valid UTF-8 as text, anything else as
        binary. Messages and payload bytes are counted.
        """
        memory = self.start()
        client = memory.open()
        for payload in (b"one", b"\xff\x00\x01", '{"é":2}'.encode(), b""):
            memory.redis.publish("session:s1:down", payload)
        self.assertEqual(client.frames(), [
            Frame(TEXT, b"one"),
            Frame(BINARY, b"\xff\x00\x01"),
            Frame(TEXT, '{"é":2}'.encode()),
            Frame(TEXT, b""),
        ])
        stats = memory.proxy.stats
        self.assertEqual((stats.messages_down, stats.bytes_down), (4, 3 + 3 + 8))

    def test_tagged_frame_types(self) -> None:
        """
        C{FRAME_MODE=tagged}: a C{t} payload becomes a text frame and a
        C{b} payload a binary frame, tag removed; any other tag, or C{t}
        with invalid UTF-8, is not sent and is counted as dropped.
        """
        memory = self.start(frame_mode="tagged")
        client = memory.open()
        for payload in (b"thello", b"b\x00\x01", b"xnope", b"t\xff", b"bhi"):
            memory.redis.publish("session:s1:down", payload)
        self.assertEqual(client.frames(), [
            Frame(TEXT, b"hello"), Frame(BINARY, b"\x00\x01"), Frame(BINARY, b"hi"),
        ])
        self.assertEqual(memory.proxy.stats.dropped_down, 2)
        self.assertFalse(client.closed)

    def test_every_socket_of_the_session(self) -> None:
        """
        A message reaches every open socket of its session and no socket
        of another session.
        """
        memory = self.start()
        first, second = memory.open("s1"), memory.open("s1")
        other = memory.open("s2")
        memory.redis.publish("session:s1:down", b"both")
        self.assertEqual(first.frames(), [Frame(TEXT, b"both")])
        self.assertEqual(second.frames(), [Frame(TEXT, b"both")])
        self.assertEqual(other.frames(), [])

    def test_backend_messages_not_limited(self) -> None:
        """
        C{MAX_MESSAGE_SIZE_BYTES} limits clients only: a larger backend
        message is delivered whole.
        """
        memory = self.start(max_message_size=16)
        client = memory.open()
        memory.redis.publish("session:s1:down", b"x" * 1000)
        self.assertEqual(client.frames(), [Frame(TEXT, b"x" * 1000)])


class UpstreamTests(MemoryTestCase):
    def test_published_in_order(self) -> None:
        """
        C{FRAME_MODE=auto}: every client message, text or binary, is
        published on C{session:{id}:up} with its bytes unchanged, in the
        order received, and counted.
        """
        memory = self.start()
        client = memory.open()
        client.send_frame(b"hello")
        client.send_frame(b"\x00\xff", BINARY)
        client.send_frame('{"é":1}'.encode())
        self.assertEqual(memory.redis.published, [
            (b"session:s1:up", b"hello"),
            (b"session:s1:up", b"\x00\xff"),
            (b"session:s1:up", '{"é":1}'.encode()),
        ])
        stats = memory.proxy.stats
        self.assertEqual((stats.messages_up, stats.bytes_up), (3, 5 + 2 + 8))

    def test_tagged(self) -> None:
        """
        C{FRAME_MODE=tagged}: up payloads carry C{t} or C{b} before the
        message bytes.
        """
        memory = self.start(frame_mode="tagged")
        client = memory.open()
        client.send_frame(b"hello")
        client.send_frame(b"\x00\x01", BINARY)
        self.assertEqual(memory.redis.published, [
            (b"session:s1:up", b"thello"), (b"session:s1:up", b"b\x00\x01"),
        ])

    def test_require_json(self) -> None:
        """
        C{REQUIRE_JSON=true}: a text message that is not JSON is answered
        C{{"error":"Invalid JSON format"}} and not published; JSON text and
        binary messages are published.
        """
        memory = self.start(require_json=True)
        client = memory.open()
        client.send_frame(b"not json")
        self.assertEqual(client.frames(), [Frame(TEXT, b'{"error":"Invalid JSON format"}')])
        client.send_frame(b'{"ok":true}')
        client.send_frame(b"\x00raw", BINARY)
        self.assertEqual(memory.redis.published, [
            (b"session:s1:up", b'{"ok":true}'), (b"session:s1:up", b"\x00raw"),
        ])
        self.assertEqual(memory.proxy.stats.messages_up, 2)

    def test_publish_failure_closes_1011(self) -> None:
        """
        A client message that cannot be published (Redis answers an error,
        the link's deadline passes, the link is unavailable) closes the
        socket with 1011, so that the client does not believe it was
        delivered; it is counted, and nothing more is published for that
        socket.
        """
        memory = self.start()
        errors = [
            txredisapi.ResponseError("NOPERM no permissions on channel"),
            RedisTimeout("no reply within 5s"),
            RedisUnavailable("connection lost"),
        ]
        for n, exception in enumerate(errors, 1):
            client = memory.open(f"s{n}")
            memory.redis.fail("PUBLISH", exception)
            client.send_frame(b"lost")
            self.assertEqual(client.frames(), [
                Frame(CLOSE, close_payload(1011, b"message could not be delivered")),
            ])
            self.assertEqual(memory.proxy.stats.publish_failures, n)
            client.send_frame(b"after")
            self.assertEqual(len(memory.redis.sent("PUBLISH")), n)

    def test_command_connection_lost_closes_1011(self) -> None:
        """
        A message waiting for Redis's reply when the command connection is
        lost closes its socket with 1011; so does one sent while there is
        no connection.
        """
        memory = self.start()
        waiting, later = memory.open("s1"), memory.open("s2")
        memory.redis.hold("PUBLISH")
        waiting.send_frame(b"in flight")
        self.assertEqual(waiting.frames(), [])
        memory.commands.lose()
        self.assertEqual(waiting.frames()[0].close_code, 1011)
        later.send_frame(b"no connection")
        self.assertEqual(later.frames()[0].close_code, 1011)
        self.assertEqual(memory.proxy.stats.publish_failures, 2)

    def test_client_message_too_large(self) -> None:
        """
        A client message over C{MAX_MESSAGE_SIZE_BYTES} closes the socket
        with 1009 and is not published.
        """
        memory = self.start(max_message_size=16)
        client = memory.open()
        client.send_frame(b"x" * 16)
        client.send_frame(b"x" * 17)
        self.assertEqual([f.close_code for f in client.frames()], [1009])
        self.assertEqual(memory.redis.published, [(b"session:s1:up", b"x" * 16)])


class BackpressureTests(MemoryTestCase):
    def test_slow_redis_pauses_reading_from_clients(self) -> None:
        """
        When the command connection's send buffer is full (its transport
        pauses the upstream valve), every open client's transport stops
        being read, and frames they send wait; when it drains, reading
        resumes and they are published, nothing dropped.
        """
        memory = self.start()
        first, second = memory.open("s1"), memory.open("s2")
        valve = memory.commands.ready.transport.producer
        self.assertIs(valve, memory.proxy.valve)
        valve.pauseProducing()
        self.assertEqual(first.transport.producerState, "paused")
        self.assertEqual(second.transport.producerState, "paused")
        first.send_frame(b"waits")
        self.assertEqual(memory.redis.published, [])
        valve.resumeProducing()
        self.assertEqual(first.transport.producerState, "producing")
        self.assertEqual(second.transport.producerState, "producing")
        self.assertEqual(memory.redis.published, [(b"session:s1:up", b"waits")])

    def test_opened_while_paused(self) -> None:
        """
        A connection that opens while the valve is closed starts paused,
        and is resumed with the others.
        """
        memory = self.start()
        memory.proxy.valve.pauseProducing()
        client = memory.open()
        self.assertEqual(client.transport.producerState, "paused")
        memory.proxy.valve.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")

    def test_lost_command_connection_resumes_reading(self) -> None:
        """
        When the command connection is lost, clients are read again (their
        messages then fail fast instead of waiting for a buffer that will
        never drain).
        """
        memory = self.start()
        client = memory.open()
        memory.proxy.valve.pauseProducing()
        memory.commands.lose()
        self.assertEqual(client.transport.producerState, "producing")

    def test_slow_consumer_closed_1008(self) -> None:
        """
        A client that stops reading (its transport pauses the protocol)
        is closed with 1008 "slow consumer" once more than
        C{WS_MAX_SEND_BUFFER_BYTES} waits for it; it is counted, and
        nothing more is sent to it.
        """
        memory = self.start(max_send_buffer=1000)
        client = memory.open()
        protocol = client.transport.producer
        self.assertIs(protocol, client.protocol)
        protocol.pauseProducing()
        for i in range(8):
            memory.redis.publish("session:s1:down", b"%03d" % i + b"." * 197)
        frames = client.frames()
        # 204 bytes per frame: the fifth takes it past 1000
        self.assertEqual([f.opcode for f in frames], [TEXT] * 5 + [CLOSE])
        self.assertEqual(frames[-1], Frame(CLOSE, close_payload(1008, b"slow consumer")))
        self.assertEqual(memory.proxy.stats.slow_consumer_closes, 1)

    def test_reading_consumer_kept(self) -> None:
        """
        Only what is sent while the client's transport is paused counts
        toward the cap, and each pause starts from zero: a client that
        keeps reading is never closed, however much it receives.
        """
        memory = self.start(max_send_buffer=1000)
        client = memory.open()
        producer = client.transport.producer

        def publish(n: int) -> None:
            for _ in range(n):
                memory.redis.publish("session:s1:down", b"." * 200)

        publish(6)  # 1224 bytes while reading
        for _ in range(2):
            producer.pauseProducing()
            publish(4)  # 816 bytes while paused
            producer.resumeProducing()
            publish(6)
        self.assertEqual([f.opcode for f in client.frames()], [TEXT] * 26)
        self.assertEqual(memory.proxy.stats.slow_consumer_closes, 0)
        self.assertFalse(client.closed)


class ShutdownTests(AdmissionTestCase):
    def test_going_away(self) -> None:
        """
        At shutdown an open connection is closed with 1001 "server shutting
        down", receives nothing more, and releases its subscription when
        the close completes.
        """
        memory = self.start()
        client = memory.open()
        for protocol in list(memory.proxy.connections):
            protocol.going_away()
        self.assertEqual(client.frames(), [
            Frame(CLOSE, close_payload(1001, b"server shutting down")),
        ])
        memory.redis.publish("session:s1:down", b"late")
        self.assertEqual(client.frames(), [])
        client.send_frame(close_payload(1001), CLOSE)
        self.assertTrue(client.closed)
        self.assertEqual(memory.redis.sent("UNSUBSCRIBE"), [("UNSUBSCRIBE", "session:s1:down")])
        self.assertNothingLeft(memory)

    def test_going_away_during_handshake(self) -> None:
        """
        A connection still in its opening handshake at shutdown is dropped
        at once; its admission ends as 499 with nothing subscribed.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("SUBSCRIBE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        (protocol,) = memory.proxy.connections
        protocol.going_away()
        memory.clock.advance(0)
        self.assertTrue(client.transport.aborted)
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})
        memory.redis.release()
        self.assertNothingLeft(memory)


class HandshakeDeadlineRaceTests(AdmissionTestCase):
    def test_admission_finishing_after_the_deadline_dropped_the_client(self) -> None:
        """
        Autobahn's opening-handshake deadline drops the connection, and the
        admission's last Redis reply arrives before that drop has reached
        the protocol: the client is not "opened" on a dead connection (no
        101, no open count), counted once as 499, nothing stays subscribed,
        nothing is logged as an error.
        """
        memory = self.start(handshake_timeout=1.0)
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("SUBSCRIBE")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        abort = client.transport.abortConnection

        def confirmed_as_it_drops() -> None:
            # the confirmation is read in the same turn as Autobahn's drop
            memory.redis.release()
            abort()

        client.transport.abortConnection = confirmed_as_it_drops
        # past the deadline (Autobahn's timer rounds: up to 2 s more)
        for _ in range(40):
            memory.clock.advance(0.1)
        self.assertTrue(client.transport.lost)
        self.assertEqual(memory.proxy.stats.open_connections, 0)
        self.assertNotIn(b"101 Switching", client.transport.value())
        self.assertEqual(memory.proxy.stats.outcomes.get("accepted", 0), 0)
        self.assertNothingLeft(memory)


class DurableUpstreamTests(MemoryTestCase):
    """
    UPSTREAM=stream on fake Redis links: the appends a connection has in
    flight, acks and nacks, the frames an acknowledging client receives.
    """

    def open_acked(self, memory: Any, session: str = "s1") -> Any:
        memory.redis.authorize(session, "tok")
        client = memory.request(f"/agent/ws/{session}?ack=1", {"Authorization": "Bearer tok"})
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        return client

    def test_in_flight_bound_outlasts_the_valve(self) -> None:
        """
        With UPSTREAM_MAX_IN_FLIGHT appends unanswered, the client's socket
        is no longer read; the upstream valve opening again does not resume
        it (its appends are still in flight); it resumes once half of them
        are answered, and every message is stored in order.
        """
        memory = self.start(upstream="stream", upstream_max_in_flight=4)
        client = memory.open()
        memory.redis.hold("XADD")
        for i in range(3):
            client.send_frame(b"m%d" % i)
        self.assertEqual(client.transport.producerState, "producing")
        client.send_frame(b"m3")
        self.assertEqual(client.transport.producerState, "paused")
        memory.proxy.valve.pauseProducing()
        memory.proxy.valve.resumeProducing()
        self.assertEqual(client.transport.producerState, "paused")
        memory.redis.release("XADD")
        self.assertEqual(client.transport.producerState, "producing")
        [(key, entries)] = memory.redis.streams.items()
        self.assertEqual(key, upstream_stream(upstream_partition("s1", 16)).encode())
        self.assertEqual([fields[b"data"] for _, fields in entries],
                         [b"m0", b"m1", b"m2", b"m3"])
        self.assertEqual(memory.proxy.stats.upstream_in_flight, 0)

    def test_redis_lost_nacks_what_is_in_flight(self) -> None:
        """
        The command connection lost with appends in flight: each is
        answered with a nack ("redis unavailable"), so is a message sent
        while there is no connection, and the socket stays open; once
        Redis is back the message sent again is acked with its entry id.
        """
        memory = self.start(upstream="stream")
        client = self.open_acked(memory)
        memory.redis.hold("XADD")
        client.send_frame(b"a\nfirst")
        client.send_frame(b"b\nsecond")
        memory.commands.lose()
        client.send_frame(b"c\nthird")
        controls = [json.loads(f.payload[1:]) for f in client.frames()]
        self.assertEqual(controls, [
            {"type": "nack", "id": i, "reason": "redis unavailable"} for i in "abc"])
        memory.redis.release("XADD")
        memory.commands.connect()
        client.send_frame(b"a\nfirst")
        [frame] = client.frames()
        self.assertEqual(json.loads(frame.payload[1:]),
                         {"type": "ack", "id": "a", "position": "1-0"})
        self.assertEqual(memory.proxy.stats.upstream_nacks, 3)
        self.assertEqual(memory.proxy.stats.upstream_acks, 1)

    def test_plain_client_closed_1011_when_append_fails(self) -> None:
        """
        A client without ?ack=1 whose message cannot be stored is closed
        with 1011, as with Pub/Sub: it has no other way to learn it.
        """
        memory = self.start(upstream="stream")
        client = memory.open()
        memory.commands.lose()
        client.send_frame(b"lost")
        self.assertEqual([f.close_code for f in client.frames()], [1011])

    def test_backend_messages_to_acknowledging_client(self) -> None:
        """
        An acknowledging client receives backend messages as \\n<message>,
        so that one starting with "!" is not a control frame; a plain
        client of the same session receives them unchanged.
        """
        memory = self.start(upstream="stream")
        acked = self.open_acked(memory)
        plain = memory.open()
        memory.redis.publish("session:s1:down", b"!hello")
        self.assertEqual([f.payload for f in acked.frames()], [b"\n!hello"])
        self.assertEqual([f.payload for f in plain.frames()], [b"!hello"])
