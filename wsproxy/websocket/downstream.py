"""
Delivering backend messages to one WebSocket connection: the listeners a
connection subscribes with besides itself (the hub calls their
C{deliver}). The per-message send path itself (C{deliver},
C{_send_message}, C{_write}) stays on
L{wsproxy.websocket.protocol.ProxyProtocol}: no call layer added there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..session.resume import Resumer
from .states import ADMITTING

if TYPE_CHECKING:
    from .protocol import ProxyProtocol


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
