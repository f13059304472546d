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
from collections import deque
from typing import Any, Callable, Optional, Union, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.util import peer2str
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .protocol import ProxyFactory
from .names import parse_ws_path
from .proxy import Proxy
from .refusal import CLIENT_LEFT, Refusal, refusal_for


def _plain(
    request: server.Request, code: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    request.setResponseCode(code, reason.encode())
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    for name, value in headers:
        request.setHeader(name.encode(), value.encode())
    return (reason + "\n").encode()


def _json(request: server.Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode()


#: what C{/metrics} serves: the Prometheus text, now or later
MetricsSource = Callable[[], Union[bytes, "defer.Deferred[bytes]"]]


#: bytes that str.splitlines() treats as line ends besides CR and LF
_LINE_BREAKS = re.compile(rb"[\x0b\x0c\x1c\x1d\x1e\x85]")


def _single_lines(request: server.Request) -> bool:
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
        self._factory = factory
        self._websocket = WebSocketResource(factory)
        self._metrics_source = metrics

    def render(self, request: server.Request) -> bytes | int:
        request.responseHeaders.removeHeader(b"server")
        path = request.path.decode("latin-1")
        if path in ("/health", "/ready", "/metrics"):
            if request.method not in (b"GET", b"HEAD"):
                return _plain(request, 405, "Method Not Allowed", (("Allow", "GET, HEAD"),))
            if path == "/health":
                return self._health(request)
            if path == "/ready":
                return self._ready(request)
            return self._metrics(request)
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade and not _single_lines(request):
            # Autobahn re-reads the request with str.splitlines(), which also
            # splits on these bytes: a header could be smuggled past any
            # filtering proxy in front of us
            request.channel.persistent = False
            return _plain(request, 400, "Invalid header")
        if request.method == b"GET" and b"websocket" in upgrade.lower():
            # a refused upgrade ends the connection (clients do not reuse
            # it); everything about it (path, session id, origin, token) is
            # decided, counted and logged by its admission (wsproxy.protocol,
            # wsproxy.proxy)
            request.channel.persistent = False
            request.setHeader(b"connection", b"close")
            return self._upgrade(request)
        if parse_ws_path(path) is None:
            return _plain(request, 404, "Not Found")
        return _plain(
            request, 426, "Upgrade Required",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )

    def _upgrade(self, request: server.Request) -> bytes | int:
        peer = getattr(request.getClientAddress(), "host", None) or ""
        headers = request.requestHeaders

        def header(name: str) -> Optional[str]:
            values = headers.getRawHeaders(name)
            return ",".join(values) if values else None

        refusal = self._proxy.screen(peer, header)
        if refusal is not None:
            # limited: answered here, before Autobahn or Redis do any work
            agent_id, session_id = parse_ws_path(request.path.decode("latin-1")) or (None, None)
            transport: Any = request.channel.transport
            self._proxy.refused(
                refusal, self._proxy.client_address(peer, header), peer2str(transport),
                session_id, agent_id,
            )
            # the same complete response as every other refused upgrade;
            # the request is never finished: the connection ends with it
            transport.write(refusal.response())
            transport.loseConnection()
            return server.NOT_DONE_YET
        early = self._comparable(request)
        if early is not None:
            return self._compare_first(request, peer, header, *early)
        return self._to_websocket(request)

    def _comparable(self, request: server.Request) -> Optional[tuple[str, str, str]]:
        """
        Whether the token can be compared before the WebSocket handshake:
        one C{Authorization: Bearer} header with an ASCII token, a path and
        headers that pass L{Proxy.route} and L{Proxy.precheck}, no resume
        request. Anything else goes through the admission as it is (which
        refuses it, or checks its token there).

        @return: (session id, agent id, token), or C{None}.
        """
        headers = request.requestHeaders
        authorization = headers.getRawHeaders(b"authorization")
        origin = headers.getRawHeaders(b"origin")
        if (authorization is None or len(authorization) != 1 or b"resume" in request.uri
                or (origin is not None and len(origin) != 1) or not authorization[0].isascii()):
            return None
        scheme, _, value = authorization[0].decode("ascii").strip().partition(" ")
        token = value.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        proxy = self._proxy
        try:
            agent_id, session_id = proxy.route(request.path.decode("latin-1"))
            proxy.precheck({} if origin is None else {"origin": origin[0].decode("latin-1")})
        except Refusal:
            return None
        return session_id, agent_id, token

    def _compare_first(
        self, request: server.Request, peer: str, header: Callable[[str], Optional[str]],
        session_id: str, agent_id: str, token: str,
    ) -> int:
        """
        Compare the token with the stored one (one C{GET}) before Autobahn
        builds anything: a wrong token, or a Redis failure, is refused here
        for the cost of the HTTP parsing and the round trip; an equal one is
        handed over to the WebSocket admission, which only resets its TTL
        (within what is left of the same C{AUTH_TIMEOUT_SECS}).
        """
        proxy = self._proxy
        channel = cast(_DeadlineChannel, request.channel)
        channel.setTimeout(None)
        early = _EarlyBytes()
        channel.upgraded_to = early
        comparing = defer.ensureDeferred(proxy.compare(session_id, token))

        def left(reason: Failure) -> None:
            if not comparing.called:
                comparing.cancel()

        request.notifyFinish().addErrback(left)

        def too_late() -> None:
            # the handshake's deadline (HANDSHAKE_TIMEOUT_SECS) covers the
            # token check, as Autobahn's does for the admission: dropped
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()

        deadline = proxy.clock.callLater(proxy.settings.handshake_timeout, too_late)

        def disarm(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            return result

        comparing.addBoth(disarm)

        def equal(compared: Any) -> None:
            self._factory.compared = (session_id, token, compared)
            try:
                self._to_websocket(request, early)
            finally:
                self._factory.compared = None

        def refused(reason: Failure) -> None:
            transport: Any = channel.transport
            refusal = refusal_for(reason, self._log, "checking a token")
            client = proxy.client_address(peer, header)
            if refusal.code in (401, 403):
                proxy.auth_failed(client)
            proxy.refused(refusal, client, peer2str(transport) if transport else "unknown",
                          session_id, agent_id)
            if transport is not None and refusal is not CLIENT_LEFT:
                transport.write(refusal.response())
                transport.loseConnection()

        comparing.addCallbacks(equal, refused)
        return server.NOT_DONE_YET

    def _to_websocket(self, request: server.Request, early: Optional["_EarlyBytes"] = None) -> int:
        # The WebSocket protocol takes the transport over; the HTTP
        # channel's idle timer must not fire on it later.
        channel = cast(_DeadlineChannel, request.channel)
        channel.setTimeout(None)
        self._factory.last_built = None
        result: int = self._websocket.render(request)
        # bytes the client sent right behind its request (frames, legal once
        # the handshake completes in order) reach the channel after this
        # returns: they are the WebSocket's
        channel.upgraded_to = protocol = self._factory.last_built
        self._factory.last_built = None
        if early is not None:
            # after a comparison (not inside the channel's dataReceived):
            # the bytes kept meanwhile are the WebSocket's, and the channel
            # lets go of the request here
            if early.data and protocol is not None:
                protocol.dataReceived(b"".join(early.data))
            channel._hand_over()
        return result

    def _health(self, request: server.Request) -> int:
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

    def _ready(self, request: server.Request) -> bytes:
        if self._proxy.draining:
            return _json(request, 503, {"status": "draining"})
        return _json(request, 200, {"status": "ready"})

    def _metrics(self, request: server.Request) -> int:
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


class TurnBudget:
    """
    Healthy sessions first: at most C{per_turn} new connections have their
    first request read per reactor turn. The others wait, unread (their
    transport paused), in arrival order, for the next turns. A flood of
    handshakes then costs each turn a bounded amount of work, and messages
    to open sessions (read from the subscriber connection in the same
    turn) are never queued behind hundreds of handshakes.

    A turn is counted from one call of L{_next_turn} to the next: it is
    scheduled with C{callLater(0)}, which the reactor runs first thing in
    its next iteration, before it polls for I/O again.
    """

    #: the listening port, whose accepts per turn are bounded too (Twisted's
    #: TCP port accepts up to C{numberAccepts} connections each time it is
    #: readable, and raises that number by 20 whenever it used it all)
    port: Any = None

    def __init__(self, clock: Any, per_turn: int) -> None:
        self._clock = clock
        self.per_turn = per_turn
        self._used = 0
        self._waiting: deque[Callable[[], None]] = deque()
        self._turn: Any = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def take(self, resume: Callable[[], None]) -> bool:
        """
        May a connection have its first request read now? If not,
        C{resume} is called in a later turn, when it may.
        """
        if self._turn is None:
            self._turn = self._clock.callLater(0, self._next_turn)
        if self._used < self.per_turn and not self._waiting:
            self._used += 1
            return True
        self._waiting.append(resume)
        return False

    def _next_turn(self) -> None:
        self._turn = None
        self._used = 0
        port = self.port
        if getattr(port, "numberAccepts", 0) > 2 * self.per_turn:
            port.numberAccepts = 2 * self.per_turn
        waiting = self._waiting
        while waiting and self._used < self.per_turn:
            self._used += 1
            waiting.popleft()()
        if waiting:
            self._turn = self._clock.callLater(0, self._next_turn)


class _EarlyBytes:
    """
    What the client sends behind its upgrade request while its token is
    compared: kept for the WebSocket protocol.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


def _no_header(name: str) -> Optional[str]:
    return None


class _DeadlineChannel(http.HTTPChannel):
    """
    An HTTP channel with an absolute deadline for each request (head and
    body), whose first request waits for its turn (L{TurnBudget}).
    """

    _log = Logger()
    head_deadline = 5.0
    _deadline: Any = None
    #: the WebSocket protocol this connection was handed to, if any
    upgraded_to: Any = None
    budget: Optional[TurnBudget] = None
    #: bytes received while waiting for a turn, or None once it had one
    _held: Optional[list[bytes]] = None
    _admitted = False
    _gone = False

    proxy: Optional[Proxy] = None

    def dataReceived(self, data: bytes) -> None:
        if self._admitted:
            if not self._discard:
                self._parse(data)
        elif self._held is not None:
            self._held.append(data)
        elif self.budget is None or self.budget.take(self._turn_came):
            self._admitted = True
            if not self._refused_early(data):
                self._parse(data)
        else:
            # waiting for a turn is the proxy's delay, not the client's: the
            # head deadline stops here and starts again, whole, at the turn
            # (a reconnect storm must not time out requests sent in time)
            self._disarm()
            self._held = [data]
            transport: Any = self.transport
            transport.pauseProducing()

    def _parse(self, data: bytes) -> None:
        super().dataReceived(data)
        upgraded = self.upgraded_to
        if upgraded is not None and not isinstance(upgraded, _EarlyBytes):
            self._hand_over()

    def _refused_early(self, data: bytes) -> bool:
        """
        The cheapest refusal: an upgrade from a client address limited for
        failed authorization (L{Proxy.screen}) is answered 429 from its
        first bytes, without parsing the request, when the TCP peer is the
        client (no C{TRUSTED_PROXIES}; with them, the site's screen does it
        once the headers are parsed).
        """
        proxy = self.proxy
        if proxy is None or not len(proxy.auth_limit) or proxy.settings.trusted_proxies:
            return False
        transport: Any = self.transport
        peer = transport.getPeer()
        host = getattr(peer, "host", None) or ""
        refusal = proxy.screen(host, _no_header) if host else None
        if refusal is None or b"websocket" not in data.lower():
            return False
        self._admitted = self._discard = True
        self._disarm()
        proxy.refused(refusal, host, peer2str(transport))
        transport.write(refusal.response())
        transport.loseConnection()
        return True

    _discard = False

    def _turn_came(self) -> None:
        held, self._held = self._held or [], None
        self._admitted = True
        transport: Any = self.transport
        if transport is None or self._gone:
            return
        data = b"".join(held)
        self._arm()
        if not self._refused_early(data):
            transport.resumeProducing()
            self._parse(data)

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

    def rawDataReceived(self, data: bytes) -> None:
        if self.upgraded_to is not None:
            self.upgraded_to.dataReceived(data)
        else:
            super().rawDataReceived(data)

    def _hand_over(self) -> None:
        """
        The upgrade request and the bytes behind it have all been passed
        on: the WebSocket protocol owns the transport from here on. Let go
        of it and of the request (which points back at this channel), so
        that nothing of the HTTP exchange waits for Python's cycle
        collector (see L{wsproxy.protocol.ProxyProtocol._break_cycles}).
        """
        self.upgraded_to = None
        for request in self.requests:
            request.channel = None
        self.requests = []

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line over 16 KiB (C{MAX_LENGTH}): Twisted
        would close without a word; answer 431 and ignore the rest.
        """
        self._disarm()
        transport: Any = self.transport
        if transport is None:
            return
        # read nothing more: the answer is final
        transport.pauseProducing()
        self._log.info("refused 431 request head too large: peer={peer}",
                       peer=transport.getPeer())
        transport.write(Refusal(431, "Request Header Fields Too Large").response())
        self.loseConnection()

    def requestDone(self, request: server.Request) -> None:
        super().requestDone(request)
        if self.transport is not None and not self._deadline:
            self._arm()

    def _head_timeout(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        if transport is not None:
            self._log.info("dropped a client that did not send its request in {t:g}s: peer={peer}",
                           t=self.head_deadline, peer=transport.getPeer())
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._held = None
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
            channel: Any = self.channel
            channel.persistent = False
            channel.transport.write(Refusal(413, "Content Too Large").response())
            channel.transport.loseConnection()
            length = 0
        super().gotLength(length)


class ProxySite(server.Site):
    """
    The proxy's HTTP site.

    @param metrics: what C{/metrics} serves; by default this process's
        counters (a worker passes the sum over all workers instead).
    """

    # our channel class directly, without Site's HTTP/2-negotiating wrapper
    # (the proxy speaks HTTP/1.1 only: WebSocket upgrades need it)
    protocol = _DeadlineChannel  # type: ignore[assignment]
    requestFactory = _Request
    noisy = False

    def __init__(self, proxy: Proxy, metrics: Optional[MetricsSource] = None) -> None:
        self.proxy = proxy
        self.ws_factory = ProxyFactory(proxy)
        super().__init__(
            Root(proxy, self.ws_factory, metrics or proxy.stats.render), timeout=60
        )
        self.displayTracebacks = False
        per_turn = proxy.settings.handshakes_per_turn
        self.budget = TurnBudget(proxy.clock, per_turn) if per_turn else None
        proxy.stats.handshakes_waiting = lambda: self.budget.waiting if self.budget else 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.head_deadline = self.proxy.settings.handshake_timeout
        channel.budget = self.budget
        channel.proxy = self.proxy
        channel.callLater = self.proxy.clock.callLater
        return channel

    def log(self, request: http.Request) -> None:
        """
        No access log: it would print query strings (access_token).
        """
