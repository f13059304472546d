"""The command line: every option, its default, and which phases run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from bench.errors import Fatal
from .messages import MIN_SIZE

PROG = "python -m bench.loadtest"

PHASES = ("connect", "down", "paced", "up", "uppaced")

DESCRIPTION = """\
Load test for a running wsproxy (and the Redis it uses).

Phases (select with --phases, connect always runs because the others need it):

  connect  open --clients WebSocket connections, each with its own session and
           token (SETEX session:{sid}:auth; with --jwt-key-file a JWT for the
           session instead, nothing in Redis), at most --concurrency handshakes
           in flight; success count, connect rate, handshake latency p50/p99/max.
  down     downstream burst: --burst K messages PUBLISHed to every session's
           session:{sid}:down as fast as Redis takes them; delivered/sent,
           delivery rate, latency p50/p99/max (publish time is in the payload).
  paced    --rate R messages/s spread round-robin over all sessions for
           --duration D seconds; latency p50/p99/max and loss.
  idle     (with --idle S) after connect, hold every connection open and
           silent for S seconds: the proxy's CPU while idle (heartbeats,
           timers) and its RSS per connection at the end; none may drop.
  up       upstream burst: every client sends --upstream K messages of
           --size bytes in one write; a PSUBSCRIBE session:lt-<run>-*:up
           counter reports arrived/sent, rate and latency.
  uppaced  --rate R messages/s in all, round-robin over every client, each
           message its own write, for --duration D seconds (the proxy reads
           about one message per socket per turn); counted as for up.

Regimes: in down and up each socket carries many messages per event-loop
turn of the proxy (down: the proxy reads Redis in large chunks holding
dozens of messages per session; up: each client's K frames arrive in one
read), so frames share sends and reads. paced and uppaced at a rate the
proxy takes without falling behind carry about one message per socket per
turn: a send (or a read) per message.

With --pid PID (the proxy's process) the proxy's CPU time (user+sys from
/proc/PID/stat) is reported per delivered message for each phase, per
connection set-up, and its RSS growth (VmRSS) per open connection.  The Redis
server's CPU is reported the same way when Redis is local (INFO process_id).

The tool runs --procs worker processes (each owns a slice of the clients on a
lean asyncio raw-socket WebSocket client), --publishers publisher processes
(packed PUBLISH pipelines over redis-py connections) and, for the up phase, one
subscriber process.  It samples its own processes' CPU and says when it was
itself saturated during a phase.

Output: a readable table on stderr (unless --json-only) and exactly one JSON
line on stdout.  Exit status: 0 all good, 1 a message was lost / a connection
failed or dropped / a message was misrouted, duplicated or reordered,
2 usage error or target / Redis unreachable, 130 interrupted.

Examples (from the repository root):
  python -m bench.loadtest --clients 200 --burst 5 --rate 200 --duration 3 --upstream 5   # CI smoke
  python -m bench.loadtest --clients 1000 --burst 100 --phases connect,down,up --pid 1234
  python -m bench.loadtest --clients 10000 --concurrency 500 --phases connect,paced --rate 2000
"""


@dataclass(frozen=True)
class Options:
    """The parsed command line; see L{parse_args} for each option's meaning."""

    url: str
    redis_url: str
    clients: int
    concurrency: int
    burst: int
    size: int
    rate: float
    duration: float
    upstream: int
    phases: str
    pid: int
    json_only: bool
    token_ttl: int
    agent: str
    procs: int
    publishers: int
    auth: str
    binary: bool
    connect_timeout: float
    settle: float
    settle_max: float
    close_timeout: float
    phase_timeout: float
    saturation: float
    idle: float
    source_addresses: str
    jwt_key_file: str
    jwt_algorithm: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--url", default="ws://127.0.0.1:8080", help="wsproxy base URL (ws://HOST:PORT)")
    add("--redis-url", default="redis://127.0.0.1:6379")
    add("--clients", type=int, default=200, help="connections, one session each")
    add("--concurrency", type=int, default=500, help="handshakes in flight")
    add("--burst", type=int, default=10, help="K messages per session (down phase)")
    add("--size", type=int, default=100, help=f"payload bytes (>= {MIN_SIZE})")
    add("--rate", type=float, default=2000,
        help="paced messages per second (total; paced and uppaced phases)")
    add("--duration", type=float, default=10, help="paced and uppaced phase seconds")
    add("--upstream", type=int, default=10, help="K messages per client (up phase)")
    add("--phases", default="connect,down,paced,up")
    add("--pid", type=int, default=0,
        help="proxy process id for CPU / RSS figures (with WORKERS>1 the parent: "
             "its workers are counted too)")
    add("--json-only", action="store_true", help="only the JSON line, no table/progress")
    add("--token-ttl", type=int, default=600, help="seconds the tokens live in Redis")
    add("--agent", default="loadtest", help="agent id in the URL path")
    add("--procs", type=int, default=os.cpu_count() or 2, help="client worker processes")
    add("--publishers", type=int, default=1, help="publisher processes")
    add("--auth", choices=("header", "query"), default="header",
        help="send the token as Authorization: Bearer or ?access_token=")
    add("--binary", action="store_true", help="non-UTF-8 payloads (binary frames)")
    add("--connect-timeout", type=float, default=10.0)
    add("--settle", type=float, default=1.0,
        help="end a phase when counts stop changing for this long")
    add("--settle-max", type=float, default=10.0,
        help="longest wait for stragglers after publishing ends")
    add("--close-timeout", type=float, default=5.0)
    add("--phase-timeout", type=float, default=600.0, help="hard bound per phase")
    add("--saturation", type=float, default=0.85,
        help="a tool process busier than this fraction of a core counts as saturated")
    add("--idle", type=float, default=0.0,
        help="seconds to hold the connections idle after connect (0: no idle phase)")
    add("--source-addresses", default="",
        help="comma list of local addresses the clients connect from, round-robin "
             "(e.g. 127.0.0.1,127.0.0.2: one loopback address has ~28,000 ephemeral "
             "ports, so more connections need more addresses); default: the OS picks")
    add("--jwt-key-file", default="",
        help="mint every client's token as a JWT for its session (claims session_id, iat) "
             "signed with this key, for a proxy with AUTH_MODE=jwt, instead of storing "
             "random tokens in Redis: the HMAC secret as given (HS*), else a private key "
             "in PEM. Minted before the connect phase, so minting is never measured")
    add("--jwt-algorithm", default="HS256", help="the JWTs' alg (with --jwt-key-file)")
    return parser


def source_addresses(options: Options) -> tuple[str, ...]:
    """The --source-addresses list; empty: let the OS choose."""
    return tuple(a.strip() for a in options.source_addresses.split(",") if a.strip())


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The options of C{argv} (default: C{sys.argv}); exits 2 on a usage error."""
    return Options(**vars(_parser().parse_args(argv)))


def selected_phases(options: Options) -> list[str]:
    """
    The phases to run, in their fixed order, connect always first.

    @raise Fatal: if C{--phases} names an unknown phase.
    """
    asked = [p.strip() for p in options.phases.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PHASES]
    if unknown:
        raise Fatal(f"unknown phase(s) {','.join(unknown)}; choose from {','.join(PHASES)}")
    return [p for p in PHASES if p in asked or p == "connect"]
