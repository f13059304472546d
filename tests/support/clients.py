"""
WebSocket clients (Autobahn) over real sockets: L{connect} opens one and
fires with a L{Client} that records messages and the close;
L{up_listener} watches what a session publishes upstream;
L{BackendListener} runs a blocking listener of L{wsproxy.backend} in a
thread;
L{exchange_messages} checks one message each way; L{EventLog} reads the
events the proxy publishes; L{Received} reads what a resuming client was
sent.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Iterator, Optional

import redis as redispy
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from .base import wait_for


class Client(WebSocketClientProtocol):
    """
    A WebSocket client that records messages and the close.
    """

    def onOpen(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.close_code = code
        self.close_reason = reason
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {reason}"))
        self.factory.closed.callback((code, reason))

    def wait_messages(self, n: int, timeout: float = 10.0) -> defer.Deferred:
        return wait_for(lambda: len(self.messages) >= n, timeout)

    def close_and_wait(self) -> defer.Deferred:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        return self.factory.closed


def connect(
    url: str,
    token: Optional[str] = None,
    protocols: Optional[list[str]] = None,
    headers: Optional[dict[str, str]] = None,
    auto_ping: bool = True,
    compression_offers: Optional[list[Any]] = None,
    endpoint: Any = None,
) -> defer.Deferred:
    """
    Open a WebSocket (over C{endpoint} if given, e.g. TLS); fires with the
    L{Client} once open.
    """
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    factory = WebSocketClientFactory(url, protocols=protocols, headers=all_headers)
    factory.protocol = Client
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0,
                               autoPingInterval=0, closeHandshakeTimeout=5)
    if compression_offers:
        from autobahn.websocket.compress import PerMessageDeflateResponseAccept

        factory.setProtocolOptions(
            perMessageCompressionOffers=compression_offers,
            perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response),
        )
    if not auto_ping:
        # answer no pings: the client looks dead to the server
        factory.protocol = type("DeafClient", (Client,), {"onPing": lambda self, p: None})
    if endpoint is None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", factory.port)
    d = endpoint.connect(factory)
    d.addCallback(lambda proto: factory.opened)
    return d


def up_listener(r: redispy.Redis, session: str, test: Any) -> Callable[[], list[bytes]]:
    """
    Subscribe to C{session:{session}:up}; the returned function gives every
    payload received so far.
    """
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"session:{session}:up")
    pubsub.get_message(timeout=1)
    test.addCleanup(pubsub.close)
    return collector(pubsub.get_message)


def collector(get_message: Callable[..., Optional[dict[str, Any]]]) -> Callable[[], list[bytes]]:
    """
    What a redis-py Pub/Sub reader's C{get_message} (or
    C{get_sharded_message}) has delivered: the returned function reads
    whatever arrived since it was last called and gives every payload so
    far.
    """
    received: list[bytes] = []

    def poll() -> list[bytes]:
        while True:
            message = get_message(timeout=0)
            if message is None:
                return received
            received.append(message["data"])

    return poll


class BackendListener:
    """
    A blocking iterator of L{wsproxy.backend} (C{listen_up},
    C{listen_events}) run to its end in a daemon thread: what it yielded
    is in C{received}, what it raised in C{error}. The iterator cannot be
    stopped from outside while it waits; give it a short C{reconnect_for},
    and it ends (raising) soon after the test's Redis is gone, and a
    daemon thread never holds up the test run.
    """

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.received: list[Any] = []
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self.thread.start()

    def _run(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                self.received.append(item)
        except BaseException as e:
            self.error = e


async def exchange_messages(test: Any, r: redispy.Redis, url: str, session: str,
                            token: str = "tok", endpoint: Any = None) -> None:
    """
    A client whose token is already stored connects to C{url}, receives a
    message published on C{:down}, and its own message arrives on C{:up}.
    """
    received = up_listener(r, session, test)
    c = await connect(url, token=token, endpoint=endpoint)
    test.addCleanup(c.close_and_wait)
    r.publish(f"session:{session}:down", "down-msg")
    await c.wait_messages(1)
    test.assertEqual(c.messages, [(b"down-msg", False)])
    c.sendMessage(b"up-msg")
    await wait_for(lambda: received() == [b"up-msg"])


class Received:
    """
    What a resuming client was sent: data messages (position, message,
    binary) and control events, in order.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def parsed(self) -> list[tuple[str, Any, bool]]:
        out: list[tuple[str, Any, bool]] = []
        for payload, binary in self.client.messages:
            if payload.startswith(b"!") and not binary:
                out.append(("control", json.loads(payload[1:]), False))
            else:
                position, _, message = payload.partition(b"\n")
                out.append((position.decode(), message, binary))
        return out

    def data(self) -> list[tuple[str, bytes, bool]]:
        return [item for item in self.parsed() if item[0] != "control"]

    def controls(self) -> list[dict[str, Any]]:
        return [item[1] for item in self.parsed() if item[0] == "control"]

    def messages(self) -> list[bytes]:
        return [message for _, message, _ in self.data()]

    def last_position(self) -> str:
        positions = [p for p, _, _ in self.data() if p]
        if positions:
            return positions[-1]
        return self.controls()[0]["position"] or ""


class EventLog:
    """
    Every event published on wsproxy:events, as parsed JSON.
    """

    def __init__(self, r: redispy.Redis, test: Any) -> None:
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe("wsproxy:events")
        self.pubsub.get_message(timeout=1)
        test.addCleanup(self.pubsub.close)
        self.events: list[dict[str, Any]] = []

    def __call__(self) -> list[dict[str, Any]]:
        while True:
            message = self.pubsub.get_message(timeout=0)
            if message is None:
                return self.events
            self.events.append(json.loads(message["data"]))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self() if e["event"] == kind]
