"""
What every benchmark scenario shares (bench.servers, bench.children,
bench.pipeline): the paced schedule and the pipelined writes with a fake
connection and clock, the shared-memory counters, the child pool with real
forked children, and the servers' command line the shell scripts use
against a real redis-server and proxy. (Figures are not asserted: timing
belongs in bench/run.sh.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import redis
from twisted.trial.unittest import SynchronousTestCase

from bench import pipeline
from bench.children import (ChildFailed, ChildPool, Counters, child_main, raise_open_files_limit,
                            serve)
from bench.errors import Fatal
from bench.pipeline import BATCH, Pipeline, RedisConnection, Schedule

from .support import ROOT


class _Clock:
    """What bench.pipeline reads of the time module: a clock that moves only when slept."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + 1e-9

    def time_ns(self) -> int:
        return int(self.now * 1e9)


class ScheduleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _Clock()
        self.patch(pipeline, "time", self.clock)

    def test_due_and_wait(self) -> None:
        """
        At C{rate} per second the first send is due at once and one more
        every 1/rate seconds, never more than C{total}; C{wait} is the time
        to the next one, 0 when it is late; lateness is kept as max_lag.
        """
        schedule = Schedule(10, 5, 0.5)
        self.assertEqual(schedule.due(0), 1)
        self.assertAlmostEqual(schedule.wait(1), 0.1)
        self.clock.now += 0.25
        self.assertEqual(schedule.due(1), 3)
        self.assertAlmostEqual(schedule.max_lag, 0.15)
        self.assertAlmostEqual(schedule.wait(3), 0.05)
        self.clock.now += 10
        self.assertEqual(schedule.due(3), 5)
        self.assertEqual(schedule.wait(5), 0.0)

    def test_ends_after_grace(self) -> None:
        """
        A sender that falls behind stops C{PACED_GRACE_SECS} after the
        schedule's duration: C{due} is None then.
        """
        schedule = Schedule(10, 1000, 1.0)
        self.clock.now += 1.0 + pipeline.PACED_GRACE_SECS + 0.01
        self.assertIsNone(schedule.due(0))


class _Connection:
    """A raw Redis connection that answers each command with the next scripted reply."""

    def __init__(self, replies: list[object]) -> None:
        self.writes: list[bytes] = []
        self._replies = replies
        self.read = 0

    def send_packed_command(self, command: list[bytes], check_health: bool = True) -> None:
        self.writes.append(b"".join(command))

    def read_response(self) -> object:
        reply = self._replies[self.read]
        self.read += 1
        if isinstance(reply, Exception):
            raise reply
        return reply


class PipelineTests(SynchronousTestCase):
    def test_replies_read_after_next_write(self) -> None:
        """
        A batch is one write; its replies are read once the next batch is
        out (or at C{finish}); replies of 0 (no subscriber) and error
        replies are counted, the first error kept as an example.
        """
        connection = _Connection([1, 0, redis.ResponseError("NOSCRIPT"), 2])
        pipe = Pipeline(cast(RedisConnection, connection))
        pipe.send([b"a", b"b"])
        self.assertEqual((connection.writes, connection.read), ([b"ab"], 0))
        pipe.send([b"c", b"d"])
        self.assertEqual(connection.read, 2)
        pipe.finish()
        self.assertEqual((pipe.sent, pipe.no_receivers, pipe.errors, pipe.error_example),
                         (4, 1, 1, "NOSCRIPT"))

    def test_burst(self) -> None:
        """
        A burst goes out C{BATCH} commands to a write, progress reported
        after each write, every reply read at the end.
        """
        count = BATCH * 2 + 3
        connection = _Connection([1] * count)
        pipe = Pipeline(cast(RedisConnection, connection))
        progress: list[int] = []
        pipe.burst((b"x" for _ in range(count)), progress.append)
        self.assertEqual([len(w) for w in connection.writes], [BATCH, BATCH, 3])
        self.assertEqual(progress, [BATCH, 2 * BATCH, count])
        self.assertEqual(connection.read, count)

    def test_paced(self) -> None:
        """
        Paced, what has come due goes out in one write and its replies are
        read before the next tick, until the schedule's total is sent.
        """
        self.patch(pipeline, "time", _Clock())
        connection = _Connection([1] * 10)
        pipe = Pipeline(cast(RedisConnection, connection))
        numbers = iter(range(10))
        progress: list[int] = []
        pipe.paced(Schedule(100, 10, 0.1), lambda: b"%d" % next(numbers), progress.append)
        self.assertEqual(b"".join(connection.writes), b"0123456789")
        self.assertEqual(progress[-1], 10)
        self.assertEqual(connection.read, 10)


def _echo_main(conn: Connection[Any, Any], counters: Counters) -> None:
    """A child that answers each command with itself, fails on "fail", counts what it saw."""
    seen = 0

    def handle(_: None, command: object) -> object:
        nonlocal seen
        if command == "fail":
            raise ValueError("asked to")
        seen += 1
        counters.set_worker(0, 1, seen)
        return command

    child_main(conn, lambda: serve(conn, lambda: None, handle))


def _crash_main(conn: Connection[Any, Any], counters: Counters) -> None:
    def crash() -> None:
        raise ZeroDivisionError("division by zero")

    child_main(conn, crash)


class ChildrenTests(SynchronousTestCase):
    def test_counters(self) -> None:
        """
        Each worker's counters, each publisher's and the subscriber's are
        separate slots; totals sum over the workers or the publishers.
        """
        pool = ChildPool()
        counters = Counters(pool.context, 2, 3, 2, subscriber=True)
        counters.set_worker(0, 1, 5)
        counters.set_worker(1, 1, 7)
        counters.set_worker(1, 2, 100)
        counters.set_published(0, 10)
        counters.set_published(1, 20)
        counters.set_arrived(9)
        self.assertEqual((counters.worker_total(0), counters.worker_total(1),
                          counters.worker_total(2)), (0, 12, 100))
        self.assertEqual((counters.published_total(), counters.arrived()), (30, 9))

    def test_pool(self) -> None:
        """
        Forked children answer a command each, in order; a failed command
        is a L{Fatal} naming it (the child goes on); at shutdown every
        child exits.
        """
        pool = ChildPool()
        counters = Counters(pool.context, 1, 2, 0)
        conns = [pool.fork(f"echo-{i}", f"echo{i}", _echo_main, (), counters) for i in range(2)]
        self.addCleanup(pool.shutdown)
        self.assertEqual(pool.ask(conns, "hi", str, 10), ["hi", "hi"])
        self.assertEqual(sorted(pool.pids), ["echo0", "echo1"])
        error = self.assertRaises(Fatal, pool.ask, conns[:1], "fail", str, 10, what="echo")
        self.assertIn("ValueError: asked to", str(error))
        self.assertEqual(pool.ask(conns[:1], "again", str, 10), ["again"])
        self.assertEqual(counters.worker_total(1), 2)
        pool.shutdown()
        for pid in pool.pids.values():
            self.assertFalse(os.path.exists(f"/proc/{pid}"), pid)

    def test_child_failed(self) -> None:
        """A child that crashes reports why to the parent."""
        pool = ChildPool()
        conn = pool.fork("crash", "crash", _crash_main, (), Counters(pool.context, 0, 0, 0))
        self.addCleanup(pool.shutdown)
        self.assertTrue(conn.poll(10))
        reply = conn.recv()
        self.assertIsInstance(reply, ChildFailed)
        self.assertIn("ZeroDivisionError", reply.message)

    def test_open_files(self) -> None:
        """Asking for no more than the hard limit has nothing to report."""
        self.assertIsNone(raise_open_files_limit(0))


def _servers(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "bench.servers", *args], cwd=ROOT,
                          capture_output=True, timeout=60, check=False)
    if done.returncode:
        raise AssertionError(done.stderr.decode(errors="replace"))
    return done.stdout.decode()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


class CommandLineTests(SynchronousTestCase):
    def test_redis_proxy_stop(self) -> None:
        """
        C{python -m bench.servers redis} and C{proxy} print C{PORT PID} of a
        server that answers and is left running (a proxy of this checkout,
        the given settings added, none inherited); C{stop} ends both.
        """
        workdir = tempfile.mkdtemp(prefix="bench-servers-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", workdir], check=False))
        redis_port, redis_pid = map(int, _servers("redis", "--dir", workdir).split())
        self.addCleanup(lambda: _alive(redis_pid) and _servers("stop", str(redis_pid)))
        client = redis.Redis(port=redis_port)
        self.addCleanup(client.close)
        self.assertTrue(client.ping())
        old = os.environ.get("EVENTS")
        os.environ["EVENTS"] = "all"  # not passed on
        try:
            out = _servers("proxy", "--dir", workdir, "--redis-url",
                           f"redis://127.0.0.1:{redis_port}", "RESUME=true")
        finally:
            if old is None:
                del os.environ["EVENTS"]
            else:
                os.environ["EVENTS"] = old
        proxy_port, proxy_pid = map(int, out.split())
        self.addCleanup(lambda: _alive(proxy_pid) and _servers("stop", str(proxy_pid)))
        with open(f"/proc/{proxy_pid}/environ", "rb") as f:
            env = dict(item.partition(b"=")[::2] for item in f.read().split(b"\0") if item)
        self.assertEqual((env[b"RESUME"], env[b"WORKERS"], env[b"PORT"]),
                         (b"true", b"1", str(proxy_port).encode()))
        self.assertNotIn(b"EVENTS", env)
        self.assertEqual(env[b"PYTHONPATH"].split(b":")[0], str(Path(ROOT).resolve()).encode())
        _servers("stop", str(proxy_pid), str(redis_pid))
        deadline = time.monotonic() + 5
        while (_alive(proxy_pid) or _alive(redis_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(_alive(proxy_pid) or _alive(redis_pid))
