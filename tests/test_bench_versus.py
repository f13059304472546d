"""
The side-by-side benchmarks (python -m bench.versus, bench/run.sh versus;
the JWT targets of versus and bench.flood, bench/run.sh jwt): one tiny
round against real servers, wsproxy always, the Node.js bridge when node and
the bridge's npm packages are on this machine; its absence is then stated
in the output, never skipped in silence. (Figures are not asserted: timing
belongs in bench/run.sh, not in tests.)
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
            self.assertEqual(sorted(figures.keys() - {"ratio", "ratios"}), sorted(targets), line)
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

    async def test_jwt_targets(self) -> None:
        """
        The JWT targets (AUTH_MODE=jwt, HS256 and ES256, their tokens
        minted by the load tool) beside Redis tokens, conn at two sizes and
        the storm: a line per size (setup@20, setup@40, ...), every client
        of every target connected, each JWT target with a ratio to wsproxy
        (and to node, with the verdict on the HS256 set-up target, when the
        bridge is here).
        """
        why = nodebridge.unavailable(nodebridge.default_bridge(), MODULES)
        targets = ["wsproxy", "wsproxy-jwt-hs256", "wsproxy-jwt-es256"] + ([] if why else ["node"])
        status, lines, text = await self.run_versus(
            "--scenarios", "conn,storm", "--conn-clients", "20,40", "--targets", ",".join(targets))
        self.assertEqual(status, 0, text[-3000:])
        by_name = {line["scenario"]: line for line in lines}
        self.assertEqual(sorted(by_name), ["rss-idle@20", "rss-idle@40", "setup@20", "setup@40",
                                           "storm"], text)
        for size in (20, 40):
            [figures] = by_name[f"setup@{size}"]["rounds"]
            for target in targets:
                self.assertEqual((figures[target]["connected"], figures[target]["failed"]),
                                 (size, 0), (target, figures))
        [storm] = by_name["storm"]["rounds"]
        for target in targets:
            self.assertEqual((storm[target]["connected"], storm[target]["refused"]), (60, 0),
                             (target, storm))
        for line in lines:
            for target in ("wsproxy-jwt-hs256", "wsproxy-jwt-es256"):
                self.assertIn("wsproxy", line["ratios"][target], line)
                self.assertEqual("node" in line["ratios"][target], not why, line)
        if not why:
            self.assertIn("target HS256 set-up CPU <= Node's (setup@40): ", text)

    async def test_flood_jwt(self) -> None:
        """
        python -m bench.flood with the JWT targets, 100 forged tokens from 5
        addresses (20 each: AUTH_FAIL_LIMIT never trips), two rounds: every
        forged JWT refused with 403, the healthy session (a valid JWT) loses
        nothing, and a summary line with each target's medians (and ratios
        to node, with the verdict on the refusal target, when the bridge is
        here).
        """
        why = nodebridge.unavailable(nodebridge.default_bridge(), MODULES)
        targets = ["wsproxy-jwt", "wsproxy-jwt-es256"] + ([] if why else ["node"])
        out = run_process([sys.executable, "-m", "bench.flood", "--targets", ",".join(targets),
                           "--requests", "100", "--concurrency", "10", "--sources", "5",
                           "--baseline", "0.3", "--rounds", "2", "--nice", "0",
                           "--node-modules", MODULES])
        status = await out.ended
        text = out.output.decode(errors="replace")
        self.assertEqual(status, 0, text[-3000:])
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        reports, [summary] = lines[:-1], lines[-1:]
        self.assertEqual(sorted(r["target"] for r in reports), sorted(targets * 2), text)
        for report in reports:
            self.assertEqual(report["statuses"], {"403": 100}, report)
            self.assertEqual(report["healthy_lost"], 0, report)
            self.assertIsNone(report["healthy_closed"], report)
        self.assertEqual(sorted(summary["targets"]), sorted(targets), summary)
        for target in ("wsproxy-jwt", "wsproxy-jwt-es256"):
            entry = summary["targets"][target]
            self.assertIn("JWT", entry["token"])
            self.assertIsNotNone(entry["cpu_ms_per_refusal_median"], entry)
            self.assertEqual("cpu_ratio_to_node_median" in entry, not why, entry)
        if not why:
            self.assertIn("target forged-JWT refusal CPU <= half of Node's (wsproxy-jwt): ", text)

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
