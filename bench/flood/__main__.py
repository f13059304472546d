"""
C{python -m bench.flood}: see L{bench.flood}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import redis
import redis.asyncio

from bench.errors import Fatal, exit_status
from bench.jwtkeys import JwtKeys
from bench.loadtest.procstat import cpu_seconds
from bench import nodebridge
from bench.loadtest.wsclient import OP_CLOSE, OP_PING, OP_PONG, client_frame
from bench.nodebridge import NodeBridge
from bench.servers import LOOPBACK, ProxyProcess, RedisServer

HEALTHY_SESSION = "flood-healthy"
HEALTHY_TOKEN = "flood-healthy-token"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description="A flood of upgrade requests with wrong tokens against wsproxy (and the "
                    "Node.js bridge) while one healthy session receives a steady stream.")
    parser.add_argument("--targets", default="wsproxy,node",
                        help="comma-separated: wsproxy, wsproxy-nolimit (AUTH_FAIL_LIMIT=0), "
                             "wsproxy-jwt, wsproxy-jwt-es256 (AUTH_MODE=jwt, HS256 or ES256: "
                             "the flood's tokens are JWTs for their sessions signed with a key "
                             "the proxy does not know), node (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds, the targets' order swapping every round; with more "
                             "than one, a summary line of medians and ratios to node within "
                             "each round (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=10000,
                        help="upgrade requests with a wrong token (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--sources", type=int, default=1,
                        help="client addresses the flood comes from: 127.0.0.2 onwards "
                             "(default: %(default)s)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="ms between two messages to the healthy session (default: %(default)s)")
    parser.add_argument("--baseline", type=float, default=3.0,
                        help="seconds of healthy traffic measured before the flood "
                             "(default: %(default)s)")
    parser.add_argument("--nice", type=int, default=10,
                        help="niceness of the flooder process, so that on a shared host it "
                             "does not take the CPU of the server it measures (default: "
                             "%(default)s; 0 = as the servers)")
    parser.add_argument("--redis-server", default="", help="redis-server binary")
    nodebridge.add_options(parser)
    parser.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra wsproxy setting (repeatable)")
    return parser.parse_args(argv)


# -- the flood (a separate process) ------------------------------------------


WRONG_TOKEN = "wrong-token"


def _request(port: int, n: int, token: str = WRONG_TOKEN) -> bytes:
    return (f"GET /flood/ws/flood-{n} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


async def _flood(port: int, requests: int, concurrency: int, sources: int,
                 tokens: Optional[list[str]] = None) -> dict[str, Any]:
    """
    The flood; C{tokens}: request n's token (forged JWTs, made before the
    flood starts), else the same wrong token for all.
    """
    statuses: Counter[str] = Counter()
    next_request = 0

    async def one(source: str) -> None:
        nonlocal next_request
        while next_request < requests:
            n = next_request
            next_request += 1
            try:
                reader, writer = await asyncio.open_connection(
                    LOOPBACK, port, local_addr=(source, 0))
            except OSError as e:
                statuses[f"connect: {e.strerror or type(e).__name__}"] += 1
                continue
            try:
                writer.write(_request(port, n, tokens[n] if tokens else WRONG_TOKEN))
                data = await asyncio.wait_for(reader.read(), 60)
                statuses[data[9:12].decode("latin-1") if data[:5] == b"HTTP/" else "no answer"] += 1
            except (OSError, asyncio.TimeoutError) as e:
                statuses[type(e).__name__] += 1
            finally:
                writer.close()

    addresses = [f"127.0.0.{2 + i % 250}" for i in range(max(1, sources))]
    started = time.monotonic()
    await asyncio.gather(*(one(addresses[i % len(addresses)]) for i in range(concurrency)))
    return {"started": started, "finished": time.monotonic(), "statuses": dict(statuses)}


def _flooder(port: int, requests: int, concurrency: int, sources: int, nice: int,
             out: Any, tokens: Optional[list[str]] = None) -> None:
    if nice:
        # the attacker is another machine: on this one it should not take
        # the CPU the measured server and the healthy session need
        os.nice(nice)
    out.send(asyncio.run(_flood(port, requests, concurrency, sources, tokens)))


# -- the healthy session ------------------------------------------------------


@dataclass
class Healthy:
    """What the healthy session received: (publish time, latency ns) by sequence number."""

    received: dict[int, tuple[int, int]] = field(default_factory=dict)
    published: dict[int, int] = field(default_factory=dict)
    closed: Optional[str] = None


async def _open_healthy(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write((f"GET /flood/ws/{HEALTHY_SESSION} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    if not head.startswith(b"HTTP/1.1 101"):
        raise Fatal(f"the healthy session was refused: {head.splitlines()[0]!r}")
    return reader, writer


async def _receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   healthy: Healthy) -> None:
    try:
        while True:
            b0, b1 = await reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)
            now = time.monotonic_ns()
            opcode = b0 & 0x0F
            if opcode == OP_PING:
                writer.write(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                healthy.closed = "closed by the server"
                return
            elif opcode in (1, 2):
                seq, sent = payload.split(b" ")[:2]
                healthy.received[int(seq)] = (int(sent), now - int(sent))
    except (asyncio.IncompleteReadError, OSError) as e:
        healthy.closed = type(e).__name__


async def _publish(client: redis.asyncio.Redis, interval: float, healthy: Healthy,
                   stop: asyncio.Event) -> None:
    channel = f"session:{HEALTHY_SESSION}:down"
    start = time.monotonic()
    seq = 0
    while not stop.is_set():
        sent = time.monotonic_ns()
        healthy.published[seq] = sent
        await client.publish(channel, f"{seq} {sent} {'x' * 60}")
        seq += 1
        # a fixed schedule: a late tick does not push the later ones back
        delay = start + seq * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _percentiles(values: list[int]) -> dict[str, Optional[float]]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 2)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] / 1e6, 2),
            "n": len(ordered)}


async def measure(name: str, port: int, pid: int, redis_port: int,
                  opts: argparse.Namespace, keys: Optional[JwtKeys] = None) -> dict[str, Any]:
    """
    One target's flood and the healthy session's latencies. With C{keys}
    (a JWT target), the healthy session's token is a valid JWT and the
    flood's are forged: one per request, each for its own session, signed
    with a key of the right kind the proxy does not know, minted before the
    flood.
    """
    client = redis.asyncio.Redis(host=LOOPBACK, port=redis_port)
    await client.set(f"session:{HEALTHY_SESSION}:auth", HEALTHY_TOKEN, ex=3600)
    algorithm = JWT_TARGETS.get(name)
    healthy_token, tokens = HEALTHY_TOKEN, None
    if keys is not None and algorithm is not None:
        healthy_token = keys.sign(HEALTHY_SESSION, algorithm)
        tokens = [keys.sign(f"flood-{n}", algorithm, forged=True) for n in range(opts.requests)]
    reader, writer = await _open_healthy(port, healthy_token)
    healthy = Healthy()
    receiving = asyncio.ensure_future(_receive(reader, writer, healthy))
    stop = asyncio.Event()
    publishing = asyncio.ensure_future(_publish(client, opts.interval / 1000, healthy, stop))
    await asyncio.sleep(opts.baseline + 0.5)

    loop = asyncio.get_running_loop()
    here, there = multiprocessing.Pipe(duplex=False)
    flooder = multiprocessing.get_context("fork").Process(
        target=_flooder,
        args=(port, opts.requests, opts.concurrency, opts.sources, opts.nice, there, tokens))
    cpu_before = cpu_seconds(pid) or 0.0
    flooder.start()
    flood: dict[str, Any] = await loop.run_in_executor(None, here.recv)
    cpu_after = cpu_seconds(pid) or 0.0
    await loop.run_in_executor(None, flooder.join)

    await asyncio.sleep(0.5)
    stop.set()
    await publishing
    deadline = time.monotonic() + 5
    while len(healthy.received) < len(healthy.published) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    receiving.cancel()
    writer.close()
    await client.aclose()

    started_ns, finished_ns = int(flood["started"] * 1e9), int(flood["finished"] * 1e9)
    baseline_from = started_ns - int(opts.baseline * 1e9)
    before = [lat for sent, lat in healthy.received.values() if baseline_from <= sent < started_ns]
    during = [lat for sent, lat in healthy.received.values() if started_ns <= sent <= finished_ns]
    statuses: dict[str, int] = flood["statuses"]
    answered = sum(n for status, n in statuses.items() if status.isdigit() and status != "101")
    elapsed = flood["finished"] - flood["started"]
    cpu = cpu_after - cpu_before
    return {
        "target": name, "token": f"forged {algorithm} JWT" if tokens else "wrong Redis token",
        "requests": opts.requests, "concurrency": opts.concurrency, "sources": opts.sources,
        "flooder_nice": opts.nice,
        "statuses": statuses,
        "flood_seconds": round(elapsed, 2),
        "refusals_per_second": round(answered / elapsed) if elapsed > 0 else None,
        "cpu_ms_per_refusal": round(cpu * 1e3 / answered, 3) if answered else None,
        "server_cpu_seconds": round(cpu, 2),
        "healthy_before": _percentiles(before),
        "healthy_during": _percentiles(during),
        "healthy_lost": len(healthy.published) - len(healthy.received),
        "healthy_closed": healthy.closed,
    }


# -- the targets --------------------------------------------------------------

#: the JWT targets (AUTH_MODE=jwt): their algorithm
JWT_TARGETS = {"wsproxy-jwt": "HS256", "wsproxy-jwt-es256": "ES256"}
PROXY_TARGETS = ("wsproxy", "wsproxy-nolimit", *JWT_TARGETS)


def _one(name: str, server: RedisServer, workdir: Path, keys: Optional[JwtKeys],
         extra: dict[str, str], opts: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One target's flood on a fresh server; None if the target cannot run here."""
    if name == "node":
        why = nodebridge.unavailable(opts.bridge, opts.node_modules)
        if why:
            print(f"node: {why}: skipped", file=sys.stderr)
            return None
        bridge = NodeBridge(opts.bridge, opts.node_modules, server.url, workdir)
        try:
            return asyncio.run(measure(name, bridge.port, bridge.pid, server.port, opts))
        finally:
            bridge.stop()
    # a default installation: LOG_LEVEL=info logs refusals
    env = {"LOG_LEVEL": "info", **extra}
    if name == "wsproxy-nolimit":
        env["AUTH_FAIL_LIMIT"] = "0"
    if name in JWT_TARGETS:
        assert keys is not None
        env.update(keys.proxy_env(JWT_TARGETS[name]))
    proxy = ProxyProcess(name, server.url, workdir, env).started()
    try:
        return asyncio.run(measure(name, proxy.port, proxy.pid, server.port, opts, keys))
    finally:
        proxy.stop()


def _median(values: list[Any]) -> Optional[float]:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(numbers), 3) if numbers else None


def summary(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """
    Medians over the rounds, per target: CPU per refusal, the healthy
    session's p99 during the flood, and (taken within each round) both as a
    ratio to node's.
    """
    targets = sorted({t for r in rounds for t in r})
    line: dict[str, Any] = {"summary": "flood", "rounds": len(rounds), "targets": {}}
    for target in targets:
        mine = [r[target] for r in rounds if target in r]
        entry: dict[str, Any] = {
            "token": mine[0]["token"],
            "cpu_ms_per_refusal": [m["cpu_ms_per_refusal"] for m in mine],
            "healthy_p99_ms_during": [m["healthy_during"]["p99_ms"] for m in mine],
            "healthy_lost": sum(m["healthy_lost"] for m in mine),
            "statuses": [m["statuses"] for m in mine],
        }
        entry["cpu_ms_per_refusal_median"] = _median(entry["cpu_ms_per_refusal"])
        entry["healthy_p99_ms_during_median"] = _median(entry["healthy_p99_ms_during"])
        if target != "node":
            pairs = [(r[target], r["node"]) for r in rounds if target in r and "node" in r]
            cpu = [_ratio(ours["cpu_ms_per_refusal"], theirs["cpu_ms_per_refusal"])
                   for ours, theirs in pairs]
            p99 = [_ratio(ours["healthy_during"]["p99_ms"], theirs["healthy_during"]["p99_ms"])
                   for ours, theirs in pairs]
            if pairs:
                entry.update({"cpu_ratio_to_node": cpu, "cpu_ratio_to_node_median": _median(cpu),
                              "p99_ratio_to_node": p99,
                              "p99_ratio_to_node_median": _median(p99)})
        line["targets"][target] = entry
    return line


def _ratio(ours: Any, theirs: Any) -> Optional[float]:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0:
        return round(ours / theirs, 2)
    return None


def _cells(values: list[Any]) -> str:
    return ", ".join("-" if v is None else f"{v:g}" for v in values)


def summary_table(line: dict[str, Any]) -> str:
    rows = [f"{'target':<18} {'CPU ms/refusal':>24} {'/node':>18} {'healthy p99 ms':>22} "
            f"{'/node':>18}  token"]
    for target, e in line["targets"].items():
        rows.append(f"{target:<18} {_cells(e['cpu_ms_per_refusal']):>24} "
                    f"{_cells(e.get('cpu_ratio_to_node', [])):>18} "
                    f"{_cells(e['healthy_p99_ms_during']):>22} "
                    f"{_cells(e.get('p99_ratio_to_node', [])):>18}  {e['token']}")
    rows.append("(one value per round; ratios taken within a round)")
    for target in JWT_TARGETS:
        ratio = line["targets"].get(target, {}).get("cpu_ratio_to_node_median")
        if ratio is not None:
            rows.append(f"target forged-JWT refusal CPU <= half of Node's ({target}): "
                        f"{'met' if ratio <= 0.5 else 'NOT met'} (median ratio {ratio:g})")
    return "\n".join(rows)


def run(opts: argparse.Namespace) -> int:
    targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    for name in targets:
        if name not in (*PROXY_TARGETS, "node"):
            raise Fatal(f"unknown target {name!r}")
    extra = dict(item.split("=", 1) for item in opts.proxy_env)
    if opts.sources > 250:
        raise Fatal("--sources: at most 250 (127.0.0.2 to 127.0.0.251)")
    print(f"bench.flood: {os.cpu_count()} cores, {opts.requests} requests, "
          f"{opts.concurrency} in flight, {opts.sources} source address(es), flooder nice "
          f"{opts.nice}, healthy message every {opts.interval:g} ms, {opts.rounds} round(s), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", file=sys.stderr)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        keys = JwtKeys.make(workdir) if set(targets) & set(JWT_TARGETS) else None
        server = RedisServer(workdir, opts.redis_server)
        try:
            for round_no in range(opts.rounds):
                order = targets if round_no % 2 == 0 else targets[::-1]
                reports: dict[str, dict[str, Any]] = {}
                for name in order:
                    report = _one(name, server, workdir, keys, extra, opts)
                    if report is None:
                        continue
                    report["round"] = round_no + 1
                    reports[name] = report
                    print(json.dumps(report), flush=True)
                    before, during = report["healthy_before"], report["healthy_during"]
                    print(f"{name:>18}: {report['refusals_per_second']} refusals/s, "
                          f"{report['cpu_ms_per_refusal']} ms CPU/refusal {report['statuses']}; "
                          f"healthy p50/p99/max {before['p50_ms']}/{before['p99_ms']}/"
                          f"{before['max_ms']} ms before, {during['p50_ms']}/{during['p99_ms']}/"
                          f"{during['max_ms']} ms during, lost {report['healthy_lost']}",
                          file=sys.stderr)
                rounds.append(reports)
        finally:
            server.stop()
    if opts.rounds > 1 or set(targets) & set(JWT_TARGETS):
        line = summary(rounds)
        print(json.dumps(line), flush=True)
        print(summary_table(line), file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return exit_status("bench.flood", lambda: run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
