"""
Redis Cluster with real processes: three masters with one replica each
(L{tests.cluster}), wsproxy with C{REDIS_CLUSTER=true} (in this process's
reactor, or as a real daemon for start-up and configuration cases), real
WebSocket clients, sessions spread over every shard; a master killed, slots
migrated under live sessions, MOVED met during token checks.

Each test starts its own cluster (about 2-3 s here): most of them break it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import redis as redispy
from redis.cluster import ClusterNode, RedisCluster
from twisted.internet import reactor, task
from twisted.python import log

from wsproxy.backend import Backend, DurableConsumer
from wsproxy.redis.cluster import key_slot
from wsproxy.names import auth_key, down_channel, revoked_key, up_channel

from .support import (
    ROOT,
    BackendListener,
    Client,
    Daemon,
    RunningProxy,
    collector,
    connect,
    free_port,
    raw_exchange,
    redis_server,
    settings_for,
    start_daemon,
    start_proxy,
    start_rig,
    status_of,
    upgrade_request,
    wait_for,
)
from .support.cluster import HOST, ClusterSetup
from .support.http import raw_upgrade
from .support.jwts import SECRET, token
from .support.senders import Senders, missing, stored_ids
from .support.sentinel import Node, RigTestCase, wait

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


#: sessions sending during a planned change (bench/switch.sh runs 100)
SWITCH_SESSIONS = int(os.environ.get("SWITCH_SESSIONS", "20"))

#: each of them sends a message this often (seconds)
SWITCH_INTERVAL = 0.05

#: the one upstream stream of the planned-change tests (UPSTREAM_PARTITIONS=1)
PLANNED_STREAM = "wsproxy:up:{p0}"


class ClusterTestCase(RigTestCase):
    def start_cluster(self, **options: Any) -> ClusterSetup:
        return start_rig(self, ClusterSetup(**options))

    def backend(self, setup: ClusterSetup) -> RedisCluster:
        nodes = [ClusterNode(HOST, n.port) for n in setup.nodes]
        client = RedisCluster(startup_nodes=nodes, password=setup.password,
                              socket_timeout=2, socket_connect_timeout=2)
        self.addCleanup(client.close)
        return client

    async def start_proxy(self, setup: ClusterSetup, **overrides: Any) -> RunningProxy:
        proxy = start_proxy(self, setup.url, redis_cluster=True, **overrides)
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
        return collector(pubsub.get_sharded_message)


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

    async def test_jwts_tickets_and_denylist_on_every_shard(self) -> None:
        """
        AUTH_MODE=jwt with JWT_DENYLIST=session through a 3-master cluster,
        two sessions on each shard: a JWT opens each (nothing stored), and
        the session receives; a ticket stored on the key's master admits
        once (GETDEL routed by its slot), then 403; a session on the
        denylist (EXISTS routed by its slot) is refused 403.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup, auth_mode=("jwt",), jwt_secret=SECRET,
                                       jwt_denylist="session")
        backend = self.backend(setup)
        sessions = [s for group in setup.sessions_per_shard(2).values() for s in group]
        for session in sessions:
            client = await connect(proxy.url(session), token=token(session=session))
            self.addCleanup(client.close_and_wait)
            await wait_for(lambda: backend.spublish(down_channel(session), "hi") == 1)
            await wait_for(lambda: (b"hi", False) in client.messages)
            ticket = Backend(backend).issue_ticket(session)
            first = await raw_upgrade(proxy.port, f"/a/ws/{session}?ticket={ticket}")
            self.addCleanup(first.abort)
            self.assertEqual(first.status, 101, first.head)
            again = await raw_exchange(proxy.port, upgrade_request(f"/a/ws/{session}?ticket={ticket}"))
            self.assertEqual(status_of(again), 403)
            backend.set(revoked_key(session), "1", ex=60)
            revoked = await raw_exchange(proxy.port, upgrade_request(
                f"/a/ws/{session}", {"Authorization": f"Bearer {token(session=session)}"}))
            self.assertIn(b"403 Token revoked", revoked)

    async def test_credentials_apply_to_every_node(self) -> None:
        """
        A cluster whose nodes require a password: REDIS_URL's password is
        used for the slot map and for every master's connections; sessions
        on every shard receive.
        """
        setup = self.start_cluster(password="s3cret")
        self.assertIn(":s3cret@", setup.url)
        proxy = await self.start_proxy(setup)
        sessions = _Sessions(self, setup, proxy)
        await sessions.open([s for group in setup.sessions_per_shard(1).values() for s in group])
        await sessions.all_receive("secret")
        self.assertEqual(await self.health(proxy.port), 200)

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


class FaultTests(ClusterTestCase):
    async def test_master_killed(self) -> None:
        """
        kill -9 of a master carrying live sessions: once its replica is
        promoted, those sessions receive again through it (no socket
        closed, no restart), the others never stopped, new connections to
        that shard are admitted and /health is 200 again. The time from
        the kill to the first message delivered through the new master is
        printed (at most FAILOVER_BOUND).
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        spread = setup.sessions_per_shard(2)
        sessions = _Sessions(self, setup, proxy)
        await sessions.open([s for group in spread.values() for s in group])
        await sessions.all_receive("before")
        victim = setup.masters()[0]
        killed_at = time.monotonic()
        setup.kill_master(victim)
        promoted = await setup.promotion(victim)
        promoted_at = time.monotonic()
        hit = spread[victim]
        first: dict[str, float] = {}

        async def delivered_again() -> bool:
            for session in hit:
                if session in first:
                    continue
                try:
                    sessions.publish(session, f"after-{session}")
                except redispy.RedisError:
                    continue  # the backend's own client is still catching up
            await task.deferLater(reactor, 0.2, lambda: None)
            for session in hit:
                if (f"after-{session}".encode(), False) in sessions.clients[session].messages:
                    first.setdefault(session, time.monotonic())
            return len(first) == len(hit)

        deadline = killed_at + FAILOVER_BOUND
        while not await delivered_again():
            self.assertLess(time.monotonic(), deadline,
                            f"sessions on {victim} not receiving through {promoted}")
        record(f"cluster failover: promotion {promoted_at - killed_at:.1f}s after kill -9, "
               f"first message through the new master {min(first.values()) - killed_at:.1f}s "
               f"after it (all {len(hit)} sessions {max(first.values()) - killed_at:.1f}s)")
        for client in sessions.clients.values():
            self.assertEqual(client.state, client.STATE_OPEN)
        await sessions.all_receive("later")
        fresh = [s for s in setup.sessions_per_shard(3, prefix="n")[promoted]][-1:]
        await sessions.open(fresh)
        await sessions.all_receive("fresh")
        await wait_for(lambda: proxy.proxy.hub.healthy, timeout=15)
        self.assertEqual(await self.health(proxy.port), 200)

    async def test_reshard_live_sessions(self) -> None:
        """
        The slots of live sessions' :down channels migrated to another
        master (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE, as redis-cli
        --cluster reshard does): Redis drops the subscriptions
        (sunsubscribe), the proxy moves them to the new master and the
        sessions keep receiving; their client messages reach :up
        wherever its slot now is.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        spread = setup.sessions_per_shard(2)
        sessions = _Sessions(self, setup, proxy)
        await sessions.open([s for group in spread.values() for s in group])
        await sessions.all_receive("before")
        masters = setup.masters()
        moving = spread[masters[0]]
        for session in moving:
            for channel in (down_channel(session), up_channel(session).decode()):
                slot = key_slot(channel.encode())
                if setup.owners()[slot] != masters[1]:
                    setup.migrate_slot(slot, masters[1])
        for session in moving:
            self.assertEqual(setup.owner(down_channel(session)), masters[1])
        cluster = proxy.proxy.cluster
        assert cluster is not None
        await wait_for(lambda: cluster.redirects["sunsubscribe"] >= len(moving), timeout=15)
        # what is published between Redis dropping a subscription and the
        # proxy's SSUBSCRIBE on the new master is lost (Pub/Sub): wait for it
        target = setup.node_at(masters[1])
        await wait_for(lambda: all(
            target.call("PUBSUB", "SHARDNUMSUB", down_channel(s))[1] == 1 for s in moving),
            timeout=15)
        await sessions.all_receive("after")
        for session in moving:
            reader = self.up_reader(setup, session)
            sessions.clients[session].sendMessage(b"up-after")
            await wait_for(lambda: reader() == [b"up-after"])
        self.assertEqual(await self.health(proxy.port), 200)

    async def sending(self, setup: ClusterSetup, proxy: RunningProxy) -> Senders:
        """
        SWITCH_SESSIONS acknowledging clients sending a numbered message
        every SWITCH_INTERVAL, each with a few acks already.
        """
        backend = self.backend(setup)
        senders = await Senders.open(
            self, SWITCH_SESSIONS, lambda s: proxy.url(s, query="?ack=1"),
            lambda s: backend.setex(auth_key(s), 600, "tok"), SWITCH_INTERVAL,
        )
        senders.start()
        await wait(lambda: all(len(s.acked) >= 5 for s in senders.senders), 30,
                   "every client's first acks")
        return senders

    def check_nothing_lost(self, senders: Senders, on: Node, what: str,
                           proxy: RunningProxy, took: float) -> None:
        """
        No client closed or nacked, nothing failed past a bound, and every
        acked message in the stream on C{on}, once and in order.
        """
        stored = stored_ids(on.call("XRANGE", PLANNED_STREAM, "-", "+"))
        budget = proxy.proxy.hold_budget
        cluster = proxy.proxy.cluster
        assert cluster is not None
        record(f"{what}, {SWITCH_SESSIONS} sessions sending every "
               f"{SWITCH_INTERVAL * 1000:.0f} ms: slots moved {took:.2f}s after the "
               f"request; {budget.holds} hold(s), the longest {budget.longest * 1000:.0f} ms, "
               f"{budget.held} messages held; longest pause between two acks of one client "
               f"{senders.longest_gap * 1000:.0f} ms; {senders.sent} sent; redirections "
               f"{dict(cluster.redirects)}")
        self.assertEqual(senders.closed, {})
        self.assertEqual(senders.nacked, {})
        self.assertEqual(budget.failed, 0)
        self.assertEqual(missing(senders, stored), {})
        self.assertEqual(len(stored), len(set(stored)), "a message stored twice")

    async def test_cluster_failover_under_sending_sessions(self) -> None:
        """
        C{CLUSTER FAILOVER} on the replica of the master holding the
        upstream stream, while SWITCH_SESSIONS acknowledging clients send:
        the old master answers MOVED to a master the proxy has no
        connection to yet; the messages are held until it has one and
        written there in order. No client closed, no nack, every acked
        message in the stream on the new master.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup, upstream="stream", upstream_partitions=1)
        master = setup.owner(PLANNED_STREAM)
        replica = next(shard["replicas"][0] for shard in setup.shards()
                       if shard["master"] == master)
        senders = await self.sending(setup, proxy)
        started = time.monotonic()
        setup.node_at(replica).call("CLUSTER", "FAILOVER")
        await wait(lambda: setup.owner(PLANNED_STREAM) == replica, 30,
                   f"{replica} to take over", setup.describe)
        took = time.monotonic() - started
        await senders.acked_more(what="acks after the change")
        self.check_nothing_lost(senders, setup.node_at(replica), "CLUSTER FAILOVER", proxy,
                                took)
        self.assertGreaterEqual(proxy.proxy.hold_budget.holds, 1)

    async def test_slot_migration_under_sending_sessions(self) -> None:
        """
        The upstream stream's slot migrated to another master (the key
        MIGRATEd, ASK then MOVED) while SWITCH_SESSIONS acknowledging
        clients send: no client closed, no nack, every acked message in
        the stream on the new master, in order.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup, upstream="stream", upstream_partitions=1)
        source = setup.owner(PLANNED_STREAM)
        target = next(m for m in setup.masters() if m != source)
        senders = await self.sending(setup, proxy)
        started = time.monotonic()
        setup.migrate_slot(key_slot(PLANNED_STREAM.encode()), target)
        took = time.monotonic() - started
        await senders.acked_more(what="acks after the change")
        self.check_nothing_lost(senders, setup.node_at(target), "slot migration", proxy, took)

    async def test_moved_during_token_check(self) -> None:
        """
        The slot of a session's auth key moved to another master after the
        proxy learned the map: the GET meets MOVED, is sent again to the
        new master, and the client is admitted (101, not 503), its TTL
        reset there.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        sessions = _Sessions(self, setup, proxy)
        session = "moved-auth"
        sessions.authorize(session)
        slot = key_slot(auth_key(session).encode())
        old = setup.owners()[slot]
        target = next(m for m in setup.masters() if m != old)
        setup.migrate_slot(slot, target)
        cluster = proxy.proxy.cluster
        assert cluster is not None
        self.assertEqual(cluster.owners[slot], old)  # the proxy has not noticed yet
        await sessions.open([session])
        self.assertGreaterEqual(cluster.redirects["moved"], 1)
        self.assertGreater(sessions.backend.ttl(auth_key(session)), 600)
        await sessions.all_receive("moved")

    async def test_ask_during_token_check(self) -> None:
        """
        A session whose auth key is in a slot being migrated, the key
        already on the importing master: the GET meets ASK and is asked
        again there after ASKING; the client is admitted.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        sessions = _Sessions(self, setup, proxy)
        session = "ask-auth"
        sessions.authorize(session)
        key = auth_key(session)
        slot = key_slot(key.encode())
        source = setup.owners()[slot]
        assert source is not None
        target = next(m for m in setup.masters() if m != source)
        src, dst = setup.node_at(source), setup.node_at(target)
        dst.call("CLUSTER", "SETSLOT", slot, "IMPORTING", setup.node_id(src))
        src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", setup.node_id(dst))
        src.call("MIGRATE", HOST, dst.port, key, 0, 5000)
        await sessions.open([session])
        cluster = proxy.proxy.cluster
        assert cluster is not None
        self.assertGreaterEqual(cluster.redirects["ask"], 1)


class ConfigurationTests(ClusterTestCase):
    def daemon(self, **env: str) -> Daemon:
        full = {"HOST": "127.0.0.1", "PORT": str(free_port()), "SHUTDOWN_DRAIN_SECS": "0",
                "REDIS_CLUSTER": "true", **env}
        daemon = start_daemon(self, full)
        return daemon

    async def refused_and_unhealthy(self, daemon: Daemon, reason: bytes) -> None:
        port = await daemon.port()
        await wait_for(lambda: reason in daemon.out.output, timeout=20)
        self.assertEqual(await self.health(port), 503)
        response = await raw_exchange(port, upgrade_request(
            "/a/ws/s1", {"Authorization": "Bearer tok"}))
        self.assertEqual(status_of(response), 503)
        output = daemon.out.output.decode(errors="replace")
        self.assertNotIn("Traceback", output)
        self.assertEqual(output.count(reason.decode()), 1, output)
        self.assertIsNone(daemon.out.status)

    async def test_not_a_cluster(self) -> None:
        """
        REDIS_CLUSTER=true with REDIS_URL at a Redis without cluster
        support: the proxy runs, /health and upgrades are 503, and one log
        line says why (no traceback).
        """
        redis = redis_server(self)
        daemon = self.daemon(REDIS_URL=redis.url)
        await self.refused_and_unhealthy(daemon, b"not a cluster node (cluster support disabled)")

    async def test_no_node_reachable(self) -> None:
        """
        No seed node answers: 503 and one line naming each node's failure.
        """
        port = free_port()
        daemon = self.daemon(REDIS_URL=f"redis://127.0.0.1:{port}")
        await self.refused_and_unhealthy(
            daemon, f"no cluster node answered CLUSTER SHARDS (127.0.0.1:{port}: "
            "connection refused)".encode())

    async def test_combined_with_sentinels(self) -> None:
        """
        REDIS_CLUSTER with REDIS_SENTINELS (or with RESUME but without
        KEY_HASH_TAGS) stops start-up with one line and exit 2.
        """
        for env, variable in (({"REDIS_SENTINELS": "127.0.0.1:26379",
                                "REDIS_SENTINEL_MASTER": "m"}, "REDIS_CLUSTER"),
                              ({"RESUME": "true"}, "RESUME")):
            daemon = self.daemon(REDIS_URL="redis://127.0.0.1:7000", **env)
            await wait_for(lambda: daemon.out.status is not None, timeout=20)
            lines = daemon.out.output.decode().splitlines()
            self.assertEqual(daemon.out.status, 2)
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith(f"wsproxy: configuration error: {variable}: "),
                            lines)


class LogTests(ClusterTestCase):
    """
    What the daemon logs over a cluster's slot-map refreshes and a
    failover, counted line by line.
    """

    @staticmethod
    def asked(node: Node) -> int:
        """
        How many times C{node} has answered CLUSTER SHARDS: every slot-map
        refresh asks every node the proxy knows.
        """
        stats = node.client().info("commandstats")
        return int(stats.get("cmdstat_cluster|shards", {}).get("calls", 0))

    async def refreshes(self, nodes: list[Node], n: int) -> None:
        """
        Wait until each of C{nodes} has been asked for the map C{n} more
        times.
        """
        start = {node.port: self.asked(node) for node in nodes}
        await wait_for(lambda: all(self.asked(node) >= start[node.port] + n for node in nodes),
                       timeout=60)

    async def test_refreshes_and_failover_log_lines(self) -> None:
        """
        Slot-map refreshes log nothing (no "Starting factory"/"Stopping
        factory" per node asked): start-up is a bounded handful of lines.
        kill -9 of a master: once its replica is promoted, exactly one
        warning says the old master left the map and who serves its slots,
        and over several refreshes after it no connection failure is
        logged again (its links are stopped, not retried); its
        wsproxy_cluster_shard_up series reads 0 (it is listed as failed),
        the successor's 1.
        """
        setup = self.start_cluster()
        port = free_port()
        daemon = start_daemon(self, {"HOST": "127.0.0.1", "PORT": str(port),
                                     "SHUTDOWN_DRAIN_SECS": "0", "REDIS_CLUSTER": "true",
                                     "REDIS_URL": setup.url})
        await daemon.healthy(port)
        await self.refreshes(setup.nodes, 2)
        lines = daemon.log.splitlines()
        self.assertNotIn("Starting factory", daemon.log)
        self.assertNotIn("Stopping factory", daemon.log)
        # start-up (twistd, reactor, site, listening, descriptors), the map,
        # re-subscribing, and two connections per master
        self.assertLessEqual(len(lines), 15, daemon.log)

        victim = setup.masters()[0]
        setup.kill_master(victim)
        promoted = await setup.promotion(victim)
        left = f"redis cluster: {victim[0]}:{victim[1]} is no longer a master"
        await wait_for(lambda: left in daemon.log, timeout=30)
        at_warning = len(daemon.log)
        await self.refreshes([n for n in setup.nodes if n.alive], 2)
        log = daemon.log
        self.assertEqual(log.count(left), 1, log)
        self.assertIn(f"its slots are served by {promoted[0]}:{promoted[1]}", log)
        self.assertNotIn("connection failed", log[at_warning:], log)
        self.assertLessEqual(log.count("connection failed"), 2, log)  # during the outage
        for unwanted in ("Starting factory", "Stopping factory", "HostnameAddress",
                         "Traceback"):
            self.assertNotIn(unwanted, log)
        # the kill: two links lost, at most one failure line, the warning;
        # the successor's two links
        self.assertLessEqual(len(log.splitlines()), len(lines) + 8, log)
        metrics = await self.metrics(port)
        self.assertIn(f'wsproxy_cluster_shard_up{{shard="{victim[0]}:{victim[1]}"}} 0.0',
                      metrics)
        self.assertIn(f'wsproxy_cluster_shard_up{{shard="{promoted[0]}:{promoted[1]}"}} 1.0',
                      metrics)


class BackendHelperTests(ClusterTestCase):
    async def test_backend_on_a_cluster(self) -> None:
        """
        L{wsproxy.backend.Backend} given a RedisCluster client speaks the
        cluster's contract: authorize, publish (SPUBLISH) to a client,
        listen_up (SSUBSCRIBE) to what it sends, is_connected, and close
        with revoke (the token deleted, the close SPUBLISHed on
        wsproxy:control): the socket is closed with the code and the
        token no longer admits.
        """
        from twisted.internet import threads

        from wsproxy.backend import Backend

        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        backend = Backend(self.backend(setup))
        self.assertTrue(backend.sharded)
        token = backend.authorize("helper")
        up = backend.listen_up("helper", timeout=0.2)
        first = threads.deferToThread(next, up)
        self.addCleanup(up.close)
        client = await connect(proxy.url("helper"), token=token)
        self.addCleanup(client.close_and_wait)
        self.assertTrue(backend.is_connected("helper"))
        self.assertEqual(backend.publish("helper", "hi"), 1)
        await client.wait_messages(1)
        self.assertEqual(client.messages, [(b"hi", False)])
        await wait_for(lambda: backend.redis.execute_command(
            "PUBSUB SHARDNUMSUB", up_channel("helper").decode(),
            target_nodes=backend.redis.get_node_from_key(up_channel("helper").decode()),
        )[0][1] >= 1)
        client.sendMessage(b"from-client")
        self.assertEqual(await first, ("helper", b"from-client"))
        self.assertGreaterEqual(backend.close("helper", 4001, "bye", revoke=True), 1)
        code, reason = await client.factory.closed
        self.assertEqual((code, reason), (4001, "bye"))
        self.assertFalse(backend.redis.exists(auth_key("helper")))
        await wait_for(lambda: not backend.is_connected("helper"))


    async def test_listener_follows_a_moved_slot(self) -> None:
        """
        A backend listening with C{listen_up} over a RedisCluster while the
        slot of the session's :up channel migrates to another master
        (Redis drops the SSUBSCRIBE there with a sunsubscribe push) goes
        on listening: the helper SSUBSCRIBEs again on the new owner, where
        an SPUBLISH reaches it, and so does what the session's client
        sends through the proxy (which follows MOVED). redis-py 8.2 alone
        leaves the channel subscribed nowhere.
        """
        setup = self.start_cluster()
        proxy = await self.start_proxy(setup)
        backend = Backend(self.backend(setup))
        channel = up_channel("moving").decode()
        old = setup.owner(channel)
        assert old is not None
        new = next(m for m in setup.masters() if m != old)

        def subscribers(address: Any) -> int:
            return int(setup.node_at(address).call("PUBSUB", "SHARDNUMSUB", channel)[1])

        listener = BackendListener(backend.listen_up("moving", timeout=0.2, reconnect_for=10))
        await wait_for(lambda: subscribers(old) == 1)
        setup.node_at(old).call("SPUBLISH", channel, "before")
        await wait_for(lambda: listener.received == [("moving", b"before")])

        setup.migrate_slot(key_slot(channel.encode()), new)
        await wait_for(lambda: subscribers(new) == 1, timeout=15)
        self.assertEqual(subscribers(old), 0)
        setup.node_at(new).call("SPUBLISH", channel, "after")
        await wait_for(lambda: len(listener.received) == 2)
        self.assertEqual(listener.received, [("moving", b"before"), ("moving", b"after")])

        token = backend.authorize("moving")
        client = await connect(proxy.url("moving"), token=token)
        self.addCleanup(client.close_and_wait)
        client.sendMessage(b"from-client")
        await wait_for(lambda: len(listener.received) == 3)
        self.assertEqual(listener.received[2], ("moving", b"from-client"))
        self.assertIsNone(listener.error)


    async def test_listener_follows_a_killed_master(self) -> None:
        """
        kill -9 of the master that holds a backend's C{listen_up}
        subscription: the listener asks the cluster for its slot map
        again and SSUBSCRIBEs on the promoted replica, where an SPUBLISH
        reaches it.
        """
        setup = self.start_cluster()
        backend = Backend(self.backend(setup))
        channel = up_channel("killed").decode()
        old = setup.owner(channel)
        assert old is not None
        listener = BackendListener(
            backend.listen_up("killed", timeout=0.2, reconnect_for=FAILOVER_BOUND))
        await wait_for(lambda: setup.node_at(old).call(
            "PUBSUB", "SHARDNUMSUB", channel)[1] == 1)
        setup.kill_master(old)
        new = await setup.promotion(old)
        await wait_for(lambda: setup.node_at(new).call(
            "PUBSUB", "SHARDNUMSUB", channel)[1] == 1, timeout=FAILOVER_BOUND)
        setup.node_at(new).call("SPUBLISH", channel, "after")
        await wait_for(lambda: listener.received == [("killed", b"after")])
        self.assertIsNone(listener.error)


class BinDevClusterTests(ClusterTestCase):
    async def test_printed_variables_work_and_sigterm_stops_all(self) -> None:
        """
        C{bin/dev cluster --free-ports}: wsproxy started with the printed
        REDIS_CLUSTER and REDIS_URL becomes healthy and serves a session;
        SIGTERM stops bin/dev (exit 0) and all six redis-servers, and its
        directory is gone.
        """
        dev = start_daemon(self, {}, (os.path.join(ROOT, "bin", "dev"), "cluster", "--free-ports"))
        await wait_for(lambda: b"Ctrl-C stops everything" in dev.out.output
                       or dev.out.ended.called, timeout=60)
        text = dev.out.output.decode()
        found = re.search(r"REDIS_CLUSTER=true REDIS_URL=(\S+) bin/dev run", text)
        assert found is not None, text
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text.split("Run wsproxy")[0])]
        self.assertEqual(len(set(ports)), 6, text)
        directory = re.search(r"files in (\S+)\)", text)
        assert directory is not None, text
        settings = settings_for(found.group(1), redis_cluster=True)
        proxy = RunningProxy(settings)
        self.addCleanup(proxy.stop)
        await proxy.ready()
        backend = RedisCluster(host=HOST, port=ports[0], socket_timeout=2)
        self.addCleanup(backend.close)
        backend.set(auth_key("d1"), "tok", ex=600)
        client = await connect(proxy.url("d1"), token="tok")
        self.addCleanup(client.close_and_wait)
        backend.spublish(down_channel("d1"), "hello")
        await client.wait_messages(1)
        await proxy.stop()
        dev.signal(signal.SIGTERM)
        await wait_for(lambda: dev.out.ended.called, timeout=20)
        self.assertEqual(dev.out.status, 0, dev.out.output.decode())
        for port in ports:
            self.assertFalse(Node("", port, [], "").answers(), f"port {port} still answers")
        self.assertFalse(os.path.exists(directory.group(1)))


class ResumeTests(ClusterTestCase):
    async def test_resumable_sessions_on_a_cluster(self) -> None:
        """
        RESUME=true with KEY_HASH_TAGS=true on a cluster: the function
        library is loaded on every master; recoverable messages published
        with wsproxy.backend (FCALL on the master of the session's slot,
        SPUBLISH of the live copy inside the function) reach a resuming
        client live, and after a reconnect with its last position the
        messages published meanwhile are replayed, each once, in order.
        """
        from wsproxy.backend import Backend

        from .support.clients import Received

        setup = self.start_cluster()
        proxy = await self.start_proxy(setup, resume=True, key_hash_tags=True)
        for address in setup.masters():
            await wait_for(lambda: setup.node_at(address).call("FUNCTION", "LIST"), timeout=15)
        backend = Backend(self.backend(setup), hash_tags=True)
        token = backend.authorize("r1")
        first = await connect(proxy.url("r1", query="?resume="), token=token)
        received = Received(first)
        await first.wait_messages(1)
        self.assertTrue(received.controls()[0]["recovered"])
        backend.publish_recoverable("r1", "one")
        await first.wait_messages(2)
        self.assertEqual(received.messages(), [b"one"])
        position = received.last_position()
        await first.close_and_wait()
        backend.publish_recoverable("r1", "two")
        backend.publish_recoverable("r1", "three")
        from urllib.parse import quote

        second = await connect(proxy.url("r1", query=f"?resume={quote(position)}"), token=token)
        self.addCleanup(second.close_and_wait)
        again = Received(second)
        await second.wait_messages(3)
        self.assertEqual(again.controls()[0]["replayed"], 2)
        self.assertEqual(again.messages(), [b"two", b"three"])
        backend.publish_recoverable("r1", "four")
        await second.wait_messages(4)
        self.assertEqual(again.messages(), [b"two", b"three", b"four"])


class EventsTests(ClusterTestCase):
    async def test_events_and_heartbeat_on_a_cluster(self) -> None:
        """
        EVENTS=all,stream on a cluster: a socket's open and close events
        are SPUBLISHed on wsproxy:events (read with SSUBSCRIBE by the
        backend helper) and appended to wsproxy:events:stream on the
        master of its slot; the instance's heartbeat key is set there.
        """
        from twisted.internet import threads

        from wsproxy.backend import Backend
        from wsproxy.names import EVENTS_STREAM, instance_key

        setup = self.start_cluster()
        proxy = await self.start_proxy(setup, events=("all", "stream"))
        backend = Backend(self.backend(setup))
        events = backend.listen_events(timeout=0.2)
        self.addCleanup(events.close)
        first = threads.deferToThread(next, events)
        channel = "wsproxy:events"
        await wait_for(lambda: backend.redis.execute_command(
            "PUBSUB SHARDNUMSUB", channel,
            target_nodes=backend.redis.get_node_from_key(channel))[0][1] >= 1)
        token = backend.authorize("ev1")
        client = await connect(proxy.url("ev1"), token=token)
        opened = await first
        self.assertEqual((opened["event"], opened["session_id"]), ("open", "ev1"))
        await client.close_and_wait()
        await wait_for(lambda: backend.redis.xlen(EVENTS_STREAM) == 2)
        await wait_for(lambda: backend.instance_alive(proxy.proxy.instance), timeout=15)
        self.assertTrue(backend.redis.exists(instance_key(proxy.proxy.instance)))


class DurableUpstreamTests(ClusterTestCase):
    async def test_partition_streams_on_their_masters(self) -> None:
        """
        UPSTREAM=stream on a cluster: each client message is appended
        (XADD) on the master that owns its session's partition stream
        (wsproxy:up:{p<n>}, one slot each), sessions of several partitions
        land on their own streams, and ?ack=1 clients get the entry id.
        """
        import json
        import zlib

        setup = self.start_cluster()
        proxy = await self.start_proxy(setup, upstream="stream", upstream_partitions=6)
        sessions = _Sessions(self, setup, proxy)
        names = [f"u{i}" for i in range(6)]
        for name in names:
            sessions.authorize(name)
        clients = {}
        for name in names:
            clients[name] = await connect(proxy.url(name, query="?ack=1"), token="tok")
            self.addCleanup(clients[name].close_and_wait)
            clients[name].sendMessage(f"m-{name}\nhello {name}".encode(), False)
        for name, client in clients.items():
            await client.wait_messages(1)
            ack = json.loads(client.messages[0][0][1:])
            stream = f"wsproxy:up:{{p{zlib.crc32(name.encode()) % 6}}}"
            entries = dict(sessions.backend.xrange(stream))
            entry = entries[ack["position"].encode()]
            self.assertEqual((entry[b"session"], entry[b"data"]),
                             (name.encode(), f"hello {name}".encode()))
            owner = setup.owner(stream)
            assert owner is not None
            self.assertEqual(setup.node_at(owner).call("XLEN", stream), len(entries))
        # the backend side: the helper's consumer reads every partition
        # (different slots: one stream per command), acknowledges, and
        # records the ids it handled in the session's slot
        consumer = DurableConsumer(sessions.backend, "workers", "w1", partitions=6,
                                   hash_tags=True)
        consumer.create_groups()
        got = consumer.read(count=100, block_ms=100)
        self.assertEqual(sorted(m.message_id for m in got), sorted(f"m-{n}" for n in names))
        self.assertEqual(len(consumer.pending()), len(names))
        for message in got:
            self.assertFalse(consumer.seen(message))
            consumer.mark_seen(message)
        self.assertEqual(consumer.ack(*got), len(names))
        self.assertEqual(consumer.pending(), [])
        self.assertTrue(all(consumer.seen(m) for m in got))
        self.assertEqual(consumer.read(count=100, block_ms=100), [])
        self.assertEqual(sessions.backend.exists("session:{u0}:seen:m-u0"), 1)
