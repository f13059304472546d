"""
Upstream backpressure: when Redis (or the network to it) is slower than the
clients, reading from the clients slows down instead of buffering.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


class Readable(Protocol):
    """
    A connection whose reading can be paused (L{wsproxy.websocket.protocol.ProxyProtocol}).
    """

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@implementer(IPushProducer)
class UpstreamValve:
    """
    Registered as the producer of the command connection, it stops reading
    from every client while that connection's send buffer is full, and
    resumes when it has drained. Memory stays bounded and no client message
    is dropped.
    """

    def __init__(self, connections: Iterable[Readable]) -> None:
        self._connections = connections
        self.paused = False
        self._full = 0
        #: client messages are held for a new connection (L{hold})
        self._held = False

    def share(self) -> "ValveShare":
        """
        A producer for one of several connections feeding this valve (a
        Redis Cluster's masters): clients stay paused while any is full.
        """
        return ValveShare(self)

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            for connection in self._connections:
                connection.pause_reading()

    def resumeProducing(self) -> None:
        if self.paused and not self._held:
            self.paused = False
            for connection in self._connections:
                connection.resume_reading()

    def stopProducing(self) -> None:
        self.resumeProducing()

    def hold(self) -> None:
        """
        Client messages are being held while a Redis connection is replaced
        (L{wsproxy.redis.hold}): no client is read from until L{release},
        whatever the connections' buffers say meanwhile.
        """
        self._held = True
        self.pauseProducing()

    def release(self) -> None:
        """
        The held messages are written (or failed): clients are read again,
        unless a connection's send buffer is still full.
        """
        self._held = False
        if self._full == 0:
            self.resumeProducing()


@implementer(IPushProducer)
class ValveShare:
    """
    One connection's part of an L{UpstreamValve} shared by several.
    """

    def __init__(self, valve: UpstreamValve) -> None:
        self._valve = valve
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._valve._full += 1
            self._valve.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._valve._full -= 1
            if self._valve._full == 0:
                self._valve.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()
