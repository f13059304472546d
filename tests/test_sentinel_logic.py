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
