"""
C{python -m bench.flood}: see L{bench.flood}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
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
                             "node (default: %(default)s)")
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


def _request(port: int, n: int) -> bytes:
    return (f"GET /flood/ws/flood-{n} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Authorization: Bearer wrong-token\r\n\r\n").encode()


async def _flood(port: int, requests: int, concurrency: int, sources: int) -> dict[str, Any]:
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
                writer.write(_request(port, n))
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
             out: Any) -> None:
    if nice:
        # the attacker is another machine: on this one it should not take
        # the CPU the measured server and the healthy session need
        os.nice(nice)
    out.send(asyncio.run(_flood(port, requests, concurrency, sources)))


# -- the healthy session ------------------------------------------------------


@dataclass
class Healthy:
    """What the healthy session received: (publish time, latency ns) by sequence number."""

    received: dict[int, tuple[int, int]] = field(default_factory=dict)
    published: dict[int, int] = field(default_factory=dict)
    closed: Optional[str] = None


async def _open_healthy(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write((f"GET /flood/ws/{HEALTHY_SESSION} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {HEALTHY_TOKEN}\r\n\r\n").encode())
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
                  opts: argparse.Namespace) -> dict[str, Any]:
    client = redis.asyncio.Redis(host=LOOPBACK, port=redis_port)
    await client.set(f"session:{HEALTHY_SESSION}:auth", HEALTHY_TOKEN, ex=3600)
    reader, writer = await _open_healthy(port)
    healthy = Healthy()
    receiving = asyncio.ensure_future(_receive(reader, writer, healthy))
    stop = asyncio.Event()
    publishing = asyncio.ensure_future(_publish(client, opts.interval / 1000, healthy, stop))
    await asyncio.sleep(opts.baseline + 0.5)

    loop = asyncio.get_running_loop()
    here, there = multiprocessing.Pipe(duplex=False)
    flooder = multiprocessing.get_context("fork").Process(
        target=_flooder, args=(port, opts.requests, opts.concurrency, opts.sources, opts.nice, there))
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
        "target": name,
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


def run(opts: argparse.Namespace) -> int:
    targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    extra = dict(item.split("=", 1) for item in opts.proxy_env)
    print(f"bench.flood: {os.cpu_count()} cores, {opts.requests} requests, "
          f"{opts.concurrency} in flight, {opts.sources} source address(es), flooder nice "
          f"{opts.nice}, healthy message "
          f"every {opts.interval:g} ms", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir, opts.redis_server)
        try:
            for name in targets:
                if name == "node":
                    why = nodebridge.unavailable(opts.bridge, opts.node_modules)
                    if why:
                        print(f"node: {why}: skipped", file=sys.stderr)
                        continue
                    bridge = NodeBridge(opts.bridge, opts.node_modules, server.url, workdir)
                    try:
                        report = asyncio.run(measure(name, bridge.port, bridge.pid,
                                                     server.port, opts))
                    finally:
                        bridge.stop()
                elif name in ("wsproxy", "wsproxy-nolimit"):
                    # a default installation: LOG_LEVEL=info logs refusals
                    env = {"LOG_LEVEL": "info", **extra}
                    if name == "wsproxy-nolimit":
                        env["AUTH_FAIL_LIMIT"] = "0"
                    proxy = ProxyProcess(name, server.url, workdir, env).started()
                    try:
                        report = asyncio.run(measure(name, proxy.port, proxy.pid,
                                                     server.port, opts))
                    finally:
                        proxy.stop()
                else:
                    raise Fatal(f"unknown target {name!r}")
                print(json.dumps(report), flush=True)
                before, during = report["healthy_before"], report["healthy_during"]
                print(f"{name:>16}: {report['refusals_per_second']} refusals/s, "
                      f"{report['cpu_ms_per_refusal']} ms CPU/refusal {report['statuses']}; "
                      f"healthy p50/p99/max {before['p50_ms']}/{before['p99_ms']}/"
                      f"{before['max_ms']} ms before, {during['p50_ms']}/{during['p99_ms']}/"
                      f"{during['max_ms']} ms during, lost {report['healthy_lost']}",
                      file=sys.stderr)
        finally:
            server.stop()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return exit_status("bench.flood", lambda: run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
