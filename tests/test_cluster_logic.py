"""
Redis Cluster logic without Redis: slots, redirections, the slot map read
from a C{CLUSTER SHARDS} reply, and which argument routes a command.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from wsproxy.redis.cluster import SLOTS, _command_key, key_slot, parse_redirect, parse_shards
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

    def test_not_a_list(self) -> None:
        """
        A reply of another shape is an error, not a crash.
        """
        self.assertRaises(ValueError, parse_shards, b"OK")


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
