"""
Redis Cluster with real processes: three masters with one replica each
(L{tests.cluster}), wsproxy with C{REDIS_CLUSTER=true} (in this process's
reactor, or as a real daemon for start-up and configuration cases), real
WebSocket clients, sessions spread over every shard; a master killed, slots
migrated under live sessions, MOVED met during token checks.

Each test starts its own cluster (about 2-3 s here): most of them break it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import redis as redispy
from redis.cluster import ClusterNode, RedisCluster
from twisted.internet import reactor, task
from twisted.python import log
from twisted.trial.unittest import TestCase

from wsproxy.cluster import key_slot
from wsproxy.config import SETTINGS
from wsproxy.names import auth_key, down_channel, up_channel

from .cluster import HOST, Address, ClusterSetup
from .support import (
    Client,
    Daemon,
    RedisServer,
    RunningProxy,
    clean_autobahn_timers,
    connect,
    free_port,
    raw_exchange,
    settings_for,
    status_of,
    upgrade_request,
    wait_for,
)

#: from the kill of a master to a message delivered through its replica
#: (cluster-node-timeout is 1 s; promotion takes 2-4 s here)
FAILOVER_BOUND = 30.0


def record(text: str) -> None:
    """
    A measurement, on stdout (trial's output) and in the test log.
    """
    print(f"\n    {text}", flush=True)
    log.msg(text)


class _Sessions:
    """
    Clients of sessions on every shard, with the backend's side: tokens
    stored and messages published through redis-py's RedisCluster, each
    session's :up channel read with SSUBSCRIBE on the master that owns it.
    """

    def __init__(self, test: "ClusterTestCase", setup: ClusterSetup, proxy: RunningProxy) -> None:
        self.test = test
        self.setup = setup
        self.proxy = proxy
        self.clients: dict[str, Client] = {}
        self.backend = test.backend(setup)

    def authorize(self, session: str, token: str = "tok") -> None:
        self.backend.setex(auth_key(session), 600, token)

    async def open(self, sessions: list[str]) -> None:
        for session in sessions:
            self.authorize(session)
            client = await connect(self.proxy.url(session), token="tok")
            self.test.addCleanup(client.close_and_wait)
            self.clients[session] = client

    def publish(self, session: str, message: str) -> int:
        return int(self.backend.spublish(down_channel(session), message))

    async def all_receive(self, tag: str, timeout: float = 10.0) -> None:
        """
        A message published to each session arrives at its client.
        """
        expected = {}
        for session, client in self.clients.items():
            message = f"{tag}-{session}"
            expected[session] = (message.encode(), False)
            self.publish(session, message)
        await wait_for(lambda: all(expected[s] in c.messages for s, c in self.clients.items()),
                       timeout)


class ClusterTestCase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.addCleanup(clean_autobahn_timers)

    def start_cluster(self, **options: Any) -> ClusterSetup:
        setup = ClusterSetup(**options)
        self.addCleanup(setup.cleanup)
        setup.start()
        return setup

    def backend(self, setup: ClusterSetup) -> RedisCluster:
        nodes = [ClusterNode(HOST, n.port) for n in setup.nodes]
        client = RedisCluster(startup_nodes=nodes, password=setup.password,
                              socket_timeout=2, socket_connect_timeout=2)
        self.addCleanup(client.close)
        return client

    async def start_proxy(self, setup: ClusterSetup, **overrides: Any) -> RunningProxy:
        settings = settings_for(setup.url, redis_cluster=True, **overrides)
        proxy = RunningProxy(settings)
        self.addCleanup(proxy.stop)
        await proxy.ready()
        return proxy

    async def health(self, port: int) -> int:
        return status_of(await raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n"))

    async def metrics(self, port: int) -> str:
        response = await raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        return response.decode(errors="replace")

    def up_reader(self, setup: ClusterSetup, session: str) -> Any:
        """
        SSUBSCRIBE to the session's :up channel on the master that owns
        it; the returned function gives the payloads received so far.
        """
        channel = up_channel(session).decode()
        owner = setup.owner(channel)
        assert owner is not None
        client = setup.node_at(owner).client()
        self.addCleanup(client.close)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.addCleanup(pubsub.close)
        pubsub.ssubscribe(channel)
        received: list[bytes] = []

        def poll() -> list[bytes]:
            while True:
                message = pubsub.get_sharded_message(timeout=0)
                if message is None:
                    return received
                received.append(message["data"])

        return poll


class ContractTests(ClusterTestCase):
    async def test_contract_over_every_shard(self) -> None:
        """
        Through a 3-master cluster, with two sessions on each shard: every
        client receives what the backend SPUBLISHes to its :down channel,
        and what it sends arrives (SPUBLISH by the proxy) on its :up
        channel's master; a missing token is 401, a wrong one 403; /health
        is 200 and /metrics shows each shard up with its channels.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        spread = setup.sessions_per_shard(2)
        sessions = _Sessions(self, setup, proxy)
        await sessions.open([s for group in spread.values() for s in group])
        await sessions.all_receive("down")
        for session, client in sessions.clients.items():
            reader = self.up_reader(setup, session)
            client.sendMessage(f"up-{session}".encode())
            await wait_for(lambda: reader() == [f"up-{session}".encode()])
        # refusals
        missing = await raw_exchange(proxy.port, upgrade_request("/a/ws/nobody"))
        self.assertEqual(status_of(missing), 401)
        sessions.authorize("wrongtoken", "right")
        wrong = await raw_exchange(proxy.port, upgrade_request("/a/ws/wrongtoken", {"Authorization": "Bearer left"}))
        self.assertEqual(status_of(wrong), 403)
        self.assertEqual(await self.health(proxy.port), 200)
        metrics = await self.metrics(proxy.port)
        for host, port in setup.masters():
            self.assertIn(f'wsproxy_cluster_shard_up{{shard="{host}:{port}"}} 1.0', metrics)
            self.assertIn(f'wsproxy_cluster_shard_channels{{shard="{host}:{port}"}} 2.0', metrics)

    async def test_canary_on_every_shard(self) -> None:
        """
        Each master carries its own canary channel (hash-tagged into one
        of its slots) and the proxy's subscription to it: a shard that
        stops delivering would be noticed like a single Redis.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        cluster = proxy.proxy.cluster
        assert cluster is not None
        await wait_for(lambda: all(s.hub.canary_rtt is not None for s in cluster.shards.values()),
                       timeout=15)
        for address, shard in cluster.shards.items():
            channel = shard.hub.canary_channel
            self.assertEqual(setup.owner(channel), address)
            numsub = setup.node_at(address).call("PUBSUB", "SHARDNUMSUB", channel)
            self.assertEqual(int(numsub[1]), 1)
