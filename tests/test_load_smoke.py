"""
A small run of the load-test tool against the real daemon: 200 clients, a
few messages each way, paced traffic; any lost message, failed connection
or refused handshake fails the test. (Figures are not asserted: timing
belongs in bench/run.sh, not in tests.)
"""

from __future__ import annotations

import json
import sys

from twisted.trial.unittest import TestCase

from .support import redis_server, run_process, start_daemon


class LoadSmokeTests(TestCase):
    timeout = 120

    async def test_smoke(self) -> None:
        """
        python -m bench.loadtest with 200 clients exits 0: every client
        connected and every message arrived, in order, both ways.
        """
        redis = redis_server(self)
        daemon = start_daemon(self, {"HOST": "127.0.0.1", "PORT": "0", "REDIS_URL": redis.url})
        port = await daemon.port()
        args = [
            sys.executable, "-m", "bench.loadtest",
            "--url", f"ws://127.0.0.1:{port}", "--redis-url", redis.url,
            "--pid", str(daemon.process.pid),
            "--clients", "200", "--burst", "5", "--upstream", "5",
            "--rate", "200", "--duration", "2",
        ]
        out = run_process(args)
        status = await out.ended
        lines = [line for line in out.output.splitlines() if line.startswith(b"{")]
        self.assertEqual(status, 0, out.output.decode(errors="replace")[-3000:])
        report = json.loads(lines[-1])
        phases = report["phases"]
        self.assertEqual(phases["connect"]["ok"], 200)
        self.assertEqual(phases["down"]["lost"], 0)
        self.assertEqual(phases["down"]["delivered"], 1000)
        self.assertEqual(phases["up"]["arrived"], 1000)
        self.assertEqual(phases["paced"]["lost"], 0)


    async def test_upstream_bench(self) -> None:
        """
        python -m bench.upstream (bench/run.sh upstream-durable) with 20
        clients x 5 messages, one round, exits 0 with a line per mode (every
        message appended, 100 entries retained in the stream modes) and a
        summary with the ratios to Pub/Sub.
        """
        args = [sys.executable, "-m", "bench.upstream", "--clients", "20", "--messages", "5",
                "--rounds", "1"]
        out = run_process(args)
        status = await out.ended
        self.assertEqual(status, 0, out.output.decode(errors="replace")[-3000:])
        rows = [json.loads(line) for line in out.output.splitlines() if line.startswith(b"{")]
        self.assertEqual([row.get("mode") for row in rows[:3]], ["pubsub", "stream", "stream-ack"])
        self.assertEqual([row["messages"] for row in rows[:3]], [100] * 3)
        self.assertEqual([row["entries"] for row in rows[1:3]], [100, 100])
        self.assertIn("stream-ack_ratio_to_pubsub", rows[3])
