"""
The Node.js bridge (``ws`` + ``ioredis``, C{../shared/peers/node_bridge.js})
as a second target of the benchmarks that compare wsproxy with it
(C{bench.flood}, C{bench.versus}): where its script and npm packages are,
whether it can run here (and if not, why), and the running process.

Its npm packages are installed once, by C{bench/run.sh}, into the gitignored
C{.cache/node-bridge} (C{$NODE_BRIDGE_MODULES}).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from bench.errors import Fatal
from bench.ports import free_port
from bench.servers import LOOPBACK, stop_process

# the packages node_bridge.js requires
MODULES = ("ws", "ioredis")


def default_bridge() -> str:
    """C{$NODE_BRIDGE}, else the bridge beside the checkout (../shared/peers)."""
    given = os.environ.get("NODE_BRIDGE")
    if given:
        return given
    here = Path(__file__).resolve().parents[1]
    for candidate in (Path("/work/shared/peers/node_bridge.js"),
                      here.parent / "shared" / "peers" / "node_bridge.js"):
        if candidate.exists():
            return str(candidate)
    return ""


def add_options(parser: argparse.ArgumentParser) -> None:
    """C{--bridge} and C{--node-modules}, with their defaults from the environment."""
    parser.add_argument("--bridge", default=default_bridge(),
                        help="node_bridge.js (default: $NODE_BRIDGE or ../shared/peers; "
                             "%(default)s)")
    parser.add_argument("--node-modules", default=os.environ.get("NODE_BRIDGE_MODULES", ""),
                        help="folder holding node_modules with ws and ioredis "
                             "(default: $NODE_BRIDGE_MODULES)")


def unavailable(script: str, modules: str) -> Optional[str]:
    """Why the bridge cannot run here, or None if it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not script or not Path(script).exists():
        return f"no bridge script (--bridge or $NODE_BRIDGE; got {script!r})"
    if not modules:
        return "no npm packages (--node-modules or $NODE_BRIDGE_MODULES)"
    missing = [m for m in MODULES if not (Path(modules) / "node_modules" / m).is_dir()]
    if missing:
        return f"{', '.join(missing)} not installed in {modules}/node_modules"
    return None


class NodeBridge:
    """The Node.js bridge, C{node node_bridge.js PORT REDIS_URL}, listening on loopback."""

    def __init__(self, script: str, modules: str, redis_url: str, workdir: Path) -> None:
        node = shutil.which("node")
        if node is None:
            raise Fatal("node is not on PATH")
        self.port = free_port()
        env = dict(os.environ, NODE_PATH=str(Path(modules) / "node_modules"))
        self._log = workdir / "node.log"
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen([node, script, str(self.port), redis_url],
                                             env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise Fatal(f"the node bridge exited:\n{self._log.read_text(errors='replace')}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise Fatal("the node bridge did not listen within 20 s")

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        stop_process(self._process)
