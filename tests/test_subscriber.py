"""
The subscriber connection's lean SUBSCRIBE/UNSUBSCRIBE (written as they
are, confirmations matched in order, one Deferred per command) against a
real redis-server: confirmations, an error reply answering its own command
and no other, many commands in one write, a connection lost with commands
waiting; and which reads hold their frames for one write.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from wsproxy.redis.redisendpoint import client_endpoint
from wsproxy.redis.redislink import RedisLink, RedisUnavailable
from wsproxy.fast.sockwrite import BATCH

from .support import redis_server, settings_for, wait_for


class SubscriberTestCase(TestCase):
    """
    A fresh redis-server and a subscriber L{RedisLink} to it, ready.
    """

    url_user = ""

    def setUp(self) -> Any:
        self.redis = redis_server(self)
        self.r = self.redis.client()
        self.addCleanup(self.r.close)
        self.prepare()
        settings = settings_for(
            f"redis://{self.url_user}127.0.0.1:{self.redis.port}", auth_timeout=5.0
        )
        self.link = RedisLink("subscriber", client_endpoint(reactor, settings), settings,
                              reactor, subscriber=True)
        self.messages: list[tuple[bytes, bytes]] = []
        self.link.on_message = lambda channel, payload: self.messages.append((channel, payload))
        self.link.start()
        self.addCleanup(self.link.stop)
        return wait_for(lambda: self.link.ready is not None)

    def prepare(self) -> None:
        """Set the server up before the link connects."""


class LeanSubscribeTests(SubscriberTestCase):
    async def test_confirmed_then_delivered_then_unsubscribed(self) -> None:
        """
        SUBSCRIBE fires with C{None} once Redis confirmed it; messages on
        the channel then reach C{on_message}; UNSUBSCRIBE fires once
        confirmed and nothing is delivered afterwards.
        """
        self.assertIsNone(await self.link.subscribe("s:one:down"))
        self.assertEqual(self.r.publish("s:one:down", b"hello"), 1)
        await wait_for(lambda: self.messages)
        self.assertEqual(self.messages, [(b"s:one:down", b"hello")])
        self.assertIsNone(await self.link.unsubscribe("s:one:down"))
        self.assertEqual(self.r.publish("s:one:down", b"gone"), 0)
        proto = self.link.ready
        self.assertEqual((proto.sent, proto.answered), (2, 2))

    async def test_many_in_one_write_confirmed_in_order(self) -> None:
        """
        Commands sent in one reactor turn (one write) are each confirmed
        by their own reply: every Deferred fires, subscribes and
        unsubscribes interleaved, and Redis holds exactly the channels
        left subscribed.
        """
        order: list[str] = []
        waiting = []
        for n in range(200):
            channel = f"s:{n}:down"
            d = self.link.subscribe(channel)
            d.addCallback(lambda _, c=channel: order.append(c))
            waiting.append(d)
        for n in range(0, 200, 2):
            channel = f"s:{n}:down"
            d = self.link.unsubscribe(channel)
            d.addCallback(lambda _, c=channel: order.append("-" + c))
            waiting.append(d)
        await defer.gatherResults(waiting)
        self.assertEqual(order, [f"s:{n}:down" for n in range(200)]
                         + [f"-s:{n}:down" for n in range(0, 200, 2)])
        numsub = dict(self.r.pubsub_numsub(*[f"s:{n}:down" for n in range(200)]))
        self.assertEqual(numsub, {f"s:{n}:down".encode(): n % 2 for n in range(200)})

    async def test_lost_connection_fails_waiting_commands(self) -> None:
        """
        Commands still waiting for their confirmation when the connection
        is lost fail with L{RedisUnavailable} (the callers' error for a
        lost connection), and the link connects again.
        """
        first = self.link.ready
        self.redis.pause()
        try:
            waiting = self.link.subscribe("s:lost:down")
            self.link.kill()
            with self.assertRaises(RedisUnavailable):
                await waiting
        finally:
            self.redis.resume()
        await wait_for(lambda: self.link.ready not in (None, first))
        self.assertIsNone(await self.link.subscribe("s:lost:down"))


class ErrorReplyTests(SubscriberTestCase):
    """
    A subscriber whose ACL user may only use channels C{allowed:*}.
    """

    url_user = "wsp:pw@"

    def prepare(self) -> None:
        self.r.execute_command("ACL", "SETUSER", "wsp", "on", ">pw", "~*", "resetchannels",
                               "&allowed:*", "+@all")

    async def test_error_answers_its_own_command_only(self) -> None:
        """
        A SUBSCRIBE refused by Redis (NOPERM) fails with the Redis error,
        while the commands written around it in the same write are
        confirmed: replies are matched to commands in order.
        """
        before = self.link.subscribe("allowed:1")
        refused = self.link.subscribe("denied:1")
        after = self.link.subscribe("allowed:2")
        self.assertIsNone(await before)
        with self.assertRaises(txredisapi.ResponseError) as caught:
            await refused
        self.assertIn("NOPERM", str(caught.exception))
        self.assertIsNone(await after)
        self.assertEqual(self.r.publish("allowed:2", b"still"), 1)
        await wait_for(lambda: self.messages)
        self.assertEqual(self.messages, [(b"allowed:2", b"still")])


class ReadBatchTests(SubscriberTestCase):
    async def test_a_read_of_one_message_holds_nothing(self) -> None:
        """
        A read that is one message and nothing else is delivered with no
        batch held (its frames go out at once: nothing else in the read to
        send them with); the messages of a read of many are delivered with
        the batch held (their frames leave together once the read is
        handled).
        """
        held: list[tuple[bytes, int]] = []
        self.link.on_message = lambda channel, payload: held.append((payload, BATCH.held))
        await self.link.subscribe("s:batch:down")
        self.r.publish("s:batch:down", b"alone")
        await wait_for(lambda: held)
        self.assertEqual(held, [(b"alone", 0)])

        pipeline = self.r.pipeline(transaction=False)
        for i in range(50):
            pipeline.publish("s:batch:down", b"many %d" % i)
        pipeline.execute()
        await wait_for(lambda: len(held) == 51)
        self.assertEqual([payload for payload, _ in held[1:]], [b"many %d" % i for i in range(50)])
        # Redis answers a pipeline in one write: its first read has many
        self.assertEqual(held[1], (b"many 0", 1))
        self.assertEqual(BATCH.held, 0)
