"""
HTTP and raw sockets: L{upgrade_request} (the one valid upgrade request
the tests start from), L{status_of}, L{raw_exchange} (send bytes, collect
the answer), L{RawClient} and L{raw_upgrade} (a client that speaks raw
bytes after the handshake), L{http_get}, L{attempt} (an upgrade from a
chosen source address), L{stalled_socket} and L{stalled_upgrade} (a reader
that stops reading)
and L{tls_endpoint}.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from .base import wait_for
from .frames import close_of, parse_frames

#: the Sec-WebSocket-Key every upgrade request sends, and its accept value
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


def raw_exchange(
    port: int, data: bytes, close_after: Optional[float] = None, endpoint: Any = None
) -> defer.Deferred:
    """
    Send C{data} over a fresh TCP connection (or C{endpoint}, e.g. TLS);
    fires with everything the server sent until it closed the connection
    (or C{close_after} seconds).
    """
    if endpoint is None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    proto = _Collect()
    d = endpoint.connect(protocol.Factory.forProtocol(lambda: proto))

    def connected(p: Any) -> defer.Deferred:
        p.transport.write(data)
        if close_after is not None:
            timer = reactor.callLater(close_after, p.transport.loseConnection)
            proto.done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return proto.done

    return d.addCallback(connected)




def upgrade_request(path: str, headers: Optional[dict[str, str]] = None,
                    host: str = "127.0.0.1") -> bytes:
    """
    A valid WebSocket upgrade request for C{path} with extra C{headers}
    (C{Host: host}; the in-memory tests name C{proxy.example}).
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


class RawClient(protocol.Protocol):
    """
    A TCP client that records everything the server sends, when it
    connected and when the connection ended.
    """

    def __init__(self) -> None:
        self.data = b""
        self.connected_at = 0.0
        self.lost_at: Optional[float] = None
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_at = time.monotonic()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost_at = time.monotonic()
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    @property
    def head(self) -> Optional[bytes]:
        """
        The HTTP response head, once complete.
        """
        head, sep, _ = self.data.partition(b"\r\n\r\n")
        return head if sep else None

    @property
    def status(self) -> Optional[int]:
        head = self.head
        return None if head is None else status_of(head)

    def frames(self) -> list[tuple[bool, int, int, bytes]]:
        _, _, rest = self.data.partition(b"\r\n\r\n")
        return parse_frames(rest)[0]

    def close_code(self) -> Optional[tuple[int, bytes]]:
        return close_of(self.frames())

    def abort(self) -> None:
        if self.lost_at is None:
            self.transport.abortConnection()

    def close(self) -> defer.Deferred:
        if self.lost_at is None:
            self.transport.loseConnection()
        return self.lost


async def open_raw(port: int) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await endpoint.connect(protocol.Factory.forProtocol(RawClient))


async def raw_upgrade(port: int, path: str, headers: Optional[dict[str, str]] = None,
                      timeout: float = 10.0) -> RawClient:
    """
    A raw client that sent an upgrade request and has the complete
    response head.
    """
    c = await open_raw(port)
    c.send(upgrade_request(path, headers))
    await wait_for(lambda: c.head is not None or c.lost_at is not None, timeout)
    return c


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    response = await raw_exchange(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    return status_of(response), response.partition(b"\r\n\r\n")[2]


async def attempt(port: int, source: str, token: Optional[str], session: str = "s1",
                  extra: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
    """
    One raw upgrade to 127.0.0.1:C{port} from the client address
    C{source} (127.0.0.2, ...): its status and response head.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    client: RawClient = await endpoint.connect(protocol.Factory.forProtocol(RawClient))
    fields = dict(extra or {})
    if token is not None:
        fields["Authorization"] = f"Bearer {token}"
    client.send(upgrade_request(f"/a/ws/{session}", fields))
    await wait_for(lambda: client.head is not None or client.lost_at is not None, 20)
    client.transport.abortConnection()
    head = client.head or b""
    return status_of(head), head


def stalled_socket(port: int, path: str, token: str) -> socket.socket:
    """
    A plain socket with a tiny receive buffer that sends an upgrade request;
    the caller reads the response head and then nothing more.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(upgrade_request(path, {"Authorization": f"Bearer {token}"}))
    s.setblocking(False)
    return s


async def stalled_upgrade(test: Any, port: int, path: str, token: str) -> tuple[socket.socket, bytes]:
    """
    A L{stalled_socket}, closed at C{test}'s clean-up, once its response
    head is in: the socket, and what it read (the head, and perhaps frames
    behind it). From here on nothing reads it unless the test does.
    """
    s = stalled_socket(port, path, token)
    test.addCleanup(s.close)
    received = [b""]

    def head_in() -> bool:
        try:
            received[0] += s.recv(4096)
        except BlockingIOError:
            pass
        return b"\r\n\r\n" in received[0]

    await wait_for(head_in)
    return s, received[0]


def tls_endpoint(port: int, trust_file: str, hostname: str = "localhost") -> Any:
    with open(trust_file, "rb") as f:
        trust = ssl.Certificate.loadPEM(f.read())
    return wrapClientTLS(
        ssl.optionsForClientTLS(hostname, trustRoot=trust),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
    )
