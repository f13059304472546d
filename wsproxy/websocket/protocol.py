"""
The WebSocket side: one L{ProxyProtocol} per client connection, and the
factory that configures Autobahn for a proxy.

The protocol is the Autobahn-facing shell. The rest of the work is done by
its collaborators, module functions taking the protocol (no object per
connection; those called per message are bound as methods, so no call
layer is added):

  - L{wsproxy.websocket.states}: the connection's states and transitions;
  - L{wsproxy.websocket.admission}: the admission in order, and the open;
  - L{wsproxy.websocket.downstream}: backend messages beyond the common
    case (resumable and control frames, compression, the slow consumer);
  - L{wsproxy.websocket.upstream}: client messages beyond the common case
    (a failed publish, durable upstream's XADD, acks and nacks);
  - L{wsproxy.websocket.closing}: ending the session, and what the TCP
    connection does after;
  - L{wsproxy.websocket.footprint}: an open connection's memory, a closed
    one's cycles.

The per-message paths stay here: C{deliver}, C{_send_message}, C{_write}
(backend messages out), C{dataReceived}, C{onMessage} (client messages
in).

Data flows one way through a connection: upgrade request → admission
(L{admission.start}: route, precheck, token check, subscription
confirmed by Redis, each decided by L{Proxy}) → 101 → frames in are
published on C{:up}, messages from the hub are sent as frames.

The connection's states (L{wsproxy.websocket.states}, one attribute,
C{_state}; every transition goes through L{states.advance}):

    ADMITTING ──▶ OPEN ──▶ CLOSING ──▶ ENDED ──▶ CLOSED
        └────────────┴────────────────▶ ┘ (ENDED from each)

ADMITTING until the 101 (messages for the client kept for the open), OPEN
while the session is open, CLOSING once the proxy decided to close (nothing
more sent or published), ENDED once the session is over (the TCP
connection may live on for the closing handshake), CLOSED when the TCP
connection is gone. Autobahn's own C{state} stays Autobahn's: a frame is
sent only when both say open.

Who owns the session's subscription: the hub while it is being confirmed
(it releases it on any failure, or when the admission is cancelled because
the client left), this protocol from then on (released in L{closing.end_session}).

Closing: when the session ends and what the TCP connection does after
that, L{wsproxy.websocket.closing}.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable, Literal, Optional, Sequence, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..fast import handshake, inframes, lazyformat, timers
from ..fast.inframes import simple_frame
from ..fast.sockwrite import BATCH, Pending, plain_socket, write_now
from ..fast.timers import BucketTimer
from ..logs import BudgetedLog
from ..redis.pubsub import Listener
from ..refusal import Refusal
from ..session import frames
from ..session.control import ClosedBy, connection_event
from ..session.proxy import Proxy
from ..session.resume import Recovery, Resumer
from ..session.upstream import Appender
from ..session.webtoken import Grant
from . import admission, closing, downstream, fanout, footprint, states
from . import upstream as client_messages
from .closing import GOING_AWAY, PROTOCOL_ERROR, TOKEN_EXPIRED
from .states import ADMITTING, CLOSED, CLOSING, OPEN, SESSION_OPEN, State
from .upstream import INVALID_JSON_REPLY

STATE_OPEN = WebSocketProtocol.STATE_OPEN
STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
STATE_CLOSING = WebSocketProtocol.STATE_CLOSING
STATE_CLOSED = WebSocketProtocol.STATE_CLOSED


# Autobahn's debug pretty-printing of every option per connection, and its
# highlighting of names and values for debug lines, made lazy
# (wsproxy.fast.lazyformat; the start-up check undoes each if Autobahn no
# longer formats that way)
lazyformat.install()
lazyformat.install_highlight()


class _BudgetedAutobahnLog:
    """
    What Autobahn logs about a connection (protocol violations, unsolicited
    pongs, ...) counts against the client address's budget: a hostile
    client cannot make the proxy log without bound.

    A non-data descriptor: the first access on a connected connection
    stores its L{BudgetedLog} in the instance, so every later C{self.log}
    is a plain attribute lookup (Autobahn calls C{self.log.debug} per frame
    sent). The budget's key is the address itself, not a way back to the
    connection, which would be a reference cycle (see
    L{ProxyProtocol._break_cycles}).
    """

    def __init__(self, log: Any) -> None:
        self._log = log

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if (instance is None or getattr(instance, "_proxy", None) is None
                or instance.transport is None):
            return self._log
        log = BudgetedLog(self._log, instance._proxy.log_budget, instance._peer_host())
        instance.__dict__["log"] = log
        return log


class _ClassLogger(Logger):
    """
    A class's logger, as Twisted's C{Logger()} class attribute (namespace
    C{module.Class}), made once per class rather than at every access
    (Twisted's makes a new one each time, with the instance as its
    source: a fifth of what the open's log line cost, per connection).
    Its events' C{log_source} is the class, which no observer here reads.
    """

    def __get__(self, instance: object, owner: Optional[type] = None) -> Logger:
        owner = owner if owner is not None else type(instance)
        made = owner.__dict__.get("_class_logger")
        if made is None:
            made = Logger(".".join([owner.__module__, owner.__name__]), owner,
                          observer=self.observer)
            # (on the class itself: a subclass makes its own)
            setattr(owner, "_class_logger", made)
        return cast(Logger, made)


@implementer(IPushProducer)
class ProxyProtocol(WebSocketServerProtocol):
    """
    One client connection of one session.
    """

    _log = _ClassLogger()
    #: attribute defaults learnt from the first open connection of a class
    #: (_compact; each class has its own, in its __dict__)
    _learnt: dict[str, object] = {}
    #: Autobahn's traffic counters, which nothing reads (connectionMade)
    trafficStats = TrafficStats()
    #: durable upstream's appends awaiting Redis's answer: a deque of its
    #: own once the connection appends (an empty deque is 600 bytes)
    _in_flight: deque[bytes] = deque(maxlen=0)
    #: frames for the client that arrived before the 101, sent at open
    #: (a session message's payload, or a topic's with its listener); a
    #: list of its own during the handshake
    _early: Sequence[bytes | tuple[Any, bytes]] = ()
    #: TOPICS: whether the client asked for labelled frames (?labels=1),
    #: and its topics (wsproxy.websocket.fanout), once it is in one
    _labels = False
    _topics: Optional[dict[str, Any]] = None
    #: added to a topic framing (wsproxy.session.topics): a Server-Sent
    #: Events stream's are SSE's, a WebSocket's its own
    _framing_offset = 0
    #: containers Autobahn makes per connection and, once open, only reads
    #: (txaio's event names and results, with no listener ever registered;
    #: the extensions in use, none without compression): these copies,
    #: equal to them, stand in for the connection's (footprint.compact,
    #: footprint.SHARED)
    _valid_events = ["message"]
    _results: dict[str, Any] = {"message": None}
    websocket_extensions_in_use: list[Any] = []
    #: Autobahn's own logger, seen through the client address's log budget
    log = _BudgetedAutobahnLog(WebSocketServerProtocol.log)

    session_id: Optional[str] = None
    #: once open on a plain TCP socket: frames for the client are written
    #: through this, at once or at the end of a Redis read (L{_write})
    _out: Optional[Pending] = None
    #: who ended the connection, when the proxy knows better than "client"
    _closed_by: Optional[ClosedBy] = None
    _opened_at = 0.0
    _connection_id = ""
    #: JWT_EXPIRE_CONNECTIONS: what the token granted, from the admission
    #: to the open (then the proxy's expiry timer holds it)
    _grant: Optional[Grant] = None
    agent_id: Optional[str] = None
    # (set per connection, never on the class: _compact learns what it shares)
    #: the session's :up channel, once admitted
    _up_channel: bytes
    #: bound once, with the appender: handed to the command connection with every XADD
    _on_append_reply: Callable[[Any], None]

    def __init__(self) -> None:
        super().__init__()
        #: the proxy's state of the connection (L{wsproxy.websocket.states}:
        #: its transitions happen there only)
        self._state: State = ADMITTING
        self._proxy: Proxy = None  # type: ignore[assignment]
        self._subscriptions: list[tuple[str, Listener]] = []
        self._resumer: Optional[Resumer] = None
        self._recovery: Optional[Recovery] = None
        self._admission: Optional[defer.Deferred[Any]] = None
        self._early = []
        self._refusal: Optional[Refusal] = None
        self._compared: Optional[tuple[str, str, Any]] = None
        self._paused = False
        self._unsent = 0
        self._warned_drop = False
        #: durable upstream (UPSTREAM=stream): the connection's XADD, the
        #: ids of its appends awaiting Redis's answer (b"" without ?ack=1;
        #: made with the appender: an empty deque is 600 bytes),
        #: whether it asked for acks, and whether it stopped reading
        #: because too many appends are in flight
        self._appender: Optional[Appender] = None
        self._acked = False
        self._flight_paused = False
        self.messages_in = self.bytes_in = self.messages_out = self.bytes_out = 0
        self.closed: defer.Deferred[Any] = defer.Deferred()
        # bound once: handed to the command connection with every publish
        self._on_publish_reply = self._publish_replied

    def compared_by_site(self, compared: tuple[str, str, Any]) -> None:
        """
        The site already compared this connection's header token
        (L{wsproxy.edge.handoff.HandOff.compare}): (session id, token,
        L{wsproxy.session.proxy.Compared}). The admission then only
        subscribes, if its request names that session and token.
        """
        self._compared = compared

    def _keep_early(self, payload: bytes | tuple[Any, bytes]) -> None:
        """
        A message for the client before the 101: sent once open (a topic's
        with the listener that got it).
        """
        early = self._early
        assert isinstance(early, list)  # the connection's own, until open
        early.append(payload)

    # an open connection's memory and a closed one's cycles
    # (wsproxy.websocket.footprint), bound as methods
    _compact = footprint.compact
    _break_cycles = footprint.break_cycles

    def _peer_host(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", None) or peer or "unknown")

    def _client(self, headers: Any) -> str:
        """
        The client's address for limits and log budgets (see
        L{Proxy.client_address}); "" when the peer has no IP address.
        """
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None) or ""
        return self._proxy.client_address(host, (headers or {}).get)

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._proxy = self.factory.proxy
        self._down = self.factory.down_codec
        self._up = self.factory.up_codec
        self._proxy.connections.add(self)
        super().connectionMade()
        # Autobahn counts every octet, frame and message into a
        # TrafficStats per connection (over a kilobyte each) that nothing
        # reads: the class's one will do
        del self.trafficStats

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            closing.end_session(self, None, None)
            states.advance(self, CLOSED)
            self._proxy.connections.discard(self)
            self._break_cycles()
            self.closed.callback(None)

    # Autobahn takes a Deferred here too (txaio.as_future); its annotation
    # only names the synchronous answers
    def onConnect(self, request: Any) -> defer.Deferred[Any]:  # type: ignore[override]
        # the admission (wsproxy.websocket.admission), kept so that a client
        # leaving mid-admission cancels it (closing.end_session)
        self._admission = admission.start(self, request)
        return self._admission.addErrback(admission.refuse, self)

    def failHandshake(
        self, reason: str, code: int = 400, responseHeaders: Any = None
    ) -> None:
        admission.fail_handshake(self, reason, code)

    def onOpen(self) -> None:
        admission.open_session(self)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        closing.end_session(self, code, reason)

    def onAutoPingTimeout(self) -> None:
        self._closed_by = "timeout"
        super().onAutoPingTimeout()

    def _event(self, kind: Literal["open", "close", "join", "leave"],
               **close: Any) -> dict[str, Any]:
        assert self.session_id is not None
        peer = self.transport.getPeer() if self.transport is not None else None
        return connection_event(
            kind, self.session_id, self.agent_id, self._connection_id,
            self._proxy.instance, getattr(peer, "host", None), self._opened_at, **close,
        )

    # -- closing (the rules: wsproxy.websocket.closing) ----------------------------

    def sendCloseFrame(self, code: Optional[int] = None, reasonUtf8: Optional[bytes] = None,
                       isReply: bool = False) -> None:
        """
        Every close frame the proxy sends goes through here (Autobahn's
        failures, its answer to a client's close, the proxy's own closes).
        The first one is the decision
        (L{wsproxy.websocket.closing.after_close_frame}).
        """
        opening = self.state == STATE_OPEN
        super().sendCloseFrame(code, reasonUtf8, isReply)
        if opening and self._state in SESSION_OPEN:
            closing.after_close_frame(self, code, isReply)

    def _closing(self, closed_by: ClosedBy) -> None:
        """
        The proxy decided to close this open connection (L{CLOSING}): it
        sends and publishes nothing more, and its close event says
        C{closed_by}. Its close frame follows.
        """
        states.advance(self, CLOSING)
        self._closed_by = closed_by

    def onCloseFrame(self, code: Optional[int], reasonRaw: Optional[bytes]) -> Optional[bool]:
        """
        The client's close frame. A valid one on an open connection is
        answered by Autobahn, which then closes the TCP connection. An
        invalid one (L{wsproxy.websocket.closing.valid_close}) gets close
        1002. Any close frame after the proxy's own ends the closing
        handshake (L{wsproxy.websocket.closing.closing_handshake_over}).
        """
        if self.state == STATE_CLOSED:
            # (Autobahn's annotation forgets the frame without a code)
            return super().onCloseFrame(cast(int, code), cast(bytes, reasonRaw))
        valid = closing.valid_close(self.current_frame, code, reasonRaw)
        if self.state == STATE_OPEN:
            if valid:
                return super().onCloseFrame(cast(int, code), cast(bytes, reasonRaw))
            self._fail_connection(PROTOCOL_ERROR, "invalid close frame")
            if self.state == STATE_CLOSED:
                return True
        closing.closing_handshake_over(self, valid, code, reasonRaw)
        return True

    def dropConnection(self, abort: bool = False) -> None:
        """
        As Autobahn's, and a connection closed after its closing handshake
        (what is written goes out first, then FIN) is aborted if it is
        still there C{closeHandshakeTimeout} later: a client that does not
        read what is left can hold it no longer than one that does not
        answer a close frame.
        """
        lingers = not abort and self.state in (STATE_OPEN, STATE_CLOSING)
        super().dropConnection(abort)
        if lingers and self.closeHandshakeTimeout > 0:
            call = self.closeHandshakeTimeoutCall
            if call is not None:
                call.cancel()
            self.closeHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.closeHandshakeTimeout, self._linger_over,
            )

    def _linger_over(self) -> None:
        self.closeHandshakeTimeoutCall = None
        transport: Any = self.transport
        if transport is not None and getattr(transport, "connected", False):
            transport.abortConnection()

    # -- client -> Redis -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the client. On an open connection with no frame in
        progress, whole single-frame messages are read here
        (L{wsproxy.fast.inframes}) and go straight to L{onMessage}; from the
        first frame that is anything else, the bytes go to Autobahn. (Its
        own C{dataReceived} only adds a debug line no log level shows.)
        """
        # what the read makes the proxy write to this client (invalid-JSON
        # replies, nacks) goes out in one send when it has been handled;
        # PUBLISHes wait for the end of the turn (sockwrite.TurnPending)
        BATCH.hold()
        try:
            if not inframes.ENABLED:
                # the start-up check found Autobahn's state changed
                # (wsproxy.fast.borrowed): every read is Autobahn's
                super().dataReceived(data)
                return
            if (self.state == STATE_OPEN and self.current_frame is None and not self.data
                    and not self.inside_message and self.autoPingTimeoutCall is None
                    and self._perMessageCompress is None):
                limit = self.factory.frame_limit
                at = 0
                end = len(data)
                while True:
                    frame = simple_frame(data, at, limit)
                    if frame is None:
                        break
                    payload, binary, at = frame
                    self.onMessage(payload, binary)
                    if at == end:
                        return
                    if self.state != STATE_OPEN:
                        break
                if at:
                    data = data[at:]
            self._dataReceived(data)
        finally:
            BATCH.release()

    def read_request(self, headers: dict[bytes, list[bytes]], data: bytes) -> None:
        """
        The upgrade request the site's lean parser read (C{data}: its
        bytes, and whatever the client sent behind it; C{headers}: its
        header lines as read), as L{dataReceived} would take it, without
        Autobahn parsing it again (L{wsproxy.fast.handshake}) when it reads
        it exactly as Autobahn would.
        """
        BATCH.hold()
        try:
            taken = handshake.read(self, headers, data)
        finally:
            BATCH.release()
        if not taken:
            self.dataReceived(data)

    def onMessageEnd(self) -> None:
        # Autobahn's own also fires its "message" event for listeners
        # registered with on(): none ever are, and it cost a Deferred, a
        # closure and their callbacks per client message
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        # as Autobahn does (its annotation says list; onMessageBegin makes a new one)
        self.message_data = None  # type: ignore[assignment]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._state is not OPEN:
            return
        appender = self._appender
        if appender is not None:
            self._append(appender, payload, isBinary)
            return
        if self.factory.require_json and not isBinary:
            try:
                json.loads(payload)
            except ValueError:
                self.sendMessage(INVALID_JSON_REPLY, False)
                return
        self.messages_in += 1
        self.bytes_in += len(payload)
        stats = self._proxy.stats
        stats.messages_up += 1
        stats.bytes_up += len(payload)
        self._proxy.commands.publish(
            self._up_channel, self._up(payload, isBinary), self._on_publish_reply
        )

    # Client messages beyond the common case (wsproxy.websocket.upstream): a
    # failed publish, durable upstream's XADD and its acks. Its functions
    # are bound as methods, so calling them adds no call layer.
    _publish_failed = client_messages.publish_failed
    _append = client_messages.append
    _append_replied = client_messages.append_replied
    _send_ack = client_messages.send_ack

    def _publish_replied(self, reply: Any) -> None:
        if reply.__class__ is not int:
            self._publish_failed(reply)
        elif reply == 0:
            # nobody subscribed to :up: the message is gone (a backend
            # outage or deploy); counted, and said once a minute
            self._proxy.unheard(self.session_id)

    # -- Redis -> client -----------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        """
        Called by the hub for each message on the session's down channel.

        The frame is built once per payload and reused for every socket of
        the session (the hub hands each of them the same bytes object).
        Backend messages are not limited by MAX_MESSAGE_SIZE_BYTES.
        """
        if self._state is not OPEN or self.state != STATE_OPEN:
            if self._state is ADMITTING:
                self._keep_early(payload)
            return
        factory = self.factory
        if payload is factory.last_payload:
            outgoing, framed = factory.last_outgoing, factory.last_frame
        else:
            outgoing = self._down(payload)
            framed = None if outgoing is None else frames.frame(*outgoing)
            factory.last_payload, factory.last_outgoing = payload, outgoing
            factory.last_frame = framed
        if outgoing is None or framed is None:
            self._proxy.stats.dropped_down += 1
            if not self._warned_drop:
                # once per connection; the metric counts every one
                self._warned_drop = True
                self._log.warn(
                    "dropped a backend message that is not valid for FRAME_MODE=tagged "
                    "(no t/b tag, or t with invalid UTF-8): session={session_id}",
                    session_id=self.session_id,
                )
            return
        message, binary = outgoing
        self._send_message(message, binary, framed, len(message))

    def _send_message(self, message: bytes, binary: bool, framed: bytes, size: int) -> None:
        """
        Send one message: C{framed}, its frame (L{frames.frame}), or
        compressed from C{message}; count C{size} payload bytes (what the
        client's application receives, not the frame header nor the
        compressed size); close a client that stopped reading.
        """
        if self._perMessageCompress is None:
            data = framed
            self._write(data)
        else:
            data = message
            self._send_compressed(data, binary)
        self.messages_out += 1
        self.bytes_out += size
        stats = self._proxy.stats
        stats.messages_down += 1
        stats.bytes_down += size
        if self._paused:
            self._unsent += len(data)
            if self._unsent > self.factory.max_send_buffer:
                self._slow_consumer()

    def _write(self, data: bytes) -> None:
        """
        Write a whole frame of an open connection: straight to the socket
        (L{wsproxy.fast.sockwrite}) when it is plain TCP, else as Autobahn
        does. Autobahn's C{sendData} does nothing more for an open
        connection but format a debug line no log level shows and count
        octets nothing reads.
        """
        out = self._out
        if out is not None and not self.send_queue:
            out.send(data)
        else:
            self.sendData(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        # whatever Autobahn writes (pings, close frames) follows the frames
        # held for the end of a Redis read
        out = self._out
        if out is not None and out.frames:
            out.flush()
        elif out is None and self.state == STATE_CONNECTING and not (sync or chopsize
                                                                      or self.send_queue):
            self._send_handshake_response(data)
            return
        super().sendData(data, sync, chopsize)

    def _send_handshake_response(self, data: bytes) -> None:
        """
        The opening handshake's answer (the 101, or a refusal) on a plain
        TCP socket straight away (L{wsproxy.fast.sockwrite.write_now}), rather
        than on the reactor's next pass: each set-up then costs no
        C{epoll_ctl} to register the socket for writing and none to
        unregister it. Autobahn's C{sendData} would do nothing more than
        that write, a debug line no log level shows and a count nothing
        reads. Over TLS, Autobahn's way.
        """
        direct = plain_socket(self.transport)
        if direct is None:
            super().sendData(data)
        else:
            write_now(direct, data)

    # Backend messages beyond the common case (wsproxy.websocket.downstream):
    # resumable and control frames, compressed sends, the slow consumer. Its
    # functions are bound as methods, so calling them adds no call layer.
    _send_resumable = downstream.send_resumable
    _send_control = downstream.send_control
    _send_compressed = downstream.send_compressed
    _slow_consumer = downstream.slow_consumer
    # TOPICS: a backend's join or leave (wsproxy.websocket.fanout)
    topic_change = fanout.topic_change

    # Upstream backpressure (see UpstreamValve)

    # (also while the connection closes after its session ended: the
    # client's answer to a close frame must be read)

    def pause_reading(self) -> None:
        transport: Any = self.transport
        if self._state is not ADMITTING and transport is not None:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        transport: Any = self.transport
        if self._state is not ADMITTING and transport is not None and not self._flight_paused:
            transport.resumeProducing()

    # IPushProducer: Twisted tells us when the socket's send buffer is full.

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._unsent = 0

    def resumeProducing(self) -> None:
        self._paused = False
        self._unsent = 0

    def stopProducing(self) -> None:
        self._paused = False

    # -- shutdown ------------------------------------------------------------

    def going_away(self) -> None:
        """
        Tell the client the server is going away (1001), or drop a
        connection still in its opening handshake.
        """
        if self._state in SESSION_OPEN:
            self._closing("shutdown")
            # the shutdown's grace period decides how long the client has to
            # answer (it then drops what is left), not Autobahn's 5 s
            # closing-handshake timeout
            self.closeHandshakeTimeout = 0
            self.sendCloseFrame(code=GOING_AWAY, reasonUtf8=b"server shutting down", isReply=False)
        elif self._state is ADMITTING:
            self.dropConnection(abort=True)

    def server_close(self, code: int, reason: str) -> None:
        """
        A backend asked for this session's sockets to be closed
        (wsproxy:control): a close frame with its code and reason.
        """
        if self._state is not OPEN:
            return
        self._closing("server")
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def token_expired(self) -> None:
        """
        C{JWT_EXPIRE_CONNECTIONS}: the token's C{exp} passed: close with
        L{TOKEN_EXPIRED} so that the client reconnects with a fresh token.
        """
        if self._state is not OPEN:
            return
        self._closing("token_expired")
        self.sendCloseFrame(code=TOKEN_EXPIRED, reasonUtf8=b"token expired", isReply=False)

    def drop(self, why: str) -> defer.Deferred[None]:
        """
        Drop the connection now; fires once it is closed (logged and
        unsubscribed), which happens on a later reactor turn.
        """
        self.wasClean = False
        self.wasNotCleanReason = why
        self.dropConnection(abort=True)
        return self.closed


def _class_attribute(value: Any) -> Any:
    # a function stored on a class would become a method of its instances
    return staticmethod(value) if callable(value) else value


class ProxyFactory(WebSocketServerFactory):
    """
    Autobahn settings for a proxy, from L{Settings}.
    """

    protocol = ProxyProtocol

    def __init__(self, proxy: Proxy) -> None:
        settings = proxy.settings
        super().__init__(server=None)
        # Autobahn's deadlines (pings, handshakes) on buckets with O(1) cancel
        self._buckets = BucketTimer(proxy.clock)
        self.proxy = proxy
        self.down_codec, self.up_codec = frames.codec(settings.frame_mode)
        self.require_json = settings.require_json
        self.max_send_buffer = settings.max_send_buffer
        self.max_in_flight = settings.upstream_max_in_flight
        #: the largest client frame read without Autobahn (ProxyProtocol.dataReceived)
        self.frame_limit = settings.max_message_size
        #: the last backend payload and its frame, shared by a session's sockets
        self.last_payload: Optional[bytes] = None
        self.last_outgoing: frames.Outgoing = None
        self.last_frame: Optional[bytes] = None
        options: dict[str, Any] = dict(
            webStatus=False,
            maxMessagePayloadSize=settings.max_message_size,
            maxFramePayloadSize=settings.max_message_size,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout if settings.ping_interval else 0,
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=5,
            # protocol errors get a close frame with the right code (1002,
            # 1007, 1009), not just a dropped TCP connection
            failByDrop=False,
            # origins are checked by Proxy.precheck (exact, normalized)
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )
        if settings.compression:
            options["perMessageCompressionAccept"] = self._accept_deflate
        self.setProtocolOptions(**options)
        # (logOctets, logFrames and trackTimings stay at their default, off)
        self.noisy = False
        # Autobahn copies each option onto every new protocol instance unless
        # the protocol already has it: as class attributes they cost nothing
        # per connection (memory and set-up time). Its connectionMade then
        # still walks every option (CONFIG_ATTRS) to find it there and list
        # it for a debug line no level shows; with every option on the
        # class, the class's list is empty and that walk is skipped.
        options_as_attributes = {name: _class_attribute(getattr(self, name))
                                 for name in ProxyProtocol.CONFIG_ATTRS}
        self.protocol = type(  # type: ignore[assignment]
            "ProxyProtocol",
            (ProxyProtocol,),
            {**options_as_attributes, "CONFIG_ATTRS": ()},
        )

    @property
    def _batched_timer(self) -> Any:
        """
        The timer Autobahn's connections schedule their deadlines on
        (Autobahn's private name): the proxy's L{BucketTimer}, or
        Autobahn's own if the start-up check found that Autobahn no longer
        schedules through this name (L{wsproxy.fast.timers.ENABLED}).
        """
        return self._buckets if timers.ENABLED else self._autobahn_timer

    @_batched_timer.setter
    def _batched_timer(self, timer: Any) -> None:
        # Autobahn's factory sets its own in __init__
        self._autobahn_timer = timer

    def _accept_deflate(self, offers: list[Any]) -> Any:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(
                    offer, max_message_size=self.proxy.settings.max_message_size
                )
        return None
