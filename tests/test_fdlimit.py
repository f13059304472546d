"""
The descriptor limit: raised to the hard limit at start, logged, and the
connection cap kept below it (L{wsproxy.process.fdlimit}).
"""

from __future__ import annotations

import resource
import shutil

from twisted.trial.unittest import SynchronousTestCase

from wsproxy.process.fdlimit import RESERVE, DescriptorLimit, raise_soft_limit

from .support import raw_upgrade, status_of, wait_for
from .support.daemon import EnvTestCase

PRLIMIT = shutil.which("prlimit") or "prlimit"


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def put(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.set.append(limits)
        self.soft = limits[0]


class RaiseTests(SynchronousTestCase):
    def test_raised_to_hard(self) -> None:
        """
        A soft limit below the hard one is raised to it, and the result
        names both.
        """
        fake = FakeLimits(1024, 20000)
        limit = raise_soft_limit(fake.get, fake.put)
        self.assertEqual(fake.set, [(20000, 20000)])
        self.assertEqual((limit.limit, limit.before, limit.error), (20000, 1024, None))

    def test_already_at_hard(self) -> None:
        """
        A soft limit already at the hard one is left alone.
        """
        fake = FakeLimits(20000, 20000)
        limit = raise_soft_limit(fake.get, fake.put)
        self.assertEqual(fake.set, [])
        self.assertEqual((limit.limit, limit.before), (20000, 20000))

    def test_unlimited_hard(self) -> None:
        """
        An unlimited hard limit is taken as Linux's default C{nr_open}
        (RLIM_INFINITY is refused for descriptors), keeping it unlimited.
        """
        fake = FakeLimits(1024, resource.RLIM_INFINITY)
        limit = raise_soft_limit(fake.get, fake.put)
        self.assertEqual(fake.set, [(1 << 20, resource.RLIM_INFINITY)])
        self.assertEqual(limit.limit, 1 << 20)

    def test_refused(self) -> None:
        """
        If the kernel refuses, the limit stays what it was and the reason
        is kept for the log line.
        """
        fake = FakeLimits(1024, 4096, refuse=True)
        limit = raise_soft_limit(fake.get, fake.put)
        self.assertEqual((limit.limit, limit.error), (1024, "not allowed"))
        self.assertIn("could not raise it: not allowed", limit.describe(0)[0])


class CapTests(SynchronousTestCase):
    def test_unlimited_means_capacity(self) -> None:
        """
        MAX_CONNECTIONS=0 becomes the limit minus the reserve; no warning.
        """
        limit = DescriptorLimit(20000, 1024)
        self.assertEqual(limit.cap(0), 20000 - RESERVE)
        info, warning = limit.describe(0)
        self.assertEqual(info, f"file descriptor limit 20000, raised from 1024: "
                               f"up to {20000 - RESERVE} connections")
        self.assertIsNone(warning)

    def test_within(self) -> None:
        """
        A MAX_CONNECTIONS the limit allows is kept as it is.
        """
        self.assertEqual(DescriptorLimit(20000, 20000).cap(5000), 5000)
        self.assertIsNone(DescriptorLimit(20000, 20000).describe(5000)[1])

    def test_beyond(self) -> None:
        """
        A MAX_CONNECTIONS beyond the limit is lowered to the capacity,
        with a warning naming both numbers.
        """
        limit = DescriptorLimit(1024, 1024)
        self.assertEqual(limit.cap(100000), 1024 - RESERVE)
        warning = limit.describe(100000)[1]
        assert warning is not None
        self.assertIn(f"MAX_CONNECTIONS=100000 exceeds what the file descriptor limit 1024 "
                      f"allows: connections past {1024 - RESERVE} get 503", warning)


class DaemonLimitTests(EnvTestCase):
    """
    A real daemon started under C{prlimit}.
    """

    async def test_raised_and_logged(self) -> None:
        """
        Started with soft limit 200 and hard limit 400, the daemon raises
        its soft limit to 400 (read back from /proc), says so, and warns
        that MAX_CONNECTIONS=1000 exceeds it.
        """
        daemon = await self.start(launcher=(PRLIMIT, "--nofile=200:400"), MAX_CONNECTIONS="1000")
        await wait_for(lambda: b"exceeds" in daemon.out.output, timeout=10)
        self.assertIn(f"file descriptor limit 400, raised from 200: up to {400 - RESERVE} "
                      "connections", self.log)
        self.assertIn(f"MAX_CONNECTIONS=1000 exceeds what the file descriptor limit 400 "
                      f"allows: connections past {400 - RESERVE} get 503", self.log)
        with open(f"/proc/{daemon.process.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        self.assertEqual(line.split()[3:5], ["400", "400"])

    async def test_503_at_the_limit_not_a_reset(self) -> None:
        """
        With a limit of 300 descriptors and no MAX_CONNECTIONS, the daemon
        accepts 300 - RESERVE WebSocket connections, answers the next one
        503, and keeps serving (health 200, the open sessions still
        there).
        """
        await self.start(launcher=(PRLIMIT, "--nofile=300:300"))
        capacity = 300 - RESERVE
        self.r.set("session:s1:auth", "tok", ex=300)
        clients = []
        for _ in range(capacity):
            c = await raw_upgrade(self.port, "/a/ws/s1", {"Authorization": "Bearer tok"})
            self.addCleanup(c.transport.abortConnection)
            clients.append(c)
        self.assertEqual({status_of(c.data) for c in clients}, {101})
        extra = await raw_upgrade(self.port, "/a/ws/s1", {"Authorization": "Bearer tok"})
        self.addCleanup(extra.transport.abortConnection)
        self.assertEqual(status_of(extra.data), 503)
        self.assertIn(b"Too many connections", extra.data)
        self.assertEqual(await self.health(), 200)
        self.assertTrue(all(c.lost_at is None for c in clients))
