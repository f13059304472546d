"""
Resumable sessions' bookkeeping (wsproxy.session.resume), without Redis or
sockets: positions, the recovery plan, and the Resumer's exactly-once,
in-order delivery across the seam and live gaps.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.metrics import Stats
from wsproxy.session.resume import (
    Entry,
    History,
    InvalidPosition,
    Position,
    Resumer,
    parse_live,
    parse_position,
    plan_recovery,
)


def entry(seq: int, epoch: str = "e1", message: bytes = b"") -> Entry:
    return Entry(epoch, 1000 + seq, seq, b"t", message or b"m%d" % seq)


def live(e: Entry) -> bytes:
    return b"%s %d-%d %s%s" % (e.epoch.encode(), e.ms, e.seq, e.kind, e.message)


class PositionTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        A position reads back as it was written; "" means "from now on".
        """
        position = parse_position("abc123:1700000000000-42")
        self.assertEqual(position, Position("abc123", 1700000000000, 42))
        self.assertEqual(str(position), "abc123:1700000000000-42")
        self.assertIsNone(parse_position(""))

    def test_malformed(self) -> None:
        """
        Anything else is refused: no way to smuggle a Redis id range, a
        negative number, another key or an oversized number.
        """
        for bad in ["x", "abc:1", "abc:1-", "ABC:1-2", "abc:-1-2", "abc:1-2\n", "abc:1-2:3",
                    "abc:+", "abc:(1-2", "a" * 33 + ":1-2", "abc:" + "9" * 20 + "-1"]:
            self.assertRaises(InvalidPosition, parse_position, bad)

    def test_live_envelope(self) -> None:
        """
        Live payloads parse into entries; anything malformed is None.
        """
        self.assertEqual(parse_live(b"e1 1001-1 b\x00 \xff"), Entry("e1", 1001, 1, b"b", b"\x00 \xff"))
        for bad in [b"", b"e1", b"e1 1-1", b"e1 x-1 tm", b"e1 1-1 zm", b"e1 1 tm"]:
            self.assertIsNone(parse_live(bad), bad)


class PlanTests(SynchronousTestCase):
    def history(self, *seqs: int, epoch: str = "e1", last: int = 0) -> History:
        entries = tuple(entry(s, epoch) for s in seqs)
        return History(epoch, 1000 + (last or seqs[-1]), last or seqs[-1], entries)

    def test_complete(self) -> None:
        """
        Everything after the position is there: replay it all.
        """
        recovery = plan_recovery(Position("e1", 1003, 3), self.history(4, 5, 6))
        self.assertTrue(recovery.recovered)
        self.assertEqual([e.seq for e in recovery.replay], [4, 5, 6])
        self.assertEqual(recovery.position, Position("e1", 1006, 6))

    def test_up_to_date(self) -> None:
        recovery = plan_recovery(Position("e1", 1006, 6), History("e1", 1006, 6, ()))
        self.assertEqual((recovery.recovered, recovery.replay), (True, ()))

    def test_trimmed(self) -> None:
        """
        The next message after the position is gone: incomplete, nothing
        replayed (a reply with a hole is worse than a reload).
        """
        recovery = plan_recovery(Position("e1", 1003, 3), self.history(7, 8))
        self.assertEqual((recovery.recovered, recovery.replay), (False, ()))
        self.assertEqual(recovery.position, Position("e1", 1008, 8))

    def test_other_epoch_or_none_or_future(self) -> None:
        """
        Another epoch, no history at all, or a position past the end:
        incomplete, never an offset taken at face value.
        """
        self.assertFalse(plan_recovery(Position("e0", 1003, 3), self.history(1, 2)).recovered)
        self.assertFalse(plan_recovery(Position("e1", 1003, 3),
                                       History(None, 0, 0, ())).recovered)
        self.assertFalse(plan_recovery(Position("e1", 1009, 9), self.history(1, 2)).recovered)

    def test_fresh(self) -> None:
        recovery = plan_recovery(None, History("e1", 1005, 5, ()))
        self.assertEqual((recovery.recovered, recovery.position), (True, Position("e1", 1005, 5)))


class ResumerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.controls: list[dict[str, Any]] = []
        self.reads: list[tuple[str, defer.Deferred[History]]] = []
        self.stats = Stats()
        self.resumer = Resumer(
            lambda position, message, kind: self.sent.append((position, message)),
            self.controls.append,
            self.read,
            self.stats,
        )

    def read(self, after: str) -> defer.Deferred[History]:
        d: defer.Deferred[History] = defer.Deferred()
        self.reads.append((after, d))
        return d

    def messages(self) -> list[bytes]:
        return [m for _, m in self.sent]

    def test_seam_has_no_gap_and_no_duplicate(self) -> None:
        """
        Live messages that arrived while the history was read (held until
        open) are delivered after the replay, those already replayed
        dropped.
        """
        for seq in (3, 4, 5):
            self.resumer.live(live(entry(seq)))
        self.resumer.plain(b"plain", b"t")
        replay = (entry(2), entry(3), entry(4))
        self.resumer.start(plan_recovery(Position("e1", 1001, 1),
                                         History("e1", 1004, 4, replay)))
        self.assertEqual(self.messages(), [b"m2", b"m3", b"m4", b"m5", b"plain"])
        self.assertEqual(self.controls[0]["recovered"], True)
        self.assertEqual(self.controls[0]["replayed"], 3)
        self.assertEqual(self.sent[-2][0], b"e1:1005-5")
        self.assertEqual(self.sent[-1][0], b"")

    def test_live_gap_filled_from_history(self) -> None:
        """
        A live message with a hole before it: everything waits while the
        missing ones are read, then all go out in order.
        """
        self.resumer.start(plan_recovery(None, History("e1", 1001, 1, ())))
        self.resumer.live(live(entry(2)))
        self.resumer.live(live(entry(5)))
        self.resumer.live(live(entry(6)))
        self.assertEqual(self.messages(), [b"m2"])
        self.assertEqual(self.reads[0][0], "1002-2")
        self.reads[0][1].callback(History("e1", 1006, 6, (entry(3), entry(4), entry(5))))
        self.assertEqual(self.messages(), [b"m2", b"m3", b"m4", b"m5", b"m6"])
        self.assertEqual(self.stats.resume_gaps_filled, 1)
        self.assertEqual(len(self.controls), 1)

    def test_unfillable_gap_is_said(self) -> None:
        """
        If the missing messages are gone from the history too, the client
        is told (recovered: false), then gets what follows.
        """
        self.resumer.start(plan_recovery(None, History("e1", 1001, 1, ())))
        self.resumer.live(live(entry(2)))
        self.resumer.live(live(entry(9)))
        self.reads[0][1].callback(History("e1", 1009, 9, (entry(8), entry(9))))
        self.assertEqual(self.messages(), [b"m2", b"m9"])
        self.assertEqual(self.controls[-1]["recovered"], False)
        self.assertEqual(self.stats.resume_incomplete, 1)
        self.resumer.live(live(entry(10)))
        self.assertEqual(self.messages()[-1], b"m10")

    def test_failed_read_is_said(self) -> None:
        """
        A history read that fails: told, then live continues in order.
        """
        self.resumer.start(plan_recovery(None, History("e1", 1001, 1, ())))
        self.resumer.live(live(entry(2)))
        self.resumer.live(live(entry(4)))
        self.reads[0][1].errback(RuntimeError("redis down"))
        self.assertEqual(self.messages(), [b"m2", b"m4"])
        self.assertEqual(self.controls[-1]["reason"], "the history could not be read")

    def test_new_epoch_while_connected(self) -> None:
        """
        The history started over under a connected client: told, then the
        new epoch's messages from its first.
        """
        self.resumer.start(plan_recovery(None, History("e1", 1003, 3, ())))
        self.resumer.live(live(entry(4)))
        self.resumer.live(live(entry(1, epoch="e2")))
        self.assertEqual(self.messages(), [b"m4", b"m1"])
        self.assertEqual(self.controls[-1]["recovered"], False)
        self.assertIn("epoch", self.controls[-1]["reason"])

    def test_duplicates_dropped(self) -> None:
        self.resumer.start(plan_recovery(None, History("e1", 1001, 1, ())))
        for seq in (2, 2, 1, 3, 3):
            self.resumer.live(live(entry(seq)))
        self.assertEqual(self.messages(), [b"m2", b"m3"])

    def test_closed_connection_ignores_late_history(self) -> None:
        self.resumer.start(plan_recovery(None, History("e1", 1001, 1, ())))
        self.resumer.live(live(entry(3)))
        self.resumer.closed = True
        self.reads[0][1].callback(History("e1", 1003, 3, (entry(2), entry(3))))
        self.assertEqual(self.messages(), [])
