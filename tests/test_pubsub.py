"""
The subscription hub, against the fake Redis link and a fake clock.
"""

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.redis.pubsub import Hub
from wsproxy.redis.redislink import RedisUnavailable

from .support.fakes import FakeLink, FakeRedis


class Listener:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def deliver(self, payload: bytes) -> None:
        self.got.append(payload)


class Broken:
    def deliver(self, payload: bytes) -> None:
        raise RuntimeError("socket is closing")


class Fanned(Listener):
    """
    A listener whose class delivers to all of a channel's listeners in one
    call (as a topic's sockets do).
    """

    calls: list[tuple[int, bytes]] = []

    @staticmethod
    def fan_out(listeners: tuple["Fanned", ...], payload: bytes) -> None:
        Fanned.calls.append((len(listeners), payload))
        for listener in listeners:
            listener.got.append(payload)


class HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        # (UN)SUBSCRIBE wait until the test answers them (self.redis.flush());
        # a kill leaves the old connection closing until the test loses it
        self.redis = FakeRedis()
        self.redis.hold("SUBSCRIBE", "UNSUBSCRIBE")
        self.link = FakeLink("subscriber", self.redis, self.clock)
        self.link.lose_on_kill = False
        self.published: list[tuple[str, bytes]] = []
        self.hub = Hub(self.link, self.clock, self.publish, "canary", canary_interval=2,
                       canary_timeout=3)
        self.link.connect()
        self.redis.flush()
        del self.redis.log[:]

    def publish(self, channel: bytes, payload: bytes, on_reply: Any) -> None:
        """
        Redis accepts every publish and reports one receiver.
        """
        self.published.append((channel, payload))
        on_reply(1)


class RefCountTests(HubTestCase):
    def test_first_subscribes_last_unsubscribes(self) -> None:
        """
        One SUBSCRIBE for the first listener of a channel, one UNSUBSCRIBE
        when the last leaves; others in between cause no command.
        """
        a, b = Listener(), Listener()
        da = self.hub.subscribe("session:s:down", a)
        db = self.hub.subscribe("session:s:down", b)
        self.assertEqual(self.link.sent(), [("SUBSCRIBE", "session:s:down")])
        self.assertNoResult(da)
        self.redis.flush()
        self.successResultOf(da)
        self.successResultOf(db)
        self.successResultOf(self.hub.subscribe("session:s:down", Listener()))
        self.hub.unsubscribe("session:s:down", a)
        self.hub.unsubscribe("session:s:down", b)
        self.assertEqual(len(self.link.sent()), 1)
        self.hub.unsubscribe("session:s:down", next(iter(self.hub._channels[b"session:s:down"].listeners)))
        self.assertEqual(self.link.sent()[-1], ("UNSUBSCRIBE", "session:s:down"))
        self.assertEqual(self.hub.channel_count(), 0)

    def test_dispatch_to_every_listener_in_order(self) -> None:
        """
        Every listener of a channel gets every message, in order; other
        channels' listeners get nothing.
        """
        a, b, other = Listener(), Listener(), Listener()
        for listener, channel in ((a, "c1"), (b, "c1"), (other, "c2")):
            self.hub.subscribe(channel, listener)
        self.redis.flush()
        self.hub.dispatch(b"c1", b"1")
        self.hub.dispatch(b"c1", b"2")
        self.assertEqual((a.got, b.got, other.got), ([b"1", b"2"], [b"1", b"2"], []))

    def test_broken_listener_contained(self) -> None:
        """
        A listener that raises does not stop delivery to the others, and
        nothing escapes into the connection.
        """
        good = Listener()
        self.hub.subscribe("c", Broken())
        self.hub.subscribe("c", good)
        self.redis.flush()
        self.hub.dispatch(b"c", b"x")
        self.assertEqual(good.got, [b"x"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_fan_out_in_one_call(self) -> None:
        """
        Listeners all of one class with a C{fan_out}: one call delivers to
        all of them; a listener of another class joining makes it a loop
        over each listener's C{deliver} again; one listener alone gets its
        own C{deliver}.
        """
        Fanned.calls = []
        a, b = Fanned(), Fanned()
        self.hub.subscribe("t", a)
        self.hub.subscribe("t", b)
        self.redis.flush()
        self.hub.dispatch(b"t", b"1")
        self.assertEqual(Fanned.calls, [(2, b"1")])
        plain = Listener()
        self.hub.subscribe("t", plain)
        self.hub.dispatch(b"t", b"2")
        self.assertEqual(Fanned.calls, [(2, b"1")])
        self.assertEqual((a.got, b.got, plain.got), ([b"1", b"2"], [b"1", b"2"], [b"2"]))
        self.hub.unsubscribe("t", plain)
        self.hub.unsubscribe("t", b)
        self.hub.dispatch(b"t", b"3")
        self.assertEqual((a.got, Fanned.calls), ([b"1", b"2", b"3"], [(2, b"1")]))

    def test_subscribe_while_disconnected_fails_fast(self) -> None:
        """
        With no subscriber connection a new channel cannot be subscribed:
        RedisUnavailable at once, and nothing is left registered.
        """
        self.link.lose()
        self.failureResultOf(self.hub.subscribe("c", Listener()), RedisUnavailable)
        self.assertEqual(self.hub.channel_count(), 0)

    def test_link_answers_at_once(self) -> None:
        """
        A link whose SUBSCRIBE has already been answered when it returns is
        heard: a failure fails the subscription at once and leaves nothing
        registered, a confirmation confirms it.
        """
        self.link.subscribe = lambda channel: defer.fail(RedisUnavailable("gone"))
        self.failureResultOf(self.hub.subscribe("c", Listener()), RedisUnavailable)
        self.assertEqual(self.hub.channel_count(), 0)
        self.link.subscribe = lambda channel: defer.succeed(None)
        self.successResultOf(self.hub.subscribe("c", Listener()))
        self.assertEqual(self.hub.channel_count(), 1)

    def test_leave_before_confirmation(self) -> None:
        """
        If the only listener leaves while SUBSCRIBE is in flight, the channel
        is unsubscribed and the late confirmation changes nothing.
        """
        listener = Listener()
        d = self.hub.subscribe("c", listener)
        d.addErrback(lambda f: None)
        self.hub.unsubscribe("c", listener)
        self.redis.flush()
        self.assertEqual(self.link.sent(), [("SUBSCRIBE", "c"), ("UNSUBSCRIBE", "c")])
        self.assertEqual(self.hub.channel_count(), 0)


class ReconnectTests(HubTestCase):
    def test_resubscribe_after_reconnect(self) -> None:
        """
        After the connection is lost and re-established, every channel that
        still has listeners is subscribed again, one channel per command,
        and messages flow again.
        """
        a, b = Listener(), Listener()
        self.hub.subscribe("c1", a)
        self.hub.subscribe("c2", b)
        self.hub.subscribe("c3", Listener()).addErrback(lambda f: None)
        self.hub.unsubscribe("c3", next(iter(self.hub._channels[b"c3"].listeners)))
        self.redis.flush()
        del self.redis.log[:]
        self.link.lose()
        self.link.connect()
        self.assertEqual(
            sorted(self.link.sent()),
            [("SUBSCRIBE", "c1"), ("SUBSCRIBE", "c2"), ("SUBSCRIBE", "canary")],
        )
        self.redis.flush()
        self.hub.dispatch(b"c1", b"again")
        self.assertEqual(a.got, [b"again"])


class CanaryTests(HubTestCase):
    def test_canary_round_trip(self) -> None:
        """
        Each check publishes a token on the private channel; when it comes
        back the hub is healthy and the round trip is recorded.
        """
        self.assertTrue(self.hub.healthy)
        self.hub.check_canary()
        self.assertEqual(self.published, [(b"canary", b"1")])
        self.clock.advance(0.25)
        self.hub.dispatch(b"canary", b"1")
        self.assertEqual(self.hub.canary_rtt, 0.25)
        self.assertTrue(self.hub.healthy)

    def test_lost_canary_rebuilds(self) -> None:
        """
        A canary that does not come back within the timeout makes the hub
        unhealthy and rebuilds the subscriber connection.
        """
        self.hub.check_canary()
        self.clock.advance(3.5)
        self.assertFalse(self.hub.healthy)
        self.hub.check_canary()
        self.assertEqual(self.link.kills, 1)
        # the old connection is still closing: not healthy until a new one
        # has confirmed the canary channel
        self.assertFalse(self.hub.healthy)
        self.link.lose()
        self.link.connect()
        self.assertFalse(self.hub.healthy)
        self.redis.flush()
        self.assertTrue(self.hub.healthy)

    def test_canary_behind_backlog_is_not_a_failure(self) -> None:
        """
        A canary that is late while other messages keep being delivered is
        queued behind a burst: no rebuild, and the hub stays healthy.
        """
        self.hub.subscribe("c", Listener())
        self.redis.flush()
        self.hub.check_canary()
        for _ in range(4):
            self.clock.advance(2)
            self.hub.dispatch(b"c", b"burst")
            self.hub.check_canary()
            self.assertTrue(self.hub.healthy)
        self.assertEqual(self.link.kills, 0)
        self.clock.advance(3.5)
        self.hub.check_canary()
        self.assertEqual(self.link.kills, 1)

    def test_unaccepted_canary_is_not_the_subscribers_fault(self) -> None:
        """
        While Redis has not yet accepted the canary PUBLISH (the command
        connection is backlogged), its lateness is not blamed on the
        subscriber.
        """
        self.publish = lambda channel, payload, on_reply: None  # type: ignore[method-assign]
        self.hub._publish = self.publish
        self.hub.check_canary()
        self.clock.advance(3.5)
        self.assertTrue(self.hub.healthy)
        self.hub.check_canary()
        self.assertEqual(self.link.kills, 0)

    def test_no_receiver_means_subscriber_gone(self) -> None:
        """
        If Redis says nobody received the canary, our subscription is gone:
        the subscriber connection is rebuilt at once.
        """
        self.hub._publish = lambda channel, payload, on_reply: on_reply(0)
        self.hub.check_canary()
        self.assertEqual(self.link.kills, 1)
        self.assertFalse(self.hub.healthy)

    def test_busy_process_is_not_a_failure(self) -> None:
        """
        If the check itself runs late (the process was busy), the canary gets
        a fresh timeout instead of being declared lost.
        """
        self.hub.check_canary()
        self.clock.advance(10)
        self.hub.check_canary()
        self.assertEqual(self.link.kills, 0)
