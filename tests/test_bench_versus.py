"""
The side-by-side benchmark (python -m bench.versus, bench/run.sh versus):
one tiny round against real servers, wsproxy always, the Node.js bridge
when node and the bridge's npm packages are on this machine; its absence is
then stated in the output, never skipped in silence. (Figures are not
asserted: timing belongs in bench/run.sh, not in tests.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from bench import nodebridge
from bench.versus import SCENARIOS

from .support import ROOT, run_process

MODULES = os.environ.get("NODE_BRIDGE_MODULES") or str(Path(ROOT) / ".cache" / "node-bridge")


class VersusTests(TestCase):
    timeout = 300

    async def run_versus(self, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
        argv = [sys.executable, "-m", "bench.versus", "--rounds", "1", "--sessions", "20",
                "--burst", "5", "--rate", "200", "--duration", "1", "--conn-clients", "50",
                "--concurrency", "10", "--idle", "0.5", "--storm-clients", "60",
                "--storm-sources", "2", "--procs", "1", "--node-modules", MODULES, *extra]
        out = run_process(argv)
        status = await out.ended
        text = out.output.decode(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return status, lines, text

    async def test_tiny_round(self) -> None:
        """
        One round with tiny sizes exits 0 with one JSON line per scenario
        (down and up as bursts and one message per turn, set-up, RSS per
        idle connection, the storm): wsproxy's headline figure in each,
        nothing lost, every storm client connected and none refused. With
        the Node bridge here: its figures and the ratio too; without it:
        each line says why it is absent (C{node_unavailable}) and stderr
        says so.
        """
        why = nodebridge.unavailable(nodebridge.default_bridge(), MODULES)
        status, lines, text = await self.run_versus()
        self.assertEqual(status, 0, text[-3000:])
        self.assertEqual(sorted(line["scenario"] for line in lines), sorted(SCENARIOS), text)
        targets = ["wsproxy"] if why else ["wsproxy", "node"]
        for line in lines:
            self.assertEqual(len(line["rounds"]), 1, line)
            figures = line["rounds"][0]
            self.assertEqual(sorted(figures.keys() - {"ratio"}), sorted(targets), line)
            for target in targets:
                self.assertIsNotNone(line[target], (target, line))
                self.assertFalse(figures[target].get("lost"), (target, line))
            if why:
                self.assertIsNone(line["node"])
                self.assertEqual(line["node_unavailable"], why)
            else:
                # the figures themselves may be 0 at these sizes (CPU is counted in 10 ms ticks)
                self.assertIn("ratio", figures, line)
                self.assertIn("ratio", line)
        storm = next(line for line in lines if line["scenario"] == "storm")
        for target in targets:
            figures = storm["rounds"][0][target]
            self.assertEqual((figures["connected"], figures["refused"]), (60, 0), figures)
        if why:
            self.assertIn(f"the Node.js bridge cannot run here ({why})", text)

    async def test_node_absent_said(self) -> None:
        """
        When the bridge cannot run (here: its script is missing), the run
        still measures wsproxy and exits 0, and both its JSON line and
        stderr say that the node figures are absent and why.
        """
        status, lines, text = await self.run_versus("--scenarios", "down-burst",
                                                    "--bridge", "/nonexistent/node_bridge.js")
        self.assertEqual(status, 0, text[-3000:])
        [line] = lines
        self.assertIsNotNone(line["wsproxy"], line)
        self.assertIsNone(line["node"])
        self.assertIn("no bridge script", line["node_unavailable"])
        self.assertIn("the Node.js bridge cannot run here (", text)
