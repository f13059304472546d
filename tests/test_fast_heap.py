"""
A closed connection is freed by reference counting alone: it leaves no
reference cycle for Python's cycle collector, whatever way it ended. The
daemon relies on this to keep long-lived objects out of the collector's
scans (L{wsproxy.fast.heap}).
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.fast import heap
from wsproxy.websocket import footprint
from wsproxy.websocket.protocol import ProxyProtocol
from wsproxy.edge.site import _DeadlineChannel

from twisted.logger import capturedLogs, formatEvent

from .support import (
    RedisTestCase,
    RunningProxy,
    connect,
    raw_exchange,
    raw_upgrade,
    settings_for,
    start_proxy,
    status_of,
    upgrade_request,
    wait_for,
)

#: objects only the proxy's side of a connection has
SERVER_SIDE = (ProxyProtocol, _DeadlineChannel)


class ClosedConnectionsTests(RedisTestCase):
    """
    Each test runs one way a connection ends with the cycle collector
    off, waits until every server-side protocol of it is freed, and then
    asks the collector what it would have found.
    """

    timeout = 60

    async def start(self, **overrides: Any) -> RunningProxy:
        # the shortest deadlines, so that cancelled timers leave txaio's
        # buckets (and drop their references) within seconds
        proxy = start_proxy(self, self.redis.url, ping_interval=1.0, ping_timeout=1.0,
                            handshake_timeout=1.0, **overrides)
        await proxy.ready()
        self.r.set("session:s1:auth", "tok", ex=300)
        return proxy

    async def assert_no_cycles(self, scenario: Callable[[], Awaitable[None]]) -> None:
        protocols: list[weakref.ref[ProxyProtocol]] = []
        made = ProxyProtocol.connectionMade

        def recording(protocol: ProxyProtocol) -> None:
            protocols.append(weakref.ref(protocol))
            made(protocol)

        self.patch(ProxyProtocol, "connectionMade", recording)
        gc.collect()
        gc.disable()
        try:
            await scenario()
            self.assertTrue(protocols, "the scenario made no connection")
            try:
                await wait_for(lambda: all(ref() is None for ref in protocols), timeout=20)
            except Exception:
                pass  # said below, with what the collector finds
            alive = sum(1 for ref in protocols if ref() is not None)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
        finally:
            gc.set_debug(0)
            garbage = Counter(type(o).__name__ for o in gc.garbage if isinstance(o, SERVER_SIDE))
            gc.garbage.clear()
            gc.enable()
        self.assertEqual((alive, dict(garbage)), (0, {}),
                         "server-side objects left alive or in reference cycles")

    async def test_client_closes(self) -> None:
        """
        A client that exchanged messages both ways and closed cleanly.
        """
        proxy = await self.start()

        async def scenario() -> None:
            client = await connect(proxy.url("s1"), token="tok")
            client.sendMessage(b"up")
            await wait_for(lambda: self.r.publish("session:s1:down", b"down") and client.messages)
            await client.close_and_wait()
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)

    async def test_client_vanishes(self) -> None:
        """
        A client whose TCP connection is cut without a closing handshake.
        """
        proxy = await self.start()

        async def scenario() -> None:
            client = await connect(proxy.url("s1"), token="tok")
            client.transport.abortConnection()
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)

    async def test_server_closes(self) -> None:
        """
        The proxy closes (as for a backend's close command) and the client
        never answers the close frame: the closing-handshake timer is
        pending when the connection is dropped.
        """
        proxy = await self.start()

        async def scenario() -> None:
            client = await raw_upgrade(proxy.port, "/a/ws/s1", {"Authorization": "Bearer tok"})
            self.assertEqual(status_of(client.data), 101)
            await wait_for(lambda: proxy.proxy.connections)
            for protocol in list(proxy.proxy.connections):
                protocol.server_close(4000, "bye")  # type: ignore[attr-defined]
            client.transport.abortConnection()
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)

    async def test_ping_timeout(self) -> None:
        """
        A client that never answers pings is dropped by the ping timeout.
        """
        proxy = await self.start()

        async def scenario() -> None:
            client = await raw_upgrade(proxy.port, "/a/ws/s1", {"Authorization": "Bearer tok"})
            self.assertEqual(status_of(client.data), 101)
            await wait_for(lambda: client.lost_at is not None, timeout=15)
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)

    async def test_refused(self) -> None:
        """
        Refused upgrades: a wrong token (403), no token (401), an invalid
        session id (400).
        """
        proxy = await self.start()

        async def scenario() -> None:
            for path, headers, code in (
                ("/a/ws/s1", {"Authorization": "Bearer wrong"}, 403),
                ("/a/ws/s1", {}, 401),
                ("/a/ws/bad%20id", {"Authorization": "Bearer tok"}, 400),
            ):
                response = await raw_exchange(proxy.port, upgrade_request(path, headers))
                self.assertEqual(status_of(response), code)
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)

    async def test_durable_upstream(self) -> None:
        """
        An acknowledging client of a durable-upstream proxy that got its
        ack and closed.
        """
        proxy = await self.start(upstream="stream")

        async def scenario() -> None:
            client = await connect(proxy.url("s1", query="?ack=1"), token="tok")
            client.sendMessage(b"m1\nhello")
            await wait_for(lambda: any(b'"ack"' in m for m, _ in client.messages))
            await client.close_and_wait()
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)

    async def test_resumable(self) -> None:
        """
        A resumable session's connection (its resumer and sinks) closed by
        the client.
        """
        proxy = await self.start(resume=True)

        async def scenario() -> None:
            client = await connect(proxy.url("s1", query="?resume="), token="tok")
            await wait_for(lambda: client.messages)  # the recovery control frame
            await client.close_and_wait()
            await wait_for(lambda: not proxy.proxy.connections)

        await self.assert_no_cycles(scenario)


class CompactTests(RedisTestCase):
    """
    L{ProxyProtocol._compact}: an open connection's attribute dictionary.
    """

    async def test_small_and_unchanged(self) -> None:
        """
        Once open, a connection's instance dictionary holds fewer than 25
        attributes (from about 90) and none of the opening handshake's;
        every other attribute reads as it did before; and the connection
        works both ways and closes cleanly, and after that traffic holds
        at most 42 (what a dictionary of 64 slots holds: one more and it
        would double).
        """
        proxy = RunningProxy(settings_for(self.redis.url))
        self.addCleanup(proxy.stop)
        await proxy.ready()
        before: dict[str, Any] = {}
        changed: list[str] = []
        compact = ProxyProtocol._compact

        def recording(protocol: ProxyProtocol) -> None:
            before.update(protocol.__dict__)
            compact(protocol)
            for name, value in before.items():
                if name in footprint.HANDSHAKE_ONLY:
                    if name in protocol.__dict__:
                        changed.append(f"{name} kept")
                elif type(value) in (int, float) or name in footprint.SHARED:
                    if getattr(protocol, name) != value:
                        changed.append(name)
                elif getattr(protocol, name) is not value:
                    changed.append(name)

        self.patch(ProxyProtocol, "_compact", recording)
        self.r.set("session:s1:auth", "tok", ex=300)
        for _ in range(2):  # the first connection sets the defaults
            client = await connect(proxy.url("s1"), token="tok")
            await wait_for(lambda: len(proxy.proxy.connections) == 1)
            protocol = next(iter(proxy.proxy.connections))
            self.assertLess(len(protocol.__dict__), 25, sorted(protocol.__dict__))
            self.assertGreater(len(before), 80)
            self.assertEqual(changed, [])
            client.sendMessage(b"up")
            await wait_for(lambda: self.r.publish("session:s1:down", b"down") and client.messages)
            await wait_for(lambda: protocol.messages_in == 1)
            self.assertLessEqual(len(protocol.__dict__), 42, sorted(protocol.__dict__))
            await client.close_and_wait()
            self.assertEqual(client.close_code, 1000)
            await wait_for(lambda: not proxy.proxy.connections)
            before.clear()


class PolicyTests(SynchronousTestCase):
    """
    L{heap.CollectorPolicy}: what it asks of the C{gc} module.
    """

    def test_freezes_at_start_and_after_long_full_collections(self) -> None:
        """
        What start-up made is frozen at once; then what survived each full
        (generation 2) collection that took longer than the pause budget.
        Shorter full collections and younger ones freeze nothing.
        """
        fake = FakeGc()
        policy = heap.CollectorPolicy(Clock(), fake, timer=fake.timer)
        policy.install()
        self.assertEqual((len(fake.callbacks), fake.frozen), (1, 1))
        fake.run(0, took=1.0)
        fake.run(1, took=1.0)
        fake.run(2, took=heap.PAUSE_BUDGET / 2)
        self.assertEqual(fake.frozen, 1)
        fake.run(2, took=heap.PAUSE_BUDGET * 2)
        self.assertEqual((fake.frozen, policy.freezes), (2, 1))

    def test_hourly_collection_of_everything(self) -> None:
        """
        Once an hour everything is collected, frozen objects included
        (unfreeze, collect, freeze), and logged; that collection does not
        count as one of the collector's own.
        """
        fake = FakeGc(took=1.0)
        clock = Clock()
        policy = heap.CollectorPolicy(clock, fake, timer=fake.timer)
        policy.install()
        clock.advance(heap.FULL_COLLECTION_INTERVAL - 1)
        self.assertEqual(fake.collected, 0)
        with capturedLogs() as events:
            clock.advance(1)
        self.assertEqual((fake.unfrozen, fake.collected, fake.frozen), (1, 1, 2))
        self.assertEqual(policy.freezes, 0)
        self.assertEqual(len(events), 1)
        self.assertIn("full garbage collection: 7 objects reclaimed", formatEvent(events[0]))

    def test_never(self) -> None:
        """
        With an interval of 0 there is no collection of everything.
        """
        fake = FakeGc()
        clock = Clock()
        heap.CollectorPolicy(clock, fake, interval=0).install()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pauses_observed(self) -> None:
        """
        Every collection's pause is observed under its generation.
        """
        fake = FakeGc()
        observed: list[tuple[str, float]] = []

        class Histogram:
            def __init__(self, generation: str) -> None:
                self.generation = generation

            def observe(self, value: float) -> None:
                observed.append((self.generation, value))

        heap.CollectorPolicy(Clock(), fake, timer=fake.timer, observe=Histogram).install()
        fake.run(0, took=0.5)
        fake.run(2, took=2.0)
        self.assertEqual(observed, [("0", 0.5), ("2", 2.0)])

    def test_thresholds(self) -> None:
        """
        Installed, the policy collects the young generation after
        L{heap.THRESHOLDS} new objects (fewer collections during connection
        storms); uninstalled, the thresholds are what they were.
        """
        fake = FakeGc()
        policy = heap.CollectorPolicy(Clock(), fake)
        policy.install()
        self.assertEqual(fake.thresholds, heap.THRESHOLDS)
        self.assertGreater(heap.THRESHOLDS[0], 700)
        policy.uninstall()
        self.assertEqual(fake.thresholds, (700, 10, 10))

    def test_uninstall(self) -> None:
        """
        Uninstalling removes the callback, stops the hourly collection and
        unfreezes what was frozen.
        """
        fake = FakeGc()
        clock = Clock()
        policy = heap.CollectorPolicy(clock, fake)
        policy.install()
        policy.uninstall()
        self.assertEqual((fake.callbacks, fake.unfrozen, clock.getDelayedCalls()), ([], 1, []))


class FakeGc:
    """
    The part of the C{gc} module the policy uses; collections take the
    time they are told to on L{timer}.
    """

    def __init__(self, took: float = 0.0) -> None:
        self.callbacks: list[Callable[[str, dict[str, int]], None]] = []
        self.frozen = self.unfrozen = self.collected = 0
        self.now = 0.0
        self.took = took
        self.thresholds: tuple[int, ...] = (700, 10, 10)

    def get_threshold(self) -> tuple[int, ...]:
        return self.thresholds

    def set_threshold(self, *thresholds: int) -> None:
        self.thresholds = thresholds

    def timer(self) -> float:
        return self.now

    def collect(self) -> int:
        self.run(2, self.took)
        self.collected += 1
        return 7

    def get_freeze_count(self) -> int:
        return 1000

    def freeze(self) -> None:
        self.frozen += 1

    def unfreeze(self) -> None:
        self.unfrozen += 1

    def run(self, generation: int, took: float) -> None:
        for callback in list(self.callbacks):
            callback("start", {"generation": generation})
        self.now += took
        for callback in list(self.callbacks):
            callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})

