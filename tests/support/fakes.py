"""
Stand-ins for the proxy's collaborators, for tests without sockets or
processes:

  - L{FakeRedis}: one Redis server (keys, channels, scripts, every command
    received) that can hold its replies back, fail commands by name or
    answer them with a canned reply.
  - L{FakeLink}: what L{wsproxy.session.proxy.Proxy}, L{wsproxy.redis.pubsub.Hub} and the
    token check use of a L{wsproxy.redis.redislink.RedisLink} (the Deferred
    commands, the lean C{send}, subscribing, losing and regaining the
    connection), talking to a L{FakeRedis}. The one fake Redis link of the
    suite: the in-memory proxy (L{tests.memory}), the hub's and the token
    check's unit tests all use it.
  - L{FakeEndpoint}, L{FakePort}, L{FakeReactor}, L{FakeProxy}: what
    L{wsproxy.process.daemon.ProxyService} is built from.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import hiredis
import txredisapi
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from wsproxy.config import Settings
from wsproxy.names import auth_key
from wsproxy.redis.redislink import ConnectFailures, RedisUnavailable
from wsproxy.session.auth import CHECK_SCRIPT, CHECK_SHA

# -- Redis -------------------------------------------------------------------


class Command:
    """
    One command as the fake Redis received it, and the way to answer it.
    """

    def __init__(self, link: "FakeLink", args: tuple[Any, ...],
                 reply: Callable[[Any], None]) -> None:
        self.link = link
        self.args = args
        self._reply = reply
        self.answered = False

    @property
    def name(self) -> str:
        return str(self.args[0])

    def answer(self, result: Any) -> None:
        """
        Answer with C{result}, or fail with it if it is an exception.
        """
        if not self.answered:
            self.answered = True
            self._reply(result)

    def __repr__(self) -> str:
        return f"<Command {self.link.name} {self.args!r}>"


class FakeRedis:
    """
    The Redis server the fake links talk to.

    Commands are answered at once unless held: L{hold} holds every
    command with that name from now on, and, as on a real connection,
    every later command on the same link waits behind it (replies come in
    order), until L{release}. L{fail} makes every command with that name
    answer with an error.

    @ivar data: keys and their values.
    @ivar ttl: keys and the TTL last set on them.
    @ivar log: every command received, from both links, in order.
    @ivar published: (channel, payload) of every PUBLISH, in order.
    @ivar scripts: the SHA-1s of the scripts Redis has cached; the token
        check's (L{wsproxy.session.auth.CHECK_SCRIPT}, the only script it runs) from
        the start, as after its first C{EVAL} (clear it: C{NOSCRIPT}).
    """

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int] = {}
        self.log: list[Command] = []
        self.published: list[tuple[bytes, bytes]] = []
        #: stream key -> [(entry id, {field: value})] of every XADD
        self.streams: dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        #: set key -> its members (SMEMBERS; a session's topics)
        self.sets: dict[str, set[bytes]] = {}
        self.scripts: set[str] = {CHECK_SHA}
        self._holding: set[str] = set()
        self._canned: dict[str, Any] = {}
        self._links: list[FakeLink] = []

    # -- what a test sets up and asks --------------------------------------

    def authorize(self, session_id: str, token: str, ttl: int = 60) -> None:
        """
        What the backend does: C{SETEX session:{id}:auth ttl token}.
        """
        key = auth_key(session_id)
        self.data[key] = token.encode()
        self.ttl[key] = ttl

    def hold(self, *names: str) -> None:
        """
        Hold back the replies to commands with these names, and to every
        command after them on the same link, until L{release}.
        """
        self._holding.update(names)

    def release(self, *names: str) -> None:
        """
        Stop holding these names (all, if none are given); answer what no
        longer waits behind a held command, in order.
        """
        if names:
            self._holding.difference_update(names)
        else:
            self._holding.clear()
        for link in self._links:
            link.drain()

    def fail(self, name: str, exception: Exception) -> None:
        """
        Answer every command called C{name} with C{exception}.
        """
        self.reply(name, exception)

    def reply(self, name: str, result: Any) -> None:
        """
        Answer every command called C{name} with C{result} (a value, or an
        exception to fail with) instead of carrying it out.
        """
        self._canned[name] = result

    def flush(self) -> None:
        """
        Answer every command waiting on every link, held or not, in order;
        the names held stay held for the commands that come later.
        """
        for link in self._links:
            queue, link.queue = link.queue, []
            for command in queue:
                self.execute(command)

    def sent(self, *names: str) -> list[tuple[Any, ...]]:
        """
        The arguments of every command received with one of these names
        (but the process's own channels, C{wsproxy:*}: control, canary).
        """
        return [
            c.args for c in self.log
            if c.name in names and not str(c.args[1] if len(c.args) > 1 else "").startswith(
                "wsproxy:"
            )
        ]

    def publish(self, channel: str, payload: bytes) -> int:
        """
        What the backend does: C{PUBLISH channel payload}; delivered at once
        to every link subscribed to it.

        @return: the number of links it was delivered to.
        """
        return self._deliver(channel.encode(), payload)

    # -- what the links do ---------------------------------------------------

    def attach(self, link: "FakeLink") -> None:
        self._links.append(link)

    def holds(self, name: str) -> bool:
        return name in self._holding

    def execute(self, command: Command) -> None:
        """
        Carry out one command and answer it.
        """
        name, args = command.name, command.args[1:]
        if name in self._canned:
            command.answer(self._canned[name])
            return
        link = command.link
        if name == "GET":
            command.answer(self.data.get(args[0]))
        elif name == "EXPIRE":
            key, seconds = args[:2]
            if key in self.data:
                self.ttl[key] = int(seconds)
                command.answer(1)
            else:
                command.answer(0)
        elif name in ("EVALSHA", "EVAL"):
            command.answer(self._check_script(name, *args))
        elif name == "PING":
            command.answer(b"PONG")
        elif name == "SMEMBERS":
            command.answer(list(self.sets.get(args[0], ())))
        elif name == "PUBLISH":
            channel, payload = args
            self.published.append((channel, payload))
            command.answer(self._deliver(channel, payload))
        elif name == "XADD":
            # XADD key MAXLEN ~ n * field value ...
            entries = self.streams.setdefault(args[0], [])
            entry_id = b"%d-0" % (len(entries) + 1)
            fields = dict(zip(args[5::2], args[6::2]))
            entries.append((entry_id, fields))
            command.answer(entry_id)
        elif name == "SUBSCRIBE":
            link.channels.add(args[0])
            command.answer([b"subscribe", args[0].encode(), len(link.channels)])
        elif name == "UNSUBSCRIBE":
            link.channels.discard(args[0])
            command.answer([b"unsubscribe", args[0].encode(), len(link.channels)])
        else:
            command.answer(txredisapi.ResponseError(f"ERR unknown command {name!r}"))

    def _check_script(self, name: str, script: str, numkeys: int, key: str, digest: str,
                      grace: int) -> Any:
        """
        What L{wsproxy.session.auth.CHECK_SCRIPT} does, run by C{EVAL} or (cached)
        C{EVALSHA}.
        """
        if name == "EVAL":
            assert script == CHECK_SCRIPT
            self.scripts.add(hashlib.sha1(script.encode()).hexdigest())
        elif script not in self.scripts:
            return txredisapi.ResponseError("NOSCRIPT No matching script. Please use EVAL.")
        assert int(numkeys) == 1
        stored = self.data.get(key)
        if stored is None:
            return 0
        if hashlib.sha1(stored).hexdigest() != digest:
            return -1
        self.ttl[key] = int(grace)
        return 1

    def _deliver(self, channel: bytes, payload: bytes) -> int:
        receivers = 0
        for link in self._links:
            if link.ready is not None and channel.decode() in link.channels:
                receivers += 1
                link.on_message(channel, payload)
        return receivers


class _Connection:
    """
    Stands in for the link's connected protocol: L{Proxy} registers its
    upstream valve as the producer of C{transport}.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()

    def command(self, *args: Any) -> defer.Deferred:
        """
        A command sent outside the link's queue (C{FUNCTION LOAD} with
        C{RESUME=true}): answered OK.
        """
        return defer.succeed(b"OK")


class FakeLink:
    """
    The interface L{Proxy} and L{Hub} use of a
    L{wsproxy.redis.redislink.RedisLink}, on a L{FakeRedis}.

    L{start} connects at once; L{lose} and L{connect} make the connection
    go and come back; L{kill} loses it at once, or with C{lose_on_kill}
    false only counts, leaving the connection closing until the test
    calls L{lose}. Commands sent while not connected fail at once with
    L{RedisUnavailable}, and those waiting for a reply fail with it when
    the connection is lost, as with the real link.
    """

    def __init__(self, name: str, redis: FakeRedis, clock: Clock) -> None:
        self.name = name
        self.redis = redis
        self.ready: Any = None
        self.on_ready: Callable[[Any], None] = lambda proto: None
        self.on_lost: Callable[[], None] = lambda: None
        self.on_message: Callable[[bytes, bytes], None] = lambda c, m: None
        self.reconnects = 0
        self.failures = ConnectFailures(clock, "memory")
        #: channels this (subscriber) link is subscribed to in Redis
        self.channels: set[str] = set()
        #: commands waiting for their reply, oldest first
        self.queue: list[Command] = []
        self.sweeps = self.kills = 0
        self._ever_ready = False
        redis.attach(self)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.connect()

    def stop(self) -> defer.Deferred:
        if self.ready is not None:
            self.lose()
        return defer.succeed(None)

    def sweep(self) -> None:
        self.sweeps += 1

    #: whether L{kill} loses the connection at once
    lose_on_kill = True

    def kill(self) -> None:
        self.kills += 1
        if self.lose_on_kill:
            self.lose()

    def connect(self) -> None:
        """
        A connection becomes usable.
        """
        if self._ever_ready:
            self.reconnects += 1
        self._ever_ready = True
        self.ready = _Connection()
        self.on_ready(self.ready)

    def lose(self) -> None:
        """
        The connection is lost: what waits for a reply fails.
        """
        self.ready = None
        self.channels.clear()
        queue, self.queue = self.queue, []
        for command in queue:
            command.answer(RedisUnavailable(f"redis {self.name} connection lost"))
        self.on_lost()

    # -- commands ------------------------------------------------------------

    def execute(self, *args: Any) -> defer.Deferred:
        if self.ready is None:
            return defer.fail(RedisUnavailable("not connected"))
        d: defer.Deferred = defer.Deferred()

        def reply(result: Any) -> None:
            if d.called:
                return  # cancelled meanwhile
            if isinstance(result, BaseException):
                d.errback(Failure(result))
            else:
                d.callback(result)

        self._send(args, reply)
        return d

    def send(self, on_reply: Callable[[Any], None], *args: bytes) -> None:
        """
        The lean path (L{wsproxy.redis.redislink.RedisLink.send}): the reply, or
        the exception, goes to C{on_reply}; arguments are logged as text.
        """
        if self.ready is None:
            on_reply(RedisUnavailable("not connected"))
            return
        self._send(tuple(a.decode() if isinstance(a, bytes) else a for a in args), on_reply)

    def publish(self, channel: bytes, payload: bytes, on_reply: Callable[[Any], None]) -> None:
        if self.ready is None:
            on_reply(RedisUnavailable("not connected"))
            return
        self._send(("PUBLISH", channel, payload), on_reply)

    def send_encoded(self, command: bytes, on_reply: Callable[[Any], None]) -> None:
        if self.ready is None:
            on_reply(RedisUnavailable("not connected"))
            return
        reader = hiredis.Reader()
        reader.feed(command)
        args = reader.gets()
        self._send((args[0].decode(), *args[1:]), on_reply)

    def subscribe(self, channel: str) -> defer.Deferred:
        return self.execute("SUBSCRIBE", channel)

    def unsubscribe(self, channel: str) -> defer.Deferred:
        if self.ready is None:
            return defer.succeed(None)
        return self.execute("UNSUBSCRIBE", channel)

    def sent(self, *names: str) -> list[tuple[Any, ...]]:
        """
        The arguments (name first) of every command this link sent, or of
        those with one of C{names}, in order.
        """
        return [c.args for c in self.redis.log
                if c.link is self and (not names or c.name in names)]

    def _send(self, args: tuple[Any, ...], reply: Callable[[Any], None]) -> None:
        command = Command(self, args, reply)
        self.redis.log.append(command)
        if self.queue or self.redis.holds(command.name):
            self.queue.append(command)
        else:
            self.redis.execute(command)

    def drain(self) -> None:
        """
        Answer the commands waiting, in order, unless one is held again.
        """
        while self.queue and not self.redis.holds(self.queue[0].name):
            self.redis.execute(self.queue.pop(0))


# -- the daemon's plumbing -----------------------------------------------------


class FakeEndpoint:
    """
    An endpoint whose listen() returns C{result} (a Deferred the test fires,
    or an already fired one).
    """

    def __init__(self, result: defer.Deferred) -> None:
        self.result = result
        self.factories: list[Any] = []

    def listen(self, factory: Any) -> defer.Deferred:
        self.factories.append(factory)
        return self.result


class FakePort:
    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)


class FakeReactor:
    running = True

    def __init__(self) -> None:
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


class FakeProxy:
    settings = Settings()
