"""
Ending a proxied WebSocket session, and what the TCP connection does
after (for L{wsproxy.websocket.protocol.ProxyProtocol}, which calls these
from its Autobahn-facing methods: module functions, not an object per
connection).

The session ends (subscriptions released, the close event and
the C{closed:} log line out, no longer counted as open) at the decision: the
first close frame the proxy sends, its own or its answer to the client's
(L{wsproxy.websocket.protocol.ProxyProtocol.sendCloseFrame}), or the TCP connection's end, whichever
comes first. What the TCP connection does after that:

  - the client closed (a valid close frame): the proxy answers and closes
    the TCP connection, what is written first, then FIN;
  - the client sent an invalid close frame (FIN unset, RSV bits, unmasked,
    a payload of 1 byte or over 125, code 1005, 1006, below 1000, 1004,
    1014-2999 or 5000 and up, a reason that is not UTF-8): close 1002, then
    the TCP connection is closed the same way; the client's close frame was
    its last word, nothing is waited for (L{wsproxy.websocket.protocol.ProxyProtocol.onCloseFrame});
  - the proxy closes (a backend's close request, 1011, 1008 for an invalid
    envelope, 1002/1007/1009 for a protocol error, 1001 at shutdown): it
    waits for the client's close frame for C{closeHandshakeTimeout} (5 s;
    at shutdown the grace period, then the shutdown drops it), then drops
    the connection;
  - except a client closed for its own fault (a slow consumer, a protocol
    error) that is not reading (its transport paused the protocol: the
    socket did not take what was written before the close frame): dropped
    at once, with no wait. It gets its close frame only if its socket takes
    it then, with all that waited before it (the connection is then closed
    after it, else reset). A slow consumer is not reading by definition.

A TCP connection closed after its closing handshake (the first two cases,
and after the client's answer) that is still there C{closeHandshakeTimeout}
later, because the client does not take what is left, is dropped
(L{wsproxy.websocket.protocol.ProxyProtocol.dropConnection}).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from autobahn.websocket.protocol import WebSocketProtocol

from ..fast.sockwrite import plain_socket
from ..session import frames
from . import fanout, states
from .states import ENDED, SESSION_OPEN

if TYPE_CHECKING:
    from .protocol import ProxyProtocol

#: close codes the proxy sends
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
#: JWT_EXPIRE_CONNECTIONS: the token's exp passed (IANA's 3000,
#: "Unauthorized"): reconnect with a fresh token
TOKEN_EXPIRED = 3000

#: who closed a connection for the client's own fault: such a client, if it
#: is not reading, is dropped right after the close frame
CLIENTS_FAULT = frozenset({"slow_consumer", "protocol_error"})
#: close codes a client may send (RFC 6455 7.4): as Autobahn judges them
CLIENT_CLOSE_CODES = frozenset(WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED) | frozenset(
    range(3000, 5000)
)


def valid_close(frame: Any, code: Optional[int], reason: Optional[bytes]) -> bool:
    """
    Whether a client's close frame is valid (RFC 6455 5.5, 5.5.1, 7.4):
    one masked frame (FIN set, no RSV bits) with no payload or 2 to 125
    bytes of it, a code a client may send (not below 1000, 1004-1006,
    1014-2999, 5000 and up) and a UTF-8 reason.
    """
    if (frame is None or not frame.fin or frame.rsv or frame.mask is None
            or frame.length == 1 or frame.length > 125):
        return False
    if code is not None and code not in CLIENT_CLOSE_CODES:
        return False
    return reason is None or frames.is_utf8(reason)


def end_session(protocol: ProxyProtocol, code: Optional[int], reason: Optional[str]) -> None:
    """
    The connection's part in its session is over (L{ENDED}): what it
    subscribed is released, it no longer counts as open, and its close
    event and log line go out. Called once, at the first of: the proxy
    sends a close frame (its own, or its answer to the client's:
    C{sendCloseFrame}), or the TCP connection is gone (C{onClose},
    C{connectionLost}). The TCP connection itself may live on for the
    closing handshake; it stays in C{proxy.connections} (a descriptor
    held; shutdown waits for it) until C{connectionLost}.
    """
    was_open = protocol._state in SESSION_OPEN
    if not states.advance(protocol, ENDED):
        return
    proxy = protocol._proxy
    admission = protocol._admission
    if admission is not None and not admission.called:
        # the client left mid-admission: nothing stays subscribed
        admission.cancel()
    subscriptions, protocol._subscriptions = protocol._subscriptions, []
    proxy.release(subscriptions)
    if proxy.topics is not None:
        # (its leave events before its close event)
        fanout.leave_all(protocol, was_open)
    if protocol._resumer is not None:
        protocol._resumer.closed = True
    protocol.__dict__.pop("_early", None)
    if not was_open:
        return
    proxy.stats.open_connections -= 1
    session_id = protocol.session_id
    assert session_id is not None
    proxy.closed(session_id, protocol)
    if protocol.closedByMe and protocol.localCloseCode is not None:
        # the proxy's own close frame (the client may echo 1000)
        code = protocol.localCloseCode
        reason = (protocol.localCloseReason or b"").decode("utf-8", "replace")
    elif code is None:
        code = protocol.remoteCloseCode
    if proxy.events.enabled:
        closed_by = protocol._closed_by or (
            "protocol_error" if protocol.failedByMe else "client"
        )
        proxy.events.publish(session_id, protocol._event(
            "close",
            code=code,
            reason=reason or protocol.remoteCloseReason or "",
            closed_by=closed_by,
            duration=round(time.time() - protocol._opened_at, 6),
            messages_in=protocol.messages_in, bytes_in=protocol.bytes_in,
            messages_out=protocol.messages_out, bytes_out=protocol.bytes_out,
        ))
    protocol._log.info(
        "closed: session={session_id} agent={agent_id} peer={peer} "
        "code={code} in={messages_in}/{bytes_in}B out={messages_out}/{bytes_out}B",
        session_id=session_id,
        agent_id=protocol.agent_id,
        peer=protocol.peer,
        code=code,
        messages_in=protocol.messages_in,
        bytes_in=protocol.bytes_in,
        messages_out=protocol.messages_out,
        bytes_out=protocol.bytes_out,
    )


def after_close_frame(protocol: ProxyProtocol, code: Optional[int], is_reply: bool) -> None:
    """
    The proxy sent the first close frame of an open session: the decision.
    The session ends now; a client closed for its own fault (a protocol
    error, a slow consumer) that is not reading (the transport paused the
    protocol: what was written before the close frame is still waiting) is
    dropped at once (L{drop_not_reading}).
    """
    if is_reply:
        end_session(protocol, protocol.remoteCloseCode, protocol.remoteCloseReason)
        return
    if protocol._closed_by is None and protocol.failedByMe:
        protocol._closed_by = "protocol_error"
    end_session(protocol, code, None)
    if protocol._paused and protocol._closed_by in CLIENTS_FAULT:
        drop_not_reading(protocol)


def drop_not_reading(protocol: ProxyProtocol) -> None:
    """
    Drop a client that is not reading, right after its close frame.
    On a plain TCP socket what waits for it, the close frame last, is
    offered to the socket once more: if the socket takes all of it, the
    connection is closed after it (FIN: the kernel delivers it if the
    client reads again); otherwise, and over TLS, it is reset.
    """
    protocol.wasClean = False
    protocol.wasNotCleanReason = "not reading: dropped after its close frame"
    direct = plain_socket(protocol.transport)
    if direct is not None and not direct.disconnecting:
        failed = direct.doWrite()
        if failed is None and not (direct.dataBuffer or direct._tempDataBuffer):
            protocol.dropConnection(abort=False)
            return
    protocol.dropConnection(abort=True)


def closing_handshake_over(protocol: ProxyProtocol, valid: bool, code: Optional[int],
                           reason: Optional[bytes]) -> None:
    """
    A client's close frame after the proxy's own (the answer to it, or an
    invalid close frame whose header made Autobahn send 1002) ends the
    closing handshake: the TCP connection is closed after the proxy's close
    frame. (Autobahn would reset it, throwing away a 1002 written in the
    same turn, and answer a reason that is not UTF-8 with 1007.)
    """
    call = protocol.closeHandshakeTimeoutCall
    if call is not None:
        call.cancel()
        protocol.closeHandshakeTimeoutCall = None
    if valid:
        protocol.remoteCloseCode = code
        protocol.remoteCloseReason = None if reason is None else reason.decode("utf-8")
        protocol.wasClean = True
    else:
        protocol.wasClean = False
        protocol.wasNotCleanReason = "invalid close frame"
    protocol.dropConnection(abort=False)
