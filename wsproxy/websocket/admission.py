"""
The admission of one WebSocket connection, in order, and its open
(for L{wsproxy.websocket.protocol.ProxyProtocol}, whose C{onConnect},
C{failHandshake} and C{onOpen} call these: module functions, not an
object per connection).

Data flows one way: upgrade request → L{admit} (route, precheck, resume
plan, acknowledgements, token, subscription confirmed by Redis, each
decided by L{Proxy}) → 101 and L{open_session}, or a refusal
(L{refuse}, then L{fail_handshake}: one response, one log line).

Who owns the session's subscription: the hub while it is being confirmed
(it releases it on any failure, or when the admission is cancelled because
the client left), the protocol from then on (released in
L{wsproxy.websocket.closing.end_session}).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.python.failure import Failure

from ..fast.sockwrite import Pending, plain_socket
from ..names import down_channel, live_channel, up_channel
from ..redis.pubsub import Listener
from ..refusal import CLIENT_LEFT, Refusal, refusal_for
from ..session import auth, upstream
from ..session.resume import Resumer
from ..session.upstream import Appender
from . import states
from .downstream import LiveSink, PlainSink, PrefixedSink
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


async def admit(protocol: ProxyProtocol, request: Any) -> Optional[str]:
    """
    The whole admission, in order; each step raises its L{Refusal}.

    @return: the subprotocol to answer with, if any.
    """
    proxy = protocol._proxy
    protocol.agent_id, session_id = proxy.route(request.path)
    protocol.session_id = session_id
    proxy.precheck(request.headers)
    resume = proxy.resume_request(protocol.http_request_uri)
    acked = protocol._acked = upstream.ack_request(
        protocol.http_request_uri, proxy.settings.upstream == "stream"
    )
    credentials = auth.extract_token(request.headers, request.params, request.protocols)
    subscriptions: list[tuple[str, Listener]]
    if resume is None and acked:
        # control frames go to this client: data frames down get the
        # resumable sessions' envelope (an empty position) so that no
        # backend message can pass for one
        subscriptions = [(down_channel(session_id), PrefixedSink(protocol))]
    elif resume is None:
        subscriptions = [(down_channel(session_id), protocol)]
    else:
        resumer = protocol._resumer = Resumer(
            protocol._send_resumable,
            protocol._send_control,
            lambda after: proxy.read_history(session_id, after),
            proxy.stats,
        )
        subscriptions = [
            (down_channel(session_id), PlainSink(resumer, protocol._down)),
            (live_channel(session_id), LiveSink(resumer)),
        ]
    # consumed here: the connection keeps no token
    compared, protocol._compared = protocol._compared, None
    if compared is not None and (
        credentials is None or compared[:2] != (session_id, credentials.token)
    ):
        compared = None
    try:
        protocol._recovery, grant = await proxy.authorize(
            session_id, protocol.agent_id, credentials, subscriptions, resume,
            None if compared is None else compared[2],
        )
    except Refusal as refusal:
        if refusal.code in (401, 403):
            # the credentials were refused: counts towards AUTH_FAIL_LIMIT
            proxy.auth_failed(protocol._client(request.headers))
        raise
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
    protocol._up_channel = up_channel(session_id)
    assert credentials is not None
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
    protocol._log.info(
        "opened: session={session_id} agent={agent_id} peer={peer}",
        session_id=session_id,
        agent_id=protocol.agent_id,
        peer=protocol.peer,
    )
    # the admission is over, and frames that came before the 101 are
    # sent now: neither needs a place in the connection any more
    protocol._admission = None
    early = protocol.__dict__.pop("_early")
    protocol._compact()
    for payload in early:
        if protocol._acked and protocol._resumer is None:
            PrefixedSink(protocol).deliver(payload)
        else:
            protocol.deliver(payload)
    if protocol._resumer is not None and protocol._recovery is not None:
        protocol._resumer.start(protocol._recovery)
