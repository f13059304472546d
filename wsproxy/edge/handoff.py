"""
The hand-off of one connection from the HTTP channel
(L{wsproxy.edge.site._DeadlineChannel}) to its WebSocket protocol
(L{wsproxy.websocket.protocol.ProxyProtocol}): one L{HandOff} per upgrade
request the site decided to pass on.

What it holds:

  - the upgrade request's bytes, and the header lines the lean parser read
    from them (the protocol takes those as they are,
    L{wsproxy.fast.handshake}; else Autobahn parses its own opening
    handshake from the bytes);
  - the bytes the client sent behind the request before the protocol
    exists (while a header token is compared), in the order they came;
  - the token comparison under way, and its result once equal (the
    admission then only subscribes: L{ProxyProtocol.compared_by_site}).

Who owns the socket, step by step (L{HandOff.owner}):

  1. C{CHANNEL}: the HTTP channel reads the request (the lean parser, or
     twisted.web) and the site decides it (L{wsproxy.edge.site.Root.upgrade}).
     A refusal is the channel's to write; no hand-off is made.
  2. C{COMPARING} (only for a header token, L{compare}): the hand-off
     holds the connection while Redis compares the token. The channel
     passes every byte it receives to L{received}, which keeps them. Its
     idle timer is off; one timer (the token check's deadline, or the
     handshake's if shorter) runs instead. Then:
       - equal: on to step 3, with the result;
       - refused (403, 503, 504): the channel answers and closes; the
         hand-off is over (L{REFUSED}) and later bytes are dropped;
       - the client left (the channel's C{connectionLost} calls
         L{client_left}): the comparison is cancelled, counted as 499,
         nothing is written (L{LEFT}).
  3. C{WEBSOCKET} (L{to_websocket}): a protocol is built and the transport
     rewired to it: the TCP transport's C{protocol} (or, over TLS, the TLS
     wrapper's C{wrappedProtocol}) becomes the WebSocket protocol, the
     channel's C{transport} becomes C{None}, and reading is resumed
     (twisted.web pauses it while it handles a request). The protocol then
     reads the request and the kept bytes, in order, and runs its
     admission. From here on new reads go to the protocol directly; bytes
     twisted.web still holds from the read that made the upgrade still
     reach the channel, which passes them on (L{received}) until that read
     ends.
  4. C{RELEASED} (L{release}): the channel's read is over; it lets go of
     the hand-off and of its requests (which point back at it), so that
     nothing of the HTTP exchange waits for the cycle collector. The
     hand-off lets go of the channel and the protocol.

A hand-off never holds its channel once it is over (released, refused or
left): the channel holds it, not the other way round, so a connection
leaves no reference cycle behind (L{wsproxy.fast.heap}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from autobahn.twisted.util import peer2str
from twisted.protocols.policies import ProtocolWrapper

from ..refusal import CLIENT_LEFT, Refusal
from ..session.proxy import Compared, Comparison, Proxy
from ..websocket.protocol import ProxyFactory, ProxyProtocol

if TYPE_CHECKING:
    from .site import _DeadlineChannel

#: who owns the connection (L{HandOff.owner}; the module docstring)
CHANNEL = "channel"
COMPARING = "comparing"
WEBSOCKET = "websocket"
RELEASED = "released"
REFUSED = "refused"
LEFT = "left"


class HandOff:
    """
    One connection on its way from the HTTP channel to the WebSocket
    protocol (the protocol: the module docstring).

    @ivar owner: who owns the connection now: L{CHANNEL}, L{COMPARING},
        L{WEBSOCKET}, or, once over, L{RELEASED}, L{REFUSED} or L{LEFT}.
    @ivar protocol: the WebSocket protocol, from L{to_websocket} until
        L{release}.
    """

    __slots__ = ("owner", "protocol", "_channel", "_factory", "_request", "_headers", "_early",
                 "_compared", "_comparison", "_timer")

    def __init__(self, channel: "_DeadlineChannel", factory: ProxyFactory, request: bytes,
                 headers: Optional[dict[bytes, list[bytes]]] = None) -> None:
        """
        @param headers: the request's header lines as the lean parser read
            them (L{wsproxy.edge.upgrade.Upgrade.lean}), or C{None}:
            Autobahn reads them from C{request}.
        """
        self.owner = CHANNEL
        self.protocol: Optional[ProxyProtocol] = None
        self._channel: Optional[_DeadlineChannel] = channel
        self._factory = factory
        self._request = request
        self._headers = headers
        self._early: list[bytes] = []
        #: (session id, token, Compared) once the site's comparison found
        #: the token equal
        self._compared: Optional[tuple[str, str, Compared]] = None
        self._comparison: Optional[Comparison] = None
        self._timer: Any = None
        # the HTTP channel's idle timer must not fire on it later
        channel.setTimeout(None)

    def received(self, data: bytes) -> None:
        """
        Bytes from the client that reached the channel: kept while the
        token is compared, passed to the protocol once it has the
        connection, dropped once the hand-off was refused.
        """
        owner = self.owner
        if owner is COMPARING:
            self._early.append(data)
        elif owner is WEBSOCKET:
            assert self.protocol is not None
            self.protocol.dataReceived(data)

    # -- step 2: the token compared first ------------------------------------

    def compare(self, proxy: Proxy, session_id: str, agent_id: str, token: str,
                client: Callable[[], str]) -> None:
        """
        Check the header token (L{Proxy.compare}: compared with the stored
        one and its TTL reset in the same round trip, or a JWT verified on
        the CPU, decided at once) before Autobahn builds anything: a wrong
        token, or a Redis failure, is refused by the channel for the cost of
        the request (and the round trip); a good one goes on to the
        WebSocket (L{to_websocket}), whose admission then only subscribes,
        within what is left of the same C{AUTH_TIMEOUT_SECS}.

        @param client: the client's address (for the failed-authorization
            limit and the refusal's log line), asked only on a refusal.
        """
        settings = proxy.settings
        self.owner = COMPARING

        def decided(result: Compared | Refusal) -> None:
            self._comparison = None
            timer, self._timer = self._timer, None
            if timer is not None and timer.active():
                timer.cancel()
            if isinstance(result, Refusal):
                self._refused(proxy, result, client(), session_id, agent_id)
            else:
                self._equal((session_id, token, result))

        comparison = self._comparison = proxy.compare(session_id, agent_id, token, decided)
        comparison.start()
        if comparison.decided:
            # a JWT: decided on the CPU, no deadline needed
            return
        # one timer: the token check's deadline (AUTH_TIMEOUT_SECS, 504) or,
        # if it is shorter, the handshake's (HANDSHAKE_TIMEOUT_SECS: dropped,
        # as Autobahn does for the admission)
        auth_first = settings.auth_timeout <= settings.handshake_timeout

        def expired() -> None:
            self._timer = None
            if auth_first:
                comparison.expired()
            else:
                # the channel's connectionLost cancels the comparison
                channel = self._channel
                transport: Any = None if channel is None else channel.transport
                if transport is not None:
                    transport.abortConnection()

        self._timer = proxy.clock.callLater(
            min(settings.auth_timeout, settings.handshake_timeout), expired
        )

    def client_left(self) -> None:
        """
        The client closed the connection while the channel owned it: a
        comparison under way is cancelled (counted once, as 499).
        """
        comparison = self._comparison
        if comparison is not None:
            comparison.cancel()

    def _equal(self, compared: tuple[str, str, Compared]) -> None:
        self._compared = compared
        channel = self._channel
        assert channel is not None
        self.to_websocket()
        # the channel lets go of the connection here, unless twisted.web is
        # still reading the request (an answer in the same turn): the bytes
        # it holds behind it go to the WebSocket first, and the channel
        # lets go once it has passed them on (its _parse)
        if not channel.reading:
            channel.release_hand_off()

    def _refused(self, proxy: Proxy, refusal: Refusal, client: str, session_id: str,
                 agent_id: str) -> None:
        channel, self._channel = self._channel, None
        self.owner = LEFT if refusal is CLIENT_LEFT else REFUSED
        self._early = []
        transport: Any = None if channel is None else channel.transport
        if refusal.code in (401, 403):
            proxy.auth_failed(client)
        proxy.refused(refusal, client, peer2str(transport) if transport else "unknown",
                      session_id, agent_id)
        if refusal is not CLIENT_LEFT and channel is not None:
            channel.refuse(refusal)

    # -- step 3: the WebSocket protocol takes the connection ------------------

    def to_websocket(self) -> None:
        """
        Hand the connection to a new WebSocket protocol, which reads the
        request (with whatever the client sent behind it) again and runs
        its admission (L{wsproxy.websocket.admission.start}).
        """
        channel = self._channel
        assert channel is not None
        channel.setTimeout(None)
        transport: Any = channel.transport
        protocol = cast(ProxyProtocol, self._factory.buildProtocol(transport.getPeer()))
        if self._compared is not None:
            protocol.compared_by_site(self._compared)
            self._compared = None
        channel.transport = None
        # TLS wraps the TCP transport in a protocol of its own
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        elif isinstance(transport.protocol, ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        # twisted.web may have paused reading while it served the request
        # (as Autobahn's WebSocketResource does, resumed)
        producer = getattr(transport, "_networkProducer", transport)
        if hasattr(producer, "resumeProducing"):
            producer.resumeProducing()
        # bytes the client sent right behind a request twisted.web parsed
        # reach the channel after this returns: they are the WebSocket's
        self.owner = WEBSOCKET
        self.protocol = protocol
        data = self._request
        if self._early:
            data += b"".join(self._early)
        headers, self._headers = self._headers, None
        self._request = b""
        self._early = []
        if headers is None:
            protocol.dataReceived(data)
        else:
            protocol.read_request(headers, data)

    # -- step 4 ---------------------------------------------------------------

    def release(self) -> None:
        """
        The channel passed on all it read: the hand-off is over and lets go
        of the channel and the protocol.
        """
        self.owner = RELEASED
        self.protocol = None
        self._channel = None
