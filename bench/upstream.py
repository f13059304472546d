"""
Durable upstream's cost, against Pub/Sub, in one run: a private
redis-server, and for each mode a fresh wsproxy (LOG_LEVEL=warn, WORKERS=1)
that N clients (the load-test tool's lean asyncio client) each send M
messages of B bytes as one burst.

  pubsub      UPSTREAM=pubsub: one PUBLISH per message (no backend subscribed:
              the proxy's work is the same, a command and its reply)
  stream      UPSTREAM=stream: one XADD per message
  stream-ack  UPSTREAM=stream, clients with ?ack=1: "<id>\\n<message>" in,
              one ack control frame out per message

A mode's burst ends when Redis has executed every command (INFO
commandstats) and, with acks, every client has its M acks. Reported per
mode and round: proxy CPU per message (user+sys over the burst), and for
the stream modes Redis memory per retained entry (used_memory after minus
before, over N*M entries). The modes alternate within each round; the
summary gives medians and ratios to pubsub.

    .venv/bin/python -m bench.upstream [--clients 500] [--messages 100] [--size 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import redis

from bench.loadtest.procstat import cpu_seconds
from bench.loadtest.wsclient import OP_TEXT, UpgradeRequest, WebSocketClient, client_frame
from bench.errors import exit_status
from bench.servers import ProxyProcess, RedisServer

MODES = ("pubsub", "stream", "stream-ack")


class AckRequest(UpgradeRequest):
    """The load-test tool's upgrade request, with C{?ack=1} when asked."""

    ack = False

    def encode(self, session_id: str, token: str, key: bytes) -> bytes:
        head = super().encode(session_id, token, key)
        if not self.ack:
            return head
        line, rest = head.split(b" HTTP/1.1\r\n", 1)
        return line + b"?ack=1 HTTP/1.1\r\n" + rest


class Sender(WebSocketClient):
    """A client that counts the ack control frames it receives."""

    acks = 0

    def on_message(self, opcode: int, payload: bytes, now: int) -> bool:
        if opcode == OP_TEXT and payload.startswith(b'!{"type":"ack"'):
            self.acks += 1
        return False


def calls(r: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def burst(args: argparse.Namespace, mode: str, port: int, r: redis.Redis,
                proxy_pid: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = AckRequest(f"127.0.0.1:{port}".encode(), "", "bench", False)
    request.ack = mode == "stream-ack"
    sessions = [f"up{i}" for i in range(args.clients)]
    with r.pipeline(transaction=False) as p:
        for session in sessions:
            p.set(f"session:{session}:auth", "tok", ex=600)
        p.execute()
    clients: list[Sender] = []
    for i in range(0, len(sessions), 100):
        batch = []
        for session in sessions[i:i + 100]:
            def build(s: str = session) -> Sender:
                return Sender(loop, request, s, "tok")

            _, client = await loop.create_connection(build, "127.0.0.1", port)
            batch.append(client)
        await asyncio.gather(*(c.handshake for c in batch))
        clients.extend(batch)
    payload = b"x" * args.size
    frames = []
    for n in range(args.clients):
        if request.ack:
            frames.append(b"".join(client_frame(OP_TEXT, b"m%d\n" % m + payload)
                                   for m in range(args.messages)))
        else:
            frames.append(client_frame(OP_TEXT, payload) * args.messages)
    command = "publish" if mode == "pubsub" else "xadd"
    total = args.clients * args.messages
    before_calls = calls(r, command)
    memory_before = int(r.info("memory")["used_memory"])
    cpu_before = cpu_seconds(proxy_pid) or 0.0
    started = time.monotonic()
    for client, data in zip(clients, frames):
        client.write(data)
    deadline = started + 120
    while (calls(r, command) - before_calls < total
           or (request.ack and sum(c.acks for c in clients) < total)):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.upstream: {mode}: not all messages within 120 s")
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    cpu = (cpu_seconds(proxy_pid) or 0.0) - cpu_before
    memory_after = int(r.info("memory")["used_memory"])
    for client in clients:
        client.abort()
    row: dict[str, Any] = {
        "mode": mode, "messages": total, "seconds": round(elapsed, 3),
        "proxy_cpu_us_per_message": round(cpu / total * 1e6, 2),
    }
    if mode != "pubsub":
        entries = sum(int(r.xlen(k)) for k in r.scan_iter("wsproxy:up:*"))
        row["entries"] = entries
        row["redis_bytes_per_entry"] = round((memory_after - memory_before) / entries, 1)
    return row


def run_mode(args: argparse.Namespace, mode: str, redis_url: str, r: redis.Redis,
             workdir: Path) -> dict[str, Any]:
    r.flushall()
    proxy = ProxyProcess(mode, redis_url, workdir, {
        "SHUTDOWN_GRACE_PERIOD_SECS": "2",
        "UPSTREAM": "pubsub" if mode == "pubsub" else "stream"}).started()
    try:
        return asyncio.run(burst(args, mode, proxy.port, r, proxy.pid))
    finally:
        proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--messages", type=int, default=100, help="per client")
    p.add_argument("--size", type=int, default=100, help="payload bytes")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-upstream-"))
    server = RedisServer(workdir)
    r = server.client
    try:
        print(f"bench.upstream: {os.cpu_count()} cores, {args.clients} clients x "
              f"{args.messages} messages of {args.size} B, {args.rounds} rounds",
              file=sys.stderr)
        rows = []
        for round_ in range(args.rounds):
            for mode in MODES:
                row = run_mode(args, mode, server.url, r, workdir)
                row["round"] = round_ + 1
                print(json.dumps(row), flush=True)
                rows.append(row)
        summary: dict[str, Any] = {"summary": True}
        medians = {}
        for mode in MODES:
            medians[mode] = statistics.median(
                row["proxy_cpu_us_per_message"] for row in rows if row["mode"] == mode)
            summary[f"{mode}_cpu_us_per_message"] = medians[mode]
            if mode != "pubsub":
                # (a run too small for the CPU clock's 10 ms ticks has no ratio)
                summary[f"{mode}_ratio_to_pubsub"] = (
                    round(medians[mode] / medians["pubsub"], 2) if medians["pubsub"] else None)
                summary[f"{mode}_redis_bytes_per_entry"] = statistics.median(
                    row["redis_bytes_per_entry"] for row in rows if row["mode"] == mode)
        print(json.dumps(summary), flush=True)
        return 0
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(exit_status("bench.upstream", main))
