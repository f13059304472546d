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
    A connection whose reading can be paused (L{wsproxy.protocol.ProxyProtocol}).
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

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            for connection in self._connections:
                connection.pause_reading()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for connection in self._connections:
                connection.resume_reading()

    def stopProducing(self) -> None:
        self.resumeProducing()
