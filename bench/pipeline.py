"""
How a benchmark's publishers write to Redis, for every scenario that
publishes (L{bench.loadtest}, L{bench.resume}): one raw redis-py
connection, commands packed by the caller and written in pipelined batches
(a batch's replies are read once the next one is out), either as a burst
or on a paced schedule (L{Schedule}: a steady rate, however late a tick).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

import redis

# commands per pipelined write in a burst
BATCH = 256
# a paced sender stops this long after its duration even if the machine stalls
PACED_GRACE_SECS = 30.0


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


def bulk(part: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(part), part)


class Pipeline:
    """
    Writes batches of packed commands, reading each batch's replies once the
    next is sent: how many went out, how many PUBLISH reached no subscriber
    (a reply of 0), how many were refused (an error reply) and one example.
    """

    def __init__(self, connection: RedisConnection) -> None:
        self.sent = 0
        self.no_receivers = 0
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
        """Reads the last batch's replies."""
        self._read_replies()
        self._in_flight = 0

    def burst(self, commands: Iterable[bytes], progress: Callable[[int], None]) -> None:
        """
        Sends C{commands} as fast as Redis takes them, L{BATCH} to a write,
        and reads every reply; C{progress(sent)} after each write.
        """
        batch: list[bytes] = []
        for command in commands:
            batch.append(command)
            if len(batch) >= BATCH:
                self.send(batch)
                progress(self.sent)
                batch = []
        if batch:
            self.send(batch)
        self.finish()
        progress(self.sent)

    def paced(self, schedule: Schedule, command: Callable[[], bytes],
              progress: Callable[[int], None]) -> None:
        """
        Sends C{command()} on C{schedule}: at each tick, what has come due in
        one write, its replies read before the next tick; C{progress(sent)}
        after each write.
        """
        while self.sent < schedule.total:
            due = schedule.due(self.sent)
            if due is None:
                break
            if due > self.sent:
                self.send([command() for _ in range(due - self.sent)])
                self.finish()
                progress(self.sent)
            wait = schedule.wait(self.sent)
            if wait > 0:
                time.sleep(wait)

    def _read_replies(self) -> None:
        read = self._connection.read_response
        for _ in range(self._in_flight):
            try:
                if read() == 0:
                    self.no_receivers += 1
            except redis.ResponseError as e:
                self.errors += 1
                self.error_example = self.error_example or str(e)


class Schedule:
    """
    C{total} sends at C{rate} a second from now, for a sender that does
    C{done} of them so far: how many are due, how long until the next one,
    and how far behind the schedule it fell. Ends C{PACED_GRACE_SECS} after
    C{duration} even if it is behind.
    """

    def __init__(self, rate: float, total: int, duration: float) -> None:
        self.rate = rate
        self.total = total
        self.max_lag = 0.0  # seconds
        self.start = time.monotonic()
        self._deadline = self.start + duration + PACED_GRACE_SECS

    def due(self, done: int) -> int | None:
        """How many should have been sent by now (the next one included); None past the end."""
        now = time.monotonic()
        if now > self._deadline:
            return None
        due = min(self.total, int((now - self.start) * self.rate) + 1)
        if due > done:
            self.max_lag = max(self.max_lag, now - (self.start + done / self.rate))
        return due

    def wait(self, done: int) -> float:
        """Seconds until the next send is due (0 if it is late)."""
        return max(0.0, self.start + done / self.rate - time.monotonic())

    @property
    def max_lag_ms(self) -> float:
        return round(self.max_lag * 1000, 3)
