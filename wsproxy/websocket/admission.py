"""
The admission of one WebSocket connection, in order, and its open
(for L{wsproxy.websocket.protocol.ProxyProtocol}, whose C{onConnect},
C{failHandshake} and C{onOpen} call these: module functions, not an
object per connection).

Data flows one way: upgrade request → L{start} (route, precheck, resume
plan, acknowledgements, token, subscription confirmed by Redis, each
decided by L{Proxy}: L{admit} in general, plain callbacks for a header
token the site already compared) → 101 and L{open_session}, or a refusal
(L{refuse}, then L{fail_handshake}: one response, one log line).

Who owns the session's subscription: the hub while it is being confirmed
(it releases it on any failure, or when the admission is cancelled because
the client left), the protocol from then on (released in
L{wsproxy.websocket.closing.end_session}).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional, Sequence

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.python.failure import Failure

from ..fast.sockwrite import Pending, plain_socket
from ..names import down_channel, live_channel, up_channel
from ..redis.pubsub import Listener
from ..refusal import CLIENT_LEFT, Refusal, refusal_for
from ..session import auth, topics, upstream
from ..session.proxy import Compared, ResumeRequest
from ..session.resume import Resumer
from ..session.upstream import Appender
from ..session.webtoken import Grant
from . import fanout, states
from .downstream import LiveSink, PlainSink, PrefixedSink
from .fanout import Joining
from .states import OPEN

if TYPE_CHECKING:
    from .protocol import ProxyProtocol


def redact(reason: str) -> str:
    """
    Autobahn's own refusal reasons quote request headers and the request
    line (which may carry a token); keep only the text before the first
    quoted value.
    """
    for mark in ('"', "'"):
        reason = reason.split(mark, 1)[0]
    return reason.strip().rstrip(":-").strip() or "Bad request"


def start(protocol: ProxyProtocol, request: Any) -> defer.Deferred[Optional[str]]:
    """
    The admission (L{admit}), as the Deferred Autobahn waits on and a
    client that leaves cancels (L{wsproxy.websocket.closing.end_session}).

    The common case, a header token the site already found good
    (L{ProxyProtocol.compared_by_site}) and a plain session, is only a
    subscription: it runs as plain callbacks on the hub's Deferred
    (L{Proxy.subscribe_compared}: the same deadline, the same release of
    the subscription on every failure, the same cancellation), without
    the coroutine and Deferred layers of L{admit} and L{Proxy.authorize}
    (about a tenth of a set-up's CPU).
    """
    try:
        prepared = _prepare(protocol, request)
    except BaseException:
        # as the coroutine would: its refusals (and anything unexpected)
        # fail the admission's Deferred before it waits on anything
        return defer.fail()
    session_id, agent_id, credentials, subscriptions, resume, compared, joining = prepared
    if compared is None or resume is not None or joining is not None or len(subscriptions) != 1:
        return defer.ensureDeferred(admit(protocol, request, prepared))
    assert credentials is not None  # compared: the request's own token
    channel, listener = subscriptions[0]
    d = protocol._proxy.subscribe_compared(channel, listener, compared[2])
    return d.addCallback(_subscribed, protocol, compared[2].grant, subscriptions, credentials)


def _subscribed(_: object, protocol: ProxyProtocol, grant: Grant,
                subscriptions: list[tuple[str, Listener]],
                credentials: auth.Credentials) -> Optional[str]:
    protocol._recovery = None
    return _admitted(protocol, grant, subscriptions, credentials)


_Prepared = tuple[str, str, Optional[auth.Credentials], list[tuple[str, Listener]],
                  Optional[ResumeRequest], Optional[tuple[str, str, Compared]],
                  Optional[Joining]]


def _prepare(protocol: ProxyProtocol, request: Any) -> _Prepared:
    """
    The admission's steps before Redis: route, precheck, resume plan,
    acknowledgements, the credentials and the subscriptions to make; each
    raises its L{Refusal}.
    """
    proxy = protocol._proxy
    agent_id, session_id = proxy.route(request.path)
    protocol.agent_id = agent_id
    protocol.session_id = session_id
    proxy.precheck(request.headers)
    resume = proxy.resume_request(protocol.http_request_uri)
    acked = protocol._acked = upstream.ack_request(
        protocol.http_request_uri, proxy.settings.upstream == "stream"
    )
    labels = protocol._labels = topics.labels_request(
        protocol.http_request_uri, proxy.topics is not None
    )
    positions = topics.topic_positions(protocol.http_request_uri, resume is not None, labels)
    credentials = auth.extract_token(request.headers, request.params, request.protocols)
    subscriptions = session_subscriptions(protocol, session_id, resume, acked or labels)
    # consumed here: the connection keeps no token
    compared, protocol._compared = protocol._compared, None
    if compared is not None and (
        credentials is None or compared[:2] != (session_id, credentials.token)
    ):
        compared = None
    joining = None
    if proxy.topics is not None:
        joining = Joining(protocol, positions)
        # a backend's topic change from now on reaches this connection
        proxy.admitting_started(session_id, protocol)
    return session_id, agent_id, credentials, subscriptions, resume, compared, joining


def session_subscriptions(connection: ProxyProtocol, session_id: str,
                          resume: Optional[ResumeRequest],
                          enveloped: bool) -> list[tuple[str, Listener]]:
    """
    The channels of its session a connection subscribes, with their
    listeners: C{:down} alone (the connection itself, or, when C{enveloped},
    a L{PrefixedSink}), or for a resuming one C{:down} and C{:live} through
    its L{Resumer} (made here). The WebSocket admission's and the
    Server-Sent Events stream's (L{wsproxy.edge.sse}).
    """
    proxy = connection._proxy
    if resume is None and enveloped:
        # control frames go to this client: data frames down get the
        # resumable sessions' envelope (an empty position) so that no
        # backend message can pass for one
        return [(down_channel(session_id), PrefixedSink(connection))]
    if resume is None:
        return [(down_channel(session_id), connection)]
    resumer = connection._resumer = Resumer(
        connection._send_resumable,
        connection._send_control,
        lambda after: proxy.read_history(session_id, after),
        proxy.stats,
    )
    return [
        (down_channel(session_id), PlainSink(resumer, connection._down)),
        (live_channel(session_id), LiveSink(resumer)),
    ]


async def admit(protocol: ProxyProtocol, request: Any, prepared: _Prepared) -> Optional[str]:
    """
    The whole admission, in order (L{_prepare}, then L{Proxy.authorize});
    each step raises its L{Refusal}.

    @return: the subprotocol to answer with, if any.
    """
    proxy = protocol._proxy
    session_id, agent_id, credentials, subscriptions, resume, compared, joining = prepared
    try:
        protocol._recovery, grant = await proxy.authorize(
            session_id, agent_id, credentials, subscriptions, resume,
            None if compared is None else compared[2], joining,
        )
    except Refusal as refusal:
        if refusal.code in (401, 403):
            # the credentials were refused: counts towards AUTH_FAIL_LIMIT
            proxy.auth_failed(protocol._client(request.headers))
        raise
    assert credentials is not None
    return _admitted(protocol, grant, subscriptions, credentials)


def _admitted(protocol: ProxyProtocol, grant: Grant,
              subscriptions: list[tuple[str, Listener]],
              credentials: auth.Credentials) -> Optional[str]:
    """
    The credentials are good and Redis confirmed the subscriptions.
    """
    proxy = protocol._proxy
    if grant.expires is not None and proxy.settings.jwt_expire_connections:
        protocol._grant = grant
    if protocol.state == WebSocketProtocol.STATE_CLOSED or protocol.droppedByMe:
        # Autobahn dropped the connection (its opening-handshake deadline)
        # in the very turn the admission finished: the drop has not
        # reached us yet, and opening now would revive a dead connection
        proxy.release(subscriptions)
        raise CLIENT_LEFT
    # admitted: the subscriptions are ours from here on
    protocol._subscriptions = subscriptions
    protocol._up_channel = up_channel(protocol.session_id or "")
    return auth.BEARER_SUBPROTOCOL if credentials.source == "subprotocol" else None


def refuse(failure: Failure, protocol: ProxyProtocol) -> None:
    """
    The admission failed: Autobahn refuses the upgrade (L{fail_handshake}).
    """
    refusal = refusal_for(failure, protocol._log, "admitting a connection")
    # kept for failHandshake without the frames it was raised through
    # (they hold this protocol: a reference cycle), and the shared
    # refusals (CLIENT_LEFT) must not keep the last connection alive
    refusal.with_traceback(None)
    protocol._refusal = refusal
    raise ConnectionDeny(refusal.code, refusal.reason)


def fail_handshake(protocol: ProxyProtocol, reason: str, code: int) -> None:
    """
    Refuse the upgrade with a complete plain-text HTTP response and one
    log line (no token, no query string).
    """
    refusal = protocol._refusal
    if refusal is None or refusal.code != code:
        refusal = Refusal(code, redact(reason))
    protocol._proxy.refused(
        refusal, protocol._client(getattr(protocol, "http_headers", None)), protocol.peer,
        protocol.session_id, protocol.agent_id,
    )
    protocol.wasNotCleanReason = refusal.reason
    protocol.sendData(refusal.response())
    # a deliberate, complete refusal: not worth Autobahn's own warning
    protocol.wasClean = True
    protocol.dropConnection(abort=False)


def open_session(protocol: ProxyProtocol) -> None:
    """
    The 101 is sent: the session opens (L{OPEN}), unless the client left
    meanwhile. Counted, its open event and log line out, the protocol
    becomes the transport's producer, and frames that came before the 101
    are sent.
    """
    if not protocol._subscriptions or not states.advance(protocol, OPEN):
        return
    proxy = protocol._proxy
    proxy.stats.open_connections += 1
    proxy.stats.outcomes["accepted"] += 1
    session_id = protocol.session_id
    assert session_id is not None
    proxy.opened(session_id, protocol)
    if protocol._grant is not None:
        proxy.expire_at(protocol, protocol._grant)
        del protocol._grant
    settings = proxy.settings
    if proxy.events.enabled or settings.upstream == "stream":
        protocol._opened_at = time.time()
        protocol._connection_id = proxy.next_connection_id()
    if proxy.events.enabled:
        proxy.events.publish(session_id, protocol._event("open"))
    if settings.upstream == "stream":
        protocol._appender = Appender(
            session_id, protocol.agent_id or "", protocol._connection_id,
            settings.upstream_partitions, settings.upstream_stream_max_length,
        )
        protocol._in_flight = deque()
        protocol._on_append_reply = protocol._append_replied
    # Under twisted.web the HTTP channel is still the transport's
    # producer; ours decides about slow consumers from here on.
    transport: Any = protocol.transport
    transport.unregisterProducer()
    transport.registerProducer(protocol, True)
    direct = plain_socket(transport)
    if direct is not None:
        protocol._out = Pending(direct)
    if proxy.valve.paused:
        protocol.pause_reading()
    fmt = "opened: session={session_id} agent={agent_id} peer={peer}"
    client = None
    if settings.trusted_proxies:
        # behind a balancer the peer is the balancer: name the client a
        # trusted proxy named, as refusal lines do
        client = protocol._client(getattr(protocol, "http_headers", None))
        if client and client not in str(protocol.peer):
            fmt += " client={client}"
    protocol._log.info(
        fmt,
        session_id=session_id,
        agent_id=protocol.agent_id,
        peer=protocol.peer,
        client=client,
    )
    # the admission is over, and frames that came before the 101 are
    # sent now: neither needs a place in the connection any more
    protocol._admission = None
    early = protocol.__dict__.pop("_early")
    protocol._compact()
    catch_up(protocol, early)


def catch_up(connection: ProxyProtocol, early: Sequence[bytes | tuple[Any, bytes]]) -> None:
    """
    A connection just opened: the messages that came before its open are
    sent (a session's as its listener would, a topic's through the
    listener that got it), then its recovery is started, then its topics'
    (L{fanout.opened}). The WebSocket's and the SSE stream's
    (L{wsproxy.edge.sse}).
    """
    enveloped = (connection._acked or connection._labels) and connection._resumer is None
    for payload in early:
        if isinstance(payload, tuple):
            # a topic's, with the listener that got it
            listener, message = payload
            listener.deliver(message)
        elif enveloped:
            PrefixedSink(connection).deliver(payload)
        else:
            connection.deliver(payload)
    if connection._resumer is not None and connection._recovery is not None:
        connection._resumer.start(connection._recovery)
    if connection._proxy.topics is not None:
        fanout.opened(connection)
