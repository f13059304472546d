"""
Delivering backend messages to one WebSocket connection, beyond the
common case: resumable sessions' data frames and control frames,
compressed sends, closing a slow consumer, and the listeners a
connection subscribes with besides itself (the hub calls their
C{deliver}). Module functions taking the protocol, bound as methods of
L{wsproxy.websocket.protocol.ProxyProtocol} (no object per connection).

The per-message send path itself (C{deliver}, C{_send_message},
C{_write}: one frame built per payload and shared by a session's
sockets, written straight to a plain TCP socket, see
L{wsproxy.fast.sockwrite}) stays on the protocol: no call layer added.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol

from ..session import frames
from ..session.resume import Resumer
from .closing import POLICY_VIOLATION
from .states import ADMITTING, OPEN

if TYPE_CHECKING:
    from .protocol import ProxyProtocol

STATE_OPEN = WebSocketProtocol.STATE_OPEN


def send_resumable(protocol: ProxyProtocol, position: bytes, message: bytes, kind: bytes) -> None:
    """
    A resumable session's data frame (see L{wsproxy.session.resume}):
    C{<position>\\n<message>}, an empty position for plain C{:down}
    messages; a message declared text that is not UTF-8 is dropped.
    """
    if protocol._state is not OPEN or protocol.state != STATE_OPEN:
        return
    binary = frames.kind_binary(message, kind)
    if binary is None:
        protocol._proxy.stats.dropped_down += 1
        return
    data = position + b"\n" + message
    protocol._send_message(data, binary, frames.frame(data, binary), len(message))


def send_control(protocol: ProxyProtocol, event: dict[str, object]) -> None:
    """
    A control frame: C{!} and the event as JSON.
    """
    if protocol._state is not OPEN or protocol.state != STATE_OPEN:
        return
    protocol.sendMessage(b"!" + json.dumps(event, separators=(",", ":")).encode(), False)


def send_compressed(protocol: ProxyProtocol, data: bytes, is_binary: bool) -> None:
    """
    A message sent compressed (permessage-deflate), whatever its size.
    """
    # Autobahn applies maxMessagePayloadSize to what it sends, too; the
    # limit is meant for clients only.
    limit: int = getattr(protocol, "maxMessagePayloadSize")
    setattr(protocol, "maxMessagePayloadSize", 0)
    try:
        protocol.sendMessage(data, is_binary)
    finally:
        setattr(protocol, "maxMessagePayloadSize", limit)


def slow_consumer(protocol: ProxyProtocol) -> None:
    """
    More than C{max_send_buffer} waits for a client that is not reading:
    close 1008, the session ends now, and the connection is dropped at
    once (L{closing.drop_not_reading}): the close frame is written behind
    what is waiting, so the client gets it only if its socket takes all that.
    """
    protocol._closing("slow_consumer")
    protocol._proxy.stats.slow_consumer_closes += 1
    protocol._log.warn(
        "slow consumer, closing with 1008: session={session_id} peer={peer} "
        "unsent={unsent}B", session_id=protocol.session_id, peer=protocol.peer,
        unsent=protocol._unsent,
    )
    protocol.sendCloseFrame(code=POLICY_VIOLATION, reasonUtf8=b"slow consumer", isReply=False)


class PlainSink:
    """
    A resuming connection's listener on the plain C{:down} channel.
    """

    __slots__ = ("_resumer", "_down")

    def __init__(self, resumer: Resumer, down: Any) -> None:
        self._resumer = resumer
        self._down = down

    def deliver(self, payload: bytes) -> None:
        out = self._down(payload)
        if out is not None:
            self._resumer.plain(out[0], b"b" if out[1] else b"t")


class PrefixedSink:
    """
    The C{:down} listener of an acknowledging client that does not resume:
    each message is sent as C{\\n<message>} (an empty position), the data
    frame form of resumable sessions, so it cannot be read as a control
    frame.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: ProxyProtocol) -> None:
        self._protocol = protocol

    def deliver(self, payload: bytes) -> None:
        protocol = self._protocol
        if protocol._state is ADMITTING:
            protocol._keep_early(payload)
            return
        out = protocol._down(payload)
        if out is None:
            protocol._proxy.stats.dropped_down += 1
        else:
            protocol._send_resumable(b"", out[0], b"b" if out[1] else b"t")


class LiveSink:
    """
    A resuming connection's listener on C{session:S:live}.
    """

    __slots__ = ("_resumer",)

    def __init__(self, resumer: Resumer) -> None:
        self._resumer = resumer

    def deliver(self, payload: bytes) -> None:
        self._resumer.live(payload)
