"""
One WebSocket connection's topics (C{TOPICS=true}; what topics are, and
their framings: L{wsproxy.session.topics}): the listeners it subscribes
per topic, its joins and leaves (at admission, on a backend's change
through C{wsproxy:control}, at its end), their lifecycle events, and for
a resuming client the recovery of each topic. Module functions taking the
protocol (no object per connection beyond the listeners themselves).

Per socket and topic: a L{DownSink} on C{topic:<name>:down} and, with
C{RESUME=true}, a L{LiveSink} on C{topic:<name>:live}; each takes the
frame the topic's L{TopicFeed} built once for every socket of its framing
and sends it as the socket's own (L{ProxyProtocol._send_message}: its
counts, its backpressure, its slow-consumer close). A resuming client
with C{?labels=1} has a L{Resumer} per topic: each topic's recoverable
messages exactly once and in order, with their position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..names import topic_channel, topic_live_channel
from ..redis.pubsub import Listener
from ..session.control import TopicChange
from ..session.resume import Position, Recovery, Resumer, plan_recovery
from ..session.topics import ENVELOPED, LABELLED, RAW, Framed, TopicFeed
from .states import ADMITTING, OPEN

if TYPE_CHECKING:
    from .protocol import ProxyProtocol

STATE_OPEN = WebSocketProtocol.STATE_OPEN


def framing(protocol: ProxyProtocol) -> int:
    """
    How this connection's topic frames look (L{wsproxy.session.topics}).
    """
    if protocol._labels:
        base = LABELLED
    elif protocol._resumer is not None or protocol._acked:
        base = ENVELOPED
    else:
        base = RAW
    # (a Server-Sent Events stream's are the same, as events)
    return base + protocol._framing_offset


def _send(protocol: ProxyProtocol, out: Optional[Framed]) -> None:
    """
    Send one topic message's frame as the connection's own
    (L{ProxyProtocol._send_message}), counted as a fan-out delivery; a
    message that cannot be sent (C{None}) is counted as dropped.
    """
    stats = protocol._proxy.stats
    if out is None:
        stats.dropped_down += 1
        return
    stats.topic_deliveries += 1
    protocol._send_message(*out)


class DownSink:
    """
    One socket's listener on a topic's plain channel.
    """

    __slots__ = ("_protocol", "_feed", "_framing")

    def __init__(self, protocol: ProxyProtocol, feed: TopicFeed, framing: int) -> None:
        self._protocol = protocol
        self._feed = feed
        self._framing = framing

    def deliver(self, payload: bytes) -> None:
        protocol = self._protocol
        if protocol._state is not OPEN or protocol.state != STATE_OPEN:
            if protocol._state is ADMITTING:
                protocol._keep_early((self, payload))
            return
        _send(protocol, self._feed.down(payload, self._framing))

    @staticmethod
    def fan_out(sinks: tuple[DownSink, ...], payload: bytes) -> None:
        """
        One message of a topic to every socket of the process in it, in one
        loop (the hub calls this instead of each L{deliver}): the frame of
        each framing built once, written to each open socket
        (L{ProxyProtocol._write}) and counted as
        L{ProxyProtocol._send_message} would, the process's counters once
        for all. A socket that is not simply open and
        writable (admitting, closing, compressing, or with its send buffer
        full: the slow-consumer rule) takes its own L{deliver}. What one
        socket raises is logged, and the others still get the message.
        """
        feed = sinks[0]._feed
        frames = feed.frames(payload)
        sent = 0
        size = 0
        for sink in sinks:
            protocol = sink._protocol
            try:
                made = frames[sink._framing]
                if made is None:
                    made = feed.down(payload, sink._framing)
                if (made is None or protocol._state is not OPEN or protocol._paused
                        or protocol.state != STATE_OPEN
                        or protocol._perMessageCompress is not None):
                    sink.deliver(payload)
                    continue
                framed = made[2]
                size = made[3]
                protocol._write(framed)
                protocol.messages_out += 1
                protocol.bytes_out += size
                sent += 1
                if protocol._paused:
                    # this write filled the socket's buffer: it counts, as
                    # in _send_message
                    protocol._unsent += len(framed)
                    if protocol._unsent > protocol.factory.max_send_buffer:
                        protocol._slow_consumer()
            except Exception:
                _log.failure("delivery of a topic message to one socket failed")
        if sent:
            stats = feed.stats
            stats.topic_deliveries += sent
            stats.messages_down += sent
            stats.bytes_down += sent * size


_log = Logger()


class LiveSink:
    """
    One socket's listener on a topic's live channel (recoverable messages):
    through its L{Resumer} when it resumes the topic, else as a plain
    message.
    """

    __slots__ = ("_protocol", "_feed", "_framing", "resumer")

    def __init__(self, protocol: ProxyProtocol, feed: TopicFeed, framing: int,
                 resumer: Optional[Resumer]) -> None:
        self._protocol = protocol
        self._feed = feed
        self._framing = framing
        self.resumer = resumer

    def deliver(self, payload: bytes) -> None:
        entry = self._feed.entry(payload)
        if entry is None:
            return
        resumer = self.resumer
        if resumer is not None:
            # held by the resumer until it starts (the open)
            resumer.live_entry(entry)
            return
        protocol = self._protocol
        if protocol._state is not OPEN or protocol.state != STATE_OPEN:
            if protocol._state is ADMITTING:
                protocol._keep_early((self, payload))
            return
        _send(protocol, self._feed.live(entry, self._framing))


class Membership:
    """
    One connection in one topic: its listeners, its resumer, and (during
    the admission) the recovery planned for it.
    """

    __slots__ = ("feed", "listeners", "resumer", "recovery")

    def __init__(self, feed: TopicFeed, listeners: list[tuple[str, Listener]],
                 resumer: Optional[Resumer]) -> None:
        self.feed = feed
        self.listeners = listeners
        self.resumer = resumer
        self.recovery: Optional[Recovery] = None


def _send_positioned(protocol: ProxyProtocol, feed: TopicFeed, position: bytes,
                     message: bytes, kind: bytes) -> None:
    if protocol._state is not OPEN or protocol.state != STATE_OPEN:
        return
    _send(protocol, feed.positioned(position, message, kind,
                                    LABELLED + protocol._framing_offset))


def _member(protocol: ProxyProtocol, topic: str) -> Membership:
    """
    Make C{protocol} a member of C{topic} (not yet subscribed).
    """
    proxy = protocol._proxy
    topics = proxy.topics
    assert topics is not None and protocol.session_id is not None
    feed = topics.joined(topic)
    kind = framing(protocol)
    listeners: list[tuple[str, Listener]] = [(topic_channel(topic), DownSink(protocol, feed, kind))]
    resumer = None
    if proxy.settings.resume:
        if protocol._resumer is not None and protocol._labels:
            session_id = protocol.session_id
            resumer = Resumer(
                lambda position, message, kind: _send_positioned(
                    protocol, feed, position, message, kind),
                protocol._send_control,
                lambda after: proxy.read_history(session_id, after, topic),
                proxy.stats,
                topic,
            )
        listeners.append((topic_live_channel(topic), LiveSink(protocol, feed, kind, resumer)))
    membership = Membership(feed, listeners, resumer)
    if protocol._topics is None:
        protocol._topics = {}
    protocol._topics[topic] = membership
    return membership


class Joining:
    """
    The topics of a connection being admitted
    (L{wsproxy.session.proxy.TopicJoin}).
    """

    def __init__(self, protocol: ProxyProtocol, positions: dict[str, Optional[Position]]) -> None:
        self._protocol = protocol
        self._positions = positions

    def subscriptions(self, topics: list[str]) -> list[tuple[str, Listener]]:
        made: list[tuple[str, Listener]] = []
        for topic in topics:
            made.extend(_member(self._protocol, topic).listeners)
        return made

    def positions(self) -> list[tuple[str, Optional[Position]]]:
        joined = self._protocol._topics or {}
        return [(topic, self._positions.get(topic)) for topic, membership in joined.items()
                if membership.resumer is not None]

    def planned(self, topic: str, recovery: Recovery) -> None:
        membership = (self._protocol._topics or {}).get(topic)
        if membership is not None:
            membership.recovery = recovery


def opened(protocol: ProxyProtocol) -> None:
    """
    The connection opened: its join events, each topic's recovery (after
    the session's), then the changes a backend asked for meanwhile.
    """
    proxy = protocol._proxy
    assert protocol.session_id is not None
    proxy.admitting_over(protocol.session_id, protocol)
    joined = protocol._topics or {}
    if proxy.events.enabled:
        for topic in joined:
            proxy.events.publish(protocol.session_id, protocol._event("join", topic=topic))
    for membership in joined.values():
        if membership.resumer is not None and membership.recovery is not None:
            recovery, membership.recovery = membership.recovery, None
            membership.resumer.start(recovery)
    changes = protocol.__dict__.pop("_topic_changes", None)
    for change, topics in changes or ():
        topic_change(protocol, change, topics)


def topic_change(protocol: ProxyProtocol, change: TopicChange, topics: list[str]) -> None:
    """
    A backend made the session join or leave topics: applied now if the
    connection is open, at its open if it is being admitted.
    """
    if protocol._state is ADMITTING:
        changes = protocol.__dict__.setdefault("_topic_changes", [])
        changes.append((change, topics))
        return
    if protocol._state is not OPEN:
        return
    proxy = protocol._proxy
    session_id = protocol.session_id
    assert session_id is not None
    joined = protocol._topics or {}
    if change == "unsubscribe":
        for topic in topics:
            if topic in joined:
                _leave(protocol, topic)
        return
    for topic in proxy.chooser.choose(session_id, topics, joined):
        membership = _member(protocol, topic)
        for channel, listener in membership.listeners:
            proxy.hub.attach(channel, listener)
        if proxy.events.enabled:
            proxy.events.publish(session_id, protocol._event("join", topic=topic))
        resumer = membership.resumer
        if resumer is not None:
            _start_at_end(protocol, topic, resumer)


def _start_at_end(protocol: ProxyProtocol, topic: str, resumer: Resumer) -> None:
    """
    A resuming connection joined a topic while open: it starts at the end
    of the topic's history (its recovery frame says where); a message
    published before its subscription took effect shows as a gap at the
    next one, and is filled from the history then.
    """
    proxy = protocol._proxy
    assert protocol.session_id is not None

    def read(history: Any) -> None:
        if not resumer.closed:
            resumer.start(plan_recovery(None, history))

    def failed(reason: Failure) -> None:
        if not resumer.closed:
            resumer.start(Recovery(False, (), None, "the history could not be read"))

    d = proxy.history_end(protocol.session_id, topic)
    d.addCallbacks(read, failed)


def _leave(protocol: ProxyProtocol, topic: str, event: bool = True) -> None:
    proxy = protocol._proxy
    joined = protocol._topics
    if joined is None:
        return
    membership = joined.pop(topic, None)
    if membership is None:
        return
    for channel, listener in membership.listeners:
        proxy.hub.unsubscribe(channel, listener)
    if membership.resumer is not None:
        membership.resumer.closed = True
    topics = proxy.topics
    if topics is not None:
        topics.left(membership.feed)
    if event and proxy.events.enabled and protocol.session_id is not None:
        proxy.events.publish(protocol.session_id, protocol._event("leave", topic=topic))


def leave_all(protocol: ProxyProtocol, was_open: bool) -> None:
    """
    The connection's session ended (or its admission failed): it leaves
    every topic, with a leave event for each if it was open.
    """
    proxy = protocol._proxy
    if protocol.session_id is not None:
        proxy.admitting_over(protocol.session_id, protocol)
    protocol.__dict__.pop("_topic_changes", None)
    for topic in list(protocol._topics or ()):
        _leave(protocol, topic, event=was_open)
    protocol._topics = None
