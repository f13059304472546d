"""
The proxy's state and decisions, independent of any socket: which
connections are open, whether a new one may open (each admission decision
is taken here, once), the Redis links and the subscription hub, health and
draining.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Set, cast
from urllib.parse import parse_qs, urlsplit

import txredisapi
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import auth, frames
from .authn import Authenticator, CredentialCheck, MISSING_TOKEN
from .backpressure import Readable, UpstreamValve
from ..config import Settings
from .control import Control, Events, Heartbeat, TopicChange
from .keys import KeySource, build_verifier
from .limits import FailedAuthLimit, client_address
from ..logs import LogBudget
from ..metrics import Stats
from ..names import (
    CONTROL_CHANNEL,
    canary_channel,
    history_key,
    meta_key,
    parse_ws_path,
    topic_history_key,
    topic_meta_key,
    topics_key,
    use_hash_tags,
    valid_session_id,
)
from ..redis.cluster import Cluster, ClusterHub
from ..redis.hold import HoldBudget
from ..redis.pubsub import Hub, Listener
from ..redis.redislink import (
    Commands,
    FailureCounts,
    Link,
    RedisLink,
    RedisTimeout,
    RedisUnavailable,
    process_token,
    with_deadline,
)
from ..refusal import CLIENT_LEFT, Refusal, refusal_for
from ..redis.sentinel import SentinelWatcher
from .webtoken import NO_EXPIRY, Grant
from .resume import (
    RESUME_PARAM,
    library,
    Entry,
    History,
    InvalidPosition,
    Position,
    Recovery,
    parse_history,
    parse_position,
    plan_recovery,
)
from .topics import Chooser, Topics

#: how often outstanding Redis commands are checked against their deadline
SWEEP_INTERVAL = 0.5

#: refusal log lines per client address per minute (then one with the count)
REFUSAL_LINES = 5


def normalize_origin(origin: str) -> str:
    """
    C{scheme://host[:port]}, lower-case, default ports removed, so that
    C{https://App.example.com:443} and C{https://app.example.com} match.
    """
    if origin.strip().lower() == "null":
        # an opaque origin (sandboxed frame, file: page, some redirects)
        return "null"
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return origin
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class ResumeRequest:
    """
    A client opted in to a resumable session; C{position} is the last one
    it received (C{None}: it has received nothing yet).
    """

    position: Optional[Position]


@dataclass(frozen=True)
class Compared:
    """
    The credentials were found good before the WebSocket handshake
    (L{Proxy.compare}): C{since} on the proxy's clock, C{perf} by
    C{time.perf_counter}, and what they grant (a Redis token's TTL is
    already reset).
    """

    since: float
    perf: float
    grant: Grant = NO_EXPIRY
    #: TOPICS: the session's set, asked for beside the comparison
    members: Optional["MembersRead"] = None


class MembersRead:
    """
    C{SMEMBERS} of a session's topics, sent beside its token check (no
    round trip of its own): the reply is kept until the admission asks
    for it (L{get}), and a failure nobody asks for is dropped, never an
    unhandled error.
    """

    __slots__ = ("_result", "_waiting")

    def __init__(self, reply: defer.Deferred[Any]) -> None:
        self._result: Any = _UNANSWERED
        self._waiting: list[defer.Deferred[Any]] = []
        reply.addBoth(self._answered)

    def _answered(self, result: Any) -> None:
        self._result = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(result) if isinstance(result, Failure) else d.callback(result)

    def get(self) -> defer.Deferred[Any]:
        result = self._result
        if result is _UNANSWERED:
            d: defer.Deferred[Any] = defer.Deferred()
            self._waiting.append(d)
            return d
        return defer.fail(result) if isinstance(result, Failure) else defer.succeed(result)


_UNANSWERED = object()


def _ignore(reply: object) -> None:
    pass


#: how Redis fails a token check or an admission
REDIS_FAILURES = (RedisUnavailable, RedisTimeout, txredisapi.ResponseError)


def redis_refusal(error: Exception) -> Refusal:
    """
    What a Redis failure (one of L{REDIS_FAILURES}) during a token check or
    an admission is answered with: 504 if Redis did not answer in time, else
    503 (unreachable, or answering with an error: NOAUTH, NOPERM after an
    ACL change, ...). The server side's problem, never the client's.
    """
    if isinstance(error, RedisTimeout):
        return Refusal(504, "Redis timeout")
    return Refusal(503, "Redis unavailable")


def _refused_by_redis(failure: Failure) -> Failure:
    """
    L{redis_refusal} of a Redis failure (L{REDIS_FAILURES}); any other
    failure as it is.
    """
    if failure.check(*REDIS_FAILURES):
        raise redis_refusal(cast(Exception, failure.value))
    return failure


class Comparison:
    """
    A header token checked before the WebSocket handshake (L{Proxy.compare}),
    on the command connection's lean path: no Deferred, no coroutine, and
    no timer of its own (the site's handshake timer calls L{expired}). A
    check that needs no Redis command (a JWT) decides within L{start}.
    """

    _log = Logger()
    __slots__ = ("_proxy", "_check", "_done", "_since", "_perf", "_started", "_session_id",
                 "_members")

    def __init__(self, proxy: "Proxy", session_id: str, agent_id: str, token: str,
                 done: Callable[[Compared | Refusal], None]) -> None:
        self._proxy = proxy
        self._done: Optional[Callable[[Compared | Refusal], None]] = done
        self._check = proxy.authn.check(
            session_id, agent_id, auth.Credentials(token, "header"), self._found
        )
        self._session_id = session_id
        self._members: Optional[MembersRead] = None
        self._since = self._perf = 0.0
        self._started = False

    def start(self) -> None:
        proxy = self._proxy
        self._since = proxy.clock.seconds()
        self._perf = time.perf_counter()
        self._started = True
        proxy.comparing += 1
        if proxy.topics is not None:
            self._members = proxy.read_members(self._session_id)
        self._check.start()

    @property
    def decided(self) -> bool:
        return self._done is None

    def expired(self) -> None:
        """
        C{AUTH_TIMEOUT_SECS} passed without an answer: 504.
        """
        self._check.cancel()
        self._end(redis_refusal(RedisTimeout("no answer in time")))

    def cancel(self) -> None:
        """
        The client left: L{CLIENT_LEFT} (nothing happens once decided).
        """
        self._check.cancel()
        self._end(CLIENT_LEFT)

    def _found(self, found: object) -> None:
        result: Compared | Refusal
        if isinstance(found, Grant):
            result = Compared(self._since, self._perf, found, self._members)
        elif isinstance(found, Refusal):
            self._proxy.stats.auth_latency.observe(time.perf_counter() - self._perf)
            result = found
        elif isinstance(found, REDIS_FAILURES):
            result = redis_refusal(found)
        else:
            result = refusal_for(Failure(found), self._log, "checking a token")
        self._end(result)

    def _end(self, result: Compared | Refusal) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if self._started:
            self._proxy.comparing -= 1
        done(result)


def check_credentials(authn: Authenticator, session_id: str, agent_id: str,
                      credentials: auth.Credentials) -> "defer.Deferred[Grant]":
    """
    L{Authenticator.check} as a Deferred (cancellable): a L{Grant}, or the
    L{Refusal}, or the Redis failure.
    """
    check: Optional[CredentialCheck] = None
    d: defer.Deferred[Grant] = defer.Deferred(lambda _: check.cancel() if check else None)

    def done(result: object) -> None:
        if isinstance(result, Grant):
            d.callback(result)
        else:
            d.errback(Failure(cast(BaseException, result)))

    check = authn.check(session_id, agent_id, credentials, done).start()
    return d


class TopicJoin(Protocol):
    """
    A connection's topics during its admission (C{TOPICS=true}; made by
    L{wsproxy.websocket.fanout}): the listeners of the topics chosen, then,
    for a resuming client, the recovery of each.
    """

    def subscriptions(self, topics: list[str]) -> list[tuple[str, Listener]]: ...

    def positions(self) -> list[tuple[str, Optional[Position]]]: ...

    def planned(self, topic: str, recovery: Recovery) -> None: ...


class Connection(Readable, Protocol):
    """
    What the proxy needs of an open connection (a
    L{wsproxy.websocket.protocol.ProxyProtocol}) besides pausing its reading.

    @ivar closed: fires once the connection has closed.
    """

    closed: defer.Deferred[None]

    def going_away(self) -> None: ...

    def drop(self, why: str) -> defer.Deferred[None]: ...

    def dropConnection(self, abort: bool = False) -> None: ...


class Proxy:
    """
    Everything a connection needs from the process, in one object that tests
    can build with fakes.

    @ivar connections: protocols from upgrade request to close.
    """

    _log = Logger()

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        commands: Commands,
        subscriber: Link,
        canary_interval: float = 2.0,
        cluster: Optional[Cluster] = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # one layout of session names per process (KEY_HASH_TAGS)
        use_hash_tags(settings.key_hash_tags)
        self.commands = commands
        self.subscriber = subscriber
        self.stats = Stats()
        #: names this process in events, its heartbeat key and its canary
        self.instance = cluster.instance if cluster is not None else process_token()
        self._connection_ids = 0
        #: REDIS_CLUSTER: the slot map and a connection pair and hub per master
        self.cluster = cluster
        self.hub: Hub | ClusterHub
        if cluster is not None:
            self.hub = cluster.hub
            self.stats.cluster_shards = cluster.shard_states
            self.stats.cluster_redirects = lambda: cluster.redirects
        else:
            self.hub = Hub(
                cast(RedisLink, subscriber),
                clock,
                publish=commands.publish,
                canary_channel=canary_channel(self.instance),
                canary_interval=canary_interval,
                canary_timeout=max(3.0, canary_interval * 1.5),
            )
        self.stats.redis_reconnects = lambda: commands.reconnects + subscriber.reconnects
        self.stats.redis_connect_failures = lambda: _merged(
            {id(link.failures): link.failures for link in (commands, subscriber)}.values()
        )
        self.stats.canary_rtt = lambda: self.hub.canary_rtt
        self.stats.subscribed_channels = self.hub.channel_count
        #: connections from upgrade request to close
        self.connections: Set[Connection] = set()
        #: C{MAX_CONNECTIONS}, lowered by the daemon to what the process's
        #: descriptor limit allows (L{wsproxy.process.fdlimit}); 0 = no cap
        self.connection_cap = settings.max_connections
        self.valve = UpstreamValve(self.connections)
        #: client messages held while a command connection is replaced for
        #: a known reason (wsproxy.redis.hold): no client read meanwhile
        self.hold_budget = HoldBudget(pause=self.valve.hold, resume=self.valve.release)
        budget = self.hold_budget
        self.stats.redis_holds = lambda: (budget.holds, budget.held, budget.failed)
        if cluster is not None:
            cluster.hold_budget = self.hold_budget
        elif isinstance(commands, RedisLink):
            commands.hold_budget = self.hold_budget
        commands.on_ready = self._commands_ready
        commands.on_lost = self.valve.resumeProducing
        self.draining = False
        #: lines per client address for what Autobahn logs about connections
        self.log_budget = LogBudget(clock)
        #: refusal lines per client address: a flood from one address is a
        #: few lines and a count, not a line per request
        self.refusal_log_budget = LogBudget(clock, lines=REFUSAL_LINES, interval=60.0)
        self.auth_limit = FailedAuthLimit(
            clock,
            settings.auth_fail_limit,
            settings.auth_fail_window,
            settings.auth_fail_table_size,
            settings.auth_fail_exempt,
        )
        self.stats.auth_failures = lambda: self.auth_limit.failures
        self.stats.auth_limited = lambda: self.auth_limit.limited
        self.stats.auth_limit_addresses = self.auth_limit.__len__
        #: header tokens being compared before their handshake (compare)
        self.comparing = 0
        #: whether the token check runs as one script (one round trip)
        self.token_script = auth.TokenScript()
        #: AUTH_MODE=jwt: the verifier and where its keys come from (a bad
        #: key file fails start-up here, naming the setting)
        self.key_source: Optional[KeySource] = None
        verifier = None
        if "jwt" in settings.auth_mode:
            verifier = build_verifier(settings, self._log)
            self.key_source = KeySource(settings, verifier, clock)
        authn = self.authn = Authenticator(settings, commands.send, self.token_script, verifier)
        if verifier is not None and self.key_source is not None:
            source = self.key_source
            self.stats.jwt_checks = lambda: (authn.jwt_accepted, authn.jwt_refused)
            self.stats.jwt_keys = lambda: len(verifier.keys)
            self.stats.jwt_key_updates = lambda: Counter(
                reload=source.reloads, reload_failed=source.reload_failed,
                fetch=source.fetched, fetch_failed=source.fetch_failed,
            )
        #: JWT_EXPIRE_CONNECTIONS: the timer that closes each connection at
        #: its token's exp
        self.expiries: dict[Any, Any] = {}
        self._origins = frozenset(normalize_origin(o) for o in settings.allowed_origins)
        self._any_origin = not self._origins or "*" in settings.allowed_origins
        self._loops: list[task.LoopingCall] = []
        self._unheard_logged = -1e9
        self._unheard_reported = 0
        self._append_failed_logged = -1e9
        self._append_failed_reported = 0
        #: open sockets by session, for server-side closes
        self.sessions: dict[str, set[Any]] = {}
        self.events = Events(
            commands, settings.events, settings.events_stream_max_length, self.stats, clock
        )
        self.heartbeat = Heartbeat(commands, self.instance, clock) if self.events.enabled else None
        #: TOPICS: the topics of this process's sockets, which of the topics a
        #: backend names a connection joins, and the connections being
        #: admitted by session (a topic change meanwhile is applied at open)
        self.topics: Optional[Topics] = None
        self.chooser = Chooser(settings.topics_max_per_connection, clock)
        self.admitting: dict[str, set[Any]] = {}
        if settings.topics:
            self.topics = Topics(frames.codec(settings.frame_mode)[0], self.stats)
        self.control = Control(lambda session_id: self.sessions.get(session_id, ()),
                               self.stats, clock,
                               self._topic_change if settings.topics else None)
        self.sentinel_watcher: Optional[SentinelWatcher] = (
            SentinelWatcher(clock, settings, self._master_switched, self._replica_selected)
            if settings.redis_sentinels else None
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self.commands.start()
        self.subscriber.start()
        if self.key_source is not None:
            self.key_source.start()
        self.hub.keep(CONTROL_CHANNEL, self.control)
        if self.heartbeat is not None:
            self.heartbeat.start()
        if self.sentinel_watcher is not None:
            self.sentinel_watcher.start()
        for interval, work in (
            (SWEEP_INTERVAL, self._sweep),
            (self.hub.canary_interval, self.hub.check_canary),
        ):
            loop = task.LoopingCall(work)
            loop.clock = self.clock
            loop.start(interval, now=False)
            self._loops.append(loop)

    def _master_switched(self, host: str, port: int) -> None:
        """
        The sentinels promoted another master: both connections are made
        again through them now (after a graceful failover the old master is
        still up, as a replica, and would refuse writes). Client messages
        are held until the new command connection is ready
        (L{wsproxy.redis.hold}): a planned failover closes no client.
        """
        commands = cast(RedisLink, self.commands)
        if commands.connected_to() == (host, port):
            # already there since +selected-slave: only the sentinels' own
            # answers are trusted again
            commands.replace_done(master=(host, port))
        else:
            commands.replace(f"+switch-master to {host}:{port}", master=(host, port))
        self.subscriber.kill()

    def _replica_selected(self, host: str, port: int) -> None:
        """
        A failover chose the replica it is about to promote: the command
        connection is replaced now, before the promotion, so that nothing
        is written to the old master from then on (what it took after the
        promotion would be lost when it is demoted); client messages are
        held until the replica answers ROLE as master.
        """
        cast(RedisLink, self.commands).replace(
            f"+selected-slave {host}:{port}", master=(host, port), promoting=True
        )

    def _commands_ready(self, proto: Any) -> None:
        # a new connection (a failover, an ACL change): the token check
        # tries its script again
        self.token_script.reset()
        # a cluster has a command connection per master: clients are paused
        # while any of them is full
        proto.transport.registerProducer(
            self.valve if self.cluster is None else self.valve.share(), True
        )
        if self.heartbeat is not None:
            self.heartbeat.beat_now()
        if self.settings.resume:
            self._load_functions(proto)

    def _load_functions(self, proto: Any) -> None:
        """
        (Re)load the wsproxy function library on every new command
        connection (on a cluster: each master's): after a Redis restart
        without persistence, or a failover to a replica that never had it,
        it would be missing.
        """
        settings = self.settings
        code = library(settings.history_max_length, int(settings.history_max_age * 1000),
                       sharded=self.cluster is not None,
                       topic_max_length=settings.topic_history_max_length,
                       topic_max_age_ms=int(settings.topic_history_max_age * 1000))

        def loaded(_: object) -> None:
            self._log.info("redis functions wsproxy_publish, wsproxy_history loaded")

        def failed(reason: Failure) -> None:
            self._log.error(
                "RESUME=true but the wsproxy Redis functions could not be loaded "
                "(FUNCTION LOAD needs the @scripting category): {why}",
                why=reason.getErrorMessage(),
            )

        d: defer.Deferred[Any] = proto.command("FUNCTION", "LOAD", "REPLACE", code)
        d.addCallbacks(loaded, failed)

    def _sweep(self) -> None:
        self.commands.sweep()
        self.subscriber.sweep()

    def stop(self) -> defer.Deferred[Any]:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.heartbeat is not None:
            # a clean shutdown: every close event was sent, the instance is gone
            self.heartbeat.stop()
        if self.key_source is not None:
            self.key_source.stop()
        for timer in self.expiries.values():
            if timer.active():
                timer.cancel()
        self.expiries.clear()
        stopping = [self.commands.stop(), self.subscriber.stop()]
        if self.sentinel_watcher is not None:
            stopping.append(self.sentinel_watcher.stop())
        return defer.gatherResults(stopping, consumeErrors=True)

    def expire_at(self, connection: Any, grant: Grant) -> None:
        """
        C{JWT_EXPIRE_CONNECTIONS}: close an opened connection when its
        token's C{exp} (and the leeway) passes (its C{token_expired}).
        """
        if grant.expires is None or not self.settings.jwt_expire_connections:
            return
        # the token is good until exp + JWT_LEEWAY_SECS, at its admission too
        delay = max(grant.expires + self.settings.jwt_leeway - time.time(), 0.0)
        self.expiries[connection] = self.clock.callLater(delay, self._expired, connection)

    def _expired(self, connection: Any) -> None:
        self.expiries.pop(connection, None)
        self.stats.outcomes["token_expired"] += 1
        connection.token_expired()

    def reload_keys(self) -> bool:
        """
        SIGHUP: read the JWT key files again (C{False}: an error, the keys
        in use stay; also when there are no JWT keys).
        """
        if self.key_source is None:
            return False
        return self.key_source.reload()

    def unheard(self, session_id: Optional[str]) -> None:
        """
        A client message was published on a :up channel that no backend
        listens on: Pub/Sub dropped it. Counted; one warning a minute with
        the count and the last session, so a backend outage is not silence.
        """
        stats = self.stats
        stats.messages_up_unheard += 1
        now = self.clock.seconds()
        if now - self._unheard_logged >= 60:
            self._log.warn(
                "{n} client messages published with no backend subscribed to their :up "
                "channel (they are lost; last: session {session_id})",
                n=stats.messages_up_unheard - self._unheard_reported,
                session_id=session_id,
            )
            self._unheard_logged = now
            self._unheard_reported = stats.messages_up_unheard

    def append_failed(self, session_id: Optional[str], reason: str) -> None:
        """
        A client message was not stored (UPSTREAM=stream) and its client
        was told with a nack (counted by the caller): one warning a minute
        with how many and the last reason, so that a full or unreachable
        Redis is not silence.
        """
        now = self.clock.seconds()
        failures = self.stats.upstream_append_failures
        if now - self._append_failed_logged >= 60:
            self._log.warn(
                "{n} client messages could not be appended to the upstream streams "
                "(clients with ?ack=1 were sent a nack; last: session {session_id}: {why})",
                n=failures - self._append_failed_reported, session_id=session_id, why=reason,
            )
            self._append_failed_logged = now
            self._append_failed_reported = failures

    # -- open sockets --------------------------------------------------------

    def next_connection_id(self) -> str:
        self._connection_ids += 1
        return f"{self.instance}.{self._connection_ids}"

    def opened(self, session_id: str, connection: Any) -> None:
        self.sessions.setdefault(session_id, set()).add(connection)

    def admitting_started(self, session_id: str, connection: Any) -> None:
        """
        C{TOPICS}: a connection of the session is being admitted: a topic
        change for the session from now on reaches it (L{_topic_change}),
        so that none falls between the read of the session's set and the
        open.
        """
        self.admitting.setdefault(session_id, set()).add(connection)

    def admitting_over(self, session_id: str, connection: Any) -> None:
        sockets = self.admitting.get(session_id)
        if sockets is not None:
            sockets.discard(connection)
            if not sockets:
                del self.admitting[session_id]

    def _topic_change(self, session_id: str, change: TopicChange, topics: list[str]) -> None:
        """
        A backend made a session join or leave topics (wsproxy:control):
        every local socket of the session follows, those being admitted
        at their open.
        """
        for connection in [*self.sessions.get(session_id, ()),
                           *self.admitting.get(session_id, ())]:
            connection.topic_change(change, topics)

    def closed(self, session_id: str, connection: Any) -> None:
        if self.expiries:
            timer = self.expiries.pop(connection, None)
            if timer is not None and timer.active():
                timer.cancel()
        sockets = self.sessions.get(session_id)
        if sockets is not None:
            sockets.discard(connection)
            if not sockets:
                del self.sessions[session_id]

    # -- admission ---------------------------------------------------------
    #
    # The site calls screen (429) before anything else; admission.start (websocket)
    # then calls these in order: route -> precheck -> authorize (token,
    # then subscription; subscribe_compared for a token the site compared)
    # -> open. Each raises the Refusal it decides;
    # nothing else refuses a WebSocket upgrade, and every refusal is
    # counted and logged by refused().

    def client_address(self, peer: str, header: Callable[[str], Optional[str]]) -> str:
        """
        Who the client is: C{peer} (the TCP peer's IP address, "" for a
        Unix socket), or what a trusted proxy says (C{TRUSTED_PROXIES}).

        @param header: a request header's value by lower-case name.
        """
        trusted = self.settings.trusted_proxies
        return client_address(peer, header, trusted) if trusted else peer

    def screen(self, peer: str, header: Callable[[str], Optional[str]]) -> Optional[Refusal]:
        """
        The first check of an upgrade request, before Autobahn or Redis
        see it: is its client address limited for failed authorization?

        @return: the 429 refusal, or C{None}.
        """
        limit = self.auth_limit
        if not limit.limit or not len(limit):
            return None
        address = self.client_address(peer, header)
        retry = limit.retry_after(address) if address else None
        if retry is None:
            return None
        return Refusal(429, "Too many failed authorizations", (("Retry-After", str(retry)),))

    def auth_failed(self, address: str) -> None:
        """
        A token check from C{address} failed (401 or 403): it counts
        towards C{AUTH_FAIL_LIMIT}.
        """
        if address:
            self.auth_limit.failed(address)

    def refused(
        self,
        refusal: Refusal,
        client: str,
        peer: object,
        session_id: Optional[str] = None,
        agent_id: Optional[str] = None,
    ) -> None:
        """
        Count a refused upgrade and log it, within the client address's
        budget of refusal lines (the next line allowed says how many were
        left out).
        """
        self.stats.outcomes[str(refusal.code)] += 1
        suppressed = self.refusal_log_budget.take(client or str(peer))
        if suppressed is None:
            self.stats.refusal_lines_suppressed += 1
            return
        fmt = "refused {code} {reason}: session={session_id} agent={agent_id} peer={peer}"
        if client and client not in str(peer):
            # named by a trusted proxy
            fmt += " client={client}"
        if suppressed:
            fmt += " ({suppressed} refusals from {client} not logged)"
        self._log.info(
            fmt,
            code=refusal.code,
            reason=refusal.reason,
            session_id=session_id,
            agent_id=agent_id,
            peer=peer,
            client=client,
            suppressed=suppressed,
        )

    def route(self, path: str) -> tuple[str, str]:
        """
        The (agent id, session id) a request path names.

        @raise Refusal: 404 (not a WebSocket path) or 400 (invalid session
            id).
        """
        parsed = parse_ws_path(path)
        if parsed is None:
            raise Refusal(404, "Not Found")
        if not valid_session_id(parsed[1]):
            raise Refusal(400, "Invalid session id")
        return parsed

    def precheck(self, headers: Mapping[str, str]) -> None:
        """
        The checks that need no Redis: draining, connection cap, origin.

        @raise Refusal: 503 or 403.
        """
        if self.draining:
            raise Refusal(503, "Server shutting down", (("Retry-After", "1"),))
        cap = self.connection_cap
        if cap and len(self.connections) > cap:
            raise Refusal(503, "Too many connections")
        origin = headers.get("origin")
        if origin is None:
            # Browsers always send Origin; servers, apps and CLI clients do
            # not, and the origin check cannot protect anything from them.
            if self.settings.require_origin:
                raise Refusal(403, "Origin required")
        elif not self.origin_allowed(origin):
            raise Refusal(403, "Origin not allowed")

    def origin_allowed(self, origin: str) -> bool:
        """
        Whether a request's C{Origin} passes C{ALLOWED_ORIGINS}.
        """
        return self._any_origin or normalize_origin(origin) in self._origins

    def resume_request(self, uri: str) -> Optional[ResumeRequest]:
        """
        Whether the client opted in to a resumable session: C{?resume=}
        (nothing received yet) or C{?resume=<last position received>}.

        @param uri: the request's target (path and query).
        @raise Refusal: 400 if resumable sessions are not enabled or the
            position is malformed.
        """
        if RESUME_PARAM not in uri:
            return None  # the plain path pays one substring test
        values = parse_qs(urlsplit(uri).query, keep_blank_values=True).get(RESUME_PARAM)
        if values is None:
            return None
        if not self.settings.resume:
            raise Refusal(400, "Resumable sessions are not enabled")
        if len(values) != 1:
            raise Refusal(400, "Invalid resume position")
        try:
            return ResumeRequest(parse_position(values[0]))
        except InvalidPosition:
            raise Refusal(400, "Invalid resume position") from None

    async def authorize(
        self,
        session_id: str,
        agent_id: str,
        credentials: Optional[auth.Credentials],
        subscriptions: Sequence[tuple[str, Listener]],
        resume: Optional[ResumeRequest] = None,
        compared: Optional["Compared"] = None,
        topics: Optional[TopicJoin] = None,
    ) -> tuple[Optional[Recovery], Grant]:
        """
        The credentials' check (L{Authenticator}), with C{TOPICS} the
        session's topics (C{SMEMBERS}, sent beside it, and a JWT's
        C{topics} claim), then the subscriptions (channel, listener, the
        topics' too), confirmed by Redis, then for a resuming client the
        history after its position (and each topic's): all within one
        C{AUTH_TIMEOUT_SECS} deadline (one timer per handshake).

        On success the caller owns the subscriptions (it calls L{release}
        when it closes). Otherwise, and if the caller cancels (the client
        left), nothing stays subscribed.

        @param compared: the credentials were already checked (L{compare},
            before the WebSocket handshake): the deadline is what is left of
            the one that began then.
        @return: for a resuming client, what it will be sent; and what the
            credentials grant.
        @raise Refusal: 401, 403, 503 (Redis unreachable or answering with
            an error) or 504 (no answer in time).
        """
        if credentials is None:
            # refused here rather than inside the deadline's Deferred: a
            # Failure raised while that is being set up holds the frames
            # that hold it (a reference cycle; see wsproxy.fast.heap)
            raise MISSING_TOKEN
        timeout = self.settings.auth_timeout
        if compared is not None:
            timeout -= self.clock.seconds() - compared.since
        try:
            result: tuple[Optional[Recovery], Grant] = await with_deadline(
                defer.ensureDeferred(self._authorize(
                    session_id, agent_id, credentials, subscriptions, resume, compared, topics
                )),
                max(timeout, 0.0),
                self.clock,
            )
            return result
        except REDIS_FAILURES as e:
            raise redis_refusal(e) from None

    def subscribe_compared(self, channel: str, listener: Listener,
                           compared: "Compared") -> defer.Deferred[Any]:
        """
        L{authorize} of credentials already found good (L{compare}) for a
        plain session, one subscription: the same deadline (what is left
        of C{AUTH_TIMEOUT_SECS}), the same refusals (503, 504, and
        L{CLIENT_LEFT} when cancelled), the same release of the
        subscription on every failure (the hub's: it owns it until Redis
        confirms it), as the hub's own Deferred with plain callbacks
        rather than the coroutines of L{authorize}.
        """
        timeout = self.settings.auth_timeout - (self.clock.seconds() - compared.since)
        self.stats.auth_latency.observe(time.perf_counter() - compared.perf)
        d = with_deadline(self.hub.subscribe(channel, listener), max(timeout, 0.0), self.clock)
        return d.addErrback(_refused_by_redis)

    async def _authorize(
        self,
        session_id: str,
        agent_id: str,
        credentials: auth.Credentials,
        subscriptions: Sequence[tuple[str, Listener]],
        resume: Optional[ResumeRequest],
        compared: Optional["Compared"] = None,
        topics: Optional[TopicJoin] = None,
    ) -> tuple[Optional[Recovery], Grant]:
        members: Optional[MembersRead] = None
        if topics is not None:
            # sent beside the token check (the site's, for a compared one):
            # no round trip of its own
            members = compared.members if compared is not None else None
            if members is None:
                members = self.read_members(session_id)
        if compared is None:
            started = time.perf_counter()
            try:
                grant = await check_credentials(self.authn, session_id, agent_id, credentials)
            finally:
                self.stats.auth_latency.observe(time.perf_counter() - started)
        else:
            grant = compared.grant
            self.stats.auth_latency.observe(time.perf_counter() - compared.perf)
        if topics is not None and members is not None:
            named = await self._members(session_id, members)
            if named:
                # the set lives as long as the token's grace period from
                # each connect, as the token does (GT: never shortened,
                # and a set without a TTL keeps none); fire-and-forget
                self.commands.send(_ignore, b"EXPIRE", topics_key(session_id).encode(),
                                   b"%d" % self.settings.auth_grace_period, b"GT")
            chosen = self.chooser.choose(session_id, [*named, *grant.topics])
            subscriptions = [*subscriptions, *topics.subscriptions(chosen)]
        # every subscription asked at once (a round trip for all), each
        # confirmed before the 101
        pending = [(channel, listener, self.hub.subscribe(channel, listener))
                   for channel, listener in subscriptions]
        subscribed: list[tuple[str, Listener]] = []
        try:
            for channel, listener, confirmed in pending:
                await confirmed
                subscribed.append((channel, listener))
            if resume is None:
                return None, grant
            # subscribed first, history second: whatever is published from
            # now on arrives live, whatever was before is in the history
            position = resume.position
            if position is None:
                # nothing to replay: only where the history ends
                history = await self._history_chunk(session_id, "0-0", 0)
            else:
                history = await self.read_history(session_id, position.stream_id)
            recovery = plan_recovery(position, history)
            if topics is not None:
                for topic, at in topics.positions():
                    if at is None:
                        history = await self._history_chunk(session_id, "0-0", 0, topic)
                    else:
                        history = await self.read_history(session_id, at.stream_id, topic)
                    topics.planned(topic, plan_recovery(at, history))
            return recovery, grant
        except BaseException:
            self.release(subscribed)
            # the failed one the hub released itself; those after it are
            # released once confirmed, or cancelled (the hub releases them)
            for channel, listener, confirmed in pending[len(subscribed) + 1:]:
                confirmed.addCallbacks(
                    lambda _, c=channel, li=listener: self.hub.unsubscribe(c, li),
                    lambda f: None,
                )
                confirmed.cancel()
            raise

    _wrong_type_logged = -1e9

    def read_members(self, session_id: str) -> MembersRead:
        """
        Ask for the session's topic set now (L{MembersRead}).
        """
        return MembersRead(self.commands.execute("SMEMBERS", topics_key(session_id)))

    async def _members(self, session_id: str, members: MembersRead) -> list[Any]:
        """
        The session's topic set, as C{SMEMBERS} answered; a key of another
        type is the backend's mistake: no topics (a warning a minute), not
        a refused client.
        """
        try:
            reply = await members.get()
        except txredisapi.ResponseError as e:
            if not str(e).startswith("WRONGTYPE"):
                raise
            now = self.clock.seconds()
            if now - self._wrong_type_logged >= 60:
                self._wrong_type_logged = now
                self._log.warn("session {session_id}: {key} is not a set: no topics joined",
                               session_id=session_id, key=topics_key(session_id))
            return []
        return list(reply or ())

    def compare(
        self, session_id: str, agent_id: str, token: str,
        done: Callable[[Compared | Refusal], None],
    ) -> "Comparison":
        """
        The check of a header token before the WebSocket handshake (see
        L{wsproxy.edge.site.Root}), to be started: the same decision as
        L{authorize}'s (L{Authenticator}). C{done} gets a L{Compared}, or the
        L{Refusal}: 403, 503, 504 as L{authorize}, L{CLIENT_LEFT} if
        cancelled; within L{Comparison.start} when no Redis command is
        needed. Its deadline is the caller's (L{Comparison.expired});
        L{authorize} then has what is left of C{AUTH_TIMEOUT_SECS}.
        """
        return Comparison(self, session_id, agent_id, token, done)

    def release(self, subscriptions: Sequence[tuple[str, Listener]]) -> None:
        for channel, listener in subscriptions:
            self.hub.unsubscribe(channel, listener)

    def read_history(self, session_id: str, after: str,
                     topic: Optional[str] = None) -> defer.Deferred[History]:
        """
        The session's history (or the C{topic}'s): its epoch, end, and
        every entry after the stream id C{after} (C{"0-0"}: all of it).
        """
        return defer.ensureDeferred(self._read_history(session_id, after, topic))

    def history_end(self, session_id: str,
                    topic: Optional[str] = None) -> defer.Deferred[History]:
        """
        Where the session's history (or the C{topic}'s) ends, without its
        entries: for a connection that starts live there.
        """
        return defer.ensureDeferred(self._history_chunk(session_id, "0-0", 0, topic))

    async def _history_chunk(self, session_id: str, after: str, count: int,
                             topic: Optional[str] = None) -> History:
        """
        One C{wsproxy_history} call: the epoch, the end, and up to C{count}
        entries after the stream id C{after}.
        """
        if topic is None:
            keys = history_key(session_id), meta_key(session_id)
        else:
            keys = topic_history_key(topic), topic_meta_key(topic)
        reply: Any = await self.commands.execute(
            "FCALL_RO", "wsproxy_history", 2, *keys, after, count,
        )
        return parse_history(reply)

    async def _read_history(self, session_id: str, after: str,
                            topic: Optional[str] = None) -> History:
        # read in chunks until the end the history had when first asked:
        # approximate trimming (MAXLEN ~) may keep more than the maximum
        settings = self.settings
        chunk = (settings.history_max_length if topic is None
                 else settings.topic_history_max_length) + 1
        entries: list[Entry] = []
        while True:
            history = await self._history_chunk(session_id, after, chunk, topic)
            if entries and history.epoch != entries[0].epoch:
                # the history started over between two chunks
                return history
            entries.extend(history.entries)
            if len(history.entries) < chunk or not entries or (
                entries[-1].seq >= history.last_seq or len(entries) >= 16 * chunk
            ):
                return replace(history, entries=tuple(entries))
            after = entries[-1].position.stream_id

    # -- health --------------------------------------------------------------

    async def healthy(self) -> bool:
        """
        The command connection answers a PING within a second and the
        subscriber is connected and delivering (canary).
        """
        if not self.hub.healthy:
            return False
        try:
            reply = await with_deadline(self.commands.execute("PING"), 1.0, self.clock)
        except Exception:
            return False
        return reply in (b"PONG", "PONG")


def _merged(reporters: Iterable[FailureCounts]) -> Counter[str]:
    total: Counter[str] = Counter()
    for reporter in reporters:
        total.update(reporter.counts)
    return total
