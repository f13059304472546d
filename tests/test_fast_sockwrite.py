"""
Writing frames straight to a client's socket (L{wsproxy.fast.sockwrite}), with
real sockets over loopback: written at once when nothing waits, the rest
handed to the transport (partial writes, a full socket, a reset one) in
order and with its producer told, TLS left to the transport, frames held
while a Redis read is dispatched and sent with one write; and through the
proxy, a close that follows a message in the same read reaches the client
after it. The tests named after the invariants of the module's docstring
pin those.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Optional

from twisted.internet import defer, protocol, reactor, ssl, task, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from wsproxy.redis import redislink
from wsproxy.fast import sockwrite
from wsproxy.fast.sockwrite import BATCH, Batch, Pending, TurnPending, plain_socket, write_now

from .certs import CertDir, self_signed
from .memory import client_frame
from .support import (
    RedisTestCase,
    RunningProxy,
    connect,
    settings_for,
    start_proxy,
    up_listener,
    wait_for,
)


class _Server(protocol.Protocol):
    def connectionMade(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.connected.callback(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class _Peer:
    """
    The client end: a plain non-blocking socket, read only when asked.
    """

    def __init__(self, port: int, receive_buffer: Optional[int] = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.received = b""

    def read(self) -> bytes:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return self.received
            if not data:
                return self.received
            self.received += data

    def reset(self) -> None:
        """
        Close with a TCP reset (SO_LINGER 0): the next send fails.
        """
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class SocketTestCase(TestCase):
    timeout = 30

    async def pair(self, endpoint: str = "tcp:0:interface=127.0.0.1",
                   receive_buffer: Optional[int] = None) -> tuple[Any, _Server, _Peer]:
        """
        A server transport (accepted by this process's reactor) and its peer.
        """
        factory = protocol.Factory.forProtocol(_Server)
        factory.connected = defer.Deferred()  # type: ignore[attr-defined]
        port = await serverFromString(reactor, endpoint).listen(factory)
        self.addCleanup(port.stopListening)
        peer = _Peer(port.getHost().port, receive_buffer)
        self.addCleanup(peer.sock.close)
        server: _Server = await factory.connected  # type: ignore[attr-defined]
        self.addCleanup(lambda: server.transport.abortConnection()
                        if server.transport is not None else None)
        return server.transport, server, peer


class WriteNowTests(SocketTestCase):
    async def test_written_at_once(self) -> None:
        """
        With nothing buffered, the bytes are sent by the call itself: the
        transport buffers nothing and is not registered for writing.
        """
        transport, _, peer = await self.pair()
        self.assertIs(plain_socket(transport), transport)
        write_now(transport, b"hello")
        self.assertFalse(transport.dataBuffer or transport._tempDataBuffer)
        self.assertNotIn(transport, reactor.getWriters())
        await wait_for(lambda: peer.read() == b"hello")

    async def test_never_overtakes_the_transports_buffer(self) -> None:
        """
        What the socket does not take goes to the transport: counted
        against its bufferSize (its producer is paused), sent later, and
        anything written meanwhile follows it, through the transport too.
        """
        transport, _, peer = await self.pair(receive_buffer=4096)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        producer = _Producer()
        transport.registerProducer(producer, True)
        big = bytes(range(256)) * 4096  # 1 MiB
        write_now(transport, big)
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        self.assertGreater(buffered, 0)
        self.assertLess(buffered, len(big))
        self.assertTrue(producer.paused)
        write_now(transport, b"tail")
        self.assertEqual(len(transport.dataBuffer) + transport._tempDataLen, buffered + 4)
        await wait_for(lambda: len(peer.read()) == len(big) + 4, timeout=20)
        self.assertEqual(peer.received, big + b"tail")
        await wait_for(lambda: not producer.paused)

    async def test_full_socket(self) -> None:
        """
        A socket that takes nothing now (EAGAIN) leaves everything to the
        transport, without an error.
        """
        transport, _, peer = await self.pair(receive_buffer=4096)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        filled = b""
        chunk = b"x" * 4096
        while True:
            try:
                filled += chunk[: transport.socket.send(chunk)]
            except BlockingIOError:
                break
        write_now(transport, b"after")
        self.assertEqual(transport._tempDataBuffer, [b"after"])
        await wait_for(lambda: len(peer.read()) == len(filled) + 5, timeout=20)
        self.assertEqual(peer.received, filled + b"after")

    async def test_reset_socket(self) -> None:
        """
        A send that fails (the peer reset the connection) raises nothing:
        the transport meets the error and the connection is lost the usual
        way; writing to a lost connection does nothing.
        """
        transport, server, peer = await self.pair()
        peer.reset()
        write_now(transport, b"x" * 100)
        write_now(transport, b"y" * 100)
        await server.lost
        write_now(transport, b"z")

    async def test_never_past_a_closing_connection(self) -> None:
        """
        Once abortConnection was called, write_now sends nothing (Twisted's
        own write drops what is written then): neither a frame written
        directly nor the command connection's writes held for the end of
        the turn (TurnPending flushes after the deadline sweep aborted the
        connection must not reach Redis). The peer sees the connection end
        with none of those bytes. After loseConnection, what is written is
        buffered by the transport and sent before the close, as Twisted
        does. (TLS: test_tls_untouched.)
        """
        closing, closing_server, closing_peer = await self.pair()
        closing.loseConnection()
        write_now(closing, b"before the close")
        self.assertEqual(closing._tempDataBuffer, [b"before the close"])
        await closing_server.lost
        await wait_for(lambda: closing_peer.read() == b"before the close")

        transport, server, peer = await self.pair()
        held = TurnPending(transport, reactor)
        held.send(b"PUBLISH late")
        transport.abortConnection()
        write_now(transport, b"after abort")
        await server.lost
        try:
            peer.read()
        except ConnectionResetError:
            pass  # an aborted connection may end with a reset
        self.assertEqual(peer.received, b"")

    async def test_tls_untouched(self) -> None:
        """
        A TLS connection is never written to directly: plain_socket says no
        (a TLS endpoint's connection, or a TCP one that started TLS), and
        write_now leaves the bytes to the TLS layer of a TCP connection
        that started TLS.
        """
        certs = CertDir()
        self.addCleanup(certs.cleanup)
        cert, key = self_signed(certs, "server", ["127.0.0.1"])
        tls, _, _ = await self.pair(
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        )
        self.assertIsNone(plain_socket(tls))
        transport, _, peer = await self.pair()
        with open(cert) as c, open(key) as k:
            pem = c.read() + k.read()
        transport.startTLS(ssl.PrivateCertificate.loadPEM(pem).options())
        self.assertIsNone(plain_socket(transport))
        sent: list[bytes] = []
        transport.socket = _RecordingSocket(transport.socket, sent)
        self.addCleanup(setattr, transport, "socket", transport.socket._sock)
        written: list[bytes] = []
        transport.protocol.write = written.append
        write_now(transport, b"secret")
        self.assertEqual((written, sent), ([b"secret"], []))


class _Failing:
    def flush(self) -> None:
        raise RuntimeError("boom")


class BatchTests(SocketTestCase):
    async def test_held_while_a_read_is_dispatched(self) -> None:
        """
        While a batch is held (however deeply), a connection's frames are
        kept; when it is released they are sent in order with one write.
        Outside a batch they are sent at once.
        """
        transport, _, peer = await self.pair()
        batch = Batch()
        out = Pending(transport, batch)
        batch.hold()
        out.send(b"a")
        batch.hold()
        out.send(b"b")
        batch.release()
        self.assertEqual(out.frames, [b"a", b"b"])
        self.assertEqual(batch.waiting, [out])
        sent: list[bytes] = []
        transport.socket = _RecordingSocket(transport.socket, sent)
        self.addCleanup(setattr, transport, "socket", transport.socket._sock)
        batch.release()
        self.assertEqual(sent, [b"ab"])
        self.assertEqual((out.frames, batch.waiting, batch.held), ([], [], 0))
        out.send(b"c")
        self.assertEqual(sent, [b"ab", b"c"])
        await wait_for(lambda: peer.read() == b"abc")
        # connections flush in the order they first kept a frame
        other, _, _ = await self.pair()
        first, second = Pending(other, batch), Pending(transport, batch)
        batch.hold()
        second.send(b"d")
        first.send(b"e")
        second.send(b"f")
        self.assertEqual(batch.waiting, [second, first])
        batch.release()
        self.assertEqual(sent[-1], b"df")

    async def test_commands_held_for_the_turn(self) -> None:
        """
        The command connection's writes are held until the reactor's turn
        ends, then sent with one write; the next turn's likewise.
        """
        transport, _, peer = await self.pair()
        sent: list[bytes] = []
        transport.socket = _RecordingSocket(transport.socket, sent)
        self.addCleanup(setattr, transport, "socket", transport.socket._sock)
        out = TurnPending(transport, reactor)
        out.send(b"a")
        out.send(b"b")
        self.assertEqual(sent, [])
        await task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(sent, [b"ab"])
        out.send(b"c")
        await task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(sent, [b"ab", b"c"])
        await wait_for(lambda: peer.read() == b"abc")

    async def test_a_lost_connection_loses_its_held_writes_and_only_its_own(self) -> None:
        """
        Frames kept for a connection that is aborted before the batch ends
        are dropped with it (nothing raised, nothing sent); another
        connection's kept frames are still sent at release.
        """
        lost, lost_server, lost_peer = await self.pair()
        kept, _, kept_peer = await self.pair()
        batch = Batch()
        doomed, alive = Pending(lost, batch), Pending(kept, batch)
        batch.hold()
        doomed.send(b"never")
        alive.send(b"still")
        lost.abortConnection()
        await lost_server.lost
        batch.release()
        await wait_for(lambda: kept_peer.read() == b"still")
        try:
            lost_peer.read()
        except ConnectionResetError:
            pass
        self.assertEqual(lost_peer.received, b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failing_flush_contained(self) -> None:
        """
        A connection whose flush raises is logged; the others are flushed.
        """
        batch = Batch()
        flushed: list[str] = []

        class _Ok:
            def flush(self) -> None:
                flushed.append("ok")

        batch.hold()
        batch.waiting.extend([_Failing(), _Ok()])
        batch.release()
        self.assertEqual(flushed, ["ok"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_every_invariant_has_its_test(self) -> None:
        """
        Each invariant the module's docstring names (I{...}) has a test of
        the same name in this module.
        """
        import re

        names = re.findall(r"I\{([^}]+)\}", sockwrite.__doc__ or "")
        self.assertEqual(len(names), 6)
        tests = {name for cls in (WriteNowTests, BatchTests, ProxyOrderTests)
                 for name in dir(cls) if name.startswith("test_")}
        for name in names:
            test = "test_" + re.sub(r"[^a-z]+", "_", name.replace("'", "")).strip("_")
            self.assertIn(test, tests, name)

    def test_process_batch(self) -> None:
        """
        The subscriber connections hold the process's one batch.
        """
        self.assertIsInstance(sockwrite.BATCH, Batch)


class _RecordingSocket:
    """
    A socket whose sends are recorded (and made).
    """

    def __init__(self, sock: socket.socket, sent: list[bytes]) -> None:
        self._sock = sock
        self._sent = sent

    def send(self, data: bytes) -> int:
        self._sent.append(bytes(data))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def open_session(test: RedisTestCase) -> tuple[RunningProxy, Any]:
    """
    A proxy on C{test}'s Redis and a client open on its session C{s1}
    (stopped and closed after the test).
    """
    proxy = RunningProxy(settings_for(test.redis.url))
    test.addCleanup(proxy.stop)
    await proxy.ready()
    test.r.set("session:s1:auth", "tok", ex=300)
    client = await connect(proxy.url("s1"), token="tok")
    test.addCleanup(client.close_and_wait)
    return proxy, client


class ProxyOrderTests(RedisTestCase):
    timeout = 60

    async def test_kept_frames_stay_ahead(self) -> None:
        """
        A backend message and a close request for the same session sent
        together (one Redis read): the message is kept for the end of the
        read, Autobahn's close frame (sendData) flushes it first, so the
        client gets the message, then the close; and the message was
        written to its socket by the proxy itself (a plain TCP connection).
        """
        proxy, client = await open_session(self)
        (opened,) = [c for c in proxy.proxy.connections]
        self.assertIsNotNone(opened._out)
        pipe = self.r.pipeline(transaction=False)
        pipe.publish("session:s1:down", b"first")
        pipe.publish("session:s1:down", b"second")
        pipe.execute()
        await client.wait_messages(2)
        pipe = self.r.pipeline(transaction=True)
        pipe.publish("session:s1:down", b"last words")
        pipe.publish("wsproxy:control", b'{"close": "s1", "code": 4001, "reason": "bye"}')
        pipe.execute()
        self.assertEqual(await client.factory.closed, (4001, "bye"))
        self.assertEqual(
            client.messages, [(b"first", False), (b"second", False), (b"last words", False)]
        )


class ReadIntoTests(RedisTestCase):
    timeout = 60

    async def test_redis_reads_into_a_reused_buffer(self) -> None:
        """
        On plain TCP both Redis connections read into a buffer of their
        own (a new 4 MiB buffer per read costs three system calls): replies
        and messages larger than the buffer arrive whole, the command
        connection keeps its large write buffer for the upstream valve, and
        the reader is dropped with the connection.
        """
        proxy = start_proxy(self, self.redis.url)
        await proxy.ready()
        commands = proxy.proxy.commands.ready
        subscriber = proxy.proxy.hub._link.ready
        transport = commands.transport
        self.assertEqual(transport.bufferSize, redislink.TRANSPORT_BUFFER_SIZE)
        self.assertIn("doRead", transport.__dict__)
        self.assertIn("doRead", subscriber.transport.__dict__)
        value = bytes(range(256)) * 1024 * 5  # 1.25 MiB, 20 command reads
        self.r.set("big", value)
        self.assertEqual(await proxy.proxy.commands.execute("GET", "big"), value)
        self.r.set("session:s1:auth", "tok", ex=300)
        client = await connect(proxy.url("s1"), token="tok")
        self.addCleanup(client.close_and_wait)
        large = b"x" * (5 << 20)  # more than one subscriber read
        self.r.publish("session:s1:down", large)
        self.r.publish("session:s1:down", b"small")
        await client.wait_messages(2)
        self.assertEqual(client.messages, [(large, False), (b"small", False)])
        proxy.proxy.commands.kill()
        await wait_for(lambda: proxy.proxy.commands.ready not in (None, commands))
        self.assertNotIn("doRead", transport.__dict__)


class CommandWriteTests(RedisTestCase):
    timeout = 60

    async def start(self) -> RunningProxy:
        proxy = start_proxy(self, self.redis.url)
        await proxy.ready()
        return proxy

    async def test_publishes_of_one_read_share_a_send(self) -> None:
        """
        The messages of one client read (one reactor turn) are PUBLISHed
        with one send on the command connection, written by the proxy
        itself, in order.
        """
        proxy = await self.start()
        up = up_listener(self.r, "s1", self)
        self.r.set("session:s1:auth", "tok", ex=300)
        client = await connect(proxy.url("s1"), token="tok")
        self.addCleanup(client.close_and_wait)
        transport = proxy.proxy.commands.ready.transport
        sent: list[bytes] = []
        transport.socket = _RecordingSocket(transport.socket, sent)
        self.addCleanup(setattr, transport, "socket", transport.socket._sock)
        client.transport.write(b"".join(client_frame(m) for m in (b"one", b"two", b"three")))
        await wait_for(lambda: len(up()) == 3)
        self.assertEqual(up(), [b"one", b"two", b"three"])
        publishes = [s for s in sent if b"PUBLISH" in s and b"session:s1:up" in s]
        self.assertEqual(len(publishes), 1, sent)
        self.assertEqual(publishes[0].count(b"PUBLISH"), 3)

    async def test_held_commands_before_txredisapi_ones(self) -> None:
        """
        A txredisapi command issued while lean commands are held is
        written after them, so every reply reaches its own caller.
        """
        proxy = await self.start()
        commands = proxy.proxy.commands
        replies: list[Any] = []
        BATCH.hold()
        try:
            commands.publish(b"c1", b"x", replies.append)
            pong = commands.execute("PING")
            commands.send(replies.append, b"ECHO", b"after")
        finally:
            BATCH.release()
        self.assertIn(await pong, (b"PONG", "PONG"))
        await wait_for(lambda: len(replies) == 2)
        self.assertEqual(replies, [0, b"after"])


class HandshakeWriteTests(RedisTestCase):
    timeout = 60

    async def test_101_written_by_the_proxy_itself(self) -> None:
        """
        On a plain TCP connection the 101 is sent to the socket by the
        proxy as soon as the admission is over (L{sockwrite.write_now}),
        not handed to the transport for the reactor's next pass; the
        client opens and receives as usual.
        """
        written: list[bytes] = []
        write = tcp.Connection.write

        def recording(transport: Any, data: bytes) -> None:
            written.append(bytes(data))
            write(transport, data)

        self.patch(tcp.Connection, "write", recording)
        proxy, client = await open_session(self)
        self.assertFalse([data for data in written if data.startswith(b"HTTP/1.1 101")])
        self.r.publish("session:s1:down", b"hello")
        await client.wait_messages(1)
        self.assertEqual(client.messages, [(b"hello", False)])
