"""
Client messages of one WebSocket connection, beyond the common case:
what a failed publish does, and durable upstream (C{UPSTREAM=stream}:
the C{XADD} of each message, its ack or nack, pausing a client with too
many appends in flight). Module functions taking the protocol (for
L{wsproxy.websocket.protocol.ProxyProtocol}): no object per connection.

The common case, C{onMessage} → C{PUBLISH} (or the invalid-JSON reply),
stays on the protocol, with no call layer added; it calls L{append} for
a durable connection, as it called its own method before.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol

from ..session.upstream import (
    Appender,
    InvalidEnvelope,
    ack_frame,
    entry_id,
    failure_reason,
    nack,
    split_envelope,
)
from .closing import INTERNAL_ERROR, POLICY_VIOLATION
from .states import ADMITTING, OPEN

if TYPE_CHECKING:
    from .protocol import ProxyProtocol

#: the answer to a text message that is not JSON (C{REQUIRE_JSON})
INVALID_JSON_REPLY = b'{"error":"Invalid JSON format"}'

STATE_OPEN = WebSocketProtocol.STATE_OPEN


def publish_failed(protocol: ProxyProtocol, error: Any) -> None:
    """
    A client message could not be published (or appended, without an id to
    nack): close 1011, the proxy's decision (L{CLOSING}).
    """
    if protocol._state is not OPEN:
        return
    protocol._closing("error")
    protocol._proxy.stats.publish_failures += 1
    protocol._log.error(
        "publish failed, closing with 1011: session={session_id} peer={peer}: {why}",
        session_id=protocol.session_id,
        peer=protocol.peer,
        why=str(error),
    )
    protocol.sendCloseFrame(
        code=INTERNAL_ERROR, reasonUtf8=b"message could not be delivered", isReply=False
    )


def append(protocol: ProxyProtocol, appender: Appender, payload: bytes, binary: bool) -> None:
    """
    A durable connection's message: its envelope read (C{?ack=1}; an
    invalid one closes 1008), the invalid-JSON reply or nack, else one
    C{XADD}; a client with too many appends in flight stops being read.
    """
    message_id = b""
    if protocol._acked:
        try:
            message_id, payload = split_envelope(payload)
        except InvalidEnvelope:
            protocol._closing("protocol_error")
            protocol._log.info(
                "invalid message envelope, closing with 1008: session={session_id} "
                "peer={peer}", session_id=protocol.session_id, peer=protocol.peer,
            )
            protocol.sendCloseFrame(code=POLICY_VIOLATION,
                                    reasonUtf8=b"a message must start with its id and a newline",
                                    isReply=False)
            return
    if protocol.factory.require_json and not binary:
        try:
            json.loads(payload)
        except ValueError:
            if message_id:
                protocol._send_control(nack(message_id, "invalid JSON"))
            else:
                protocol.sendMessage(INVALID_JSON_REPLY, False)
            return
    protocol.messages_in += 1
    protocol.bytes_in += len(payload)
    proxy = protocol._proxy
    stats = proxy.stats
    stats.messages_up += 1
    stats.bytes_up += len(payload)
    stats.upstream_in_flight += 1
    in_flight = protocol._in_flight
    in_flight.append(message_id)
    if len(in_flight) >= protocol.factory.max_in_flight and not protocol._flight_paused:
        # Redis is slower than this client: stop reading from it
        protocol._flight_paused = True
        transport: Any = protocol.transport
        transport.pauseProducing()
    proxy.commands.send_encoded(
        appender.command(payload, binary, message_id), protocol._on_append_reply
    )


def send_ack(protocol: ProxyProtocol, frame: bytes) -> None:
    """
    An ack frame for the client, written as is when uncompressed; a client
    that does not read its acks is a slow consumer too.
    """
    if protocol._state is not OPEN or protocol.state != STATE_OPEN:
        return
    if protocol._perMessageCompress is None:
        # one unfragmented text frame, written as is (no masking from a
        # server): Autobahn's sendMessage costs more than the append
        size = len(frame)
        if size < 126:
            protocol._write(b"\x81%c%b" % (size, frame))
        else:
            protocol._write(b"\x81\x7e%b%b" % (size.to_bytes(2, "big"), frame))
    else:
        protocol.sendMessage(frame, False)
    if protocol._paused:
        # a client that sends but does not read its acks is a slow consumer too
        protocol._unsent += len(frame)
        if protocol._unsent > protocol.factory.max_send_buffer:
            protocol._slow_consumer()


def append_replied(protocol: ProxyProtocol, reply: Any) -> None:
    """
    Redis answered an C{XADD} (in order): ack or nack the message, and read
    from the client again once half its appends are answered.
    """
    in_flight = protocol._in_flight
    message_id = in_flight.popleft()
    stats = protocol._proxy.stats
    stats.upstream_in_flight -= 1
    position = entry_id(reply)
    if position is not None:
        stats.upstream_appended += 1
        if message_id:
            stats.upstream_acks += 1
            send_ack(protocol, ack_frame(message_id, position))
    else:
        stats.upstream_append_failures += 1
        if message_id:
            stats.upstream_nacks += 1
            reason = failure_reason(reply)
            protocol._send_control(nack(message_id, reason))
            protocol._proxy.append_failed(protocol.session_id, reason)
        else:
            # no way to tell this client which message failed
            publish_failed(protocol, reply)
    if protocol._flight_paused and len(in_flight) <= protocol.factory.max_in_flight // 2:
        protocol._flight_paused = False
        transport: Any = protocol.transport
        if (protocol._state is not ADMITTING and transport is not None
                and not protocol._proxy.valve.paused):
            transport.resumeProducing()
