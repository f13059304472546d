"""
The rolling-deploy benchmark (python -m bench.rolling): its clients' side of
durable upstream in memory, and one short run against the real image.

The run needs docker, the wsproxy:dev image (bin/dev image), haproxy and
redis-server: without them it fails (it does not skip), since a skipped
proof proves nothing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase, TestCase

from bench.loadtest.wsclient import OP_TEXT
from bench.resume.stream import message
from bench.resume.workers import SessionSpec
from bench.rolling.clients import (AckingClient, AckingSession, RollingConfig, RollingWorker)

from .support import run_process

IMAGE = "wsproxy:dev"


class _Transport:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


class _Counters:
    def set_worker(self, worker_id: int, counter: int, value: int) -> None:
        pass


def _ids(frames: list[bytes]) -> list[bytes]:
    """The message ids of client frames (masked: unmask them)."""
    out = []
    for frame in frames:
        length = frame[1] & 0x7F
        offset = 2 if length < 126 else 4
        mask, body = frame[offset:offset + 4], frame[offset + 4:]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
        out.append(payload.partition(b"\n")[0])
    return out


class AckingClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.loop = asyncio.new_event_loop()
        config = RollingConfig("127.0.0.1", (1,), "a", True, 1.0, 1, 0.0, 0.1, 1, 1.0, 60)
        self.worker = RollingWorker(0, [SessionSpec(0, "s0", "t")], config,
                                    None, _Counters(), self.loop)  # type: ignore[arg-type]
        session = self.worker.sessions[0]
        assert isinstance(session, AckingSession)
        self.session = session
        self.addCleanup(self.stop)

    def stop(self) -> None:
        """Cancels the reconnects a lost connection scheduled, then closes the loop."""
        for task in list(self.worker._tasks):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def connect(self) -> tuple[AckingClient, _Transport]:
        client = self.worker.new_client(self.session, 1)
        assert isinstance(client, AckingClient)
        transport = _Transport()
        client.transport = transport  # type: ignore[assignment]
        client.is_open = True
        self.session.client = client
        self.worker.opened(client)
        return client, transport

    def ack(self, client: AckingClient, number: int, kind: str = "ack") -> None:
        client.on_message(OP_TEXT, b"!" + json.dumps(
            {"type": kind, "id": f"u{number}", "position": "1-0", "reason": "x"},
            separators=(",", ":")).encode(), 0)

    def test_ack_query(self) -> None:
        """
        A connection asks for ?resume=<last position>&ack=1.
        """
        self.session.position = "e:1-2"
        client = self.worker.new_client(self.session, 1)
        encoded = client._request.encode("s0", "t", b"k")
        self.assertTrue(encoded.startswith(b"GET /a/ws/s0?resume=e:1-2&ack=1 HTTP/1.1"), encoded)

    def test_resend_after_reconnect(self) -> None:
        """
        Messages sent and not acknowledged when the connection was lost,
        then those produced while disconnected, are sent on the next
        connection in order; only the first kind counts as resent.
        """
        client, transport = self.connect()
        for _ in range(3):
            self.worker._produce_one(self.session)
        self.ack(client, 1)
        self.assertEqual(_ids(transport.frames), [b"u1", b"u2", b"u3"])
        client.is_open = False
        self.worker.lost(client)
        self.worker._produce_one(self.session)
        self.assertEqual(list(self.session.outbox), [2, 3, 4])
        client2, transport2 = self.connect()
        self.assertEqual(_ids(transport2.frames), [b"u2", b"u3", b"u4"])
        self.assertEqual(self.worker.resent, 2)
        for number in (2, 3, 4):
            self.ack(client2, number)
        report = self.worker.rolling_report((0,))
        self.assertEqual((report.unacked, report.acks, report.acks_unknown), (0, 4, 0))
        self.assertEqual(report.close_codes, {"1006": 1})
        self.assertEqual(len(report.reconnect_ms), 1)
        self.assertEqual(report.sessions_reconnected, 1)

    def test_nack_and_stray_acks(self) -> None:
        """
        A nack sends the message again at once with the same id; an ack for
        an id that is not waiting, and one out of the order sent, are counted.
        """
        client, transport = self.connect()
        self.worker._produce_one(self.session)
        self.worker._produce_one(self.session)
        self.ack(client, 1, "nack")
        self.assertEqual(_ids(transport.frames), [b"u1", b"u2", b"u1"])
        self.ack(client, 2)
        self.ack(client, 1)
        self.ack(client, 1)
        report = self.worker.rolling_report((0,))
        self.assertEqual(report.nacks, {"x": 1})
        self.assertEqual((report.acks_unknown, report.acks_out_of_order), (1, 2))
        self.assertEqual(report.unacked, 0)

    def test_stream_still_checked(self) -> None:
        """
        Data frames down still go to the session's ledger (bench.resume's client).
        """
        client, _ = self.connect()
        self.assertTrue(client.on_message(OP_TEXT, b"e:1-2\n" + message(0, 1, 60), 0))
        self.assertEqual(self.session.position, "e:1-2")


class RunTests(TestCase):
    timeout = 150

    async def test_rolling_drain(self) -> None:
        """
        20 clients through HAProxy, two containers of the image replaced one
        at a time with docker stop: nothing lost, duplicated or reordered
        either way, every client reconnected, every old container exited 0
        after "shutdown complete".
        """
        for tool in ("docker", "haproxy", "redis-server"):
            if shutil.which(tool) is None:
                self.fail(f"{tool} is not installed: this test needs it")
        images = subprocess.run(["docker", "images", "-q", IMAGE], capture_output=True,
                                text=True, timeout=30)
        if images.returncode != 0 or not images.stdout.strip():
            self.fail(f"no docker image {IMAGE} (bin/dev image builds it): "
                      f"{images.stderr.strip()}")
        argv = [sys.executable, "-m", "bench.rolling", "--clients", "20", "--containers", "2",
                "--modes", "drain", "--procs", "1", "--warmup", "2", "--pause", "0.5",
                "--drain", "1.5", "--grace", "5", "--duration", "15", "--settle-max", "30",
                "--image", IMAGE]
        out = run_process(argv)
        status = await out.ended
        text = out.output.decode(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("{")]
        self.assertTrue(lines, text[-3000:])
        self.assertEqual(status, 0, text[-3000:])
        (run,) = json.loads(lines[-1])["runs"]
        self.assertEqual(run["exit_codes"], [0, 0])
        self.assertEqual(run["shutdown_complete"], [True, True])
        for key in ("down_lost", "down_duplicates", "down_reordered", "down_incomplete",
                    "up_lost", "up_duplicates", "up_reordered"):
            self.assertEqual(run[key], 0, key)
        self.assertEqual(run["down_delivered"], run["down_sent"])
        self.assertEqual(run["up_handled"], run["up_produced"])
        self.assertEqual(run["sessions_reconnected"], 20)
