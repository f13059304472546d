"""
Redis Sentinel with real processes: C{python -m wsproxy} pointed at three
sentinels that monitor a master and a replica (L{tests.sentinel}), real
WebSocket clients, and real failovers (kill -9 of the master, and
C{SENTINEL FAILOVER}), with no restart of wsproxy.

C{REDIS_URL} names a port where nothing listens: in sentinel mode only its
credentials and database are used, so a proxy that connected there would
never become healthy.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import redis as redispy
from redis.sentinel import Sentinel
from twisted.internet import defer, reactor, task
from twisted.python import log

from wsproxy.backend import Backend

from .support import (
    ROOT,
    BackendListener,
    Client,
    Daemon,
    connect,
    exchange_messages,
    free_port,
    raw_exchange,
    start_daemon,
    start_rig,
    status_of,
    up_listener,
    upgrade_request,
    wait_for,
)
from .support.senders import Senders, missing, stored_ids
from .support.sentinel import HOST, Node, RigTestCase, SentinelSetup, wait
from .support.proxy import start_proxy

#: the most a failover may take, from the fault to a message delivered
#: through the new master (Sentinel alone needs 2-6 s here)
FAILOVER_BOUND = 30.0

#: after the sentinels report the new master, how long wsproxy may take to
#: admit new connections and deliver to every existing session again
FOLLOW_BOUND = 10.0

#: after a graceful failover, from the promotion to the proxy's subscription
#: on the new master: +switch-master is acted on at once (0.3 s here);
#: without it the proxy stays on the old master, which still takes writes,
#: until Sentinel demotes it (8 s or more after the promotion)
SWITCH_BOUND = 5.0


async def pause(seconds: float) -> None:
    """
    Between two attempts of a retried step (the reactor runs meanwhile).
    """
    await task.deferLater(reactor, seconds, lambda: None)


def record(text: str) -> None:
    """
    A measurement, on stdout (trial's output) and in the test log.
    """
    print(f"\n    {text}", flush=True)
    log.msg(text)


class SentinelTestCase(RigTestCase):
    def start_sentinels(self, **options: Any) -> SentinelSetup:
        return start_rig(self, SentinelSetup(**options))

    def start_proxy(self, sentinels: str, master: str, **env: str) -> Daemon:
        full = {
            "HOST": "127.0.0.1", "PORT": "0",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}",
            "REDIS_SENTINELS": sentinels, "REDIS_SENTINEL_MASTER": master,
            "SHUTDOWN_DRAIN_SECS": "0", "SHUTDOWN_GRACE_PERIOD_SECS": "5",
        }
        full.update(env)
        daemon = start_daemon(self, full)
        return daemon

    def proxy_for(self, setup: SentinelSetup, **env: str) -> Daemon:
        return self.start_proxy(setup.addresses(), setup.name, **env)

    async def health(self, port: int) -> int:
        response = await raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
        return status_of(response)

    async def healthy(self, daemon: Daemon, timeout: float = 30.0) -> int:
        """
        The daemon's port, once /health answers 200.
        """
        port = await daemon.port()
        deadline = time.monotonic() + timeout
        while await self.health(port) != 200:
            if daemon.out.ended.called or time.monotonic() > deadline:
                self.fail(f"/health not 200 within {timeout}s; output:\n"
                          f"{daemon.out.output.decode(errors='replace')[-3000:]}")
            await pause(0.2)
        return port

    def url(self, port: int, session: str, query: str = "") -> str:
        return f"ws://127.0.0.1:{port}/a/ws/{session}{query}"

    async def open_sessions(self, master: Node, port: int, n: int) -> list[Client]:
        """
        C{n} sessions authorized on C{master} (and on the replica: the
        tokens must survive the failover) and connected; each has received
        one message through C{master}.
        """
        r = master.client()
        self.addCleanup(r.close)
        for i in range(n):
            r.set(f"session:s{i}:auth", "tok", ex=600)
        self.assertGreaterEqual(r.execute_command("WAIT", 1, 5000), 1,
                                "the tokens did not reach the replica")
        clients = []
        for i in range(n):
            c = await connect(self.url(port, f"s{i}"), token="tok")
            self.addCleanup(c.close_and_wait)
            clients.append(c)
        for i, c in enumerate(clients):
            r.publish(f"session:s{i}:down", "before")
            await c.wait_messages(1)
        self.assertEqual([c.messages for c in clients], [[(b"before", False)]] * n)
        return clients

    async def delivered(self, client: Client, session: str, master: Node, label: str,
                        timeout: float) -> float:
        """
        Publish numbered messages for C{session} on C{master}, a few a
        second (Pub/Sub keeps nothing for a subscriber that is still
        reconnecting), until C{client} receives one; returns when.
        """
        r = master.client()
        self.addCleanup(r.close)
        sent = [0]

        def arrived() -> bool:
            if any(payload.startswith(label.encode()) for payload, _ in client.messages):
                return True
            sent[0] += 1
            r.publish(f"session:{session}:down", f"{label}-{sent[0]}")
            return False

        await wait(arrived, timeout, f"a message to {session} through {master}",
                   interval=0.1)
        return time.monotonic()

    async def admitted(self, port: int, master: Node, session: str, timeout: float) -> Client:
        """
        A new session authorized on C{master} connects (retried while the
        proxy still refuses with 503), and messages go both ways through
        C{master}.
        """
        r = master.client()
        self.addCleanup(r.close)
        r.set(f"session:{session}:auth", "tok", ex=600)
        received = up_listener(r, session, self)
        deadline = time.monotonic() + timeout
        while True:
            try:
                c: Client = await connect(self.url(port, session), token="tok")
                break
            except ConnectionError as e:
                if time.monotonic() > deadline:
                    self.fail(f"new connection still refused after {timeout}s: {e}")
                await pause(0.2)
        self.addCleanup(c.close_and_wait)
        r.publish(f"session:{session}:down", "hello")
        await c.wait_messages(1)
        c.sendMessage(b"up")
        await wait_for(lambda: received() == [b"up"])
        return c

    async def subscribed_on(self, new: Node, promoted: float) -> float:
        """
        After a graceful failover: when the proxy has subscribed session
        s0 on the new master, at most SWITCH_BOUND seconds after the
        promotion. (The old master, still up, later copies the new
        master's PUBLISHes to its own subscribers: a delivery alone does
        not show that the proxy moved.)
        """
        await wait(lambda: new.call("PUBSUB", "NUMSUB", "session:s0:down")[1] == 1,
                   FAILOVER_BOUND, f"the proxy to subscribe s0 on {new}")
        moved = time.monotonic()
        self.assertLess(moved - promoted, SWITCH_BOUND,
                        f"the proxy left the old master {moved - promoted:.2f}s after the "
                        "promotion: the +switch-master was not acted on")
        return moved

    async def check_follows_failover(self, graceful: bool) -> None:
        """
        The common body of the two failover tests.
        """
        setup = self.start_sentinels()
        daemon = self.proxy_for(setup)
        port = await self.healthy(daemon)
        pid = daemon.process.pid
        old = setup.master()
        clients = await self.open_sessions(old, port, 5)

        started = time.monotonic()
        new = await setup.lose_master(graceful)
        promoted = time.monotonic()
        first = await self.delivered(clients[0], "s0", new, "after", FAILOVER_BOUND)
        if graceful:
            first = await self.subscribed_on(new, promoted)
        how = "SENTINEL FAILOVER" if graceful else "kill -9 of the master"
        record(f"{how}: promotion reported {promoted - started:.2f}s after, "
               f"first message through the new master {first - started:.2f}s after "
               f"({first - promoted:.2f}s after the promotion)")
        self.assertLess(first - started, FAILOVER_BOUND)

        for i, c in enumerate(clients[1:], start=1):
            await self.delivered(c, f"s{i}", new, "after",
                                 max(1.0, promoted + FOLLOW_BOUND - time.monotonic()))
        await self.admitted(port, new, "fresh",
                            max(1.0, promoted + FOLLOW_BOUND - time.monotonic()))
        # every session is subscribed on the new master, none on the old one
        channels = [f"session:s{i}:down" for i in range(5)]
        self.assertEqual(new.call("PUBSUB", "NUMSUB", *channels)[1::2], [1] * 5)
        if graceful:
            await wait(lambda: old.replicates(new.address), 60, f"{old} to replicate {new}")
            self.assertEqual(old.call("PUBSUB", "NUMSUB", *channels)[1::2], [0] * 5)
        # the existing sockets were never closed, and their messages reach
        # the backend on the new master
        r = new.client()
        self.addCleanup(r.close)
        for i, c in enumerate(clients):
            self.assertEqual(c.state, c.STATE_OPEN)
            received = up_listener(r, f"s{i}", self)
            c.sendMessage(b"still here")
            await wait_for(lambda: received() == [b"still here"])
        # the same process all along
        self.assertFalse(daemon.out.ended.called)
        self.assertEqual(daemon.process.pid, pid)
        self.assertNotIn(b"Traceback", daemon.out.output)
        # asking the sentinels (every attempt, the watch) logs nothing of its own
        self.assertNotIn(b"Starting factory", daemon.out.output)
        self.assertNotIn(b"Stopping factory", daemon.out.output)


class FailoverTests(SentinelTestCase):

    async def test_master_killed(self) -> None:
        """
        kill -9 of the master under 5 open sessions: once the sentinels
        have promoted the replica, every session receives messages
        published on the new master and new connections are admitted
        within FOLLOW_BOUND seconds, with no socket closed and no restart;
        the first message arrives within FAILOVER_BOUND seconds of the
        kill.
        """
        await self.check_follows_failover(graceful=False)

    async def test_sentinel_failover(self) -> None:
        """
        The same with C{SENTINEL FAILOVER}: the old master stays up (as a
        replica) and the proxy leaves it for the new one, subscriptions
        and publishing included.
        """
        await self.check_follows_failover(graceful=True)

    async def test_old_master_back_as_replica_is_never_written(self) -> None:
        """
        The killed master, restarted (empty, believing itself a master
        until the sentinels demote it), becomes a replica of the new
        master; while clients connect, subscribe and send, it sees none of
        the proxy's commands (no GET, no refused write, no client other
        than its master link, the sentinels and the test's), and the new
        master sees all of them.
        """
        setup = self.start_sentinels()
        daemon = self.proxy_for(setup)
        port = await self.healthy(daemon)
        old = setup.master()
        clients = await self.open_sessions(old, port, 2)
        setup.kill_master()
        new = await setup.promotion(old.address)
        for i, c in enumerate(clients):
            await self.delivered(c, f"s{i}", new, "after", FAILOVER_BOUND)

        setup.restart(old)
        await setup.demoted(old)
        old.call("CONFIG", "RESETSTAT")
        new.call("CONFIG", "RESETSTAT")
        strangers: list[str] = []

        def watch_old() -> None:
            for line in old.call("CLIENT", "LIST").decode().splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if ("M" in fields["flags"] or fields["name"].startswith("sentinel-")
                        or fields["name"] == "wsproxy-test"
                        # just accepted, nothing sent yet (a sentinel names
                        # its links with its first command)
                        or fields["cmd"] == "NULL"):
                    continue
                strangers.append(line)

        # traffic through the proxy: a new session (GET, EXPIRE, SUBSCRIBE),
        # messages both ways on old and new sessions
        watch_old()
        await self.admitted(port, new, "later", FOLLOW_BOUND)
        watch_old()
        r = new.client()
        self.addCleanup(r.close)
        for i, c in enumerate(clients):
            received = up_listener(r, f"s{i}", self)
            c.sendMessage(b"up")
            await wait_for(lambda: received() == [b"up"])
            watch_old()
            r.publish(f"session:s{i}:down", "down")
            await wait_for(lambda: (b"down", False) in c.messages)
            watch_old()

        self.assertEqual(old.role(), "slave")
        old_stats = old.call("INFO", "commandstats")
        new_stats = new.call("INFO", "commandstats")
        errors = old.call("INFO", "errorstats")
        # commandstats also count what replication and the sentinels send
        # (SELECT, PUBLISH, PEXPIREAT; the sentinels' own SUBSCRIBE once
        # they reconnect after demoting it): only a GET or a refused write
        # can be the proxy's, and any connection of the proxy's is a
        # stranger in CLIENT LIST
        self.assertNotIn("cmdstat_get", old_stats, old_stats)
        self.assertNotIn("errorstat_READONLY", errors, errors)
        self.assertEqual(strangers, [])
        # nothing subscribed there but the sentinels' own channel
        self.assertEqual(old.call("PUBSUB", "CHANNELS"), [b"__sentinel__:hello"])
        # the proxy did all that on the new master
        self.assertGreaterEqual(new_stats["cmdstat_get"]["calls"], 1)
        self.assertGreaterEqual(new_stats["cmdstat_expire"]["calls"], 1)
        self.assertGreaterEqual(new_stats["cmdstat_subscribe"]["calls"], 1)
        self.assertGreaterEqual(new_stats["cmdstat_publish"]["calls"], 2)
        self.assertFalse(daemon.out.ended.called)


#: sessions sending during a planned failover (bench/switch.sh runs 100)
SWITCH_SESSIONS = int(os.environ.get("SWITCH_SESSIONS", "20"))

#: each of them sends a message this often (seconds)
SWITCH_INTERVAL = 0.05


class Availability:
    """
    /ready and /health asked every 50 ms while a switch is under way: the
    statuses seen, and how long /health was not 200.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.ready: list[int] = []
        self.unhealthy = 0.0
        self._since: float | None = None
        self._loop = task.LoopingCall(self._ask)
        self._asking = False

    def start(self) -> None:
        self._loop.start(0.05)

    async def stop(self) -> None:
        self._loop.stop()
        await wait(lambda: not self._asking, 10, "the last /health answer")

    def _ask(self) -> None:
        if not self._asking:
            self._asking = True
            defer.ensureDeferred(self._both()).addBoth(self._done)

    def _done(self, result: Any) -> None:
        self._asking = False

    async def _both(self) -> None:
        self.ready.append(status_of(await raw_exchange(
            self.port, b"GET /ready HTTP/1.0\r\n\r\n")))
        health = status_of(await raw_exchange(self.port, b"GET /health HTTP/1.0\r\n\r\n"))
        now = time.monotonic()
        if health != 200 and self._since is None:
            self._since = now
        elif health == 200 and self._since is not None:
            self.unhealthy += now - self._since
            self._since = None


class PlannedFailoverTests(SentinelTestCase):

    async def test_sentinel_failover_under_sending_sessions(self) -> None:
        """
        C{SENTINEL FAILOVER} while SWITCH_SESSIONS acknowledging clients
        (durable upstream, C{?ack=1}) each send a numbered message every
        50 ms: no client is closed, none gets a nack, /ready stays 200,
        every message is answered, and every acked message is in the
        stream on the new master, in each client's order, except those
        the old master took after the promotion and before the proxy heard
        C{+switch-master}: each of those is in the old master's stream
        (the documented window). Messages sent while the command
        connection was replaced were held and written to the new master.
        """
        setup = self.start_sentinels()
        old = setup.master()
        proxy = start_proxy(
            self, f"redis://{HOST}:{free_port()}",
            redis_sentinels=tuple((HOST, s.port) for s in setup.sentinels),
            redis_sentinel_master=setup.name, upstream="stream", upstream_partitions=1,
        )
        await proxy.ready()
        r = old.client()
        self.addCleanup(r.close)
        senders = await Senders.open(
            self, SWITCH_SESSIONS, lambda s: proxy.url(s, query="?ack=1"),
            lambda s: r.set(f"session:{s}:auth", "tok", ex=600), SWITCH_INTERVAL,
        )
        self.assertGreaterEqual(r.execute_command("WAIT", 1, 5000), 1,
                                "the tokens did not reach the replica")
        budget = proxy.proxy.hold_budget
        availability = Availability(proxy.port)
        availability.start()
        senders.start()
        await wait(lambda: all(len(s.acked) >= 5 for s in senders.senders), 30,
                   "every client's first acks")
        started = time.monotonic()
        await setup.failover()
        await wait(lambda: budget.holds >= 1, 30, "the proxy to replace its connection")
        switched = time.monotonic()
        await senders.acked_more(what="acks after the switch")
        await availability.stop()
        new = await setup.promotion(old.address)
        stream = "wsproxy:up:{p0}"
        on_new = stored_ids(new.call("XRANGE", stream, "-", "+"))
        lost = missing(senders, on_new)
        lost_ids = {f"{s}-{n}" for s, ns in lost.items() for n in ns}
        still_master = old.role() == "master"
        on_old = set(stored_ids(old.call("XRANGE", stream, "-", "+"))) if still_master else set()
        record(
            f"SENTINEL FAILOVER, {SWITCH_SESSIONS} sessions sending every "
            f"{SWITCH_INTERVAL * 1000:.0f} ms: command connection on the new master "
            f"{switched - started:.2f}s after the request; {budget.holds} hold(s), the "
            f"longest {budget.longest * 1000:.0f} ms, {budget.held} messages held; longest "
            f"pause between two acks of one client {senders.longest_gap * 1000:.0f} ms; "
            f"{senders.sent} sent, {len(lost_ids)} acked by the old master after the "
            f"promotion (the window); /health not 200 for "
            f"{availability.unhealthy * 1000:.0f} ms, /ready "
            f"{sorted(set(availability.ready))}"
        )
        self.assertEqual(senders.closed, {})
        self.assertEqual(senders.nacked, {})
        self.assertEqual(budget.failed, 0)
        metrics = proxy.proxy.stats.render().decode()
        self.assertIn(f"wsproxy_redis_holds_total {float(budget.holds)}", metrics)
        self.assertIn(f"wsproxy_redis_held_commands_total {float(budget.held)}", metrics)
        self.assertIn("wsproxy_redis_hold_failures_total 0.0", metrics)
        self.assertEqual(set(availability.ready), {200})
        if still_master:
            self.assertEqual(lost_ids - on_old, set(),
                             "acked messages on neither master")
        self.assertEqual(len(on_new), len(set(on_new)), "a message stored twice")


    async def test_sentinel_failover_publishing_clients(self) -> None:
        """
        The same with Pub/Sub upstream (C{PUBLISH} on :up, clients without
        acks, which a failed publish closes with 1011): no client is
        closed and no publish fails. (A backend subscribed to :up on both
        data nodes does not see every message: the sentinels kill the
        Pub/Sub clients of the promoted replica, so it misses what is
        published there before it subscribes again; how many is printed.
        Durable upstream is the answer for a backend that needs them all.)
        """
        setup = self.start_sentinels()
        old = setup.master()
        proxy = start_proxy(
            self, f"redis://{HOST}:{free_port()}",
            redis_sentinels=tuple((HOST, s.port) for s in setup.sentinels),
            redis_sentinel_master=setup.name,
        )
        await proxy.ready()
        r = old.client()
        self.addCleanup(r.close)
        found: set[str] = set()
        readers: dict[Node, Any] = {}

        def received() -> set[str]:
            for node in setup.data:
                try:
                    if node not in readers:
                        pubsub = node.client().pubsub(ignore_subscribe_messages=True)
                        self.addCleanup(pubsub.close)
                        pubsub.psubscribe("session:*:up")
                        readers[node] = pubsub
                    while (message := readers[node].get_message(timeout=0)) is not None:
                        match = re.match(rb"(s\d+-\d+)\n", message["data"])
                        if match:
                            found.add(match.group(1).decode())
                except redispy.ConnectionError:
                    readers.pop(node, None)  # killed by the sentinels: subscribe again
            return found

        senders = await Senders.open(
            self, SWITCH_SESSIONS, lambda s: proxy.url(s),
            lambda s: r.set(f"session:{s}:auth", "tok", ex=600), SWITCH_INTERVAL,
        )
        self.assertGreaterEqual(r.execute_command("WAIT", 1, 5000), 1,
                                "the tokens did not reach the replica")
        budget = proxy.proxy.hold_budget
        # the backend reads (and subscribes again) all along
        backend = task.LoopingCall(received)
        backend.start(0.02)

        def stop_backend() -> None:
            if backend.running:
                backend.stop()

        self.addCleanup(stop_backend)
        senders.start()
        await wait(lambda: len(received()) >= 5 * SWITCH_SESSIONS, 30, "the first messages")
        await setup.failover()
        await wait(lambda: budget.holds >= 1, 30, "the proxy to replace its connection")
        await setup.promotion(old.address)
        sent = senders.sent
        await wait(lambda: len(received()) >= sent + 5 * SWITCH_SESSIONS, 30,
                   "messages after the switch")
        senders.stop()
        every = {i for s in senders.senders for i in s.sent}
        # what the backend will ever see has arrived within a second or two
        deadline = time.monotonic() + 3
        while every - received() and time.monotonic() < deadline:
            await pause(0.1)
        record(
            f"SENTINEL FAILOVER, Pub/Sub upstream, {SWITCH_SESSIONS} sessions publishing "
            f"every {SWITCH_INTERVAL * 1000:.0f} ms: {budget.holds} hold(s), the longest "
            f"{budget.longest * 1000:.0f} ms, {budget.held} messages held; {len(every)} "
            f"sent, {len(every - found)} not seen by a backend subscribed on both nodes "
            f"({proxy.proxy.stats.messages_up_unheard} published to no subscriber)"
        )
        self.assertEqual(senders.closed, {})
        self.assertEqual(budget.failed, 0)


class SentinelSetupTests(SentinelTestCase):

    async def test_one_sentinel_down(self) -> None:
        """
        The first of the three sentinels is down from the start: the proxy
        finds the master through the others, serves sessions, and still
        follows a failover (which the two remaining sentinels can agree on).
        """
        setup = self.start_sentinels()
        setup.kill_sentinel(0)
        daemon = self.proxy_for(setup)
        port = await self.healthy(daemon)
        old = setup.master()
        [client] = await self.open_sessions(old, port, 1)
        started = time.monotonic()
        setup.kill_master()
        new = await setup.promotion(old.address)
        first = await self.delivered(client, "s0", new, "after", FAILOVER_BOUND)
        record(f"kill -9 of the master with one sentinel down: first message through the "
               f"new master {first - started:.2f}s after")
        await self.admitted(port, new, "fresh", FOLLOW_BOUND)

    async def test_watched_sentinel_killed(self) -> None:
        """
        The sentinel the proxy listens to for +switch-master (the first)
        is killed while the proxy runs: it listens on another, and a
        SENTINEL FAILOVER is still followed at once.
        """
        setup = self.start_sentinels()
        daemon = self.proxy_for(setup)
        port = await self.healthy(daemon)
        old = setup.master()
        [client] = await self.open_sessions(old, port, 1)
        setup.kill_sentinel(0)
        started = time.monotonic()
        await setup.failover()
        new = await setup.promotion(old.address)
        moved = await self.subscribed_on(new, time.monotonic())
        record(f"SENTINEL FAILOVER after the watched sentinel was killed: the proxy on the "
               f"new master {moved - started:.2f}s after")
        await self.delivered(client, "s0", new, "after", FOLLOW_BOUND)

    async def test_frozen_sentinel(self) -> None:
        """
        The first sentinel is frozen from the start (SIGSTOP: the kernel
        still accepts connections, nothing answers): the proxy finds the
        master through the others, and still follows a SENTINEL FAILOVER
        at once: it must not wait forever on the frozen one for
        +switch-master.
        """
        setup = self.start_sentinels()
        setup.sentinels[0].pause()
        daemon = self.proxy_for(setup)
        port = await self.healthy(daemon)
        old = setup.master()
        [client] = await self.open_sessions(old, port, 1)
        started = time.monotonic()
        await setup.failover()
        new = await setup.promotion(old.address)
        moved = await self.subscribed_on(new, time.monotonic())
        record(f"SENTINEL FAILOVER with the first sentinel frozen: the proxy on the new "
               f"master {moved - started:.2f}s after")
        await self.delivered(client, "s0", new, "after", FOLLOW_BOUND)
        await self.admitted(port, new, "fresh", FOLLOW_BOUND)

    async def test_sentinel_naming_a_replica_is_passed_over(self) -> None:
        """
        The first sentinel listed answers with the replica's address (a
        misconfigured or long-partitioned sentinel): ROLE refuses that
        server, and the proxy asks the other sentinels, which name the
        master, instead of asking the same one again.
        """
        setup = self.start_sentinels()
        replica = next(n for n in setup.data if n is not setup.master())
        stray = setup.start_stray(replica)
        daemon = self.start_proxy(f"127.0.0.1:{stray.port},{setup.addresses()}", setup.name)
        port = await self.healthy(daemon)
        r = setup.master().client()
        self.addCleanup(r.close)
        r.set("session:c1:auth", "tok", ex=600)
        await exchange_messages(self, r, self.url(port, "c1"), "c1")

    async def test_token_check_and_both_directions(self) -> None:
        """
        The client-side contract holds through the sentinels: no token
        401, a wrong one 403, the right one 101; a message published on the
        master reaches the client and the client's reaches the master.
        """
        setup = self.start_sentinels()
        port = await self.healthy(self.proxy_for(setup))
        r = setup.master().client()
        self.addCleanup(r.close)
        r.set("session:c1:auth", "tok", ex=600)
        for headers, status in [({}, 401), ({"Authorization": "Bearer nope"}, 403),
                                ({"Authorization": "Bearer tok"}, 101)]:
            response = await raw_exchange(port, upgrade_request("/a/ws/c1", headers),
                                          close_after=2.0)
            self.assertEqual(status_of(response), status, response)
        self.assertGreater(r.ttl("session:c1:auth"), 600)
        await exchange_messages(self, r, self.url(port, "c1"), "c1")

    async def test_credentials(self) -> None:
        """
        Sentinels that require an ACL user and data nodes that require
        another: REDIS_SENTINEL_USERNAME/PASSWORD are used for the
        sentinels, REDIS_URL's user, password and database for the master.
        """
        setup = self.start_sentinels(username="app", password="app-secret",
                                     sentinel_username="watcher",
                                     sentinel_password="watcher-secret")
        daemon = self.proxy_for(
            setup, REDIS_URL=f"redis://app:app-secret@127.0.0.1:{free_port()}/3",
            REDIS_SENTINEL_USERNAME="watcher", REDIS_SENTINEL_PASSWORD="watcher-secret",
        )
        port = await self.healthy(daemon)
        master = setup.master()
        r = redispy.Redis(port=master.port, username="app", password="app-secret", db=3,
                          socket_timeout=5)
        self.addCleanup(r.close)
        r.set("session:k1:auth", "tok", ex=600)
        await exchange_messages(self, r, self.url(port, "k1"), "k1")
        self.assertNotIn(b"secret", daemon.out.output)


class BackendHelperTests(SentinelTestCase):
    """
    L{wsproxy.backend.Backend} given a Sentinel-managed redis-py client
    (C{Sentinel.master_for}): its listeners follow the master.
    """

    async def check_listener_follows(self, graceful: bool) -> None:
        setup = self.start_sentinels()
        sentinel = Sentinel([(HOST, s.port) for s in setup.sentinels],
                            socket_timeout=2, socket_connect_timeout=2)
        client = sentinel.master_for(setup.name, socket_timeout=2, socket_connect_timeout=2)
        self.addCleanup(client.close)
        backend = Backend(client)
        channel = "session:fo:up"
        old = setup.master()
        listener = BackendListener(
            backend.listen_up("fo", timeout=0.2, reconnect_for=FAILOVER_BOUND))
        await wait_for(lambda: old.call("PUBSUB", "NUMSUB", channel)[1] == 1)
        old.call("PUBLISH", channel, "before")
        await wait_for(lambda: listener.received == [("fo", b"before")])

        new = await setup.lose_master(graceful)
        promoted = time.monotonic()
        # subscribed on the new master (a delivery alone would not show it:
        # an old master still up copies the new one's PUBLISHes)
        await wait(lambda: new.call("PUBSUB", "NUMSUB", channel)[1] == 1, FOLLOW_BOUND,
                   f"the backend to subscribe on {new}", lambda: repr(listener.error))
        record(f"{'SENTINEL FAILOVER' if graceful else 'kill -9 of the master'}: the "
               f"backend's listener on the new master {time.monotonic() - promoted:.2f}s "
               "after the promotion")
        if graceful:
            self.assertEqual(old.call("PUBSUB", "NUMSUB", channel)[1], 0)
        new.call("PUBLISH", channel, "after")
        await wait_for(lambda: len(listener.received) == 2)
        self.assertEqual(listener.received, [("fo", b"before"), ("fo", b"after")])
        self.assertIsNone(listener.error)

    async def test_listener_follows_sentinel_failover(self) -> None:
        """
        C{SENTINEL FAILOVER} while a backend listens with C{listen_up}:
        the listener leaves the old master (still up, now a replica) for
        the one the sentinels name (C{+switch-master}) and receives what
        is published there. redis-py alone raises ConnectionError out of
        the iterator (the sentinel's CLIENT KILL, then its retries run
        out).
        """
        await self.check_listener_follows(graceful=True)

    async def test_listener_follows_killed_master(self) -> None:
        """
        kill -9 of the master while a backend listens: the listener keeps
        trying (up to C{reconnect_for}) and subscribes on the promoted
        replica, where a PUBLISH reaches it.
        """
        await self.check_listener_follows(graceful=False)


class BadConfigurationTests(SentinelTestCase):
    """
    A sentinel set-up the proxy cannot use: the daemon keeps running,
    /health is 503, and the log says why in one line, without a traceback.
    """

    async def check_reported(self, daemon: Daemon, reason: str) -> None:
        port = await daemon.port()
        await wait_for(lambda: reason.encode() in daemon.out.output, timeout=20)
        self.assertEqual(await self.health(port), 503)
        response = await raw_exchange(
            port, upgrade_request("/a/ws/s1", {"Authorization": "Bearer tok"}))
        self.assertEqual(status_of(response), 503, response)
        # the proxy keeps retrying meanwhile; a few seconds of that add no
        # second line (the reason is repeated at most once a minute)
        retried = time.monotonic() + 3
        await wait_for(lambda: time.monotonic() > retried, timeout=10)
        self.assertFalse(daemon.out.ended.called)
        self.assertEqual(await self.health(port), 503)
        lines = [line for line in daemon.out.output.decode().splitlines() if reason in line]
        self.assertEqual(len(lines), 1, daemon.out.output.decode())
        self.assertNotIn(b"Traceback", daemon.out.output)

    async def test_no_sentinel_reachable(self) -> None:
        """
        Nothing listens at any of the sentinels' addresses: "no sentinel
        answered", naming each address.
        """
        dead = [free_port(), free_port()]
        daemon = self.start_proxy(",".join(f"127.0.0.1:{p}" for p in dead), "wsproxy")
        await self.check_reported(daemon, "no sentinel answered")
        [line] = [line for line in daemon.out.output.decode().splitlines()
                  if "no sentinel answered" in line]
        for p in dead:
            self.assertIn(f"127.0.0.1:{p}", line)

    async def test_sentinel_naming_a_replica(self) -> None:
        """
        The only sentinel names a replica as the master: ROLE refuses it
        ("not a master", saying what it is), and nothing is written there.
        """
        setup = self.start_sentinels()
        replica = next(n for n in setup.data if n is not setup.master())
        stray = setup.start_stray(replica)
        daemon = self.start_proxy(f"127.0.0.1:{stray.port}", setup.name)
        await self.check_reported(daemon, "not a master")
        [line] = [line for line in daemon.out.output.decode().splitlines()
                  if "not a master" in line]
        self.assertIn("slave", line)
        stats = replica.call("INFO", "commandstats")
        self.assertNotIn("cmdstat_get", stats)
        self.assertEqual(replica.call("PUBSUB", "CHANNELS"), [b"__sentinel__:hello"])

    async def test_wrong_sentinel_password(self) -> None:
        """
        The sentinels refuse REDIS_SENTINEL_PASSWORD: the line gives their
        answer (WRONGPASS), never the password.
        """
        setup = self.start_sentinels(replicas=0, sentinels=1, sentinel_password="right")
        daemon = self.start_proxy(setup.addresses(), setup.name,
                                  REDIS_SENTINEL_PASSWORD="not-it")
        await self.check_reported(daemon, "WRONGPASS")
        self.assertNotIn(b"not-it", daemon.out.output)

    async def test_unknown_master_name(self) -> None:
        """
        The sentinels answer but monitor no master of that name:
        "sentinels do not know master 'nosuch'".
        """
        setup = self.start_sentinels(replicas=0, sentinels=1)
        daemon = self.start_proxy(setup.addresses(), "nosuch")
        await self.check_reported(daemon, "sentinels do not know master 'nosuch'")


class BinDevSentinelTests(SentinelTestCase):
    """
    C{bin/dev sentinel --free-ports}: what it prints works with wsproxy,
    and a signal stops every process it started.
    """

    async def start_dev(self) -> tuple[Daemon, dict[str, str], list[int], str]:
        """
        bin/dev sentinel, once it has printed the variables; returns them,
        every port it announced and its directory.
        """
        dev = start_daemon(self, {}, (os.path.join(ROOT, "bin", "dev"), "sentinel", "--free-ports"))
        await wait_for(lambda: b"Ctrl-C stops everything" in dev.out.output
                       or dev.out.ended.called, timeout=60)
        text = dev.out.output.decode()
        self.assertIn("Ctrl-C stops everything", text)
        found = re.search(r"REDIS_SENTINELS=(\S+) REDIS_SENTINEL_MASTER=(\S+) bin/dev run", text)
        assert found is not None, text
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text.split("Run wsproxy")[0])]
        self.assertEqual(len(ports), 5, text)
        directory = re.search(r"files in (\S+)\)", text)
        assert directory is not None, text
        return (dev, {"REDIS_SENTINELS": found.group(1),
                      "REDIS_SENTINEL_MASTER": found.group(2)}, ports, directory.group(1))

    async def check_stops(self, dev: Daemon, signum: int, ports: list[int],
                          directory: str) -> None:
        dev.signal(signum)
        await wait_for(lambda: dev.out.ended.called, timeout=20)
        self.assertEqual(dev.out.status, 0, dev.out.output.decode())
        # nothing answers on any of its ports, its files are gone
        for port in ports:
            self.assertFalse(Node("", port, [], "").answers(), f"port {port} still answers")
        self.assertFalse(os.path.exists(directory))

    async def test_printed_variables_work_and_sigterm_stops_all(self) -> None:
        """
        wsproxy started with the printed REDIS_SENTINELS and
        REDIS_SENTINEL_MASTER serves a session through the master; SIGTERM
        stops bin/dev (exit 0) and all five redis-servers.
        """
        dev, variables, ports, directory = await self.start_dev()
        port = await self.healthy(self.start_proxy(variables["REDIS_SENTINELS"],
                                                   variables["REDIS_SENTINEL_MASTER"]))
        r = Node("", ports[0], [], "").client()
        self.addCleanup(r.close)
        self.assertEqual(r.execute_command("ROLE")[0], b"master")
        r.set("session:d1:auth", "tok", ex=600)
        await exchange_messages(self, r, self.url(port, "d1"), "d1")
        await self.check_stops(dev, signal.SIGTERM, ports, directory)

    async def test_sigint_stops_all(self) -> None:
        """
        SIGINT (Ctrl-C) stops bin/dev sentinel and all its redis-servers.
        """
        dev, _, ports, directory = await self.start_dev()
        await self.check_stops(dev, signal.SIGINT, ports, directory)
