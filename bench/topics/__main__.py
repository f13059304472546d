"""C{python -m bench.topics}: see C{--help}."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from bench import nodebridge
from bench.errors import exit_status
from bench.servers import HERE

from . import __doc__ as DOC
from .run import NODE_TOPICS, PROG, SCENARIOS, TARGETS, run

# flag, type, default, help
OPTIONS: tuple[tuple[str, type, object, str], ...] = (
    ("--targets", str, "wsproxy,node", f"comma list of {', '.join(TARGETS)}"),
    ("--scenarios", str, ",".join(SCENARIOS), f"comma list of {', '.join(SCENARIOS)}"),
    ("--rounds", int, 2, "rounds, the targets (and ways) alternating"),
    ("--sockets", int, 10000, "sockets of fanout, per-session and resume-mix (one session each)"),
    ("--publishes", int, 50, "publishes of fanout, per-session and resume-mix"),
    ("--centrifugo-sockets", str, "1000,10000", "sockets of centrifugo: a comma list of sizes"),
    ("--centrifugo-publishes", int, 20,
     "centrifugo batches (each: one message per session and one per group topic)"),
    ("--group", int, 10, "sockets per group topic in centrifugo"),
    ("--size", int, 100, "message bytes"),
    ("--procs", int, os.cpu_count() or 2, "client worker processes"),
    ("--concurrency", int, 200, "handshakes in flight (all workers together)"),
    ("--connect-timeout", float, 60, "seconds a socket waits for its handshake"),
    ("--settle", float, 30, "seconds a batch's deliveries may take before the next batch"),
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    doc = DOC or ""
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description=doc.split("\n\n")[0].strip(),
        epilog=doc.partition("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--redis-server", default="", help="redis-server binary")
    parser.add_argument("--checkout", default=str(HERE),
                        help="the checkout whose wsproxy runs (default: %(default)s)")
    nodebridge.add_options(parser)
    # this benchmark's bridge is the one extended with topics, not the shared one
    parser.set_defaults(bridge=os.environ.get("NODE_TOPICS_BRIDGE", NODE_TOPICS))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(PROG, lambda: run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
