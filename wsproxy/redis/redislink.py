"""
Redis connections: one command connection and one Pub/Sub connection per
process, both speaking txredisapi's protocols (hiredis parser, raw bytes).

txredisapi's own connection management stops retrying for good after an
AUTH or SELECT failure and queues commands while disconnected; a proxy needs
the opposite on both counts. L{RedisLink} therefore keeps one connection open
with Twisted's C{ClientService} (short, capped back-off, never gives up) and
uses txredisapi only for the wire protocol. Commands issued while there is no
usable connection fail at once with L{RedisUnavailable}, unless the
connection is being replaced for a known reason (L{RedisLink.replace},
L{RedisLink.hold}): then lean commands wait for the next one
(L{wsproxy.redis.hold}).

Deadlines are enforced without a timer (or even a timestamp) per command:
commands are answered in order, so L{RedisLink.sweep} (run periodically) only
has to watch the oldest unanswered command. If the same command stays oldest
for longer than the deadline while the process itself was responsive, the
connection is declared stuck and aborted, which fails every outstanding
command and starts a reconnect. A sweep that runs late (the process was busy,
e.g. reading a burst from thousands of clients) restarts the count: Redis is
only blamed for time in which we could have read its answer.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from typing import Any, Callable, Deque, Optional, Protocol, cast

import hiredis
import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Settings
from .hold import HOLD_SECS, Hold, HoldBudget
from .sentinel import SentinelEndpoint
from .redisendpoint import (
    ConnectFailures,
    ReportingEndpoint,
    client_endpoint,
    describe_failure,
    encode_command,
    setup_category,
)
from ..fast import sockread
from ..fast.sockread import read_into
from ..fast.sockwrite import BATCH, Pending, TurnPending, plain_socket


#: write-buffer high-water mark of the command connection (Twisted's
#: default: 64 KiB), at which the upstream valve pauses the clients
TRANSPORT_BUFFER_SIZE = 1 << 22

#: bytes read from a Redis connection at a time: the subscriber reads a
#: burst in large chunks, so that each socket gets many messages per read
#: and one send() for all of them (L{wsproxy.fast.sockwrite}). On plain TCP each
#: connection reads into a buffer of its own, reused (L{wsproxy.fast.sockread}):
#: Twisted allocates a new one of C{bufferSize} per read, which above the C
#: library's mmap threshold (128 KiB) cost an mmap, an mremap and a munmap
#: per read, three system calls for a read of a message or two.
SUBSCRIBER_READ_SIZE = 1 << 22
COMMANDS_READ_SIZE = 1 << 16


class RedisUnavailable(Exception):
    """
    There is no usable connection to Redis right now.
    """


class RedisTimeout(Exception):
    """
    Redis did not answer within the deadline.
    """


class _Counting:
    """
    Counts commands sent and replies received on one connection, which is
    all the deadline sweep needs (Redis answers in order).
    """

    link: "RedisLink"
    sent = 0
    answered = 0
    stuck = False
    failure_reported = False

    def replyReceived(self, reply: Any) -> None:
        self.answered += 1
        super().replyReceived(reply)  # type: ignore[misc]

    def connectionLost(self, reason: Failure) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if transport is not None:
            sockread.forget(transport)
        try:
            super().connectionLost(reason)  # type: ignore[misc]
        finally:
            self.link._lost(self, reason, transport)


class _Fed:
    """
    A connection whose replies a hiredis reader parses, fed by Twisted's
    C{dataReceived} or straight from a reused read buffer (L{wsproxy.fast.sockread});
    what the replies of one read cause (frames to clients, acks) is sent
    once the whole read has been handled (L{BATCH}), one write per socket.
    """

    _parser: hiredis.Reader

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        self._parser.feed(data)
        self._answer()

    def received_into(self, buffer: bytearray, n: int) -> None:
        """
        C{n} bytes read into C{buffer} (L{wsproxy.fast.sockread}).
        """
        # hiredis takes any buffer (its stubs say bytes)
        self._parser.feed(buffer, 0, n)  # type: ignore[arg-type]
        self._answer()

    def _answer(self, reply: Any = False) -> None:
        BATCH.hold()
        try:
            self._replies(reply)
        finally:
            BATCH.release()

    def _replies(self, reply: Any = False) -> None:
        """
        Handle every reply parsed, C{reply} (if one was already taken from
        the parser) first.
        """
        raise NotImplementedError


class _Protocol(_Fed, _Counting, txredisapi.RedisProtocol):  # type: ignore[misc]
    """
    The command connection. Ordinary commands go through txredisapi; client
    messages are PUBLISHed on a lean path: the command is written as it is
    and its reply handed to a callback, with no Deferred, no command
    formatting and no reply conversion per message. One FIFO keeps the two
    kinds of reply apart (C{None} marks a txredisapi command).

    On a plain TCP connection, lean commands are written straight to the
    socket (L{wsproxy.fast.sockwrite}), all those of one reactor turn with one
    send() when the turn's events have been handled.
    """

    #: set once usable on plain TCP (L{RedisLink._usable})
    _out: Optional[Pending] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = hiredis.Reader(
            protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError
        )
        self._fifo: Deque[Optional[Callable[[Any], None]]] = deque()

    def role(self) -> defer.Deferred[Any]:
        return self.command("ROLE")

    def command(self, *args: Any) -> defer.Deferred[Any]:
        out = self._out
        if out is not None and out.frames:
            # txredisapi writes to the transport: after the commands held
            out.flush()
        self._fifo.append(None)
        self.sent += 1
        return cast("defer.Deferred[Any]", self.execute_command(*args))

    def _send(self, data: bytes) -> None:
        out = self._out
        if out is None:
            self.transport.write(data)
        else:
            out.send(data)

    def publish_raw(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        self._send(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            % (len(channel), channel, len(payload), payload)
        )
        self._fifo.append(on_reply)
        self.sent += 1

    def spublish_raw(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        C{SPUBLISH} (Redis Cluster) on the lean path, as L{publish_raw}.
        """
        self._send(
            b"*3\r\n$8\r\nSPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            % (len(channel), channel, len(payload), payload)
        )
        self._fifo.append(on_reply)
        self.sent += 1

    def command_raw(self, args: tuple[bytes, ...], on_reply: Callable[[Any], None]) -> None:
        """
        Any command on the lean path (events, heartbeats): written as RESP,
        its reply handed to C{on_reply}.
        """
        self._send(encode_command(*args))
        self._fifo.append(on_reply)
        self.sent += 1

    def write_raw(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        A command already encoded in RESP (durable upstream's XADD, whose
        constant part each connection encodes once).
        """
        self._send(command)
        self._fifo.append(on_reply)
        self.sent += 1

    def _replies(self, reply: Any = False) -> None:
        parser = self._parser
        fifo = self._fifo
        if reply is False:
            reply = parser.gets()
        while reply is not False:
            handler = fifo.popleft() if fifo else None
            if handler is None:
                # a txredisapi command (or AUTH/SELECT during setup)
                self.replyReceived(reply)
            else:
                self.answered += 1
                handler(reply)
            reply = parser.gets()

    def connectionLost(self, reason: Any) -> None:
        self._out = None
        handlers = [h for h in self._fifo if h is not None]
        self._fifo.clear()
        try:
            super().connectionLost(reason)
        finally:
            if handlers:
                error = self.link._lost_error(self)
                for handler in handlers:
                    handler(error)


class _SubscriberProtocol(_Fed, _Counting, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    The subscriber, on lean paths for what it does per session: a
    C{message} goes straight from the hiredis parser to the hub, and
    C{SUBSCRIBE}/C{UNSUBSCRIBE} (one channel each, one per connection
    set-up) are written as they are, their confirmations matched in order
    with one Deferred per command, not through txredisapi's command
    formatting, reply queue and Deferreds (a fifth of the set-up's CPU).
    An error reply answers the oldest command waiting (Redis answers in
    order). What is asked before any subscription (AUTH, SELECT, PING)
    takes txredisapi's usual route; C{ROLE} is taken raw (L{role}).
    """

    link: "RedisLink"
    #: the kinds of reply of this connection's Pub/Sub (plain here; sharded
    #: in L{_ShardSubscriberProtocol}), whose upper-case spelling is the command
    _message = b"message"
    _subscribe = b"subscribe"
    _unsubscribe = b"unsubscribe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = hiredis.Reader(
            protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError
        )
        #: (kind of reply, channel, its Deferred) of each command sent, oldest first
        self._pending: Deque[tuple[bytes, bytes, defer.Deferred[Any]]] = deque()

    _role: Optional[defer.Deferred[Any]] = None

    def role(self) -> defer.Deferred[Any]:
        """
        C{ROLE}, before any subscription: its reply is taken raw (txredisapi
        would read a list reply as a Pub/Sub message and keep 3 elements).
        """
        self._role = defer.Deferred()
        self.transport.write(b"*1\r\n$4\r\nROLE\r\n")
        return self._role

    def command(self, name: str, channel: str) -> defer.Deferred[Any]:
        """
        C{SUBSCRIBE} or C{UNSUBSCRIBE} (C{name}) one channel: the Deferred
        fires with C{None} once Redis confirmed, or fails with the Redis
        error or C{txredisapi.ConnectionError} if the connection is lost
        first.
        """
        self.sent += 1
        kind = self._subscribe if name == "SUBSCRIBE" else self._unsubscribe
        key = channel.encode()
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending.append((kind, key, d))
        verb = kind.upper()
        self.transport.write(
            b"*2\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(verb), verb, len(key), key)
        )
        return d

    def received_into(self, buffer: bytearray, n: int) -> None:
        """
        C{n} bytes read (L{wsproxy.fast.sockread}). A read that is one message and
        nothing else (messages that come one at a time) is delivered without
        holding the frames it causes (L{BATCH}): there is nothing else to
        send them with.
        """
        parser = self._parser
        parser.feed(buffer, 0, n)  # type: ignore[arg-type]
        reply = parser.gets()
        if (reply is not False and not parser.has_data() and type(reply) is list
                and len(reply) == 3 and reply[0] == self._message):
            self.link.on_message(reply[1], reply[2])
            return
        self._answer(reply)

    def _replies(self, reply: Any = False) -> None:
        parser = self._parser
        on_message = self.link.on_message
        message = self._message
        pending = self._pending
        if reply is False:
            reply = parser.gets()
        while reply is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == message:
                on_message(reply[1], reply[2])
            elif self._role is not None:
                waiting, self._role = self._role, None
                waiting.callback(reply)
            elif pending and isinstance(reply, Exception):
                self.answered += 1
                pending.popleft()[2].errback(reply)
            elif (pending and type(reply) is list and len(reply) == 3
                  and reply[0] == pending[0][0] and reply[1] == pending[0][1]):
                self.answered += 1
                pending.popleft()[2].callback(None)
            else:
                self._unmatched(reply)
            reply = parser.gets()

    def _unmatched(self, reply: Any) -> None:
        """
        A reply no lean command waits for: a setup command's (AUTH, SELECT,
        PING), through txredisapi.
        """
        self.replyReceived(reply)

    def connectionLost(self, reason: Any) -> None:
        pending = list(self._pending)
        self._pending.clear()
        try:
            super().connectionLost(reason)
        finally:
            for _, _, d in pending:
                d.errback(txredisapi.ConnectionError("connection lost"))


class _ShardSubscriberProtocol(_SubscriberProtocol):
    """
    A Redis Cluster shard's subscriber: sharded Pub/Sub (C{SSUBSCRIBE},
    C{SUNSUBSCRIBE}, C{smessage}), which txredisapi does not know, on the
    same lean paths; a C{sunsubscribe} nobody asked for is Redis dropping a
    channel whose slot moved to another shard (L{RedisLink.on_sunsubscribed}).
    An error answering a C{SSUBSCRIBE} is typically MOVED: not this shard's
    slot.
    """

    _message = b"smessage"
    _subscribe = b"ssubscribe"
    _unsubscribe = b"sunsubscribe"

    def _unmatched(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3:
            if reply[0] == b"sunsubscribe":
                self.link.on_sunsubscribed(reply[1])
                return
            if reply[0] == b"ssubscribe":
                return
        self.replyReceived(reply)


class _LinkFactory(Factory):
    """
    Builds txredisapi protocols for a L{RedisLink}, and stands in for the
    txredisapi factory they expect: an AUTH/SELECT failure is reported and
    retried instead of stopping reconnection for good.
    """

    noisy = False
    isLazy = False

    def __init__(self, link: "RedisLink") -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        return self.link._build()

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.link._setup_failed(why)


class FailureCounts(Protocol):
    """
    Failed connection attempts by reason (L{ConnectFailures}).
    """

    @property
    def counts(self) -> Counter[str]: ...


class Link(Protocol):
    """
    What the proxy needs of its command or subscriber connection: one
    L{RedisLink}, or a Redis Cluster's connections to every master
    (L{wsproxy.redis.cluster}).
    """

    on_ready: Callable[[Any], None]
    on_lost: Callable[[], None]

    @property
    def reconnects(self) -> int: ...

    @property
    def failures(self) -> FailureCounts: ...

    def start(self) -> None: ...

    def stop(self) -> defer.Deferred[Any]: ...

    def sweep(self) -> None: ...

    def kill(self) -> None: ...


class Commands(Link, Protocol):
    """
    The command connection's interface (L{RedisLink.execute}, L{RedisLink.send},
    L{RedisLink.publish}).
    """

    def execute(self, *args: Any) -> defer.Deferred[Any]: ...

    def send(self, on_reply: Callable[[Any], None], *args: bytes) -> None: ...

    def publish(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None: ...

    def send_encoded(self, command: bytes, on_reply: Callable[[Any], None]) -> None: ...


class RedisLink:
    """
    One Redis connection that is kept open for as long as the link runs.

    @ivar ready: the connected protocol once it is usable (after AUTH and
        SELECT), else C{None}.
    @ivar on_ready: called with the protocol each time a connection becomes
        usable.
    @ivar on_lost: called each time a usable connection is lost.
    @ivar on_message: for Pub/Sub links, called with (channel, payload).
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        endpoint: Any,
        settings: Settings,
        clock: IReactorTime,
        subscriber: bool = False,
        max_retry_delay: float = 1.0,
        failures: Optional[ConnectFailures] = None,
        sharded: bool = False,
    ) -> None:
        self.name = name
        self.failures = failures or ConnectFailures(clock, settings.redis_description)
        self._settings = settings
        self._clock = clock
        self._subscriber = subscriber
        self._sharded = sharded
        self.deadline = settings.auth_timeout
        self.ready: Any = None
        self._connecting: Any = None
        self._connected_at = 0.0
        self._failures = 0
        self._max_retry_delay = max_retry_delay
        self._progress: tuple[Any, int] = (None, 0)
        self._progress_since = 0.0
        self._last_sweep = clock.seconds()
        self.on_ready: Callable[[Any], None] = lambda proto: None
        self.on_lost: Callable[[], None] = lambda: None
        self.on_message: Callable[[bytes, bytes], None] = lambda c, m: None
        #: sharded subscribers: Redis dropped this channel (its slot moved)
        self.on_sunsubscribed: Callable[[bytes], None] = lambda channel: None
        self.last_error: Optional[str] = None
        self.reconnects = 0
        self._ever_ready = False
        self._stopping = False
        #: commands held while the connection is replaced (L{hold}); the
        #: budget is the process's (the proxy sets it)
        self.hold_budget = HoldBudget()
        self._hold: Optional[Hold] = None
        #: a replaced connection, answering what was sent on it (L{replace}),
        #: and the call that aborts it if it does not
        self._retiring: Any = None
        self._retire_deadline: Optional[IDelayedCall] = None
        self._endpoint = endpoint
        self._service = ClientService(
            ReportingEndpoint(endpoint, self._connect_failed),
            _LinkFactory(self),
            retryPolicy=self._retry_delay,
            clock=clock,
        )

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.fail(RedisUnavailable(f"redis {self.name}: stopping"))
        proto = self.ready
        if proto is not None and proto.transport is not None:
            # A TLS transport does not close while a producer is registered
            # (the proxy's UpstreamValve on the command connection): without
            # this, shutdown with rediss:// waits forever.
            proto.transport.unregisterProducer()
            out = getattr(proto, "_out", None)
            if out is not None:
                out.flush()  # commands held for the end of this turn
        await self._service.stopService()
        for proto in (self._connecting or self.ready, self._retiring):
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
        if self._retire_deadline is not None and self._retire_deadline.active():
            self._retire_deadline.cancel()

    def _retry_delay(self, attempt: int) -> float:
        if self._hold is not None:
            # a planned switch: the new master is expected any moment (a
            # replica about to be promoted answers ROLE "slave" until then)
            return 0.05
        # ClientService forgets failed attempts as soon as TCP connects, but a
        # connection that never becomes usable (AUTH refused, Redis paused)
        # must still back off; self._failures counts those too.
        n = max(attempt, self._failures)
        return float(min(self._max_retry_delay, 0.1 * (2 ** min(n, 10))))

    def _build(self) -> Any:
        address = self._settings.redis
        cls: type[Any] = _Protocol
        if self._subscriber:
            cls = _ShardSubscriberProtocol if self._sharded else _SubscriberProtocol
        proto = cls(
            charset=None,
            convertNumbers=False,
            password=address.password,
            dbid=address.db,
            username=address.username,
        )
        proto.factory = _LinkFactory(self)
        proto.link = self
        self._connecting = proto
        self._connected_at = self._clock.seconds()
        proto.whenConnected().addCallback(self._probe)
        return proto

    def _probe(self, proto: Any) -> None:
        # txredisapi reports a connection as soon as the transport connects
        # (and AUTH/SELECT, if any, succeeded). Over TLS that is before the
        # handshake and certificate checks, and without a password nothing
        # has been asked of Redis yet (it may answer NOAUTH to everything).
        # A connection is usable only once Redis has answered a PING on it.
        if self._connecting is not proto:
            return

        sentinel = bool(self._settings.redis_sentinels)

        def answered(reply: Any) -> None:
            if sentinel:
                # the address came from the sentinels: it must be the master
                # now (not a replica, not an old master that came back)
                role = reply[0] if isinstance(reply, list) and reply else reply
                if role in (b"master", "master"):
                    self._usable(proto)
                elif self._hold is not None:
                    # the replica a failover chose, not promoted yet: expected
                    proto.failure_reported = True
                    if proto.transport is not None:
                        proto.transport.loseConnection()
                else:
                    self._setup_failed(f"not a master (ROLE: {role!r})", "sentinel")
                    if proto.transport is not None:
                        proto.transport.loseConnection()
            elif reply in (b"PONG", "PONG"):
                self._usable(proto)
            else:
                failed(f"unexpected reply to PING: {reply!r}")

        def failed(why: Any) -> None:
            if self._connecting is not proto:
                return
            if not isinstance(why, str):
                if why.check(txredisapi.ConnectionError):
                    return  # connectionLost follows and counts the failure
                why = why.getErrorMessage()
            self._setup_failed(f"{'ROLE' if sentinel else 'PING'} failed: {why}")
            if proto.transport is not None:
                proto.transport.loseConnection()

        asked = proto.role() if sentinel else proto.execute_command("PING")
        asked.addCallbacks(answered, failed)

    def _usable(self, proto: Any) -> None:
        if self._connecting is not proto:
            return
        self._connecting = None
        self.ready = proto
        # AUTH/SELECT replies were counted; only commands from now on matter
        proto.sent = proto.answered = 0
        transport = proto.transport
        if transport is not None:
            direct = plain_socket(transport)
            # (plain TCP only; decided apart from the writes: the start-up
            # check may leave one on and the other off)
            read_into(transport, proto, SUBSCRIBER_READ_SIZE if self._subscriber
                      else COMMANDS_READ_SIZE)
            if self._subscriber:
                # TLS: Twisted's reads, large ones (see SUBSCRIBER_READ_SIZE)
                transport.bufferSize = SUBSCRIBER_READ_SIZE
            else:
                # the upstream valve pauses clients only past this much
                # unsent data, rather than every 64 KiB (each pause and
                # resume touches every client socket)
                transport.bufferSize = TRANSPORT_BUFFER_SIZE
                if direct is not None:
                    proto._out = TurnPending(direct, self._clock)
        self._failures = 0
        self.last_error = None
        self.failures.recovered()
        if self._ever_ready:
            self.reconnects += 1
        self._ever_ready = True
        self._log.info("redis {name} connection ready ({where})",
                       name=self.name, where=self._settings.redis_description)
        if isinstance(self._endpoint, SentinelEndpoint):
            # the replica a failover chose is master now: from here on the
            # sentinels are asked again (preferring it while any names it)
            self._endpoint.promoting = False
        hold, self._hold = self._hold, None
        if hold is not None:
            # before anything else is sent on it: in the order they came
            hold.flush(proto.write_raw)
        self.on_ready(proto)

    def _setup_failed(self, why: str, category: Optional[str] = None) -> None:
        """
        The attempt in progress connected but cannot be used (AUTH or SELECT
        refused, PING failed, no answer in time); it is closed and retried.
        """
        self.last_error = why
        if self._connecting is not None:
            self._connecting.failure_reported = True
        self.failures.failed(category or setup_category(why), why)

    def _connect_failed(self, reason: Failure) -> None:
        """
        No connection at all (refused, timed out, DNS).
        """
        self._failures += 1
        category, text = describe_failure(reason, None, self._settings)
        master = getattr(self._endpoint, "master", None)
        if master is not None and category != "sentinel":
            # the address came from the sentinels: say which one failed
            text += f" (master {master[0]}:{master[1]}, as the sentinels named it)"
        self.last_error = text
        self.failures.failed(category, text)

    def _lost(self, proto: Any, reason: Any, transport: Any = None) -> None:
        was_ready = self.ready is proto
        if proto is self._retiring:
            self._retiring = None
            if self._retire_deadline is not None and self._retire_deadline.active():
                self._retire_deadline.cancel()
            self._log.info("redis {name}: the replaced connection is closed", name=self.name)
        elif was_ready:
            self.ready = None
            if self._stopping:
                self._log.info("redis {name} connection closed", name=self.name)
            else:
                self._log.warn("redis {name} connection lost: {why}",
                               name=self.name, why=reason.getErrorMessage())
            self.on_lost()
        else:
            self._failures += 1
            if not getattr(proto, "failure_reported", False) and not self._stopping:
                tls = None
                if transport is not None and hasattr(transport, "getHandle"):
                    # the TLS layer's handle is the OpenSSL connection; a
                    # plain TCP transport has dropped its socket by now
                    # (getHandle raises), and has no certificate to tell
                    try:
                        handle = transport.getHandle()
                    except AttributeError:
                        handle = None
                    tls = handle if hasattr(handle, "get_peer_cert_chain") else None
                category, text = describe_failure(reason, tls, self._settings)
                self.last_error = text
                self.failures.failed(category, text)
        if self._connecting is proto:
            self._connecting = None

    # -- planned switches (wsproxy.redis.hold) ------------------------------

    @property
    def holding(self) -> bool:
        return self._hold is not None

    def hold(self, reason: str) -> None:
        """
        Until the next connection is usable (at most L{HOLD_SECS}), lean
        commands that find no connection are held instead of failed
        (L{wsproxy.redis.hold}); for a known reason only (C{reason}, for the
        log). Command links only; nothing if already holding.
        """
        if self._hold is None and not self._subscriber and not self._stopping:
            self._hold = Hold(self.name, reason, self._clock, self.hold_budget,
                              self._hold_expired)

    def _hold_expired(self, hold: Hold) -> None:
        if self._hold is hold:
            self._hold = None
            if isinstance(self._endpoint, SentinelEndpoint):
                # the failover did not complete: ask the sentinels again
                self._endpoint.promoting = False
            hold.fail(RedisUnavailable(
                f"redis {self.name}: no connection within {hold.seconds:g}s of {hold.reason}"
            ))

    def connected_to(self) -> Optional[tuple[str, int]]:
        """
        The address of the usable connection's peer, if any.
        """
        proto = self.ready
        if proto is None or proto.transport is None:
            return None
        peer = proto.transport.getPeer()
        return (getattr(peer, "host", ""), getattr(peer, "port", 0))

    def replace(self, reason: str, master: Optional[tuple[str, int]] = None,
                promoting: bool = False) -> None:
        """
        A planned switch to C{master}, named by the sentinels (C{promoting}:
        the replica a failover is about to promote): lean commands are held
        from now on (L{hold}); the current connection answers what was
        already sent on it (a PING behind it says when), then closes, and
        the next one is made, to C{master}. A subscriber link is only
        dropped.
        """
        if master is not None and isinstance(self._endpoint, SentinelEndpoint):
            self._endpoint.announced = master
            self._endpoint.promoting = promoting
        proto = self.ready
        if self._subscriber:
            self.kill()
            return
        self.hold(reason)
        if proto is None or self._stopping:
            return
        self.ready = None
        self._retiring = proto
        if proto.transport is not None:
            proto.transport.unregisterProducer()
        self.on_lost()

        def drained(reply: Any) -> None:
            if proto.transport is not None:
                proto.transport.loseConnection()

        proto.command_raw((b"PING",), drained)
        # a connection that does not answer is not waited for
        self._retire_deadline = self._clock.callLater(HOLD_SECS, self._abort_retiring, proto)

    def _abort_retiring(self, proto: Any) -> None:
        if self._retiring is proto and proto.transport is not None:
            proto.transport.abortConnection()

    def drain(self) -> defer.Deferred[None]:
        """
        Fires once every command sent on the usable connection is answered
        (a PING behind them), the connection is lost, or L{HOLD_SECS}
        passed; before a link that is no longer used is stopped.
        """
        d: defer.Deferred[None] = defer.Deferred()
        proto = self.ready
        if proto is None:
            d.callback(None)
            return d

        def done(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not d.called:
                d.callback(None)

        timer = self._clock.callLater(HOLD_SECS, done)
        proto.command_raw((b"PING",), done)
        return d

    def replace_done(self, master: tuple[str, int]) -> None:
        """
        The switch L{replace} began is announced done (C{+switch-master} to
        C{master}, where this link already is).
        """
        if isinstance(self._endpoint, SentinelEndpoint):
            self._endpoint.announced = master
            self._endpoint.promoting = False

    def _no_connection(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        A lean command (RESP) while there is no usable connection: held if a
        hold is on and has room, else failed at once.
        """
        hold = self._hold
        if hold is None or not hold.add(command, on_reply):
            on_reply(self._unavailable())

    def write_held(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        A lean command already encoded: written now, or held as
        L{_no_connection} does (a cluster's redirections).
        """
        proto = self.ready
        if proto is None:
            self._no_connection(command, on_reply)
        else:
            proto.write_raw(command, on_reply)

    # -- commands --------------------------------------------------------

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        """
        Send one command; the Deferred fires with the reply, or fails with
        L{RedisUnavailable} (no connection, or lost before the reply) or
        L{RedisTimeout} (no reply within the deadline).
        """
        proto = self.ready
        if proto is None:
            return defer.fail(self._unavailable())
        d: defer.Deferred[Any] = proto.command(*args)
        return d.addErrback(self._translate, proto)

    def send(self, on_reply: Callable[[Any], None], *args: bytes) -> None:
        """
        Any command on the lean path (no Deferred, raw reply): C{on_reply}
        gets the reply, or an exception as for L{publish}. Command
        connection only.
        """
        proto = self.ready
        if proto is None:
            self._no_connection(encode_command(*args), on_reply)
        else:
            proto.command_raw(args, on_reply)

    def send_encoded(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        A command already encoded in RESP, on the lean path: C{on_reply}
        gets the raw reply, or an exception as for L{publish}. Command
        connection only.
        """
        proto = self.ready
        if proto is None:
            self._no_connection(command, on_reply)
        else:
            proto.write_raw(command, on_reply)

    def publish(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        PUBLISH on the lean path: C{on_reply} is called with the number of
        receivers, or with an exception (L{RedisUnavailable},
        L{RedisTimeout}, a Redis error). Command connection only.
        """
        proto = self.ready
        if proto is None:
            self._no_connection(encode_command(b"PUBLISH", channel, payload), on_reply)
        else:
            proto.publish_raw(channel, payload, on_reply)

    def subscribe(self, channel: str) -> defer.Deferred[Any]:
        proto = self.ready
        if proto is None:
            return defer.fail(self._unavailable())
        d: defer.Deferred[Any] = proto.command("SUBSCRIBE", channel)
        return d.addErrback(self._translate, proto)

    def unsubscribe(self, channel: str) -> defer.Deferred[Any]:
        proto = self.ready
        if proto is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = proto.command("UNSUBSCRIBE", channel)
        return d.addErrback(self._translate, proto)

    def _unavailable(self) -> RedisUnavailable:
        """What a command meets while no connection is ready."""
        return RedisUnavailable(self.last_error or "not connected")

    def _lost_error(self, proto: Any) -> Exception:
        if proto.stuck:
            return RedisTimeout(f"redis {self.name}: no reply within {self.deadline:g}s")
        return RedisUnavailable(f"redis {self.name} connection lost")

    def _translate(self, failure: Any, proto: Any) -> Any:
        if proto.stuck:
            raise self._lost_error(proto)
        if failure.check(txredisapi.ConnectionError):
            raise RedisUnavailable(failure.getErrorMessage())
        return failure

    def sweep(self, stall: float = 1.5) -> None:
        """
        Abort the connection if a command has been waiting for its reply
        longer than the deadline with no reply at all arriving meanwhile, or
        if its setup (AUTH, SELECT) has.

        @param stall: a gap this long since the previous sweep means the
            process was too busy to read replies; the count starts again.
        """
        now = self._clock.seconds()
        stalled = now - self._last_sweep > stall
        self._last_sweep = now
        proto = self.ready
        if proto is not None:
            progress = (proto, proto.answered)
            if progress != self._progress or stalled or proto.sent == proto.answered:
                self._progress, self._progress_since = progress, now
            elif now - self._progress_since > self.deadline:
                self._log.error(
                    "redis {name}: no reply for {secs:.1f}s, dropping the connection",
                    name=self.name, secs=now - self._progress_since,
                )
                proto.stuck = True
                proto.transport.abortConnection()
        connecting = self._connecting
        if connecting is not None and now - self._connected_at > self.deadline and not stalled:
            self._setup_failed(
                f"connection setup timed out (no answer within {self.deadline:g}s)", "timeout"
            )
            if connecting.transport is not None:
                connecting.transport.abortConnection()

    def kill(self) -> None:
        """
        Drop the current connection (it is re-established at once).
        """
        proto = self.ready
        if proto is not None:
            proto.transport.abortConnection()


def process_token() -> str:
    """
    A short identifier of this process, for private channel names.
    """
    return f"{os.getpid()}-{os.urandom(4).hex()}-{int(time.time())}"


def build_links(reactor: Any, settings: Settings) -> tuple[RedisLink, RedisLink]:
    """
    The command and subscriber links a proxy process runs on, sharing one
    endpoint and one report of connection failures (whichever connection
    meets a failure first reports it).
    """
    endpoint = (
        SentinelEndpoint(reactor, settings) if settings.redis_sentinels
        else client_endpoint(reactor, settings)
    )
    failures = ConnectFailures(reactor, settings.redis_description)
    return (
        RedisLink("commands", endpoint, settings, reactor, failures=failures),
        RedisLink("subscriber", endpoint, settings, reactor, subscriber=True, failures=failures),
    )


def with_deadline(d: defer.Deferred[Any], seconds: float, clock: IReactorTime) -> defer.Deferred[Any]:
    """
    Fail C{d} with L{RedisTimeout} unless it fires within C{seconds}
    (cancelling it). Used once per handshake, never per message.

    A deadline that falls due is decided one reactor turn later: the
    reactor runs due timers before it reads the sockets, so a process that
    was itself held up (a CPU-starved host during a reconnect storm, a long
    garbage collection) would otherwise time out a reply Redis sent in time
    and that is already waiting, unread, in the socket. The extra turn
    reads what has arrived first; only a reply still missing then is a
    timeout.
    """
    expired = False
    pending: IDelayedCall

    def expire() -> None:
        nonlocal pending
        pending = clock.callLater(0, decide)

    def decide() -> None:
        nonlocal expired
        expired = True
        d.cancel()

    def settled(result: Any) -> Any:
        if pending.active():
            pending.cancel()
        if expired and isinstance(result, Failure) and result.check(defer.CancelledError):
            raise RedisTimeout(f"no answer within {seconds:g}s")
        return result

    pending = clock.callLater(seconds, expire)
    return d.addBoth(settled)
