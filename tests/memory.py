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

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import hiredis
import txaio
import txredisapi
from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SynchronousTestCase

from wsproxy.session.auth import CHECK_SCRIPT, CHECK_SHA
from wsproxy.config import Settings
from wsproxy.names import auth_key
from wsproxy.session.proxy import Proxy
from wsproxy.redis.redislink import ConnectFailures, RedisUnavailable
from wsproxy.edge.site import ProxySite

# -- Redis -------------------------------------------------------------------


class Command:
    """
    One command as the fake Redis received it, and the way to answer it.
    """

    def __init__(self, link: "FakeLink", args: tuple[Any, ...],
                 reply: Callable[[Any], None]) -> None:
        self.link = link
        self.args = args
        self._reply = reply
        self.answered = False

    @property
    def name(self) -> str:
        return str(self.args[0])

    def answer(self, result: Any) -> None:
        """
        Answer with C{result}, or fail with it if it is an exception.
        """
        if not self.answered:
            self.answered = True
            self._reply(result)

    def __repr__(self) -> str:
        return f"<Command {self.link.name} {self.args!r}>"


class FakeRedis:
    """
    The Redis server the fake links talk to.

    Commands are answered at once unless held: L{hold} holds every
    command with that name from now on, and, as on a real connection,
    every later command on the same link waits behind it (replies come in
    order), until L{release}. L{fail} makes every command with that name
    answer with an error.

    @ivar data: keys and their values.
    @ivar ttl: keys and the TTL last set on them.
    @ivar log: every command received, from both links, in order.
    @ivar published: (channel, payload) of every PUBLISH, in order.
    @ivar scripts: the SHA-1s of the scripts Redis has cached; the token
        check's (L{wsproxy.session.auth.CHECK_SCRIPT}, the only script it runs) from
        the start, as after its first C{EVAL} (clear it: C{NOSCRIPT}).
    """

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int] = {}
        self.log: list[Command] = []
        self.published: list[tuple[bytes, bytes]] = []
        #: stream key -> [(entry id, {field: value})] of every XADD
        self.streams: dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self.scripts: set[str] = {CHECK_SHA}
        self._holding: set[str] = set()
        self._errors: dict[str, Exception] = {}
        self._links: list[FakeLink] = []

    # -- what a test sets up and asks --------------------------------------

    def authorize(self, session_id: str, token: str, ttl: int = 60) -> None:
        """
        What the backend does: C{SETEX session:{id}:auth ttl token}.
        """
        key = auth_key(session_id)
        self.data[key] = token.encode()
        self.ttl[key] = ttl

    def hold(self, *names: str) -> None:
        """
        Hold back the replies to commands with these names, and to every
        command after them on the same link, until L{release}.
        """
        self._holding.update(names)

    def release(self, *names: str) -> None:
        """
        Stop holding these names (all, if none are given); answer what no
        longer waits behind a held command, in order.
        """
        if names:
            self._holding.difference_update(names)
        else:
            self._holding.clear()
        for link in self._links:
            link.drain()

    def fail(self, name: str, exception: Exception) -> None:
        """
        Answer every command called C{name} with C{exception}.
        """
        self._errors[name] = exception

    def sent(self, *names: str) -> list[tuple[Any, ...]]:
        """
        The arguments of every command received with one of these names
        (but the process's own channels, C{wsproxy:*}: control, canary).
        """
        return [
            c.args for c in self.log
            if c.name in names and not str(c.args[1] if len(c.args) > 1 else "").startswith(
                "wsproxy:"
            )
        ]

    def publish(self, channel: str, payload: bytes) -> int:
        """
        What the backend does: C{PUBLISH channel payload}; delivered at once
        to every link subscribed to it.

        @return: the number of links it was delivered to.
        """
        return self._deliver(channel.encode(), payload)

    # -- what the links do ---------------------------------------------------

    def attach(self, link: "FakeLink") -> None:
        self._links.append(link)

    def holds(self, name: str) -> bool:
        return name in self._holding

    def execute(self, command: Command) -> None:
        """
        Carry out one command and answer it.
        """
        name, args = command.name, command.args[1:]
        if name in self._errors:
            command.answer(self._errors[name])
            return
        link = command.link
        if name == "GET":
            command.answer(self.data.get(args[0]))
        elif name == "EXPIRE":
            key, seconds = args
            if key in self.data:
                self.ttl[key] = int(seconds)
                command.answer(1)
            else:
                command.answer(0)
        elif name in ("EVALSHA", "EVAL"):
            command.answer(self._check_script(name, *args))
        elif name == "PING":
            command.answer(b"PONG")
        elif name == "PUBLISH":
            channel, payload = args
            self.published.append((channel, payload))
            command.answer(self._deliver(channel, payload))
        elif name == "XADD":
            # XADD key MAXLEN ~ n * field value ...
            entries = self.streams.setdefault(args[0], [])
            entry_id = b"%d-0" % (len(entries) + 1)
            fields = dict(zip(args[5::2], args[6::2]))
            entries.append((entry_id, fields))
            command.answer(entry_id)
        elif name == "SUBSCRIBE":
            link.channels.add(args[0])
            command.answer([b"subscribe", args[0].encode(), len(link.channels)])
        elif name == "UNSUBSCRIBE":
            link.channels.discard(args[0])
            command.answer([b"unsubscribe", args[0].encode(), len(link.channels)])
        else:
            command.answer(txredisapi.ResponseError(f"ERR unknown command {name!r}"))

    def _check_script(self, name: str, script: str, numkeys: int, key: str, digest: str,
                      grace: int) -> Any:
        """
        What L{wsproxy.session.auth.CHECK_SCRIPT} does, run by C{EVAL} or (cached)
        C{EVALSHA}.
        """
        if name == "EVAL":
            assert script == CHECK_SCRIPT
            self.scripts.add(hashlib.sha1(script.encode()).hexdigest())
        elif script not in self.scripts:
            return txredisapi.ResponseError("NOSCRIPT No matching script. Please use EVAL.")
        assert int(numkeys) == 1
        stored = self.data.get(key)
        if stored is None:
            return 0
        if hashlib.sha1(stored).hexdigest() != digest:
            return -1
        self.ttl[key] = int(grace)
        return 1

    def _deliver(self, channel: bytes, payload: bytes) -> int:
        receivers = 0
        for link in self._links:
            if link.ready is not None and channel.decode() in link.channels:
                receivers += 1
                link.on_message(channel, payload)
        return receivers


class _Connection:
    """
    Stands in for the link's connected protocol: L{Proxy} registers its
    upstream valve as the producer of C{transport}.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()


class FakeLink:
    """
    The interface L{Proxy} and L{Hub} use of a
    L{wsproxy.redis.redislink.RedisLink}, on a L{FakeRedis}.

    L{start} connects at once; L{lose} and L{connect} make the connection
    go and come back. Commands sent while not connected fail at once with
    L{RedisUnavailable}, and those waiting for a reply fail with it when
    the connection is lost, as with the real link.
    """

    def __init__(self, name: str, redis: FakeRedis, clock: Clock) -> None:
        self.name = name
        self.redis = redis
        self.ready: Any = None
        self.on_ready: Callable[[Any], None] = lambda proto: None
        self.on_lost: Callable[[], None] = lambda: None
        self.on_message: Callable[[bytes, bytes], None] = lambda c, m: None
        self.reconnects = 0
        self.failures = ConnectFailures(clock, "memory")
        #: channels this (subscriber) link is subscribed to in Redis
        self.channels: set[str] = set()
        #: commands waiting for their reply, oldest first
        self.queue: list[Command] = []
        self.sweeps = self.kills = 0
        self._ever_ready = False
        redis.attach(self)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.connect()

    def stop(self) -> defer.Deferred:
        if self.ready is not None:
            self.lose()
        return defer.succeed(None)

    def sweep(self) -> None:
        self.sweeps += 1

    def kill(self) -> None:
        self.kills += 1
        self.lose()

    def connect(self) -> None:
        """
        A connection becomes usable.
        """
        if self._ever_ready:
            self.reconnects += 1
        self._ever_ready = True
        self.ready = _Connection()
        self.on_ready(self.ready)

    def lose(self) -> None:
        """
        The connection is lost: what waits for a reply fails.
        """
        self.ready = None
        self.channels.clear()
        queue, self.queue = self.queue, []
        for command in queue:
            command.answer(RedisUnavailable(f"redis {self.name} connection lost"))
        self.on_lost()

    # -- commands ------------------------------------------------------------

    def execute(self, *args: Any) -> defer.Deferred:
        if self.ready is None:
            return defer.fail(RedisUnavailable("not connected"))
        d: defer.Deferred = defer.Deferred()

        def reply(result: Any) -> None:
            if d.called:
                return  # cancelled meanwhile
            if isinstance(result, BaseException):
                d.errback(Failure(result))
            else:
                d.callback(result)

        self._send(args, reply)
        return d

    def send(self, on_reply: Callable[[Any], None], *args: bytes) -> None:
        """
        The lean path (L{wsproxy.redis.redislink.RedisLink.send}): the reply, or
        the exception, goes to C{on_reply}; arguments are logged as text.
        """
        if self.ready is None:
            on_reply(RedisUnavailable("not connected"))
            return
        self._send(tuple(a.decode() if isinstance(a, bytes) else a for a in args), on_reply)

    def publish(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        if self.ready is None:
            on_reply(RedisUnavailable("not connected"))
            return
        self._send(("PUBLISH", channel, payload), on_reply)

    def send_encoded(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        if self.ready is None:
            on_reply(RedisUnavailable("not connected"))
            return
        reader = hiredis.Reader()
        reader.feed(command)
        args = reader.gets()
        self._send((args[0].decode(), *args[1:]), on_reply)

    def subscribe(self, channel: str) -> defer.Deferred:
        return self.execute("SUBSCRIBE", channel)

    def unsubscribe(self, channel: str) -> defer.Deferred:
        if self.ready is None:
            return defer.succeed(None)
        return self.execute("UNSUBSCRIBE", channel)

    def _send(self, args: tuple[Any, ...], reply: Callable[[Any], None]) -> None:
        command = Command(self, args, reply)
        self.redis.log.append(command)
        if self.queue or self.redis.holds(command.name):
            self.queue.append(command)
        else:
            self.redis.execute(command)

    def drain(self) -> None:
        """
        Answer the commands waiting, in order, unless one is held again.
        """
        while self.queue and not self.redis.holds(self.queue[0].name):
            self.redis.execute(self.queue.pop(0))


# -- the client's side of a connection ---------------------------------------

#: WebSocket opcodes
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: the Sec-WebSocket-Key every upgrade request sends, and its accept value
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade_request(path: str, headers: Optional[dict[str, str]] = None) -> bytes:
    """
    A valid WebSocket upgrade request for C{path} with extra C{headers}.
    """
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: proxy.example",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


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


def client_frame(payload: bytes, opcode: int = TEXT, fin: bool = True,
                 mask: bytes = b"\x5a\x0f\xc3\x81") -> bytes:
    """
    One masked frame, as a client must send it (RFC 6455 section 5.2).
    """
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


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
