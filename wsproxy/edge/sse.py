"""
Server-Sent Events: C{GET /{agent_id}/sse/{session_id}}, a session's
messages down as an event stream (issue 28, its first slice: no upstream).

The admission follows the WebSocket one (L{wsproxy.websocket.admission}),
in order, each step deciding its L{Refusal}: the per-address limit (429),
the route (404, 400), C{Accept} (406), the precheck (503 draining or over
C{MAX_CONNECTIONS}, which counts both transports; 403 origin), a resume
plan (400), the credentials (400 repeated; 401, 403, 503, 504 by
L{Proxy.authorize}), and the subscriptions confirmed by Redis, all before
the response head is written. A refusal is a plain-text answer, counted and
logged as the WebSocket's are; with an allowed C{Origin} it carries the
CORS headers so that a page can read its status.

One L{SseStream} per stream: it quacks like
L{wsproxy.websocket.protocol.ProxyProtocol} for what the proxy does with
its connections (C{Proxy.connections}: shutdown, the cap, the upstream
valve; C{Proxy.sessions}: a backend's close, token expiry).

The stream's states are the WebSocket's (L{wsproxy.websocket.states}):
ADMITTING until the head is written, OPEN, CLOSING once the proxy decided
to close (its close event follows), ENDED once the session is over,
CLOSED once the response is finished or the client gone.

Each message is one event (L{event}): C{data:} lines for text without a
CR (EventSource joins them with C{\\n}: exact); C{event: binary} or
C{event: text-base64} with the base64 of the bytes for the rest. On a
resuming connection each event's data starts with the envelope's header
(its position) and the event has an C{id:}, the cursor EventSource sends
back as C{Last-Event-ID} when it reconnects.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Optional, Sequence, cast
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.util import peer2str
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from ..names import parse_sse_path, valid_session_id, valid_topic
from ..redis.pubsub import Listener
from ..refusal import CLIENT_LEFT, Refusal, refusal_for
from ..session import auth, frames, topics
from ..session.control import ClosedBy, connection_event
from ..session.proxy import Proxy, ResumeRequest
from ..session.resume import InvalidPosition, Position, Recovery, Resumer, parse_position
from ..session.webtoken import Grant
from ..websocket import fanout, states
from ..websocket.closing import GOING_AWAY, TOKEN_EXPIRED
from ..websocket.admission import catch_up, session_subscriptions
from ..websocket.fanout import Joining
from ..websocket.states import ADMITTING, CLOSED, CLOSING, ENDED, OPEN, SESSION_OPEN, State

STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
STATE_OPEN = WebSocketProtocol.STATE_OPEN
STATE_CLOSED = WebSocketProtocol.STATE_CLOSED

#: what the stream's C{Content-Type} is
CONTENT_TYPE = b"text/event-stream; charset=utf-8"
#: the comment a heartbeat sends
HEARTBEAT = b": ping\n\n"
#: the query parameter that names the last event received (as
#: C{Last-Event-ID} does)
LAST_EVENT_ID_PARAM = "last_event_id"

NOT_ACCEPTABLE = Refusal(406, "Not Acceptable")
METHOD_NOT_ALLOWED = Refusal(405, "Method Not Allowed", (("Allow", "GET"),))


def accepts_event_stream(values: Optional[Sequence[bytes]]) -> bool:
    """
    Whether a request's C{Accept} lets it have an event stream: absent, or
    naming C{text/event-stream} or C{*/*}.
    """
    if values is None:
        return True
    for value in values:
        for item in value.split(b","):
            media = item.split(b";", 1)[0].strip().lower()
            if media in (b"text/event-stream", b"*/*"):
                return True
    return False


def named_event(name: bytes, data: dict[str, Any]) -> bytes:
    """
    An event of the proxy's own (C{recovery}, C{close}): JSON data.
    """
    return b"event: " + name + b"\ndata: " + json.dumps(
        data, separators=(",", ":")).encode() + b"\n\n"


def _headers(request: server.Request) -> dict[str, str]:
    return {name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders() if values}


def serve(proxy: Proxy, request: server.Request) -> int | bytes:
    """
    A request for an SSE route (L{parse_sse_path}): refused, or the start of
    an L{SseStream}'s admission.
    """
    return SseStream(proxy, request).start()


@implementer(IPushProducer)
class SseStream:
    """
    One Server-Sent Events stream of one session.
    """

    _log = Logger()
    session_id: Optional[str] = None
    agent_id: Optional[str] = None
    _closed_by: Optional[ClosedBy] = None
    _grant: Optional[Grant] = None
    _opened_at = 0.0
    _connection_id = ""
    _heartbeat: Optional[task.LoopingCall] = None
    _resumer: Optional[Resumer] = None
    _recovery: Optional[Recovery] = None
    #: a resuming stream's session position (C{b""}: none yet), the start
    #: of each event id (None: not resuming, no ids)
    _cursor: Optional[bytes] = None
    #: TOPICS: the stream's topics (wsproxy.websocket.fanout), whether it
    #: asked for labelled events (?labels=1), its topic framings (SSE's)
    _topics: Optional[dict[str, Any]] = None
    _labels = False
    _framing_offset = topics.SSE
    #: what a WebSocket connection compresses with, and its acknowledgements:
    #: never here
    _perMessageCompress = None
    _acked = False

    def __init__(self, proxy: Proxy, request: server.Request) -> None:
        self._proxy = proxy
        self._request: Optional[server.Request] = request
        self._state: State = ADMITTING
        #: Autobahn's view, for those who read it (open while the stream is)
        self.state = STATE_CONNECTING
        self._subscriptions: list[tuple[str, Listener]] = []
        self._early: list[bytes | tuple[Any, bytes]] = []
        #: a resuming labelled stream's position in each topic it resumes
        self._topic_cursor: dict[bytes, bytes] = {}
        #: what fan-out reads of a WebSocket factory
        self.factory = self
        self.max_send_buffer = proxy.settings.max_send_buffer
        self._admission: Optional[defer.Deferred[Any]] = None
        self._paused = False
        self._unsent = 0
        self._down = frames.codec(proxy.settings.frame_mode)[0]
        self.messages_in = self.bytes_in = self.messages_out = self.bytes_out = 0
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._headers = _headers(request)
        transport: Any = request.channel.transport if request.channel is not None else None
        peer = transport.getPeer() if transport is not None else None
        self._host = str(getattr(peer, "host", None) or "")
        self.peer = peer2str(transport) if transport is not None else "unknown"
        self._client = proxy.client_address(self._host, self._headers.get)
        origin = self._headers.get("origin")
        #: the CORS headers every answer carries (an allowed Origin's)
        self._cors: tuple[tuple[bytes, bytes], ...] = ()
        if origin is not None and proxy.origin_allowed(origin):
            self._cors = ((b"access-control-allow-origin", origin.encode("latin-1")),
                          (b"vary", b"Origin"))

    # -- admission ---------------------------------------------------------

    def start(self) -> int | bytes:
        request = self._request
        assert request is not None
        proxy = self._proxy
        if request.method == b"OPTIONS" and self._cors:
            return self._preflight()
        try:
            self._check()
        except Refusal as refusal:
            return self._refuse(refusal)
        # counted from here as a connection (MAX_CONNECTIONS, shutdown)
        proxy.connections.add(self)
        finished = request.notifyFinish()
        finished.addBoth(self._finished)
        try:
            prepared = self._prepare()
        except BaseException:
            # its refusal; anything unexpected is logged, and a 500
            self._end(None, None)
            proxy.connections.discard(self)
            return self._refuse(refusal_for(Failure(), self._log, "admitting an SSE stream"))
        self._admission = defer.ensureDeferred(self._admit(*prepared))
        self._admission.addCallbacks(self._open, self._refused)
        return server.NOT_DONE_YET

    def _preflight(self) -> bytes:
        """
        A CORS preflight from an allowed origin (a fetch-based client that
        sends its token in C{Authorization}, or C{Last-Event-ID}): 204 with
        what the stream's request may carry. Not a connection: not counted.
        """
        request = self._request
        assert request is not None
        request.setResponseCode(204)
        for name, value in self._cors:
            request.setHeader(name, value)
        request.setHeader(b"access-control-allow-methods", b"GET")
        request.setHeader(b"access-control-allow-headers",
                          b"Authorization, Last-Event-ID, Accept, Cache-Control")
        request.setHeader(b"access-control-max-age", b"600")
        request.setHeader(b"allow", b"GET, OPTIONS")
        return b""

    def _check(self) -> None:
        """
        What is decided before the stream counts as a connection: the
        method, the per-address limit, the route, C{Accept}.
        """
        request = self._request
        assert request is not None
        proxy = self._proxy
        if request.method != b"GET":
            raise METHOD_NOT_ALLOWED
        refusal = proxy.screen(self._host, self._headers.get)
        if refusal is not None:
            raise refusal
        parsed = parse_sse_path(request.path.decode("latin-1"))
        if parsed is None:
            raise Refusal(404, "Not Found")
        self.agent_id, self.session_id = parsed
        if not valid_session_id(parsed[1]):
            raise Refusal(400, "Invalid session id")
        if not accepts_event_stream(request.requestHeaders.getRawHeaders(b"accept")):
            raise NOT_ACCEPTABLE

    def _prepare(self) -> tuple[Optional[auth.Credentials], list[tuple[str, Listener]],
                                Optional[ResumeRequest], Optional[Joining]]:
        request = self._request
        assert request is not None and self.session_id is not None
        proxy = self._proxy
        proxy.precheck(self._headers)
        uri = request.uri.decode("latin-1")
        resume, positions = self._resume_request(uri)
        labels = self._labels = topics.labels_request(uri, proxy.topics is not None)
        positions = {**topics.topic_positions(uri, resume is not None, labels), **positions}
        if positions and not (resume is not None and labels):
            raise topics.INVALID_POSITION
        for topic, at in positions.items():
            # the cursor starts where the client is in each topic
            self._topic_cursor[topic.encode()] = b"" if at is None else str(at).encode()
        query = urlsplit(uri).query
        authorization = [v.decode("latin-1") for v in
                         request.requestHeaders.getRawHeaders(b"authorization") or ()]
        if auth.repeated_token(authorization, (), query):
            raise Refusal(*auth.REPEATED_TOKEN)
        params = parse_qs(query, keep_blank_values=True)
        credentials = auth.extract_token(self._headers, params, ())
        session_id = self.session_id
        # (with labels, data down gets the envelope: an empty first line)
        subscriptions = session_subscriptions(cast(Any, self), session_id, resume, labels)
        joining = None
        if proxy.topics is not None:
            joining = Joining(cast(Any, self), positions)
            # a backend's topic change from now on reaches this stream
            proxy.admitting_started(session_id, self)
        return credentials, subscriptions, resume, joining

    def _resume_request(self, uri: str) -> tuple[Optional[ResumeRequest],
                                                  dict[str, Optional[Position]]]:
        """
        A resume plan: C{?resume=} as on WebSocket, or the last event's id
        (C{Last-Event-ID}, EventSource's on its reconnects, or
        C{?last_event_id=}): the session's position, then C{<topic>@<position>}
        for each topic it resumes. The stream's cursor starts there.

        @return: the plan, and the topics' positions the id names.
        @raise Refusal: 400 without C{RESUME}, or for a malformed position.
        """
        proxy = self._proxy
        resume = proxy.resume_request(uri)
        last = self._headers.get("last-event-id")
        if last is None and LAST_EVENT_ID_PARAM in uri:
            values = parse_qs(urlsplit(uri).query, keep_blank_values=True).get(
                LAST_EVENT_ID_PARAM)
            if values is not None:
                if len(values) != 1:
                    raise topics.INVALID_POSITION
                last = values[0]
        if last is None:
            if resume is not None:
                self._cursor = b"" if resume.position is None else str(resume.position).encode()
            return resume, {}
        if not proxy.settings.resume:
            raise Refusal(400, "Resumable sessions are not enabled")
        # (an id wins over ?resume=: it is where EventSource got to)
        words = last.split(" ")
        positions: dict[str, Optional[Position]] = {}
        try:
            position = parse_position(words[0])
            for word in words[1:]:
                topic, at, where = word.partition("@")
                if not at or not valid_topic(topic) or topic in positions:
                    raise topics.INVALID_POSITION
                positions[topic] = parse_position(where)
        except InvalidPosition:
            raise topics.INVALID_POSITION from None
        self._cursor = words[0].encode()
        return ResumeRequest(position), positions

    async def _admit(self, credentials: Optional[auth.Credentials],
                     subscriptions: list[tuple[str, Listener]],
                     resume: Optional[ResumeRequest],
                     joining: Optional[Joining]) -> list[tuple[str, Listener]]:
        proxy = self._proxy
        assert self.session_id is not None and self.agent_id is not None
        try:
            self._recovery, grant = await proxy.authorize(
                self.session_id, self.agent_id, credentials, subscriptions, resume,
                None, joining,
            )
        except Refusal as refusal:
            if refusal.code in (401, 403):
                proxy.auth_failed(self._client)
            raise
        if grant.expires is not None and proxy.settings.jwt_expire_connections:
            self._grant = grant
        return subscriptions

    def _refused(self, failure: Failure) -> None:
        refusal = refusal_for(failure, self._log, "admitting an SSE stream")
        refusal.with_traceback(None)
        self._end(None, None)
        self._proxy.connections.discard(self)
        if refusal is CLIENT_LEFT:
            self._proxy.refused(refusal, self._client, self.peer, self.session_id,
                                self.agent_id)
            return
        request = self._request
        if request is not None and not request.finished and request.channel is not None:
            request.write(self._refuse(refusal))
            request.finish()

    def _refuse(self, refusal: Refusal) -> bytes:
        """
        Answer with C{refusal} (a plain-text body), counted and logged.
        """
        request = self._request
        assert request is not None
        self._proxy.refused(refusal, self._client, self.peer, self.session_id, self.agent_id)
        request.setResponseCode(refusal.code, refusal.reason.encode())
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in refusal.headers:
            request.setHeader(name.encode(), value.encode())
        for bname, bvalue in self._cors:
            request.setHeader(bname, bvalue)
        body = (refusal.reason + "\n").encode()
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _open(self, subscriptions: list[tuple[str, Listener]]) -> None:
        """
        Admitted: the response head, the retry line, and the session opens.
        """
        request = self._request
        proxy = self._proxy
        if request is None or request.finished or not states.advance(self, OPEN):
            proxy.release(subscriptions)
            return
        self._admission = None
        self._subscriptions = subscriptions
        self.state = STATE_OPEN
        settings = proxy.settings
        request.setResponseCode(200)
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")
        for name, value in self._cors:
            request.setHeader(name, value)
        request.registerProducer(self, True)
        request.write(b"retry: %d\n\n" % settings.sse_retry_ms)
        proxy.stats.open_connections += 1
        proxy.stats.sse_connections_open += 1
        proxy.stats.outcomes["accepted"] += 1
        session_id = self.session_id
        assert session_id is not None
        proxy.opened(session_id, self)
        if self._grant is not None:
            proxy.expire_at(self, self._grant)
            self._grant = None
        if proxy.events.enabled:
            self._opened_at = time.time()
            self._connection_id = proxy.next_connection_id()
            proxy.events.publish(session_id, self._event("open"))
        if settings.ping_interval:
            self._heartbeat = task.LoopingCall(self._put, HEARTBEAT)
            self._heartbeat.clock = proxy.clock
            self._heartbeat.start(settings.ping_interval, now=False)
        self._log.info(
            "opened: session={session_id} agent={agent_id} peer={peer} transport=sse",
            session_id=session_id, agent_id=self.agent_id, peer=self.peer,
        )
        early, self._early = self._early, []
        catch_up(cast(Any, self), early)

    def _event(self, kind: Literal["open", "close", "join", "leave"],
               **close: Any) -> dict[str, Any]:
        assert self.session_id is not None
        return connection_event(
            kind, self.session_id, self.agent_id, self._connection_id,
            self._proxy.instance, self._host or None, self._opened_at,
            transport="sse", **close,
        )

    # -- Redis -> client ---------------------------------------------------

    def _keep_early(self, payload: bytes | tuple[Any, bytes]) -> None:
        """
        A message before the head is written: sent once open (a topic's
        with the listener that got it).
        """
        self._early.append(payload)

    def deliver(self, payload: bytes) -> None:
        """
        A message on the session's down channel (a plain stream).
        """
        if self._state is not OPEN:
            if self._state is ADMITTING:
                self._early.append(payload)
            return
        outgoing = self._down(payload)
        if outgoing is None:
            self._proxy.stats.dropped_down += 1
            return
        message, binary = outgoing
        self._send_message(b"", binary, topics.sse_event(message, binary), len(message))

    def _send_resumable(self, position: bytes, message: bytes, kind: bytes) -> None:
        """
        A resuming stream's message (L{Resumer}'s C{send}): the envelope's
        header is its position (empty for a plain C{:down} message); one
        with a position moves the cursor, and says so in its id.
        """
        if self._state is not OPEN:
            return
        binary = frames.kind_binary(message, kind)
        if binary is None:
            self._proxy.stats.dropped_down += 1
            return
        data = topics.sse_event(message, binary, position)
        if position:
            self._cursor = position
            data = b"id: " + self._event_id() + b"\n" + data
        self._send_message(position, binary, data, len(message))

    def _event_id(self) -> bytes:
        """
        The stream's whole cursor: its session position, then
        C{<topic>@<position>} for each topic it resumes.
        """
        return b" ".join([self._cursor or b"",
                          *[t + b"@" + p for t, p in self._topic_cursor.items()]])

    def _send_control(self, report: dict[str, object]) -> None:
        """
        What a WebSocket connection gets as a control frame (the recovery
        report): an event named by its C{type}. A recovery report says
        where the stream now is: its id is the cursor from there.
        """
        if self._state is not OPEN:
            return
        name = str(report.get("type", "control")).encode()
        position = report.get("position")
        if name == b"recovery" and isinstance(position, str) and position != "None":
            topic = report.get("topic")
            if isinstance(topic, str):
                self._topic_cursor[topic.encode()] = position.encode()
            else:
                self._cursor = position.encode()
            self._put(b"id: " + self._event_id() + b"\n" + named_event(name, report))
        else:
            self._put(named_event(name, report))

    def _send_message(self, data: bytes, binary: bool, framed: bytes, size: int) -> None:
        """
        Send one message's event (C{framed}, built by L{topics.sse_event};
        C{data} is the envelope's header, if any: a resuming labelled
        stream's topic message C{#<topic> <position>} moves its cursor and
        gets its id), counted; a client that leaves more than
        C{WS_MAX_SEND_BUFFER_BYTES} unsent is dropped (nothing can tell it).
        """
        if self._cursor is not None and data[:1] == b"#":
            topic, sep, position = data[1:].partition(b" ")
            if sep:
                self._topic_cursor[topic] = position
                framed = b"id: " + self._event_id() + b"\n" + framed
        self._write(framed)
        self.messages_out += 1
        self.bytes_out += size
        stats = self._proxy.stats
        stats.messages_down += 1
        stats.bytes_down += size
        if self._paused:
            self._unsent += len(framed)
            if self._unsent > self.max_send_buffer:
                self._slow_consumer()

    def _write(self, data: bytes) -> None:
        """
        Write one message's event (topic fan-out writes here directly, and
        counts the rest).
        """
        self._proxy.stats.sse_messages_down += 1
        self._put(data)

    def _put(self, data: bytes) -> None:
        request = self._request
        if request is None or request.finished or self._state is not OPEN:
            return
        request.write(data)

    def _slow_consumer(self) -> None:
        self._closing("slow_consumer")
        self._proxy.stats.slow_consumer_closes += 1
        self._log.warn(
            "slow consumer, dropping an SSE stream: session={session_id} peer={peer} "
            "unsent={unsent}B", session_id=self.session_id, peer=self.peer,
            unsent=self._unsent,
        )
        self.dropConnection(abort=True)

    # IPushProducer: the HTTP channel tells us when the socket is full

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._unsent = 0

    def resumeProducing(self) -> None:
        self._paused = False
        self._unsent = 0

    def stopProducing(self) -> None:
        self._paused = False

    # the upstream valve's: a stream reads nothing from its client
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    # -- closing -----------------------------------------------------------

    def _closing(self, closed_by: ClosedBy) -> None:
        states.advance(self, CLOSING)
        self._closed_by = closed_by

    def _close(self, code: int, reason: str, closed_by: ClosedBy) -> None:
        """
        The proxy closes the stream: a C{close} event, then the response
        ends (and the connection with it: EventSource reconnects on a new
        one).
        """
        request = self._request
        self._closing(closed_by)
        if request is not None and not request.finished and request.channel is not None:
            request.write(named_event(b"close", {"code": code, "reason": reason}))
        self._end(code, reason)
        if request is not None and not request.finished and request.channel is not None:
            channel: Any = request.channel
            channel.persistent = False
            request.unregisterProducer()
            request.finish()

    def server_close(self, code: int, reason: str) -> None:
        """
        A backend asked for the session's connections to close
        (C{wsproxy:control}).
        """
        if self._state is OPEN:
            self._close(code, reason, "server")

    def going_away(self) -> None:
        """
        Shutdown: close 1001, or drop a stream still being admitted.
        """
        if self._state in SESSION_OPEN:
            self._close(GOING_AWAY, "server shutting down", "shutdown")
        elif self._state is ADMITTING:
            self.dropConnection(abort=True)

    def token_expired(self) -> None:
        if self._state is OPEN:
            self._close(TOKEN_EXPIRED, "token expired", "token_expired")

    def topic_change(self, change: Any, names: list[str]) -> None:
        """
        TOPICS: a backend's join or leave (L{wsproxy.websocket.fanout}).
        """
        fanout.topic_change(cast(Any, self), change, names)

    def drop(self, why: str) -> defer.Deferred[None]:
        self._log.info("dropping an SSE stream ({why}): session={session_id} peer={peer}",
                       why=why, session_id=self.session_id, peer=self.peer)
        self.dropConnection(abort=True)
        return self.closed

    def dropConnection(self, abort: bool = False) -> None:
        request = self._request
        channel: Any = request.channel if request is not None else None
        transport: Any = getattr(channel, "transport", None)
        if transport is None:
            return
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def _finished(self, result: object) -> None:
        """
        The response is over: finished by the proxy, or the client left.
        """
        if isinstance(result, Failure) and self._closed_by is None:
            self._closed_by = "client"
        self._end(None, None)
        states.advance(self, CLOSED)
        self.state = STATE_CLOSED
        self._proxy.connections.discard(self)
        self._request = None
        if not self.closed.called:
            self.closed.callback(None)

    def _end(self, code: Optional[int], reason: Optional[str]) -> None:
        """
        The stream's part in its session is over (L{ENDED}): released, no
        longer counted, its close event and log line out. Once.
        """
        was_open = self._state in SESSION_OPEN
        if not states.advance(self, ENDED):
            return
        proxy = self._proxy
        admission, self._admission = self._admission, None
        if admission is not None and not admission.called:
            admission.cancel()
        subscriptions, self._subscriptions = self._subscriptions, []
        proxy.release(subscriptions)
        if proxy.topics is not None:
            # (its leave events before its close event)
            fanout.leave_all(cast(Any, self), was_open)
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and heartbeat.running:
            heartbeat.stop()
        if self._resumer is not None:
            self._resumer.closed = True
        self._early = []
        if not was_open:
            return
        proxy.stats.open_connections -= 1
        proxy.stats.sse_connections_open -= 1
        session_id = self.session_id
        assert session_id is not None
        proxy.closed(session_id, self)
        closed_by = self._closed_by or "client"
        if proxy.events.enabled:
            proxy.events.publish(session_id, self._event(
                "close", code=code, reason=reason or "", closed_by=closed_by,
                duration=round(time.time() - self._opened_at, 6),
                messages_in=0, bytes_in=0,
                messages_out=self.messages_out, bytes_out=self.bytes_out,
            ))
        self._log.info(
            "closed: session={session_id} agent={agent_id} peer={peer} "
            "code={code} in=0/0B out={messages_out}/{bytes_out}B transport=sse",
            session_id=session_id, agent_id=self.agent_id, peer=self.peer, code=code,
            messages_out=self.messages_out, bytes_out=self.bytes_out,
        )
