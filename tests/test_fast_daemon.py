"""
The real daemon's whole fast path in this process, as production runs it:
the start-up check, the lean reactor turn installed on the real epoll
reactor, the collector policy on, frames and commands written straight to
the sockets and held for one send per read or turn; a real redis-server and
real WebSocket clients over loopback. The other test harnesses run with the
turn and the policy off.

Also the fallbacks that need real sockets: with Twisted's transport write
or read internals reported missing, or every borrowed internal, the same
exchange works on the frameworks' own paths.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.epollreactor import EPollReactor

from wsproxy.fast import borrowed
from wsproxy.fast.sockwrite import Pending, TurnPending

from .support import RedisTestCase, RunningProxy, connect, settings_for, up_listener, wait_for


def fast_daemon(redis_url: str) -> RunningProxy:
    """
    A ProxyService built as twistd builds it (lean_poll, manage_heap), on
    the test's reactor.
    """
    proxy = RunningProxy(settings_for(redis_url), manage_heap=True, lean_poll=True)
    assert proxy.service.port is not None
    return proxy


class FullFastPathTests(RedisTestCase):
    timeout = 120

    async def start(self) -> RunningProxy:
        self.assertIsInstance(reactor, EPollReactor, "the suite runs on the epoll reactor")
        # whatever the daemon's check fell back from is used again after
        self.addCleanup(borrowed.restore)
        # from inside the running reactor, as twistd starts it
        await task.deferLater(reactor, 0, lambda: None)
        self.assertTrue(reactor.running)
        daemon = fast_daemon(self.redis.url)
        self.assertTrue(daemon.service._running_now)
        self.addCleanup(daemon.stop)
        return daemon

    async def exchange(self, daemon: RunningProxy, burst: int = 2000) -> Any:
        """
        Two sessions: each gets a burst of C{burst} messages published in
        one pipeline (one Redis read of many), in order and to its own
        client only; each client's C{burst} messages reach its :up channel
        in order; then a message each way, one at a time.
        """
        await daemon.ready()
        clients = {}
        ups = {}
        for session in ("a", "b"):
            self.r.set(f"session:{session}:auth", "tok", ex=300)
            ups[session] = up_listener(self.r, session, self)
            client = await connect(daemon.url(session), token="tok")
            self.addCleanup(client.close_and_wait)
            clients[session] = client
        pipe = self.r.pipeline(transaction=False)
        for i in range(burst):
            for session in ("a", "b"):
                pipe.publish(f"session:{session}:down", f"{session}{i}")
        pipe.execute()
        for session, client in clients.items():
            await client.wait_messages(burst, timeout=60)
            self.assertEqual(client.messages,
                             [(f"{session}{i}".encode(), False) for i in range(burst)])
        for i in range(burst):
            for session, client in clients.items():
                client.sendMessage(f"{session}-up{i}".encode())
        for session in clients:
            await wait_for(lambda: len(ups[session]()) >= burst, timeout=60)
            self.assertEqual(ups[session](), [f"{session}-up{i}".encode() for i in range(burst)])
        for session, client in clients.items():
            self.r.publish(f"session:{session}:down", "one")
            await client.wait_messages(burst + 1)
            self.assertEqual(client.messages[-1], (b"one", False))
            client.sendMessage(b"one-up")
            await wait_for(lambda: ups[session]()[-1:] == [b"one-up"])
        return clients

    async def test_everything_on_messages_both_ways_in_order(self) -> None:
        """
        With the lean turn on the real epoll reactor, the collector policy
        installed (thresholds set, start-up frozen) and the held writes on
        (client frames through Pending, commands through TurnPending),
        bursts and single messages go both ways, in order, each to its own
        session.
        """
        daemon = await self.start()
        self.assertIn("doIteration", reactor.__dict__, "the lean turn is installed")
        self.assertIsNotNone(daemon.service.heap, "the collector policy is on")
        self.assertIn(daemon.service.heap._collected, gc.callbacks)  # type: ignore[union-attr]
        await daemon.ready()
        commands = daemon.proxy.commands.ready
        self.assertIsInstance(commands._out, TurnPending, "commands are held for the turn")
        await self.exchange(daemon, burst=2000)
        self.assertEqual(len(daemon.proxy.connections), 2)
        for connection in daemon.proxy.connections:
            self.assertIsInstance(connection._out, Pending, "frames go straight to the socket")
        gc.collect()  # a full collection under the policy, mid-run
        await self.exchange_again(daemon)

    async def exchange_again(self, daemon: RunningProxy) -> None:
        self.r.set("session:c:auth", "tok", ex=300)
        received = up_listener(self.r, "c", self)
        client = await connect(daemon.url("c"), token="tok")
        self.addCleanup(client.close_and_wait)
        self.r.publish("session:c:down", "after")
        await client.wait_messages(1)
        client.sendMessage(b"after-up")
        await wait_for(lambda: received() == [b"after-up"])

    async def serve_with_missing(self, *names: str) -> RunningProxy:
        """
        The daemon, its start-up check finding C{names} missing, after the
        same exchange as above (fewer messages).
        """
        missing = tuple(_broken(i) if i.name in names else i for i in borrowed.INTERNALS)
        self.patch(borrowed, "INTERNALS", missing)
        daemon = await self.start()
        await daemon.ready()
        await self.exchange(daemon, burst=300)
        self.assertEqual(len(daemon.proxy.connections), 2)
        self.assertEqual(self.flushLoggedErrors(), [])
        return daemon

    async def test_transport_write_internals_missing(self) -> None:
        """
        With Twisted's TCP write state reported missing, the daemon still
        serves: no frame or command is written past transport.write (no
        Pending, no TurnPending), while Redis is still read into the
        reused buffer.
        """
        daemon = await self.serve_with_missing("twisted.tcp-write")
        commands = daemon.proxy.commands.ready
        self.assertIsNone(commands._out)
        self.assertIn("doRead", commands.transport.__dict__)
        for connection in daemon.proxy.connections:
            self.assertIsNone(connection._out)

    async def test_transport_read_internals_missing(self) -> None:
        """
        With Twisted's TCP reads reported changed, Redis is read with
        Twisted's own doRead; the writes still go straight to the sockets.
        """
        daemon = await self.serve_with_missing("twisted.tcp-read")
        commands = daemon.proxy.commands.ready
        self.assertNotIn("doRead", commands.transport.__dict__)
        self.assertIsInstance(commands._out, TurnPending)

    async def test_every_internal_missing(self) -> None:
        """
        With every borrowed internal reported missing, the daemon serves
        on the frameworks' own paths alone: Twisted's turn, no collector
        policy, transport.write and Twisted's reads, Autobahn's reads and
        timer.
        """
        daemon = await self.serve_with_missing(*[i.name for i in borrowed.INTERNALS])
        self.assertNotIn("doIteration", reactor.__dict__)
        self.assertIsNone(daemon.service.heap)
        self.assertIsNone(daemon.proxy.commands.ready._out)
        factory = daemon.service.site.ws_factory
        self.assertIs(factory._batched_timer, factory._autobahn_timer)


def _broken(internal: borrowed.Internal) -> borrowed.Internal:
    from dataclasses import replace

    def probe(reactor: Any) -> None:
        raise borrowed.Broken(f"{internal.name} reported missing by the test")

    return replace(internal, probe=probe)
