"""
How the master is chosen from the sentinels' answers, without processes.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from wsproxy.redis import sentinel
from wsproxy.config import Settings
from wsproxy.redis.redisendpoint import SentinelError


class FindMasterTests(SynchronousTestCase):
    def endpoint(self, answers: dict[int, Any]) -> sentinel.SentinelEndpoint:
        async def ask(reactor: Any, settings: Settings, host: str, port: int) -> Any:
            answer = answers[port]
            if isinstance(answer, Exception):
                raise answer
            return answer

        self.patch(sentinel, "ask_for_master", ask)
        settings = Settings(redis_sentinels=tuple(("127.0.0.1", p) for p in answers),
                            redis_sentinel_master="m")
        return sentinel.SentinelEndpoint(None, settings)

    def find(self, endpoint: sentinel.SentinelEndpoint) -> Any:
        from twisted.internet import defer

        return defer.ensureDeferred(endpoint.find_master())

    def test_majority_wins_over_a_lying_sentinel(self) -> None:
        """
        One sentinel names another server: the address most of them give
        is used.
        """
        endpoint = self.endpoint({1: ("10.0.0.9", 6379), 2: ("10.0.0.1", 6379),
                                  3: ("10.0.0.1", 6379)})
        self.assertEqual(self.successResultOf(self.find(endpoint)), ("10.0.0.1", 6379))
        self.assertEqual(endpoint.master, ("10.0.0.1", 6379))

    def test_down_sentinels_skipped(self) -> None:
        endpoint = self.endpoint({1: ConnectionRefusedError(), 2: ("10.0.0.1", 6379)})
        self.assertEqual(self.successResultOf(self.find(endpoint)), ("10.0.0.1", 6379))

    def test_none_answer(self) -> None:
        """
        No sentinel answered: one error naming each sentinel's reason.
        """
        endpoint = self.endpoint({1: ConnectionRefusedError("refused"),
                                  2: TimeoutError("slow")})
        failure = self.failureResultOf(self.find(endpoint), SentinelError)
        self.assertIn("no sentinel answered", str(failure.value))
        self.assertIn("127.0.0.1:1: refused", str(failure.value))

    def test_unknown_master(self) -> None:
        error = SentinelError("sentinels do not know master 'm'")
        endpoint = self.endpoint({1: error, 2: error})
        failure = self.failureResultOf(self.find(endpoint), SentinelError)
        self.assertEqual(str(failure.value), "sentinels do not know master 'm'")

    def test_announced_master_preferred_until_all_agree(self) -> None:
        """
        After a C{+switch-master}, the master it named is taken even while
        most sentinels still name the old one (they learn of a failover
        seconds after the sentinel that led it), until every sentinel
        names it; then the majority decides again.
        """
        answers: dict[int, Any] = {1: ("10.0.0.2", 6379), 2: ("10.0.0.1", 6379),
                                   3: ("10.0.0.1", 6379)}
        endpoint = self.endpoint(answers)
        self.assertEqual(self.successResultOf(self.find(endpoint)), ("10.0.0.1", 6379))
        endpoint.announced = ("10.0.0.2", 6379)
        self.assertEqual(self.successResultOf(self.find(endpoint)), ("10.0.0.2", 6379))
        self.assertEqual(endpoint.announced, ("10.0.0.2", 6379))
        answers.update({2: ("10.0.0.2", 6379), 3: ("10.0.0.2", 6379)})
        self.assertEqual(self.successResultOf(self.find(endpoint)), ("10.0.0.2", 6379))
        self.assertIsNone(endpoint.announced)

    def test_announced_master_no_sentinel_names_is_not_taken(self) -> None:
        """
        An announced master that no sentinel names (a later failover the
        watcher missed) does not override their answer.
        """
        endpoint = self.endpoint({1: ("10.0.0.3", 6379), 2: ("10.0.0.3", 6379)})
        endpoint.announced = ("10.0.0.2", 6379)
        self.assertEqual(self.successResultOf(self.find(endpoint)), ("10.0.0.3", 6379))


class WatcherTests(SynchronousTestCase):
    """
    What the watcher makes of the sentinels' announcements (each sentinel
    it is subscribed to sends its own copy).
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.switches: list[tuple[str, int]] = []
        self.selected: list[tuple[str, int]] = []
        settings = Settings(redis_sentinels=(("127.0.0.1", 1), ("127.0.0.1", 2)),
                            redis_sentinel_master="m")
        self.watcher = sentinel.SentinelWatcher(
            Clock(), settings, lambda h, p: self.switches.append((h, p)),
            lambda h, p: self.selected.append((h, p)))

    def test_selected_replica_then_switch_once_each(self) -> None:
        """
        C{+selected-slave} names the replica a failover will promote, and
        C{+switch-master} the new master; each is acted on once however
        many sentinels send it, and messages about another master name are
        ignored.
        """
        selected = b"slave 10.0.0.2:6380 10.0.0.2 6380 @ m 10.0.0.1 6379"
        switch = b"m 10.0.0.1 6379 10.0.0.2 6380"
        for _ in range(3):
            self.watcher._message(b"+selected-slave", selected)
        self.watcher._message(b"+selected-slave",
                              b"slave 10.0.0.9:1 10.0.0.9 1 @ other 10.0.0.8 2")
        for _ in range(3):
            self.watcher._message(b"+switch-master", switch)
        self.watcher._message(b"+switch-master", b"other 10.0.0.8 2 10.0.0.9 1")
        self.assertEqual(self.selected, [("10.0.0.2", 6380)])
        self.assertEqual(self.switches, [("10.0.0.2", 6380)])

    def test_promoting_connects_to_the_selected_replica(self) -> None:
        """
        While a failover promotes the replica it selected, the endpoint
        names that replica without asking the sentinels (none names it
        yet); the ROLE check waits for its promotion.
        """
        from twisted.internet import defer

        async def ask(reactor: Any, settings: Settings, host: str, port: int) -> Any:
            return ("10.0.0.1", 6379)

        self.patch(sentinel, "ask_for_master", ask)
        endpoint = sentinel.SentinelEndpoint(None, Settings(
            redis_sentinels=(("127.0.0.1", 1),), redis_sentinel_master="m"))
        endpoint.announced, endpoint.promoting = ("10.0.0.2", 6380), True
        self.assertEqual(self.successResultOf(defer.ensureDeferred(endpoint.find_master())),
                         ("10.0.0.2", 6380))
        endpoint.promoting = False
        self.assertEqual(self.successResultOf(defer.ensureDeferred(endpoint.find_master())),
                         ("10.0.0.1", 6379))
