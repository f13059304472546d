"""
The topics benchmark (python -m bench.topics, bench/run.sh topics): one
tiny round of every scenario against real servers, wsproxy always, the
Node.js bridge extended with topics (bench/topics/node_topics.js) when node
and its npm packages are on this machine; its absence is then stated in the
output, never skipped in silence. (Figures are not asserted: timing belongs
in bench/run.sh, not in tests.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from bench import nodebridge
from bench.topics.run import NODE_TOPICS

from .support import ROOT, run_process

MODULES = os.environ.get("NODE_BRIDGE_MODULES") or str(Path(ROOT) / ".cache" / "node-bridge")

SOCKETS = 40
PUBLISHES = 3


class TopicsBenchTests(TestCase):
    timeout = 300

    async def run_topics(self, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
        argv = [sys.executable, "-m", "bench.topics", "--rounds", "1",
                "--sockets", str(SOCKETS), "--publishes", str(PUBLISHES),
                "--centrifugo-sockets", str(SOCKETS), "--centrifugo-publishes", str(PUBLISHES),
                "--procs", "2", "--concurrency", "20", "--settle", "10",
                "--node-modules", MODULES, *extra]
        out = run_process(argv)
        status = await out.ended
        text = out.output.decode(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return status, lines, text

    async def test_tiny_round(self) -> None:
        """
        One round of 40 sockets and 3 publishes exits 0 with one JSON line
        per scenario (fanout, per-session vs topic, centrifugo at one size,
        resume-mix): every column delivered everything it was sent, once,
        nothing lost; the fan-out's time to the last socket measured. With
        the Node bridge here: its fanout and centrifugo figures and the
        ratio too; without it: those lines say why it is absent
        (C{node_unavailable}) and stderr says so.
        """
        why = nodebridge.unavailable(NODE_TOPICS, MODULES)
        status, lines, text = await self.run_topics()
        self.assertEqual(status, 0, text[-3000:])
        by_name = {line["scenario"]: line for line in lines}
        self.assertEqual(sorted(by_name), sorted(["fanout", "per-session", f"centrifugo@{SOCKETS}",
                                                  "resume-mix"]), text)
        targets = ["wsproxy"] if why else ["wsproxy", "node"]
        columns = {"fanout": targets, "per-session": ["per-session", "topic"],
                   f"centrifugo@{SOCKETS}": targets, "resume-mix": ["plain", "recoverable"]}
        # deliveries per column: every socket gets every publish (centrifugo: two per batch)
        expected = {"fanout": SOCKETS * PUBLISHES, "per-session": SOCKETS * PUBLISHES,
                    f"centrifugo@{SOCKETS}": 2 * SOCKETS * PUBLISHES,
                    "resume-mix": SOCKETS * PUBLISHES}
        for name, line in by_name.items():
            self.assertEqual(sorted(line["columns"]), sorted(columns[name]), line)
            self.assertEqual((line["lost"], line["duplicates"]), (0, 0), line)
            [figures] = line["rounds"]
            for column in columns[name]:
                figs = figures[column]
                self.assertEqual((figs["delivered"], figs["expected"], figs["lost"],
                                  figs["corrupt"], figs["connected"]),
                                 (expected[name], expected[name], 0, 0, SOCKETS), (column, line))
                self.assertIsNotNone(figs["last_p99_ms"], (column, line))
                # the headline itself may be None or 0 at these sizes (CPU in 10 ms ticks)
                self.assertIn(column, line)
            if name in ("per-session", "resume-mix") or not why:
                # the figures themselves may be 0 at these sizes (CPU is counted in 10 ms ticks)
                self.assertIn("ratio", figures, line)
            if name in ("fanout", f"centrifugo@{SOCKETS}") and why:
                self.assertIsNone(line["node"])
                self.assertEqual(line["node_unavailable"], why)
        resume_mix = by_name["resume-mix"]["rounds"][0]
        self.assertEqual(resume_mix["recoverable"]["resuming_sockets"], SOCKETS // 2)
        self.assertEqual(resume_mix["plain"]["resuming_sockets"], 0)
        if why:
            self.assertIn(f"the Node.js bridge cannot run here ({why})", text)

    async def test_node_absent_said(self) -> None:
        """
        When the bridge cannot run (here: its script is missing), the run
        still measures wsproxy and exits 0, and both its JSON line and
        stderr say that the node figures are absent and why.
        """
        status, lines, text = await self.run_topics("--scenarios", "fanout",
                                                    "--bridge", "/nonexistent/node_topics.js")
        self.assertEqual(status, 0, text[-3000:])
        [line] = lines
        self.assertEqual(line["rounds"][0]["wsproxy"]["lost"], 0, line)
        self.assertIsNone(line["node"])
        self.assertIn("no bridge script", line["node_unavailable"])
        self.assertIn("the Node.js bridge cannot run here (", text)
