"""
L{wsproxy.backend}'s listeners (C{listen_up}, C{listen_events}) on a
single Redis that goes away: they subscribe again when it is back, and
raise once it has been gone for C{reconnect_for} seconds, so a listener is
never silently dead. (Moved slots and failovers: L{tests.test_cluster} and
L{tests.test_sentinel}, C{BackendHelperTests}.)
"""

from __future__ import annotations

import logging

import redis as redispy

from wsproxy.backend import Backend

from .support import BackendListener, RedisTestCase, wait_for


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class ReconnectTests(RedisTestCase):
    def subscribers(self) -> int:
        return int(self.r.pubsub_numsub("session:s1:up")[0][1])

    def warnings(self) -> list[str]:
        """
        What wsproxy.backend logs during the test.
        """
        records = _Records()
        logger = logging.getLogger("wsproxy.backend")
        logger.addHandler(records)
        self.addCleanup(logger.removeHandler, records)
        return records.messages

    async def test_redis_restarted(self) -> None:
        """
        Redis killed while a backend listens, and started again on the
        same address only after redis-py's own retries have run out (the
        helper has logged the loss): the listener subscribes again and
        receives what is published after.
        """
        warnings = self.warnings()
        backend = Backend(self.redis.client())
        listener = BackendListener(backend.listen_up("s1", timeout=0.1, reconnect_for=30))
        await wait_for(lambda: self.subscribers() == 1)
        self.redis.stop()
        await wait_for(lambda: any("connection lost" in w for w in warnings), timeout=15)
        self.redis.start()
        await wait_for(lambda: self.subscribers() == 1, timeout=15)
        self.r.publish("session:s1:up", "after")
        await wait_for(lambda: listener.received == [("s1", b"after")])
        self.assertIsNone(listener.error)

    async def test_redis_gone_raises(self) -> None:
        """
        Redis gone for longer than C{reconnect_for}: the listener's
        iterator raises the connection error instead of waiting forever.
        """
        backend = Backend(self.redis.client())
        listener = BackendListener(backend.listen_up("s1", timeout=0.1, reconnect_for=1))
        await wait_for(lambda: self.subscribers() == 1)
        self.redis.stop()
        await wait_for(lambda: not listener.thread.is_alive(), timeout=15)
        self.assertIsInstance(listener.error, redispy.ConnectionError)
        self.assertEqual(listener.received, [])
