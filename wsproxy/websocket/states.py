"""
The states of one proxied WebSocket connection
(L{wsproxy.websocket.protocol.ProxyProtocol}), and every transition
between them, in one place (L{advance}).

This is the proxy's view of the connection: its session's part in it.
Autobahn keeps its own C{state} (connecting, open, closing, closed: the
WebSocket protocol's), which the proxy reads but never writes; the two are
read together where both matter (a frame is sent only when both say
open).

::

    ADMITTING ──(admitted: 101 sent, onOpen)──▶ OPEN ──(the proxy decides to close)──▶ CLOSING
        │                                        │                                       │
        │ (refused, or the client left)          │ (first close frame sent,              │ (its close frame sent,
        │                                        │  or the TCP connection gone)          │  or the TCP connection gone)
        ▼                                        ▼                                       ▼
      ENDED ◀────────────────────────────────────┴───────────────────────────────────────┘
        │
        │ (the TCP connection gone: connectionLost)
        ▼
      CLOSED

  - C{ADMITTING}: the upgrade request is being admitted (route, token,
    subscription confirmed by Redis); messages for the client are kept for
    the open. Left for C{OPEN} at C{onOpen}, or for C{ENDED} when the
    admission fails or the client leaves (the admission is cancelled).
  - C{OPEN}: the session is open, counted, frames flow both ways. Left for
    C{CLOSING} when the proxy decides to close (before its close frame),
    or for C{ENDED} at the first close frame sent (its answer to the
    client's too) or when the TCP connection ends.
  - C{CLOSING}: the proxy decided to close (a slow consumer, a failed
    publish, an invalid envelope, a backend's close request, shutdown):
    nothing more is sent to the client or published for it; the session
    still counts as open. Left for C{ENDED} when its close frame is sent or
    the TCP connection ends. A shutdown's 1001 may still come (CLOSING
    again: it then says who closed).
  - C{ENDED}: the session is over (released, no longer counted, its close
    event and log line out); the TCP connection may live on for the
    closing handshake and its linger. Left for C{CLOSED} at
    C{connectionLost}.
  - C{CLOSED}: the TCP connection is gone. Never left.

A transition that is not in L{TRANSITIONS} is ignored: L{advance} says
whether it happened, and the caller does nothing more when it did not (a
second end of the same session, an open after the client left).
"""

from __future__ import annotations

import enum
from typing import Any


class State(enum.IntEnum):
    """
    The proxy's state of one connection (see the module docstring).

    An C{IntEnum} member is one immutable object per state: an idle
    connection's C{_state} is the class's default (compacted away, see
    L{wsproxy.websocket.protocol.ProxyProtocol._compact}), and the hot
    paths compare it by identity.
    """

    ADMITTING = 0
    OPEN = 1
    CLOSING = 2
    ENDED = 3
    CLOSED = 4


ADMITTING = State.ADMITTING
OPEN = State.OPEN
CLOSING = State.CLOSING
ENDED = State.ENDED
CLOSED = State.CLOSED

#: every transition there is: from a state, the states it may go to
TRANSITIONS: dict[State, frozenset[State]] = {
    ADMITTING: frozenset({OPEN, ENDED}),
    OPEN: frozenset({CLOSING, ENDED}),
    CLOSING: frozenset({CLOSING, ENDED}),
    ENDED: frozenset({CLOSED}),
    CLOSED: frozenset(),
}

#: the states in which the session is open (counted, its close event due)
SESSION_OPEN = frozenset({OPEN, CLOSING})


def advance(connection: Any, to: State) -> bool:
    """
    Move C{connection} (anything with a C{_state}) to C{to}, if
    L{TRANSITIONS} allows it.

    @return: whether it moved; if not, its state is unchanged.
    """
    if to in TRANSITIONS[connection._state]:
        connection._state = to
        return True
    return False
