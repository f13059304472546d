"""
Redis Cluster against a single Redis, side by side (C{bench/run.sh cluster}):
the proxy's CPU per message through a 3-master cluster (3 replicas too) and
through one redis-server, in the same run, and how the Redis side's work
spreads over the masters.

For each round and each target, a fresh C{python -m wsproxy} (LOG_LEVEL=warn)
is started against it; a client process (websockets, asyncio) opens
C{--sessions} sessions; then

  - down: C{--messages} 100-byte messages per session are published
    (PUBLISH, or SPUBLISH on the master of each channel's slot, pipelined)
    and the clients count them;
  - up: each client sends C{--messages} messages; Redis counts the
    PUBLISH/SPUBLISH commands it executed (INFO commandstats).

The proxy's CPU (utime + stime of its process) is read before and after
each phase and divided by the messages; each Redis node's CPU and
commands are read the same way (its publishes include the proxy's canary,
one per shard every 2 s). One JSON line per target and round on
stdout, a summary (medians, ratio cluster/single, the masters' shares) on
stderr and as a last JSON line.

    python -m bench.cluster [--sessions 500] [--messages 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import redis

from bench.servers import LOOPBACK as HOST, ProxyProcess, RedisServer
from wsproxy.redis.cluster import key_slot
from wsproxy.names import auth_key, down_channel

PAYLOAD = b"x" * 100


# -- the clients (a child process) ---------------------------------------------


def clients_main(url: str, sessions: list[str], messages: int, conn: Any) -> None:
    """
    Connect every session, report; then on "down" count the messages
    until the expected number (reporting it), on "up" send C{messages}
    per session (reporting when written).
    """
    asyncio.run(_clients(url, sessions, messages, conn))


async def _clients(url: str, sessions: list[str], messages: int, conn: Any) -> None:
    from websockets.asyncio.client import connect

    received = 0
    sockets = []
    limit = asyncio.Semaphore(100)

    async def open_one(session: str) -> Any:
        async with limit:
            return await connect(f"{url}/bench/ws/{session}",
                                 additional_headers={"Authorization": "Bearer tok"},
                                 max_queue=None, compression=None, ping_interval=None)

    sockets = await asyncio.gather(*(open_one(s) for s in sessions))

    async def reader(ws: Any) -> None:
        nonlocal received
        async for _ in ws:
            received += 1

    readers = [asyncio.create_task(reader(ws)) for ws in sockets]
    loop = asyncio.get_running_loop()
    conn.send("connected")
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "down":
            expected = received + len(sockets) * messages
            deadline = time.monotonic() + 120
            while received < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            conn.send(received - (expected - len(sockets) * messages))
        elif command == "up":
            for _ in range(messages):
                await asyncio.gather(*(ws.send(PAYLOAD) for ws in sockets))
            conn.send("sent")
        else:
            break
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


# -- targets ----------------------------------------------------------------------


class Target:
    """
    A Redis deployment the proxy is run against.
    """

    name = ""
    env: dict[str, str] = {}
    publish_command = b"PUBLISH"

    def masters(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def owner(self, key: str) -> tuple[str, int]:
        raise NotImplementedError


class Single(Target):
    name = "single"

    def __init__(self, directory: str) -> None:
        self.server = RedisServer(Path(directory))
        self.port = self.server.port
        self.env = {"REDIS_URL": self.server.url}

    def masters(self) -> list[tuple[str, int]]:
        return [(HOST, self.port)]

    def owner(self, key: str) -> tuple[str, int]:
        return (HOST, self.port)

    def stop(self) -> None:
        self.server.stop()


class Cluster(Target):
    name = "cluster"
    publish_command = b"SPUBLISH"

    def __init__(self) -> None:
        from tests.cluster import ClusterSetup

        self.setup = ClusterSetup()
        self.setup.start()
        self.env = {"REDIS_URL": self.setup.url, "REDIS_CLUSTER": "true"}
        self._owners = self.setup.owners()

    def masters(self) -> list[tuple[str, int]]:
        return self.setup.masters()

    def owner(self, key: str) -> tuple[str, int]:
        owner = self._owners[key_slot(key.encode())]
        assert owner is not None
        return owner

    def stop(self) -> None:
        self.setup.cleanup()


def node_stats(address: tuple[str, int]) -> tuple[float, int]:
    """
    (CPU seconds, PUBLISH + SPUBLISH calls) of one Redis node.
    """
    client = redis.Redis(host=address[0], port=address[1])
    try:
        cpu = client.info("cpu")
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                for c in ("publish", "spublish"))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls


def snapshot(target: Target) -> dict[tuple[str, int], tuple[float, int]]:
    return {m: node_stats(m) for m in target.masters()}


def _per_master(target: Target, sessions: list[str],
                key: Callable[[str], str]) -> Iterator[tuple[Any, list[str]]]:
    """
    The sessions whose C{key} each master holds, with a pipeline to that
    master (executed after the caller's turn).
    """
    by_node: dict[tuple[str, int], list[str]] = {}
    for session in sessions:
        by_node.setdefault(target.owner(key(session)), []).append(session)
    for (host, port), group in by_node.items():
        client = redis.Redis(host=host, port=port)
        try:
            pipe = client.pipeline(transaction=False)
            yield pipe, group
            pipe.execute()
        finally:
            client.close()


def publish_down(target: Target, sessions: list[str], messages: int) -> None:
    """
    C{messages} per session on its :down channel, pipelined per master.
    """
    for pipe, group in _per_master(target, sessions, down_channel):
        n = 0
        for _ in range(messages):
            for session in group:
                pipe.execute_command(target.publish_command, down_channel(session), PAYLOAD)
                n += 1
                if n % 2000 == 0:
                    pipe.execute()


def authorize(target: Target, sessions: list[str]) -> None:
    for pipe, group in _per_master(target, sessions, auth_key):
        for session in group:
            pipe.set(auth_key(session), "tok", ex=600)


def run_once(target: Target, sessions: list[str], messages: int, directory: str,
             round_no: int) -> dict[str, Any]:
    proxy = ProxyProcess(f"proxy-{target.name}-{round_no}", target.env["REDIS_URL"],
                         Path(directory), target.env).started()
    port = proxy.port
    child: Optional[multiprocessing.Process] = None
    try:
        authorize(target, sessions)
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.Process(
            target=clients_main, args=(f"ws://{HOST}:{port}", sessions, messages, theirs))
        child.start()
        if not ours.poll(120) or ours.recv() != "connected":
            raise RuntimeError("clients did not connect")
        total = len(sessions) * messages
        # down
        redis_before = snapshot(target)
        cpu_before = proxy.cpu_seconds()
        ours.send("down")
        publish_down(target, sessions, messages)
        delivered = ours.recv()
        cpu_down = proxy.cpu_seconds() - cpu_before
        redis_down = snapshot(target)
        # up
        cpu_before = proxy.cpu_seconds()
        ours.send("up")
        ours.recv()
        expected = {m: redis_down[m][1] for m in redis_down}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = snapshot(target)
            if sum(now[m][1] - expected[m] for m in now) >= total:
                break
            time.sleep(0.05)
        cpu_up = proxy.cpu_seconds() - cpu_before
        redis_up = snapshot(target)
        ours.send("stop")
        child.join(30)
        published_up = sum(redis_up[m][1] - redis_down[m][1] for m in redis_up)
        return {
            "target": target.name, "round": round_no, "sessions": len(sessions),
            "down_us_per_msg": round(cpu_down / total * 1e6, 1),
            "up_us_per_msg": round(cpu_up / total * 1e6, 1),
            # the proxy's own canaries (one SPUBLISH/PUBLISH per shard every
            # 2 s) are counted by Redis too: only a shortfall is a loss
            "lost_down": max(0, total - delivered), "lost_up": max(0, total - published_up),
            "redis": {
                f"{h}:{p}": {
                    "down_publishes": redis_down[(h, p)][1] - redis_before[(h, p)][1],
                    "up_publishes": redis_up[(h, p)][1] - redis_down[(h, p)][1],
                    "cpu_s": round(redis_up[(h, p)][0] - redis_before[(h, p)][0], 3),
                } for h, p in target.masters()
            },
        }
    finally:
        if child is not None and child.is_alive():
            child.kill()
        proxy.kill()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="wsproxy-bench-cluster-")
    sessions = [f"b{i}" for i in range(options.sessions)]
    print(f"bench.cluster: {os.cpu_count()} cores, {options.sessions} sessions x "
          f"{options.messages} messages of {len(PAYLOAD)} bytes each way, "
          f"{options.rounds} rounds", file=sys.stderr)
    single = Single(directory)
    cluster = Cluster()
    results: list[dict[str, Any]] = []
    try:
        for round_no in range(1, options.rounds + 1):
            for target in (single, cluster) if round_no % 2 else (cluster, single):
                result = run_once(target, sessions, options.messages, directory, round_no)
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        single.stop()
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    summary: dict[str, Any] = {"summary": True}
    for name in ("single", "cluster"):
        runs = [r for r in results if r["target"] == name]
        summary[name] = {
            "down_us_per_msg": statistics.median(r["down_us_per_msg"] for r in runs),
            "up_us_per_msg": statistics.median(r["up_us_per_msg"] for r in runs),
            "lost": sum(r["lost_down"] + r["lost_up"] for r in runs),
        }
    for direction in ("down", "up"):
        key = f"{direction}_us_per_msg"
        # (a run too small for the CPU clock's 10 ms ticks has no ratio)
        single = summary["single"][key]
        summary[f"ratio_{direction}_cluster_to_single"] = (
            round(summary["cluster"][key] / single, 2) if single else None)
    last = [r for r in results if r["target"] == "cluster"][-1]["redis"]
    total = sum(n["down_publishes"] + n["up_publishes"] for n in last.values()) or 1
    cpu = sum(n["cpu_s"] for n in last.values()) or 1
    summary["cluster_masters"] = {
        node: {"share_of_publishes": round((n["down_publishes"] + n["up_publishes"]) / total, 3),
               "share_of_cpu": round(n["cpu_s"] / cpu, 3)}
        for node, n in last.items()
    }
    single_cpu = [r for r in results if r["target"] == "single"][-1]["redis"]
    summary["redis_cpu_s"] = {"single": round(sum(n["cpu_s"] for n in single_cpu.values()), 3),
                              "cluster_masters": round(cpu, 3)}
    print(json.dumps(summary), flush=True)
    return 0 if all(v["lost"] == 0 for k, v in summary.items()
                    if k in ("single", "cluster")) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
