"""
The hand-off of a connection from the HTTP channel to the WebSocket
protocol (L{wsproxy.edge.handoff.HandOff}), in memory (L{tests.memory}):
who owns the connection at each step, the client's early bytes kept in
order, and the client leaving at each step.
"""

from __future__ import annotations

import sys
from typing import Any

from tests.memory import MemoryClient, MemoryProxy, MemoryTestCase, client_frame, upgrade_request

from wsproxy.edge import handoff
from wsproxy.edge.handoff import COMPARING, LEFT, REFUSED, RELEASED, WEBSOCKET, HandOff
from wsproxy.edge.site import _DeadlineChannel
from wsproxy.websocket.protocol import ProxyProtocol

BEARER = {"Authorization": "Bearer tok"}


class HandOffTests(MemoryTestCase):
    """
    The steps of L{HandOff}, as a connection goes through them.
    """

    def hand_offs(self) -> list[HandOff]:
        """
        Every hand-off made from now on, in order.
        """
        made: list[HandOff] = []
        init = HandOff.__init__

        def recording(hand_off: HandOff, *args: Any) -> None:
            init(hand_off, *args)
            made.append(hand_off)

        self.patch(HandOff, "__init__", recording)
        return made

    def comparing(self, memory: MemoryProxy) -> tuple[MemoryClient, _DeadlineChannel, HandOff]:
        """
        A client whose header token Redis is comparing (the answer held).
        """
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("EVALSHA")
        client = memory.request("/agent/ws/s1", BEARER)
        channel = client.protocol
        self.assertIsInstance(channel, _DeadlineChannel)
        hand_off = channel.hand_off
        assert hand_off is not None
        return client, channel, hand_off

    def test_channel_then_websocket(self) -> None:
        """
        Without a header token the channel hands the connection straight to
        the WebSocket protocol: the transport's protocol is the WebSocket's,
        the channel has no transport and lets go of the hand-off, which lets
        go of both.
        """
        memory = self.start()
        made = self.hand_offs()
        memory.redis.authorize("s1", "tok")
        client = memory.connect()
        channel = client.protocol
        client.send(upgrade_request("/agent/ws/s1?access_token=tok"))
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        (hand_off,) = made
        self.assertIs(hand_off.owner, RELEASED)
        self.assertIsNone(hand_off.protocol)
        self.assertIsNone(hand_off._channel)
        self.assertIsNone(channel.hand_off)
        self.assertIsNone(channel.transport)
        self.assertIsInstance(client.protocol, ProxyProtocol)

    def test_comparing_owns_until_equal(self) -> None:
        """
        While the token is compared the hand-off holds the connection: no
        WebSocket protocol exists and the channel still is the transport's
        protocol. Once equal, the WebSocket protocol has it and the hand-off
        is released.
        """
        memory = self.start()
        client, channel, hand_off = self.comparing(memory)
        self.assertIs(hand_off.owner, COMPARING)
        self.assertIs(client.protocol, channel)
        self.assertIsNotNone(channel.transport)
        self.assertEqual(memory.proxy.connections, set())
        memory.redis.release()
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertIs(hand_off.owner, RELEASED)
        self.assertIsNone(channel.hand_off)
        self.assertIsInstance(client.protocol, ProxyProtocol)
        self.assertEqual([c.name for c in memory.redis.log], ["EVALSHA", "SUBSCRIBE"])

    def test_early_bytes_kept_in_order(self) -> None:
        """
        Frames the client sends while its token is compared, in several
        reads, reach the WebSocket protocol after the request, in order.
        """
        memory = self.start()
        client, channel, hand_off = self.comparing(memory)
        for payload in (b'{"n":1}', b'{"n":2}', b'{"n":3}'):
            client.send(client_frame(payload))
        self.assertEqual(memory.redis.published, [])
        memory.redis.release()
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual([payload for _, payload in memory.redis.published],
                         [b'{"n":1}', b'{"n":2}', b'{"n":3}'])

    def test_bytes_behind_the_request_in_the_same_read(self) -> None:
        """
        Frames sent in the same read as the request (read by twisted.web,
        and by the lean parser) are the WebSocket's, in order.
        """
        for lean in (True, False):
            memory = self.start()
            memory.site.lean = lean
            memory.redis.authorize("s1", "tok")
            client = memory.connect()
            client.send(upgrade_request("/agent/ws/s1", BEARER)
                        + client_frame(b'{"n":1}') + client_frame(b'{"n":2}'))
            self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols",
                             lean)
            self.assertEqual([payload for _, payload in memory.redis.published],
                             [b'{"n":1}', b'{"n":2}'], lean)

    def test_refused_drops_later_bytes(self) -> None:
        """
        A wrong token: the channel answers 403 and closes; the hand-off is
        over (it no longer holds the channel) and drops what comes later.
        """
        memory = self.start()
        memory.redis.authorize("s1", "other")
        memory.redis.hold("EVALSHA")
        client = memory.request("/agent/ws/s1", BEARER)
        channel = client.protocol
        hand_off = channel.hand_off
        memory.redis.release()
        self.assertEqual(client.response().status, "HTTP/1.1 403 Invalid or expired token")
        self.assertTrue(client.closed)
        self.assertIs(hand_off.owner, REFUSED)
        self.assertIsNone(hand_off._channel)
        hand_off.received(b"more")
        self.assertEqual(hand_off._early, [])
        self.assertEqual(memory.proxy.stats.outcomes, {"403": 1})

    def test_client_leaves_while_comparing(self) -> None:
        """
        The client leaving while its token is compared cancels the
        comparison: counted once as 499, no WebSocket protocol built,
        nothing written, the hand-off over.
        """
        memory = self.start()
        client, channel, hand_off = self.comparing(memory)
        client.send(client_frame(b"early"))
        client.leave()
        self.assertIs(hand_off.owner, LEFT)
        self.assertIsNone(hand_off._channel)
        self.assertEqual(hand_off._early, [])
        self.assertEqual(memory.proxy.comparing, 0)
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})
        memory.redis.release()
        self.assertEqual(client.read(), b"")
        self.assertEqual(memory.proxy.connections, set())

    def test_client_leaves_after_hand_over(self) -> None:
        """
        Once handed over, the client leaving is the WebSocket protocol's to
        see (its admission cancelled: 499); the channel was let go already.
        """
        memory = self.start()
        memory.redis.authorize("s1", "tok")
        memory.redis.hold("SUBSCRIBE")
        client = memory.request("/agent/ws/s1", BEARER)
        protocol = client.protocol
        self.assertIsInstance(protocol, ProxyProtocol)
        client.leave()
        self.assertEqual(memory.proxy.connections, set())
        self.assertEqual(memory.proxy.stats.outcomes, {"499": 1})

    def test_client_leaves_when_open(self) -> None:
        """
        After the 101 the hand-off is long over: the open connection ends
        as any other.
        """
        memory = self.start()
        client = memory.open()
        client.leave()
        self.assertEqual(memory.proxy.connections, set())
        self.assertEqual(memory.proxy.stats.open_connections, 0)

    def test_no_cycle_left(self) -> None:
        """
        A released hand-off is held by nothing (not by its channel, nor by
        the protocol): it is freed by reference counting alone.
        """
        memory = self.start()
        made = self.hand_offs()
        memory.redis.authorize("s1", "tok")
        client = memory.request("/agent/ws/s1", BEARER)
        self.assertEqual(client.response().status, "HTTP/1.1 101 Switching Protocols")
        (hand_off,) = made
        del made[:]
        # nothing but this test's name (and getrefcount's argument) holds it
        self.assertEqual(sys.getrefcount(hand_off), 2)

    def test_owners_named(self) -> None:
        """
        The owners a hand-off may name.
        """
        self.assertEqual(
            {handoff.CHANNEL, COMPARING, WEBSOCKET, RELEASED, REFUSED, LEFT},
            {"channel", "comparing", "websocket", "released", "refused", "left"},
        )


class ChannelPhaseTests(MemoryTestCase):
    """
    What the HTTP channel does with the bytes it receives before any
    hand-off (L{_DeadlineChannel}'s phase): new, waiting for its turn,
    reading, answered, gone.
    """

    def test_new_reading(self) -> None:
        """
        A connection that gets its turn at once reads its first bytes.
        """
        memory = self.start(handshakes_per_turn=1)
        client = memory.connect()
        channel = client.protocol
        self.assertEqual(channel._phase, "new")
        client.transport.receive(b"GET /agent/ws/s1 HTTP/1.1\r\n")
        self.assertEqual(channel._phase, "reading")

    def test_waiting_then_reading(self) -> None:
        """
        Past the turn's budget a connection's first bytes are kept (and its
        socket no longer read) until its turn; then they are read.
        """
        memory = self.start(handshakes_per_turn=1)
        memory.redis.authorize("s1", "tok")
        first, second = memory.connect(), memory.connect()
        first.transport.receive(b"GET / HTTP/1.1\r\n")
        request = upgrade_request("/agent/ws/s1", BEARER)
        second.transport.receive(request)
        channel = second.protocol
        self.assertEqual(channel._phase, "waiting")
        self.assertEqual(channel._held, [request])
        memory.clock.advance(0)
        self.assertEqual(second.response().status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(channel._phase, "reading")
        self.assertIsNone(channel._held)

    def test_waiting_then_gone(self) -> None:
        """
        A client that leaves while waiting for its turn is gone: its turn
        reads nothing.
        """
        memory = self.start(handshakes_per_turn=1)
        first, second = memory.connect(), memory.connect()
        first.transport.receive(b"GET / HTTP/1.1\r\n")
        second.transport.receive(b"GET / HTTP/1.1\r\n")
        channel = second.protocol
        self.assertEqual(channel._phase, "waiting")
        second.leave()
        self.assertEqual(channel._phase, "gone")
        self.assertIsNone(channel._held)
        self.assertEqual(second.read(), b"")

    def test_answered_ignores_the_rest(self) -> None:
        """
        Once a refusal is written, what the client sends is ignored.
        """
        memory = self.start()
        memory.redis.authorize("s1", "other")
        memory.redis.hold("EVALSHA")
        client = memory.request("/agent/ws/s1", BEARER)
        channel = client.protocol
        memory.redis.release()
        self.assertEqual(channel._phase, "answered")
        client.transport.receive(upgrade_request("/agent/ws/s1", BEARER))
        self.assertEqual(client.response().status, "HTTP/1.1 403 Invalid or expired token")
        self.assertEqual(client.read(), b"")
        memory.clock.advance(0)
        self.assertEqual(channel._phase, "gone")
        self.assertEqual([c.name for c in memory.redis.log], ["EVALSHA"])
