"""
The scenarios of the topics benchmark (see L{bench.topics}): the servers of
each run, the sessions written into Redis beside them, the sockets, and the
publishing of each delivery phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import redis

from bench import nodebridge
from bench.children import raise_open_files_limit
from bench.errors import Fatal
from bench.nodebridge import NodeBridge
from bench.servers import LOOPBACK, ProxyProcess, RedisServer, wait_for_functions

from .fleet import Fleet, Figures
from .report import Line, summary, table
from .workers import SocketSpec, WorkerConfig

PROG = "bench.topics"
SCENARIOS = ("fanout", "per-session", "centrifugo", "resume-mix")
TARGETS = ("wsproxy", "node")
AGENT = "bench"
TOKEN_TTL_SECS = 3600
#: the query of a resuming socket that reads labelled frames
RESUME_LABELS = "resume=&labels=1"
#: the Node.js bridge extended with topics, beside this module
NODE_TOPICS = str(Path(__file__).with_name("node_topics.js"))

Server = Union[ProxyProcess, NodeBridge]


@dataclass
class Context:
    opts: argparse.Namespace
    redis: RedisServer
    workdir: Path
    node_unavailable: str | None
    runs: int = 0  # runs so far: every run's sessions and topics have their own names

    def prefix(self, what: str) -> str:
        self.runs += 1
        return f"{what}{self.runs}-"


# -- the Redis side


def message(index: int, size: int) -> bytes:
    """Message C{index} of a phase, stamped with its publish time, C{size} bytes."""
    head = b"%d:%d:" % (index, time.time_ns())
    return head + b"x" * max(0, size - len(head))


def topic_channel(topic: str) -> str:
    return f"topic:{topic}:down"


def prepare_sessions(client: redis.Redis, prefix: str, count: int,
                     topics_of: Callable[[int], list[str]]) -> list[tuple[str, str]]:
    """C{count} sessions, each with a token and its topics (SADD session:S:topics); (id, token)."""
    sessions = [(f"{prefix}{i}", f"tok-{prefix}{i}") for i in range(count)]
    pipe = client.pipeline(transaction=False)
    for i, (session_id, token) in enumerate(sessions):
        pipe.set(f"session:{session_id}:auth", token, ex=TOKEN_TTL_SECS)
        topics = topics_of(i)
        if topics:
            pipe.sadd(f"session:{session_id}:topics", *topics)
            pipe.expire(f"session:{session_id}:topics", TOKEN_TTL_SECS)
        if len(pipe) >= 3000:
            pipe.execute()
    pipe.execute()
    return sessions


# -- the servers


def start(target: str, ctx: Context, env: dict[str, str] | None = None) -> Server:
    """A fresh server: wsproxy (TOPICS=true, defaults else, WORKERS=1) or the Node bridge."""
    if target == "node":
        return NodeBridge(ctx.opts.bridge, ctx.opts.node_modules, ctx.redis.url, ctx.workdir)
    return ProxyProcess(target, ctx.redis.url, ctx.workdir, {"TOPICS": "true", **(env or {})},
                        Path(ctx.opts.checkout).resolve()).started()


def measured(ctx: Context, target: str, specs: list[SocketSpec],
             body: Callable[[Server, Fleet], Figures],
             env: dict[str, str] | None = None) -> Figures:
    """A fresh server, its sockets connected, C{body}'s figures; both stopped after."""
    opts = ctx.opts
    server = start(target, ctx, env)
    fleet: Fleet | None = None
    try:
        fleet = Fleet(specs, opts.procs, WorkerConfig(LOOPBACK, server.port, AGENT,
                                                      max(1, opts.concurrency // opts.procs),
                                                      opts.connect_timeout))
        connected = fleet.connect()
        figures = body(server, fleet)
        figures.update(connected)
        return figures
    finally:
        if fleet is not None:
            fleet.shutdown()
        server.stop()


def _plain(sessions: list[tuple[str, str]], query: Callable[[int], str] = lambda i: "",
           ) -> list[SocketSpec]:
    return [SocketSpec(sid, token, query(i)) for i, (sid, token) in enumerate(sessions)]


def _publisher(client: redis.Redis, channel: str, size: int) -> Callable[[int], None]:
    def publish(index: int) -> None:
        client.publish(channel, message(index, size))
    return publish


# -- the scenarios: each returns {line name: {column: figures}} for one round


def fanout(ctx: Context, targets: list[str]) -> dict[str, dict[str, Figures]]:
    """One topic, --sockets sessions with one socket each, --publishes PUBLISHes on it."""
    opts = ctx.opts
    out: dict[str, Figures] = {}
    for target in targets:
        prefix = ctx.prefix("fan")
        topic = f"{prefix}t"
        sessions = prepare_sessions(ctx.redis.client, prefix, opts.sockets, lambda i: [topic])

        def body(server: Server, fleet: Fleet) -> Figures:
            return fleet.phase(server.pid, ctx.redis.pid, opts.publishes, opts.publishes,
                               opts.sockets, _publisher(ctx.redis.client, topic_channel(topic),
                                                        opts.size), opts.settle)

        out[target] = measured(ctx, target, _plain(sessions), body)
        _progress("fanout", target, out[target], "cpu_us_per_delivery")
    return {"fanout": out}


def per_session(ctx: Context, ways: list[str]) -> dict[str, dict[str, Figures]]:
    """
    The same --sockets sockets (each its own session, all in one topic) on
    one wsproxy: --publishes deliveries to all of them, each either as one
    PUBLISH per session (session:S:down) or as one PUBLISH on the topic.
    """
    opts = ctx.opts
    client = ctx.redis.client
    prefix = ctx.prefix("per")
    topic = f"{prefix}t"
    sessions = prepare_sessions(client, prefix, opts.sockets, lambda i: [topic])
    channels = [f"session:{sid}:down" for sid, _ in sessions]

    def each_session(index: int) -> None:
        body = message(index, opts.size)
        pipe = client.pipeline(transaction=False)
        for channel in channels:
            pipe.publish(channel, body)
        pipe.execute()

    publishers = {"per-session": each_session,
                  "topic": _publisher(client, topic_channel(topic), opts.size)}

    def body(server: Server, fleet: Fleet) -> Figures:
        figures: Figures = {}
        for way in ways:
            figures[way] = fleet.phase(server.pid, ctx.redis.pid, opts.publishes,
                                       opts.publishes, opts.sockets, publishers[way], opts.settle)
            _progress("per-session", way, figures[way], "cpu_us_per_delivery")
        return figures

    figures = measured(ctx, "wsproxy", _plain(sessions), body)
    connected = {key: figures.pop(key) for key in ("connected", "connect_s")}
    for way in ways:
        figures[way].update(connected)
    return {"per-session": figures}


def centrifugo(ctx: Context, targets: list[str]) -> dict[str, dict[str, Figures]]:
    """
    Every socket in its personal session and in one group topic of
    --group sockets; each of --centrifugo-publishes batches is one message
    per personal session and one per group topic, pipelined.
    """
    opts = ctx.opts
    client = ctx.redis.client
    lines: dict[str, dict[str, Figures]] = {}
    for size in sizes(opts.centrifugo_sockets, "--centrifugo-sockets"):
        name = f"centrifugo@{size}"
        out: dict[str, Figures] = {}
        for target in targets:
            prefix = ctx.prefix("cen")
            sessions = prepare_sessions(client, prefix, size,
                                        lambda i: [f"{prefix}g{i // opts.group}"])
            channels = ([f"session:{sid}:down" for sid, _ in sessions]
                        + [topic_channel(f"{prefix}g{g}")
                           for g in range((size + opts.group - 1) // opts.group)])
            personal = size

            def publish(batch: int) -> None:
                pipe = client.pipeline(transaction=False)
                mine, group = message(2 * batch, opts.size), message(2 * batch + 1, opts.size)
                for i, channel in enumerate(channels):
                    pipe.publish(channel, mine if i < personal else group)
                pipe.execute()

            def body(server: Server, fleet: Fleet) -> Figures:
                return fleet.phase(server.pid, ctx.redis.pid, 2 * opts.centrifugo_publishes,
                                   opts.centrifugo_publishes, 2 * size, publish, opts.settle)

            out[target] = measured(ctx, target, _plain(sessions), body)
            _progress(name, target, out[target], "deliveries_per_cpu_s")
        lines[name] = out
    return lines


def resume_mix(ctx: Context, variants: list[str]) -> dict[str, dict[str, Figures]]:
    """
    Fan-out on one topic (RESUME=true): "plain", every socket plain and
    PUBLISH topic:T:down; "recoverable", half the sockets with
    ?resume=&labels=1 and FCALL wsproxy_publish on the topic's history.
    """
    opts = ctx.opts
    client = ctx.redis.client
    out: dict[str, Figures] = {}
    for variant in variants:
        prefix = ctx.prefix("mix")
        topic = f"{prefix}t"
        sessions = prepare_sessions(client, prefix, opts.sockets, lambda i: [topic])
        recoverable = variant == "recoverable"
        specs = _plain(sessions, lambda i: RESUME_LABELS if recoverable and i % 2 == 0 else "")

        def publish(index: int) -> None:
            if recoverable:
                client.execute_command("FCALL", "wsproxy_publish", 2, f"topic:{topic}:history",
                                       f"topic:{topic}:meta", message(index, opts.size))
            else:
                client.publish(topic_channel(topic), message(index, opts.size))

        def body(server: Server, fleet: Fleet) -> Figures:
            if recoverable:
                wait_for_functions(client)
            return fleet.phase(server.pid, ctx.redis.pid, opts.publishes, opts.publishes,
                               opts.sockets, publish, opts.settle)

        out[variant] = measured(ctx, "wsproxy", specs, body, {"RESUME": "true"})
        out[variant]["resuming_sockets"] = sum(1 for s in specs if s.query)
        _progress("resume-mix", variant, out[variant], "cpu_us_per_delivery")
    return {"resume-mix": out}


def _progress(name: str, column: str, figures: Figures, metric: str) -> None:
    print(f"  {name:<18} {column:<12} {metric} {figures.get(metric)}, "
          f"delivered {figures.get('delivered')}/{figures.get('expected')}, "
          f"lost {figures.get('lost')}, last p50/p99 {figures.get('last_p50_ms')}/"
          f"{figures.get('last_p99_ms')} ms, host busy {figures.get('host_busy')}",
          file=sys.stderr, flush=True)


def sizes(text: str, flag: str) -> list[int]:
    try:
        values = [int(item) for item in str(text).split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise Fatal(f"{flag} must be a comma list of sizes >= 1 (got {text!r})")
    return values


# -- the run


def plan(opts: argparse.Namespace) -> tuple[list[str], list[str]]:
    targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    for target in targets:
        if target not in TARGETS:
            raise Fatal(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            raise Fatal(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    sizes(opts.centrifugo_sockets, "--centrifugo-sockets")
    if opts.group < 1 or opts.sockets < 1 or opts.publishes < 1 or opts.procs < 1:
        raise Fatal("--group, --sockets, --publishes and --procs must be >= 1")
    return targets, scenarios


def run(opts: argparse.Namespace) -> int:
    targets, scenarios = plan(opts)
    node_unavailable = None
    if "node" in targets:
        node_unavailable = nodebridge.unavailable(opts.bridge, opts.node_modules)
        if node_unavailable:
            print(f"{PROG}: the Node.js bridge cannot run here ({node_unavailable}): "
                  "wsproxy only, node figures absent", file=sys.stderr)
            targets.remove("node")
    most = max([opts.sockets] + sizes(opts.centrifugo_sockets, "--centrifugo-sockets"))
    problem = raise_open_files_limit(most + 512)
    if problem:
        print(f"{PROG}: {problem}: the largest runs may fail", file=sys.stderr)
    print(f"{PROG}: {os.cpu_count()} cores, targets {', '.join(targets)}, {opts.rounds} round(s), "
          f"scenarios {', '.join(scenarios)}, {opts.sockets} sockets, {opts.publishes} publishes, "
          f"centrifugo {opts.centrifugo_sockets} x {opts.centrifugo_publishes} batches "
          f"(groups of {opts.group}), {opts.size} B messages, {opts.procs} client processes, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", file=sys.stderr)
    results: dict[str, list[dict[str, Figures]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-topics-") as tmp:
        workdir = Path(tmp)
        redis_server = RedisServer(workdir, opts.redis_server)
        ctx = Context(opts, redis_server, workdir, node_unavailable)
        try:
            for round_no in range(opts.rounds):
                def order(columns: list[str]) -> list[str]:
                    return columns if round_no % 2 == 0 else columns[::-1]
                print(f"{PROG}: round {round_no + 1}", file=sys.stderr, flush=True)
                for scenario in scenarios:
                    found: dict[str, dict[str, Figures]]
                    if scenario == "fanout":
                        found = fanout(ctx, order(targets))
                    elif scenario == "per-session":
                        found = per_session(ctx, order(["per-session", "topic"]))
                    elif scenario == "centrifugo":
                        found = centrifugo(ctx, order(targets))
                    else:
                        found = resume_mix(ctx, order(["plain", "recoverable"]))
                    for name, columns in found.items():
                        results.setdefault(name, []).append(columns)
        except Exception:
            print(f"{PROG}: logs in {workdir}:", file=sys.stderr)
            for log in sorted(workdir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"-- {log.name}\n" + "\n".join(tail), file=sys.stderr)
            raise
        finally:
            redis_server.stop()
    lines: list[Line] = [summary(name, rounds, targets, node_unavailable)
                         for name, rounds in results.items()]
    for line in lines:
        print(json.dumps(line), flush=True)
    print(table(lines), file=sys.stderr)
    problems = [f"{line['scenario']}: {column}: lost {figs.get('lost')}, duplicates "
                f"{figs.get('duplicates')}, corrupt {figs.get('corrupt')}"
                for line in lines for r in line["rounds"] for column, figs in r.items()
                if isinstance(figs, dict) and "lost" in figs
                and (figs.get("lost") or figs.get("duplicates") or figs.get("corrupt"))]
    for problem in problems:
        print(f"  problem: {problem}", file=sys.stderr)
    return 1 if problems else 0
