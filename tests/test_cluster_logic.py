"""
Redis Cluster logic without Redis: slots, redirections, the slot map read
from a C{CLUSTER SHARDS} reply, and which argument routes a command.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import Settings
from wsproxy.metrics import Stats
from wsproxy.redis.cluster import (
    SLOTS,
    Address,
    Cluster,
    SlotMap,
    _command_key,
    key_slot,
    parse_redirect,
    parse_shards,
)
from wsproxy.names import (
    auth_key,
    canary_channel,
    down_channel,
    history_key,
    live_channel,
    meta_key,
    up_channel,
)


def _node(ip: str, port: int, role: str, **extra: object) -> list[object]:
    fields: dict[str, object] = {"id": b"x" * 40, "port": port, "ip": ip.encode(),
                                 "endpoint": ip.encode(), "role": role.encode(),
                                 "replication-offset": 0, "health": b"online"}
    fields.update(extra)
    flat: list[object] = []
    for k, v in fields.items():
        flat += [k.encode(), v]
    return flat


class SlotTests(SynchronousTestCase):
    def test_known_slots(self) -> None:
        """
        key_slot is Redis's: CRC16/XMODEM modulo 16384 (CLUSTER KEYSLOT
        foo = 12182, 123456789 = 12739).
        """
        self.assertEqual(key_slot(b"foo"), 12182)
        self.assertEqual(key_slot(b"123456789"), 12739)

    def test_hash_tags(self) -> None:
        """
        Only the first {...} with something inside counts; an empty {} or
        an unclosed { leaves the whole name hashed.
        """
        self.assertEqual(key_slot(b"{user1000}.following"), key_slot(b"user1000"))
        self.assertEqual(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"))
        self.assertEqual(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"))
        self.assertNotEqual(key_slot(b"foo{}{bar}"), key_slot(b"bar"))
        self.assertEqual(key_slot(b"foo{bar"), key_slot(b"foo{bar"))

    def test_tagged_session_names_share_a_slot(self) -> None:
        """
        With hash tags every name of a session is in one slot; without,
        they spread.
        """
        names = (auth_key, down_channel, history_key, meta_key, live_channel)
        tagged = {key_slot(n("s1", True).encode()) for n in names}
        tagged.add(key_slot(up_channel("s1", True)))
        self.assertEqual(tagged, {key_slot(b"s1")})
        plain = {key_slot(n("s1", False).encode()) for n in names}
        self.assertGreater(len(plain), 1)
        self.assertEqual(auth_key("s1", True), "session:{s1}:auth")
        self.assertEqual(down_channel("s1", False), "session:s1:down")

    def test_canary_channel_tag(self) -> None:
        """
        A shard's canary channel hashes to its tag's slot.
        """
        self.assertEqual(key_slot(canary_channel("p1", "7").encode()), key_slot(b"7"))


class RedirectTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        MOVED and ASK name the slot and the node; anything else is not a
        redirection.
        """
        self.assertEqual(parse_redirect("MOVED 3999 127.0.0.1:6381"),
                         ("MOVED", 3999, ("127.0.0.1", 6381)))
        self.assertEqual(parse_redirect("ASK 1 [::1]:7000"), ("ASK", 1, ("::1", 7000)))
        self.assertIsNone(parse_redirect("ERR unknown command"))
        self.assertIsNone(parse_redirect("MOVED nonsense"))


class ShardsTests(SynchronousTestCase):
    def test_slot_map(self) -> None:
        """
        Each slot range belongs to its shard's master; replicas are known
        nodes but own nothing; a slot no shard lists is unserved.
        """
        reply = [
            [b"slots", [0, 99, 200, 299], b"nodes", [
                _node("10.0.0.1", 7000, "master"), _node("10.0.0.4", 7003, "replica")]],
            [b"slots", [100, 199], b"nodes", [_node("10.0.0.2", 7001, "master")]],
        ]
        slot_map = parse_shards(reply)
        self.assertEqual(slot_map.owners[0], ("10.0.0.1", 7000))
        self.assertEqual(slot_map.owners[250], ("10.0.0.1", 7000))
        self.assertEqual(slot_map.owners[150], ("10.0.0.2", 7001))
        self.assertIsNone(slot_map.owners[300])
        self.assertFalse(slot_map.complete)
        self.assertEqual(slot_map.masters, (("10.0.0.1", 7000), ("10.0.0.2", 7001)))
        self.assertIn(("10.0.0.4", 7003), slot_map.nodes)

    def test_complete_and_tls_port(self) -> None:
        """
        All slots served: complete; with TLS, a node's tls-port is used.
        """
        reply = [[b"slots", [0, SLOTS - 1], b"nodes", [
            _node("10.0.0.1", 7000, "master", **{"tls-port": 7443})]]]
        self.assertTrue(parse_shards(reply).complete)
        self.assertEqual(parse_shards(reply, tls=True).masters, (("10.0.0.1", 7443),))

    def test_failed_master_after_failover(self) -> None:
        """
        A master killed and replaced by its replica: Redis 7.0 lists it as a
        master of a shard without slots, health "fail"; later versions may
        list it in its successor's shard. Either way the successor serves
        the slots and the dead node is a failed master.
        """
        dead, successor = ("10.0.0.1", 7000), ("10.0.0.4", 7003)
        own_shard = [
            [b"slots", [0, SLOTS - 1], b"nodes", [_node("10.0.0.4", 7003, "master")]],
            [b"slots", [], b"nodes", [_node("10.0.0.1", 7000, "master", health=b"fail")]],
        ]
        with_successor = [[b"slots", [0, SLOTS - 1], b"nodes", [
            _node("10.0.0.1", 7000, "master", health=b"fail"),
            _node("10.0.0.4", 7003, "master")]]]
        for reply in (own_shard, with_successor):
            slot_map = parse_shards(reply)
            self.assertEqual(slot_map.masters, (successor,))
            self.assertEqual(slot_map.owners[0], successor)
            self.assertEqual(slot_map.failed, (dead,))
            self.assertEqual(slot_map.failed_masters, (dead,))

    def test_not_a_list(self) -> None:
        """
        A reply of another shape is an error, not a crash.
        """
        self.assertRaises(ValueError, parse_shards, b"OK")


A, B, C = ("10.0.0.1", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 7002)
HALF = SLOTS // 2


def _map(first: Address, second: Address, nodes: tuple[Address, ...] = (A, B, C),
         failed: tuple[Address, ...] = (), failed_masters: tuple[Address, ...] = ()) -> SlotMap:
    return SlotMap(tuple([first] * HALF + [second] * (SLOTS - HALF)), (first, second), nodes,
                   failed=failed, failed_masters=failed_masters)


class MasterLeavesTests(SynchronousTestCase):
    """
    What a L{Cluster} does when a master leaves the slot map (a failover,
    planned or not), with a memory reactor: one warning, the node's links
    stopped, and its wsproxy_cluster_shard_up series.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.cluster = Cluster(self.reactor, Settings(), "p1")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.cluster.apply(_map(A, B))
        self.stats = Stats()
        self.stats.cluster_shards = self.cluster.shard_states

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_level", LogLevel.info) >= LogLevel.warn]

    def shard_up(self) -> dict[str, float]:
        return {labels["shard"]: value for family in self.stats.snapshot()
                if family["name"] == "wsproxy_cluster_shard_up"
                for _, labels, value in family["samples"]}

    def test_killed_master_reads_zero_while_listed_failed(self) -> None:
        """
        A master that died and whose slots its replica serves now: one
        warning naming the successor, however many maps say so (even if a
        stale one names it a master again in between); its links
        are stopped (no reconnection attempts, so no repeated "connection
        failed" errors); its series reads 0 while the cluster lists it as
        failed, and is gone once it is back (as a replica) or forgotten.
        """
        self.assertEqual(self.shard_up(), {"10.0.0.1:7000": 0, "10.0.0.2:7001": 0})
        old = self.cluster.shards[A]
        for _ in range(5):
            self.cluster.apply(_map(C, B, failed=(A,), failed_masters=(A,)))
        self.assertEqual(len(self.warnings()), 1, self.warnings())
        # a node that has not heard of the failover yet, then one that has
        # (the stale view says the successor left: that is warned about)
        self.cluster.apply(_map(A, B, failed=(A,)))
        self.cluster.apply(_map(C, B, failed=(A,), failed_masters=(A,)))
        about_a = [w for w in self.warnings() if "10.0.0.1:7000 is no" in w]
        self.assertEqual(len(about_a), 1, self.warnings())
        self.assertIn("10.0.0.1:7000 is no longer a master (the cluster marks it failed); "
                      "its slots are served by 10.0.0.3:7002; disconnecting",
                      self.warnings()[0])
        self.assertNotIn(A, self.cluster.shards)
        self.assertFalse(old.commands._service.running)
        self.assertFalse(old.subscriber._service.running)
        self.assertEqual(self.shard_up(), {
            "10.0.0.1:7000": 0, "10.0.0.2:7001": 0, "10.0.0.3:7002": 0})
        # restarted: a replica of its successor, online
        self.cluster.apply(_map(C, B))
        self.assertNotIn("10.0.0.1:7000", self.shard_up())
        # or never restarted, and forgotten (CLUSTER FORGET)
        self.cluster.apply(_map(A, B))
        self.cluster.apply(_map(C, B, failed=(A,), failed_masters=(A,)))
        self.assertIn("10.0.0.1:7000", self.shard_up())
        self.cluster.apply(_map(C, B, nodes=(B, C)))
        self.assertNotIn("10.0.0.1:7000", self.shard_up())

    def test_failed_former_master_listed_as_replica(self) -> None:
        """
        A former master the map lists as a failed replica still reads 0
        (this process saw it serve slots); a failed node that never was a
        master has no series.
        """
        self.cluster.apply(_map(C, B, failed=(A,)))
        self.assertEqual(self.shard_up()["10.0.0.1:7000"], 0)
        self.cluster.apply(_map(C, B, nodes=(A, B, C, ("10.0.0.9", 7009)),
                                failed=(A, ("10.0.0.9", 7009))))
        self.assertEqual(set(self.shard_up()),
                         {"10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.3:7002"})

    def test_planned_failover(self) -> None:
        """
        A planned failover (CLUSTER FAILOVER on the replica): the old
        master stays online as a replica. One warning, and its series is
        gone at once: nothing to alert on.
        """
        self.cluster.apply(_map(C, B))
        self.cluster.apply(_map(C, B))
        self.assertEqual(len(self.warnings()), 1, self.warnings())
        self.assertIn("(still in the cluster, as a replica or without slots)",
                      self.warnings()[0])
        self.assertEqual(set(self.shard_up()), {"10.0.0.2:7001", "10.0.0.3:7002"})


class RoutingTests(SynchronousTestCase):
    def test_command_key(self) -> None:
        """
        A command is routed by its first argument, FCALL/FCALL_RO and
        EVAL/EVALSHA (the token check's script) by their first key, and
        PING (no key) goes to every master.
        """
        self.assertEqual(_command_key(("GET", "session:s:auth")), b"session:s:auth")
        self.assertEqual(_command_key(("EXPIRE", "k", 10)), b"k")
        self.assertEqual(_command_key(("FCALL_RO", "wsproxy_history", 2, "h", "m", "0-0", 1)),
                         b"h")
        self.assertIsNone(_command_key(("FCALL", "f", 0)))
        self.assertEqual(_command_key(("EVALSHA", "0123abcd", 1, "session:{s}:auth", "d", 10)),
                         b"session:{s}:auth")
        self.assertEqual(_command_key((b"EVAL", b"return 1", 1, b"k", b"d", 10)), b"k")
        self.assertIsNone(_command_key(("PING",)))
