"""
Client frames read without Autobahn (L{wsproxy.fast.inframes}): which frames
the lean reader takes and which it leaves to Autobahn, and, through the
in-memory proxy, a read that mixes both kinds keeping every message, its
order and RFC 6455's answers.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.memory import BINARY, CLOSE, TEXT, Frame, MemoryTestCase, client_frame
from wsproxy.fast.inframes import simple_frame, unmask

PING, PONG, CONTINUATION = 0x9, 0xA, 0x0


class UnmaskTests(SynchronousTestCase):
    def test_small_and_large(self) -> None:
        """
        Unmasking gives the payload back at every length, on both sides of
        the switch to Autobahn's masker.
        """
        mask = b"\x5a\x0f\xc3\x81"
        for n in (0, 1, 3, 4, 5, 100, 2047, 2048, 2049, 5000, 70000):
            payload = os.urandom(n)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.assertEqual(unmask(masked, mask), payload, n)

    def test_both_maskers_agree(self) -> None:
        """
        The pure-Python masker and Autobahn's native one (when Autobahn
        uses it) give the same bytes at every length; unmask uses the
        native one above _SMALL only when Autobahn does.
        """
        from wsproxy.fast import inframes

        native = inframes.native_masker()
        maskers = [inframes.unmask_pure] + ([native] if native is not None else [])
        self.assertIs(inframes.large_masker(), native or inframes.unmask_pure)
        mask = b"\x01\x80\x7f\xfe"
        for n in (0, 1, 5, 2049, 4099, 65535):
            payload = os.urandom(n)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            for masker in maskers:
                self.assertEqual(masker(masked, mask), payload, (masker, n))


class SimpleFrameTests(SynchronousTestCase):
    def test_whole_messages(self) -> None:
        """
        Unfragmented, masked text and binary frames with a 7- or 16-bit
        length are read, one after the other, with the offset of the next.
        """
        messages = [(b"", False), (b"hello", False), (b"x" * 125, False), (b"y" * 126, False),
                    ("é".encode() * 2000, False), (b"\x00\xff" * 32767 + b"!", True),
                    (b"\x00", True)]
        data = b"".join(
            client_frame(payload, BINARY if binary else TEXT) for payload, binary in messages
        )
        at, read = 0, []
        while at < len(data):
            frame = simple_frame(data, at, 0)
            assert frame is not None
            payload, binary, at = frame
            read.append((payload, binary))
        self.assertEqual(read, messages)
        self.assertEqual(len(messages[-2][0]), 65535, "the largest 16-bit length")

    def test_left_to_autobahn(self) -> None:
        """
        Anything but such a frame is not read: control frames,
        continuation and unfinished frames, reserved bits, unmasked frames,
        a 64-bit or non-minimal length, a frame over the limit or not yet
        complete, text that is not UTF-8 (surrogates and overlong forms
        included).
        """
        ok = client_frame(b"hello")
        refused = {
            "ping": client_frame(b"", PING),
            "pong": client_frame(b"", PONG),
            "close": client_frame(b"\x03\xe8", CLOSE),
            "continuation": client_frame(b"x", CONTINUATION),
            "not final": client_frame(b"x", TEXT, fin=False),
            "rsv1": bytes([ok[0] | 0x40]) + ok[1:],
            "reserved opcode": bytes([0x83]) + ok[1:],
            "unmasked": bytes([0x81, 5]) + b"hello",
            "64-bit length": client_frame(b"z" * 80000, BINARY),
            "non-minimal length": bytes([0x81, 0xFE, 0, 5]) + ok[2:],
            "incomplete payload": ok[:-1],
            "incomplete header": ok[:5],
            "invalid UTF-8": client_frame(b"\xff"),
            "surrogate": client_frame(b"\xed\xa0\x80"),
            "overlong": client_frame(b"\xc0\xaf"),
            "cut code point": client_frame("é".encode()[:1]),
        }
        for name, data in refused.items():
            self.assertIsNone(simple_frame(data, 0, 0), name)
        self.assertIsNone(simple_frame(client_frame(b"x" * 101), 0, 100))
        self.assertIsNotNone(simple_frame(client_frame(b"x" * 100), 0, 100))
        self.assertEqual(simple_frame(client_frame(b"\xff", BINARY), 0, 0)[:2], (b"\xff", True))
        self.assertIsNone(simple_frame(ok + ok[:3], len(ok), 0))


class MixedReadTests(MemoryTestCase):
    def test_one_read_of_every_kind(self) -> None:
        """
        One read holding simple frames, a ping, a fragmented message and
        simple frames again: every message is published in order, the
        ping is answered, and the frames after Autobahn's share still
        arrive.
        """
        memory = self.start()
        client = memory.open()
        client.send(
            client_frame(b"one") + client_frame(b"\x02", BINARY) + client_frame(b"p", PING)
            + client_frame(b"fr", TEXT, fin=False) + client_frame(b"ag", CONTINUATION)
            + client_frame(b"three") + client_frame(b"four")
        )
        client.send(client_frame(b"five"))
        self.assertEqual(memory.redis.published, [
            (b"session:s1:up", p) for p in (b"one", b"\x02", b"frag", b"three", b"four", b"five")
        ])
        self.assertEqual(client.frames(), [Frame(PONG, b"p")])
        self.assertEqual(memory.proxy.stats.messages_up, 6)

    def test_frame_split_across_reads(self) -> None:
        """
        A frame cut between two reads is completed by Autobahn; the next
        read's whole frames are read lean again.
        """
        memory = self.start()
        client = memory.open()
        data = client_frame(b"a" * 300) + client_frame(b"b")
        client.send(data[:100])
        client.send(data[100:])
        client.send(client_frame(b"c"))
        self.assertEqual([p for _, p in memory.redis.published], [b"a" * 300, b"b", b"c"])

    def test_64_bit_length_through_autobahn(self) -> None:
        """
        An 80,000-byte message (a 64-bit length, which the lean reader
        leaves to Autobahn) between two small ones in one read: all three
        are published intact and in order.
        """
        memory = self.start()
        client = memory.open()
        big = os.urandom(80000)
        client.send(client_frame(b"before") + client_frame(big, BINARY) + client_frame(b"after"))
        self.assertEqual([p for _, p in memory.redis.published], [b"before", big, b"after"])

    def test_invalid_utf8_closes_1007(self) -> None:
        """
        A text frame that is not UTF-8, after a good one in the same read:
        the good one is published, the connection is closed with 1007 by
        Autobahn, and nothing after it is published.
        """
        memory = self.start()
        client = memory.open()
        client.send(client_frame(b"good") + client_frame(b"\xff\xfe") + client_frame(b"after"))
        self.assertEqual(memory.redis.published, [(b"session:s1:up", b"good")])
        closes = [f for f in client.frames() if f.opcode == CLOSE]
        self.assertEqual([f.close_code for f in closes], [1007])

    def test_too_big_closes_1009(self) -> None:
        """
        A frame over MAX_MESSAGE_SIZE_BYTES is left to Autobahn, which
        closes with 1009.
        """
        memory = self.start(max_message_size=100)
        client = memory.open()
        client.send(client_frame(b"x" * 100) + client_frame(b"y" * 101))
        self.assertEqual([p for _, p in memory.redis.published], [b"x" * 100])
        closes = [f for f in client.frames() if f.opcode == CLOSE]
        self.assertEqual([f.close_code for f in closes], [1009])
