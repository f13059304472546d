"""
The shared subscription hub: one Redis Pub/Sub connection serves every
session of the process.

Sockets register as listeners of a channel; the first listener of a channel
subscribes it, the last one to leave unsubscribes it (one channel per
command: txredisapi mismatches replies otherwise). After the connection is
lost and re-established, every channel that still has listeners is
subscribed again.

A canary detects a connection that is up but no longer delivers: every
C{interval} seconds a token is published (through the command connection) on
a channel private to this process; if it has not come back through the
subscriber within C{timeout} seconds, the hub is unhealthy and the subscriber
connection is rebuilt. A canary that is late because it is queued behind a
burst of messages that are still arriving is not a failure: the timeout only
counts while nothing is delivered (and while the process is responsive).

There is no WebSocket code here: a listener is anything with a
C{deliver(payload: bytes)} method, which must not raise (what it raises is
logged and contained, so that one broken listener can never drop the shared
connection and every other session's messages).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .redislink import RedisLink, RedisUnavailable


def _redirected(f: Failure) -> bool:
    """
    Whether a subscription was refused with a Redis Cluster redirection.
    """
    message = f.getErrorMessage()
    return message.startswith(("MOVED ", "ASK "))


class Listener(Protocol):
    def deliver(self, payload: bytes) -> None: ...


class _Subscription:
    """
    The listeners of one channel and the state of its subscription.

    The listeners are a dict (in the order they came): a topic's channel
    may have every socket of the process, and each leaves in O(1).
    C{single} is the listener when there is exactly one (a session's
    channel, the common case: delivered without a loop). C{fan} is the
    C{fan_out} of the listeners' class when they are all of one class that
    has one (a topic's sockets): it delivers to all of them in one call.
    """

    __slots__ = ("name", "listeners", "single", "fan", "confirmed", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.listeners: dict[Listener, None] = {}
        self.single: Optional[Listener] = None
        self.fan: Optional[Callable[[tuple[Any, ...], bytes], None]] = None
        self.confirmed = False
        self.waiting: list[defer.Deferred[Any]] = []

    def add(self, listener: Listener) -> None:
        listeners = self.listeners
        listeners[listener] = None
        if len(listeners) == 1:
            # (a session's channel: nothing more to decide)
            self.single = listener
            return
        single = self.single
        if single is not None:
            # the second listener: fan out if both have the same fan_out
            self.single = None
            self.fan = getattr(type(single), "fan_out", None)
        if self.fan is not None and getattr(type(listener), "fan_out", None) is not self.fan:
            self.fan = None

    def remove(self, listener: Listener) -> bool:
        listeners = self.listeners
        if listeners.pop(listener, self) is self:
            return False
        if len(listeners) == 1:
            self.single = next(iter(listeners))
            self.fan = None
        else:
            self.single = None
        return True


class Hub:
    """
    Reference-counted channel subscriptions on one shared L{RedisLink}.
    """

    _log = Logger()

    def __init__(
        self,
        link: RedisLink,
        clock: IReactorTime,
        publish: Callable[[bytes, bytes, Callable[[Any], None]], None],
        canary_channel: str,
        canary_interval: float = 2.0,
        canary_timeout: float = 3.0,
        on_redirect: Optional[Callable[[], None]] = None,
    ) -> None:
        self._link = link
        #: Redis Cluster shards (L{wsproxy.redis.cluster}): a subscription refused
        #: with MOVED/ASK stays waiting and this is called (the cluster then
        #: moves the channel to the shard that owns it); otherwise it fails
        self._on_redirect = on_redirect
        self._redirected: set[bytes] = set()
        self._clock = clock
        self._publish = publish
        self._channels: Dict[bytes, _Subscription] = {}
        #: channels subscribed for the life of the process (keep)
        self._kept: set[bytes] = set()
        link.on_ready = self._connected
        link.on_lost = self._disconnected
        link.on_message = self.dispatch
        self.canary_channel = canary_channel
        self._canary_key = canary_channel.encode()
        self.canary_interval = canary_interval
        self.canary_timeout = canary_timeout
        self._canary_sent: Optional[float] = None
        self._canary_patience_from = 0.0
        self._canary_acked = False
        self._canary_delivered = 0
        self._last_check = clock.seconds()
        #: messages dispatched, so the canary can tell a backlog from silence
        self.delivered = 0
        self._canary_seq = 0
        self.canary_rtt: Optional[float] = None
        self._canary_confirmed = False

    @property
    def connected(self) -> bool:
        return self._link.ready is not None

    @property
    def healthy(self) -> bool:
        """
        Connected, canary channel subscribed, and the last canary (if one is
        overdue) came back in time.
        """
        if self._link.ready is None or not self._canary_confirmed:
            return False
        return not self._canary_overdue(self._clock.seconds())

    def _canary_overdue(self, now: float) -> bool:
        if self._canary_sent is None or not self._canary_acked:
            # not yet accepted by Redis: a late canary is the command
            # connection's problem (its own deadline), not the subscriber's
            return False
        if self.delivered != self._canary_delivered:
            # still delivering: the canary is queued behind a backlog
            self._canary_delivered = self.delivered
            self._canary_patience_from = now
        return now - self._canary_patience_from > self.canary_timeout

    def channel_count(self) -> int:
        """
        Session channels subscribed (not those kept for the process).
        """
        return len(self._channels) - len(self._kept)

    # -- subscriptions ---------------------------------------------------

    def subscribe(self, channel: str, listener: Listener) -> defer.Deferred[Any]:
        """
        Add C{listener} to C{channel}. The Deferred fires once Redis has
        confirmed the subscription, or fails with L{RedisUnavailable},
        L{RedisTimeout} or a Redis error reply; cancelling it (the caller gave up) fails it with
        C{CancelledError}. When it fails the listener is already removed:
        until it fires the hub owns the subscription, afterwards the caller
        (who must L{unsubscribe}).
        """
        key = channel.encode()
        state = self._channels.get(key)
        first = state is None
        if state is None:
            if self._link.ready is None:
                return defer.fail(RedisUnavailable("subscriber not connected"))
            state = self._channels[key] = _Subscription(channel)
        state.add(listener)
        if state.confirmed:
            return defer.succeed(None)

        def cancel(d: defer.Deferred[Any]) -> None:
            if d in state.waiting:
                state.waiting.remove(d)
            self.unsubscribe(channel, listener)

        d: defer.Deferred[Any] = defer.Deferred(canceller=cancel)
        state.waiting.append(d)

        def failed(f: Failure) -> Failure:
            if not f.check(defer.CancelledError):
                self.unsubscribe(channel, listener)
            return f

        d.addErrback(failed)
        if first:
            # only now that d is waiting: the link may answer before it
            # returns (a Deferred that has already fired)
            self._send_subscribe(state)
        return d

    def keep(self, channel: str, listener: Listener) -> None:
        """
        Subscribe C{listener} to C{channel} for the life of the process,
        whether or not Redis is connected now: the subscription is made as
        soon as it is, and after every reconnection.
        """
        key = channel.encode()
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = _Subscription(channel)
            self._kept.add(key)
            if self._link.ready is not None:
                self._send_subscribe(state)
        state.add(listener)

    def attach(self, channel: str, listener: Listener) -> None:
        """
        Add C{listener} to C{channel} without waiting for Redis (a topic
        joined while a socket is open): subscribed now if it is the first
        listener and Redis is connected, else at the next connection, like
        every other channel; the caller L{unsubscribe}s it.
        """
        key = channel.encode()
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = _Subscription(channel)
            if self._link.ready is not None:
                self._send_subscribe(state)
        state.add(listener)

    def unsubscribe(self, channel: str, listener: Listener) -> None:
        """
        Remove C{listener}; unsubscribe the channel if it was the last one.
        Unknown listeners are ignored.
        """
        key = channel.encode()
        state = self._channels.get(key)
        if state is None:
            return
        if not state.remove(listener) or state.listeners:
            return
        del self._channels[key]
        waiting, state.waiting = state.waiting, []
        for d in waiting:
            d.errback(RedisUnavailable("unsubscribed"))
        self._link.unsubscribe(channel).addErrback(lambda f: None)

    def _send_subscribe(self, state: _Subscription) -> None:
        def confirmed(_: Any) -> None:
            if self._channels.get(state.name.encode()) is not state:
                return  # everyone left while the subscription was in flight
            state.confirmed = True
            waiting, state.waiting = state.waiting, []
            for d in waiting:
                d.callback(None)

        def failed(f: Any) -> None:
            if self._channels.get(state.name.encode()) is not state:
                return
            if self._on_redirect is not None and _redirected(f):
                self._redirected.add(state.name.encode())
                self._on_redirect()
                return
            waiting, state.waiting = state.waiting, []
            for d in waiting:
                d.errback(f)

        self._link.subscribe(state.name).addCallbacks(confirmed, failed)

    # -- moving channels between hubs (Redis Cluster shards) ----------------

    def holds(self, channel: bytes) -> bool:
        return channel in self._channels

    def channels(self) -> list[bytes]:
        """
        Every channel this hub holds (session channels and kept ones).
        """
        return list(self._channels)

    def take(self, channel: bytes) -> Optional[tuple[_Subscription, bool]]:
        """
        Remove C{channel} with its listeners and waiting subscribers, to be
        L{adopt}ed by another hub; it is unsubscribed here if still connected.

        @return: the subscription and whether it is kept for the process.
        """
        state = self._channels.pop(channel, None)
        if state is None:
            return None
        kept = channel in self._kept
        self._kept.discard(channel)
        self._redirected.discard(channel)
        if self._link.ready is not None:
            self._link.unsubscribe(state.name).addErrback(lambda f: None)
        return state, kept

    def adopt(self, taken: tuple[_Subscription, bool]) -> None:
        """
        Hold a channel L{take}n from another hub: subscribed here (now if
        connected, else on connection), its waiting subscribers answered
        once this hub's Redis confirms.
        """
        state, kept = taken
        key = state.name.encode()
        state.confirmed = False
        self._channels[key] = state
        if kept:
            self._kept.add(key)
        if self._link.ready is not None:
            self._send_subscribe(state)

    def dropped(self, channel: bytes) -> None:
        """
        Redis ended a subscription by itself (a cluster slot moved away):
        it is no longer confirmed, and is subscribed again by
        L{retry_redirected} unless the cluster moves it to another hub.
        """
        state = self._channels.get(channel)
        if state is not None:
            state.confirmed = False
            self._redirected.add(channel)
        elif channel == self._canary_key:
            self._canary_confirmed = False
            self._canary_dropped = True

    @property
    def unsettled(self) -> bool:
        """
        Some subscription was refused with a redirection or dropped by
        Redis and has not been made again.
        """
        return bool(self._redirected) or self._canary_dropped

    _canary_dropped = False

    def retry_redirected(self) -> None:
        """
        Subscribe again the channels Redis refused with a redirection (or
        dropped) that are still held here (the cluster's slot map said
        they belong here).
        """
        if self._link.ready is None:
            return
        redirected, self._redirected = self._redirected, set()
        if self._canary_dropped:
            self._canary_dropped = False
            self._subscribe_canary()
        for key in redirected:
            state = self._channels.get(key)
            if state is not None and not state.confirmed:
                self._send_subscribe(state)

    def set_canary(self, channel: str) -> None:
        """
        Use another canary channel (a cluster shard's must hash to a slot it
        owns).
        """
        if channel == self.canary_channel:
            return
        old = self.canary_channel
        self.canary_channel = channel
        self._canary_key = channel.encode()
        self._canary_sent = None
        self._canary_dropped = False
        if self._link.ready is not None:
            self._link.unsubscribe(old).addErrback(lambda f: None)
            self._subscribe_canary()

    # -- connection events -----------------------------------------------

    def _subscribe_canary(self) -> None:
        self._canary_confirmed = False
        channel = self.canary_channel

        def canary_confirmed(_: Any) -> None:
            if channel == self.canary_channel:
                self._canary_confirmed = True

        def canary_failed(f: Failure) -> None:
            if self._on_redirect is not None and _redirected(f) and channel == self.canary_channel:
                self._canary_dropped = True
                self._on_redirect()

        self._link.subscribe(channel).addCallbacks(canary_confirmed, canary_failed)

    def _connected(self, proto: Any) -> None:
        self._canary_sent = None
        self._redirected.clear()
        self._subscribe_canary()
        if self._channels:
            self._log.info(
                "re-subscribing {n} channels", n=len(self._channels)
            )
        for state in self._channels.values():
            state.confirmed = False
            self._send_subscribe(state)

    def _disconnected(self) -> None:
        self._canary_confirmed = False
        for state in self._channels.values():
            state.confirmed = False

    # -- messages ----------------------------------------------------------

    def dispatch(self, channel: bytes, payload: bytes) -> None:
        """
        Deliver one message to every listener of its channel. Nothing raised
        by a listener escapes.
        """
        self.delivered += 1
        state = self._channels.get(channel)
        if state is None:
            if channel == self._canary_key:
                self._canary_back(payload)
            return
        single = state.single
        if single is not None:
            try:
                single.deliver(payload)
            except Exception:
                self._log.failure("delivery to one listener failed")
            return
        fan = state.fan
        if fan is not None:
            # (it contains what one listener raises, as the loop below does)
            fan(tuple(state.listeners), payload)
            return
        for listener in tuple(state.listeners):
            try:
                listener.deliver(payload)
            except Exception:
                self._log.failure("delivery to one listener failed")

    # -- canary ------------------------------------------------------------

    def check_canary(self) -> None:
        """
        Called every C{canary_interval}: judge the canary in flight, then
        send the next one.
        """
        now = self._clock.seconds()
        if now - self._last_check > self.canary_interval * 2:
            # the process was too busy to run this check on time; the
            # canary may be waiting unread in our own socket
            self._canary_patience_from = now
        self._last_check = now
        sent = self._canary_sent
        if sent is not None and self._canary_overdue(now):
            self._stale(f"subscriber canary not received within {self.canary_timeout:g}s")
            return
        if sent is not None or not self._canary_confirmed:
            return
        self._canary_seq += 1
        self._canary_sent = self._canary_patience_from = now
        self._canary_acked = False
        self._canary_delivered = self.delivered
        seq = self._canary_seq

        def replied(reply: Any) -> None:
            if self._canary_seq != seq or self._canary_sent is None:
                return
            if reply.__class__ is not int:
                # the command connection is down: nothing to learn this round
                self._canary_sent = None
            elif reply == 0 and self._link.ready is not None:
                # Redis has no subscriber for our channel: ours is gone
                self._stale("Redis reports no subscriber on the canary channel")
            else:
                # delivered by Redis: from now on, lateness is the subscriber's
                self._canary_acked = True
                self._canary_patience_from = self._clock.seconds()

        self._publish(self._canary_key, b"%d" % seq, replied)

    def _stale(self, why: str) -> None:
        self._canary_sent = None
        # unhealthy until a new connection has confirmed the canary channel
        self._canary_confirmed = False
        if self._link.ready is not None:
            self._log.error("{why}: rebuilding the subscriber connection", why=why)
            self._link.kill()

    def _canary_back(self, payload: bytes) -> None:
        sent = self._canary_sent
        if sent is None or payload != b"%d" % self._canary_seq:
            return
        self._canary_sent = None
        self.canary_rtt = self._clock.seconds() - sent
