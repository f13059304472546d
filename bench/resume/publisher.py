"""
The publisher process: the backend's side of the stream. Recoverable
messages go out as C{FCALL wsproxy_publish 2 session:S:history
session:S:meta <message> text}, plain ones as C{PUBLISH session:S:down
<message>} (and, to tell the proxy's share of the cost from Redis's, "live"
ones as a bare C{PUBLISH session:S:live} of what wsproxy_publish would
publish, with no history behind them), in pipelined batches over one raw redis-py connection (the
load-test tool's), either paced (a steady aggregate rate, round-robin over
the sessions) or as a burst.

Each session's messages are numbered 1, 2, 3, ... (0 is the priming message
that gives every session a history before its clients connect).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal, Union

import redis

from bench.loadtest.redis_io import RedisConnection, redis_connection

from .ipc import ChildFailed, Counters, Exit
from .stream import message

#: plain: PUBLISH :down; resume: FCALL wsproxy_publish; live: PUBLISH :live
#: in wsproxy_publish's format (the proxy's resumable path without the
#: function's cost in Redis; nothing to recover from)
Mode = Literal["plain", "resume", "live"]

#: the epoch of the "live" messages' positions
LIVE_EPOCH = b"0bench"

# commands per pipelined write in a burst
BATCH = 256
# a paced publisher stops this long after its duration even if the machine stalls
PACED_GRACE_SECS = 30.0


@dataclass(frozen=True)
class Prime:
    """Publish message 0 to every session (a recoverable one: the history exists)."""

    sessions: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class Paced:
    """C{rate} messages a second over all sessions, round-robin, for C{duration} seconds."""

    sessions: tuple[str, ...]
    mode: Mode
    rate: float
    duration: float
    size: int


@dataclass(frozen=True)
class Burst:
    """C{count} messages to every session, as fast as Redis takes them."""

    sessions: tuple[str, ...]
    mode: Mode
    count: int
    size: int


PublisherCommand = Union[Prime, Paced, Burst, Exit]


@dataclass(frozen=True)
class Published:
    sent: tuple[int, ...]  # per session index: messages published (the last number)
    errors: int  # error replies (that number was not published)
    error_example: str
    started_ns: int
    ended_ns: int
    max_lag_ms: float  # how far a paced publisher fell behind its schedule


PublisherReply = Union[Published, ChildFailed]


def _bulk(part: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(part), part)


class Commands:
    """Each session's command, packed up to its message."""

    def __init__(self, sessions: tuple[str, ...], mode: Mode) -> None:
        self._live = mode == "live"
        self._ms = time.time_ns() // 1_000_000
        if mode == "live":
            self._prefixes = [b"*3\r\n" + _bulk(b"PUBLISH") + _bulk(f"session:{sid}:live".encode())
                              for sid in sessions]
            self._suffix = b""
        elif mode == "resume":
            self._prefixes = [
                b"*7\r\n" + _bulk(b"FCALL") + _bulk(b"wsproxy_publish") + _bulk(b"2")
                + _bulk(f"session:{sid}:history".encode()) + _bulk(f"session:{sid}:meta".encode())
                for sid in sessions]
            self._suffix = _bulk(b"text")
        else:
            self._prefixes = [b"*3\r\n" + _bulk(b"PUBLISH") + _bulk(f"session:{sid}:down".encode())
                              for sid in sessions]
            self._suffix = b""

    def pack(self, index: int, number: int, payload: bytes) -> bytes:
        """The command that publishes message C{number} of session C{index}."""
        if self._live:
            # wsproxy_publish's live format: <epoch> <ms>-<seq> <kind><message>
            payload = b"%s %d-%d t%s" % (LIVE_EPOCH, self._ms, number, payload)
        return self._prefixes[index] + _bulk(payload) + self._suffix


class Pipeline:
    """Writes batches of commands; reads a batch's replies once the next one is out."""

    def __init__(self, connection: RedisConnection) -> None:
        self.sent = 0
        self.errors = 0
        self.error_example = ""
        self._connection = connection
        self._in_flight = 0

    def send(self, batch: list[bytes]) -> None:
        self._connection.send_packed_command([b"".join(batch)], check_health=False)
        self._read_replies()
        self._in_flight = len(batch)
        self.sent += len(batch)

    def finish(self) -> None:
        self._read_replies()
        self._in_flight = 0

    def _read_replies(self) -> None:
        read = self._connection.read_response
        for _ in range(self._in_flight):
            try:
                read()
            except redis.ResponseError as e:
                self.errors += 1
                self.error_example = self.error_example or str(e)


def prime(connection: RedisConnection, command: Prime) -> Published:
    commands = Commands(command.sessions, "resume")
    pipeline = Pipeline(connection)
    started = time.time_ns()
    for start in range(0, len(command.sessions), BATCH):
        pipeline.send([commands.pack(index, 0, message(index, 0, command.size))
                       for index in range(start, min(start + BATCH, len(command.sessions)))])
    pipeline.finish()
    return Published((0,) * len(command.sessions), pipeline.errors, pipeline.error_example,
                     started, time.time_ns(), 0.0)


def publish_burst(connection: RedisConnection, command: Burst, counters: Counters) -> Published:
    commands = Commands(command.sessions, command.mode)
    pipeline = Pipeline(connection)
    sessions = range(len(command.sessions))
    batch: list[bytes] = []
    started = time.time_ns()
    for number in range(1, command.count + 1):
        for index in sessions:
            batch.append(commands.pack(index, number, message(index, number, command.size)))
            if len(batch) >= BATCH:
                pipeline.send(batch)
                counters.set_published(pipeline.sent)
                batch = []
    if batch:
        pipeline.send(batch)
    pipeline.finish()
    counters.set_published(pipeline.sent)
    return Published((command.count,) * len(command.sessions), pipeline.errors,
                     pipeline.error_example, started, time.time_ns(), 0.0)


def publish_paced(connection: RedisConnection, command: Paced, counters: Counters) -> Published:
    commands = Commands(command.sessions, command.mode)
    pipeline = Pipeline(connection)
    sessions = len(command.sessions)
    numbers = [0] * sessions
    rate = command.rate
    total = round(rate * command.duration)
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
                number = numbers[next_session] + 1
                numbers[next_session] = number
                batch.append(commands.pack(next_session, number,
                                           message(next_session, number, command.size)))
                next_session = (next_session + 1) % sessions
            pipeline.send(batch)
            pipeline.finish()
            counters.set_published(pipeline.sent)
        wait = start + pipeline.sent / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    return Published(tuple(numbers), pipeline.errors, pipeline.error_example, started,
                     time.time_ns(), round(max_lag * 1000, 3))


def publisher_main(redis_url: str, conn: Connection[PublisherReply, PublisherCommand],
                   counters: Counters) -> None:
    """The publisher process: one reply per command until told to exit."""
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
            if isinstance(command, Prime):
                reply = prime(connection, command)
            elif isinstance(command, Burst):
                reply = publish_burst(connection, command, counters)
            else:
                reply = publish_paced(connection, command, counters)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply = ChildFailed(f"{type(e).__name__}: {e}")
            connection = None
        conn.send(reply)
