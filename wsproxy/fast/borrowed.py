"""
Every private internal of Twisted, Autobahn and CPython the fast path
borrows, named once, with the start-up check that it is still there and
still behaves as the fast path expects.

A release of one of those libraries may rename or change any of them
without notice. Each L{Internal} below says what is borrowed, which module
uses it, how it is probed (a small behavioural test against the installed
library, not just C{hasattr}), and what the proxy does instead when the
probe fails: the framework's own path for that piece, never a dropped
connection. L{check} runs every probe once; for each that fails it logs
one warning naming the internal and switches its module to the fallback
(a module-level flag or function read where the piece is used, so the hot
paths decide nothing per message). The daemon runs it at start-up
(L{wsproxy.process.daemon.ProxyService}); C{python -m wsproxy.fast} runs it and
prints one line per internal, with exit status 1 if any failed.

The pins of the same behaviour, one test per internal named after it, are
in C{tests/test_fast_borrowed.py}.
"""

from __future__ import annotations

import base64
import gc
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.logger import Logger

from . import handshake, heap, inframes, lazyformat, poll, sockread, sockwrite, timers

_log = Logger()


class Broken(Exception):
    """
    A probe found an internal missing or behaving otherwise.
    """


def expect(condition: Any, what: str) -> None:
    if not condition:
        raise Broken(what)


@dataclass(frozen=True)
class Internal:
    """
    One borrowed internal.

    @ivar name: how the check and its warning name it.
    @ivar borrows: the private parts used.
    @ivar used_by: the wsproxy module (and function) that uses them.
    @ivar fallback: what the proxy does instead when the probe fails.
    @ivar probe: raises (L{Broken} or anything else) if the internal is
        missing or misbehaves; may return a note (e.g. "not in use here").
    @ivar fall_back: switches L{used_by} to L{fallback}.
    @ivar restore: switches it back (tests).
    """

    name: str
    borrows: str
    used_by: str
    fallback: str
    probe: Callable[[Any], Optional[str]]
    fall_back: Callable[[], None]
    restore: Callable[[], None]


# -- twisted: the epoll reactor's turn (wsproxy.fast.poll) -------------------


def _probe_epoll_turn(reactor: Any) -> Optional[str]:
    from twisted.internet import main
    from twisted.internet.epollreactor import EPollReactor

    if reactor is not None:
        expect(isinstance(reactor, EPollReactor),
               f"the reactor is {type(reactor).__name__}, not the epoll reactor")
    own = EPollReactor()
    ours, theirs = socket.socketpair()
    try:
        expect(isinstance(own._selectables, dict), "EPollReactor._selectables is not a dict")
        expect(hasattr(own._poller, "poll"), "EPollReactor._poller has no poll()")
        for name in poll._TURN_STATE:
            expect(hasattr(own, name), f"the reactor has no {name}")
        expect(isinstance(own._newTimedCalls, list) and isinstance(own._pendingTimedCalls, list)
               and isinstance(own.threadCallQueue, list),
               "the reactor's timed-call or thread-call queues are not lists")
        # a timed call lands in _newTimedCalls, then in _pendingTimedCalls
        # (a heap by .time); a call from a thread in threadCallQueue
        call = own.callLater(5, lambda: None)
        expect(call in own._newTimedCalls, "callLater does not add to _newTimedCalls")
        own._insertNewDelayedCalls()
        expect(own._pendingTimedCalls and own._pendingTimedCalls[0] is call
               and not own._newTimedCalls,
               "_insertNewDelayedCalls does not move calls to _pendingTimedCalls")
        expect(abs(own._pendingTimedCalls[0].time - own.seconds() - 5) < 1,
               "a pending timed call's .time is not its due time")
        call.cancel()
        own.callFromThread(lambda: None)
        expect(own.threadCallQueue, "callFromThread does not add to threadCallQueue")
        del own.threadCallQueue[:]
        # the lean turn, installed on a reactor of its own: a readable
        # socket is read, one at end of stream loses its connection
        events: list[str] = []

        class Reader:
            def fileno(self) -> int:
                return ours.fileno()

            def logPrefix(self) -> str:
                return "probe"

            def doRead(self) -> Any:
                data = ours.recv(16)
                events.append("read")
                return None if data else main.CONNECTION_DONE

            def connectionLost(self, reason: Any) -> None:
                events.append("lost")

        expect(poll.install(own), "the lean turn does not install on an epoll reactor")
        reader = Reader()
        own.addReader(reader)
        theirs.send(b"x")
        own.doIteration(0)
        expect(events == ["read"], f"a readable socket was not read ({events})")
        theirs.close()
        own.doIteration(0)
        expect(events == ["read", "read", "lost"],
               f"a socket at end of stream did not lose its connection ({events})")
        expect(reader not in own.getReaders(), "a lost connection stayed registered")
    finally:
        ours.close()
        theirs.close()
        own._poller.close()
        own.waker.connectionLost(None)
    return None


def _disable_epoll_turn() -> None:
    poll.ENABLED = False


def _enable_epoll_turn() -> None:
    poll.ENABLED = True


# -- twisted: the TCP transport's write state (wsproxy.fast.sockwrite) ------


def _probe_server(sock: socket.socket) -> Any:
    from twisted.internet import protocol, tcp
    from twisted.internet.testing import MemoryReactorClock

    proto = protocol.Protocol()
    transport = tcp.Server(sock, proto, ("127.0.0.1", 1), None,  # type: ignore[arg-type]
                           0, MemoryReactorClock())
    proto.makeConnection(transport)
    return transport


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except BlockingIOError:
        return b""


def _probe_tcp_write(reactor: Any) -> Optional[str]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        transport = _probe_server(ours)
        expect(sockwrite.plain_socket(transport) is transport,
               "a plain TCP transport is not a plain socket")
        expect(transport.socket is ours, "tcp.Connection.socket is not its socket")
        expect(transport.TLS is False, "tcp.Connection.TLS is not False")
        expect(transport._tempDataBuffer == [] and transport.dataBuffer == b"",
               "tcp.Connection has no empty _tempDataBuffer/dataBuffer")
        expect(transport._writeDisconnected is False and transport._aborting is False
               and not transport.disconnecting and transport.connected,
               "tcp.Connection's _writeDisconnected/_aborting/disconnecting/connected "
               "are not those of an open connection")
        sockwrite.write_now(transport, b"now")
        expect(_receive(theirs) == b"now", "write_now did not send at once")
        transport.write(b"queued")
        expect(transport._tempDataBuffer == [b"queued"],
               "transport.write does not append to _tempDataBuffer")
        sockwrite.write_now(transport, b"after")
        expect(_receive(theirs) == b"" and transport._tempDataBuffer == [b"queued", b"after"],
               "write_now did not queue behind what the transport holds")
        # the closing path offers what waits to the socket once more
        # (wsproxy.websocket.closing.drop_not_reading)
        expect(transport.doWrite() is None and _receive(theirs) == b"queuedafter"
               and not transport.dataBuffer and not transport._tempDataBuffer,
               "tcp.Connection.doWrite does not send what the transport holds")
        transport.abortConnection()
        expect(transport._aborting is True, "abortConnection does not set _aborting")
        sockwrite.write_now(transport, b"aborted")
        expect(_receive(theirs) == b"", "write_now sent on an aborted connection")
    finally:
        ours.close()
        theirs.close()
    return None


def _disable_tcp_write() -> None:
    sockwrite.ENABLED = False


def _enable_tcp_write() -> None:
    sockwrite.ENABLED = True


# -- twisted: the TCP transport's reads (wsproxy.fast.sockread) -------------


def _probe_tcp_read(reactor: Any) -> Optional[str]:
    from twisted.internet import main, tcp

    expect(callable(getattr(tcp.Connection, "doRead", None)), "tcp.Connection has no doRead")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        transport = _probe_server(ours)
        expect(type(transport).doRead is tcp.Connection.doRead,
               "tcp.Server does not read with tcp.Connection.doRead")
        got: list[bytes] = []

        class Reader:
            def received_into(self, buffer: bytearray, n: int) -> None:
                got.append(bytes(buffer[:n]))

        expect(sockread.read_into(transport, Reader(), 64), "read_into did not take the reads")
        expect(transport.doRead() is None, "a read with nothing to read is not None")
        theirs.send(b"ping")
        expect(transport.doRead() is None and got == [b"ping"], "read_into did not read")
        theirs.close()
        expect(transport.doRead() is main.CONNECTION_DONE, "end of stream is not CONNECTION_DONE")
        sockread.forget(transport)
        expect(type(transport).doRead is tcp.Connection.doRead
               and "doRead" not in transport.__dict__, "forget did not restore doRead")
    finally:
        ours.close()
        theirs.close()
    return None


def _disable_tcp_read() -> None:
    sockread.ENABLED = False


def _enable_tcp_read() -> None:
    sockread.ENABLED = True


# -- autobahn: a connection in memory ----------------------------------------


class _Recorder:
    """
    Stands in for Autobahn's batched timer: records each call_later.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> Any:
        self.calls.append((delay, func, args))
        return _RecordedCall()


class _RecordedCall:
    def cancel(self) -> None:
        pass

    def active(self) -> bool:
        return False


class _Session:
    """
    An Autobahn server connection in memory, opened with a real handshake;
    the delays of the factory's timer are distinct so that each call can be
    told: open handshake 7, auto-ping 11, its timeout 3, close handshake 5.
    """

    OPEN_HANDSHAKE, PING, PONG, CLOSE_HANDSHAKE = 7, 11, 3, 5

    def __init__(self) -> None:
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
        from twisted.internet.testing import StringTransport

        messages: list[tuple[bytes, bool]] = []
        self.messages = messages

        class Probe(WebSocketServerProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                messages.append((payload, isBinary))

        factory = self.factory = WebSocketServerFactory()
        factory.protocol = Probe
        factory.setProtocolOptions(openHandshakeTimeout=self.OPEN_HANDSHAKE,
                                   autoPingInterval=self.PING, autoPingTimeout=self.PONG,
                                   closeHandshakeTimeout=self.CLOSE_HANDSHAKE)
        #: what Autobahn's factory made for its timer, before it is replaced
        self.own_timer = getattr(factory, "_batched_timer", None)
        self.timer = _Recorder()
        factory._batched_timer = self.timer
        self.transport = StringTransport()
        self.protocol: Any = factory.buildProtocol(None)

    def open(self) -> None:
        self.protocol.makeConnection(self.transport)
        key = base64.b64encode(os.urandom(16))
        self.protocol.dataReceived(
            b"GET / HTTP/1.1\r\nHost: probe\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        expect(self.transport.value().startswith(b"HTTP/1.1 101"),
               "Autobahn did not accept a valid opening handshake")

    def delays(self) -> list[float]:
        return [delay for delay, _, _ in self.timer.calls]

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        if self.protocol.transport is not None:
            self.protocol.connectionLost(Failure(ConnectionDone()))


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True,
                 mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    """
    A masked client frame of up to 125 bytes.
    """
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + masked


def _probe_autobahn_state(reactor: Any) -> Optional[str]:
    from autobahn.websocket.protocol import WebSocketProtocol

    session = _Session()
    try:
        session.open()
        p = session.protocol
        idle = ("state", "current_frame", "data", "inside_message", "autoPingTimeoutCall",
                "_perMessageCompress")
        for name in idle:
            expect(hasattr(p, name), f"an Autobahn connection has no {name}")
        expect(callable(getattr(p, "_dataReceived", None)),
               "an Autobahn connection has no _dataReceived")

        def at_rest() -> bool:
            return (p.state == WebSocketProtocol.STATE_OPEN and p.current_frame is None
                    and not p.data and not p.inside_message
                    and p.autoPingTimeoutCall is None and p._perMessageCompress is None)

        expect(at_rest(), "an open connection with nothing in progress does not look at rest")
        frame = client_frame(b"hello")
        p._dataReceived(frame[:4])
        expect(not at_rest(), "a frame half read does not show (current_frame/data)")
        p._dataReceived(frame[4:])
        expect(session.messages == [(b"hello", False)] and at_rest(),
               "a whole frame read by _dataReceived was not delivered, or left state behind")
        p._dataReceived(client_frame(b"frag", fin=False))
        expect(p.inside_message and not at_rest(), "a fragment does not set inside_message")
        p._dataReceived(client_frame(b"ment", opcode=0))
        expect(session.messages[-1] == (b"fragment", False) and at_rest(),
               "the last fragment did not end the message")
        pings = [(f, a) for d, f, a in session.timer.calls if d == session.PING]
        if pings:  # (else Autobahn no longer uses the timer: see its own probe)
            func, args = pings[-1]
            func(*args)
            expect(p.autoPingTimeoutCall is not None,
                   "a ping sent does not set autoPingTimeoutCall")
            p._dataReceived(client_frame(b"x"))
            expect(p.autoPingTimeoutCall is None,
                   "incoming data does not clear autoPingTimeoutCall")
    finally:
        session.close()
    return None


def _disable_autobahn_state() -> None:
    inframes.ENABLED = False


def _enable_autobahn_state() -> None:
    inframes.ENABLED = True


def _probe_batched_timer(reactor: Any) -> Optional[str]:
    session = _Session()
    try:
        expect(callable(getattr(session.own_timer, "call_later", None)),
               "Autobahn's factory has no _batched_timer with call_later")
        session.open()
        expect(session.OPEN_HANDSHAKE in session.delays(),
               "the opening handshake's timeout is not scheduled on _batched_timer")
        expect(session.PING in session.delays(),
               "the auto-ping is not scheduled on _batched_timer")
        session.protocol.sendClose(1000)
        expect(session.CLOSE_HANDSHAKE in session.delays(),
               "the closing handshake's timeout is not scheduled on _batched_timer")
    finally:
        session.close()
    return None


def _disable_batched_timer() -> None:
    timers.ENABLED = False


def _enable_batched_timer() -> None:
    timers.ENABLED = True


def _probe_pformat(reactor: Any) -> Optional[str]:
    target: Any = lazyformat.TARGET
    expect(hasattr(target, "pformat"), f"{target.__name__} has no pformat")
    formatted: list[Any] = []

    def recording(obj: Any, *args: Any, **kwargs: Any) -> str:
        formatted.append(obj)
        return ""

    previous = target.pformat
    target.pformat = recording
    session = _Session()
    try:
        session.protocol.makeConnection(session.transport)
        expect(formatted, "Autobahn's connectionMade no longer calls its module's pformat")
    finally:
        target.pformat = previous
        session.close()
    lazy = lazyformat.LazyPformat({"option": 1})
    expect(lazy == "" and str(lazy) == "{'option': 1}" and f"{lazy}" == "{'option': 1}",
           "LazyPformat does not format lazily")
    return None


def _disable_pformat() -> None:
    lazyformat.uninstall()


def _enable_pformat() -> None:
    lazyformat.install()


# -- autobahn: its debug highlighting (wsproxy.fast.lazyformat) --------------


def _probe_highlight(reactor: Any) -> Optional[str]:
    import autobahn.util

    for module in lazyformat.HIGHLIGHT_TARGETS:
        for name in ("hltype", "hlval"):
            expect(hasattr(module, name), f"{module.__name__} has no {name}")
    called: list[str] = []
    previous = {(module, name): getattr(module, name)
                for module in lazyformat.HIGHLIGHT_TARGETS for name in ("hltype", "hlval")}

    def recording(module: Any, name: str) -> Callable[..., str]:
        def highlight(*args: Any, **kwargs: Any) -> str:
            called.append(f"{module.__name__}.{name}")
            return ""
        return highlight

    for module, name in previous:
        setattr(module, name, recording(module, name))
    session = _Session()
    try:
        session.open()
        expect({f"{m.__name__}.hltype" for m in lazyformat.HIGHLIGHT_TARGETS} <= set(called),
               "Autobahn's connection set-up no longer highlights with its modules' hltype")
    finally:
        for (module, name), function in previous.items():
            setattr(module, name, function)
        session.close()
    lazy = lazyformat.lazy_hlval(7, color="blue")
    expect(f"{lazy}" == autobahn.util.hlval(7, color="blue")
           and str(lazyformat.lazy_hltype(_probe_highlight))
           == autobahn.util.hltype(_probe_highlight),
           "the lazy highlighting does not format as Autobahn's")
    return None


def _disable_highlight() -> None:
    lazyformat.uninstall_highlight()


def _enable_highlight() -> None:
    lazyformat.install_highlight()


# -- autobahn: the server handshake (wsproxy.fast.handshake) -----------------

#: requests both ways must read alike: a plain one; one with a query, a
#: port, subprotocols, an origin, a compression offer, a repeated header and
#: a frame behind it; hybi-10's version 8 with its own origin header
_HANDSHAKE_SAMPLES = (
    b"GET /app/ws/s1 HTTP/1.1\r\nHost: probe\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer t0k\r\n\r\n",
    b"GET /app/ws/s2?access_token=t&x=1&x=2 HTTP/1.1\r\nHost: probe.example:8080\r\n"
    b"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: bearer, t0k\r\nOrigin: https://app.example\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"X-Thing: one\r\nX-Thing:  two \r\n\r\n\x81\x82abcd\x09\x0b",
    b"GET /app/ws/s3 HTTP/1.1\r\nHost: [::1]:9000\r\nUpgrade: WebSocket\r\n"
    b"Connection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Origin: http://[::1]:9000\r\n\r\n",
)


#: what a ConnectionRequest holds (it has slots)
_REQUEST_FIELDS = ("peer", "headers", "host", "path", "params", "version", "origin", "protocols",
                   "extensions")


def _sample_headers(request: bytes) -> dict[bytes, list[bytes]]:
    # the header lines, as the site's lean parser reads them
    headers: dict[bytes, list[bytes]] = {}
    for line in request.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return headers


def _handshake_state(session: "_Session") -> dict[str, Any]:
    # what the handshake left on the connection that can be compared
    plain = (str, bytes, int, float, bool, type(None), list, dict, tuple)
    state = {name: value for name, value in vars(session.protocol).items()
             if isinstance(value, plain)}
    state["written"] = session.transport.value()
    return state


def _probe_server_handshake(reactor: Any) -> Optional[str]:
    from autobahn.websocket.types import ConnectionRequest

    expect(callable(getattr(handshake.AUTOBAHN, "_url_to_origin", None))
           and callable(getattr(handshake.AUTOBAHN, "_is_same_origin", None)),
           "Autobahn has no _url_to_origin or _is_same_origin")
    for request in _HANDSHAKE_SAMPLES:
        seen: list[dict[str, Any]] = []
        states = []
        for by_autobahn in (True, False):
            session = _Session()
            protocol = session.protocol

            def connect(request: ConnectionRequest, seen: list[dict[str, Any]] = seen) -> None:
                seen.append({name: getattr(request, name) for name in _REQUEST_FIELDS})

            protocol.onConnect = connect
            try:
                protocol.makeConnection(session.transport)
                if by_autobahn:
                    protocol.dataReceived(request)
                else:
                    expect(handshake.read(protocol, _sample_headers(request), request),
                           "the handshake was left to Autobahn")
                states.append(_handshake_state(session))
            finally:
                session.close()
        expect(seen[0] == seen[1], "Autobahn's connection request differs: "
               + ", ".join(k for k in seen[0] if seen[0][k] != seen[1].get(k)))
        expect(states[0] == states[1], "Autobahn's handshake leaves other state: "
               + ", ".join(sorted(k for k in states[0].keys() | states[1].keys()
                                  if states[0].get(k) != states[1].get(k))))
        expect(states[0]["written"].startswith(b"HTTP/1.1 101"),
               "Autobahn did not accept a sample handshake")
    return None


def _disable_server_handshake() -> None:
    handshake.ENABLED = False


def _enable_server_handshake() -> None:
    handshake.ENABLED = True


# -- autobahn: the native masker (wsproxy.fast.inframes) --------------------


def _probe_masker(reactor: Any) -> Optional[str]:
    masker = inframes.large_masker()
    if masker is inframes.unmask_pure:
        return "Autobahn does not use NVX here (not built, or AUTOBAHN_USE_NVX=0): pure Python"
    mask = b"\x01\x80\x7f\xfe"
    payload = bytes(range(256)) * 17 + b"tail"  # 4356 bytes: not a multiple of 4
    masked = inframes.unmask_pure(payload, mask)
    expect(masker(masked, mask) == payload, "the native masker does not unmask a known vector")
    return None


def _disable_masker() -> None:
    inframes.use_masker(inframes.unmask_pure)


def _enable_masker() -> None:
    inframes.use_masker(inframes.native_masker() or inframes.unmask_pure)


# -- cpython: the cycle collector (wsproxy.fast.heap) ------------------------


def _probe_gc(reactor: Any) -> Optional[str]:
    for name in ("freeze", "unfreeze", "get_freeze_count", "get_threshold", "set_threshold",
                 "collect"):
        expect(callable(getattr(gc, name, None)), f"gc has no {name}()")
    expect(isinstance(gc.callbacks, list), "gc.callbacks is not a list")
    thresholds = gc.get_threshold()
    expect(len(thresholds) >= 3, "gc.get_threshold() has fewer than three generations")
    try:
        gc.set_threshold(*heap.THRESHOLDS)
        expect(gc.get_threshold()[:3] == heap.THRESHOLDS, "gc.set_threshold does not take")
    finally:
        gc.set_threshold(*thresholds)
    seen: list[tuple[str, int]] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        seen.append((phase, info["generation"]))

    gc.callbacks.append(callback)
    try:
        gc.collect(2)
    finally:
        gc.callbacks.remove(callback)
    expect(("start", 2) in seen and ("stop", 2) in seen,
           "gc.callbacks are not called with start/stop and the generation")
    if gc.get_freeze_count() == 0:  # (else something froze already: leave it)
        gc.freeze()
        try:
            expect(gc.get_freeze_count() > 0, "gc.freeze() froze nothing")
        finally:
            gc.unfreeze()
        expect(gc.get_freeze_count() == 0, "gc.unfreeze() left objects frozen")
    return None


def _disable_gc() -> None:
    heap.ENABLED = False


def _enable_gc() -> None:
    heap.ENABLED = True


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "twisted.epoll-turn",
        "EPollReactor.doPoll/doIteration, _poller, _selectables, _doReadOrWrite, "
        "_disconnectSelectable, threadCallQueue, _newTimedCalls, _pendingTimedCalls, "
        "_justStopped",
        "wsproxy.fast.poll (installed by wsproxy.process.daemon)",
        "Twisted's own doPoll",
        _probe_epoll_turn, _disable_epoll_turn, _enable_epoll_turn,
    ),
    Internal(
        "twisted.tcp-write",
        "tcp.Connection.socket, TLS, _tempDataBuffer, dataBuffer, _writeDisconnected, "
        "_aborting, disconnecting, connected, doWrite",
        "wsproxy.fast.sockwrite (write_now, Pending, TurnPending), "
        "wsproxy.websocket.closing.drop_not_reading (through plain_socket)",
        "transport.write for every frame and command",
        _probe_tcp_write, _disable_tcp_write, _enable_tcp_write,
    ),
    Internal(
        "twisted.tcp-read",
        "tcp.Connection.doRead replaced on the instance, tcp.Connection.socket",
        "wsproxy.fast.sockread (the Redis connections, wsproxy.redis.redislink)",
        "Twisted's own doRead",
        _probe_tcp_read, _disable_tcp_read, _enable_tcp_read,
    ),
    Internal(
        "autobahn.connection-state",
        "WebSocketProtocol.state, current_frame, data, inside_message, "
        "autoPingTimeoutCall, _perMessageCompress, _dataReceived",
        "wsproxy.websocket.protocol.ProxyProtocol.dataReceived (wsproxy.fast.inframes)",
        "Autobahn's own dataReceived for every client read",
        _probe_autobahn_state, _disable_autobahn_state, _enable_autobahn_state,
    ),
    Internal(
        "autobahn.batched-timer",
        "WebSocketServerFactory._batched_timer (call_later)",
        "wsproxy.websocket.protocol.ProxyFactory (wsproxy.fast.timers.BucketTimer)",
        "Autobahn's own batched timer",
        _probe_batched_timer, _disable_batched_timer, _enable_batched_timer,
    ),
    Internal(
        "autobahn.pformat",
        "autobahn.websocket.protocol.pformat (replaced process-wide)",
        "wsproxy.fast.lazyformat (installed by wsproxy.websocket.protocol)",
        "Autobahn's eager pprint.pformat",
        _probe_pformat, _disable_pformat, _enable_pformat,
    ),
    Internal(
        "autobahn.highlight",
        "hltype and hlval of autobahn.websocket.protocol and autobahn.twisted.websocket "
        "(replaced process-wide)",
        "wsproxy.fast.lazyformat (installed by wsproxy.websocket.protocol)",
        "Autobahn's eager autobahn.util.hltype and hlval",
        _probe_highlight, _disable_highlight, _enable_highlight,
    ),
    Internal(
        "autobahn.server-handshake",
        "what WebSocketServerProtocol.processHandshake sets (http_headers, "
        "http_request_*, websocket_*, _wskey, data), _url_to_origin, _is_same_origin, "
        "_parseExtensionsHeader, ConnectionRequest, onConnect/succeedHandshake",
        "wsproxy.fast.handshake (ProxyProtocol.read_request, from wsproxy.edge.handoff)",
        "Autobahn parsing the request again (processHandshake)",
        _probe_server_handshake, _disable_server_handshake, _enable_server_handshake,
    ),
    Internal(
        "autobahn.nvx-masker",
        "autobahn.nvx._xormasker.XorMaskerShifted1",
        "wsproxy.fast.inframes.unmask (client payloads over 2,048 bytes)",
        "pure-Python unmasking",
        _probe_masker, _disable_masker, _enable_masker,
    ),
    Internal(
        "cpython.gc-freeze",
        "gc.freeze, unfreeze, get_freeze_count, callbacks, get_threshold, set_threshold",
        "wsproxy.fast.heap.CollectorPolicy (installed by wsproxy.process.daemon)",
        "no collector policy (CPython's collector as it comes)",
        _probe_gc, _disable_gc, _enable_gc,
    ),
)


@dataclass(frozen=True)
class Result:
    internal: Internal
    #: why the internal is not used (it fell back); None: in use
    problem: Optional[str]
    #: what the probe had to say besides
    note: Optional[str] = None

    def line(self) -> str:
        i = self.internal
        if self.problem is None:
            return f"ok    {i.name:<26} {self.note or i.borrows} [{i.used_by}]"
        return (f"FAIL  {i.name:<26} {self.problem}: falling back to {i.fallback} "
                f"[{i.used_by}]")


def check(reactor: Any = None, internals: Optional[tuple[Internal, ...]] = None) -> list[Result]:
    """
    Probe every borrowed internal; fall back (and log one warning naming
    it) for each that is missing or misbehaves, use it otherwise. The
    outcome depends only on the installed libraries: checking again after
    a fallback gives the same answer.

    @param reactor: the reactor the proxy runs on (the epoll turn is only
        used on an epoll reactor); C{None}: not checked.
    @param internals: those to check; C{None}: L{INTERNALS}.
    """
    results = []
    for internal in INTERNALS if internals is None else internals:
        # probed as used, whatever an earlier check decided
        internal.restore()
        note = None
        try:
            note = internal.probe(reactor)
            problem = None
        except Exception as e:
            problem = str(e) if isinstance(e, Broken) else f"{type(e).__name__}: {e}"
        if problem is not None:
            internal.fall_back()
            _log.warn(
                "fast path: borrowed internal {name} is missing or changed ({problem}): "
                "falling back to {fallback}",
                name=internal.name, problem=problem, fallback=internal.fallback,
            )
        results.append(Result(internal, problem, note))
    return results


def restore() -> None:
    """
    Use every internal again (after a check that fell back: tests).
    """
    for internal in INTERNALS:
        internal.restore()
