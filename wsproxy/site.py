"""
HTTP on the proxy's port: the WebSocket route, C{/health}, C{/ready},
C{/metrics}, and plain-text errors for everything else.

No access log (it would print query strings, tokens included), no
C{Server} header, and an absolute deadline for a client to send its
request (slowloris clients are dropped).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Optional, Union

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .protocol import ProxyFactory
from .names import parse_ws_path
from .proxy import Proxy
from .refusal import Refusal


def _plain(request: Any, code: int, reason: str, headers: tuple = ()) -> bytes:
    request.setResponseCode(code, reason.encode())
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    for name, value in headers:
        request.setHeader(name.encode(), value.encode())
    return (reason + "\n").encode()


def _json(request: Any, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


#: what C{/metrics} serves: the Prometheus text, now or later
MetricsSource = Callable[[], Union[bytes, "defer.Deferred[bytes]"]]


#: bytes that str.splitlines() treats as line ends besides CR and LF
_LINE_BREAKS = re.compile(rb"[\x0b\x0c\x1c\x1d\x1e\x85]")


def _single_lines(request: Any) -> bool:
    for name, values in request.requestHeaders.getAllRawHeaders():
        if _LINE_BREAKS.search(name) or any(_LINE_BREAKS.search(v) for v in values):
            return False
    return not _LINE_BREAKS.search(request.uri)


class Root(resource.Resource):
    """
    Routes on the whole path, so that the WebSocket route is matched
    exactly (C{/{agent_id}/ws/{session_id}}) and nothing else is served.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, proxy: Proxy, factory: ProxyFactory, metrics: MetricsSource) -> None:
        super().__init__()
        self._proxy = proxy
        self._websocket = WebSocketResource(factory)
        self._metrics_source = metrics

    def render(self, request: Any) -> Any:
        request.responseHeaders.removeHeader(b"server")
        path = request.path.decode("latin-1")
        if path in ("/health", "/ready", "/metrics"):
            if request.method not in (b"GET", b"HEAD"):
                return _plain(request, 405, "Method Not Allowed", (("Allow", "GET, HEAD"),))
            return getattr(self, "_" + path[1:])(request)
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade and not _single_lines(request):
            # Autobahn re-reads the request with str.splitlines(), which also
            # splits on these bytes: a header could be smuggled past any
            # filtering proxy in front of us
            request.channel.persistent = False
            return _plain(request, 400, "Invalid header")
        if upgrade:
            # a refused upgrade ends the connection (clients do not reuse it)
            request.channel.persistent = False
            request.setHeader(b"connection", b"close")
        if parse_ws_path(path) is None:
            return _plain(request, 404, "Not Found")
        # everything else about an upgrade (session id, origin, token) is
        # decided by its admission (wsproxy.protocol, wsproxy.proxy)
        if request.method != b"GET" or b"websocket" not in upgrade.lower():
            return _plain(
                request, 426, "Upgrade Required",
                (("Upgrade", "websocket"), ("Connection", "Upgrade")),
            )
        # The WebSocket protocol takes the transport over; the HTTP
        # channel's idle timer must not fire on it later.
        request.channel.setTimeout(None)
        return self._websocket.render(request)

    def _health(self, request: Any) -> Any:
        finished = request.notifyFinish()
        finished.addErrback(lambda f: None)

        def answer(healthy: bool) -> None:
            if finished.called:
                return
            count = self._proxy.stats.open_connections
            # the pid says which process answered (with WORKERS, one of
            # several behind the same port)
            if healthy:
                body = _json(request, 200, {
                    "status": "healthy", "redis": "connected", "active_connections": count,
                    "pid": os.getpid(),
                })
            else:
                body = _json(request, 503, {
                    "status": "unhealthy", "redis": "disconnected",
                    "active_connections": count, "pid": os.getpid(),
                })
            request.write(body)
            request.finish()

        defer.ensureDeferred(self._proxy.healthy()).addCallback(answer)
        return server.NOT_DONE_YET

    def _ready(self, request: Any) -> bytes:
        if self._proxy.draining:
            return _json(request, 503, {"status": "draining"})
        return _json(request, 200, {"status": "ready"})

    def _metrics(self, request: Any) -> Any:
        finished = request.notifyFinish()
        finished.addErrback(lambda f: None)

        def answer(body: bytes) -> None:
            if finished.called:
                return
            request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            request.finish()

        def unavailable(reason: Any) -> None:
            self._log.error("metrics unavailable: {why}", why=reason.getErrorMessage())
            if not finished.called:
                request.write(_plain(request, 503, "Metrics unavailable"))
                request.finish()

        defer.maybeDeferred(self._metrics_source).addCallbacks(answer, unavailable)
        return server.NOT_DONE_YET


class _DeadlineChannel(http.HTTPChannel):
    """
    An HTTP channel with an absolute deadline for each request (head and body).
    """

    _log = Logger()
    head_deadline = 5.0
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._deadline = self.callLater(self.head_deadline, self._head_timeout)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def allContentReceived(self) -> None:
        # the deadline covers the whole request: a head that announces a
        # body and then trickles it in is a slowloris too
        self._disarm()
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line over 16 KiB (C{MAX_LENGTH}): Twisted
        would close without a word; answer 431 and ignore the rest.
        """
        self._disarm()
        if self.transport is None:
            return
        # read nothing more: the answer is final
        self.transport.pauseProducing()
        self._log.info("refused 431 request head too large: peer={peer}",
                       peer=self.transport.getPeer())
        self.transport.write(Refusal(431, "Request Header Fields Too Large").response())
        self.loseConnection()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.transport is not None and not self._deadline:
            self._arm()

    def _head_timeout(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self._log.info("dropped a client that did not send its request in {t:g}s: peer={peer}",
                           t=self.head_deadline, peer=self.transport.getPeer())
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)


class _Request(server.Request):
    """
    No route takes a request body: anything larger than a few KiB is
    refused with 413 instead of being buffered.
    """

    max_body = 64 * 1024

    def gotLength(self, length: Any) -> None:
        if length is not None and length > self.max_body:
            self.channel.persistent = False
            self.channel.transport.write(Refusal(413, "Content Too Large").response())
            self.channel.transport.loseConnection()
            length = 0
        super().gotLength(length)


class ProxySite(server.Site):
    """
    The proxy's HTTP site.

    @param metrics: what C{/metrics} serves; by default this process's
        counters (a worker passes the sum over all workers instead).
    """

    protocol = _DeadlineChannel
    requestFactory = _Request
    noisy = False

    def __init__(self, proxy: Proxy, metrics: Optional[MetricsSource] = None) -> None:
        self.proxy = proxy
        self.ws_factory = ProxyFactory(proxy)
        super().__init__(
            Root(proxy, self.ws_factory, metrics or proxy.stats.render), timeout=60
        )
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.head_deadline = self.proxy.settings.handshake_timeout
        channel.callLater = self.proxy.clock.callLater
        return channel

    def log(self, request: Any) -> None:
        """
        No access log: it would print query strings (access_token).
        """
