"""
The resumable-session benchmarks (python -m bench.resume): the bookkeeping
their verdicts rest on, in memory, and one short run of each against real
servers. (Figures are not asserted: timing belongs in bench/run.sh.)
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from bench.resume.client import QueryUpgrade, Session, StreamClient, resume_query
from bench.resume.publisher import Commands
from bench.resume.stream import Ledger, message, parse
from bench.loadtest.wsclient import OP_BINARY, OP_TEXT

from .support import run_process


class LedgerTests(SynchronousTestCase):
    def test_in_order(self) -> None:
        """
        Numbers 1..n received once each, in order: nothing missing,
        duplicated or reordered.
        """
        ledger = Ledger()
        self.assertEqual([ledger.record(n) for n in (1, 2, 3)], [True, True, True])
        self.assertEqual((ledger.missing(3), ledger.duplicates, ledger.reordered), ([], 0, 0))

    def test_duplicate_reordered_missing(self) -> None:
        """
        A number received again is a duplicate (not a delivery); one
        received after a higher number is reordered; numbers published but
        never received are missing.
        """
        ledger = Ledger()
        for n in (1, 2, 2, 4, 3, 6):
            ledger.record(n)
        self.assertEqual(ledger.duplicates, 1)
        self.assertEqual(ledger.reordered, 1)
        self.assertEqual(ledger.missing(7), [5, 7])
        self.assertEqual(ledger.unexpected(4), 1)

    def test_message_round_trip(self) -> None:
        """
        A message carries its session index, number and publish time, and
        has exactly the requested size.
        """
        payload = message(42, 7, 100)
        self.assertEqual(len(payload), 100)
        numbered = parse(payload)
        assert numbered is not None
        self.assertEqual((numbered.index, numbered.number), (42, 7))
        self.assertIsNone(parse(b"not one of ours"))


class _Sink:
    def __init__(self) -> None:
        self.latencies: list[tuple[int, bool]] = []
        self.recoveries: list[tuple[bool, int, str]] = []

    def opened(self, client: StreamClient) -> None:
        pass

    def lost(self, client: StreamClient) -> None:
        pass

    def received(self, latency_ns: int, replayed: bool) -> None:
        self.latencies.append((latency_ns, replayed))

    def delivered(self, count: int) -> None:
        pass

    def recovery(self, recovered: bool, replayed: int, reason: str) -> None:
        self.recoveries.append((recovered, replayed, reason))


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.sink = _Sink()
        self.session = Session(3, "s3", "tok")

    def client(self, resuming: bool = True) -> StreamClient:
        request = QueryUpgrade(b"127.0.0.1:1", "", "a", False)
        return StreamClient(self.loop, request, self.session, self.sink, resuming)

    def control(self, **event: Any) -> bytes:
        return b"!" + json.dumps({"type": "recovery", **event}).encode()

    def test_position_from_data_frames(self) -> None:
        """
        A data frame's message goes to the session's ledger and its
        position becomes the session's; a recovery frame that announces a
        replay does not move the position (the replayed frames will), and
        the replayed messages are told apart from live ones.
        """
        client = self.client()
        self.assertFalse(client.on_message(OP_TEXT, self.control(
            recovered=True, replayed=1, position="e:5-3", reason=""), 0))
        self.assertEqual(self.session.position, "")
        self.assertTrue(client.on_message(OP_TEXT, b"e:5-2\n" + message(3, 1, 60), 0))
        self.assertTrue(client.on_message(OP_TEXT, b"e:5-3\n" + message(3, 2, 60), 0))
        self.assertEqual(self.session.position, "e:5-3")
        self.assertEqual([replayed for _, replayed in self.sink.latencies], [True, False])
        self.assertEqual(self.sink.recoveries, [(True, 1, "")])
        self.assertEqual(self.session.position_mismatches, 0)

    def test_position_from_recovery_without_replay(self) -> None:
        """
        A recovery frame that replays nothing names where the stream goes
        on: the session takes that position (a fresh start, or an
        incomplete recovery, which is counted with its reason).
        """
        client = self.client()
        client.on_message(OP_TEXT, self.control(
            recovered=False, replayed=0, position="e:9-9", reason="gone"), 0)
        self.assertEqual(self.session.position, "e:9-9")
        self.assertEqual(self.sink.recoveries, [(False, 0, "gone")])

    def test_duplicates_and_anomalies(self) -> None:
        """
        A message received twice is not a second delivery; one for another
        session, one without a position separator, and a position whose
        sequence number does not move with the message number are counted.
        """
        client = self.client()
        self.assertTrue(client.on_message(OP_TEXT, b"e:1-2\n" + message(3, 1, 60), 0))
        self.assertFalse(client.on_message(OP_TEXT, b"e:1-2\n" + message(3, 1, 60), 0))
        self.assertEqual(self.session.ledger.duplicates, 1)
        self.assertFalse(client.on_message(OP_TEXT, b"e:1-3\n" + message(4, 2, 60), 0))
        self.assertEqual(self.session.misrouted, 1)
        self.assertFalse(client.on_message(OP_BINARY, message(3, 2, 60), 0))
        self.assertEqual(self.session.corrupt, 1)
        client.on_message(OP_TEXT, b"e:1-9\n" + message(3, 2, 60), 0)
        self.assertEqual(self.session.position_mismatches, 1)

    def test_plain(self) -> None:
        """
        A plain client reads bare messages (no position, no control frames).
        """
        client = self.client(resuming=False)
        self.assertTrue(client.on_message(OP_TEXT, message(3, 1, 60), 0))
        self.assertEqual(self.session.position, "")

    def test_upgrade_query(self) -> None:
        """
        The resume position goes into the request target's query, the token
        into the Authorization header.
        """
        request = QueryUpgrade(b"h:1", "", "a", False, resume_query("e:1-2"))
        encoded = request.encode("s1", "tok", b"key")
        self.assertTrue(encoded.startswith(b"GET /a/ws/s1?resume=e:1-2 HTTP/1.1\r\n"), encoded)
        self.assertIn(b"Authorization: Bearer tok\r\n", encoded)
        fresh = QueryUpgrade(b"h:1", "", "a", False, resume_query(""))
        self.assertTrue(fresh.encode("s1", "t", b"k").startswith(b"GET /a/ws/s1?resume= HTTP"))


class CommandTests(SynchronousTestCase):
    def test_packed(self) -> None:
        """
        Recoverable messages are FCALL wsproxy_publish with the session's
        history and meta keys; plain ones PUBLISH to its :down channel.
        """
        fcall = Commands(("s1",), "resume").pack(0, 1, b"hi")
        self.assertEqual(fcall, b"*7\r\n$5\r\nFCALL\r\n$15\r\nwsproxy_publish\r\n$1\r\n2\r\n"
                                b"$18\r\nsession:s1:history\r\n$15\r\nsession:s1:meta\r\n"
                                b"$2\r\nhi\r\n$4\r\ntext\r\n")
        plain = Commands(("s1",), "plain").pack(0, 1, b"hi")
        self.assertEqual(plain, b"*3\r\n$7\r\nPUBLISH\r\n$15\r\nsession:s1:down\r\n$2\r\nhi\r\n")

    def test_live(self) -> None:
        """
        "live" messages are PUBLISHed to the session's :live channel in
        wsproxy_publish's format, the message number as sequence number.
        """
        live = Commands(("s1",), "live").pack(0, 7, b"hi")
        self.assertTrue(live.startswith(b"*3\r\n$7\r\nPUBLISH\r\n$15\r\nsession:s1:live\r\n"))
        payload = live.split(b"\r\n")[-2]
        self.assertRegex(payload, rb"\A0bench [0-9]+-7 thi\Z")


class RunTests(TestCase):
    timeout = 180

    async def run_bench(self, *args: str) -> tuple[int, dict[str, Any], str]:
        argv = [sys.executable, "-m", "bench.resume", *args]
        out = run_process(argv)
        status = await out.ended
        text = out.output.decode(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("{")]
        self.assertTrue(lines, text[-3000:])
        return status, json.loads(lines[-1]), text

    async def test_failover(self) -> None:
        """
        20 resuming sessions, two proxies, one of them killed and restarted
        mid-stream: every message arrives once, in order, and the run exits 0.
        """
        status, report, text = await self.run_bench(
            "failover", "--sessions", "20", "--rate", "40", "--duration", "4",
            "--kill-every", "2", "--procs", "1")
        self.assertEqual(status, 0, text[-3000:])
        self.assertEqual(report["kills"], 1)
        self.assertEqual(report["delivered"], report["sent"])
        for key in ("gaps", "duplicates", "reordered", "incomplete"):
            self.assertEqual(report[key], 0, key)
        self.assertGreater(report["reconnects"], 0)

    async def test_cost(self) -> None:
        """
        One round of the cost comparison with all three modes: every row
        measured, every message delivered, the ratios to plain reported.
        """
        status, report, text = await self.run_bench(
            "cost", "--sessions", "20", "--messages", "5", "--rounds", "1", "--procs", "1",
            "--idle-settle", "0.5", "--modes", "plain,resume,live")
        self.assertEqual(status, 0, text[-3000:])
        self.assertEqual([row["mode"] for row in report["runs"]], ["plain", "resume", "live"])
        self.assertEqual([row["delivered"] for row in report["runs"]], [100, 100, 100])
        for key in ("ratio", "live_ratio"):
            self.assertEqual(set(report[key]), {"proxy_us_per_msg", "redis_us_per_msg",
                                                "rss_kib_per_conn", "redis_kib_per_conn"})
