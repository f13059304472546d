"""
Names, token extraction and the token check's
decision table, with the fake Redis link.
"""

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import load_settings
from wsproxy.session import auth, authn
from wsproxy.session.proxy import check_credentials

from wsproxy import names
from wsproxy.redis.redislink import RedisTimeout, RedisUnavailable, with_deadline
from wsproxy.refusal import Refusal

from .support.fakes import FakeLink, FakeRedis


class PathTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """
        Only /{agent}/ws/{session} is a WebSocket path; parts are
        percent-decoded.
        """
        self.assertEqual(names.parse_ws_path("/a/ws/s"), ("a", "s"))
        self.assertEqual(names.parse_ws_path("/a/ws/s?x=1"), ("a", "s"))
        self.assertEqual(names.parse_ws_path("/a/ws/s%3Ax"), ("a", "s:x"))
        for path in ["/", "/a/ws", "/a/ws/", "/a/wss/s", "/a/ws/s/x", "//ws/s", "a/ws/s"]:
            self.assertIsNone(names.parse_ws_path(path), path)

    def test_session_ids(self) -> None:
        """
        Session ids are 1 to 128 of [A-Za-z0-9._~-]; anything that could
        reach another channel or a pattern is refused.
        """
        for good in ["a", "A-z_0.9~", "x" * 128]:
            self.assertTrue(names.valid_session_id(good), good)
        for bad in ["", "x" * 129, "a:b", "a*", "a?", "a[b]", "a b", "é", "a\n", "a/b"]:
            self.assertFalse(names.valid_session_id(bad), bad)

    def test_channel_names(self) -> None:
        self.assertEqual(names.auth_key("s"), "session:s:auth")
        self.assertEqual(names.down_channel("s"), "session:s:down")
        self.assertEqual(names.up_channel("s"), b"session:s:up")


class ExtractTests(SynchronousTestCase):
    def test_header(self) -> None:
        """
        Authorization: Bearer <token> (scheme case-insensitive).
        """
        c = auth.extract_token({"authorization": "bearer abc"}, {}, [])
        self.assertEqual(c, auth.Credentials("abc", "header"))

    def test_query(self) -> None:
        """
        ?access_token=<token> (RFC 6750 section 2.3).
        """
        c = auth.extract_token({}, {"access_token": ["q"]}, [])
        self.assertEqual(c, auth.Credentials("q", "query"))

    def test_subprotocol(self) -> None:
        """
        Sec-WebSocket-Protocol: bearer, <token>.
        """
        c = auth.extract_token({}, {}, ["bearer", "tok"])
        self.assertEqual(c, auth.Credentials("tok", "subprotocol"))

    def test_precedence_and_absence(self) -> None:
        """
        The header wins; a Basic header, a lone "bearer" subprotocol or an
        empty parameter is no token.
        """
        c = auth.extract_token({"authorization": "Bearer h"}, {"access_token": ["q"]},
                               ["bearer", "s"])
        self.assertEqual(c.token, "h")
        self.assertIsNone(auth.extract_token({"authorization": "Basic x"}, {}, []))
        self.assertIsNone(auth.extract_token({}, {"access_token": [""]}, ["bearer"]))


def fake_link(data: dict[str, bytes], error: Any = None,
              expire_result: Optional[int] = None) -> FakeLink:
    """
    A connected fake Redis link whose server holds C{data}; every command
    fails with C{error} if one is given, and EXPIRE answers
    C{expire_result} if one is given (the token check without its script:
    see test_memory's TokenScriptTests for the script).
    """
    redis = FakeRedis()
    redis.data.update(data)
    if error is not None:
        for name in ("GET", "EXPIRE"):
            redis.fail(name, error)
    if expire_result is not None:
        redis.reply("EXPIRE", expire_result)
    link = FakeLink("commands", redis, Clock())
    link.start()
    return link


def calls(link: FakeLink) -> list[tuple[Any, ...]]:
    """
    The commands the link sent, numbers as numbers.
    """
    return [args[:2] + tuple(int(a) for a in args[2:]) for args in link.sent()]


class CheckTests(SynchronousTestCase):
    def check(self, redis: FakeLink, token: Any) -> Any:
        """
        The admission's check (L{check_credentials}) with Redis tokens, on
        the GET path (no script); no token is L{Proxy.authorize}'s 401.
        """
        if token is None:
            return defer.fail(authn.MISSING_TOKEN)
        settings = load_settings({}, environ={}, dotenv_path=None)
        authenticator = authn.Authenticator(settings, redis.send, None, None)
        return check_credentials(authenticator, "s1", "a", auth.Credentials(token, "header"))

    def refusal(self, redis: FakeLink, token: Any) -> Refusal:
        f = self.failureResultOf(self.check(redis, token), Refusal)
        return f.value

    def test_accepted_resets_ttl(self) -> None:
        """
        The right token is accepted and the key's TTL is set to the grace
        period.
        """
        redis = fake_link({"session:s1:auth": b"tok"})
        self.successResultOf(self.check(redis, "tok"))
        self.assertEqual(calls(redis)[-1], ("EXPIRE", "session:s1:auth", 10800))

    def test_missing_token_401(self) -> None:
        """
        No token: 401 with WWW-Authenticate, and Redis is not asked.
        """
        redis = fake_link({})
        r = self.refusal(redis, None)
        self.assertEqual(r.code, 401)
        self.assertIn(("WWW-Authenticate", 'Bearer realm="wsproxy"'), r.headers)
        self.assertEqual(calls(redis), [])

    def test_wrong_or_unknown_token_403_without_expire(self) -> None:
        """
        A wrong token or a missing key is 403 and the key is not touched.
        """
        for data in ({"session:s1:auth": b"tok"}, {}):
            redis = fake_link(data)
            self.assertEqual(self.refusal(redis, "nope").code, 403)
            self.assertEqual([c[0] for c in calls(redis)], ["GET"])

    def test_key_expired_between_get_and_expire(self) -> None:
        """
        If EXPIRE finds no key, the token has just expired: 403.
        """
        redis = fake_link({"session:s1:auth": b"tok"}, expire_result=0)
        self.assertEqual(self.refusal(redis, "tok").code, 403)

    def test_redis_errors_propagate(self) -> None:
        """
        Redis failures are not the token check's to decide: they propagate
        unchanged (the admission answers 503/504, see test_admission).
        """
        self.failureResultOf(self.check(fake_link({}, RedisUnavailable()), "t"), RedisUnavailable)
        self.failureResultOf(self.check(fake_link({}, RedisTimeout()), "t"), RedisTimeout)

    def test_deadline(self) -> None:
        """
        with_deadline turns a Deferred that does not fire in time into
        RedisTimeout.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        d = with_deadline(defer.Deferred(), 5, clock)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.failureResultOf(d, RedisTimeout)

    def test_compare(self) -> None:
        """
        Tokens compare as exact bytes; a non-bytes reply never matches.
        """
        self.assertTrue(auth.tokens_match(b"t\xc3\xa9", "té"))
        self.assertFalse(auth.tokens_match(b"tok", "tok "))
        self.assertFalse(auth.tokens_match(None, ""))
