"""
Durable upstream (UPSTREAM=stream) against real redis-servers and real
WebSocket clients: client messages appended to the partition streams,
acknowledged (or refused) to clients that opt in with ?ack=1, read by
consumer groups (wsproxy.backend.DurableConsumer, examples/durable_worker.py)
through consumer crashes and a Redis restart with append-only persistence.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Any, Optional

import redis as redispy
from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.backend import DurableConsumer
from wsproxy.names import upstream_partition, upstream_stream
from wsproxy.refusal import Refusal
from wsproxy.session.upstream import InvalidEnvelope, ack_frame, ack_request, split_envelope

from bench.loadtest.wsclient import OP_TEXT, client_frame

from .support import (
    Daemon,
    RedisServer,
    RedisTestCase,
    RunningProxy,
    connect,
    raw_exchange,
    redis_server,
    stalled_socket,
    start_proxy,
    status_of,
    upgrade_request,
    wait_for,
)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def read_head(s: Any) -> bytes:
    """
    (In a thread.) The HTTP response head from a raw socket.
    """
    s.setblocking(True)
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        more = s.recv(1)
        if not more:
            break
        data += more
    return data


class Answers:
    """
    What an acknowledging client was sent: acks and nacks by message id,
    and data frames (their envelope taken off).
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def controls(self) -> list[dict[str, Any]]:
        return [json.loads(p[1:]) for p, binary in self.client.messages
                if not binary and p.startswith(b"!")]

    def acks(self) -> dict[str, str]:
        return {c["id"]: c["position"] for c in self.controls() if c["type"] == "ack"}

    def nacks(self) -> dict[str, str]:
        return {c["id"]: c["reason"] for c in self.controls() if c["type"] == "nack"}

    def answered(self) -> int:
        return sum(1 for c in self.controls() if c["type"] in ("ack", "nack"))

    def data(self) -> list[tuple[bytes, bool]]:
        return [(p.partition(b"\n")[2], binary) for p, binary in self.client.messages
                if binary or not p.startswith(b"!")]


class DurableTestCase(RedisTestCase):
    timeout = 90
    partitions = 4

    def start_proxy(self, redis_url: Optional[str] = None, **settings: Any) -> RunningProxy:
        values: dict[str, Any] = {"upstream": "stream", "upstream_partitions": self.partitions}
        values.update(settings)
        return start_proxy(self, redis_url or self.redis.url, **values)

    async def client(self, proxy: RunningProxy, session: str, query: str = "?ack=1",
                     r: Optional[redispy.Redis] = None) -> Any:
        (r or self.r).set(f"session:{session}:auth", "tok", ex=300)
        c = await connect(proxy.url(session, query=query), token="tok")
        self.addCleanup(c.close_and_wait)
        return c

    def stream(self, session: str) -> str:
        return upstream_stream(upstream_partition(session, self.partitions))

    def stored_ids(self, r: redispy.Redis, session: str) -> list[str]:
        return [fields[b"id"].decode() for _, fields in r.xrange(self.stream(session))
                if b"id" in fields]


class EnvelopeTests(SynchronousTestCase):
    def test_partition_is_crc32_of_the_session_id(self) -> None:
        """
        The partition of a session is the IEEE CRC-32 of its UTF-8 id
        modulo the number of partitions (pinned values, so that another
        language can check its own implementation against them), and its
        stream name carries the partition as a Cluster hash tag.
        """
        self.assertEqual(zlib.crc32(b"session-1"), 0x23C0BE2E)
        self.assertEqual(upstream_partition("session-1", 16), 14)
        self.assertEqual(upstream_partition("abc", 7), 0x352441C2 % 7)
        self.assertEqual(upstream_partition("abc", 1), 0)
        self.assertEqual(upstream_stream(14), "wsproxy:up:{p14}")

    def test_split_envelope(self) -> None:
        """
        An acknowledging client's frame is <id>\\n<message> (the message may
        hold newlines and be empty); no newline, an empty id, a long one or
        one with other characters is refused.
        """
        self.assertEqual(split_envelope(b"m-1\nhello\nworld"), (b"m-1", b"hello\nworld"))
        self.assertEqual(split_envelope(b"a:b.c_~9\n"), (b"a:b.c_~9", b""))
        for bad in (b"hello", b"\nhello", b"x" * 65 + b"\nm", b"a b\nm", b"\xff\nm"):
            self.assertRaises(InvalidEnvelope, split_envelope, bad)

    def test_ack_frame_is_json(self) -> None:
        """
        The ack frame, built without a JSON encoder, is "!" + the JSON
        object a client expects.
        """
        frame = ack_frame(b"a:b.c_~-9", b"1732953600123-42")
        self.assertEqual(frame[:1], b"!")
        self.assertEqual(json.loads(frame[1:]),
                         {"type": "ack", "id": "a:b.c_~-9", "position": "1732953600123-42"})

    def test_ack_request(self) -> None:
        """
        ?ack=1 opts in (beside ?resume=); without it nothing changes;
        another value, or ?ack=1 on a Pub/Sub proxy, is a 400.
        """
        self.assertFalse(ack_request("/a/ws/s", True))
        self.assertFalse(ack_request("/a/ws/s?resume=", True))
        self.assertTrue(ack_request("/a/ws/s?resume=&ack=1", True))
        self.assertTrue(ack_request("/a/ws/s?ack=1", True))
        for uri, enabled in (("/a/ws/s?ack=1", False), ("/a/ws/s?ack=yes", True),
                             ("/a/ws/s?ack=1&ack=1", True)):
            with self.assertRaises(Refusal) as caught:
                ack_request(uri, enabled)
            self.assertEqual(caught.exception.code, 400)


class DurableTests(DurableTestCase):
    async def test_acked_messages_are_stored_with_their_fields(self) -> None:
        """
        Each message of an acknowledging client is appended to its
        session's partition stream with session, agent, connection, frame
        type, payload and its id, and acknowledged with the entry id Redis
        gave it, in order; backend messages reach it as \\n<message>.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy, "s1")
        got = Answers(c)
        for i in range(10):
            if i % 2:
                c.sendMessage(b"m%d\n\x00\xff%d" % (i, i), True)
            else:
                c.sendMessage(("m%d\nhé %d" % (i, i)).encode(), False)
        await wait_for(lambda: got.answered() == 10)
        entries = self.r.xrange(self.stream("s1"))
        self.assertEqual(len(entries), 10)
        acks = [ctl for ctl in got.controls()]
        self.assertEqual([a["type"] for a in acks], ["ack"] * 10)
        self.assertEqual([a["id"] for a in acks], [f"m{i}" for i in range(10)])
        self.assertEqual([a["position"] for a in acks], [e[0].decode() for e in entries])
        for i, (_, fields) in enumerate(entries):
            self.assertEqual(fields[b"session"], b"s1")
            self.assertEqual(fields[b"agent"], b"agent")
            self.assertEqual(fields[b"id"], b"m%d" % i)
            self.assertTrue(fields[b"conn"])
            if i % 2:
                self.assertEqual((fields[b"type"], fields[b"data"]), (b"binary", b"\x00\xff%d" % i))
            else:
                self.assertEqual((fields[b"type"], fields[b"data"]), (b"text", ("hé %d" % i).encode()))
        # nothing was published on :up, nothing stored elsewhere
        others = [upstream_stream(p) for p in range(self.partitions)
                  if upstream_stream(p) != self.stream("s1")]
        self.assertEqual([self.r.exists(k) for k in others], [0] * (self.partitions - 1))
        self.r.publish("session:s1:down", "!not a control frame")
        await wait_for(lambda: got.data())
        self.assertEqual(got.data(), [(b"!not a control frame", False)])
        self.assertEqual(got.controls(), acks)

    async def test_plain_client_in_stream_mode(self) -> None:
        """
        A client that does not ask for acks: its frames are stored whole,
        without an id, it gets no control frame, and backend messages
        reach it unchanged (the plain wire format).
        """
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy, "s2", query="")
        c.sendMessage(b"hello\nworld", False)
        await wait_for(lambda: self.r.xlen(self.stream("s2")) == 1)
        [(_, fields)] = self.r.xrange(self.stream("s2"))
        self.assertNotIn(b"id", fields)
        self.assertEqual(fields[b"data"], b"hello\nworld")
        self.r.publish("session:s2:down", "down")
        await c.wait_messages(1)
        self.assertEqual(c.messages, [(b"down", False)])

    async def test_ack_with_resume(self) -> None:
        """
        ?resume=&ack=1 together: the recovery frame, then the acks (one
        with a 64-character id, whose frame needs a 16-bit length).
        """
        proxy = self.start_proxy(resume=True)
        await proxy.ready()
        await wait_for(lambda: b"wsproxy" in str(self.r.function_list()).encode())
        c = await self.client(proxy, "s3", query="?resume=&ack=1")
        got = Answers(c)
        await wait_for(lambda: got.controls())
        long_id = "L" * 64  # its ack frame is longer than 125 bytes
        c.sendMessage(b"x1\nhi", False)
        c.sendMessage(long_id.encode() + b"\nthere", False)
        await wait_for(lambda: len(got.acks()) == 2)
        self.assertEqual([ctl["type"] for ctl in got.controls()], ["recovery", "ack", "ack"])
        self.assertEqual(self.stored_ids(self.r, "s3"), ["x1", long_id])

    async def test_ack_refused_on_pubsub_proxy(self) -> None:
        """
        ?ack=1 on a proxy with the default UPSTREAM=pubsub is refused with
        400 before Redis is asked.
        """
        proxy = self.start_proxy(upstream="pubsub")
        await proxy.ready()
        self.r.set("session:s1:auth", "tok", ex=300)
        response = await raw_exchange(proxy.port, upgrade_request(
            "/a/ws/s1?ack=1", {"Authorization": "Bearer tok"}))
        self.assertEqual(status_of(response), 400)
        self.assertIn(b"UPSTREAM=stream", response)

    async def test_bad_envelope_closes_1008(self) -> None:
        """
        A frame without <id>\\n from an acknowledging client closes the
        connection with 1008; nothing is stored.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy, "s4")
        c.sendMessage(b"no envelope", False)
        code, _ = await c.factory.closed
        self.assertEqual(code, 1008)
        self.assertEqual(self.r.exists(self.stream("s4")), 0)

    async def test_append_failure_is_nacked(self) -> None:
        """
        An append Redis refuses (maxmemory reached, noeviction) is answered
        with a nack naming the error, nothing is stored or acked, and the
        connection stays open (and the proxy warns, once a minute): the same
        message sent again once Redis has room is acked.
        """
        logged: list[str] = []

        def observe(event: Any) -> None:
            logged.append(formatEvent(event) or "")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy, "s5")
        got = Answers(c)
        self.r.config_set("maxmemory-policy", "noeviction")
        self.r.config_set("maxmemory", "1")
        c.sendMessage(b"m1\nfirst", False)
        await wait_for(lambda: got.nacks())
        self.assertIn("OOM", got.nacks()["m1"])
        warned = [line for line in logged if "could not be appended" in line]
        self.assertEqual(len(warned), 1, logged)
        self.assertIn("session s5: OOM", warned[0])
        self.assertEqual(got.acks(), {})
        self.assertEqual(self.r.exists(self.stream("s5")), 0)
        self.r.config_set("maxmemory", "0")
        c.sendMessage(b"m1\nfirst", False)
        await wait_for(lambda: got.acks())
        self.assertEqual(self.stored_ids(self.r, "s5"), ["m1"])
        self.assertEqual(proxy.proxy.stats.upstream_nacks, 1)
        self.assertEqual(proxy.proxy.stats.upstream_acks, 1)

    async def test_in_flight_bounded_when_redis_is_slow(self) -> None:
        """
        With Redis stopped, a client that keeps sending has at most
        UPSTREAM_MAX_IN_FLIGHT appends in flight (plus what one socket read
        holds) and its socket is no longer read; once Redis answers again
        every message is acked, in order, none lost.
        """
        proxy = self.start_proxy(upstream_max_in_flight=8, auth_timeout=20.0)
        await proxy.ready()
        c = await self.client(proxy, "s6")
        got = Answers(c)
        [server] = proxy.proxy.sessions["s6"]
        most = [0]

        def sample() -> None:
            most[0] = max(most[0], len(server._in_flight))

        sampler = task.LoopingCall(sample)
        sampler.start(0.005)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        self.redis.pause()
        try:
            payload = b"x" * 2000
            for i in range(300):
                c.sendMessage(b"m%d\n" % i + payload, False)
            await wait_for(lambda: server._flight_paused, timeout=30)
            sample()
        finally:
            self.redis.resume()
        await wait_for(lambda: got.answered() == 300, timeout=60)
        sampler.stop()
        # one read is at most 64 KiB: 32 messages of 2 KiB
        self.assertLessEqual(most[0], 8 + 33)
        self.assertGreaterEqual(most[0], 8)
        self.assertEqual(list(got.acks()), [f"m{i}" for i in range(300)])
        self.assertEqual(got.nacks(), {})
        self.assertEqual(self.stored_ids(self.r, "s6"), [f"m{i}" for i in range(300)])


    async def test_client_that_does_not_read_its_acks_is_a_slow_consumer(self) -> None:
        """
        A client that sends and sends but never reads the acks: once more
        than WS_MAX_SEND_BUFFER_BYTES of them wait in a full socket, it is
        closed like any slow consumer (1008), so acks cannot pile up in
        the proxy without bound.
        """
        proxy = self.start_proxy(max_send_buffer=65536)
        await proxy.ready()
        self.r.set("session:s9:auth", "tok", ex=300)
        s = stalled_socket(proxy.port, "/a/ws/s9?ack=1", "tok")
        self.addCleanup(s.close)
        head = await threads.deferToThread(read_head, s)
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        prefix = b"x" * 55  # ids of 56 to 60 characters: acks of about 120 bytes

        def flood() -> None:
            s.setblocking(True)
            s.settimeout(30)
            try:
                for chunk in range(100):
                    s.sendall(b"".join(client_frame(OP_TEXT, prefix + b"%d\nm" % (chunk * 1000 + i))
                                       for i in range(1000)))
            except OSError:
                pass  # closed by the proxy: the point

        sending = threads.deferToThread(flood)
        await wait_for(lambda: proxy.proxy.stats.slow_consumer_closes == 1, timeout=60)
        self.assertGreater(proxy.proxy.stats.upstream_acks, 1000)
        s.close()
        await sending


class RestartTests(DurableTestCase):
    async def test_redis_restart_with_aof_keeps_everything_acked(self) -> None:
        """
        Redis (appendonly yes, appendfsync always) killed with SIGKILL in the
        middle of a burst and started again: every message gets exactly one
        answer, those in flight or sent meanwhile a nack, and every message
        acked to the client, before or after the restart, is in the stream
        afterwards.
        """
        server = redis_server(self, RedisServer("--appendonly", "yes", "--appendfsync", "always"))
        r = server.client()
        self.addCleanup(r.close)
        proxy = self.start_proxy(server.url)
        await proxy.ready()
        c = await self.client(proxy, "s7", r=r)
        got = Answers(c)
        total = 3000
        sent = [0]

        async def burst() -> None:
            while sent[0] < total:
                for _ in range(20):
                    c.sendMessage(b"m%d\npayload %d" % (sent[0], sent[0]), False)
                    sent[0] += 1
                await task.deferLater(reactor, 0.002, lambda: None)

        sending = defer.ensureDeferred(burst())
        await wait_for(lambda: len(got.acks()) >= 300, timeout=30)
        server.stop()  # SIGKILL
        await wait_for(lambda: got.nacks(), timeout=30)
        server.start()
        await sending
        await wait_for(lambda: got.answered() == total, timeout=60)
        acked, nacked = got.acks(), got.nacks()
        self.assertEqual(len(acked) + len(nacked), total)
        self.assertTrue(nacked)
        r2 = server.client()
        self.addCleanup(r2.close)
        stored = set(self.stored_ids(r2, "s7"))
        self.assertEqual(sorted(set(acked) - stored, key=lambda i: int(i[1:])), [])
        # once Redis is back, messages are stored and acked again
        await wait_for(lambda: proxy.proxy.commands.ready is not None, timeout=30)
        c.sendMessage(b"after\nrestart", False)
        await wait_for(lambda: "after" in got.acks(), timeout=30)


class ConsumerTests(DurableTestCase):
    def worker(self, name: str) -> Daemon:
        worker = Daemon(
            [sys.executable, os.path.join(EXAMPLES, "durable_worker.py"),
             "--redis-url", self.redis.url, "--consumer", name,
             "--partitions", str(self.partitions), "--claim-after", "600"],
            {},
        )
        self.addCleanup(worker.stop)
        return worker

    @staticmethod
    def handled(worker: Daemon) -> list[str]:
        # complete lines only: a running worker may be half-way through one
        lines = worker.out.output.decode().split("\n")[:-1]
        return [json.loads(line)["id"] for line in lines if line.startswith("{")]

    async def test_worker_killed_mid_burst_and_restarted(self) -> None:
        """
        examples/durable_worker.py killed with SIGKILL in the middle of a
        burst from three clients and started again under the same name:
        every message acked to a client is handled at least once (counted
        by client message id), none lost.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        clients = [await self.client(proxy, f"k{n}") for n in range(3)]
        first = self.worker("w1")
        await wait_for(lambda: b"ready" in first.out.output, timeout=30)
        per_client = 400
        for i in range(per_client):
            for n, c in enumerate(clients):
                c.sendMessage(b"c%d-%d\nmessage %d" % (n, i, i), False)
            if i % 50 == 49:
                await task.deferLater(reactor, 0.01, lambda: None)
        await wait_for(lambda: len(self.handled(first)) >= 200, timeout=30)
        first.kill()
        await wait_for(lambda: first.out.ended.called, timeout=30)
        before = self.handled(first)
        self.assertLess(len(before), 3 * per_client, "killed too late to prove anything")
        answers = [Answers(c) for c in clients]
        await wait_for(lambda: all(a.answered() == per_client for a in answers), timeout=60)
        acked = {i for a in answers for i in a.acks()}
        self.assertEqual(len(acked), 3 * per_client)
        second = self.worker("w1")
        await wait_for(lambda: acked <= set(before) | set(self.handled(second)), timeout=60)
        await wait_for(lambda: sum(self.r.xpending(upstream_stream(p), "workers")["pending"]
                                   for p in range(self.partitions)) == 0)

    async def test_dead_consumers_pending_entries_are_claimed(self) -> None:
        """
        A consumer that read messages and died before acknowledging them:
        another consumer of the group takes them over with XAUTOCLAIM
        (DurableConsumer.claim) once they are idle long enough, and after
        it acknowledges them nothing is pending.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        dead = DurableConsumer(self.r, "g", "dead", self.partitions)
        dead.create_groups()
        c = await self.client(proxy, "p1")
        got = Answers(c)
        for i in range(20):
            c.sendMessage(b"p%d\nm" % i, False)
        await wait_for(lambda: len(got.acks()) == 20)
        taken = dead.read(count=100, block_ms=100)
        self.assertEqual(len(taken), 20)
        # the dead consumer acknowledges nothing
        alive = DurableConsumer(self.r, "g", "alive", self.partitions)
        self.assertEqual(alive.claim(60_000), [])  # not idle long enough yet
        claimed = await wait_for(lambda: alive.claim(100))
        self.assertEqual(sorted(m.message_id for m in claimed),
                         sorted(f"p{i}" for i in range(20)))
        self.assertEqual([m.session_id for m in claimed], ["p1"] * 20)
        self.assertEqual(alive.ack(*claimed), 20)
        self.assertEqual(self.r.xpending(self.stream("p1"), "g")["pending"], 0)
        # a client's copy of a handled message is recognized by its id
        alive.mark_seen(claimed[0])
        self.assertTrue(alive.seen(claimed[0]))
        self.assertFalse(alive.seen(claimed[1]))
