"""
C{bin/dev run} with no Redis configured: it starts a private redis-server
(on C{WSPROXY_DEV_REDIS_PORT}, a free port here, instead of 6379) for the
proxy, and stops it however the proxy ends; a SIGTERM to C{bin/dev} is
passed on to the proxy, which shuts down gracefully.

The dependency policy: pyproject.toml caps Twisted, Autobahn and txaio at
the releases the fast path is verified against, the lock
(requirements/constraints.txt, written by C{bin/dev lock}) runs exactly
those and satisfies every range, and C{bin/dev setup} (so CI) installed
the lock's versions.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from typing import Optional

import redis as redispy
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase, TestCase

from .support import (
    ROOT,
    Daemon,
    clean_autobahn_timers,
    connect,
    free_port,
    start_daemon,
    wait_for,
)

BIN_DEV = os.path.join(ROOT, "bin", "dev")
LOCK = os.path.join(ROOT, "requirements", "constraints.txt")
#: capped at the releases the fast path is verified against
BOUNDED = ("twisted", "autobahn", "txaio")


def pids_of(*needles: bytes, where: str = "cmdline") -> list[int]:
    """
    The live (not zombie) processes whose C{/proc/PID/<where>} (command
    line, or environment) contains every one of C{needles}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/{where}", "rb") as f:
                text = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if state != b"Z" and all(needle in text for needle in needles):
            found.append(int(entry))
    return found


class BinDevRunTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        dotenv = os.path.join(ROOT, ".env")
        if os.path.exists(dotenv):
            with open(dotenv) as f:
                self.assertNotRegex(f.read(), r"(?m)^\s*REDIS_URL=",
                                    "the checkout's .env sets REDIS_URL: bin/dev run would not "
                                    "start the redis-server this test is about")
        self.redis_port = free_port()
        self.mark = f"{os.getpid()}-{self.redis_port}-{time.monotonic_ns()}"
        self.addCleanup(clean_autobahn_timers)

    def redis_pids(self) -> list[int]:
        """
        bin/dev's redis-server (its process title names its address).
        """
        return pids_of(b"redis-server", f"127.0.0.1:{self.redis_port}".encode())

    def start(self, **env: str) -> Daemon:
        full = {"WSPROXY_DEV_REDIS_PORT": str(self.redis_port), "HOST": "127.0.0.1",
                "PORT": "0", "SHUTDOWN_DRAIN_SECS": "0", "SHUTDOWN_GRACE_PERIOD_SECS": "5",
                "WSPROXY_TEST_MARK": self.mark}
        full.update(env)
        daemon = start_daemon(self, full, (BIN_DEV, "run"))
        # whatever happens to the test, nothing it started outlives it
        self.addCleanup(self.kill_leftovers)
        return daemon

    def started_by_test(self) -> list[int]:
        """
        Every live process bin/dev started, orphans included: they inherit
        the mark in their environment, except redis-server, whose process
        title overwrites it (it names its address instead).
        """
        marked = pids_of(f"WSPROXY_TEST_MARK={self.mark}\0".encode(), where="environ")
        return sorted(set(marked + self.redis_pids()))

    def kill_leftovers(self) -> None:
        for pid in self.started_by_test():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def children(self, daemon: Daemon) -> list[int]:
        pid = daemon.process.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(child) for child in f.read().split()]
        except FileNotFoundError:
            return []

    def redis_answers(self) -> bool:
        # a bare PING: redis-py would retry a refused connection for seconds
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    async def test_sigterm_stops_proxy_and_its_redis(self) -> None:
        """
        SIGTERM to bin/dev run: the proxy shuts down gracefully (its client
        gets 1001), bin/dev exits 0, and neither the proxy nor the
        redis-server bin/dev started is left running.
        """
        self.assertFalse(self.redis_answers(), f"something answers on {self.redis_port}")
        daemon = self.start()
        port = await daemon.ready()
        await wait_for(lambda: f"(redis redis://127.0.0.1:{self.redis_port})".encode()
                       in daemon.out.output)
        self.assertEqual(len(self.redis_pids()), 1)
        [proxy] = [pid for pid in self.children(daemon) if pid in pids_of(b"-m\0wsproxy")]
        r = redispy.Redis(port=self.redis_port, socket_timeout=5)
        self.addCleanup(r.close)
        r.set("session:s1:auth", "tok", ex=60)
        client = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")

        daemon.signal(signal.SIGTERM)
        status = await self.ended(daemon)
        self.assertEqual(status, 0, daemon.out.output[-2000:])
        self.assertEqual((await client.factory.closed)[0], 1001)
        self.assertIn(b"shutdown complete", daemon.out.output)
        self.assertNotIn(proxy, pids_of(b"-m\0wsproxy"))
        self.assertEqual(self.redis_pids(), [])
        self.assertEqual(self.started_by_test(), [])
        self.assertFalse(self.redis_answers())
        self.assertFalse(os.path.exists(self.redis_dir(daemon)))
        with self.assertRaises(error.ConnectionRefusedError):
            await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")

    async def test_proxy_exit_stops_its_redis(self) -> None:
        """
        When the proxy exits by itself (an invalid setting: status 2),
        bin/dev run exits with its status and stops the redis-server it
        started.
        """
        daemon = self.start(LOG_LEVEL="chatty")
        status = await self.ended(daemon)
        self.assertEqual(status, 2, daemon.out.output[-2000:])
        self.assertIn(b"starting a local redis-server", daemon.out.output)
        self.assertIn(b"configuration error: LOG_LEVEL", daemon.out.output)
        self.assertEqual(self.redis_pids(), [])
        self.assertEqual(self.started_by_test(), [])
        self.assertFalse(self.redis_answers())
        self.assertFalse(os.path.exists(self.redis_dir(daemon)))

    def redis_dir(self, daemon: Daemon) -> str:
        """
        The redis-server's data directory, as bin/dev announced it.
        """
        match = re.search(rb"starting a local redis-server on \S+ \(data in (\S+)\)",
                          daemon.out.output)
        self.assertIsNotNone(match, daemon.out.output[-2000:])
        assert match is not None
        return match.group(1).decode()

    async def ended(self, daemon: Daemon, timeout: float = 30) -> Optional[int]:
        try:
            await wait_for(lambda: daemon.out.status is not None, timeout=timeout)
        except AssertionError:
            self.fail(f"bin/dev run has not exited within {timeout}s: "
                      f"{daemon.out.output[-2000:]!r}")
        return daemon.out.status


def project_requirements() -> list[Requirement]:
    """
    What C{bin/dev setup} installs: the project's dependencies and its
    C{dev} extra, as pyproject.toml declares them.
    """
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(line) for line in declared]


def locked() -> dict[str, Version]:
    """
    The lock's pins, by canonical name.
    """
    pins: dict[str, Version] = {}
    with open(LOCK) as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                requirement = Requirement(line.strip())
                [pin] = requirement.specifier
                pins[canonicalize_name(requirement.name)] = Version(pin.version)
    return pins


class DependencyPolicyTests(SynchronousTestCase):
    def upper_bound(self, requirement: Requirement) -> Version:
        [cap] = [s for s in requirement.specifier if s.operator == "<="]
        return Version(cap.version)

    def test_bounded_packages_are_capped(self) -> None:
        """
        pyproject.toml names Twisted, Autobahn and txaio, each with a lower
        bound and an inclusive upper bound (the verified release) and no
        other clause.
        """
        by_name: dict[str, Requirement] = {
            canonicalize_name(r.name): r for r in project_requirements()}
        for name in BOUNDED:
            self.assertIn(name, by_name)
            operators = sorted(s.operator for s in by_name[name].specifier)
            self.assertEqual(operators, ["<=", ">="], str(by_name[name]))

    def test_lock_runs_the_upper_bounds(self) -> None:
        """
        The lock pins Twisted, Autobahn and txaio at exactly their upper
        bounds: what CI runs is what the fast path is verified against
        (C{bin/dev lock} re-resolves them every time).
        """
        pins = locked()
        for requirement in project_requirements():
            name = canonicalize_name(requirement.name)
            if name in BOUNDED:
                self.assertEqual(pins.get(name), self.upper_bound(requirement),
                                 f"{name}: run bin/dev lock")

    def test_lock_satisfies_pyproject(self) -> None:
        """
        Every package pyproject.toml names (dependencies and the dev extra)
        is in the lock, at a version inside its range: after a change to
        pyproject.toml, C{bin/dev lock} has been run.
        """
        pins = locked()
        wrong = {}
        for requirement in project_requirements():
            name = canonicalize_name(requirement.name)
            if name not in pins:
                wrong[str(requirement)] = "not in the lock"
            elif pins[name] not in requirement.specifier:
                wrong[str(requirement)] = f"the lock has {pins[name]}"
        self.assertEqual(wrong, {}, "run bin/dev lock")

    def test_lock_is_pins_only(self) -> None:
        """
        The lock holds only C{name==version} lines (no extras, options,
        markers or hashes), so pip takes it as constraints (C{-c}) for the
        editable install, and a container build can take it too; and it says
        it was made by C{bin/dev lock} for the Python that bin/dev locks for.
        """
        with open(LOCK) as f:
            text = f.read()
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                self.assertRegex(line, r"^[a-z0-9][a-z0-9.-]*==[0-9][^\s;\\]*$")
        with open(BIN_DEV) as f:
            [python] = re.findall(r"(?m)^LOCK_PYTHON=(\S+)$", f.read())
        self.assertIn(f"autogenerated by pip-compile with Python {python}\n", text)
        self.assertIn("#    bin/dev lock\n", text)

    def test_venv_has_the_locked_versions(self) -> None:
        """
        The checkout's .venv (the one bin/dev, and so CI, runs the suite in)
        has every package of the lock installed at the lock's version: the
        suite really ran on the lock.
        """
        venv = os.path.realpath(os.path.join(ROOT, ".venv"))
        if os.path.realpath(sys.prefix) != venv:
            raise self.skipTest(f"not running in bin/dev's venv ({venv})")
        wrong = {}
        for name, version in locked().items():
            try:
                installed = Version(metadata.version(name))
            except metadata.PackageNotFoundError:
                wrong[name] = f"{version} locked, not installed"
                continue
            if installed != version:
                wrong[name] = f"{version} locked, {installed} installed"
        self.assertEqual(wrong, {}, "run bin/dev setup")

    def test_help_lists_lock_and_latest(self) -> None:
        """
        C{bin/dev} with no command prints its header, which documents
        C{lock} and C{latest} like the other commands, and exits 2.
        """
        done = subprocess.run([BIN_DEV], capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 2)
        for command in ("lock [pip-compile args]", "latest", "setup", "run", "test"):
            self.assertRegex(done.stdout, rf"(?m)^  bin/dev {re.escape(command)}\s")
