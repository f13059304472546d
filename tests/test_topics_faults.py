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
    replay after a reconnect, joins and leaves through C{wsproxy:control};
    and a numbered topic stream through the kill of its slot's master
    and through the migration of its slot.
  - L{SentinelTopicTests}: a topic keeps delivering after
    C{SENTINEL FAILOVER} (the proxy subscribes it again on the new
    master); a numbered topic stream through a failover and a kill -9 of
    the master.
  - L{SlowConsumerTopicTests}: one socket of a topic that stops reading is
    closed 1008 while the fifty others of the topic get every message.
  - L{JoinWhileOpenTests}: a socket joining a topic while open costs a
    read of the history's end, not of the history.

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


class At:
    """
    A daemon that is not restarted, as a L{Follower} connects to it.
    """

    def __init__(self, port: int) -> None:
        self.port = port

    def url(self, session: str, query: str) -> str:
        return f"ws://127.0.0.1:{self.port}/a/ws/{session}{query}"


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

    def __init__(self, session: str, topic: str, slots: list[Any], first: int) -> None:
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


async def all_joined(followers: list[Follower], timeout: float = 60.0) -> None:
    """
    Every follower is connected and has its topic's recovery frame (it is
    in the topic).
    """
    def joined() -> bool:
        for f in followers:
            f.read()
        return all(f.open and f.topic_position is not None for f in followers)

    await wait_for(joined, timeout=timeout)


async def all_received(test: Any, followers: list[Follower], n: int,
                       timeout: float = 90.0) -> None:
    """
    Every follower receives C{n} messages; then they stop, and each
    received 1..C{n} exactly once and in order, each with its position
    (whose sequence number is the message's), nothing else, and never a
    recovery that was not complete.
    """
    def caught_up() -> bool:
        # (the last message, or as many as expected: a loss or a repeat
        # shows in the comparisons below rather than as a timeout)
        for f in followers:
            f.read()
        return all(len(f.numbers) >= n or f.numbers[-1:] == [n] for f in followers)

    def short() -> str:
        return "; ".join(f"{f.session}: {len(f.numbers)} received, last {f.numbers[-1:]}, "
                         f"{f.connections} connections" for f in followers
                         if len(f.numbers) < n)

    await wait(caught_up, timeout, f"every follower to receive {n} messages", short)
    for f in followers:
        await f.stop()
    expected = list(range(1, n + 1))
    for f in followers:
        test.assertEqual(f.unexpected, [], f.session)
        test.assertEqual(f.incomplete, [], f.session)
        test.assertEqual(f.numbers, expected, f.session)
        test.assertEqual(f.seqs, expected, f.session)


class Publisher:
    """
    A backend publishing C{1}, C{2}, ... on a topic's recoverable stream
    (C{FCALL wsproxy_publish}), one every C{interval} seconds, up to
    C{limit}, on the client C{connect} gives (asked again after an error:
    Redis restarting, a cluster master replaced). After an error the
    topic's meta says whether the last one was stored (its C{seq} is the
    last number): each number is published exactly once. With C{replicas},
    each publish is followed by C{WAIT replicas}: what the backend was told
    is stored survives a failover.
    """

    def __init__(self, connect: Callable[[], redispy.Redis], topic: str, tagged: bool = False,
                 replicas: int = 0, interval: float = 0.01) -> None:
        self._connect = connect
        self._client: Optional[redispy.Redis] = None
        self.history = topic_history_key(topic, tagged=tagged)
        self.meta = topic_meta_key(topic, tagged=tagged)
        self.replicas = replicas
        self.interval = interval
        self.limit = 0
        self.published = 0
        self.errors = 0
        self._uncertain = False
        self._loop = task.LoopingCall(self._tick)

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _tick(self) -> None:
        try:
            if self._client is None:
                self._client = self._connect()
            r = self._client
            if self._uncertain:
                self.published = int(r.hget(self.meta, "seq") or 0)
                self._uncertain = False
            if self.published >= self.limit:
                return
            pipe = r.pipeline(transaction=False)
            pipe.fcall("wsproxy_publish", 2, self.history, self.meta,
                       str(self.published + 1), "text")
            if self.replicas:
                pipe.execute_command("WAIT", self.replicas, 500)
            replies = pipe.execute()
            if self.replicas and replies[1] < self.replicas:
                raise redispy.ConnectionError("not replicated")
            self.published += 1
        except redispy.RedisError:
            self.errors += 1
            self._uncertain = True
            if self._client is not None:
                self._client.close()
                self._client = None

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
        await all_joined(followers)
        # its own client: no retries that would block the reactor while
        # Redis is down
        publisher = Publisher(lambda: redispy.Redis(
            port=self.redis.port, socket_timeout=2, socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0)), self.TOPIC)
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
        The publisher reaches N; every client received 1..N as
        L{all_received} says, and every one of them was on a killed daemon
        at least once.
        """
        await publisher.reach(self.N, timeout=90)
        await all_received(self, followers, self.N)
        for f in followers:
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


# -- Redis Cluster ------------------------------------------------------------


class Labelled:
    """
    What one C{?labels=1} client received: control frames (parsed) and
    data frames (header, message), in order.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    def frames(self) -> list[tuple[Optional[dict[str, Any]], bytes, bytes]]:
        return [parse(payload, binary) for payload, binary in self.client.messages]

    def controls(self) -> list[dict[str, Any]]:
        return [c for c, _, _ in self.frames() if c is not None]

    def data(self) -> list[tuple[bytes, bytes]]:
        return [(h, m) for c, h, m in self.frames() if c is None]

    def recovery(self, topic: Optional[str] = None) -> list[dict[str, Any]]:
        return [c for c in self.controls()
                if c.get("type") == "recovery" and c.get("topic") == topic]

    def position(self, topic: str) -> str:
        """
        The last position received on C{topic}: its last data frame's, or
        its recovery's.
        """
        label = b"#" + topic.encode() + b" "
        for header, _ in reversed(self.data()):
            if header.startswith(label):
                return header[len(label):].decode()
        return self.recovery(topic)[-1]["position"]


class ClusterTopicTests(RigTestCase):
    """
    One daemon on a three-master Redis Cluster (REDIS_CLUSTER=true,
    KEY_HASH_TAGS=true, TOPICS=true, RESUME=true).
    """

    async def cluster_daemon(self) -> tuple[ClusterSetup, int]:
        """
        The rig, and the daemon on it (its port) once healthy and the
        functions are loaded on every master.
        """
        setup = start_rig(self, ClusterSetup())
        port = free_port()
        daemon = start_daemon(self, {
            "HOST": "127.0.0.1", "PORT": str(port), "SHUTDOWN_DRAIN_SECS": "0",
            "REDIS_URL": setup.url, "REDIS_CLUSTER": "true", "KEY_HASH_TAGS": "true",
            "TOPICS": "true", "RESUME": "true", "AUTH_TIMEOUT_SECS": "10",
        })
        await daemon.healthy(port, timeout=60)
        for address in setup.masters():
            await wait(lambda: setup.node_at(address).call("FUNCTION", "LIST"), 30,
                       f"the functions on {address}")
        return setup, port

    def backend(self, setup: ClusterSetup) -> RedisCluster:
        nodes = [ClusterNode(HOST, n.port) for n in setup.nodes]
        client = RedisCluster(startup_nodes=nodes, socket_timeout=5, socket_connect_timeout=5)
        self.addCleanup(client.close)
        return client

    async def test_topics_across_shards(self) -> None:
        """
        Three topics whose slots are on the three masters, six sessions two
        per master, each session in two of the topics with a plain and a
        labelled resuming socket: C{SPUBLISH topic:{T}:down} reaches every
        socket of T's sessions (plain as is, labelled as C{#T}) and no
        other (the delivery count is exact); C{FCALL wsproxy_publish} on
        C{topic:{T}:history} reaches the plain sockets as is and the
        labelled ones with the position it returned; labelled sockets that
        reconnect with C{resume_topic=} per topic get what was published
        meanwhile replayed (recovered, C{replayed: 2}) then live. A
        C{subscribe} SPUBLISHed on C{wsproxy:control} makes a session join
        a topic on another shard (its recovery frame, then plain and
        recoverable messages); an C{unsubscribe} makes it leave (the next
        message reaches the topic's other sessions, not it).
        """
        setup, port = await self.cluster_daemon()
        backend = self.backend(setup)
        owners = setup.owners()
        masters = setup.masters()
        self.assertEqual(len(masters), 3)

        def spread(prefix: str, per_master: int, channel: Callable[[str], str]) -> list[str]:
            found: dict[Any, list[str]] = {m: [] for m in masters}
            n = 0
            while any(len(v) < per_master for v in found.values()):
                name = f"{prefix}{n}"
                n += 1
                owner = owners[key_slot(channel(name).encode())]
                if len(found[owner]) < per_master:
                    found[owner].append(name)
            return [name for names in found.values() for name in names]

        topics = spread("t", 1, lambda t: topic_channel(t, tagged=True))
        sessions = spread("s", 2, lambda s: down_channel(s, tagged=True))
        # session i is in topic j unless (i + j) % 3 == 0: two topics each,
        # four sessions on at least two shards in each topic
        member = {s: [t for j, t in enumerate(topics) if (i + j) % 3 != 0]
                  for i, s in enumerate(sessions)}
        for s in sessions:
            backend.set(auth_key(s, tagged=True), "tok", ex=600)
            backend.sadd(topics_key(s, tagged=True), *member[s])

        def url(session: str, query: str = "") -> str:
            return f"ws://127.0.0.1:{port}/a/ws/{session}{query}"

        plain: dict[str, Client] = {}
        labelled: dict[str, Labelled] = {}
        for s in sessions:
            plain[s] = await connect(url(s), token="tok")
            self.addCleanup(plain[s].close_and_wait)
            client = await connect(url(s, "?resume=&labels=1"), token="tok")
            self.addCleanup(client.close_and_wait)
            labelled[s] = Labelled(client)
        await wait_for(lambda: all(len(labelled[s].recovery(t)) == 1
                                   for s in sessions for t in member[s]), timeout=30)

        # plain topic messages: every socket of the topic, nobody else
        for t in topics:
            self.assertEqual(backend.spublish(topic_channel(t, tagged=True), f"plain-{t}"), 1)

        def plain_got(s: str) -> set[bytes]:
            return {m for m, _ in plain[s].messages}

        def labelled_got(s: str) -> set[tuple[bytes, bytes]]:
            return set(labelled[s].data())

        expected_plain = {s: {f"plain-{t}".encode() for t in member[s]} for s in sessions}
        expected_labelled = {s: {(f"#{t}".encode(), f"plain-{t}".encode()) for t in member[s]}
                             for s in sessions}
        await wait_for(lambda: all(plain_got(s) >= expected_plain[s]
                                   and labelled_got(s) >= expected_labelled[s]
                                   for s in sessions), timeout=30)
        deliveries = 2 * sum(len(member[s]) for s in sessions)
        self.assertEqual(await metric(port, "wsproxy_topic_deliveries_total"), deliveries)
        for s in sessions:
            self.assertEqual(plain_got(s), expected_plain[s], s)
            self.assertEqual(labelled_got(s), expected_labelled[s], s)

        # recoverable topic messages: on the master of the topic's slot
        def publish(t: str, message: str) -> str:
            position = backend.fcall("wsproxy_publish", 2, topic_history_key(t, tagged=True),
                                     topic_meta_key(t, tagged=True), message, "text")
            return position.decode() if isinstance(position, bytes) else str(position)

        positions: dict[tuple[str, str], str] = {}
        for t in topics:
            for r in ("r1", "r2"):
                positions[t, r] = publish(t, f"{r}-{t}")

        def framed(t: str, r: str) -> tuple[bytes, bytes]:
            return (f"#{t} {positions[t, r]}".encode(), f"{r}-{t}".encode())

        for s in sessions:
            expected_plain[s] |= {f"{r}-{t}".encode() for t in member[s] for r in ("r1", "r2")}
            expected_labelled[s] |= {framed(t, r) for t in member[s] for r in ("r1", "r2")}
        await wait_for(lambda: all(plain_got(s) == expected_plain[s]
                                   and labelled_got(s) == expected_labelled[s]
                                   for s in sessions), timeout=30)
        for s in sessions:
            for t in member[s]:
                mine = [d for d in labelled[s].data() if d[0].startswith(f"#{t} ".encode())]
                self.assertEqual(mine, [framed(t, "r1"), framed(t, "r2")])

        # the labelled sockets go away; the topics go on; they come back
        session_positions = {s: labelled[s].recovery()[-1]["position"] for s in sessions}
        topic_positions = {s: {t: labelled[s].position(t) for t in member[s]} for s in sessions}
        for s in sessions:
            await labelled[s].client.close_and_wait()
        for t in topics:
            for r in ("r3", "r4"):
                positions[t, r] = publish(t, f"{r}-{t}")
        for s in sessions:
            params = [("resume", session_positions[s]), ("labels", "1")] + [
                ("resume_topic", f"{t}@{topic_positions[s][t]}") for t in member[s]]
            client = await connect(url(s, "?" + urlencode(params)), token="tok")
            self.addCleanup(client.close_and_wait)
            labelled[s] = Labelled(client)
        await wait_for(lambda: all(len(labelled[s].data()) == 2 * len(member[s])
                                   for s in sessions), timeout=30)
        for t in topics:
            positions[t, "r5"] = publish(t, f"r5-{t}")
        await wait_for(lambda: all(len(labelled[s].data()) == 3 * len(member[s])
                                   for s in sessions), timeout=30)
        for s in sessions:
            self.assertTrue(all(c["recovered"] for c in labelled[s].controls()), s)
            for t in member[s]:
                (recovery,) = labelled[s].recovery(t)
                self.assertEqual((recovery["replayed"], recovery["position"]),
                                 (2, positions[t, "r4"]))
                mine = [d for d in labelled[s].data() if d[0].startswith(f"#{t} ".encode())]
                self.assertEqual(mine, [framed(t, r) for r in ("r3", "r4", "r5")])
            self.assertEqual(plain_got(s), expected_plain[s] | {
                f"{r}-{t}".encode() for t in member[s] for r in ("r3", "r4", "r5")})

        # a backend's join and leave, on the cluster's wsproxy:control
        def outside(s: str) -> str:
            (t,) = [t for t in topics if t not in member[s]]
            return t

        # a session whose topic to join is on another shard than its own
        joiner = next(s for s in sessions
                      if owners[key_slot(down_channel(s, tagged=True).encode())]
                      != owners[key_slot(topic_channel(outside(s), tagged=True).encode())])
        other = outside(joiner)
        backend.sadd(topics_key(joiner, tagged=True), other)
        self.assertEqual(backend.spublish(
            CONTROL_CHANNEL, json.dumps({"subscribe": joiner, "topic": other})), 1)
        await wait_for(lambda: labelled[joiner].recovery(other), timeout=30)
        (joined,) = labelled[joiner].recovery(other)
        self.assertEqual((joined["recovered"], joined["replayed"], joined["position"]),
                         (True, 0, positions[other, "r5"]))
        self.assertEqual(backend.spublish(topic_channel(other, tagged=True), "joined"), 1)
        positions[other, "r6"] = publish(other, f"r6-{other}")
        await wait_for(lambda: {b"joined", f"r6-{other}".encode()} <= plain_got(joiner)
                       and {(f"#{other}".encode(), b"joined"), framed(other, "r6")}
                       <= labelled_got(joiner), timeout=30)
        backend.srem(topics_key(joiner, tagged=True), other)
        backend.spublish(CONTROL_CHANNEL, json.dumps({"unsubscribe": joiner, "topic": other}))

        async def changes() -> float:
            return await metric(port, "wsproxy_topic_changes_total")

        deadline = time.monotonic() + 30
        while await changes() < 2:
            self.assertLess(time.monotonic(), deadline, "the unsubscribe was not applied")
            await pause(0.05)
        before = (len(plain[joiner].messages), len(labelled[joiner].client.messages))
        backend.spublish(topic_channel(other, tagged=True), "left")
        others = [s for s in sessions if other in member[s]]
        await wait_for(lambda: all(b"left" in plain_got(s) for s in others), timeout=30)
        self.assertEqual((len(plain[joiner].messages), len(labelled[joiner].client.messages)),
                         before)


    async def test_numbered_topic_through_a_killed_master(self) -> None:
        """
        A recoverable topic whose slot's master is SIGKILLed while a
        backend publishes 1..200 on it (each FCALL followed by WAIT 1: what
        it was told is stored is on the replica; then, once the replica is
        promoted, on the new master): the labelled resuming sockets of the
        topic, sessions on every shard, are never closed (the proxy moves
        the topic's subscription to the new master and fills any gap from
        the history there), and each ends up with 1..200 exactly once and
        in order, with no recovery incomplete.
        """
        await self.check_numbered_fault(migrate=False)

    async def test_numbered_topic_through_a_slot_migration(self) -> None:
        """
        The same while the topic's slot (its history, meta and channels)
        migrates to another master: Redis ends the proxy's SSUBSCRIBE
        there, the proxy subscribes the topic on the new owner, and every
        socket still gets 1..200 exactly once, in order, never closed.
        """
        await self.check_numbered_fault(migrate=True)

    async def check_numbered_fault(self, migrate: bool) -> None:
        setup, port = await self.cluster_daemon()
        backend = self.backend(setup)
        owners = setup.owners()
        topic = "numbered"
        slot = key_slot(topic_channel(topic, tagged=True).encode())
        victim = owners[slot]
        assert victim is not None
        sessions: dict[Any, list[str]] = {m: [] for m in setup.masters()}
        n = 0
        while any(len(v) < 2 for v in sessions.values()):
            s = f"s{n}"
            n += 1
            owner = owners[key_slot(down_channel(s, tagged=True).encode())]
            if len(sessions[owner]) < 2:
                sessions[owner].append(s)
        names = [s for group in sessions.values() for s in group]
        for s in names:
            backend.set(auth_key(s, tagged=True), "tok", ex=600)
            backend.sadd(topics_key(s, tagged=True), topic)
        place = At(port)
        followers = [Follower(s, topic, [place, place], 0) for s in names]
        for follower in followers:
            self.addCleanup(follower.stop)
        await all_joined(followers)

        def owner_client() -> redispy.Redis:
            address = setup.owners()[slot]
            assert address is not None
            return setup.node_at(address).client()

        publisher = Publisher(owner_client, topic, tagged=True, replicas=1)
        self.addCleanup(publisher.stop)
        publisher.start()
        await publisher.reach(80)
        publisher.limit = 200
        if migrate:
            target = next(m for m in setup.masters() if m != victim)
            setup.migrate_slot(slot, target)
        else:
            setup.kill_master(victim)
            # the new master will have no replica to wait for
            publisher.replicas = 0
            target = await setup.promotion(victim)
        await publisher.reach(200, timeout=90)
        # the proxy's one subscription of the topic is on its new master
        live = f"topic:{{{topic}}}:live"
        await wait(lambda: setup.node_at(target).call("PUBSUB", "SHARDNUMSUB", live)[1] == 1,
                   30, f"the proxy to subscribe {live} on {target}")
        await all_received(self, followers, 200)
        # never closed
        self.assertEqual([f.connections for f in followers], [1] * len(followers))
        self.assertGreater(publisher.errors, 0, "the fault did not interrupt the publisher")


# -- Redis Sentinel -----------------------------------------------------------


class SentinelTopicTests(RigTestCase):
    """
    One daemon pointed at three sentinels that monitor a master and a
    replica (TOPICS=true).
    """

    async def test_topic_follows_sentinel_failover(self) -> None:
        """
        Sessions in topic T (a plain and a labelled socket) and one that is
        not: after C{SENTINEL FAILOVER} the proxy holds one subscription of
        C{topic:T:down} on the new master (the hub subscribed it again
        there, not merely still on the old master, which now copies the
        new one), every socket of T receives what is published there
        (plain as is, labelled as C{#T}), none of them was closed, and the
        session outside T receives its own messages and none of T's.
        """
        setup = start_rig(self, SentinelSetup())
        port = free_port()
        daemon = start_daemon(self, {
            "HOST": "127.0.0.1", "PORT": str(port), "SHUTDOWN_DRAIN_SECS": "0",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}",
            "REDIS_SENTINELS": setup.addresses(), "REDIS_SENTINEL_MASTER": setup.name,
            "TOPICS": "true",
        })
        await daemon.healthy(port, timeout=60)
        old = setup.master()
        r = old.client()
        self.addCleanup(r.close)
        members = ["s0", "s1", "s2"]
        for s in members + ["outsider"]:
            r.set(f"session:{s}:auth", "tok", ex=600)
        for s in members:
            r.sadd(f"session:{s}:topics", "T")
        self.assertGreaterEqual(r.execute_command("WAIT", 1, 5000), 1,
                                "the tokens and topics did not reach the replica")

        def url(session: str, query: str = "") -> str:
            return f"ws://127.0.0.1:{port}/a/ws/{session}{query}"

        sockets: dict[str, tuple[Client, bytes]] = {}
        for s in members:
            for name, query, label in ((s, "", b""), (f"{s}-labelled", "?labels=1", b"#T\n")):
                client = await connect(url(s, query), token="tok")
                self.addCleanup(client.close_and_wait)
                sockets[name] = (client, label)
        outsider = await connect(url("outsider"), token="tok")
        self.addCleanup(outsider.close_and_wait)

        def got(name: str, message: bytes) -> bool:
            client, label = sockets[name]
            return (label + message, False) in client.messages

        r.publish("topic:T:down", "before")
        await wait_for(lambda: all(got(name, b"before") for name in sockets), timeout=30)

        new = await setup.lose_master(graceful=True)
        await wait(lambda: new.call("PUBSUB", "NUMSUB", "topic:T:down")[1] == 1, 30,
                   f"the proxy to subscribe topic:T:down on {new}", setup.describe)
        r2 = new.client()
        self.addCleanup(r2.close)
        sent = [0]

        def arrived() -> bool:
            # Pub/Sub keeps nothing for a subscription being made again:
            # published again until every socket has one
            if all(any(m.startswith(label + b"after-") for m, _ in client.messages)
                   for client, label in sockets.values()):
                return True
            sent[0] += 1
            r2.publish("topic:T:down", f"after-{sent[0]}")
            return False

        await wait(arrived, 30, f"topic messages through {new}", setup.describe, interval=0.1)
        r2.publish("topic:T:down", "last")
        r2.publish("session:outsider:down", "own")
        await wait_for(lambda: all(got(name, b"last") for name in sockets)
                       and (b"own", False) in outsider.messages, timeout=30)
        self.assertEqual(outsider.messages, [(b"own", False)])
        for client, _ in sockets.values():
            self.assertEqual(client.state, client.STATE_OPEN)
        self.assertFalse(daemon.out.ended.called)
        self.assertNotIn(b"Traceback", daemon.out.output)


    async def test_numbered_topic_through_sentinel_failover(self) -> None:
        """
        RESUME=true: a backend publishes 1..200 on a recoverable topic (on
        whatever the sentinels name master, each FCALL followed by WAIT 1
        until the promotion: what it was told is stored is on the replica)
        through a C{SENTINEL FAILOVER}: the labelled resuming sockets of
        the topic's six sessions are never closed, and each ends up with
        1..200 exactly once and in order, with no recovery incomplete.
        """
        await self.check_numbered_failover(graceful=True)

    async def test_numbered_topic_through_killed_master(self) -> None:
        """
        The same through a kill -9 of the master: the proxy's subscriber is
        cut off until the promotion, and what was published on the new
        master before it subscribed there is filled from the history
        there.
        """
        await self.check_numbered_failover(graceful=False)

    async def check_numbered_failover(self, graceful: bool) -> None:
        setup = start_rig(self, SentinelSetup())
        port = free_port()
        daemon = start_daemon(self, {
            "HOST": "127.0.0.1", "PORT": str(port), "SHUTDOWN_DRAIN_SECS": "0",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}",
            "REDIS_SENTINELS": setup.addresses(), "REDIS_SENTINEL_MASTER": setup.name,
            "TOPICS": "true", "RESUME": "true", "AUTH_TIMEOUT_SECS": "10",
        })
        await daemon.healthy(port, timeout=60)
        old = setup.master()
        r = old.client()
        self.addCleanup(r.close)
        await wait(lambda: r.function_list(), 30, "the functions on the master")
        names = [f"s{i}" for i in range(6)]
        for s in names:
            r.set(f"session:{s}:auth", "tok", ex=600)
            r.sadd(f"session:{s}:topics", "T")
        self.assertGreaterEqual(r.execute_command("WAIT", 1, 5000), 1,
                                "the tokens and topics did not reach the replica")
        place = At(port)
        followers = [Follower(s, "T", [place, place], 0) for s in names]
        for follower in followers:
            self.addCleanup(follower.stop)
        await all_joined(followers)

        def master_client() -> redispy.Redis:
            try:
                return setup.master().client()
            except AssertionError as e:  # the sentinels do not agree yet
                raise redispy.ConnectionError(str(e)) from None

        publisher = Publisher(master_client, "T", replicas=1)
        self.addCleanup(publisher.stop)
        publisher.start()
        await publisher.reach(80)
        publisher.limit = 200
        old = await setup.failover() if graceful else setup.kill_master()
        await setup.promotion(old.address)
        # the old master no longer takes the backend's writes: nothing to
        # wait for until it replicates the new one (if it ever does)
        publisher.replicas = 0
        await publisher.reach(200, timeout=90)
        await all_received(self, followers, 200)
        # never closed
        self.assertEqual([f.connections for f in followers], [1] * len(followers))
        self.assertGreater(publisher.errors, 0, "the failover did not interrupt the publisher")


# -- a slow consumer in a topic ----------------------------------------------


class SlowConsumerTopicTests(EnvTestCase):
    """
    One daemon (TOPICS=true, EVENTS=all, a small WS_MAX_SEND_BUFFER_BYTES),
    fifty-one sessions in one topic.
    """

    timeout = 180

    READERS = 50
    ROUND = 10
    SIZE = 4096

    async def test_slow_socket_of_a_topic_closed_others_served(self) -> None:
        """
        Fifty sockets that read and one that never reads after its 101, all
        in one topic, published to in rounds: after each round every
        reader has every message so far, while the one that does not read
        is still open and its backlog grows (the rounds go on without it),
        until it is closed 1008 as a slow consumer (its close event; the
        only one); the readers then get the rounds after it too, each
        message exactly once and in order, and none of them is closed.
        """
        await self.start(TOPICS="true", EVENTS="all", WS_MAX_SEND_BUFFER_BYTES="65536")
        log = EventLog(self.r, self)
        sessions = [f"r{i}" for i in range(self.READERS)] + ["slow"]
        for s in sessions:
            self.r.set(f"session:{s}:auth", "tok", ex=600)
            self.r.sadd(f"session:{s}:topics", "T")
        readers = []
        for s in sessions[:-1]:
            client = await connect(self.url(s), token="tok", endpoint=self.endpoint())
            self.addCleanup(client.close_and_wait)
            readers.append(client)
        stalled, head = await stalled_upgrade(self, self.port, "/a/ws/slow", "tok")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        await wait_for(lambda: len(log.of("join")) == len(sessions), timeout=30)

        def slow_closed() -> list[dict[str, Any]]:
            return [e for e in log.of("close") if e["session_id"] == "slow"]

        published = 0
        padding = b"x" * self.SIZE

        def publish_round() -> None:
            nonlocal published
            for _ in range(self.ROUND):
                published += 1
                self.r.publish("topic:T:down", b"%d " % published + padding)

        def every_reader_has_all() -> bool:
            return all(len(c.messages) >= published for c in readers)

        rounds = 0
        while not slow_closed():
            self.assertLess(rounds, 500, "the socket that does not read was never closed")
            publish_round()
            rounds += 1
            await wait_for(every_reader_has_all, timeout=30)
        self.assertGreaterEqual(rounds, 3, "closed before its backlog could hold anyone up")
        for _ in range(3):
            publish_round()
            await wait_for(every_reader_has_all, timeout=30)
        (event,) = slow_closed()
        self.assertEqual((event["code"], event["closed_by"]), (1008, "slow_consumer"))
        self.assertEqual([e["session_id"] for e in log.of("close")], ["slow"])
        expected = [b"%d " % n + padding for n in range(1, published + 1)]
        for client in readers:
            self.assertEqual([m for m, _ in client.messages], expected)
            self.assertEqual(client.state, client.STATE_OPEN)
        self.assertEqual(await metric(self.port, "wsproxy_slow_consumer_closes_total"), 1)
        print(f"\n    slow consumer closed after {rounds} rounds "
              f"({rounds * self.ROUND} messages of {self.SIZE} bytes)", flush=True)


# -- a join while open --------------------------------------------------------


class JoinWhileOpenTests(EnvTestCase):
    """
    One daemon (TOPICS=true, RESUME=true).
    """

    async def test_join_reads_only_the_end_of_the_history(self) -> None:
        """
        A labelled resuming socket made to join a topic with a 1 MB history
        (1000 messages of 1000 bytes) by a control C{subscribe}: its
        recovery frame says recovered, nothing replayed, at the history's
        end, and the next message arrives with the next position; to find
        that end Redis sent the proxy a few kilobytes, not the history
        (which it once read whole, for each socket that joined).
        """
        await self.start(TOPICS="true", RESUME="true")
        await wait_for(lambda: self.r.function_list(), timeout=30)

        def publish(message: str) -> str:
            position = self.r.fcall("wsproxy_publish", 2, "topic:big:history",
                                    "topic:big:meta", message, "text")
            return position.decode() if isinstance(position, bytes) else str(position)

        for _ in range(999):
            publish("x" * 1000)
        end = publish("x" * 1000)
        self.r.set("session:s1:auth", "tok", ex=300)
        socket = await connect(self.url("s1") + "?resume=&labels=1", token="tok",
                               endpoint=self.endpoint())
        self.addCleanup(socket.close_and_wait)
        client = Labelled(socket)
        await wait_for(lambda: client.recovery(), timeout=30)

        def sent() -> int:
            return int(self.r.info("stats")["total_net_output_bytes"])

        before = sent()
        self.r.publish(CONTROL_CHANNEL, json.dumps({"subscribe": "s1", "topic": "big"}))
        await wait_for(lambda: client.recovery("big"), timeout=30)
        self.assertLess(sent() - before, 64 * 1024)
        (joined,) = client.recovery("big")
        self.assertEqual((joined["recovered"], joined["replayed"], joined["position"]),
                         (True, 0, end))
        after = publish("next")
        await wait_for(lambda: client.data(), timeout=30)
        self.assertEqual(client.data(), [(f"#big {after}".encode(), b"next")])
        self.assertEqual(int(after.rsplit("-", 1)[1]), 1001)
