"""
The Redis side of the load: publisher processes, which PUBLISH the
downstream phases' messages in pipelined batches over raw redis-py
connections (a burst as fast as Redis takes them, or paced at a rate), and
the subscriber process, which PSUBSCRIBEs to the run's ``:up`` channels and
counts and times what the proxy publishes.
"""

from __future__ import annotations

import signal
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol, Union

import redis

from .ipc import Exit, SharedCounters
from .messages import HEADER_LEN, SENT_AT, SESSION_INDEX, header, padding

# PUBLISH commands per pipelined write; one batch's replies are read while the next is in flight
BATCH = 256
# a paced publisher stops this long after its duration even if the machine stalls
PACED_GRACE_SECS = 30.0
# how long the subscriber waits for a message before looking at its pipe again
SUBSCRIBER_POLL_SECS = 0.05


# -- publisher commands and replies


@dataclass(frozen=True)
class Burst:
    """``count`` messages to each session, as fast as Redis takes them."""

    sessions: list[tuple[int, str]]  # (session index, session id)
    count: int
    size: int
    tag: int
    binary: bool


@dataclass(frozen=True)
class Paced:
    """``rate`` messages a second, round-robin over the sessions, for ``duration`` seconds."""

    sessions: list[tuple[int, str]]
    rate: float
    duration: float
    size: int
    tag: int
    binary: bool


PublisherCommand = Union[Burst, Paced, Exit]


@dataclass(frozen=True)
class Published:
    sent: int
    no_receivers: int  # PUBLISH replies of 0: no subscriber had the channel
    started_ns: int
    ended_ns: int
    per_session: dict[int, int]  # session index -> messages published
    max_lag_ms: float  # how far a paced publisher fell behind its schedule


@dataclass(frozen=True)
class PublisherFailed:
    error: str


PublisherReply = Union[Published, PublisherFailed]


# -- subscriber commands and replies


@dataclass(frozen=True)
class Subscribe:
    """PSUBSCRIBE to ``pattern`` and count what arrives until told to stop."""

    pattern: str
    sessions: int  # session indexes are 0 .. sessions-1
    tag: int
    channels: dict[int, bytes]  # session index -> its :up channel
    max_seconds: float


@dataclass(frozen=True)
class StopSubscriber:
    """Stop counting and report."""


SubscriberCommand = Union[Subscribe, StopSubscriber, Exit]


@dataclass(frozen=True)
class Subscribed:
    """Redis confirmed the subscription: clients may start sending."""


@dataclass(frozen=True)
class Arrivals:
    arrived: int
    stray: int
    misrouted: int
    corrupt: int
    per_session: array[int]  # indexed by session index
    latencies: array[int]  # ns
    first_ns: int
    last_ns: int


@dataclass(frozen=True)
class SubscriberFailed:
    error: str


SubscriberReply = Union[Subscribed, Arrivals, SubscriberFailed]


class RedisConnection(Protocol):
    """
    The low-level part of a redis-py connection used here: packed commands
    out, replies in one by one. (redis-py leaves these methods unannotated.)
    """

    def connect(self) -> None: ...

    def send_packed_command(self, command: list[bytes], check_health: bool = True) -> None: ...

    def send_command(self, *args: bytes | str) -> None: ...

    def read_response(self) -> object: ...

    def can_read(self, timeout: float = 0) -> bool: ...

    def disconnect(self) -> None: ...


def redis_connection(url: str) -> RedisConnection:
    """
    One raw connection, outside any client object: commands go out packed,
    replies are read one by one.
    """
    pool = redis.ConnectionPool.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                         protocol=2)  # RESP2: pmessages as plain replies
    connection = _take_connection(pool)
    connection.connect()
    return connection


def _take_connection(pool: redis.ConnectionPool) -> RedisConnection:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("PUBLISH")


# -- publishers


def publish_prefix(session_id: str, size: int) -> bytes:
    """A PUBLISH command to the session's :down channel, up to its ``size``-byte message."""
    channel = f"session:{session_id}:down".encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (len(channel), channel, size)


class PublishPipeline:
    """Writes batches of PUBLISH commands, reading each batch's replies once the next is sent."""

    def __init__(self, connection: RedisConnection) -> None:
        self.sent = 0
        self.no_receivers = 0
        self._connection = connection
        self._in_flight = 0

    def send(self, batch: list[bytes]) -> None:
        self._connection.send_packed_command([b"".join(batch)], check_health=False)
        self._read_replies()
        self._in_flight = len(batch)
        self.sent += len(batch)

    def finish(self) -> None:
        """Reads the last batch's replies."""
        self._read_replies()
        self._in_flight = 0

    def _read_replies(self) -> None:
        read = self._connection.read_response
        for _ in range(self._in_flight):
            if read() == 0:
                self.no_receivers += 1


def publish_burst(connection: RedisConnection, command: Burst, counters: SharedCounters,
                  publisher_id: int) -> Published:
    pad = padding(command.size, command.binary)
    prefixes = [(index, publish_prefix(sid, command.size)) for index, sid in command.sessions]
    pipeline = PublishPipeline(connection)
    batch: list[bytes] = []
    started = time.time_ns()
    for sequence in range(command.count):
        for index, prefix in prefixes:
            batch.append(prefix + header(command.tag, index, sequence) + pad + b"\r\n")
            if len(batch) >= BATCH:
                pipeline.send(batch)
                counters.set_published(publisher_id, pipeline.sent)
                batch = []
    if batch:
        pipeline.send(batch)
    pipeline.finish()
    counters.set_published(publisher_id, pipeline.sent)
    return Published(pipeline.sent, pipeline.no_receivers, started, time.time_ns(),
                     {index: command.count for index, _ in command.sessions}, 0.0)


def publish_paced(connection: RedisConnection, command: Paced, counters: SharedCounters,
                  publisher_id: int) -> Published:
    pad = padding(command.size, command.binary)
    prefixes = [(index, publish_prefix(sid, command.size)) for index, sid in command.sessions]
    rate = command.rate
    total = int(rate * command.duration)
    sequences = [0] * len(prefixes)
    pipeline = PublishPipeline(connection)
    next_session = 0
    max_lag = 0.0
    start = time.monotonic()
    started = time.time_ns()
    deadline = start + command.duration + PACED_GRACE_SECS
    while pipeline.sent < total:
        now = time.monotonic()
        if now > deadline:
            break
        due = min(total, int((now - start) * rate) + 1)
        if due > pipeline.sent:
            max_lag = max(max_lag, now - (start + pipeline.sent / rate))
            batch = []
            for _ in range(due - pipeline.sent):
                index, prefix = prefixes[next_session]
                batch.append(prefix + header(command.tag, index, sequences[next_session])
                             + pad + b"\r\n")
                sequences[next_session] += 1
                next_session = (next_session + 1) % len(prefixes)
            pipeline.send(batch)
            pipeline.finish()
            counters.set_published(publisher_id, pipeline.sent)
        wait = start + pipeline.sent / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    return Published(pipeline.sent, pipeline.no_receivers, started, time.time_ns(),
                     {index: sequences[i] for i, (index, _) in enumerate(prefixes)},
                     round(max_lag * 1000, 3))


def publisher_main(publisher_id: int, redis_url: str,
                   conn: Connection[PublisherReply, PublisherCommand],
                   counters: SharedCounters) -> None:
    """A publisher process: one reply per command, a Redis error included, until told to exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection: RedisConnection | None = None
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(command, Exit):
            return
        reply: PublisherReply
        try:
            if connection is None:
                connection = redis_connection(redis_url)
            if isinstance(command, Burst):
                reply = publish_burst(connection, command, counters, publisher_id)
            else:
                reply = publish_paced(connection, command, counters, publisher_id)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply = PublisherFailed(f"{type(e).__name__}: {e}")
            connection = None
        conn.send(reply)


# -- the subscriber


class ArrivalCounter:
    """Counts and times the messages clients sent, as Redis delivers them."""

    def __init__(self, command: Subscribe) -> None:
        self.arrived = 0
        self.stray = 0
        self.misrouted = 0
        self.corrupt = 0
        self.per_session: array[int] = array("q", bytes(8 * command.sessions))
        self.latencies: array[int] = array("q")
        self.first_ns = 0
        self.last_ns = 0
        self._sessions = command.sessions
        self._tag = command.tag
        self._channels = command.channels

    def record(self, channel: bytes, payload: bytes, now: int) -> bool:
        """Whether ``payload`` is one of this phase's messages (counted even if misrouted)."""
        if len(payload) < HEADER_LEN or payload[0] != self._tag:
            self.stray += 1
            return False
        try:
            sent_at = int(payload[SENT_AT])
            index = int(payload[SESSION_INDEX])
        except ValueError:
            self.corrupt += 1
            return False
        self.latencies.append(now - sent_at)
        if 0 <= index < self._sessions:
            self.per_session[index] += 1
            if self._channels.get(index) != channel:
                self.misrouted += 1
        else:
            self.misrouted += 1
        return True

    def arrivals(self) -> Arrivals:
        return Arrivals(self.arrived, self.stray, self.misrouted, self.corrupt, self.per_session,
                        self.latencies, self.first_ns, self.last_ns)


def count_arrivals(connection: RedisConnection, command: Subscribe,
                   conn: Connection[SubscriberReply, SubscriberCommand],
                   counters: SharedCounters) -> Arrivals:
    """Reads pmessages until the parent says stop (or ``max_seconds`` pass)."""
    counter = ArrivalCounter(command)
    deadline = time.monotonic() + command.max_seconds
    while time.monotonic() < deadline:
        if conn.poll(0):
            conn.recv()  # stop (or exit)
            break
        if not connection.can_read(timeout=SUBSCRIBER_POLL_SECS):
            continue
        now = time.time_ns()
        got = 0
        while True:
            reply = connection.read_response()
            if (isinstance(reply, list) and reply[0] == b"pmessage"
                    and counter.record(reply[2], reply[3], now)):
                got += 1
            if not connection.can_read(timeout=0):
                break
        if got:
            counter.arrived += got
            counters.set_arrived(counter.arrived)
            if not counter.first_ns:
                counter.first_ns = now
            counter.last_ns = now
    return counter.arrivals()


def subscriber_main(redis_url: str, conn: Connection[SubscriberReply, SubscriberCommand],
                    counters: SharedCounters) -> None:
    """The subscriber process: one subscription, then its counts, then it ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        command = conn.recv()
        if not isinstance(command, Subscribe):
            return
        connection = redis_connection(redis_url)
        connection.send_command("PSUBSCRIBE", command.pattern.encode())
        connection.read_response()
        conn.send(Subscribed())
        arrivals = count_arrivals(connection, command, conn, counters)
        try:
            connection.disconnect()
        except Exception:  # noqa: BLE001
            pass
        conn.send(arrivals)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(SubscriberFailed(f"{type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001
            pass
