"""
A local Redis Cluster for the tests and for trying wsproxy by hand
(C{bin/dev cluster}): three masters with one replica each, real
C{redis-server} processes (Debian's, 7.0 or later: sharded Pub/Sub and
C{CLUSTER SHARDS}) on loopback ports, joined with
C{redis-cli --cluster create … --cluster-replicas 1}, everything they write
in one temporary directory.

Each node has its own cluster bus port (C{cluster-port}), so any free port
works, and C{cluster-node-timeout} is one second: a killed master is
replaced by its replica within a few seconds. Waits are conditions polled
against a deadline (L{tests.sentinel.wait}), never sleeps.

Every process is SIGKILLed by L{ClusterSetup.cleanup} (and dies with the
process that started it, as in L{tests.sentinel}).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

import redis as redispy

from wsproxy.redis.cluster import SLOTS, key_slot

from .sentinel import (HOST, Address, Node, _distinct_free_ports, run_dev_setup, wait,
                       wait_blocking)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found: the cluster tests need Debian's redis-server and "
            "redis-tools 7.0 or later (bin/dev system-setup installs them)"
        )
    return path


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_node(node: Node) -> bool:
    """
    What answers on the node's port is a cluster node.
    """
    try:
        node.call("CLUSTER", "MYID")
    except redispy.RedisError:
        return False
    return True


def _pairs(flat: Any) -> dict[str, Any]:
    if isinstance(flat, dict):
        return {_text(k): v for k, v in flat.items()}
    return {_text(k): v for k, v in zip(flat[::2], flat[1::2])}


class ClusterSetup:
    """
    C{masters} masters with C{replicas} replica(s) each, on free loopback
    ports (or C{ports}: one per node, data ports; bus ports are always
    free ones).
    """

    def __init__(self, masters: int = 3, replicas: int = 1,
                 ports: Optional[list[int]] = None, password: Optional[str] = None,
                 node_timeout_ms: int = 1000) -> None:
        self.master_count = masters
        self.replica_count = replicas
        self.wanted_ports = ports
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="wsproxy-cluster-")
        self.nodes: list[Node] = []

    # -- start and stop -----------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """
        Start every node, create the cluster and wait until every node
        agrees that all slots are served and every replica is in sync.
        """
        try:
            self._start(timeout)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, timeout: float) -> None:
        count = self.master_count * (1 + self.replica_count)
        ports = list(self.wanted_ports or [])
        if len(ports) != count:
            assert not ports, f"{count} ports needed, {len(ports)} given"
            ports = _distinct_free_ports(count)
        bus = [p for p in _distinct_free_ports(count * 2) if p not in ports][:count]
        for i, (port, bus_port) in enumerate(zip(ports, bus)):
            for attempt in range(5):
                node = self._node(f"node{i + 1}", port, bus_port)
                try:
                    node.start()
                    # what answered must be this process (not another
                    # redis-server that took the port first)
                    if not (node.alive and _cluster_node(node)):
                        raise RuntimeError(f"{node}: Address already in use")
                    break
                except RuntimeError as e:
                    # a free port taken meanwhile (another process, on a busy
                    # machine): try others, unless the ports were given
                    node.kill()
                    if self.wanted_ports or attempt == 4 or "Address already in use" not in (
                            str(e) + node.log_tail()):
                        raise
                    taken = set(ports) | set(bus)
                    port, bus_port = [p for p in _distinct_free_ports(8) if p not in taken][:2]
                    ports[i], bus[i] = port, bus_port
                    os.unlink(node.log)
            self.nodes.append(node)
        create = [_binary("redis-cli")]
        if self.password is not None:
            create += ["-a", self.password, "--no-auth-warning"]
        create += ["--cluster", "create"] + [f"{HOST}:{n.port}" for n in self.nodes] + [
            "--cluster-replicas", str(self.replica_count), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n"
                               f"{done.stdout.decode(errors='replace')}"
                               f"{done.stderr.decode(errors='replace')}")
        wait_blocking(self.settled, timeout,
                      "every node to see all slots served and every replica in sync",
                      self.describe)

    def _node(self, label: str, port: int, bus_port: int) -> Node:
        argv = [_binary("redis-server"), "--port", str(port), "--bind", HOST,
                "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                "--cluster-config-file", os.path.join(self.dir, f"{label}.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--dbfilename", f"{label}.rdb", "--repl-diskless-sync-delay", "0"]
        if self.password is not None:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        return Node(label, port, argv, os.path.join(self.dir, f"{label}.log"),
                    None, self.password)

    def cleanup(self) -> None:
        """
        SIGKILL every process and remove the directory; safe at any point.
        """
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the cluster says ----------------------------------------------

    @property
    def url(self) -> str:
        """
        C{REDIS_URL} naming the first node that answers.
        """
        node = next(n for n in self.nodes if n.alive)
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{node.port}"

    def node_at(self, address: Address) -> Node:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(f"no node at {address}")

    def shards(self, node: Optional[Node] = None) -> list[dict[str, Any]]:
        """
        C{CLUSTER SHARDS} as one answering node (or C{node}) says:
        C{[{"slots": [(start, end), ...], "master": Address, "replicas": [...],
        "health": {Address: "online"|"fail"|...}}]}.
        """
        asked = [node] if node is not None else [n for n in self.nodes if n.answering]
        for candidate in asked:
            try:
                reply = candidate.call("CLUSTER", "SHARDS", timeout=1.0)
            except Exception:
                continue
            shards = []
            for shard in reply:
                fields = _pairs(shard)
                ranges = [int(x) for x in fields["slots"]]
                entry: dict[str, Any] = {
                    "slots": list(zip(ranges[::2], ranges[1::2])), "master": None,
                    "replicas": [], "health": {}}
                for info in (_pairs(n) for n in fields["nodes"]):
                    address = (_text(info["ip"]), int(info["port"]))
                    entry["health"][address] = _text(info["health"])
                    if _text(info["role"]) == "master":
                        entry["master"] = address
                    else:
                        entry["replicas"].append(address)
                shards.append(entry)
            return shards
        raise RuntimeError("no cluster node answers")

    def owners(self, node: Optional[Node] = None) -> list[Optional[Address]]:
        owners: list[Optional[Address]] = [None] * SLOTS
        for shard in self.shards(node):
            for start, end in shard["slots"]:
                for slot in range(start, end + 1):
                    owners[slot] = shard["master"]
        return owners

    def masters(self) -> list[Address]:
        """
        The masters that serve slots, in slot order.
        """
        owners = self.owners()
        return list(dict.fromkeys(o for o in owners if o is not None))

    def owner(self, key: str) -> Optional[Address]:
        return self.owners()[key_slot(key.encode())]

    def settled(self) -> bool:
        """
        Every running node says cluster_state:ok with all slots assigned
        and ok, and every replica's link to its master is up.
        """
        for node in self.nodes:
            if not node.alive:
                continue
            info = _text(node.call("CLUSTER", "INFO", timeout=1.0))
            fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != str(SLOTS):
                return False
            role = node.call("ROLE", timeout=1.0)
            if _text(role[0]) == "slave" and _text(role[3]) != "connected":
                return False
        owners = [self.owners(n) for n in self.nodes if n.alive]
        return all(o == owners[0] for o in owners) and None not in owners[0]

    def node_id(self, node: Node) -> str:
        return _text(node.call("CLUSTER", "MYID"))

    def describe(self) -> str:
        lines = []
        for node in self.nodes:
            if not node.alive:
                lines.append(f"{node}: not running")
                continue
            try:
                info = _text(node.call("CLUSTER", "INFO", timeout=1.0)).split()[:3]
                role = _text(node.call("ROLE", timeout=1.0)[0])
                lines.append(f"{node}: {role} {' '.join(info)}")
            except Exception as e:
                lines.append(f"{node}: {e!r}")
        return "\n".join(lines)

    # -- sessions spread over the shards ------------------------------------

    def sessions_per_shard(self, per_shard: int, prefix: str = "s") -> dict[Address, list[str]]:
        """
        Session ids whose down channel lives on each master, C{per_shard}
        of them each.
        """
        owners = self.owners()
        found: dict[Address, list[str]] = {m: [] for m in self.masters()}
        n = 0
        while any(len(v) < per_shard for v in found.values()):
            session = f"{prefix}{n}"
            n += 1
            owner = owners[key_slot(f"session:{session}:down".encode())]
            if owner is not None and len(found[owner]) < per_shard:
                found[owner].append(session)
        return found

    # -- faults ---------------------------------------------------------------

    def kill_master(self, address: Address) -> Node:
        node = self.node_at(address)
        node.kill()
        return node

    async def promotion(self, old: Address, timeout: float = 60.0) -> Address:
        """
        Wait until the slots C{old} served are served by another master
        that the surviving nodes agree on; its address.
        """
        slots = [s for s, o in enumerate(self.owners()) if o == old] or None

        def promoted() -> Optional[Address]:
            views = [self.owners(n) for n in self.nodes if n.answering]
            if not views:
                return None
            first = views[0]
            if any(v != first for v in views) or None in first:
                return None
            probe = slots[0] if slots else 0
            new = first[probe]
            return new if new != old else None

        return await wait(promoted, timeout, f"a replica of {old} to be promoted", self.describe)

    def migrate_slot(self, slot: int, target: Address) -> None:
        """
        Move one slot (and its keys) to the master C{target}, the way
        C{redis-cli --cluster reshard} does: IMPORTING/MIGRATING, MIGRATE
        of every key, then SETSLOT NODE on every master.
        """
        source = self.owners()[slot]
        assert source is not None and source != target
        src, dst = self.node_at(source), self.node_at(target)
        src_id, dst_id = self.node_id(src), self.node_id(dst)
        dst.call("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while True:
            keys = src.call("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            auth: list[Any] = ["AUTH", self.password] if self.password else []
            src.call("MIGRATE", HOST, dst.port, "", 0, 5000, *auth, "KEYS", *keys)
        for address in self.masters() + [target]:
            self.node_at(address).call("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


# -- bin/dev cluster ----------------------------------------------------------

DEV_PORTS = [7000, 7001, 7002, 7003, 7004, 7005]


def main(argv: list[str]) -> int:
    """
    C{bin/dev cluster [--free-ports]}: run three masters and three replicas
    in the foreground until SIGINT or SIGTERM, and print the variables that
    point wsproxy at them.
    """

    def describe(setup: ClusterSetup) -> str:
        masters = setup.masters()
        first = setup.nodes[0]
        return (
            "masters  " + " ".join(f"{h}:{p}" for h, p in masters) + "\n"
            "replicas " + " ".join(f"{HOST}:{n.port}" for n in setup.nodes
                                   if n.address not in masters) + "\n"
            "\n"
            "Run wsproxy against them:\n"
            "\n"
            f"  REDIS_CLUSTER=true REDIS_URL=redis://{HOST}:{first.port} bin/dev run\n"
            "\n"
            "Then kill a master and watch its replica take over:\n"
            "\n"
            f"  redis-cli -c -p {first.port} CLUSTER SHARDS\n"
            f"  redis-cli -p {masters[0][1]} SHUTDOWN NOSAVE\n"
            "\n"
            "Ctrl-C stops everything."
        )

    return run_dev_setup(
        "cluster", argv, DEV_PORTS, lambda ports: ClusterSetup(ports=ports),
        "three masters and three replicas", describe,
        lambda setup: any(n.alive for n in setup.nodes), "every node exited",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
