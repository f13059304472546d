"""
The Redis side of the load: publisher processes, which PUBLISH the
downstream phases' messages in pipelined batches over raw redis-py
connections (a burst as fast as Redis takes them, or paced at a rate), and
the subscriber process, which PSUBSCRIBEs to the run's ``:up`` channels and
counts and times what the proxy publishes.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Union

from bench.children import ChildFailed, Counters, Exit, child_main, serve
from bench.pipeline import Pipeline, RedisConnection, Schedule, bulk, redis_connection

from .messages import HEADER_LEN, SENT_AT, SESSION_INDEX, header, padding

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


PublisherReply = Union[Published, ChildFailed]


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


SubscriberReply = Union[Subscribed, Arrivals, ChildFailed]


# -- publishers


def publish_prefix(session_id: str, size: int) -> bytes:
    """A PUBLISH command to the session's :down channel, up to its ``size``-byte message."""
    channel = f"session:{session_id}:down".encode()
    return b"*3\r\n" + bulk(b"PUBLISH") + bulk(channel) + b"$%d\r\n" % size


def _check(pipeline: Pipeline) -> None:
    """A refused PUBLISH fails the phase."""
    if pipeline.errors:
        raise RuntimeError(f"{pipeline.errors} PUBLISH refused: {pipeline.error_example}")


def publish_burst(connection: RedisConnection, command: Burst, counters: Counters,
                  publisher_id: int) -> Published:
    pad = padding(command.size, command.binary)
    prefixes = [(index, publish_prefix(sid, command.size)) for index, sid in command.sessions]
    pipeline = Pipeline(connection)
    started = time.time_ns()
    pipeline.burst((prefix + header(command.tag, index, sequence) + pad + b"\r\n"
                    for sequence in range(command.count) for index, prefix in prefixes),
                   lambda sent: counters.set_published(publisher_id, sent))
    _check(pipeline)
    return Published(pipeline.sent, pipeline.no_receivers, started, time.time_ns(),
                     {index: command.count for index, _ in command.sessions}, 0.0)


def publish_paced(connection: RedisConnection, command: Paced, counters: Counters,
                  publisher_id: int) -> Published:
    pad = padding(command.size, command.binary)
    prefixes = [(index, publish_prefix(sid, command.size)) for index, sid in command.sessions]
    sequences = [0] * len(prefixes)
    next_session = 0

    def next_command() -> bytes:
        """The next session's next message, round-robin."""
        nonlocal next_session
        turn = next_session
        next_session = (turn + 1) % len(prefixes)
        index, prefix = prefixes[turn]
        sequence = sequences[turn]
        sequences[turn] = sequence + 1
        return prefix + header(command.tag, index, sequence) + pad + b"\r\n"

    pipeline = Pipeline(connection)
    started = time.time_ns()
    schedule = Schedule(command.rate, int(command.rate * command.duration), command.duration)
    pipeline.paced(schedule, next_command, lambda sent: counters.set_published(publisher_id, sent))
    _check(pipeline)
    return Published(pipeline.sent, pipeline.no_receivers, started, time.time_ns(),
                     {index: sequences[i] for i, (index, _) in enumerate(prefixes)},
                     schedule.max_lag_ms)


def publisher_main(publisher_id: int, redis_url: str,
                   conn: Connection[PublisherReply, PublisherCommand],
                   counters: Counters) -> None:
    """A publisher process: one reply per command, a Redis error included, until told to exit."""

    def publish(connection: RedisConnection, command: Burst | Paced) -> Published:
        if isinstance(command, Burst):
            return publish_burst(connection, command, counters, publisher_id)
        return publish_paced(connection, command, counters, publisher_id)

    child_main(conn, lambda: serve(conn, lambda: redis_connection(redis_url), publish))


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
                   counters: Counters) -> Arrivals:
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
                    counters: Counters) -> None:
    """The subscriber process: one subscription, then its counts, then it ends."""

    def subscribe() -> None:
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

    child_main(conn, subscribe)
