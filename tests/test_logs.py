"""
The per-address log budget, with a fake clock.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.logs import LogBudget


class LogBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.budget = LogBudget(self.clock, lines=2, interval=60, max_peers=3)

    def test_lines_per_window(self) -> None:
        """
        An address may log C{lines} lines per window; the rest are
        suppressed, and the first line of the next window says how many.
        """
        self.assertEqual([self.budget.take("a") for _ in range(5)], [0, 0, None, None, None])
        self.assertEqual(self.budget.take("b"), 0)
        self.clock.advance(60)
        self.assertEqual(self.budget.take("a"), 3)
        self.assertEqual(self.budget.take("a"), 0)

    def test_table_bounded(self) -> None:
        """
        More addresses than C{max_peers} start the table over instead of
        growing it.
        """
        for peer in "abcdefgh":
            self.assertEqual(self.budget.take(peer), 0)
        self.assertLessEqual(len(self.budget._peers), 3)
