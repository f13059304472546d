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

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal, Union

from bench.children import ChildFailed, Counters, Exit, child_main, serve
from bench.pipeline import Pipeline, RedisConnection, Schedule, bulk, redis_connection

from .stream import message

#: plain: PUBLISH :down; resume: FCALL wsproxy_publish; live: PUBLISH :live
#: in wsproxy_publish's format (the proxy's resumable path without the
#: function's cost in Redis; nothing to recover from)
Mode = Literal["plain", "resume", "live"]

#: the epoch of the "live" messages' positions
LIVE_EPOCH = b"0bench"


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


class Commands:
    """Each session's command, packed up to its message."""

    def __init__(self, sessions: tuple[str, ...], mode: Mode) -> None:
        self._live = mode == "live"
        self._ms = time.time_ns() // 1_000_000
        if mode == "live":
            self._prefixes = [b"*3\r\n" + bulk(b"PUBLISH") + bulk(f"session:{sid}:live".encode())
                              for sid in sessions]
            self._suffix = b""
        elif mode == "resume":
            self._prefixes = [
                b"*7\r\n" + bulk(b"FCALL") + bulk(b"wsproxy_publish") + bulk(b"2")
                + bulk(f"session:{sid}:history".encode()) + bulk(f"session:{sid}:meta".encode())
                for sid in sessions]
            self._suffix = bulk(b"text")
        else:
            self._prefixes = [b"*3\r\n" + bulk(b"PUBLISH") + bulk(f"session:{sid}:down".encode())
                              for sid in sessions]
            self._suffix = b""

    def pack(self, index: int, number: int, payload: bytes) -> bytes:
        """The command that publishes message C{number} of session C{index}."""
        if self._live:
            # wsproxy_publish's live format: <epoch> <ms>-<seq> <kind><message>
            payload = b"%s %d-%d t%s" % (LIVE_EPOCH, self._ms, number, payload)
        return self._prefixes[index] + bulk(payload) + self._suffix


def prime(connection: RedisConnection, command: Prime) -> Published:
    commands = Commands(command.sessions, "resume")
    pipeline = Pipeline(connection)
    started = time.time_ns()
    pipeline.burst((commands.pack(index, 0, message(index, 0, command.size))
                    for index in range(len(command.sessions))), lambda sent: None)
    return Published((0,) * len(command.sessions), pipeline.errors, pipeline.error_example,
                     started, time.time_ns(), 0.0)


def publish_burst(connection: RedisConnection, command: Burst, counters: Counters) -> Published:
    commands = Commands(command.sessions, command.mode)
    pipeline = Pipeline(connection)
    sessions = range(len(command.sessions))
    started = time.time_ns()
    pipeline.burst((commands.pack(index, number, message(index, number, command.size))
                    for number in range(1, command.count + 1) for index in sessions),
                   lambda sent: counters.set_published(0, sent))
    return Published((command.count,) * len(command.sessions), pipeline.errors,
                     pipeline.error_example, started, time.time_ns(), 0.0)


def publish_paced(connection: RedisConnection, command: Paced, counters: Counters) -> Published:
    commands = Commands(command.sessions, command.mode)
    sessions = len(command.sessions)
    numbers = [0] * sessions
    next_session = 0

    def next_command() -> bytes:
        """The next session's next number, round-robin."""
        nonlocal next_session
        index = next_session
        next_session = (index + 1) % sessions
        number = numbers[index] + 1
        numbers[index] = number
        return commands.pack(index, number, message(index, number, command.size))

    pipeline = Pipeline(connection)
    schedule = Schedule(command.rate, round(command.rate * command.duration), command.duration)
    started = time.time_ns()
    pipeline.paced(schedule, next_command, lambda sent: counters.set_published(0, sent))
    return Published(tuple(numbers), pipeline.errors, pipeline.error_example, started,
                     time.time_ns(), schedule.max_lag_ms)


def publisher_main(redis_url: str, conn: Connection[PublisherReply, PublisherCommand],
                   counters: Counters) -> None:
    """The publisher process: one reply per command until told to exit."""

    def publish(connection: RedisConnection, command: Prime | Burst | Paced) -> Published:
        if isinstance(command, Prime):
            return prime(connection, command)
        if isinstance(command, Burst):
            return publish_burst(connection, command, counters)
        return publish_paced(connection, command, counters)

    child_main(conn, lambda: serve(conn, lambda: redis_connection(redis_url), publish))
