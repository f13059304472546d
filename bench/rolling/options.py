"""The command line, each option with its default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from bench.resume.stream import MIN_SIZE

PROG = "python -m bench.rolling"

MODES = ("drain", "kill")

DESCRIPTION = """\
A rolling deploy of wsproxy containers under load, proved end to end.

A private redis-server and HAProxy (host processes; deploy/haproxy/haproxy.cfg
as shipped, with a server line per container) in front of --containers
wsproxy containers of the real image (--image, docker run --network host,
RESUME=true and UPSTREAM=stream). --clients clients connect through HAProxy
with ?resume=&ack=1; each receives a numbered stream published with
wsproxy_publish (--down-rate messages/s per client) and sends a numbered
stream up (--up-rate messages/s per client, "<id>\\n<message>"), resending
what was not acknowledged after a reconnect. A backend thread reads the
partition streams through a consumer group and drops the copies by message
id (the recipe of docs/guide/durable-upstream.md).

After --warmup seconds the containers are replaced one at a time, as a
rolling update does: the old one stopped (mode drain: docker stop -t
DRAIN+GRACE+MARGIN, SIGTERM; mode kill: docker kill, SIGKILL), its exit
awaited, a new one started on the same port, and the next one only once the
new one answers /ready with 200 and HAProxy marks it up, then --pause
seconds. Publishing goes on --tail seconds after the deploy.

Counted at the end, both directions, per session: lost, duplicated,
reordered (up: before and after the backend's dedup); every client
reconnected; reconnect time (connection lost -> next open) p50/p99/max;
the deploy's duration; each old container's exit code and whether its log
says "shutdown complete". Each mode (--modes) is a fresh redis-server,
HAProxy and set of containers. A summary goes to stderr and one JSON line to
stdout; the exit status is 1 if anything was lost, duplicated or reordered
in mode drain (or a stopped container did not exit 0), 2 on a setup error.

Example (from the repository root):
  PYTHONPATH=$PWD .venv/bin/python -m bench.rolling --clients 1000 --containers 2
"""


@dataclass(frozen=True)
class Options:
    clients: int
    containers: int
    modes: tuple[str, ...]
    down_rate: float
    up_rate: float
    size: int
    warmup: float
    tail: float
    duration: float
    pause: float
    drain: float
    close_delay: float
    grace: float
    stop_margin: float
    reconnect_max: float
    retry_max: float
    history_max_length: int
    history_max_age: float
    partitions: int
    image: str
    haproxy: str
    lb_retry: str
    redis_server: str
    procs: int
    concurrency: int
    connect_timeout: float
    settle: float
    settle_max: float
    agent: str
    seed: int
    keep: bool

    @property
    def stop_timeout(self) -> int:
        """docker stop -t: the drain window, the grace period and a margin."""
        return int(self.drain + self.grace + self.stop_margin + 0.999)

    @property
    def publish_duration(self) -> float:
        """
        --duration, or long enough for the warm-up, the deploy (per
        container: the drain window, the pause and 5 s to exit, start and
        be marked up) and the tail.
        """
        if self.duration > 0:
            return self.duration
        return self.warmup + self.containers * (self.drain + self.pause + 5) + self.tail


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--clients", type=int, default=1000, help="sessions, one client each")
    add("--containers", type=int, default=2, help="wsproxy containers behind HAProxy (>= 2)")
    add("--modes", default="drain,kill",
        help="drain (docker stop: SIGTERM, the graceful shutdown), kill (docker kill: SIGKILL)")
    add("--down-rate", type=float, default=1.0, help="messages down per second per client")
    add("--up-rate", type=float, default=1.0, help="messages up per second per client")
    add("--size", type=int, default=100, help=f"message bytes (>= {MIN_SIZE})")
    add("--warmup", type=float, default=5.0, help="seconds of traffic before the deploy")
    add("--tail", type=float, default=5.0,
        help="seconds of traffic after the deploy (with --duration 0)")
    add("--duration", type=float, default=0,
        help="seconds of traffic in all (0: warmup + (drain + pause + 5) per container + tail)")
    add("--pause", type=float, default=2.0,
        help="seconds between a new container marked up and the next stop")
    add("--drain", type=float, default=5.0,
        help="the containers' SHUTDOWN_DRAIN_SECS (the default; deploy/haproxy/haproxy.cfg "
             "marks a draining instance down within fall x inter + timeout check = 3 s)")
    add("--close-delay", type=float, default=0.0,
        help="the containers' SHUTDOWN_CLOSE_DELAY_SECS (3: clients closed once the shipped "
             "HAProxy configuration has surely marked the instance down)")
    add("--grace", type=float, default=10.0, help="the containers' SHUTDOWN_GRACE_PERIOD_SECS")
    add("--stop-margin", type=float, default=5.0,
        help="docker stop -t is drain + grace + this")
    add("--reconnect-max", type=float, default=1.0,
        help="a dropped client reconnects after U(0, this) seconds (jitter)")
    add("--retry-max", type=float, default=0.5,
        help="after the n-th failed attempt in a row, the next after U(0, this * 2**(n-1)) s")
    add("--history-max-length", type=int, default=1000, help="HISTORY_MAX_LENGTH")
    add("--history-max-age", type=float, default=300, help="HISTORY_MAX_AGE_SECS")
    add("--partitions", type=int, default=16, help="UPSTREAM_PARTITIONS")
    add("--image", default="wsproxy:dev", help="the wsproxy image (bin/dev image builds it)")
    add("--haproxy", default="haproxy", help="the haproxy binary")
    add("--lb-retry", choices=("503", "conn"), default="503",
        help="503: deploy/haproxy/haproxy.cfg as shipped, which retries an upgrade a "
             "draining wsproxy answered 503 on another server; conn: the same without its "
             "retry-on line (HAProxy's default: only a refused connection is retried)")
    add("--redis-server", default="", help="redis-server binary (default: on PATH)")
    add("--procs", type=int, default=os.cpu_count() or 2, help="client worker processes")
    add("--concurrency", type=int, default=200, help="handshakes in flight per worker at start")
    add("--connect-timeout", type=float, default=10.0)
    add("--settle", type=float, default=5.0,
        help="after the traffic: stop once nothing changed for this long")
    add("--settle-max", type=float, default=60.0, help="longest wait for stragglers")
    add("--agent", default="bench", help="agent id in the URL path")
    add("--seed", type=int, default=1, help="seed of the reconnect delays")
    add("--keep", action="store_true", help="keep the logs (their directory is printed)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = _parser()
    values = vars(parser.parse_args(argv))
    modes = tuple(m for m in values.pop("modes").split(",") if m)
    for mode in modes:
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    options = Options(modes=modes, **values)
    if not modes:
        parser.error("--modes: at least one")
    if options.containers < 2:
        parser.error("--containers must be >= 2 (one is replaced while the others serve)")
    if options.clients < 1 or options.procs < 1 or options.concurrency < 1:
        parser.error("--clients, --procs and --concurrency must be >= 1")
    if options.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE}")
    if options.down_rate <= 0 or options.up_rate <= 0:
        parser.error("--down-rate and --up-rate must be > 0")
    return options
