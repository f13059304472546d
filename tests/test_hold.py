"""
Holding client messages while a Redis command connection is replaced for a
known reason (L{wsproxy.redis.hold}), with fake connections and a fake
clock: the order, the bounds in time and bytes, the replies, the valve,
and that a link that is connected, or lost for an unknown reason, does what
it did before.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import txredisapi
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import Settings
from wsproxy.redis import cluster as cluster_module
from wsproxy.redis.hold import HOLD_SECS, HoldBudget
from wsproxy.redis.redisendpoint import encode_command
from wsproxy.redis.redislink import RedisLink, RedisUnavailable
from wsproxy.session.backpressure import UpstreamValve


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.aborted = False
        self.producer: Any = "valve"

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        self.closed = True

    def abortConnection(self) -> None:
        self.aborted = True


class FakeProtocol:
    """
    A command connection's lean methods: what is written, in order, with
    the callback of each.
    """

    stuck = False
    sent = answered = 0

    def __init__(self, with_transport: bool = False) -> None:
        self.transport: Optional[FakeTransport] = FakeTransport() if with_transport else None
        self.written: list[tuple[bytes, Callable[[Any], None]]] = []

    def write_raw(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        self.written.append((command, on_reply))

    def publish_raw(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        self.written.append((encode_command(b"PUBLISH", channel, payload), on_reply))

    def spublish_raw(self, channel: bytes, payload: bytes,
                     on_reply: Callable[[Any], None]) -> None:
        self.written.append((encode_command(b"SPUBLISH", channel, payload), on_reply))

    def command_raw(self, args: tuple[bytes, ...], on_reply: Callable[[Any], None]) -> None:
        self.written.append((encode_command(*args), on_reply))

    def answer(self, replies: list[Any]) -> None:
        """
        Redis answers every command written so far, in order.
        """
        written, self.written = self.written, []
        for (_, on_reply), reply in zip(written, replies):
            on_reply(reply)


class Readable:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class HoldTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = Readable()
        self.valve = UpstreamValve([self.client])
        self.budget = HoldBudget(max_bytes=1000, pause=self.valve.hold,
                                 resume=self.valve.release)
        self.link = RedisLink("commands", None, Settings(auth_timeout=5), self.clock)
        self.link.hold_budget = self.budget
        self.old = FakeProtocol(with_transport=True)
        self.link.ready = self.old
        self.replies: list[tuple[str, Any]] = []

    def callback(self, name: str) -> Callable[[Any], None]:
        return lambda reply: self.replies.append((name, reply))

    def connect(self) -> FakeProtocol:
        """
        The next connection becomes usable.
        """
        new = FakeProtocol()
        self.link._connecting = new
        self.link._usable(new)
        return new

    def publish(self, n: int, size: int = 1) -> None:
        self.link.publish(b"session:s:up", b"%d" % n + b"x" * (size - 1), self.callback(f"m{n}"))


class PlainPathTests(HoldTestCase):

    def test_connected_link_writes_at_once(self) -> None:
        """
        With a usable connection nothing is held: each message is written
        on it at once and the clients keep being read.
        """
        self.publish(1)
        self.link.send_encoded(encode_command(b"XADD", b"s", b"*", b"p", b"x"),
                               self.callback("xadd"))
        self.assertEqual([c for c, _ in self.old.written], [
            encode_command(b"PUBLISH", b"session:s:up", b"1"),
            encode_command(b"XADD", b"s", b"*", b"p", b"x"),
        ])
        self.assertFalse(self.link.holding)
        self.assertTrue(self.client.reading)

    def test_unplanned_loss_fails_at_once(self) -> None:
        """
        A connection lost for no known reason (no L{RedisLink.replace}):
        a message fails at once with L{RedisUnavailable}, as before.
        """
        self.link.ready = None
        self.publish(1)
        self.assertEqual(len(self.replies), 1)
        self.assertIsInstance(self.replies[0][1], RedisUnavailable)
        self.assertTrue(self.client.reading)


class ReplaceTests(HoldTestCase):

    def test_held_in_order_then_written_first(self) -> None:
        """
        After L{RedisLink.replace}, messages (PUBLISH, XADD, a token check)
        are held; once the new connection is usable they are written on it
        in the order they came, before anything else, and each reply goes
        to its own callback, in order.
        """
        self.link.replace("+switch-master to 10.0.0.2:6379")
        self.publish(1)
        self.link.send_encoded(encode_command(b"XADD", b"s", b"*", b"p", b"2"),
                               self.callback("m2"))
        self.link.send(self.callback("m3"), b"GET", b"session:s:auth")
        self.publish(4)
        self.assertEqual(self.replies, [])
        self.assertFalse(self.client.reading, "clients are read while messages are held")
        new = self.connect()
        self.assertEqual([c for c, _ in new.written], [
            encode_command(b"PUBLISH", b"session:s:up", b"1"),
            encode_command(b"XADD", b"s", b"*", b"p", b"2"),
            encode_command(b"GET", b"session:s:auth"),
            encode_command(b"PUBLISH", b"session:s:up", b"4"),
        ])
        self.assertTrue(self.client.reading)
        self.publish(5)
        new.answer([1, b"1-1", b"tok", 0, 2])
        self.assertEqual(self.replies, [
            ("m1", 1), ("m2", b"1-1"), ("m3", b"tok"), ("m4", 0), ("m5", 2)])
        self.assertFalse(self.link.holding)
        self.assertEqual((self.budget.held, self.budget.failed, self.budget.holds),
                         (4, 0, 1))
        self.assertEqual(self.budget.bytes, 0)

    def test_old_connection_answers_then_closes(self) -> None:
        """
        What was sent on the replaced connection is answered there, to its
        own callbacks; a PING behind it closes that connection once it is
        answered, and nothing new is written on it.
        """
        self.publish(1)
        self.link.replace("+switch-master to 10.0.0.2:6379")
        self.publish(2)
        self.assertEqual([c for c, _ in self.old.written], [
            encode_command(b"PUBLISH", b"session:s:up", b"1"), encode_command(b"PING")])
        assert self.old.transport is not None
        self.assertIsNone(self.old.transport.producer)
        self.old.answer([1, b"PONG"])
        self.assertTrue(self.old.transport.closed)
        self.assertEqual(self.replies, [("m1", 1)])
        new = self.connect()
        new.answer([3])
        self.assertEqual(self.replies, [("m1", 1), ("m2", 3)])

    def test_replaced_connection_lost_is_no_failure(self) -> None:
        """
        The replaced connection closing is neither counted nor reported as
        a failure, and does not end the hold.
        """
        self.link.replace("+switch-master to 10.0.0.2:6379")
        self.link._lost(self.old, None)
        self.assertEqual(self.link._failures, 0)
        self.publish(1)
        self.assertTrue(self.link.holding)
        self.assertEqual(self.replies, [])

    def test_time_bound(self) -> None:
        """
        No connection within L{HOLD_SECS}: every held message fails with
        L{RedisUnavailable}, in order (the caller closes with 1011 or
        nacks), the clients are read again, and later messages fail at once.
        """
        self.link.replace("+switch-master to 10.0.0.2:6379")
        self.publish(1)
        self.publish(2)
        self.clock.advance(HOLD_SECS - 0.01)
        self.assertEqual(self.replies, [])
        self.clock.advance(0.02)
        self.assertEqual([name for name, _ in self.replies], ["m1", "m2"])
        for _, reply in self.replies:
            self.assertIsInstance(reply, RedisUnavailable)
            self.assertIn("+switch-master", str(reply))
        self.assertTrue(self.client.reading)
        self.publish(3)
        self.assertEqual(self.replies[-1][0], "m3")
        self.assertIsInstance(self.replies[-1][1], RedisUnavailable)
        self.assertEqual((self.budget.failed, self.budget.bytes), (2, 0))

    def test_byte_bound(self) -> None:
        """
        A message that does not fit in the process's bytes fails at once,
        and so does every later one of that hold (a client's messages stay
        in order: a prefix held, the rest failed); those held are still
        written once connected.
        """
        self.link.replace("+switch-master to 10.0.0.2:6379")
        self.publish(1, size=400)
        self.publish(2, size=400)
        self.publish(3, size=400)
        self.publish(4, size=1)
        self.assertEqual([name for name, _ in self.replies], ["m3", "m4"])
        for _, reply in self.replies:
            self.assertIsInstance(reply, RedisUnavailable)
        new = self.connect()
        self.assertEqual(len(new.written), 2)
        new.answer([1, 1])
        self.assertEqual([name for name, _ in self.replies], ["m3", "m4", "m1", "m2"])

    def test_budget_is_shared(self) -> None:
        """
        The byte bound is over every link of the process (a cluster's
        masters): two links holding share it, and clients are read again
        only once both have written what they held.
        """
        other = RedisLink("commands b", None, Settings(auth_timeout=5), self.clock)
        other.hold_budget = self.budget
        self.link.ready = None
        self.link.hold("learning of master a")
        other.hold("learning of master b")
        self.publish(1, size=600)
        other.publish(b"c", b"y" * 600, self.callback("other"))
        self.assertEqual([name for name, _ in self.replies], ["other"])
        other.publish(b"c", b"y", self.callback("other2"))
        self.assertEqual(len(self.replies), 2, "a hold past the bound takes no more")
        self.assertFalse(self.client.reading)
        self.connect()
        self.assertTrue(self.client.reading)

    def test_stop_fails_what_is_held(self) -> None:
        """
        A link stopped while holding fails what it holds.
        """
        self.link.replace("+switch-master to 10.0.0.2:6379")
        self.publish(1)
        self.link.stop()
        self.assertEqual([name for name, _ in self.replies], ["m1"])
        self.assertIsInstance(self.replies[0][1], RedisUnavailable)

    def test_retries_quickly_while_holding(self) -> None:
        """
        While holding, the next connection is tried again every 50 ms (the
        replica a failover chose answers ROLE "slave" until promoted);
        otherwise the usual back-off applies.
        """
        self.link._failures = 5
        self.assertEqual(self.link._retry_delay(5), 1.0)
        self.link.replace("+selected-slave 10.0.0.2:6379")
        self.assertEqual(self.link._retry_delay(5), 0.05)

    def test_subscriber_is_not_held(self) -> None:
        """
        A subscriber link is only dropped: it has no client messages.
        """
        link = RedisLink("subscriber", None, Settings(auth_timeout=5), self.clock,
                         subscriber=True)
        proto = FakeProtocol(with_transport=True)
        link.ready = proto
        link.replace("+switch-master to 10.0.0.2:6379")
        self.assertFalse(link.holding)
        assert proto.transport is not None
        self.assertTrue(proto.transport.aborted)


class ValveTests(SynchronousTestCase):

    def test_hold_outlasts_a_drained_buffer(self) -> None:
        """
        While messages are held, a command connection's buffer draining (or
        the connection being lost) does not resume the clients; releasing
        the hold does, unless a cluster master's buffer is still full.
        """
        client = Readable()
        valve = UpstreamValve([client])
        valve.hold()
        valve.resumeProducing()
        self.assertFalse(client.reading)
        share = valve.share()
        share.pauseProducing()
        valve.release()
        self.assertFalse(client.reading)
        share.resumeProducing()
        self.assertTrue(client.reading)


class ClusterHoldTests(HoldTestCase):
    """
    On a cluster, a master learned of while serving (a MOVED, a new slot
    map) holds what is sent to it until its connection is ready.
    """

    A = ("10.0.0.1", 6379)
    B = ("10.0.0.2", 6379)

    def setUp(self) -> None:
        super().setUp()
        self.patch(cluster_module.Shard, "start", lambda shard: None)
        self.cluster = cluster_module.Cluster(
            self.clock, Settings(redis_cluster=True, auth_timeout=5), "test")
        self.patch(self.cluster, "refresh", lambda: None)
        self.cluster.hold_budget = self.budget
        self.cluster.apply(cluster_module.SlotMap(
            owners=(self.A,) * cluster_module.SLOTS, masters=(self.A,), nodes=(self.A,)))
        self.a = FakeProtocol()
        self.cluster.shards[self.A].commands.ready = self.a

    def test_first_masters_are_not_held(self) -> None:
        """
        The masters of the first slot map are not held for: before them
        nothing was served (no client to keep).
        """
        self.assertFalse(self.cluster.shards[self.A].commands.holding)

    def test_moved_to_a_master_still_connecting(self) -> None:
        """
        A C{MOVED} to a master whose connection is still being made: the
        message, and those sent to that master after it, are held and
        written there in order once it is ready, each reply to its own
        callback; no client sees a failure.
        """
        commands = self.cluster.commands
        channel = b"session:s:up"
        slot = cluster_module.key_slot(channel)
        commands.publish(channel, b"1", self.callback("m1"))
        commands.publish(channel, b"2", self.callback("m2"))
        moved = txredisapi.ResponseError(f"MOVED {slot} {self.B[0]}:{self.B[1]}")
        self.a.answer([moved, moved])
        commands.publish(channel, b"3", self.callback("m3"))
        self.assertEqual(self.replies, [])
        link = self.cluster.shards[self.B].commands
        self.assertTrue(link.holding)
        self.assertFalse(self.client.reading)
        new = FakeProtocol()
        link._connecting = new
        link._usable(new)
        self.assertEqual([c for c, _ in new.written], [
            encode_command(b"SPUBLISH", channel, b"%d" % n) for n in (1, 2, 3)])
        new.answer([1, 1, 1])
        self.assertEqual(self.replies, [("m1", 1), ("m2", 1), ("m3", 1)])
        self.assertTrue(self.client.reading)

    def test_master_connection_lost_fails_at_once(self) -> None:
        """
        A known master's connection lost for no known reason (kill -9):
        messages to it fail at once, as before.
        """
        self.cluster.shards[self.A].commands.ready = None
        self.cluster.commands.publish(b"session:s:up", b"1", self.callback("m1"))
        self.assertIsInstance(self.replies[0][1], RedisUnavailable)

    def test_retired_master_answers_before_it_is_stopped(self) -> None:
        """
        A master that a new slot map no longer lists (its replica took
        over) is stopped only once what was sent to it is answered: a
        C{MOVED} then is followed to the new master, whose connection is
        still being made (held), instead of failing with the connection.
        """
        stopped: list[Any] = []
        self.patch(cluster_module.Shard, "stop", lambda shard: stopped.append(shard))
        commands = self.cluster.commands
        channel = b"session:s:up"
        slot = cluster_module.key_slot(channel)
        commands.publish(channel, b"1", self.callback("m1"))
        leaving = self.cluster.shards[self.A]
        self.cluster.apply(cluster_module.SlotMap(
            owners=(self.B,) * cluster_module.SLOTS, masters=(self.B,),
            nodes=(self.A, self.B)))
        self.assertNotIn(self.A, self.cluster.shards)
        self.assertEqual(stopped, [])
        self.assertEqual(self.a.written[-1][0], encode_command(b"PING"))
        moved = txredisapi.ResponseError(f"MOVED {slot} {self.B[0]}:{self.B[1]}")
        self.a.answer([moved, b"PONG"])
        self.assertEqual(stopped, [leaving])
        self.assertEqual(self.replies, [])
        link = self.cluster.shards[self.B].commands
        new = FakeProtocol()
        link._connecting = new
        link._usable(new)
        new.answer([1])
        self.assertEqual(self.replies, [("m1", 1)])
