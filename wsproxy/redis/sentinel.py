"""
Redis Sentinel: finding the master, and following a failover at once.

With C{REDIS_SENTINELS} set, both Redis connections are made through a
L{SentinelEndpoint}: each connection attempt asks the sentinels (in turn,
skipping those that do not answer) for the address of
C{REDIS_SENTINEL_MASTER}, then connects there with C{REDIS_URL}'s
credentials, database and TLS. A connection is only used once C{ROLE}
says that server really is a master (L{wsproxy.redis.redislink}): a stale
address, or an old master that came back as a replica, is never written
to.

A L{SentinelWatcher} stays subscribed to C{+switch-master} on every
sentinel and acts on the first announcement: when the master changes, the
subscriber connection is dropped and the command connection replaced
(client messages held meanwhile, L{wsproxy.redis.hold}), both made again
through the sentinels, preferring the master announced, rather than
waiting for a timeout (after a graceful C{SENTINEL FAILOVER} the old
master is still up, as a replica).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import hiredis
from twisted.application.internet import ClientService
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Settings
from .redisendpoint import SentinelError, encode_command, tls_options

#: how long one sentinel has to answer a question
QUERY_TIMEOUT = 2.0


def _hello(settings: Settings) -> bytes:
    """
    AUTH for the sentinels, if they need it.
    """
    if settings.redis_sentinel_password is None:
        return b""
    if settings.redis_sentinel_username:
        return encode_command("AUTH", settings.redis_sentinel_username,
                        settings.redis_sentinel_password)
    return encode_command("AUTH", settings.redis_sentinel_password)


def _sentinel_endpoint(reactor: Any, settings: Settings, host: str, port: int) -> Any:
    endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
        reactor, host, port, timeout=QUERY_TIMEOUT
    )
    if settings.redis_sentinel_tls:
        endpoint = endpoints.wrapClientTLS(tls_options(settings, host), endpoint)
    return endpoint


class _Query(Protocol):
    """
    Sends a few commands to a sentinel, collects as many replies, hangs up.
    """

    def __init__(self, request: bytes, expected: int) -> None:
        self._request = request
        self._expected = expected
        self._reader = hiredis.Reader()
        self.replies: list[Any] = []
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        reply = self._reader.gets()
        while reply is not False:
            self.replies.append(reply)
            reply = self._reader.gets()
        if len(self.replies) >= self._expected and not self.done.called:
            self.done.callback(self.replies)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


async def ask_for_master(
    reactor: Any, settings: Settings, host: str, port: int
) -> tuple[str, int]:
    """
    One sentinel's answer: the master's (host, port).

    @raise SentinelError: it does not know the master, or refused.
    """
    hello = _hello(settings)
    request = hello + encode_command(
        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", settings.redis_sentinel_master
    )
    query = _Query(request, 2 if hello else 1)
    factory = Factory.forProtocol(lambda: query)
    factory.noisy = False
    protocol = await _sentinel_endpoint(reactor, settings, host, port).connect(factory)
    try:
        replies = await query.done.addTimeout(QUERY_TIMEOUT, reactor)
    finally:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise SentinelError(f"sentinel {host}:{port} refused: {reply}")
    answer = replies[-1]
    if answer is None:
        raise SentinelError(
            f"sentinels do not know master {settings.redis_sentinel_master!r}"
        )
    master_host, master_port = answer
    return master_host.decode(), int(master_port)


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to whatever master the sentinels name at the time of each
    attempt.
    """

    _log = Logger()

    def __init__(self, reactor: Any, settings: Settings) -> None:
        self._reactor = reactor
        self._settings = settings
        self._sentinels = list(settings.redis_sentinels)
        self.master: Optional[tuple[str, int]] = None
        #: the master a C{+switch-master} named (L{SentinelWatcher}): taken
        #: if any sentinel names it, until all of them do (those that did
        #: not lead the failover learn of it up to seconds later, and a
        #: majority of them would still name the old master)
        self.announced: Optional[tuple[str, int]] = None
        #: a failover is under way and C{announced} is the replica chosen
        #: (C{+selected-slave}): connect there without asking (no sentinel
        #: names it yet), the ROLE check waits for its promotion
        self.promoting = False

    async def find_master(self) -> tuple[str, int]:
        """
        Ask every sentinel at once and take the address most of those that
        answer give (a sentinel that is down is skipped, one that lies is
        outvoted; a lie that wins is still caught by the ROLE check).

        @raise SentinelError: with every sentinel's reason if none named
            the master.
        """
        if self.promoting and self.announced is not None:
            self.master = self.announced
            return self.announced

        async def ask(host: str, port: int) -> tuple[str, int] | str:
            try:
                return await ask_for_master(self._reactor, self._settings, host, port)
            except SentinelError as e:
                return f"{host}:{port}: {e}"
            except Exception as e:
                return f"{host}:{port}: {_reason(e)}"

        answers = await defer.gatherResults(
            [defer.ensureDeferred(ask(host, port)) for host, port in self._sentinels]
        )
        masters = [a for a in answers if isinstance(a, tuple)]
        if masters:
            announced = self.announced
            if announced is not None and announced in masters:
                master = announced
                if masters.count(announced) == len(self._sentinels):
                    self.announced = None
            else:
                master = max(masters, key=masters.count)
            self.master = master
            return master
        problems = [a for a in answers if isinstance(a, str)]
        if all("do not know master" in p for p in problems):
            raise SentinelError(
                f"sentinels do not know master {self._settings.redis_sentinel_master!r}"
            )
        raise SentinelError("no sentinel answered (" + "; ".join(problems) + ")")

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        host, port = await self.find_master()
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            self._reactor, host, port, timeout=5
        )
        if self._settings.redis.tls:
            endpoint = endpoints.wrapClientTLS(tls_options(self._settings, host), endpoint)
        return await endpoint.connect(factory)


def _reason(e: BaseException) -> str:
    text = str(e).strip().rstrip(".")
    return text or type(e).__name__


class _Watch(Protocol):
    """
    Subscribed to C{+switch-master} on one sentinel, and sure it still
    answers: the subscription must be confirmed, and a PING every few
    seconds answered, within L{QUERY_TIMEOUT}; otherwise the connection is
    dropped and the next sentinel watched (a sentinel that is frozen, or
    cut off, accepts connections and says nothing).
    """

    PING_INTERVAL = 5.0

    def __init__(
        self, hello: bytes, on_message: Callable[[bytes, bytes], None], clock: IReactorTime
    ) -> None:
        self._hello = hello
        self._on_message = on_message
        self._clock = clock
        self._reader = hiredis.Reader()
        self._deadline: Any = None
        self._pinger: Any = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            self._hello + encode_command("SUBSCRIBE", "+switch-master", "+selected-slave")
        )
        self._expect_answer()

    def _expect_answer(self) -> None:
        if self._deadline is None or not self._deadline.active():
            self._deadline = self._clock.callLater(QUERY_TIMEOUT, self._silent)

    def _silent(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _ping(self) -> None:
        if self.transport is not None:
            self.transport.write(encode_command("PING"))
            self._expect_answer()

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        reply = self._reader.gets()
        while reply is not False:
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._on_message(reply[1], reply[2])
            elif isinstance(reply, list) and reply[:1] == [b"subscribe"] and self._pinger is None:
                self._pinger = self._clock.callLater(self.PING_INTERVAL, self._keep_pinging)
            reply = self._reader.gets()

    def _keep_pinging(self) -> None:
        self._ping()
        self._pinger = self._clock.callLater(self.PING_INTERVAL, self._keep_pinging)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._deadline, self._pinger):
            if call is not None and call.active():
                call.cancel()


class SentinelWatcher:
    """
    Calls C{on_switch(host, port)} when the sentinels announce a new master
    for C{REDIS_SENTINEL_MASTER} (C{+switch-master}), and
    C{on_selected(host, port)} when a failover has chosen the replica it
    will promote (C{+selected-slave}): subscribed on every sentinel, acting
    on the first announcement of each. Only the sentinel that leads a
    failover announces it at once; the others learn of it from its hello
    messages, up to seconds later, and a proxy watching one of them would
    go on writing to the old master meanwhile.

    C{+selected-slave} comes one sentinel tick (about 0.1 s) before the
    sentinel sends the replica C{REPLICAOF NO ONE}, and C{+switch-master}
    only after the sentinel has seen the promotion and reconfigured the
    other replicas (about a second later here): what the old master takes
    in between is lost when it is demoted. Acting on C{+selected-slave}
    stops writing to the old master before the promotion.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        settings: Settings,
        on_switch: Callable[[str, int], None],
        on_selected: Callable[[str, int], None] = lambda host, port: None,
    ) -> None:
        self._name = settings.redis_sentinel_master.encode()
        self._on_switch = on_switch
        self._on_selected = on_selected
        #: the replica last selected
        self._selected: Optional[tuple[str, int]] = None
        #: the master last announced (each sentinel announces a switch)
        self._last: Optional[tuple[str, int]] = None
        hello = _hello(settings)
        factory = Factory.forProtocol(lambda: _Watch(hello, self._message, reactor))
        factory.noisy = False
        self._services = [
            ClientService(
                _sentinel_endpoint(reactor, settings, host, port), factory,
                retryPolicy=lambda attempt: min(1.0, 0.1 * 2 ** min(attempt, 4)),
                clock=reactor,
            )
            for host, port in settings.redis_sentinels
        ]

    def start(self) -> None:
        for service in self._services:
            service.startService()

    def stop(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await defer.gatherResults(
            [defer.ensureDeferred(s.stopService()) for s in self._services],
            consumeErrors=True,
        )

    def _message(self, channel: bytes, payload: bytes) -> None:
        parts = payload.split()
        if channel == b"+selected-slave":
            # "slave <ip:port> <ip> <port> @ <name> <master ip> <master port>"
            if len(parts) != 8 or parts[0] != b"slave" or parts[5] != self._name:
                return
            try:
                selected = parts[2].decode(), int(parts[3])
            except ValueError:
                return
            if selected == self._selected:
                return  # another sentinel's report of the same failover
            self._selected = selected
            self._log.info(
                "sentinel: failover of {name} to {host}:{port} under way; holding client "
                "messages until it is master",
                name=self._name.decode(), host=selected[0], port=selected[1],
            )
            self._on_selected(*selected)
            return
        # "<name> <old ip> <old port> <new ip> <new port>"
        if len(parts) != 5 or parts[0] != self._name:
            return
        try:
            host, port = parts[3].decode(), int(parts[4])
        except ValueError:
            return
        if (host, port) == self._last:
            return  # another sentinel's announcement of the same switch
        self._last = (host, port)
        self._selected = None
        self._log.info(
            "sentinel: master {name} is now {host}:{port}; reconnecting",
            name=self._name.decode(), host=host, port=port,
        )
        self._on_switch(host, port)
