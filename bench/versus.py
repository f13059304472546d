"""
wsproxy and the Node.js bridge side by side: C{python -m bench.versus}
(C{bench/run.sh versus}).

One private redis-server; for every round, scenario and target (wsproxy with
its defaults, C{LOG_LEVEL=warn}, C{WORKERS=1}; the Node.js bridge of
C{../shared/peers/node_bridge.js}, see L{bench.nodebridge}) a fresh server
and one run of the same load tool (C{python -m bench.loadtest --pid ...}) at
it. The targets alternate (their order swaps every round), so a change in
the host's load hits both. Printed per scenario: one JSON line on stdout with
each round's figures for both targets and their ratio wsproxy/node (a ratio
is taken within a round), and a table on stderr.

The scenarios (sizes are options; the defaults are those of docs/benchmarks.md):

  down-burst  --sessions x --burst messages of --size bytes published as
              fast as Redis takes them: the proxy reads Redis in large
              chunks, so each socket gets many messages per turn and one
              send carries several frames. CPU per delivered message.
  down-turn   --rate messages/s round-robin over --sessions for --duration:
              about one message per socket per event-loop turn, a send each.
              CPU per delivered message, latency p50/p99, lost.
  up-burst    every client sends --burst messages in one write: many frames
              per read. CPU per published message.
  up-turn     --rate messages/s in all, round-robin over the clients, each its
              own write: about one frame per socket per turn. CPU per
              published message, latency p50/p99, lost.
  conn        --conn-clients connections, --concurrency handshakes in flight,
              then held idle --idle seconds: two lines, "setup" (CPU per
              accepted connection) and "rss-idle" (RSS growth per idle
              connection from the fresh server's start, read after the idle
              time).
  storm       --storm-clients clients with valid tokens connecting all at
              once (in flight together, from --storm-sources loopback
              addresses): connected, refused (by HTTP status, resets,
              timeouts), listen-queue overflows, connect p50/p99, total time,
              server CPU.

--conn-clients may list sizes (1000,10000,19000): the conn scenario then
runs once per size, on a fresh server each, its lines named setup@SIZE and
rss-idle@SIZE.

The targets: wsproxy (Redis tokens: SETEX session:{id}:auth, checked with
one EVALSHA), wsproxy-jwt-hs256 and wsproxy-jwt-es256 (AUTH_MODE=jwt with
JWT_SECRET, or JWT_PUBLIC_KEY_FILE and a P-256 key: the load tool mints
every client's JWT before its timed phase; keys made afresh for each run),
and node. Every target but node gets a ratio to node; the JWT targets also
one to wsproxy (the same proxy with Redis tokens).

With --syscalls, perf stat counts each server's sends, reads and epoll
waits per message: which regime a scenario really is in.

The load tool says when it (or the whole host) was saturated during a
phase; such figures are marked "!" (the tool) or "*" (the host) in the
table and listed in the JSON.
Exit status: 0, or 1 if a run reported a problem (a message lost, a
connection failed), 2 on a usage error or a server that did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from bench import nodebridge
from bench.errors import Fatal, exit_status
from bench.children import raise_open_files_limit
from bench.jwtkeys import JwtKeys
from bench.loadtest.procstat import rss_bytes
from bench.nodebridge import NodeBridge
from bench.servers import LOOPBACK, ProxyProcess, RedisServer

TARGETS = ("wsproxy", "wsproxy-jwt-hs256", "wsproxy-jwt-es256", "node")
#: the JWT targets: their algorithm
JWT_TARGETS = {"wsproxy-jwt-hs256": "HS256", "wsproxy-jwt-es256": "ES256"}
RUNS = ("down-burst", "down-turn", "up-burst", "up-turn", "conn", "storm")

Figures = dict[str, Any]


# flag, type, default, help
OPTIONS: tuple[tuple[str, type, object, str], ...] = (
    # what runs
    ("--targets", str, "wsproxy,node", f"comma list of {', '.join(TARGETS)}"),
    ("--scenarios", str, ",".join(RUNS), f"comma list of {', '.join(RUNS)}"),
    ("--rounds", int, 2, "rounds, the targets alternating"),
    ("--procs", int, os.cpu_count() or 2, "load-tool client processes"),
    # the message scenarios
    ("--sessions", int, 1000, "sessions of the message scenarios"),
    ("--burst", int, 100, "messages per session in the burst scenarios"),
    ("--size", int, 100, "message bytes"),
    ("--rate", float, 10000, "messages/s of the one-message-per-turn scenarios, all sessions"),
    ("--duration", float, 10, "seconds of the one-message-per-turn scenarios"),
    # the connection scenarios
    ("--conn-clients", str, "10000",
     "connections of the conn scenario; a comma list runs it once per size"),
    ("--conn-sources", int, 1,
     "loopback addresses the conn scenario comes from, 127.0.0.1 and up (1: the OS picks)"),
    ("--concurrency", int, 500, "handshakes in flight in the conn scenario"),
    ("--idle", float, 10, "seconds the conn scenario holds its connections idle"),
    ("--storm-clients", int, 10000, "clients of the reconnect storm, all in flight"),
    ("--storm-sources", int, 4, "loopback addresses the storm comes from, 127.0.0.1 and up"),
    ("--connect-timeout", float, 60, "seconds a storm client waits for its handshake"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.versus",
        description="wsproxy and the Node.js bridge under the same load tool, side by side.",
        epilog="The scenarios" + (__doc__ or "").partition("The scenarios")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--redis-server", default="", help="redis-server binary")
    parser.add_argument("--syscalls", action="store_true",
                        help="count each server's sends, reads and event-loop waits (epoll) "
                             "per message with perf stat: which regime a scenario is in")
    nodebridge.add_options(parser)
    return parser.parse_args(argv)


# -- what a scenario runs and what it reads from the load tool's result


def _phase(result: dict[str, Any], name: str) -> dict[str, Any]:
    phase: dict[str, Any] = result.get("phases", {}).get(name, {})
    return phase


def _saturation(phase: dict[str, Any]) -> Figures:
    figures: Figures = {"tool_saturated": bool(phase.get("tool_saturated")),
                        "host_saturated": bool(phase.get("host_saturated"))}
    if phase.get("tool_note"):
        figures["tool_note"] = phase["tool_note"]
    return figures


def _latency(phase: dict[str, Any]) -> Figures:
    latency = phase.get("latency_ms") or {}
    return {"p50_ms": latency.get("p50"), "p99_ms": latency.get("p99")}


def _messages(scenario: str, phase_name: str,
              received: str) -> Callable[[dict[str, Any], int], dict[str, Figures]]:
    """The figures of a message scenario: CPU per message, what arrived, latency."""
    def figures(result: dict[str, Any], rss_start: int) -> dict[str, Figures]:
        phase = _phase(result, phase_name)
        return {scenario: {
            "cpu_us_per_msg": phase.get("proxy_cpu_us_per_msg"),
            "sent": phase.get("sent"), received: phase.get(received),
            "lost": phase.get("lost"), **_latency(phase), **_saturation(phase)}}
    return figures


def _conn(result: dict[str, Any], rss_start: int) -> dict[str, Figures]:
    connect, idle = _phase(result, "connect"), _phase(result, "idle")
    opened = connect.get("ok") or 0
    per_conn = connect.get("proxy_cpu_us_per_conn")
    rss_mib = idle.get("proxy_rss_mib")
    rss_kib = (round((rss_mib * 2**20 - rss_start) / 1024 / opened, 2)
               if opened and rss_mib is not None and rss_start else None)
    return {
        "setup": {"cpu_ms_per_conn": round(per_conn / 1000, 3) if per_conn is not None else None,
                  "connected": opened, "failed": connect.get("failed"),
                  **_latency(connect), **_saturation(connect)},
        "rss-idle": {"rss_kib_per_conn": rss_kib, "connections": opened,
                     "rss_mib": rss_mib, "dropped": idle.get("dropped")},
    }


def _storm(result: dict[str, Any], rss_start: int) -> dict[str, Figures]:
    connect = _phase(result, "connect")
    return {"storm": {
        "clients": connect.get("clients"), "connected": connect.get("ok"),
        "refused": connect.get("failed"), "failures": connect.get("failures"),
        "listen_overflows": connect.get("listen_overflows"),
        **_latency(connect), "total_s": connect.get("seconds"),
        "cpu_s": connect.get("proxy_cpu_seconds"), **_saturation(connect)}}


@dataclass(frozen=True)
class Scenario:
    """A figure the driver reports, its unit and what the ratio compares."""

    name: str
    metric: str  # the figure whose ratio wsproxy/node is the headline
    label: str
    regime: str
    ratios: tuple[str, ...]  # the figures a ratio is given for


SCENARIOS = {s.name: s for s in (
    Scenario("down-burst", "cpu_us_per_msg", "down, burst: CPU µs/msg",
             "many messages per socket per turn", ("cpu_us_per_msg",)),
    Scenario("down-turn", "cpu_us_per_msg", "down, 1 msg/turn: CPU µs/msg",
             "about one message per socket per turn", ("cpu_us_per_msg", "p99_ms")),
    Scenario("up-burst", "cpu_us_per_msg", "up, burst: CPU µs/msg",
             "many frames per socket per read", ("cpu_us_per_msg",)),
    Scenario("up-turn", "cpu_us_per_msg", "up, 1 msg/turn: CPU µs/msg",
             "about one frame per socket per turn", ("cpu_us_per_msg", "p99_ms")),
    Scenario("rss-idle", "rss_kib_per_conn", "RSS KiB / idle conn",
             "fresh server, idle connections", ("rss_kib_per_conn",)),
    Scenario("setup", "cpu_ms_per_conn", "set-up: CPU ms/conn",
             "handshakes in flight: --concurrency", ("cpu_ms_per_conn",)),
    Scenario("storm", "total_s", "storm: total s",
             "all clients in flight at once", ("total_s", "p99_ms", "cpu_s")),
)}


def _sources(count: int) -> str:
    return ",".join(f"127.0.0.{1 + i}" for i in range(max(1, count)))


def conn_sizes(opts: argparse.Namespace) -> list[int]:
    """The --conn-clients sizes."""
    try:
        sizes = [int(item) for item in str(opts.conn_clients).split(",") if item.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise Fatal(f"--conn-clients must be a comma list of sizes >= 1 (got {opts.conn_clients!r})")
    return sizes


def scenario_of(name: str) -> Scenario:
    """The scenario a JSON line's name belongs to (C{setup@1000}: C{setup})."""
    return SCENARIOS[name.partition("@")[0]]


def loadtest_args(run: str, opts: argparse.Namespace, size: int = 0) -> list[str]:
    """
    The load tool's options for one run of a scenario (target and --pid
    aside); C{size}: the conn scenario's connections (default: the first
    --conn-clients).
    """
    sessions = ["--clients", str(opts.sessions), "--size", str(opts.size)]
    paced = ["--rate", f"{opts.rate:g}", "--duration", f"{opts.duration:g}"]
    if run == "down-burst":
        return sessions + ["--burst", str(opts.burst), "--phases", "connect,down"]
    if run == "down-turn":
        return sessions + paced + ["--phases", "connect,paced"]
    if run == "up-burst":
        return sessions + ["--upstream", str(opts.burst), "--phases", "connect,up"]
    if run == "up-turn":
        return sessions + paced + ["--phases", "connect,uppaced"]
    if run == "conn":
        sources = (["--source-addresses", _sources(opts.conn_sources)]
                   if opts.conn_sources > 1 else [])
        return ["--clients", str(size or conn_sizes(opts)[0]),
                "--concurrency", str(opts.concurrency),
                "--idle", f"{opts.idle:g}", "--phases", "connect", *sources]
    if run == "storm":
        return ["--clients", str(opts.storm_clients),
                "--concurrency", str(opts.storm_clients),
                "--connect-timeout", f"{opts.connect_timeout:g}",
                "--source-addresses", _sources(opts.storm_sources), "--phases", "connect"]
    raise Fatal(f"unknown scenario {run!r}; choose from {', '.join(RUNS)}")


FIGURES: dict[str, Callable[[dict[str, Any], int], dict[str, Figures]]] = {
    "down-burst": _messages("down-burst", "down", "delivered"),
    "down-turn": _messages("down-turn", "paced", "delivered"),
    "up-burst": _messages("up-burst", "up", "arrived"),
    "up-turn": _messages("up-turn", "uppaced", "arrived"),
    "conn": _conn, "storm": _storm,
}


# -- the servers


Server = Union[ProxyProcess, NodeBridge]


def start(target: str, redis_url: str, workdir: Path, opts: argparse.Namespace,
          keys: Optional[JwtKeys] = None) -> Server:
    """A fresh server of ``target``, answering."""
    if target == "node":
        return NodeBridge(opts.bridge, opts.node_modules, redis_url, workdir)
    # defaults, LOG_LEVEL=warn, WORKERS=1 (ProxyProcess's own)
    env = keys.proxy_env(JWT_TARGETS[target]) if keys is not None and target in JWT_TARGETS else {}
    return ProxyProcess(target, redis_url, workdir, env).started()


# the system calls --syscalls counts, by what they are
SYSCALLS = {"sends": ("sendto", "sendmsg", "write", "writev"),
            "reads": ("recvfrom", "recvmsg", "read", "readv"),
            "waits": ("epoll_wait", "epoll_pwait")}


class SyscallCounter:
    """
    C{perf stat} counting a server's system calls (tracepoints, no
    sampling) for as long as one load-tool run lasts.
    """

    def __init__(self, pid: int, workdir: Path) -> None:
        perf = shutil.which("perf")
        if perf is None:
            raise Fatal("--syscalls needs perf (Debian: linux-perf)")
        self._out = workdir / "perf.csv"
        events = ",".join(f"syscalls:sys_enter_{name}"
                          for names in SYSCALLS.values() for name in names)
        self._process = subprocess.Popen(
            [perf, "stat", "-x", ",", "-e", events, "-p", str(pid), "-o", str(self._out)],
            stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, int]:
        """The calls counted, by kind (sends, reads, waits)."""
        self._process.send_signal(signal.SIGINT)
        self._process.wait(10)
        counts: dict[str, int] = {}
        for line in self._out.read_text().splitlines():
            value, _, rest = line.partition(",")
            name = rest.split(",")[1].rpartition("sys_enter_")[2] if "," in rest else ""
            if value.isdigit():
                counts[name] = int(value)
        if not counts:
            raise Fatal(f"perf counted nothing (tracepoints not permitted?): "
                        f"{self._out.read_text()[:300]}")
        return {kind: sum(counts.get(name, 0) for name in names)
                for kind, names in SYSCALLS.items()}


def measure(run: str, target: str, server: Server, redis_url: str,
            opts: argparse.Namespace, workdir: Path, size: int = 0,
            keys: Optional[JwtKeys] = None) -> tuple[dict[str, Figures], list[str]]:
    """One load-tool run at ``server``: each scenario's figures, and the problems it found."""
    jwt = (keys.loadtest_args(JWT_TARGETS[target])
           if keys is not None and target in JWT_TARGETS else [])
    rss_start = rss_bytes(server.pid) or 0
    counter = SyscallCounter(server.pid, workdir) if opts.syscalls else None
    argv = [sys.executable, "-m", "bench.loadtest", "--url", f"ws://{LOOPBACK}:{server.port}",
            "--redis-url", redis_url, "--pid", str(server.pid), "--procs", str(opts.procs),
            # a starved server on a shared host may need long to work through a burst
            "--settle-max", "30", "--json-only", *loadtest_args(run, opts, size), *jwt]
    done = subprocess.run(argv, stdout=subprocess.PIPE, check=False)
    calls = counter.stop() if counter is not None else None
    lines = [line for line in done.stdout.decode(errors="replace").splitlines()
             if line.startswith("{")]
    if done.returncode not in (0, 1) or not lines:
        raise Fatal(f"{run} at {target}: the load tool exited {done.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    figures = FIGURES[run](result, rss_start)
    if calls is not None:
        for figs in figures.values():
            # the whole run's calls (its connection set-up included) per message
            count = figs.get("delivered") or figs.get("arrived")
            if count:
                figs.update({f"{kind}_per_msg": round(n / count, 2) for kind, n in calls.items()})
    return figures, [f"{run} at {target}: {p}" for p in result.get("problems", [])]


# -- the report


def _median(values: list[Any]) -> Optional[float]:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(numbers), 3) if numbers else None


def _ratio(ours: Any, theirs: Any) -> Optional[float]:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0:
        return round(ours / theirs, 2)
    return None


def _references(target: str, targets: list[str]) -> list[str]:
    """What a target's figures are compared with: node, and wsproxy for a JWT target."""
    refs = ["node"] if target != "node" and "node" in targets else []
    if target in JWT_TARGETS and "wsproxy" in targets:
        refs.append("wsproxy")
    return refs


def summary(name: str, rounds: list[dict[str, Figures]], targets: list[str],
            node_unavailable: Optional[str]) -> dict[str, Any]:
    """
    The JSON line of one scenario: every round, the medians and the ratios.

    Each round has C{ratios}: target -> reference -> figure -> ratio, taken
    within the round (reference node for every other target, and wsproxy
    for the JWT targets); C{ratio} is wsproxy/node's, as before the JWT
    targets. The line has the medians of the headline figure's ratios the
    same way (C{ratios}, C{ratio}).
    """
    scenario = scenario_of(name)
    line: dict[str, Any] = {"scenario": name, "regime": scenario.regime,
                            "metric": scenario.metric, "rounds": []}
    for figures in rounds:
        entry: dict[str, Any] = dict(figures)
        ratios = {target: {ref: {key: _ratio(figures[target].get(key), figures[ref].get(key))
                                 for key in scenario.ratios}
                           for ref in _references(target, targets) if ref in figures}
                  for target in figures}
        ratios = {target: by_ref for target, by_ref in ratios.items() if by_ref}
        if ratios:
            entry["ratios"] = ratios
        if "node" in ratios.get("wsproxy", {}):
            entry["ratio"] = ratios["wsproxy"]["node"]
        line["rounds"].append(entry)
    for target in targets:
        line[target] = _median([f[target].get(scenario.metric) for f in rounds if target in f])
    if node_unavailable is not None:
        line["node"] = None
        line["node_unavailable"] = node_unavailable
    medians: dict[str, dict[str, Optional[float]]] = {}
    for target in targets:
        for ref in _references(target, targets):
            medians.setdefault(target, {})[ref] = _median(
                [r["ratios"][target][ref].get(scenario.metric) for r in line["rounds"]
                 if ref in r.get("ratios", {}).get(target, {})])
    line["ratios"] = medians
    line["ratio"] = medians.get("wsproxy", {}).get("node")
    line["tool_saturated"] = sorted({target for f in rounds for target, figs in f.items()
                                     if figs.get("tool_saturated")})
    line["host_saturated"] = sorted({target for f in rounds for target, figs in f.items()
                                     if figs.get("host_saturated")})
    return line


def _cell(values: list[Any]) -> str:
    return ", ".join("-" if v is None else f"{v:g}" for v in values) or "-"


def _notes(scenario: Scenario, figs: Figures) -> list[str]:
    """What a round's figures say beside the headline: losses, syscalls, latency, storm."""
    extra = []
    if figs.get("lost"):
        extra.append(f"lost {figs['lost']}")
    if "sends_per_msg" in figs:
        extra.append(f"per msg {figs['sends_per_msg']} sends, "
                     f"{figs['reads_per_msg']} reads, {figs['waits_per_msg']} waits")
    if "p99_ms" in figs and scenario.name not in ("setup", "storm"):
        extra.append(f"p50/p99 {figs.get('p50_ms')}/{figs.get('p99_ms')} ms")
    if scenario.name == "setup" and figs.get("failed"):
        extra.append(f"{figs['failed']} failed")
    if scenario.name == "storm":
        extra.append(f"{figs.get('connected')}/{figs.get('clients')} connected, "
                     f"p50/p99 {figs.get('p50_ms')}/{figs.get('p99_ms')} ms, "
                     f"overflows {figs.get('listen_overflows')}, CPU {figs.get('cpu_s')} s"
                     + (f", refused {figs.get('failures')}" if figs.get("refused") else ""))
    return extra


def table(lines: list[dict[str, Any]], targets: list[str]) -> str:
    """
    The readable table: per scenario a row per target with each round's
    headline figure, its ratios (to node; to wsproxy for the JWT targets)
    and notes.
    """
    rows = [f"{'scenario / target':<34} {'per round':>24} {'/node':>18} {'/wsproxy':>18}  notes"]
    for line in lines:
        scenario = scenario_of(line["scenario"])
        name = line["scenario"]
        size = f" ({name.partition('@')[2]})" if "@" in name else ""
        rows.append(f"{scenario.label + size}")
        for target in targets + (["node"] if line.get("node_unavailable") else []):
            mine = [r[target] for r in line["rounds"] if target in r]
            values = [f.get(scenario.metric) for f in mine]
            text = (_cell(values) + ("!" if any(f.get("tool_saturated") for f in mine) else "")
                    + ("*" if any(f.get("host_saturated") for f in mine) else ""))
            if target == "node" and line.get("node_unavailable"):
                text = "n/a"
            ratio_cells = []
            for ref in ("node", "wsproxy"):
                ratios = [r["ratios"][target][ref].get(scenario.metric) for r in line["rounds"]
                          if ref in r.get("ratios", {}).get(target, {})]
                ratio_cells.append(_cell(ratios) if ratios else "")
            notes = "; ".join(n for f in mine for n in _notes(scenario, f))
            rows.append(f"  {target:<32} {text:>24} {ratio_cells[0]:>18} {ratio_cells[1]:>18}"
                        f"  {notes}")
    rows.append("(one value per round, ratios taken within a round; ! = the load tool was "
                "saturated in a round: the figure is a lower bound; * = every core of the host "
                "was busy in a round: the proxy, Redis, the tool and other work competed for CPU)")
    rows += verdicts(lines)
    return "\n".join(rows)


def verdicts(lines: list[dict[str, Any]]) -> list[str]:
    """
    The JWT issue's target for set-up, where this run measured it: HS256
    set-up CPU at most the Node bridge's (the median of the ratios taken
    within each round).
    """
    said = []
    for line in lines:
        if scenario_of(line["scenario"]).name != "setup":
            continue
        ratio = line.get("ratios", {}).get("wsproxy-jwt-hs256", {}).get("node")
        if ratio is not None:
            said.append(f"target HS256 set-up CPU <= Node's ({line['scenario']}): "
                        f"{'met' if ratio <= 1 else 'NOT met'} (median ratio {ratio:g})")
    return said


# -- the run


def run(opts: argparse.Namespace) -> int:
    targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    runs = [r.strip() for r in opts.scenarios.split(",") if r.strip()]
    for name in targets:
        if name not in TARGETS:
            raise Fatal(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    for name in runs:
        loadtest_args(name, opts)  # unknown names fail here, before anything starts
    sizes = conn_sizes(opts)
    # (scenario, size): the conn scenario once per --conn-clients size
    plan = [(name, size) for name in runs for size in (sizes if name == "conn" else [0])]
    node_unavailable = None
    if "node" in targets:
        node_unavailable = nodebridge.unavailable(opts.bridge, opts.node_modules)
        if node_unavailable:
            print(f"bench.versus: the Node.js bridge cannot run here ({node_unavailable}): "
                  "wsproxy only, node figures absent", file=sys.stderr)
            targets.remove("node")
    # the servers this process starts inherit the limit: one descriptor per connection
    most = max(sizes + [opts.storm_clients] if "storm" in runs else sizes)
    problem = raise_open_files_limit(most + 256)
    if problem:
        print(f"bench.versus: {problem}: the largest runs may fail", file=sys.stderr)
    print(f"bench.versus: {os.cpu_count()} cores, targets {', '.join(targets)}, "
          f"{opts.rounds} round(s), {opts.sessions} sessions, {opts.size} B messages, "
          f"burst {opts.burst}/session, one-per-turn rate {opts.rate:g}/s for "
          f"{opts.duration:g} s, conn {opts.conn_clients} ({opts.concurrency} in flight, idle "
          f"{opts.idle:g} s), storm {opts.storm_clients}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          file=sys.stderr)
    # scenario -> one dict per round: target -> figures
    results: dict[str, list[dict[str, Figures]]] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        keys = JwtKeys.make(workdir) if set(targets) & set(JWT_TARGETS) else None
        redis_server = RedisServer(workdir, opts.redis_server)
        try:
            for round_no in range(opts.rounds):
                order = targets if round_no % 2 == 0 else targets[::-1]
                for name, size in plan:
                    rounds: dict[str, dict[str, Figures]] = {}
                    for target in order:
                        server = start(target, redis_server.url, workdir, opts, keys)
                        try:
                            figures, found = measure(name, target, server, redis_server.url,
                                                     opts, workdir, size, keys)
                        finally:
                            server.stop()
                        problems += found
                        for scenario, figs in figures.items():
                            if len(sizes) > 1 and name == "conn":
                                scenario = f"{scenario}@{size}"
                            rounds.setdefault(scenario, {})[target] = figs
                            print(f"  round {round_no + 1} {scenario:<14} {target:<18} "
                                  f"{scenario_of(scenario).metric} "
                                  f"{figs.get(scenario_of(scenario).metric)}", file=sys.stderr)
                    for scenario, by_target in rounds.items():
                        results.setdefault(scenario, []).append(by_target)
        finally:
            redis_server.stop()
    lines = [summary(name, rounds_of, targets, node_unavailable)
             for name, rounds_of in results.items()]
    for line in lines:
        print(json.dumps(line), flush=True)
    print(table(lines, targets), file=sys.stderr)
    for problem in problems:
        print(f"  problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: Optional[list[str]] = None) -> int:
    return exit_status("bench.versus", lambda: run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
