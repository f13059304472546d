"""
What one open connection costs in memory, and what it leaves behind when
it closes (for L{wsproxy.websocket.protocol.ProxyProtocol}, whose
C{_compact} and C{_break_cycles} these are: functions bound as methods).

An idle connection should hold little: L{compact} shrinks its attribute
table at open. A closed one should be freed by reference counting alone,
with no cycle for the collector: L{break_cycles} cuts the ones it held
(see L{wsproxy.fast.heap}; C{tests/test_fast_heap.py} pins both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer

from .states import State

if TYPE_CHECKING:
    from .protocol import ProxyProtocol

#: containers shared through the class (see ProxyProtocol._valid_events)
SHARED = frozenset({"_valid_events", "_results", "websocket_extensions_in_use"})

#: attribute values L{compact} may share through a class default (a State
#: is one immutable object per state)
IMMUTABLE = frozenset({type(None), bool, int, float, str, bytes, State})
NUMBERS = frozenset({int, float})

#: Autobahn's attributes that only its opening handshake reads
HANDSHAKE_ONLY = (
    "http_headers", "http_request_data", "http_response_data", "http_status_line",
    "http_request_params", "http_request_path", "http_request_host", "http_request_uri",
    "websocket_protocols", "websocket_extensions", "websocket_origin", "_wskey",
)
_HANDSHAKE_ONLY = frozenset(HANDSHAKE_ONLY)
#: no default learnt yet
_UNLEARNT = object()


def compact(protocol: ProxyProtocol) -> None:
    """
    Make the open connection's attribute dictionary small.

    An open Autobahn protocol holds about 90 attributes in its instance
    dictionary, a 3 KiB table per connection, most of them flags and
    counters at the same value on every idle connection. Those whose
    value is immutable and equal to the class's default are dropped
    from the instance (reads find the default; an assignment puts the
    attribute back), what only the opening handshake read is dropped
    (the request and response, the headers parsed from them), and the
    dictionary is rebuilt at its new size (a dictionary never shrinks
    by itself). A few containers only read once open, equal on every
    connection, are the class's (C{_valid_events} and others).

    The defaults belong to the connection's own class (each factory
    makes one, with its options as class attributes), so what a read
    finds is exactly what was dropped: the first connection of that
    class to open sets them from its own values, for attributes the
    class does not have; an attribute the class has (an option, a
    default, a method the instance shadows) is never replaced and only
    dropped when the instance holds that very value. Measured with a
    fresh proxy and 10,000 idle connections: 12.2 KiB of RSS per
    connection before (with Autobahn's per-connection TrafficStats and
    an empty deque of durable-upstream appends), 5.7 KiB after.
    """
    cls = type(protocol)
    defaults = cls.__dict__.get("_learnt")
    if defaults is None:
        defaults = {}
        cls._learnt = defaults
    kept = {}
    for name, value in protocol.__dict__.items():
        # the common case first, decided as below: an immutable value that
        # is its learnt default (most of the attributes, once a connection
        # of the class has opened)
        if value is defaults.get(name, _UNLEARNT) and type(value) in IMMUTABLE:
            continue
        if name in _HANDSHAKE_ONLY:
            continue
        if name in SHARED and getattr(cls, name) == value:
            continue
        if type(value) in IMMUTABLE:
            if name not in defaults:
                if hasattr(cls, name):
                    defaults[name] = getattr(cls, name)
                else:
                    defaults[name] = value
                    setattr(cls, name, value)
            default = defaults[name]
            # the same object; or the same number (identity of strings
            # and bytes may matter to a reader, equality of numbers not)
            if value is default or (type(value) in NUMBERS and type(default) is type(value)
                                    and value == default):
                continue
        kept[name] = value
    protocol.__dict__ = kept


def break_cycles(protocol: ProxyProtocol) -> None:
    """
    Make a closed connection free by reference counting alone.

    Python's cycle collector pauses the whole process for a time that
    grows with every object alive; with thousands of connections that
    is a pause of a second or more, during which no session receives
    anything. So the daemon keeps long-lived objects out of its scans
    (L{wsproxy.fast.heap}), which is only safe if closed connections leave no
    reference cycles behind: the ones a connection holds while open
    (bound methods of itself, a pending timer's callback, Autobahn's
    C{is_closed} resolved with the protocol) are cut here.
    """
    protocol.__dict__.pop("_on_publish_reply", None)
    protocol.__dict__.pop("_on_append_reply", None)
    protocol.__dict__.pop("_out", None)
    protocol._resumer = None
    protocol._topics = None
    # Autobahn resolves is_closed with the protocol itself
    protocol.is_closed = defer.succeed(None)
    for timer in ("autoPingPendingCall", "autoPingTimeoutCall", "openHandshakeTimeoutCall",
                  "closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):
        call = getattr(protocol, timer, None)
        if call is not None:
            call.cancel()
            setattr(protocol, timer, None)
