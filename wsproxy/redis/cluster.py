"""
Redis Cluster (C{REDIS_CLUSTER=true}): the slot map, one command connection
and one sharded subscriber per master, and routing by slot.

A key or channel lives in one of 16384 slots (CRC16/XMODEM of the name, or
of its hash tag, the part between the first C{{} and the next C{}}), and
each slot is served by one master. The map comes from C{CLUSTER SHARDS},
asked of every node known (the seeds at first) at once, the first answer
taken; it is asked again on every redirection, every C{sunsubscribe} Redis
sends on its own, every second while a master is unreachable or a slot
unserved (a failover: the replica's promotion shows up there), and every
ten seconds otherwise.

Commands (L{ClusterCommands}, the same interface as one L{RedisLink}) go to
the master of their first key's slot. C{MOVED} updates the map and the
command is sent again to the named master; C{ASK} sends it there once,
after C{ASKING}. So a token check that meets a slot in migration or just
migrated is followed, not refused. Client messages and events are published
with C{SPUBLISH} on the master of the channel's slot.

Subscriptions: each master has its own L{Hub} on its own subscriber
connection, which subscribes with C{SSUBSCRIBE}; L{ClusterHub} puts each
channel in the hub of its slot's master and, whenever the map changes,
moves the channels whose slot changed master (with their listeners, and
the admissions still waiting for a confirmation) to the right hub. Each
hub's canary runs on a channel whose hash tag puts it on that shard, so a
shard that stops delivering is noticed and rebuilt like a single Redis is.
"""

from __future__ import annotations

import binascii
from collections import Counter
from dataclasses import dataclass, replace
from itertools import count
from typing import Any, Callable, Optional

import hiredis
import txredisapi
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Settings
from ..names import canary_channel
from .pubsub import Hub, Listener
from .redisendpoint import ConnectFailures, client_endpoint, describe_failure, encode_command
from .hold import HoldBudget
from .redislink import RedisLink, RedisUnavailable

SLOTS = 16384

Address = tuple[str, int]

#: redirections one command follows before it fails
MAX_REDIRECTS = 5

#: how long one node may take to answer CLUSTER SHARDS
ASK_TIMEOUT = 2.0

#: map refresh: while something is wrong, and otherwise
REFRESH_FAST = 1.0
REFRESH_SLOW = 10.0


def key_slot(key: bytes) -> int:
    """
    The cluster slot of a key or channel name: CRC16 (XMODEM) of its hash
    tag if it has a non-empty one, else of the whole name, modulo 16384.
    """
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key, 0) & (SLOTS - 1)


def parse_redirect(error: object) -> Optional[tuple[str, int, Address]]:
    """
    C{("MOVED"|"ASK", slot, (host, port))} for a redirection error reply,
    else C{None}.
    """
    text = str(error)
    if not text.startswith(("MOVED ", "ASK ")):
        return None
    parts = text.split()
    if len(parts) != 3:
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit() or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), (host.strip("[]"), int(port))


def describe(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class SlotMap:
    """
    Who serves which slot, from one C{CLUSTER SHARDS} answer.

    @ivar owners: the master of each slot (C{None}: nobody serves it).
    @ivar masters: the masters that serve at least one slot.
    @ivar nodes: every node named (masters and replicas), to ask next time.
    @ivar failed: the nodes the cluster marks as failed (C{health: fail}).
    @ivar failed_masters: those of them still called masters that serve no
        slot: a master that died and whose replica took over its slots
        (until it comes back, as a replica, or is forgotten).
    """

    owners: tuple[Optional[Address], ...]
    masters: tuple[Address, ...]
    nodes: tuple[Address, ...]
    failed: tuple[Address, ...] = ()
    failed_masters: tuple[Address, ...] = ()

    @property
    def complete(self) -> bool:
        return None not in self.owners


def _pairs(flat: Any) -> dict[str, Any]:
    if isinstance(flat, dict):
        items = list(flat.items())
    else:
        items = list(zip(flat[::2], flat[1::2]))
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in items}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_shards(reply: Any, tls: bool = False) -> SlotMap:
    """
    The slot map in a C{CLUSTER SHARDS} reply (RESP2). A node is reached at
    its C{endpoint} (else C{ip}) and C{port}, or C{tls-port} when C{tls}.

    @raise ValueError: the reply does not have that shape.
    """
    owners: list[Optional[Address]] = [None] * SLOTS
    masters: list[Address] = []
    nodes: list[Address] = []
    failed: list[Address] = []
    named_masters: list[Address] = []
    if not isinstance(reply, list):
        raise ValueError(f"unexpected CLUSTER SHARDS reply: {reply!r}"[:200])
    for shard in reply:
        fields = _pairs(shard)
        master: Optional[Address] = None
        for node in fields.get("nodes") or []:
            info = _pairs(node)
            host = _text(info.get("endpoint") or b"")
            if host in ("", "?"):
                host = _text(info.get("ip") or b"")
            port = info.get("tls-port") if tls and info.get("tls-port") else info.get("port")
            if not host or port is None:
                continue
            address = (host, int(port))
            nodes.append(address)
            healthy = _text(info.get("health") or b"online") != "fail"
            if not healthy:
                failed.append(address)
            if _text(info.get("role") or b"") == "master":
                named_masters.append(address)
                # a failed former master may be listed with its successor
                if master is None or healthy:
                    master = address
        ranges = fields.get("slots") or []
        if master is None or not ranges:
            continue
        masters.append(master)
        for start, end in zip(ranges[::2], ranges[1::2]):
            for slot in range(int(start), int(end) + 1):
                if 0 <= slot < SLOTS:
                    owners[slot] = master
    return SlotMap(
        tuple(owners), tuple(masters), tuple(dict.fromkeys(nodes)),
        failed=tuple(dict.fromkeys(failed)),
        failed_masters=tuple(dict.fromkeys(
            a for a in named_masters if a in failed and a not in masters
        )),
    )


class NotACluster(Exception):
    """
    A node answered that it is not part of a cluster.
    """


class _Ask(protocol.Protocol):
    """
    One connection that sends a few commands, collects their replies and
    closes: how the slot map is asked of a node.
    """

    def __init__(self, commands: list[bytes]) -> None:
        self._commands = commands
        self._parser = hiredis.Reader()
        self.replies: list[Any] = []
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(b"".join(self._commands))

    def dataReceived(self, data: bytes) -> None:
        self._parser.feed(data)
        reply = self._parser.gets()
        while reply is not False:
            self.replies.append(reply)
            if len(self.replies) == len(self._commands) and not self.done.called:
                self.done.callback(self.replies)
                self.transport.loseConnection()
                return
            reply = self._parser.gets()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


async def ask_shards(reactor: Any, settings: Settings) -> SlotMap:
    """
    Ask the node C{settings.redis} names for the slot map (with its
    credentials and TLS).

    @raise NotACluster: the node has cluster support disabled.
    @raise RedisUnavailable: with one line saying why (refused, AUTH
        refused, an error reply, ...).
    """
    address = settings.redis
    commands = []
    if address.password is not None:
        auth = (address.username, address.password) if address.username else (address.password,)
        commands.append(encode_command("AUTH", *auth))
    commands.append(encode_command("CLUSTER", "SHARDS"))
    ask = _Ask(commands)
    # not endpoints.connectProtocol: its factory logs "Starting factory" and
    # "Stopping factory" at info for every node asked, on every refresh
    factory = protocol.Factory.forProtocol(lambda: ask)
    factory.noisy = False
    try:
        connecting = client_endpoint(reactor, settings).connect(factory)
        connecting.addTimeout(ASK_TIMEOUT, reactor)
        await connecting
        answering = ask.done
        answering.addTimeout(ASK_TIMEOUT, reactor)
        replies = await answering
    except Exception as e:
        # timed out, failed or cancelled (the proxy stops): nothing stays open
        if ask.transport is not None:
            ask.transport.abortConnection()
        if isinstance(e, defer.TimeoutError):
            raise RedisUnavailable(f"no answer within {ASK_TIMEOUT:g}s") from None
        _, text = describe_failure(Failure(e), None, settings)
        raise RedisUnavailable(text) from None
    if len(replies) == 2 and isinstance(replies[0], Exception):
        raise RedisUnavailable(f"AUTH refused: {replies[0]}")
    shards = replies[-1]
    if isinstance(shards, Exception):
        if "cluster support disabled" in str(shards):
            raise NotACluster("not a cluster node (cluster support disabled)")
        raise RedisUnavailable(f"CLUSTER SHARDS failed: {shards}")
    try:
        return parse_shards(shards, address.tls)
    except (ValueError, TypeError, IndexError) as e:
        raise RedisUnavailable(str(e)) from None


class Shard:
    """
    One master: its command connection, its sharded subscriber and the hub
    of the channels in its slots.
    """

    def __init__(self, cluster: "Cluster", address: Address) -> None:
        self.address = address
        self.name = describe(address)
        clock = cluster.clock
        settings = cluster.node_settings(address)
        endpoint = client_endpoint(cluster.reactor, settings)
        self.failures = ConnectFailures(clock, f"cluster node {self.name}")
        self.commands = RedisLink(
            f"commands {self.name}", endpoint, settings, clock, failures=self.failures
        )
        self.commands.hold_budget = cluster.hold_budget
        self.subscriber = RedisLink(
            f"subscriber {self.name}", endpoint, settings, clock, subscriber=True,
            sharded=True, failures=self.failures,
        )
        self.canary_tag = ""
        self.hub = Hub(
            self.subscriber,
            clock,
            publish=self._spublish,
            canary_channel=canary_channel(cluster.instance, "-"),
            canary_interval=cluster.canary_interval,
            canary_timeout=max(3.0, cluster.canary_interval * 1.5),
            on_redirect=cluster.redirected,
        )
        self.subscriber.on_sunsubscribed = lambda channel: cluster.sunsubscribed(self, channel)
        self.commands.on_ready = lambda proto: cluster.commands_ready(self, proto)
        self.commands.on_lost = cluster.commands_lost

    def _spublish(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        self.commands.send(on_reply, b"SPUBLISH", channel, payload)

    @property
    def up(self) -> bool:
        return self.commands.ready is not None and self.hub.healthy

    def start(self) -> None:
        self.commands.start()
        self.subscriber.start()

    def stop(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [self.commands.stop(), self.subscriber.stop()], consumeErrors=True
        )


class Cluster:
    """
    The slot map and a L{Shard} per master; L{commands}, L{subscribers}
    and L{hub} are what L{wsproxy.session.proxy.Proxy} uses instead of one Redis
    connection pair and one hub.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        instance: str,
        canary_interval: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.settings = settings
        self.instance = instance
        self.canary_interval = canary_interval
        self.seeds: tuple[Address, ...] = tuple(dict.fromkeys(
            ((settings.redis.host, settings.redis.port),) + settings.redis_cluster_nodes
        ))
        self.owners: list[Optional[Address]] = [None] * SLOTS
        self.known: tuple[Address, ...] = ()
        self.shards: dict[Address, Shard] = {}
        self.problem: Optional[str] = "slot map not known yet"
        self.discovery = ConnectFailures(self.clock, settings.redis_description)
        self.redirects: Counter[str] = Counter()
        self.refreshes = 0
        self._refreshing: Optional[defer.Deferred[None]] = None
        self._last_refresh = -1e9
        self._hinted = False
        self._retired_reconnects = 0
        self._retired_failures: Counter[str] = Counter()
        #: the masters of the last map applied
        self._masters: tuple[Address, ...] = ()
        #: masters that left the map and that it lists as failed (their
        #: wsproxy_cluster_shard_up series read 0)
        self.failed_masters: tuple[Address, ...] = ()
        self._former: set[Address] = set()
        self._waiting: dict[Address, list[defer.Deferred[Any]]] = {}
        self._loop: Optional[task.LoopingCall] = None
        #: CLUSTER SHARDS requests in flight (cancelled at stop)
        self._asking: set[defer.Deferred[Any]] = set()
        self._stopping = False
        #: client messages held for masters learned of while serving
        #: (wsproxy.redis.hold); the proxy sets its own
        self.hold_budget = HoldBudget()
        #: a slot map has been applied: a master new after that is a
        #: known change (a failover, a migration), its commands held
        #: until its connection is ready
        self._mapped = False
        #: shards retired, answering what was sent to them (L{_retire})
        self._leaving: set[Shard] = set()
        self.commands = ClusterCommands(self)
        self.subscribers = ClusterSubscribers(self)
        self.hub = ClusterHub(self)

    def node_settings(self, address: Address) -> Settings:
        """
        REDIS_URL's credentials and TLS, for one node.
        """
        redis = replace(self.settings.redis, host=address[0], port=address[1])
        return replace(self.settings, redis=redis, redis_cluster=False, redis_cluster_nodes=())

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        loop = self._loop = task.LoopingCall(self._tick)
        loop.clock = self.clock
        loop.start(REFRESH_FAST, now=True)

    def stop(self) -> defer.Deferred[Any]:
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for asking in list(self._asking):
            asking.cancel()
        return defer.gatherResults(
            [shard.stop() for shard in list(self.shards.values()) + list(self._leaving)],
            consumeErrors=True,
        )

    def _tick(self) -> None:
        now = self.clock.seconds()
        troubled = self.problem is not None or self._hinted or any(
            shard.commands.ready is None or shard.subscriber.ready is None
            or shard.hub.unsettled
            for shard in self.shards.values()
        )
        if now - self._last_refresh >= (REFRESH_FAST if troubled else REFRESH_SLOW) - 0.01:
            self.refresh()

    # -- the slot map --------------------------------------------------------

    def refresh(self) -> defer.Deferred[None]:
        """
        Ask for the slot map (one request at a time) and apply it.
        """
        if self._stopping:
            return defer.succeed(None)
        if self._refreshing is not None:
            self._hinted = True
            return self._refreshing
        self._hinted = False
        self._last_refresh = self.clock.seconds()
        self._refreshing = defer.ensureDeferred(self._refresh())

        def done(_: Any) -> None:
            self._refreshing = None

        self._refreshing.addBoth(done)
        return self._refreshing

    def _asked(self, result: Any, asking: defer.Deferred[Any]) -> Any:
        self._asking.discard(asking)
        return result

    def _candidates(self) -> list[Address]:
        ready = [a for a, s in self.shards.items() if s.commands.ready is not None]
        return list(dict.fromkeys(ready + list(self.known) + list(self.seeds)))

    async def _refresh(self) -> None:
        candidates = self._candidates()
        answered: defer.Deferred[SlotMap] = defer.Deferred()
        reasons: dict[Address, str] = {}

        def got(slot_map: SlotMap) -> None:
            if not answered.called:
                answered.callback(slot_map)

        def failed(f: Failure, address: Address) -> None:
            reasons[address] = f.getErrorMessage()
            if len(reasons) == len(candidates) and not answered.called:
                answered.errback(f)

        for address in candidates:
            asking = defer.ensureDeferred(ask_shards(self.reactor, self.node_settings(address)))
            self._asking.add(asking)
            asking.addBoth(self._asked, asking)
            asking.addCallbacks(got, failed, errbackArgs=(address,))
        try:
            slot_map = await answered
        except Exception:
            if self._stopping:
                return
            why = "no cluster node answered CLUSTER SHARDS (" + "; ".join(
                f"{describe(a)}: {why}" for a, why in reasons.items()
            ) + ")"
            category = "cluster" if any(
                "not a cluster node" in why for why in reasons.values()
            ) else "refused" if all("refused" in why for why in reasons.values()) else "cluster"
            self.discovery.failed(category, why)
            if not self.shards:
                # with a map already known, the masters' own connections
                # (and their canaries) say whether the proxy is healthy
                self.problem = why
            return
        if self._stopping:
            return
        self.refreshes += 1
        self.apply(slot_map)

    def apply(self, slot_map: SlotMap) -> None:
        """
        Use C{slot_map}: a shard for each master, channels moved to the hub
        of their slot's master, shards of former masters retired.
        """
        before = self.owners
        self.owners = list(slot_map.owners)
        self.known = slot_map.nodes
        if not slot_map.complete:
            unserved = slot_map.owners.count(None)
            self.problem = f"{unserved} of {SLOTS} slots are served by no master"
            self.discovery.failed("cluster", self.problem)
        else:
            if self.problem is not None:
                self._log.info(
                    "redis cluster: {n} masters serve all slots ({masters})",
                    n=len(slot_map.masters),
                    masters=", ".join(describe(m) for m in slot_map.masters),
                )
                self.discovery.recovered()
            self.problem = None
        for master in slot_map.masters:
            self.shard(master)
        self._mapped = True
        self.hub.rebalance()
        for address, shard in list(self.shards.items()):
            left = address not in slot_map.masters and address in self._masters
            if left and address not in self._former:
                # (once: not again if a node's stale view brought it back)
                self._left(shard, before, slot_map)
            if address not in slot_map.masters and not shard.hub.channels():
                self._retire(shard, quiet=left)
            elif address in slot_map.masters:
                self._place_canary(shard)
                shard.hub.retry_redirected()
        self._masters = slot_map.masters
        self._former = {a for a in self._former if a in slot_map.failed}
        self.failed_masters = tuple(
            a for a in slot_map.nodes
            if a not in slot_map.masters
            and (a in slot_map.failed_masters or a in self._former)
        )

    def shard(self, address: Address) -> Shard:
        """
        The shard of the master at C{address}, made (and connected) if new.
        """
        shard = self.shards.get(address)
        if shard is None:
            shard = self.shards[address] = Shard(self, address)
            self._place_canary(shard)
            if not self._stopping:
                if self._mapped:
                    # a master new to a cluster in service (a failover, a
                    # migration, a MOVED): what is sent to it while its
                    # connection is made waits for it
                    shard.commands.hold(f"learning of master {shard.name}")
                shard.start()
        return shard

    def _left(self, shard: Shard, before: list[Optional[Address]], slot_map: SlotMap) -> None:
        """
        A master of the last map is not one in C{slot_map}: one warning,
        naming who serves its slots now.
        """
        address = shard.address
        self._former.add(address)
        successors = sorted({
            describe(now) if now is not None else "nobody yet"
            for was, now in zip(before, slot_map.owners) if was == address
        })
        state = ("the cluster marks it failed" if address in slot_map.failed
                 else "still in the cluster, as a replica or without slots"
                 if address in slot_map.nodes else "no longer in the cluster")
        channels = len(shard.hub.channels())  # what keeps it from being retired
        self._log.warn(
            "redis cluster: {node} is no longer a master ({state}); its slots are served "
            "by {successors}; disconnecting{later}",
            node=shard.name, state=state, successors=", ".join(successors) or "nobody",
            later=f" once its {channels} channels have moved" if channels else "",
        )

    def _retire(self, shard: Shard, quiet: bool = False) -> None:
        del self.shards[shard.address]
        if not quiet:
            self._log.info("redis cluster: {node} serves no slot any more, disconnecting",
                           node=shard.name)
        self._retired_reconnects += shard.commands.reconnects + shard.subscriber.reconnects
        self._retired_failures.update(shard.failures.counts)
        # what was sent to it is answered first (a MOVED after a failover,
        # followed to the new master), then it is disconnected
        self._leaving.add(shard)

        def drained(_: object) -> None:
            if shard in self._leaving:
                self._leaving.discard(shard)
                shard.stop()

        shard.commands.drain().addBoth(drained)

    def _place_canary(self, shard: Shard) -> None:
        """
        Give the shard's canary a hash tag in one of the shard's slots.
        """
        owners = self.owners
        if shard.canary_tag and owners[key_slot(shard.canary_tag.encode())] == shard.address:
            return
        if shard.address not in owners:
            return
        for n in count():
            tag = str(n)
            if owners[key_slot(tag.encode())] == shard.address:
                shard.canary_tag = tag
                shard.hub.set_canary(canary_channel(self.instance, tag))
                return

    def owner(self, key: bytes) -> Optional[Address]:
        return self.owners[key_slot(key)]

    def moved(self, slot: int, address: Address) -> None:
        """
        Redis said (MOVED) that C{address} serves C{slot} now.
        """
        self.redirects["moved"] += 1
        if self.owners[slot] != address:
            self.owners[slot] = address
            self.shard(address)
            self.refresh()

    def redirected(self) -> None:
        """
        A subscription was refused with a redirection.
        """
        self.redirects["subscribe"] += 1
        self.refresh()

    def sunsubscribed(self, shard: Shard, channel: bytes) -> None:
        """
        Redis dropped a subscription on its own: the channel's slot moved.
        """
        self.redirects["sunsubscribe"] += 1
        shard.hub.dropped(channel)
        self.refresh()

    # -- connection events -------------------------------------------------

    def commands_ready(self, shard: Shard, proto: Any) -> None:
        for d in self._waiting.pop(shard.address, []):
            d.callback(shard.commands)
        self.commands.on_ready(proto)

    def commands_lost(self) -> None:
        self.commands.on_lost()

    def ready_link(self, address: Address) -> defer.Deferred[RedisLink]:
        """
        The command link of C{address} once it is usable (a master just
        learned of through a redirection may still be connecting).
        """
        shard = self.shard(address)
        if shard.commands.ready is not None:
            return defer.succeed(shard.commands)
        waiting = self._waiting.setdefault(address, [])

        def cancel(d: defer.Deferred[Any]) -> None:
            if d in waiting:
                waiting.remove(d)

        d: defer.Deferred[RedisLink] = defer.Deferred(canceller=cancel)
        waiting.append(d)
        return d

    # -- health and metrics ----------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.problem is None and bool(self.shards) and all(
            shard.up for address, shard in self.shards.items() if address in self.owners
        )

    def shard_states(self) -> list[tuple[str, bool, int]]:
        """
        (shard, up, session channels) for each master, and (shard, False, 0)
        for each master that left the map and that it lists as failed.
        """
        return [
            (shard.name, shard.up, shard.hub.channel_count())
            for shard in self.shards.values()
        ] + [
            (describe(address), False, 0)
            for address in self.failed_masters if address not in self.shards
        ]

    def connect_failures(self) -> Counter[str]:
        total = Counter(self._retired_failures)
        total.update(self.discovery.counts)
        for shard in self.shards.values():
            total.update(shard.failures.counts)
        return total

    def reconnects(self) -> int:
        return self._retired_reconnects + sum(
            shard.commands.reconnects + shard.subscriber.reconnects
            for shard in self.shards.values()
        )


class _Counts:
    """
    Connection failures over every node (L{wsproxy.redis.redislink.FailureCounts}).
    """

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    @property
    def counts(self) -> Counter[str]:
        return self._cluster.connect_failures()


#: commands whose keys follow the script or function and the number of keys
_SCRIPT_COMMANDS = frozenset(
    n for name in ("FCALL", "FCALL_RO", "EVAL", "EVALSHA") for n in (name, name.encode())
)


def _command_key(args: tuple[Any, ...]) -> Optional[bytes]:
    """
    The key a command is routed by: its first argument, or for FCALL,
    FCALL_RO, EVAL and EVALSHA (the token check's script) its first key;
    C{None} for commands without a key.
    """
    if len(args) < 2:
        return None
    name = args[0].upper() if isinstance(args[0], (bytes, str)) else args[0]
    if name in _SCRIPT_COMMANDS:
        if len(args) < 4 or int(args[2]) == 0:
            return None
        key = args[3]
    else:
        key = args[1]
    if isinstance(key, str):
        return key.encode()
    return key if isinstance(key, bytes) else str(key).encode()


def _encoded_key(command: bytes) -> bytes:
    """
    The first argument after the command name in a RESP-encoded command
    (C{*N $len NAME $len KEY ...}).
    """
    start = command.index(b"\r\n") + 2
    end = command.index(b"\r\n", start)
    start = end + 2 + int(command[start + 1:end]) + 2
    end = command.index(b"\r\n", start)
    size = int(command[start + 1:end])
    return command[end + 2:end + 2 + size]


class ClusterCommands:
    """
    The command side of a cluster, with the interface of one command
    L{RedisLink} (L{wsproxy.redis.redislink.Commands}): every command goes to its
    key's master, redirections are followed.
    """

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.on_ready: Callable[[Any], None] = lambda proto: None
        self.on_lost: Callable[[], None] = lambda: None
        self.failures = _Counts(cluster)

    @property
    def reconnects(self) -> int:
        return self._cluster.reconnects()

    @property
    def ready(self) -> Any:
        """
        A usable command connection if every master's is usable, else
        C{None} (as L{RedisLink.ready} tells whether it is connected).
        """
        cluster = self._cluster
        if cluster.problem is not None or not cluster.shards:
            return None
        ready = [s.commands.ready for a, s in cluster.shards.items() if a in cluster.owners]
        return ready[0] if ready and None not in ready else None

    def start(self) -> None:
        self._cluster.start()

    def stop(self) -> defer.Deferred[Any]:
        return self._cluster.stop()

    def sweep(self) -> None:
        for shard in list(self._cluster.shards.values()):
            shard.commands.sweep()

    def kill(self) -> None:
        for shard in list(self._cluster.shards.values()):
            shard.commands.kill()

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        """
        Like L{RedisLink.execute}. A command without a key (PING) goes to
        every master and answers C{PONG} only if all of them do.
        """
        key = _command_key(args)
        if key is None:
            return defer.ensureDeferred(self._everywhere(args))
        return defer.ensureDeferred(self._routed(args, key))

    async def _everywhere(self, args: tuple[Any, ...]) -> Any:
        cluster = self._cluster
        if cluster.problem is not None:
            raise RedisUnavailable(cluster.problem)
        shards = [s for a, s in cluster.shards.items() if a in cluster.owners]
        try:
            replies = await defer.gatherResults(
                [shard.commands.execute(*args) for shard in shards], consumeErrors=True
            )
        except defer.FirstError as e:
            e.subFailure.raiseException()
        if args and str(args[0]).upper() == "PING":
            return b"PONG" if all(r in (b"PONG", "PONG") for r in replies) else replies
        return replies

    async def _routed(self, args: tuple[Any, ...], key: bytes) -> Any:
        cluster = self._cluster
        target = cluster.owner(key)
        asking = False
        for redirects in range(MAX_REDIRECTS + 1):
            if target is None:
                raise RedisUnavailable(cluster.problem or "no master serves the key's slot")
            if redirects == 0:
                shard = cluster.shards.get(target)
                if shard is None or shard.commands.ready is None:
                    raise RedisUnavailable(
                        f"cluster node {describe(target)}: "
                        + (shard.commands.last_error if shard and shard.commands.last_error
                           else "not connected")
                    )
                link = shard.commands
            else:
                # a redirection: the master named may still be connecting
                link = await cluster.ready_link(target)
            try:
                if asking:
                    link.execute("ASKING").addErrback(lambda f: None)
                return await link.execute(*args)
            except txredisapi.ResponseError as e:
                redirect = parse_redirect(e)
                if redirect is None:
                    raise
                kind, slot, target = redirect
                asking = kind == "ASK"
                if asking:
                    cluster.redirects["ask"] += 1
                else:
                    cluster.moved(slot, target)
        raise RedisUnavailable(f"more than {MAX_REDIRECTS} redirections")

    def send(self, on_reply: Callable[[Any], None], *args: bytes) -> None:
        """
        Like L{RedisLink.send}; C{PUBLISH} becomes C{SPUBLISH}.
        """
        if args[0] == b"PUBLISH":
            args = (b"SPUBLISH",) + args[1:]
        # scripts (the token check's) by their first key
        self._lean(args, _command_key(args) or args[1], on_reply, 0, None, False)

    def send_encoded(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        Like L{RedisLink.send_encoded} (durable upstream's XADD): routed by
        the command's first argument, read from its RESP encoding.
        """
        self._lean((command,), _encoded_key(command), on_reply, 0, None, False)

    def publish(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        """
        Like L{RedisLink.publish}, with C{SPUBLISH} on the channel's master.
        """
        self._lean((b"SPUBLISH", channel, payload), channel, on_reply, 0, None, False)

    def _lean(
        self,
        args: tuple[bytes, ...],
        key: bytes,
        on_reply: Callable[[Any], None],
        redirects: int,
        target: Optional[Address],
        asking: bool,
    ) -> None:
        cluster = self._cluster
        if target is None:
            target = cluster.owner(key)
        shard = cluster.shards.get(target) if target is not None else None
        proto = shard.commands.ready if shard is not None else None
        if proto is None:
            if shard is not None and shard.commands.holding:
                # a master just learned of, still connecting (wsproxy.redis.hold)
                self._hold(shard.commands, args, key, on_reply, redirects, asking)
                return
            on_reply(RedisUnavailable(
                f"cluster node {describe(target)} not connected" if target is not None
                else cluster.problem or "no master serves the key's slot"
            ))
            return

        replied = self._following(args, key, on_reply, redirects)
        if asking:
            proto.command_raw((b"ASKING",), lambda reply: None)
        if len(args) == 1:
            proto.write_raw(args[0], replied)  # already encoded (send_encoded)
        elif args[0] == b"SPUBLISH":
            proto.spublish_raw(args[1], args[2], replied)
        else:
            proto.command_raw(args, replied)

    def _following(
        self,
        args: tuple[bytes, ...],
        key: bytes,
        on_reply: Callable[[Any], None],
        redirects: int,
    ) -> Callable[[Any], None]:
        """
        The reply callback of a lean command: a redirection is followed
        (sent again to the master named), any other reply goes to
        C{on_reply}.
        """
        cluster = self._cluster

        def replied(reply: Any) -> None:
            if isinstance(reply, txredisapi.ResponseError) and redirects < MAX_REDIRECTS:
                redirect = parse_redirect(reply)
                if redirect is not None:
                    kind, slot, where = redirect
                    if kind == "ASK":
                        cluster.redirects["ask"] += 1
                    else:
                        cluster.moved(slot, where)
                    self._lean(args, key, on_reply, redirects + 1, where, kind == "ASK")
                    return
            on_reply(reply)

        return replied

    def _hold(
        self,
        link: RedisLink,
        args: tuple[bytes, ...],
        key: bytes,
        on_reply: Callable[[Any], None],
        redirects: int,
        asking: bool,
    ) -> None:
        """
        L{_lean}'s command, held by C{link} until its connection is ready;
        its reply is followed (a redirection) as L{_lean}'s are.
        """
        replied = self._following(args, key, on_reply, redirects)
        if asking:
            link.write_held(encode_command(b"ASKING"), lambda reply: None)
        link.write_held(args[0] if len(args) == 1 else encode_command(*args), replied)


class ClusterSubscribers:
    """
    The subscriber side's lifecycle (L{wsproxy.redis.redislink.Link}): every
    shard's subscriber connection.
    """

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.on_ready: Callable[[Any], None] = lambda proto: None
        self.on_lost: Callable[[], None] = lambda: None
        self.failures = _Counts(cluster)

    @property
    def reconnects(self) -> int:
        return 0  # counted with the commands' (ClusterCommands.reconnects)

    def start(self) -> None:
        pass  # started with the cluster (ClusterCommands.start)

    def stop(self) -> defer.Deferred[Any]:
        return defer.succeed(None)  # stopped with the cluster

    def sweep(self) -> None:
        for shard in list(self._cluster.shards.values()):
            shard.subscriber.sweep()

    def kill(self) -> None:
        for shard in list(self._cluster.shards.values()):
            shard.subscriber.kill()


class ClusterHub:
    """
    The subscription hub's interface (L{Hub}) over one hub per master: each
    channel is held by the hub of its slot's master.
    """

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        #: the shard whose hub holds each channel
        self._home: dict[bytes, Shard] = {}
        #: channels kept for the process before the slot map was known
        self._unplaced: list[tuple[str, Listener]] = []
        #: channels attached (a topic joined while open) before the slot map was known
        self._unattached: list[tuple[str, Listener]] = []
        self.canary_interval = cluster.canary_interval

    @property
    def connected(self) -> bool:
        return any(s.subscriber.ready is not None for s in self._cluster.shards.values())

    @property
    def healthy(self) -> bool:
        return self._cluster.healthy

    @property
    def canary_rtt(self) -> Optional[float]:
        rtts = [s.hub.canary_rtt for s in self._cluster.shards.values()
                if s.hub.canary_rtt is not None]
        return max(rtts) if rtts else None

    def channel_count(self) -> int:
        return sum(s.hub.channel_count() for s in self._cluster.shards.values())

    def check_canary(self) -> None:
        for shard in list(self._cluster.shards.values()):
            shard.hub.check_canary()

    def _shard_for(self, key: bytes) -> Optional[Shard]:
        home = self._home.get(key)
        if home is not None and home.hub.holds(key):
            return home
        owner = self._cluster.owner(key)
        if owner is None:
            return None
        shard = self._home[key] = self._cluster.shard(owner)
        return shard

    def subscribe(self, channel: str, listener: Listener) -> defer.Deferred[Any]:
        key = channel.encode()
        shard = self._shard_for(key)
        if shard is None:
            return defer.fail(RedisUnavailable(self._cluster.problem or "no master serves the slot"))
        d = shard.hub.subscribe(channel, listener)
        self._forget_if_gone(key, shard)
        return d

    def keep(self, channel: str, listener: Listener) -> None:
        key = channel.encode()
        shard = self._shard_for(key)
        if shard is None:
            # the map is not known yet: placed by the first rebalance
            self._unplaced.append((channel, listener))
            return
        shard.hub.keep(channel, listener)

    def attach(self, channel: str, listener: Listener) -> None:
        """
        Like L{Hub.attach}, on the master of the channel's slot (placed by
        the next rebalance if the slot map is not known yet).
        """
        key = channel.encode()
        shard = self._shard_for(key)
        if shard is None:
            self._unattached.append((channel, listener))
            return
        shard.hub.attach(channel, listener)

    def unsubscribe(self, channel: str, listener: Listener) -> None:
        key = channel.encode()
        if self._unattached and (channel, listener) in self._unattached:
            self._unattached.remove((channel, listener))
            return
        shard = self._home.get(key)
        if shard is None:
            return
        shard.hub.unsubscribe(channel, listener)
        self._forget_if_gone(key, shard)

    def _forget_if_gone(self, key: bytes, shard: Shard) -> None:
        if not shard.hub.holds(key):
            self._home.pop(key, None)

    def rebalance(self) -> None:
        """
        Move every channel whose slot is served by another master than the
        one whose hub holds it.
        """
        cluster = self._cluster
        if self._unplaced and cluster.problem is None:
            unplaced, self._unplaced = self._unplaced, []
            for channel, listener in unplaced:
                self.keep(channel, listener)
        if self._unattached and cluster.problem is None:
            unattached, self._unattached = self._unattached, []
            for channel, listener in unattached:
                self.attach(channel, listener)
        moved = 0
        for shard in list(cluster.shards.values()):
            for key in shard.hub.channels():
                owner = cluster.owner(key)
                if owner is None or owner == shard.address:
                    continue
                taken = shard.hub.take(key)
                if taken is None:
                    continue
                target = cluster.shard(owner)
                target.hub.adopt(taken)
                self._home[key] = target
                moved += 1
        if moved:
            Cluster._log.info("redis cluster: {n} channels moved to their slot's new master",
                              n=moved)
