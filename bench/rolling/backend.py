"""
The backend's side of the messages up: one consumer
(L{wsproxy.backend.DurableConsumer}, the recipe of
docs/guide/durable-upstream.md) in a thread of the parent, reading every
partition stream through a consumer group, dropping the copies a client
sent again (C{EXISTS session:<id>:seen:<message id>}), handling each
message once, recording its id and acknowledging it.

It keeps two ledgers per session (L{bench.resume.stream.Ledger}): C{raw},
every entry the stream held (the copies too: at least once), and
C{handled}, what the recipe let through (should be exactly once, in
order). A message that was produced but never handled is lost.
"""

from __future__ import annotations

import threading
import time
from array import array

import redis

from bench.resume.stream import Ledger, parse
from wsproxy.backend import DurableConsumer, UpMessage

GROUP = "rolling-bench"


class Backend:
    """The consumer thread and what it counted."""

    def __init__(self, redis_url: str, sessions: int, partitions: int) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=30)
        self._consumer = DurableConsumer(self._redis, GROUP, "backend-1", partitions)
        self._consumer.create_groups()
        self.raw = [Ledger() for _ in range(sessions)]
        self.handled = [Ledger() for _ in range(sessions)]
        self.copies_dropped = 0
        self.corrupt = 0  # entries that are not one of ours, or whose id and number differ
        self.errors = 0
        self.last_error = ""
        self.latencies: array[int] = array("q")  # ns, produced -> handled
        self._total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rolling-backend", daemon=True)
        self._thread.start()

    @property
    def total_handled(self) -> int:
        return self._total

    def _run(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            try:
                batch = consumer.read(count=500, block_ms=200)
                for message in batch:
                    self._handle(message)
                if batch:
                    consumer.ack(*batch)
            except redis.RedisError as e:
                self.errors += 1
                self.last_error = repr(e)
                time.sleep(0.2)

    def _handle(self, message: UpMessage) -> None:
        numbered = parse(message.data)
        if (numbered is None or not 0 <= numbered.index < len(self.raw)
                or message.message_id != f"u{numbered.number}"):
            self.corrupt += 1
            return
        self.raw[numbered.index].record(numbered.number)
        if self._consumer.seen(message):
            self.copies_dropped += 1
            return
        # handling it: what an application would do with the message
        self.handled[numbered.index].record(numbered.number)
        self.latencies.append(time.time_ns() - numbered.sent_ns)
        self._total += 1
        self._consumer.mark_seen(message, ttl=3600)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._redis.close()
