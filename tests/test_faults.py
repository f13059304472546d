"""
Redis faults injected against a real redis-server while real WebSocket
clients stay connected: restart, pause, killed subscriber connection, and a
subscriber connection that is up but silently stops delivering.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

from .support import ProxyTestCase, raw_exchange, status_of, upgrade_request, wait_for


class FaultTests(ProxyTestCase):
    timeout = 120

    async def open_sessions(self, n: int) -> list[Any]:
        pipe = self.r.pipeline(transaction=False)
        for i in range(n):
            pipe.set(f"session:f{i}:auth", "tok", ex=300)
        pipe.execute()
        clients = []
        for i in range(n):
            clients.append(await self.client(f"f{i}"))
        return clients

    def all_subscribed(self, n: int) -> bool:
        channels = [f"session:f{i}:down" for i in range(n)]
        try:
            counts = self.r.pubsub_numsub(*channels)
        except Exception:
            return False
        return all(count == 1 for _, count in counts)

    async def test_restart_under_100_sessions(self) -> None:
        """
        Redis killed and restarted under 100 open sessions: the sockets stay
        open, every channel is subscribed again within 2 s of Redis
        answering, each session receives a message published then, and new
        connections succeed within 2 s too.
        """
        clients = await self.open_sessions(100)
        self.redis.stop()
        await wait_for(lambda: self.proxy.proxy.subscriber.ready is None)
        self.redis.start()
        answering = time.monotonic()
        await wait_for(lambda: self.all_subscribed(100), timeout=2.0)
        pipe = self.r.pipeline(transaction=False)
        for i in range(100):
            pipe.set(f"session:f{i}:auth", "tok", ex=300)
            pipe.publish(f"session:f{i}:down", f"after-{i}")
        pipe.execute()
        for i, c in enumerate(clients):
            await c.wait_messages(1, timeout=2.0)
            self.assertEqual(c.messages, [(f"after-{i}".encode(), False)])
            self.assertEqual(c.state, c.STATE_OPEN)
        await wait_for(lambda: self.proxy.proxy.commands.ready is not None,
                       timeout=max(0.1, 2.0 - (time.monotonic() - answering)))
        late = await self.client("f0")
        self.assertEqual(late.state, late.STATE_OPEN)
        self.assertGreaterEqual(self.proxy.proxy.stats.redis_reconnects(), 2)

    async def test_pause_and_resume(self) -> None:
        """
        Redis paused (SIGSTOP): sockets stay open, /health turns unhealthy,
        new connections are refused (503/504) without hanging; after SIGCONT
        the proxy is healthy again and messages flow.
        """
        clients = await self.open_sessions(5)
        self.redis.pause()
        resumed = [False]

        def resume() -> None:
            if not resumed[0]:
                resumed[0] = True
                self.redis.resume()

        self.addCleanup(resume)
        health = await raw_exchange(self.proxy.port, b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(health), 503)
        started = time.monotonic()
        response = await raw_exchange(
            self.proxy.port, upgrade_request("/a/ws/f0", {"Authorization": "Bearer tok"})
        )
        self.assertIn(status_of(response), (503, 504))
        self.assertLess(time.monotonic() - started, 3.0)
        resume()
        await self.proxy.ready()
        await wait_for(lambda: self.all_subscribed(5), timeout=10)
        for i in range(5):
            self.r.publish(f"session:f{i}:down", "back")
        for c in clients:
            await c.wait_messages(1)
            self.assertEqual(c.state, c.STATE_OPEN)

    async def test_subscriber_killed(self) -> None:
        """
        CLIENT KILL TYPE pubsub drops only the subscriber connection: it is
        rebuilt, every channel re-subscribed, and messages arrive again.
        """
        clients = await self.open_sessions(3)
        self.r.client_kill_filter(_type="pubsub")
        await wait_for(lambda: self.proxy.proxy.stats.redis_reconnects() >= 1)
        await wait_for(lambda: self.all_subscribed(3), timeout=2)
        for i in range(3):
            self.r.publish(f"session:f{i}:down", "again")
        for c in clients:
            await c.wait_messages(1)


class _Pipe(protocol.Protocol):
    """
    One direction-aware half of a forwarded connection.
    """

    peer: Any = None
    frozen = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and not self.frozen:
            self.peer.transport.write(data)
        elif self.peer is None:
            self.pending = getattr(self, "pending", b"") + data

    def connectionLost(self, reason: Any) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class Forwarder(protocol.Factory):
    """
    A TCP forwarder to Redis that can silently stop delivering Redis's data
    on the connection that subscribed (the "connected but dead" fault).
    """

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.links: list[tuple[_Pipe, _Pipe]] = []

    def buildProtocol(self, addr: Any) -> _Pipe:
        client_side = _SniffingPipe(self)
        return client_side

    def freeze_subscriber(self) -> bool:
        for client_side, redis_side in self.links:
            if client_side.subscribes and client_side.transport.connected:
                redis_side.frozen = True
                return True
        return False


class _SniffingPipe(_Pipe):
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.subscribes = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        redis_side = _Pipe()
        redis_side.peer = self
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", self.forwarder.redis_port).connect(
            protocol.Factory.forProtocol(lambda: redis_side)
        )

        def connected(p: Any) -> None:
            self.peer = redis_side
            self.forwarder.links.append((self, redis_side))
            pending = getattr(self, "pending", b"")
            if pending:
                redis_side.transport.write(pending)
            self.transport.resumeProducing()

        d.addCallbacks(connected, lambda f: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        if b"SUBSCRIBE" in data.upper():
            self.subscribes = True
        super().dataReceived(data)


class SilentSubscriberTests(ProxyTestCase):
    timeout = 60

    async def start(self, **settings: Any) -> None:
        forwarder = Forwarder(self.redis.port)
        self.forwarder = forwarder
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(forwarder)
        self.addCleanup(port.stopListening)
        await super().start_at(f"redis://127.0.0.1:{port.getHost().port}", **settings)

    async def test_silent_subscriber_detected_and_rebuilt(self) -> None:
        """
        A subscriber connection that stays up but no longer delivers is
        noticed by the canary: /health turns 503, the connection is rebuilt,
        and messages published afterwards arrive.
        """
        self.authorize("s1")
        c = await self.client("s1")
        self.r.publish("session:s1:down", "before")
        await c.wait_messages(1)
        self.assertTrue(self.forwarder.freeze_subscriber())
        self.r.publish("session:s1:down", "swallowed")
        await wait_for(lambda: not self.proxy.proxy.hub.healthy, timeout=10)
        health = await raw_exchange(self.proxy.port, b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(health), 503)
        await wait_for(lambda: self.proxy.proxy.hub.healthy, timeout=10)
        self.r.publish("session:s1:down", "after")
        await wait_for(lambda: (b"after", False) in c.messages)
        self.assertEqual(c.state, c.STATE_OPEN)


class AbandonedHandshakeTests(ProxyTestCase):
    async def test_client_leaves_during_token_check(self) -> None:
        """
        A client that disconnects while its token check is waiting on Redis
        leaves nothing behind: no subscription, no open connection, no
        counted session, once Redis answers again.
        """
        self.authorize("gone")
        self.redis.pause()
        resumed = []

        def resume() -> None:
            if not resumed:
                resumed.append(True)
                self.redis.resume()

        self.addCleanup(resume)
        await raw_exchange(
            self.proxy.port,
            upgrade_request("/a/ws/gone", {"Authorization": "Bearer tok"}),
            close_after=0.2,
        )
        await wait_for(lambda: not self.proxy.proxy.connections)
        resume()
        await self.proxy.ready()
        await wait_for(lambda: self.proxy.proxy.hub.channel_count() == 0)
        self.assertEqual(self.r.pubsub_numsub("session:gone:down"), [(b"session:gone:down", 0)])
        self.assertEqual(self.proxy.proxy.stats.open_connections, 0)
