"""
Topics (TOPICS=true): group channels a backend puts sessions in. In memory
(fake Redis on a Clock: the admission's order and races, decided exactly)
and against a real redis-server with proxies in the test's reactor and
Autobahn clients over loopback (fan-out, framings, resume per topic,
control, events, metrics).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import jwt
import redis as redispy
import txredisapi

from wsproxy.backend import sign_token

from .memory import TEXT, MemoryTestCase
from .support import RedisTestCase, RunningProxy, connect, start_proxy, status_of, wait_for
from .support.clients import EventLog, Received
from .support.http import raw_exchange, upgrade_request


def topic_publish(r: redispy.Redis, topic: str, message: str | bytes) -> str:
    """
    One recoverable topic message, as a backend sends it; its position.
    """
    position = r.fcall("wsproxy_publish", 2, f"topic:{topic}:history", f"topic:{topic}:meta",
                       message)
    return position.decode() if isinstance(position, bytes) else str(position)


def control(r: redispy.Redis, **order: Any) -> None:
    r.publish("wsproxy:control", json.dumps(order))


# -- in memory ------------------------------------------------------------------


class AdmissionTests(MemoryTestCase):
    def open(self, memory: Any, session: str = "s1", query: str = "") -> Any:
        """
        An upgrade with its token in the query: checked in the admission
        (a header token is compared by the site, before the handshake).
        """
        memory.redis.authorize(session, "tok")
        query = query + ("&" if query else "?") + "access_token=tok"
        return memory.request(f"/agent/ws/{session}{query}")

    def test_set_read_beside_the_token_check(self) -> None:
        """
        The session's set is asked for with the token check, before its
        answer (no round trip of its own); the topic's channel is
        subscribed and confirmed before the 101.
        """
        memory = self.start(topics=True)
        memory.redis.sets["session:s1:topics"] = {b"room"}
        memory.redis.hold("EVALSHA", "SUBSCRIBE")
        client = self.open(memory)
        names = [c.name for c in memory.redis.log]
        self.assertEqual(names, ["SMEMBERS", "EVALSHA"])
        memory.redis.release("EVALSHA")
        self.assertEqual(client.read(), b"")
        self.assertIn(("SUBSCRIBE", "topic:room:down"), memory.redis.sent("SUBSCRIBE"))
        memory.redis.release("SUBSCRIBE")
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        memory.redis.publish("topic:room:down", b"hi")
        self.assertEqual([(f.opcode, f.payload) for f in client.frames()], [(TEXT, b"hi")])

    def test_header_token_set_read_beside_the_sites_check(self) -> None:
        """
        A header token, compared by the site before the WebSocket
        handshake: the set is asked for beside that comparison too, not
        after it.
        """
        memory = self.start(topics=True)
        memory.redis.sets["session:s1:topics"] = {b"room"}
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual([c.name for c in memory.redis.log], ["SMEMBERS", "EVALSHA"])
        memory.redis.release("EVALSHA")
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual([c.name for c in memory.redis.log].count("SMEMBERS"), 1)
        memory.redis.publish("topic:room:down", b"hi")
        self.assertEqual([f.payload for f in client.frames()], [b"hi"])

    def test_header_token_refused_labels_never_compared(self) -> None:
        """
        A request the admission refuses before its token check
        (C{?labels=2}) has its header token looked at by nobody: no Redis
        command at all.
        """
        memory = self.start(topics=True)
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1?labels=2", {"Authorization": "Bearer tok"})
        self.assertEqual(client.response().status, "HTTP/1.1 400 Invalid labels parameter")
        self.assertEqual(memory.redis.log, [])

    def test_off_reads_nothing(self) -> None:
        """
        TOPICS=false (the default): no SMEMBERS, the set is ignored, and the
        plain path's commands are as they were (one EVALSHA, one SUBSCRIBE).
        """
        memory = self.start()
        memory.redis.sets["session:s1:topics"] = {b"room"}
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual([c.name for c in memory.redis.log], ["EVALSHA", "SUBSCRIBE"])

    def test_change_during_admission_applied_at_open(self) -> None:
        """
        A backend adds the session to a topic (set, then control message)
        after the proxy read the set but before the connection opened: the
        join is applied at the open, and the socket receives the topic.
        """
        memory = self.start(topics=True)
        memory.redis.hold("SUBSCRIBE")
        client = self.open(memory)
        memory.redis.sets["session:s1:topics"] = {b"late"}
        memory.redis.publish("wsproxy:control", b'{"subscribe": "s1", "topic": "late"}')
        memory.redis.release("SUBSCRIBE")
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        memory.redis.flush()
        memory.redis.publish("topic:late:down", b"joined")
        self.assertEqual([f.payload for f in client.frames()], [b"joined"])

    def test_client_leaving_mid_admission_leaves_nothing(self) -> None:
        """
        A client that leaves while its topic subscriptions are being
        confirmed: 499, nothing stays subscribed, and the process is in no
        topic.
        """
        memory = self.start(topics=True)
        memory.redis.sets["session:s1:topics"] = {b"a", b"b"}
        memory.redis.hold("SUBSCRIBE")
        client = self.open(memory)
        client.leave()
        memory.redis.release("SUBSCRIBE")
        memory.redis.flush()
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})
        self.assertEqual(memory.proxy.hub.channel_count(), 0)
        assert memory.proxy.topics is not None
        self.assertEqual(memory.proxy.topics.feeds, {})
        self.assertEqual(memory.proxy.admitting, {})

    def test_set_of_another_type(self) -> None:
        """
        The backend wrote the topics key as something else than a set: the
        client is admitted without topics (the backend's mistake is a
        warning, not a refused client).
        """
        memory = self.start(topics=True)
        memory.redis.fail("SMEMBERS", _wrongtype())
        client = self.open(memory)
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        assert memory.proxy.topics is not None
        self.assertEqual(memory.proxy.topics.feeds, {})

    def test_refusals(self) -> None:
        """
        ?labels= on a proxy without TOPICS, any value but 1, labels twice,
        and resume_topic without ?resume= and ?labels=1 or malformed: 400
        each, before any Redis command.
        """
        for settings, query, status in (
            ({}, "?labels=1", "400 Topics are not enabled"),
            ({"topics": True}, "?labels=true", "400 Invalid labels parameter"),
            ({"topics": True}, "?labels=1&labels=1", "400 Invalid labels parameter"),
            ({"topics": True, "resume": True}, "?labels=1&resume_topic=a@1:1-1",
             "400 Invalid resume position"),
            ({"topics": True, "resume": True}, "?resume=&resume_topic=a@1:1-1",
             "400 Invalid resume position"),
            ({"topics": True, "resume": True}, "?resume=&labels=1&resume_topic=a@x",
             "400 Invalid resume position"),
            ({"topics": True, "resume": True}, "?resume=&labels=1&resume_topic=a:b@0:0-0",
             "400 Invalid resume position"),
            ({"topics": True, "resume": True},
             "?resume=&labels=1&resume_topic=a@0:0-0&resume_topic=a@0:0-0",
             "400 Invalid resume position"),
        ):
            memory = self.start(**settings)
            client = self.open(memory, query=query)
            self.assertEqual(client.response().status, "HTTP/1.1 " + status, query)
            self.assertNotIn("EVALSHA", [c.name for c in memory.redis.log], query)


def _wrongtype() -> Exception:
    return txredisapi.ResponseError(
        "WRONGTYPE Operation against a key holding the wrong kind of value")


# -- against a real redis-server ------------------------------------------------


class TopicTestCase(RedisTestCase):
    timeout = 60

    def start(self, **settings: Any) -> RunningProxy:
        values: dict[str, Any] = {"topics": True}
        values.update(settings)
        return start_proxy(self, self.redis.url, **values)

    async def client(self, proxy: RunningProxy, session: str, query: str = "",
                     token: str = "tok", topics: tuple[str, ...] = ()) -> Any:
        self.r.set(f"session:{session}:auth", token, ex=300)
        if topics:
            self.r.sadd(f"session:{session}:topics", *topics)
        c = await connect(proxy.url(session, query=query), token=token)
        self.addCleanup(c.close_and_wait)
        return c

    async def functions(self) -> None:
        await wait_for(lambda: "wsproxy" in str(self.r.function_list()))


class FanOutTests(TopicTestCase):
    async def test_one_publish_reaches_every_socket_once(self) -> None:
        """
        One PUBLISH on a topic's channel reaches every socket of every
        session in the topic (two sockets of one session included), once;
        a session not in it gets nothing; the process subscribes the
        channel once (Redis counts one subscriber), builds the frame once,
        and counts a delivery per socket.
        """
        proxy = self.start()
        await proxy.ready()
        members = [await self.client(proxy, s, topics=("room",)) for s in ("a", "b", "c")]
        members.append(await self.client(proxy, "a"))
        outsider = await self.client(proxy, "d", topics=("other",))
        self.assertEqual(self.r.pubsub_numsub("topic:room:down"), [(b"topic:room:down", 1)])
        self.assertEqual(self.r.publish("topic:room:down", "news"), 1)
        await wait_for(lambda: all(len(c.messages) == 1 for c in members))
        self.assertEqual([c.messages for c in members], [[(b"news", False)]] * 4)
        stats = proxy.proxy.stats
        self.assertEqual((stats.topic_messages, stats.topic_frames_built, stats.topic_deliveries),
                         (1, 1, 4))
        self.r.publish("session:a:down", "mine")
        await wait_for(lambda: len(members[0].messages) == 2 and len(members[3].messages) == 2)
        self.assertEqual(outsider.messages, [])
        self.assertIn(b"wsproxy_topics 2.0", stats.render())

    async def test_last_socket_leaving_unsubscribes(self) -> None:
        """
        The topic's channel stays subscribed while any socket of the
        process is in it, and is unsubscribed when the last one closes.
        """
        proxy = self.start()
        await proxy.ready()
        first = await self.client(proxy, "a", topics=("room",))
        second = await self.client(proxy, "b", topics=("room",))
        await first.close_and_wait()
        self.assertEqual(self.r.pubsub_numsub("topic:room:down"), [(b"topic:room:down", 1)])
        await second.close_and_wait()
        await wait_for(lambda: self.r.pubsub_numsub("topic:room:down")
                       == [(b"topic:room:down", 0)])
        assert proxy.proxy.topics is not None
        self.assertEqual(proxy.proxy.topics.feeds, {})

    async def test_framings(self) -> None:
        """
        A plain client gets a topic message as it gets a session message;
        with ?labels=1 as C{#<topic>\\n<message>} (and its session messages
        as C{\\n<message>}); a ?resume= client without labels as
        C{\\n<message>}. One frame built per framing in use.
        """
        proxy = self.start(resume=True)
        await proxy.ready()
        await self.functions()
        plain = await self.client(proxy, "a", topics=("room",))
        labelled = await self.client(proxy, "b", "?labels=1", topics=("room",))
        resuming = await self.client(proxy, "c", "?resume=", topics=("room",))
        await wait_for(lambda: len(resuming.messages) == 1)  # its recovery frame
        self.r.publish("topic:room:down", "t")
        self.r.publish("session:b:down", "s")
        await wait_for(lambda: len(plain.messages) == 1 and len(labelled.messages) == 2
                       and len(resuming.messages) == 2)
        self.assertEqual(plain.messages, [(b"t", False)])
        self.assertEqual(labelled.messages, [(b"#room\nt", False), (b"\ns", False)])
        self.assertEqual(resuming.messages[1], (b"\nt", False))
        self.assertEqual(proxy.proxy.stats.topic_frames_built, 3)

    async def test_binary_and_tagged(self) -> None:
        """
        Frame types follow FRAME_MODE for topics as for sessions: tagged
        payloads lose their tag byte and keep their type, an invalid one is
        dropped and counted.
        """
        proxy = self.start(frame_mode="tagged")
        await proxy.ready()
        c = await self.client(proxy, "a", "?labels=1", topics=("room",))
        self.r.publish("topic:room:down", b"b\x00\xff")
        self.r.publish("topic:room:down", b"xbad")
        self.r.publish("topic:room:down", b"tok")
        await wait_for(lambda: len(c.messages) == 2)
        self.assertEqual(c.messages, [(b"#room\n\x00\xff", True), (b"#room\nok", False)])
        self.assertEqual(proxy.proxy.stats.dropped_down, 1)

    async def test_jwt_topics_claim(self) -> None:
        """
        AUTH_MODE=jwt: a token's C{topics} claim is joined besides the
        session's set; a claim that is not a list of topic names is 403.
        """
        proxy = self.start(auth_mode=("jwt",), jwt_secret="s" * 32)
        await proxy.ready()
        self.r.sadd("session:a:topics", "from-set")
        token = sign_token("s" * 32, "a", topics=["from-claim"])
        c = await connect(proxy.url("a", query="?labels=1"), token=token)
        self.addCleanup(c.close_and_wait)
        self.r.publish("topic:from-claim:down", "1")
        self.r.publish("topic:from-set:down", "2")
        await wait_for(lambda: len(c.messages) == 2)
        self.assertEqual(sorted(c.messages), [(b"#from-claim\n1", False), (b"#from-set\n2", False)])
        # (sign_token refuses to sign it: made by hand)
        bad = jwt.encode({"session_id": "a", "topics": ["a:b"]}, "s" * 32, algorithm="HS256")
        status = status_of(await raw_exchange(proxy.port, upgrade_request(
            "/agent/ws/a", {"Authorization": f"Bearer {bad}"})))
        self.assertEqual(status, 403)

    async def test_set_lives_as_long_as_the_token(self) -> None:
        """
        A connect extends the session's set to AUTH_GRACE_PERIOD_SECS, as
        it does the token (so a client reconnecting within the grace
        period keeps its topics), never shortens it, and gives a set
        without a TTL none.
        """
        proxy = self.start(auth_grace_period=1000)
        await proxy.ready()
        self.r.sadd("session:a:topics", "room")
        self.r.expire("session:a:topics", 60)
        await self.client(proxy, "a")
        await wait_for(lambda: self.r.ttl("session:a:topics") > 900)
        self.r.sadd("session:b:topics", "room")
        self.r.expire("session:b:topics", 5000)
        self.r.sadd("session:c:topics", "room")
        await self.client(proxy, "b")
        c = await self.client(proxy, "c")
        self.r.publish("topic:room:down", "x")
        await wait_for(lambda: len(c.messages) == 1)
        self.assertGreater(self.r.ttl("session:b:topics"), 4000)
        self.assertEqual(self.r.ttl("session:c:topics"), -1)

    async def test_invalid_names_skipped_and_the_cap(self) -> None:
        """
        Names in the set that break the rule are skipped; beyond
        TOPICS_MAX_PER_CONNECTION, the first in sorted order are joined:
        every socket of a session chooses the same ones.
        """
        proxy = self.start(topics_max_per_connection=2)
        await proxy.ready()
        await self.client(proxy, "a", topics=("c", "a", "b", "no:colon", "x" * 129))
        assert proxy.proxy.topics is not None
        self.assertEqual(sorted(proxy.proxy.topics.feeds), ["a", "b"])


class ControlTests(TopicTestCase):
    async def test_subscribe_and_unsubscribe_on_every_instance(self) -> None:
        """
        A backend's subscribe and unsubscribe on wsproxy:control: every
        socket of the session, on each of two proxies, joins and leaves;
        other sessions' sockets are untouched; join and leave events are
        published for each socket, and the leave of a socket's remaining
        topics comes before its close event.
        """
        first, second = self.start(events=("all",)), self.start(events=("all",))
        await first.ready()
        await second.ready()
        events = EventLog(self.r, self)
        a1 = await self.client(first, "a", "?labels=1")
        a2 = await self.client(second, "a", "?labels=1")
        b = await self.client(first, "b", "?labels=1")
        control(self.r, subscribe="a", topics=["x", "y"])
        await wait_for(lambda: self.r.pubsub_numsub("topic:x:down") == [(b"topic:x:down", 2)])
        self.r.publish("topic:x:down", "1")
        await wait_for(lambda: len(a1.messages) == 1 and len(a2.messages) == 1)
        self.assertEqual(b.messages, [])
        control(self.r, unsubscribe="a", topic="x")
        await wait_for(lambda: self.r.pubsub_numsub("topic:x:down") == [(b"topic:x:down", 0)])
        self.r.publish("topic:x:down", "2")
        self.r.publish("topic:y:down", "3")
        await wait_for(lambda: len(a1.messages) == 2 and len(a2.messages) == 2)
        self.assertEqual(a1.messages, [(b"#x\n1", False), (b"#y\n3", False)])
        await a1.close_and_wait()
        await wait_for(lambda: len(events.of("close")) == 1)
        mine = [(e["event"], e.get("topic")) for e in events()
                if e["connection_id"] == events.of("close")[0]["connection_id"]]
        self.assertEqual(mine, [("open", None), ("join", "x"), ("join", "y"), ("leave", "x"),
                                ("leave", "y"), ("close", None)])
        self.assertEqual(first.proxy.stats.topic_changes, 2)

    async def test_malformed_changes_ignored(self) -> None:
        """
        A topic change naming no valid session or topic, or on a proxy
        without TOPICS, is ignored and counted; nothing else happens.
        """
        proxy = self.start()
        plain = start_proxy(self, self.redis.url)
        await proxy.ready()
        await plain.ready()
        c = await self.client(proxy, "a")
        for order in ({"subscribe": "a"}, {"subscribe": "a", "topic": "a:b"},
                      {"subscribe": "a:b", "topic": "t"}, {"subscribe": "a", "topics": []},
                      {"subscribe": "a", "topic": "t", "topics": ["u"]}):
            control(self.r, **order)
        control(self.r, subscribe="a", topic="t")
        await wait_for(lambda: proxy.proxy.stats.control_ignored == 5
                       and plain.proxy.stats.control_ignored == 6)
        self.assertEqual(proxy.proxy.stats.topic_changes, 1)
        self.r.publish("topic:t:down", "joined")
        await wait_for(lambda: c.messages == [(b"joined", False)])


class ResumeTests(TopicTestCase):
    async def test_resume_per_topic(self) -> None:
        """
        A resuming labelled client gets a recovery frame per topic after
        the session's, recoverable topic messages as
        C{#<topic> <position>\\n<message>}, and on reconnecting with
        C{resume_topic=<topic>@<position>} every message after it exactly
        once and in order; non-resuming members get the same recoverable
        messages without a position.
        """
        proxy = self.start(resume=True)
        await proxy.ready()
        await self.functions()
        plain = await self.client(proxy, "p", topics=("room",))
        c = await self.client(proxy, "a", "?resume=&labels=1", topics=("room",))
        got = Received(c)
        await wait_for(lambda: len(got.controls()) == 2)
        self.assertEqual([ctl.get("topic") for ctl in got.controls()], [None, "room"])
        positions = [topic_publish(self.r, "room", f"m{i}") for i in range(5)]
        await wait_for(lambda: len(got.data()) == 5 and len(plain.messages) == 5)
        self.assertEqual([h for h, _, _ in got.data()], [f"#room {p}" for p in positions])
        self.assertEqual(plain.messages, [(b"m%d" % i, False) for i in range(5)])
        session_position = got.controls()[0]["position"]
        c.transport.abortConnection()
        await c.factory.closed
        later = [topic_publish(self.r, "room", f"m{i}") for i in range(5, 9)]
        query = (f"?resume={quote(session_position)}&labels=1"
                 f"&resume_topic={quote('room@' + positions[2])}")
        c2 = await self.client(proxy, "a", query)
        got2 = Received(c2)
        await wait_for(lambda: len(got2.data()) == 6)
        room = [ctl for ctl in got2.controls() if ctl.get("topic") == "room"][0]
        self.assertEqual((room["recovered"], room["replayed"]), (True, 6))
        self.assertEqual(got2.messages(), [b"m%d" % i for i in range(3, 9)])
        self.assertEqual(got2.data()[-1][0], f"#room {later[-1]}")

    async def test_topic_joined_while_open_reports_its_end(self) -> None:
        """
        A resuming client made to join a topic while open gets that
        topic's recovery frame (its position: the end of the topic's
        history), then its recoverable messages with positions.
        """
        proxy = self.start(resume=True)
        await proxy.ready()
        await self.functions()
        before = topic_publish(self.r, "room", "old")
        c = await self.client(proxy, "a", "?resume=&labels=1")
        got = Received(c)
        await wait_for(lambda: len(got.controls()) == 1)
        control(self.r, subscribe="a", topic="room")
        await wait_for(lambda: len(got.controls()) == 2)
        self.assertEqual(got.controls()[1]["position"], before)
        after = topic_publish(self.r, "room", "new")
        await wait_for(lambda: len(got.data()) == 1)
        self.assertEqual(got.data(), [(f"#room {after}", b"new", False)])
