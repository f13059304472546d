"""
Topics (C{TOPICS=true}) under faults, with real processes: real
redis-servers (one with append-only persistence, a Redis Cluster, a
Sentinel deployment), real daemons (C{python -m wsproxy}) killed and
started again, and real WebSocket clients over loopback.

  - L{NumberedTopicTests}: a numbered recoverable topic stream published
    while the daemons its clients are on are SIGKILLed in turn (and, in a
    variant, while Redis is SIGKILLed and restarted from its append-only
    file): every client, resuming each time on the other daemon, ends up
    with every number exactly once, in order.
  - L{ClusterTopicTests}: topics whose slots are on different shards,
    sessions on different shards: plain and recoverable topic messages,
    replay after a reconnect, and joins and leaves through
    C{wsproxy:control}.
  - L{SentinelTopicTests}: a topic keeps delivering after
    C{SENTINEL FAILOVER} (the proxy subscribes it again on the new master).
  - L{SlowConsumerTopicTests}: one socket of a topic that stops reading is
    closed 1008 while the fifty others of the topic get every message.

Every wait is a condition against a generous deadline (a busy 2-core
machine), never a sleep that hopes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional
from urllib.parse import urlencode

import redis as redispy
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from twisted.internet import defer, reactor, task

from wsproxy.names import (
    CONTROL_CHANNEL,
    auth_key,
    down_channel,
    topic_channel,
    topic_history_key,
    topic_meta_key,
    topics_key,
)
from wsproxy.redis.cluster import key_slot

from .support import Client, Daemon, EventLog, connect, free_port, start_daemon, start_rig, wait_for
from .support.cluster import HOST, ClusterSetup
from .support.daemon import EnvTestCase
from .support.http import raw_exchange, stalled_upgrade
from .support.sentinel import RigTestCase, SentinelSetup, wait


async def pause(seconds: float) -> None:
    """
    Between two attempts of a retried step (the reactor runs meanwhile).
    """
    await task.deferLater(reactor, seconds, lambda: None)


def parse(payload: bytes, binary: bool) -> tuple[Optional[dict[str, Any]], bytes, bytes]:
    """
    One frame a C{?labels=1} client received: (the control frame's JSON,
    or None; the data frame's header; its message).
    """
    if not binary and payload.startswith(b"!"):
        return json.loads(payload[1:]), b"", b""
    header, _, message = payload.partition(b"\n")
    return None, header, message


async def metric(port: int, name: str) -> float:
    """
    One unlabelled series of a daemon's C{/metrics}.
    """
    response = await raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    for line in response.decode(errors="replace").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- the numbered stream ------------------------------------------------------


class Slot:
    """
    One of the two daemons of L{NumberedTopicTests}, started again (on
    another port) after each kill.
    """

    def __init__(self, test: "NumberedTopicTests", name: str, env: dict[str, str]) -> None:
        self.test = test
        self.name = name
        self.env = env
        self.daemon: Optional[Daemon] = None
        self.port = 0
        self.starts = 0

    async def start(self) -> None:
        self.daemon = await self.test.start(**self.env)
        self.port = self.test.port
        self.starts += 1

    async def kill(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        daemon.kill()
        await wait_for(lambda: daemon.out.ended.called, timeout=30)

    def url(self, session: str, query: str) -> str:
        return f"ws://127.0.0.1:{self.port}/a/ws/{session}{query}"

    def __repr__(self) -> str:
        return f"<daemon {self.name} :{self.port}>"


class Follower:
    """
    One session's labelled, resuming client of one topic, across
    reconnections: whenever its connection ends it connects again, to the
    other daemon, with the last session position and topic position it
    received (C{?resume=<s>&labels=1&resume_topic=<topic>@<t>}), until
    L{stop}. What it received of the topic: C{numbers} (the messages, as
    integers) and C{seqs} (the sequence numbers of their positions); what
    did not belong: C{unexpected}; every recovery that was not complete:
    C{incomplete}.
    """

    def __init__(self, session: str, topic: str, slots: list[Slot], first: int) -> None:
        self.session = session
        self.topic = topic
        self.label = b"#" + topic.encode()
        self.slots = slots
        self.numbers: list[int] = []
        self.seqs: list[int] = []
        self.unexpected: list[bytes] = []
        self.incomplete: list[dict[str, Any]] = []
        self.session_position: Optional[str] = None
        self.topic_position: Optional[str] = None
        self.topic_recoveries = 0
        self.connections = 0
        self.refusals = 0
        self.client: Optional[Client] = None
        self.on: Optional[Slot] = None
        self._seen = 0
        self._stopping = False
        self.done = defer.ensureDeferred(self._run(first))

    def query(self) -> str:
        if self.session_position is None:
            return "?" + urlencode([("resume", ""), ("labels", "1")])
        params = [("resume", self.session_position), ("labels", "1")]
        if self.topic_position is not None:
            params.append(("resume_topic", f"{self.topic}@{self.topic_position}"))
        return "?" + urlencode(params)

    @property
    def open(self) -> bool:
        client = self.client
        return client is not None and client.state == client.STATE_OPEN

    def read(self) -> None:
        """
        Take the frames the current connection received since the last
        call.
        """
        client = self.client
        if client is None:
            return
        messages = client.messages
        for payload, binary in messages[self._seen:]:
            control, header, message = parse(payload, binary)
            if control is not None:
                if control.get("type") != "recovery":
                    continue
                if not control["recovered"]:
                    self.incomplete.append(control)
                if "topic" not in control:
                    self.session_position = control["position"]
                elif control["topic"] == self.topic:
                    self.topic_recoveries += 1
                    # with a replay, the position is where it ends: the
                    # replayed frames carry their own (the connection may
                    # end half-way through them)
                    if control["replayed"] == 0:
                        self.topic_position = control["position"]
                else:
                    self.unexpected.append(payload)
                continue
            label, _, position = header.partition(b" ")
            if label != self.label or not position:
                self.unexpected.append(payload[:100])
                continue
            self.numbers.append(int(message))
            self.seqs.append(int(position.rsplit(b"-", 1)[1]))
            self.topic_position = position.decode()
        self._seen = len(messages)

    async def _run(self, index: int) -> None:
        while not self._stopping:
            slot = self.slots[index]
            try:
                client = await connect(slot.url(self.session, self.query()), token="tok")
            except Exception:
                # that daemon is down or not ready (503): the other one
                self.refusals += 1
                index = 1 - index
                await pause(0.1)
                continue
            self.client, self.on, self._seen = client, slot, 0
            self.connections += 1
            if self._stopping:
                client.sendClose(1000)
            await client.factory.closed
            self.read()
            self.client = self.on = None
            index = 1 - index

    async def stop(self) -> None:
        self._stopping = True
        client = self.client
        if client is not None:
            self.read()
            if client.state == client.STATE_OPEN:
                client.sendClose(1000)
        await self.done


class Publisher:
    """
    A backend publishing C{1}, C{2}, ... on a topic's recoverable stream
    (C{FCALL wsproxy_publish}), one every C{interval} seconds, up to
    C{limit}. After an error (Redis restarting) the topic's meta says
    whether the last one was stored (its C{seq} is the last number): each
    number is published exactly once.
    """

    def __init__(self, r: redispy.Redis, topic: str, interval: float = 0.01) -> None:
        self.r = r
        self.history = topic_history_key(topic, tagged=False)
        self.meta = topic_meta_key(topic, tagged=False)
        self.limit = 0
        self.published = 0
        self.errors = 0
        self._uncertain = False
        self._loop = task.LoopingCall(self._tick)

    def start(self) -> None:
        self._loop.start(0.01, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        try:
            if self._uncertain:
                self.published = int(self.r.hget(self.meta, "seq") or 0)
                self._uncertain = False
            if self.published >= self.limit:
                return
            self.r.fcall("wsproxy_publish", 2, self.history, self.meta,
                         str(self.published + 1), "text")
            self.published += 1
        except redispy.RedisError:
            self.errors += 1
            self._uncertain = True

    async def reach(self, n: int, timeout: float = 60.0) -> None:
        self.limit = max(self.limit, n)
        await wait_for(lambda: self.published >= n, timeout=timeout)


class NumberedTopicTests(EnvTestCase):
    """
    Two daemons (TOPICS=true, RESUME=true) on one redis-server with
    append-only persistence (a restart keeps the topic's history and
    meta), twenty sessions in one topic, each with one labelled resuming
    client.
    """

    timeout = 240
    redis_args = ("--appendonly", "yes", "--appendfsync", "always")

    TOPIC = "news"
    SESSIONS = 20
    N = 300

    async def rig(self) -> tuple[list[Slot], list[Follower], Publisher]:
        env = {"TOPICS": "true", "RESUME": "true", "AUTH_TIMEOUT_SECS": "10"}
        slots = [Slot(self, "A", env), Slot(self, "B", env)]
        for slot in slots:
            await slot.start()
        await wait_for(lambda: self.r.function_list(), timeout=30)
        for i in range(self.SESSIONS):
            self.r.set(f"session:s{i}:auth", "tok", ex=600)
            self.r.sadd(f"session:s{i}:topics", self.TOPIC)
        followers = [Follower(f"s{i}", self.TOPIC, slots, i % 2) for i in range(self.SESSIONS)]
        for follower in followers:
            self.addCleanup(follower.stop)

        def all_in() -> bool:
            for f in followers:
                f.read()
            return all(f.open and f.topic_position is not None for f in followers)

        await wait_for(all_in, timeout=60)
        # its own client: no retries that would block the reactor while
        # Redis is down
        backend = redispy.Redis(port=self.redis.port, socket_timeout=2,
                                socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        self.addCleanup(backend.close)
        publisher = Publisher(backend, self.TOPIC)
        self.addCleanup(publisher.stop)
        publisher.start()
        return slots, followers, publisher

    async def kill_busiest(self, slots: list[Slot], followers: list[Follower],
                           publisher: Publisher, more: int) -> None:
        """
        SIGKILL the daemon that holds the most clients while the publisher
        goes on C{more} messages further; wait until every client it held
        is connected to the other one, then start it again.
        """
        victim = max(slots, key=lambda s: sum(f.on is s for f in followers))
        hit = {f: f.connections for f in followers if f.on is victim}
        self.assertTrue(hit, f"no client on {victim}")
        publisher.limit = min(self.N, publisher.published + more)
        await victim.kill()
        await wait_for(lambda: all(f.connections > n and f.open for f, n in hit.items()),
                       timeout=60)
        await victim.start()

    async def finish(self, followers: list[Follower], publisher: Publisher,
                     kills: int) -> None:
        """
        The publisher reaches N; every client received 1..N exactly once,
        in order, each with its position (sequence number N), and never a
        recovery that was not complete.
        """
        await publisher.reach(self.N, timeout=90)

        def caught_up() -> bool:
            for f in followers:
                f.read()
            return all(len(f.numbers) >= self.N for f in followers)

        await wait_for(caught_up, timeout=90)
        for f in followers:
            await f.stop()
        expected = list(range(1, self.N + 1))
        for f in followers:
            self.assertEqual(f.unexpected, [], f.session)
            self.assertEqual(f.incomplete, [], f.session)
            self.assertEqual(f.numbers, expected, f.session)
            self.assertEqual(f.seqs, expected, f.session)
            self.assertGreaterEqual(f.connections, 2, f.session)
        # every kill made its clients resume, each once per connection
        self.assertGreaterEqual(sum(f.connections - 1 for f in followers),
                                self.SESSIONS * (kills - 1))

    async def test_daemons_killed_under_a_numbered_topic(self) -> None:
        """
        A backend publishes 1..300 on a recoverable topic (one every 10 ms)
        while the daemon that holds the most of its twenty clients is
        SIGKILLed four times (each started again before the next kill):
        every client reconnects to the other daemon with its last session
        and topic positions and ends up with 1..300 exactly once and in
        order (frames C{#news <position>}, the position's sequence number
        being the message's), and no recovery says C{recovered: false}.
        """
        slots, followers, publisher = await self.rig()
        for at in (40, 100, 160, 220):
            await publisher.reach(at)
            await self.kill_busiest(slots, followers, publisher, 30)
        await self.finish(followers, publisher, kills=4)
        self.assertEqual([s.starts for s in slots], [3, 3])

    async def test_redis_restarted_under_a_numbered_topic(self) -> None:
        """
        The same with, between two daemon kills, Redis itself SIGKILLed
        while the backend publishes and started again from its append-only
        file (appendfsync always): the clients stay connected, the daemons
        subscribe the topic again and fill the gap from the history; every
        client still ends up with 1..300 exactly once, in order, and no
        recovery is incomplete.
        """
        slots, followers, publisher = await self.rig()
        await publisher.reach(60)
        await self.kill_busiest(slots, followers, publisher, 30)
        await publisher.reach(140)
        connections = [f.connections for f in followers]
        errors = publisher.errors
        # the backend goes on publishing through the outage
        publisher.limit = 170
        self.redis.stop()  # SIGKILL
        await wait_for(lambda: publisher.errors > errors, timeout=30)
        self.redis.start()
        for slot in slots:
            assert slot.daemon is not None
            await slot.daemon.healthy(slot.port, timeout=60)
        await publisher.reach(200)
        # a Redis restart closes no client
        self.assertEqual([f.connections for f in followers], connections)
        self.assertTrue(all(f.open for f in followers))
        await self.kill_busiest(slots, followers, publisher, 30)
        await self.finish(followers, publisher, kills=2)
