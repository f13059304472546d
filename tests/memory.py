"""
In-memory test support: the real L{ProxySite}, L{Proxy} and
L{ProxyProtocol} over memory transports, on fake Redis links whose replies
the test controls, all driven by one L{Clock}.

No socket, no redis-server and no real time: a test writes the raw bytes of
an upgrade request, reads the raw response, sends masked client frames and
parses the server's frames, and decides when (and whether) Redis answers.
Everything happens synchronously or when the test advances the clock, so
each test is deterministic and takes milliseconds.

The pieces:

  - L{FakeRedis}: one Redis server (keys, channels, every command received)
    that can hold its replies back or fail commands by name.
  - L{FakeLink}: what L{Proxy} and L{Hub} use of a
    L{wsproxy.redis.redislink.RedisLink}, talking to a L{FakeRedis}.
  - L{MemoryClient}: one client connection to the site: raw bytes, a
    response parser and WebSocket frames.
  - L{MemoryProxy}: all of the above wired together.
  - L{MemoryTestCase}: points txaio (Autobahn's timers) at the clock for the
    duration of a test and checks the global reactor is left untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import txaio
from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SynchronousTestCase

from wsproxy.config import Settings
from wsproxy.edge.site import ProxySite
from wsproxy.session.proxy import Proxy

from .support import http
from .support.fakes import Command, FakeLink, FakeRedis
from .support.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, client_frame
from .support.http import WS_ACCEPT, WS_KEY

__all__ = [
    "BINARY", "CLOSE", "CONTINUATION", "PING", "PONG", "TEXT", "WS_ACCEPT", "WS_KEY", "Command",
    "FakeLink", "FakeRedis", "Frame", "MemoryClient", "MemoryProxy", "MemoryTestCase",
    "MemoryTransport", "Response", "client_frame", "close_payload", "memory_settings",
    "parse_frames", "parse_response", "upgrade_request",
]

# -- the client's side of a connection ---------------------------------------

#: WebSocket opcodes
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG

#: a valid upgrade request for a path (and extra headers), as the in-memory
#: clients send it: to the host name C{proxy.example}
upgrade_request = functools.partial(http.upgrade_request, host="proxy.example")


@dataclass
class Response:
    """
    An HTTP response head as the client received it, and its body.

    @ivar headers: (name, value) in the order sent, names as sent.
    """

    status: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None


def parse_response(data: bytes) -> tuple[Response, bytes]:
    """
    Split C{data} into the response (head and, with a Content-Length, its
    body) and what follows it (WebSocket frames after a 101).
    """
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise FailTest(f"no complete response head in {data!r}")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    response = Response(lines[0], headers, b"")  # type: ignore[arg-type]
    length = response.header("Content-Length")
    if length is not None:
        response.body, rest = rest[: int(length)], rest[int(length):]
    return response, rest


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


@dataclass
class Frame:
    """
    One frame sent by the server.
    """

    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> Optional[int]:
        if self.opcode != CLOSE or len(self.payload) < 2:
            return None
        return int.from_bytes(self.payload[:2], "big")

    @property
    def close_reason(self) -> bytes:
        return self.payload[2:]


def parse_frames(data: bytes) -> list[Frame]:
    """
    The server's frames in C{data}, which must hold whole frames only (a
    server never masks).
    """
    frames = []
    i = 0
    while i < len(data):
        first, second = data[i], data[i + 1]
        if second & 0x80:
            raise FailTest("the server masked a frame")
        n = second & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        if i + n > len(data):
            raise FailTest(f"incomplete frame in {data!r}")
        frames.append(Frame(first & 0x0F, data[i:i + n], bool(first & 0x80)))
        i += n
    return frames


class MemoryTransport(StringTransport):
    """
    The server's end of one client connection.

    Writes are kept for the client to read. Reading can be paused and
    resumed: bytes the client sends meanwhile wait, as they would in the
    kernel. A close (the server's L{loseConnection} or L{abortConnection},
    or the client leaving) reaches the protocol as C{connectionLost} on the
    next turn of the clock, never from inside the call that closed, as
    with a reactor.

    @ivar protocol: the protocol bytes are delivered to (the HTTP channel,
        then the WebSocket protocol once it has taken the connection over).
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "198.51.100.7", 50123), lenient=True)
        self.protocol: Any = None
        self.aborted = False
        self.lost = False
        self._clock = clock
        self._unread: list[bytes] = []

    def receive(self, data: bytes) -> None:
        if self.lost:
            return
        if self.producerState == "paused":
            self._unread.append(data)
        else:
            self.protocol.dataReceived(data)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        unread, self._unread = self._unread, []
        for data in unread:
            self.receive(data)

    def unregisterProducer(self) -> None:
        # as a real transport: no error when none is registered (Autobahn
        # unregisters again when it drops a connection a second time)
        self.producer = None
        self.streaming = None

    def loseConnection(self) -> None:
        self._close(error.ConnectionDone("server closed the connection"))

    def abortConnection(self) -> None:
        self.aborted = True
        self._close(error.ConnectionAborted("server aborted the connection"))

    def client_left(self) -> None:
        self._close(error.ConnectionLost("the client left"))

    def _close(self, reason: Exception) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self._clock.callLater(0, self._lost, reason)

    def _lost(self, reason: Exception) -> None:
        if not self.lost:
            self.lost = True
            self.connected = False
            self.protocol.connectionLost(Failure(reason))

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class MemoryClient:
    """
    A client connection to the site: what it sends goes in as raw bytes,
    what the server wrote is read back as raw bytes, a response or frames.
    """

    def __init__(self, site: ProxySite, clock: Clock) -> None:
        self.clock = clock
        self.transport = MemoryTransport(clock)
        channel = site.buildProtocol(self.transport.getPeer())
        self.transport.protocol = channel
        channel.makeConnection(self.transport)
        self._read = 0

    @property
    def protocol(self) -> Any:
        """
        The server's protocol for this connection (the HTTP channel until
        the upgrade, then the L{ProxyProtocol}).
        """
        return self.transport.protocol

    def send(self, data: bytes) -> None:
        """
        The client sends C{data}; the clock then runs what is due now.
        """
        self.transport.receive(data)
        self.clock.advance(0)

    def send_frame(self, payload: bytes, opcode: int = TEXT) -> None:
        self.send(client_frame(payload, opcode))

    def leave(self) -> None:
        """
        The client closes its end of the TCP connection.
        """
        self.transport.client_left()
        self.clock.advance(0)

    def read(self) -> bytes:
        """
        Everything the server wrote since the last read.
        """
        data = self.transport.value()
        new, self._read = data[self._read:], len(data)
        return new

    def response(self) -> Response:
        """
        The HTTP response the server wrote; frames after it stay unread.
        """
        data = self.transport.value()[self._read:]
        response, rest = parse_response(data)
        self._read = len(self.transport.value()) - len(rest)
        return response

    def frames(self) -> list[Frame]:
        return parse_frames(self.read())

    @property
    def closed(self) -> bool:
        """
        The server has closed (or aborted) the connection.
        """
        return bool(self.transport.disconnecting)


# -- the proxy ---------------------------------------------------------------

def memory_settings(**overrides: Any) -> Settings:
    """
    The defaults, with no server pings (they would interleave with the
    frames a test reads); anything else as given.
    """
    values: dict[str, Any] = dict(ping_interval=0.0)
    values.update(overrides)
    return Settings(**values)


class MemoryProxy:
    """
    The real proxy (L{Proxy}, L{ProxySite} and its L{ProxyProtocol}s) on
    fake Redis links and one L{Clock}, started and with both links up.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clock = Clock()
        self.redis = FakeRedis()
        self.commands = FakeLink("commands", self.redis, self.clock)
        self.subscriber = FakeLink("subscriber", self.redis, self.clock)
        self.proxy = Proxy(settings, self.clock, self.commands, self.subscriber)
        self.site = ProxySite(self.proxy)
        self.proxy.start()
        # the canary's subscription, confirmed; tests look at their own commands
        del self.redis.log[:]

    def connect(self) -> MemoryClient:
        """
        A new client connection, nothing sent yet.
        """
        return MemoryClient(self.site, self.clock)

    def request(self, path: str, headers: Optional[dict[str, str]] = None) -> MemoryClient:
        """
        A new client connection that has sent an upgrade request.
        """
        client = self.connect()
        client.send(upgrade_request(path, headers))
        return client

    def open(self, session_id: str = "s1", token: str = "tok",
             headers: Optional[dict[str, str]] = None) -> MemoryClient:
        """
        An open WebSocket connection of C{session_id} (its token stored
        first), the 101 already read.
        """
        self.redis.authorize(session_id, token)
        all_headers = {"Authorization": f"Bearer {token}"}
        all_headers.update(headers or {})
        client = self.request(f"/agent/ws/{session_id}", all_headers)
        response = client.response()
        if response.status != "HTTP/1.1 101 Switching Protocols":
            raise FailTest(f"not admitted: {response}")
        return client

    def stop(self) -> None:
        self.proxy.stop()


class MemoryTestCase(SynchronousTestCase):
    """
    Runs a test on a L{MemoryProxy} (L{start}). Autobahn's timers (txaio)
    run on the proxy's clock for the duration of the test, and the test
    fails if it leaves anything scheduled on the global reactor.
    """

    def setUp(self) -> None:
        before = set(reactor.getDelayedCalls())
        saved_loop = txaio.config.loop

        def restore() -> None:
            txaio.config.loop = saved_loop
            left = [c for c in reactor.getDelayedCalls() if c not in before]
            for call in left:
                call.cancel()
            self.assertEqual(left, [], "delayed calls left on the global reactor")

        self.addCleanup(restore)

    def start(self, **overrides: Any) -> MemoryProxy:
        """
        A started proxy with L{memory_settings}C{(**overrides)}.
        """
        memory = MemoryProxy(memory_settings(**overrides))
        txaio.config.loop = memory.clock
        self.addCleanup(memory.stop)
        return memory
