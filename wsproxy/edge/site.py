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

from autobahn.twisted.util import peer2str
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from ..session import topics, upstream
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..websocket.protocol import ProxyFactory
from ..names import parse_sse_path, parse_ws_path
from ..session.proxy import Proxy
from ..refusal import Refusal
from . import sse
from .handoff import WEBSOCKET, HandOff
from .upgrade import LEAN_HEAD_MAX, Upgrade, lean_upgrade, names_websocket
from . import upgrade as handshake


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
        upgrade = request.requestHeaders.getRawHeaders(b"upgrade")
        if request.method == b"GET" and upgrade is not None and names_websocket(upgrade):
            # a refused upgrade ends the connection (clients do not reuse
            # it); everything about it is decided, counted and logged as for
            # a request the lean parser read (upgrade)
            request.channel.persistent = False
            request.setHeader(b"connection", b"close")
            return self._upgrade_request(request)
        if upgrade is not None and not _single_lines(request):
            # an upgrade to something else: a header that str.splitlines()
            # would split must not reach anything that might
            request.channel.persistent = False
            return _plain(request, 400, "Invalid header")
        if parse_sse_path(path) is not None:
            # a Server-Sent Events stream (wsproxy.edge.sse)
            return sse.serve(self._proxy, request)
        if parse_ws_path(path) is None:
            return _plain(request, 404, "Not Found")
        return _plain(
            request, 426, "Upgrade Required",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )

    def takes(self, upgrade: "Upgrade") -> bool:
        """
        Whether an upgrade request read by the lean parser is this
        resource's to decide as an upgrade (C{/health}, C{/ready} and
        C{/metrics} are served as what they are, upgrade or not).
        """
        return upgrade.path not in ("/health", "/ready", "/metrics")

    def _upgrade_request(self, request: server.Request) -> int:
        """
        An upgrade request twisted.web parsed (a form the lean parser
        leaves to it, L{lean_upgrade}): decided as any other (L{upgrade}),
        Autobahn reading it as twisted.web understood it, one line per
        header line. Its body, if it had one, is read by nobody: the
        request is refused for it (L{wsproxy.edge.upgrade.refusal}).
        """
        headers = {name.lower(): list(values)
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        raw = b"".join(
            [request.method, b" ", request.uri, b" ", request.clientproto, b"\r\n"]
            + [name + b": " + value + b"\r\n" for name, values in headers.items()
               for value in values]
            + [b"\r\n"]
        )
        self.upgrade(
            cast(_DeadlineChannel, request.channel),
            Upgrade(request.uri, headers, raw, request.clientproto),
        )
        return server.NOT_DONE_YET

    def upgrade(self, channel: "_DeadlineChannel", upgrade: "Upgrade") -> None:
        """
        Decide an upgrade request, in order: the per-address limit (429);
        the request itself, as a WebSocket handshake
        (L{wsproxy.edge.upgrade.refusal}: 400 mostly, 505); then a header token
        compared before the WebSocket handshake; then the WebSocket
        protocol (whose admission decides everything else). Nothing before
        the token comparison sends a Redis command.
        """
        proxy = self._proxy
        transport: Any = channel.transport
        peer = getattr(transport.getPeer(), "host", None) or ""
        header = upgrade.header
        refusal = proxy.screen(peer, header) or handshake.refusal(upgrade)
        if refusal is not None:
            # answered here, before Autobahn or Redis do any work
            agent_id, session_id = parse_ws_path(upgrade.path) or (None, None)
            proxy.refused(
                refusal, proxy.client_address(peer, header), peer2str(transport),
                session_id, agent_id,
            )
            channel.refuse(refusal)
            return
        hand_off = channel.hand_off = HandOff(channel, self._factory, upgrade.raw,
                                              upgrade.headers if upgrade.lean else None)
        comparable = self._comparable(upgrade)
        if comparable is None:
            hand_off.to_websocket()
        else:
            session_id, agent_id, token = comparable
            hand_off.compare(proxy, session_id, agent_id, token,
                             lambda: proxy.client_address(peer, header))

    def _comparable(self, upgrade: "Upgrade") -> Optional[tuple[str, str, str]]:
        """
        Whether the token can be compared before the WebSocket handshake:
        one C{Authorization: Bearer} header with an ASCII token, a path and
        headers that pass L{Proxy.route} and L{Proxy.precheck}, no resume
        request, no acknowledgements refused (every refusal the admission
        decides before its token check, so that a request it refuses never
        has its token looked at). Anything else goes through the admission
        as it is (which refuses it, or checks its token there).

        @return: (session id, agent id, token), or C{None}.
        """
        headers = upgrade.headers
        authorization = headers.get(b"authorization")
        origin = headers.get(b"origin")
        # (one Authorization at most: the request was accepted as a
        # handshake)
        if (authorization is None or b"resume" in upgrade.target
                or (origin is not None and len(origin) != 1) or not authorization[0].isascii()):
            return None
        scheme, _, value = authorization[0].decode("ascii").strip().partition(" ")
        token = value.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        proxy = self._proxy
        try:
            agent_id, session_id = proxy.route(upgrade.path)
            proxy.precheck({} if origin is None else {"origin": origin[0].decode("latin-1")})
            target = upgrade.target.decode("latin-1")
            upstream.ack_request(target, proxy.settings.upstream == "stream")
            topics.labels_request(target, proxy.topics is not None)
        except Refusal:
            return None
        return session_id, agent_id, token

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


def _no_header(name: str) -> Optional[str]:
    return None


#: what a channel does with the bytes it receives (L{_DeadlineChannel._phase}):
#: nothing received yet
_NEW = "new"
#: waiting for its turn (L{TurnBudget}): kept, unread
_WAITING = "waiting"
#: read: by the lean parser or twisted.web, or passed to the hand-off
_READING = "reading"
#: answered with a refusal (the connection ends): ignored
_ANSWERED = "answered"
#: the connection is gone
_GONE = "gone"


class _DeadlineChannel(http.HTTPChannel):
    """
    An HTTP channel with an absolute deadline for each request (head and
    body), whose first request waits for its turn (L{TurnBudget}).

    What it does with the bytes it receives is its phase (C{_phase}):
    C{new} → C{waiting} (no turn yet: kept) → C{reading} (parsed; or
    passed to the hand-off, L{wsproxy.edge.handoff}) → C{answered} (a
    refusal written: ignored), and C{gone} from any of them when the
    connection is lost. A connection that gets its turn at once goes from
    C{new} to C{reading}.
    """

    _log = Logger()
    head_deadline = 5.0
    _deadline: Any = None
    #: the connection's way to the WebSocket protocol, from the upgrade's
    #: decision until the channel lets go (L{wsproxy.edge.handoff})
    hand_off: Optional[HandOff] = None
    budget: Optional[TurnBudget] = None
    #: what the channel does with the bytes it receives (_NEW, ...)
    _phase = _NEW
    #: bytes received while waiting for a turn (_WAITING), else None
    _held: Optional[list[bytes]] = None

    proxy: Optional[Proxy] = None
    #: the site's resource, which decides upgrades
    root: Optional[Root] = None
    #: the first request's bytes until its head is complete (the lean
    #: parser's), None once it was decided who reads it
    _head: Optional[bytes] = b""
    #: twisted.web is reading bytes (L{_parse}): a hand-off that reaches the
    #: WebSocket meanwhile is released at the read's end, not before
    #: (L{wsproxy.edge.handoff})
    reading = False

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is _READING:
            self._parse(data)
        elif phase is _WAITING:
            assert self._held is not None
            self._held.append(data)
        elif phase is not _NEW:
            # answered, or gone: ignored
            return
        elif self.budget is None or self.budget.take(self._turn_came):
            self._phase = _READING
            if not self._refused_early(data):
                self._parse(data)
        else:
            # waiting for a turn is the proxy's delay, not the client's: the
            # head deadline stops here and starts again, whole, at the turn
            # (a reconnect storm must not time out requests sent in time)
            self._disarm()
            self._phase = _WAITING
            self._held = [data]
            transport: Any = self.transport
            transport.pauseProducing()

    def _parse(self, data: bytes) -> None:
        if self.hand_off is not None:
            # behind a request whose token is being compared
            self.hand_off.received(data)
            return
        head = self._head
        if head is not None:
            if head:
                data = head + data
            end = data.find(b"\r\n\r\n")
            if end < 0 and len(data) < LEAN_HEAD_MAX:
                self._head = data
                return
            self._head = None
            if 0 <= end <= LEAN_HEAD_MAX and self._lean(data, end):
                return
        self.reading = True
        try:
            super().dataReceived(data)
        finally:
            self.reading = False
        self._hand_over_if_upgraded()

    def _lean(self, data: bytes, end: int) -> bool:
        """
        The first request, complete in C{data} up to C{end} (its blank
        line): if it is a plain WebSocket upgrade (L{lean_upgrade}), decide
        it without twisted.web (L{Root.upgrade}).

        @return: whether it was; if not, twisted.web reads C{data}.
        """
        root = self.root
        upgrade = lean_upgrade(data[:end], data) if root is not None else None
        if upgrade is None or root is None or not root.takes(upgrade):
            return False
        # the whole request is here in time
        self._disarm()
        self.persistent = False
        root.upgrade(self, upgrade)
        self._hand_over_if_upgraded()
        return True

    def refuse(self, refusal: Refusal) -> None:
        """
        Answer the upgrade request with C{refusal} and end the connection;
        anything more the client sends is ignored.
        """
        self._answered()
        self._disarm()
        transport: Any = self.transport
        if transport is not None:
            transport.write(refusal.response())
            transport.loseConnection()

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
        self._answered()
        self._disarm()
        proxy.refused(refusal, host, peer2str(transport))
        transport.write(refusal.response())
        transport.loseConnection()
        return True

    def _answered(self) -> None:
        """
        A refusal was written: what the client sends from now on is ignored.
        """
        if self._phase is not _GONE:
            self._phase = _ANSWERED

    def _turn_came(self) -> None:
        held, self._held = self._held or [], None
        if self._phase is _GONE:
            return
        self._phase = _READING
        transport: Any = self.transport
        if transport is None or transport.disconnecting:
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
        self._head_size = self._head_lines = 0
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self.hand_off is not None:
            self.hand_off.received(data)
        else:
            super().rawDataReceived(data)

    def _hand_over_if_upgraded(self) -> None:
        """
        L{release_hand_off}, once a request read here made the connection a
        WebSocket (not while its token is being compared: then the
        comparison's end hands it over).
        """
        hand_off = self.hand_off
        if hand_off is not None and hand_off.owner is WEBSOCKET:
            self.release_hand_off()

    def release_hand_off(self) -> None:
        """
        The upgrade request and the bytes behind it have all been passed
        on: the WebSocket protocol owns the transport from here on. Let go
        of the hand-off and of the request (which points back at this
        channel), so that nothing of the HTTP exchange waits for Python's
        cycle collector (see
        L{wsproxy.websocket.protocol.ProxyProtocol._break_cycles}).
        """
        hand_off, self.hand_off = self.hand_off, None
        if hand_off is not None:
            hand_off.release()
        for request in self.requests:
            request.channel = None
        self.requests = []

    #: the current request head's bytes (without line ends) and non-empty
    #: lines so far, as twisted.web counts them against its limits
    _head_size = 0
    _head_lines = 0

    def lineReceived(self, line: bytes) -> None:
        """
        A request head over twisted.web's limits (C{totalHeadersSize}, 16
        KiB over all its lines; C{maxHeaders}): 431, as for one line too
        long (L{lineLengthExceeded}), where twisted.web would answer an
        empty 400.
        """
        self._head_size += len(line)
        if line:
            self._head_lines += 1
        if self._head_size > self.totalHeadersSize or self._head_lines > self.maxHeaders + 1:
            self.lineLengthExceeded(line)
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        if self.length == 0:
            # no body, nothing to continue to: no "100 Continue" (RFC 9110
            # section 10.1.1 lets a server leave it out), which would come
            # before a 101 and break the client's handshake (the lean
            # parser never sends one either)
            self.requests[-1].requestHeaders.removeHeader(b"expect")
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line over 16 KiB (C{MAX_LENGTH}), or a
        request head too large (L{lineReceived}): Twisted would close
        without a word, or with an empty 400; answer 431 and ignore the
        rest.
        """
        self._answered()
        self._disarm()
        transport: Any = self.transport
        if transport is None:
            return
        # read nothing more: the answer is final
        transport.pauseProducing()
        refusal = Refusal(431, "Request Header Fields Too Large")
        if self.proxy is not None:
            # counted and logged as every refusal, within the address's
            # budget of lines (a flood of huge heads is not a line each)
            host = getattr(transport.getPeer(), "host", None) or ""
            self.proxy.refused(refusal, host, peer2str(transport))
        transport.write(refusal.response())
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
        self._phase = _GONE
        self._held = None
        self._disarm()
        hand_off = self.hand_off
        if hand_off is not None:
            # the client left while its token was being compared
            hand_off.client_left()
        super().connectionLost(reason)


class _Request(server.Request):
    """
    No route takes a request body: anything larger than a few KiB is
    refused with 413 instead of being buffered.
    """

    max_body = 64 * 1024

    def process(self) -> None:
        """
        A request for C{*} (asterisk-form, RFC 9112 section 3.2.4) is only
        meaningful as C{OPTIONS}, about the server as a whole: 200 with the
        methods it serves; 400 for any other method. Answered here, as
        every other request is by L{Root}, without a C{Server} header
        (twisted.web's own answers carry one, with its version).
        """
        if self.path != b"*":
            super().process()
            return
        self.site = cast(Any, self.channel).site
        self.setHeader(b"date", http.datetimeToString())
        if self.method == b"OPTIONS":
            self.setResponseCode(200)
            self.setHeader(b"allow", b"GET, HEAD")
            self.setHeader(b"content-length", b"0")
        else:
            body = _plain(self, 400, "Bad Request")
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
        self.finish()

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
    #: whether plain upgrade requests are read by L{lean_upgrade}; off,
    #: twisted.web reads every request (both decide alike:
    #: tests/test_request_corpus.py compares them)
    lean = True

    def __init__(self, proxy: Proxy, metrics: Optional[MetricsSource] = None) -> None:
        self.proxy = proxy
        self.ws_factory = ProxyFactory(proxy)
        self.root = Root(proxy, self.ws_factory, metrics or proxy.stats.render)
        # no idle timer of twisted.web's (TimeoutMixin: a timer per
        # connection, reset on every read): the channel's own deadline
        # covers every request's head and the wait for the next one
        super().__init__(self.root, timeout=None)
        self.displayTracebacks = False
        per_turn = proxy.settings.handshakes_per_turn
        self.budget = TurnBudget(proxy.clock, per_turn) if per_turn else None
        proxy.stats.handshakes_waiting = lambda: self.budget.waiting if self.budget else 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.head_deadline = self.proxy.settings.handshake_timeout
        channel.budget = self.budget
        channel.proxy = self.proxy
        channel.root = self.root
        channel.callLater = self.proxy.clock.callLater
        if not self.lean:
            channel._head = None
        return channel

    def log(self, request: http.Request) -> None:
        """
        No access log: it would print query strings (access_token).
        """
