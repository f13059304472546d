"""
L{wsproxy.backend}'s topic methods (C{TOPICS=true}) against a real
redis-server: the keys they write, the channels they publish on and the
shape of the control messages, as docs/guide/backends.md spells them. The
proxy's side of the same contract (joining at admission and on control
messages, delivering) is tested with the daemon in L{tests.test_examples}
and L{tests.test_browser}.

A Redis Cluster client is recognised by its C{get_node_from_key}; the
sharded commands (C{SPUBLISH}, C{SSUBSCRIBE}) also work on a single Redis 7,
so a client class that only adds that method stands in for one here (the
real cluster: L{tests.test_cluster}).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import redis as redispy

from wsproxy.backend import Backend, sign_token
from wsproxy.names import CONTROL_CHANNEL
from wsproxy.session.resume import library

from .support import RedisTestCase


class _ClusterLike(redispy.Redis):
    """
    A single Redis the helper takes for a cluster (it publishes with
    C{SPUBLISH}).
    """

    def get_node_from_key(self, key: str) -> Any:
        return None


class TopicBackendTests(RedisTestCase):
    def listen(self, *channels: str, sharded: bool = False) -> Any:
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self.addCleanup(pubsub.close)
        if sharded:
            pubsub.ssubscribe(*channels)
        else:
            pubsub.subscribe(*channels)
        return pubsub

    def received(self, pubsub: Any, sharded: bool = False) -> list[tuple[str, bytes]]:
        """
        Everything the subscription got within half a second.
        """
        out = []
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            message = (pubsub.get_sharded_message(timeout=0.05) if sharded
                       else pubsub.get_message(timeout=0.05))
            if message and message["type"] in ("message", "smessage"):
                out.append((message["channel"].decode(), message["data"]))
        return out

    def test_publish_topic(self) -> None:
        """
        C{PUBLISH topic:T:down}, bytes unchanged; the number of receivers
        is returned; with hash tags the channel is C{topic:{T}:down}.
        """
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        pubsub = self.listen("topic:news:down", "topic:{news}:down")
        self.assertEqual(backend.publish_topic("news", b"\x00hello"), 1)
        self.assertEqual(Backend(backend.redis, hash_tags=True).publish_topic("news", "tagged"), 1)
        self.assertEqual(backend.publish_topic("nobody-here", "x"), 0)
        self.assertEqual(self.received(pubsub), [
            ("topic:news:down", b"\x00hello"), ("topic:{news}:down", b"tagged"),
        ])

    def test_publish_topic_sharded(self) -> None:
        """
        On a cluster client: C{SPUBLISH topic:T:down} (the proxy listens
        with C{SSUBSCRIBE}), and the control messages with C{SPUBLISH} too.
        """
        client = _ClusterLike(port=self.redis.port)
        self.addCleanup(client.close)
        backend = Backend(client)
        self.assertTrue(backend.sharded)
        pubsub = self.listen("topic:news:down", CONTROL_CHANNEL, sharded=True)
        plain = self.listen("topic:news:down", CONTROL_CHANNEL)
        self.assertEqual(backend.publish_topic("news", "sharded"), 1)
        self.assertEqual(backend.join_topics("s1", "news"), 1)
        got = self.received(pubsub, sharded=True)
        self.assertEqual(got[0], ("topic:news:down", b"sharded"))
        self.assertEqual([c for c, _ in got], ["topic:news:down", CONTROL_CHANNEL])
        self.assertEqual(self.received(plain), [])

    def test_publish_topic_recoverable(self) -> None:
        """
        C{FCALL wsproxy_publish 2 topic:T:history topic:T:meta}: the
        message is in the topic's history, published on C{topic:T:live},
        and its position returned.
        """
        self.r.function_load(library(1000, 300_000), replace=True)
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        live = self.listen("topic:room-7:live")
        first = backend.publish_topic_recoverable("room-7", "one")
        second = backend.publish_topic_recoverable("room-7", b"\x00\xff", kind="binary")
        self.assertRegex(first, r"^[0-9a-f]+:\d+-1$")
        self.assertRegex(second, r"^[0-9a-f]+:\d+-2$")
        self.assertEqual(self.r.xlen("topic:room-7:history"), 2)
        self.assertEqual(self.r.exists("topic:room-7:meta"), 1)
        self.assertEqual(self.r.exists("session:room-7:history"), 0)
        got = self.received(live)
        self.assertEqual([c for c, _ in got], ["topic:room-7:live"] * 2)
        self.assertTrue(got[0][1].endswith(b"one"), got)
        tagged = Backend(backend.redis, hash_tags=True)
        tagged.publish_topic_recoverable("room-7", "tagged")
        self.assertEqual(self.r.xlen("topic:{room-7}:history"), 1)

    def test_join_and_leave(self) -> None:
        """
        C{join_topics}: C{SADD session:{id}:topics}, then on
        C{wsproxy:control} C{{"subscribe": id, "topics": [...]}} (the set
        first: it is already written when the message arrives);
        C{leave_topics}: C{SREM}, then C{{"unsubscribe": ...}}. Repeated
        names are sent once.
        """
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        seen_set: list[set[bytes]] = []
        control = self.listen(CONTROL_CHANNEL)
        self.assertEqual(backend.join_topics("s1", "news", "room-7", "news"), 1)
        seen_set.append(self.r.smembers("session:s1:topics"))
        self.assertEqual(backend.topics("s1"), {"news", "room-7"})
        self.assertEqual(backend.leave_topics("s1", "news"), 1)
        self.assertEqual(self.r.smembers("session:s1:topics"), {b"room-7"})
        self.assertEqual(self.r.ttl("session:s1:topics"), -1)  # none given: none set
        messages = [json.loads(data) for _, data in self.received(control)]
        self.assertEqual(messages, [
            {"subscribe": "s1", "topics": ["news", "room-7"]},
            {"unsubscribe": "s1", "topics": ["news"]},
        ])
        self.assertEqual(seen_set, [{b"news", b"room-7"}])
        # hash tags: the set in the session's slot
        Backend(backend.redis, hash_tags=True).join_topics("s1", "tagged")
        self.assertEqual(self.r.smembers("session:{s1}:topics"), {b"tagged"})

    def test_authorize_with_topics(self) -> None:
        """
        C{authorize(..., topics=[...])}: the token and the set, both with
        the token's TTL; called again, the set is replaced; without
        C{topics} it is left alone; with an empty list it is deleted.
        """
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        token = backend.authorize("s1", ttl=120, topics=["news", "room-7"])
        self.assertEqual(self.r.get("session:s1:auth"), token.encode())
        self.assertEqual(self.r.smembers("session:s1:topics"), {b"news", b"room-7"})
        self.assertTrue(110 <= self.r.ttl("session:s1:topics") <= 120)
        self.assertTrue(110 <= self.r.ttl("session:s1:auth") <= 120)
        backend.authorize("s1", "t2", ttl=60, topics=["alerts"])
        self.assertEqual(self.r.smembers("session:s1:topics"), {b"alerts"})
        self.assertLessEqual(self.r.ttl("session:s1:topics"), 60)
        backend.authorize("s1", "t3")
        self.assertEqual(self.r.smembers("session:s1:topics"), {b"alerts"})
        self.assertEqual(self.r.get("session:s1:auth"), b"t3")
        backend.authorize("s1", "t4", topics=[])
        self.assertEqual(self.r.exists("session:s1:topics"), 0)
        Backend(backend.redis, hash_tags=True).authorize("s2", "t", topics=["x"])
        self.assertEqual(self.r.smembers("session:{s2}:topics"), {b"x"})
        self.assertEqual(self.r.get("session:{s2}:auth"), b"t")

    def test_invalid_topics_are_refused(self) -> None:
        """
        Topic names follow the session-id rule; a bad one raises before
        anything is written or published; a single string where a list is
        wanted is refused rather than split into letters.
        """
        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        for bad in ("", "a b", "a:b", "x" * 129, "*", "é"):
            with self.assertRaises(ValueError):
                backend.publish_topic(bad, "m")
            with self.assertRaises(ValueError):
                backend.publish_topic_recoverable(bad, "m")
            with self.assertRaises(ValueError):
                backend.join_topics("s1", "ok", bad)
            with self.assertRaises(ValueError):
                backend.leave_topics("s1", bad)
            with self.assertRaises(ValueError):
                backend.authorize("s1", "t", topics=["ok", bad])
        with self.assertRaises(ValueError):
            backend.authorize("s1", "t", topics="news")  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            backend.join_topics("s1")
        with self.assertRaises(ValueError):
            backend.join_topics("bad id", "news")
        self.assertEqual(self.r.keys("*"), [])

    def test_sign_token_topics_claim(self) -> None:
        """
        C{sign_token(..., topics=[...])}: a C{topics} claim, a list of the
        names (checked, repeats dropped).
        """
        secret = "x" * 32
        token = sign_token(secret, "s1", topics=["news", "room-7", "news"])
        claims = jwt.decode(token, secret, algorithms=["HS256"])
        self.assertEqual(claims["topics"], ["news", "room-7"])
        self.assertNotIn("topics", jwt.decode(sign_token(secret, "s1"), secret,
                                              algorithms=["HS256"]))
        with self.assertRaises(ValueError):
            sign_token(secret, "s1", topics=["a b"])
