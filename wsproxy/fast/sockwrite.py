"""
Writing to a socket now instead of on the next reactor turn, and holding
writes so that a burst still leaves in one C{send()} per socket.

Twisted's C{transport.write} only appends to a buffer and registers the
socket for writing; the reactor sends on its next pass and unregisters it
again. When each socket gets about one message per turn (a client reading
messages as they come), that is two C{epoll_ctl} calls and a reactor pass
per message on top of the C{send()}: most of the proxy's cost per message.
Node.js (libuv) tries the write at once, and so does L{write_now}, on a
plain TCP socket with nothing buffered; whatever the kernel does not take
goes to the transport, whose buffer, producer (the slow-consumer close),
closing and error handling then apply exactly as before. Anything else (TLS,
data already waiting, a connection closing) takes C{transport.write}.

Writing at once would cost a C{send()} per message in a burst, where the
reactor's buffer sends many messages at once. So while one read is
dispatched (L{Batch.hold} … L{Batch.release}), a connection keeps its
frames (L{Pending}) and sends them all with one C{send()} when the read has
been dispatched: per socket, one system call per read, and none for the
reactor. The command connection holds its commands (the clients'
PUBLISHes) until the reactor's turn ends (L{TurnPending}).

The invariants, each pinned by the test of the same name in
C{tests/test_fast_sockwrite.py}:

  1. I{never overtakes the transport's buffer}: L{write_now} sends at once
     only when the transport holds nothing; otherwise, and for whatever
     the socket does not take, the bytes go through C{transport.write},
     behind what is buffered. Bytes reach the socket in the order written.
  2. I{never past a closing connection}: nothing is sent directly on a
     connection that is TLS, disconnecting (C{loseConnection}: the bytes
     are buffered and sent before the close, as Twisted does), aborting
     (C{abortConnection}: dropped, as Twisted does), write-closed or lost.
  3. I{held while a read is dispatched}: the process has one L{BATCH},
     held while a Redis read is dispatched (subscriber and command
     connection: C{wsproxy.redis.redislink._Fed}) and while a client read is
     (C{ProxyProtocol.dataReceived}); holds nest. While it is held, a
     client connection's frames (L{Pending.send}) are kept; when the
     outermost hold is released, every connection that kept frames sends
     them with one L{write_now}, connections in the order they first kept
     one. Outside a batch a frame is sent at once. (A subscriber read that
     is one message and nothing else holds nothing: there is nothing to
     send with it.)
  4. I{kept frames stay ahead}: once a connection keeps a frame, every
     later frame of it is kept behind it until the flush; and anything
     written to the connection another way flushes first: Autobahn's own
     writes (pings, pongs, close frames, through C{sendData}) and frames
     Autobahn has queued itself (C{send_queue}). So a close sent after a
     message in the same read reaches the client after the message.
  5. I{commands held for the turn}: the command connection's lean
     commands (L{TurnPending}) are kept until the reactor's next turn
     starts (C{callLater(0)}: after every event of this turn, before the
     next wait) and sent with one L{write_now}; whatever txredisapi writes
     itself flushes them first, and so does stopping the link, so that
     replies are matched to their callers in order. Client frames and
     commands are held apart: a client's frames leave at the end of its
     read, the PUBLISHes its read caused at the end of the turn.
  6. I{a lost connection loses its held writes, and only its own}: frames
     or commands kept for a connection that is aborted or lost meanwhile
     are dropped with it (the flush meets Twisted's closed transport);
     a flush that raises is logged, and the other connections are still
     flushed.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


#: cleared by the start-up check (L{wsproxy.fast.borrowed}) if Twisted's
#: transport no longer has the state L{write_now} reads: every write then
#: goes through C{transport.write} (L{plain_socket} says no)
ENABLED = True


def plain_socket(transport: Any) -> Optional[tcp.Connection]:
    """
    The transport if L{write_now} may write to its socket itself: a TCP (or
    Unix) connection without TLS; else C{None}.
    """
    if ENABLED and isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport
    return None


def write_now(transport: tcp.Connection, data: bytes) -> None:
    """
    Send C{data} on C{transport}'s socket now if nothing is waiting to be
    sent before it, and hand the transport whatever the socket did not take
    (all of it, if it cannot be written now).

    A failed send is left to the transport: its own next write meets the
    same error and loses the connection the usual way (C{connectionLost}).
    So is a connection being aborted (C{abortConnection}, e.g. the deadline
    sweep giving up on the command connection): Twisted drops what is
    written to it then, and so must this, or commands flushed after the
    abort would still reach Redis.
    """
    if (transport._tempDataBuffer or transport.dataBuffer or transport.disconnecting
            or transport._aborting or not transport.connected
            or transport._writeDisconnected or transport.TLS):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


class Flushable(Protocol):
    def flush(self) -> None: ...


class Batch:
    """
    Holds back what connections write while one Redis read is dispatched;
    each held connection flushes once when it ends.
    """

    _log = Logger()

    def __init__(self) -> None:
        self.held = 0
        self.waiting: list[Flushable] = []

    def hold(self) -> None:
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        if self.held:
            return
        waiting = self.waiting
        if not waiting:
            return
        self.waiting = []
        for connection in waiting:
            try:
                connection.flush()
            except Exception:
                self._log.failure("flushing a connection's frames failed")


#: the process's one batch: held by the subscriber connections' reads
BATCH = Batch()


class Pending:
    """
    A connection's frames written during a held L{Batch}.

    L{send} writes at once, or keeps the frame until the batch ends;
    L{flush} sends what was kept, and must be called before anything else
    is written to the connection, so that frames stay in order.
    """

    __slots__ = ("transport", "frames", "batch")

    def __init__(self, transport: tcp.Connection, batch: Batch = BATCH) -> None:
        self.transport = transport
        self.frames: list[bytes] = []
        self.batch = batch

    def send(self, data: bytes) -> None:
        frames = self.frames
        if frames:
            frames.append(data)
        elif self.batch.held:
            frames.append(data)
            self.batch.waiting.append(self)
        else:
            write_now(self.transport, data)

    def flush(self) -> None:
        frames = self.frames
        if frames:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            frames.clear()
            write_now(self.transport, data)


class TurnPending(Pending):
    """
    Writes held until the reactor has handled every event of its turn,
    then sent together: the command connection's, so that the PUBLISHes of
    all the client reads of one turn leave in one send() and Redis answers
    them in one read (as Node's ioredis does with auto-pipelining). The
    flush runs first thing in the next turn, before the reactor waits.
    """

    __slots__ = ("_clock", "_scheduled")

    def __init__(self, transport: tcp.Connection, clock: IReactorTime) -> None:
        super().__init__(transport)
        self._clock = clock
        self._scheduled = False

    def send(self, data: bytes) -> None:
        self.frames.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._scheduled = False
        self.flush()
