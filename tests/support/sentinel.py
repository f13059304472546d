"""
A local Redis Sentinel deployment for the tests and for trying wsproxy by
hand (C{bin/dev sentinel}): one master, one replica and three sentinels,
each a real C{redis-server} on a loopback port, with everything they write
in one temporary directory.

Sentinel sets the pace of a failover: with C{down-after-milliseconds 1000}
a killed master is subjectively down after a second, objectively down once
a second sentinel agrees, and promoted after a leader is elected, usually
within 2-6 s (a split vote retries after a delay). Every wait here is
therefore a condition polled against a deadline, never a sleep, and a wait
that runs out says what each sentinel saw at that moment.

Starting and stopping are synchronous (for C{setUp} and for C{bin/dev});
the waits a test makes while a daemon and its clients are running are
coroutines (C{await setup.promotion(old)}), so that the reactor keeps
reading the clients' sockets and the daemon's output meanwhile.

Every process is SIGKILLed by L{SentinelSetup.cleanup}, which a test
registers before L{SentinelSetup.start}; a start that fails part-way
cleans up what it had started, and on Linux each process also dies with
the process that started it (C{PR_SET_PDEATHSIG}), so a test runner that
is itself killed leaves no redis-server behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, TypeVar

import redis as redispy
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.trial.unittest import TestCase

from .base import clean_autobahn_timers, free_port
from .redis import redis_server_binary

T = TypeVar("T")

Address = tuple[str, int]

HOST = "127.0.0.1"


def _die_with_parent() -> None:
    """
    In the child, before exec: SIGKILL me when my parent dies (Linux).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


R = TypeVar("R")


def start_rig(test: Any, rig: R) -> R:
    """
    Start C{rig} (a L{SentinelSetup} or a L{tests.support.cluster.ClusterSetup})
    for C{test}; every process of it is stopped at the test's clean-up,
    however the test (or the start) ends.
    """
    test.addCleanup(rig.cleanup)  # type: ignore[attr-defined]
    rig.start()  # type: ignore[attr-defined]
    return rig


class RigTestCase(TestCase):
    """
    Tests on a Sentinel or Cluster rig (real processes, so a generous
    timeout); Autobahn's leftover timers are cleaned up after each.
    """

    timeout = 180

    def setUp(self) -> None:
        self.addCleanup(clean_autobahn_timers)


class Node:
    """
    One redis-server process, a data node (master or replica) or a
    sentinel, that can be killed and started again with the same command
    line on the same port.
    """

    def __init__(self, label: str, port: int, argv: list[str], log: str,
                 username: Optional[str] = None, password: Optional[str] = None) -> None:
        self.label = label
        self.port = port
        self.argv = argv
        self.log = log
        self.username = username
        self.password = password
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.paused = False

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    def __repr__(self) -> str:
        return f"<{self.label} {HOST}:{self.port}>"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def answering(self) -> bool:
        """
        Running and not paused: worth asking.
        """
        return self.alive and not self.paused

    def client(self, timeout: float = 2.0) -> redispy.Redis:
        """
        A client that fails at once on a refused connection (redis-py
        would otherwise retry for seconds); named C{wsproxy-test}, so that
        C{CLIENT LIST} tells the test's connections from the proxy's.
        """
        return redispy.Redis(
            host=HOST, port=self.port, username=self.username, password=self.password,
            socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), client_name="wsproxy-test",
        )

    def call(self, *args: Any, timeout: float = 2.0) -> Any:
        """
        One command on a fresh connection (closed again at once).
        """
        with self.client(timeout) as c:
            return c.execute_command(*args)

    def answers(self) -> bool:
        try:
            return bool(self.call("PING", timeout=1.0))
        except redispy.RedisError:
            return False

    def start(self, timeout: float = 15.0) -> None:
        """
        Start the process and wait until it answers PING.
        """
        assert not self.alive, f"{self} is already running"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent, start_new_session=True,
            )
        wait_blocking(lambda: self.answers() or self._check_running(), timeout,
                      f"{self} to answer PING", lambda: self.log_tail())

    def _check_running(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"{self} exited at start-up:\n{self.log_tail()}")
        return False

    def kill(self) -> None:
        """
        SIGKILL (after SIGCONT, in case it was stopped) and reap it.
        """
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)
                self.process.kill()
            self.process.wait()
        self.paused = False

    def pause(self) -> None:
        """
        SIGSTOP: connections are still accepted (by the kernel), nothing
        is answered.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def role(self) -> Optional[str]:
        """
        C{master}, C{slave} or C{sentinel} as the node says (ROLE), or
        None if it does not answer.
        """
        try:
            reply = self.call("ROLE", timeout=1.0)
        except redispy.RedisError:
            return None
        return _text(reply[0])

    def replicates(self, master: Address) -> bool:
        """
        The node is a replica of C{master} with its link up.
        """
        try:
            reply = self.call("ROLE", timeout=1.0)
        except redispy.RedisError:
            return False
        return (_text(reply[0]) == "slave" and (_text(reply[1]), int(reply[2])) == master
                and _text(reply[3]) == "connected")

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SentinelSetup:
    """
    A master, C{replicas} replicas of it and C{sentinels} sentinels that
    monitor it as C{name} (quorum 2, or 1 with a single sentinel), on free
    loopback ports (or C{ports}: master, replicas, then sentinels).

    C{username}/C{password} protect the data nodes (an ACL user, or the
    default user's password): replicas and sentinels are configured to use
    them. C{sentinel_username}/C{sentinel_password} protect the sentinels
    themselves (and the sentinels use them with each other).
    """

    def __init__(
        self,
        name: str = "wsproxy",
        replicas: int = 1,
        sentinels: int = 3,
        ports: Optional[list[int]] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
        sentinel_username: Optional[str] = None,
        sentinel_password: Optional[str] = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.name = name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.wanted_ports = ports
        self.username = username
        self.password = password
        self.sentinel_username = sentinel_username
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="wsproxy-sentinel-")
        self.data: list[Node] = []
        self.sentinels: list[Node] = []
        #: sentinels outside the quorum that monitor the wrong node
        self.strays: list[Node] = []

    # -- start and stop -----------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """
        Start the master, then the replicas (each synchronised), then the
        sentinels, and wait until every sentinel sees the master, every
        replica and every other sentinel. On failure, everything started is
        stopped again and the error says what was missing.
        """
        try:
            self._start(timeout)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, timeout: float) -> None:
        count = 1 + self.replica_count + self.sentinel_count
        ports = list(self.wanted_ports or [])
        if len(ports) != count:
            assert not ports, f"{count} ports needed, {len(ports)} given"
            ports = _distinct_free_ports(count)
        master = self._data_node("master", ports[0])
        master.start()
        self.data.append(master)
        for i in range(self.replica_count):
            replica = self._data_node(f"replica{i + 1}", ports[1 + i], replica_of=master.port)
            replica.start()
            self.data.append(replica)
        wait_blocking(lambda: all(r.replicates(master.address) for r in self.data[1:]),
                      timeout, "the replicas to synchronise with the master", self.describe)
        quorum = min(2, self.sentinel_count)
        for i in range(self.sentinel_count):
            sentinel = self._sentinel_node(i + 1, ports[1 + self.replica_count + i],
                                           master.port, quorum)
            sentinel.start()
            self.sentinels.append(sentinel)
        wait_blocking(self.sees_everything, timeout,
                      "every sentinel to see the master, its replicas and the other sentinels",
                      self.describe)

    def _data_node(self, label: str, port: int, replica_of: Optional[int] = None) -> Node:
        argv = [redis_server_binary(), "--port", str(port), "--bind", HOST,
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--dbfilename", f"{label}.rdb",
                # a replica's first sync starts at once, not after 5 s
                "--repl-diskless-sync-delay", "0"]
        if self.password is not None:
            if self.username is not None:
                argv += ["--user", self.username, "on", f">{self.password}",
                         "~*", "&*", "+@all", "--masteruser", self.username]
            else:
                argv += ["--requirepass", self.password]
            argv += ["--masterauth", self.password]
        if replica_of is not None:
            argv += ["--replicaof", HOST, str(replica_of)]
        return Node(label, port, argv, os.path.join(self.dir, f"{label}.log"),
                    self.username, self.password)

    def _sentinel_node(self, number: int, port: int, master_port: int, quorum: int,
                       label: Optional[str] = None) -> Node:
        label = label or f"sentinel{number}"
        n = self.name
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {self.dir}",
            f"logfile {os.path.join(self.dir, label + '.log')}",
            f"sentinel monitor {n} {HOST} {master_port} {quorum}",
            f"sentinel down-after-milliseconds {n} {self.down_after_ms}",
            f"sentinel failover-timeout {n} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {n} 1",
        ]
        if self.password is not None:
            if self.username is not None:
                lines.append(f"sentinel auth-user {n} {self.username}")
            lines.append(f"sentinel auth-pass {n} {self.password}")
        if self.sentinel_password is not None:
            if self.sentinel_username is not None:
                lines += [
                    "user default off",
                    f"user {self.sentinel_username} on >{self.sentinel_password} "
                    "~* &* +@all",
                    f"sentinel sentinel-user {self.sentinel_username}",
                ]
            else:
                lines.append(f"requirepass {self.sentinel_password}")
            lines.append(f"sentinel sentinel-pass {self.sentinel_password}")
        # Sentinel rewrites its configuration file: each needs its own
        conf = os.path.join(self.dir, f"{label}.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        return Node(label, port, [redis_server_binary(), conf, "--sentinel"],
                    os.path.join(self.dir, label + ".log"),
                    self.sentinel_username, self.sentinel_password)

    def cleanup(self) -> None:
        """
        SIGKILL every process and remove the directory; safe to call at
        any point, and more than once.
        """
        for node in self.strays + self.sentinels + self.data:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the sentinels say ---------------------------------------------

    def addresses(self) -> str:
        """
        The sentinels' addresses as C{REDIS_SENTINELS} takes them.
        """
        return ",".join(f"{HOST}:{s.port}" for s in self.sentinels)

    def node_at(self, address: Address) -> Node:
        for node in self.data:
            if node.address == address:
                return node
        raise KeyError(f"no data node at {address}")

    def reported(self) -> dict[Node, Optional[Address]]:
        """
        Each live sentinel's answer to C{GET-MASTER-ADDR-BY-NAME} (None if
        it does not answer or does not know the name).
        """
        views: dict[Node, Optional[Address]] = {}
        for sentinel in self.sentinels:
            if not sentinel.answering:
                continue
            try:
                reply = sentinel.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name,
                                      timeout=1.0)
            except redispy.RedisError:
                reply = None
            views[sentinel] = (_text(reply[0]), int(reply[1])) if reply else None
        return views

    def agreed_master(self) -> Optional[Address]:
        """
        The master's address if every live sentinel reports the same one.
        """
        views = set(self.reported().values())
        if len(views) == 1:
            return views.pop()
        return None

    def master(self) -> Node:
        """
        The current master, as the sentinels report it (all agreeing), and
        answering ROLE as a master.
        """
        address = self.agreed_master()
        if address is None:
            raise AssertionError(f"the sentinels do not agree on a master:\n{self.describe()}")
        node = self.node_at(address)
        if node.role() != "master":
            raise AssertionError(f"{node} is reported as master but says {node.role()!r}")
        return node

    def sees_everything(self) -> bool:
        """
        Every live sentinel reports the master, knows every replica (not
        down, link up), and every other live sentinel.
        """
        live = [s for s in self.sentinels if s.answering]
        try:
            master = self.agreed_master()
            if master is None or self.node_at(master).role() != "master":
                return False
            replicas = {n.address for n in self.data if n.address != master and n.alive}
            for sentinel in live:
                seen = {
                    (_text(r[b"ip"]), int(r[b"port"])) for r in map(_pairs, sentinel.call(
                        "SENTINEL", "REPLICAS", self.name))
                    if not {"s_down", "o_down", "disconnected"} & set(
                        _text(r[b"flags"]).split(","))
                }
                if seen != replicas:
                    return False
                others = sentinel.call("SENTINEL", "SENTINELS", self.name)
                if len(others) < len(live) - 1:
                    return False
        except redispy.RedisError:
            return False
        return True

    def describe(self) -> str:
        """
        What every node says now, for a failure message.
        """
        lines = []
        for node in self.data:
            lines.append(f"{node}: {'running' if node.alive else 'not running'}, "
                         f"role {node.role()!r}")
        for sentinel in self.sentinels + self.strays:
            if not sentinel.answering:
                lines.append(f"{sentinel}: {'paused' if sentinel.alive else 'not running'}")
                continue
            try:
                info = _pairs(sentinel.call("SENTINEL", "MASTER", self.name, timeout=1.0))
                state = sentinel.call("INFO", "sentinel", timeout=1.0)
                lines.append(
                    f"{sentinel}: master {_text(info[b'ip'])}:{_text(info[b'port'])} "
                    f"flags={_text(info[b'flags'])} "
                    f"replicas={_text(info[b'num-slaves'])} "
                    f"other-sentinels={_text(info[b'num-other-sentinels'])} "
                    f"epoch={_text(info[b'config-epoch'])} "
                    f"tilt={state.get('sentinel_tilt') if isinstance(state, dict) else state}"
                )
            except (redispy.RedisError, KeyError, IndexError) as e:
                lines.append(f"{sentinel}: {e!r}")
            lines.append("  " + sentinel.log_tail(6).strip().replace("\n", "\n  "))
        return "\n".join(lines)

    # -- faults -------------------------------------------------------------

    def kill_master(self) -> Node:
        """
        SIGKILL the current master; returns its node (to restart later).
        """
        node = self.master()
        node.kill()
        return node

    def kill_sentinel(self, index: int = 0) -> Node:
        sentinel = self.sentinels[index]
        sentinel.kill()
        return sentinel

    def start_stray(self, monitored: Node) -> Node:
        """
        One more sentinel, on its own (quorum 1), that monitors
        C{monitored} (e.g. the replica) under the same name: it answers
        C{GET-MASTER-ADDR-BY-NAME} with an address that is not the
        master's, as a misconfigured or long-partitioned sentinel would.
        It stays out of L{reported} and L{agreed_master}.
        """
        number = len(self.strays) + 1
        stray = self._sentinel_node(number, _distinct_free_ports(1)[0], monitored.port, 1,
                                    label=f"stray{number}")
        self.strays.append(stray)
        stray.start()
        return stray

    def restart(self, node: Node) -> None:
        """
        Start a killed node again, with its original command line: a
        killed master comes back empty and believing it is a master, until
        the sentinels turn it into a replica of the new one (see
        L{demoted}).
        """
        node.start()

    async def failover(self, timeout: float = 30.0) -> Node:
        """
        C{SENTINEL FAILOVER} (graceful: the master is still up) on the
        first live sentinel; returns the master it was at that moment.
        Asked again while the sentinel has no suitable replica yet
        (C{NOGOODSLAVE}, e.g. right after a previous failover).
        """
        old = self.master()
        sentinel = next(s for s in self.sentinels if s.answering)
        last: list[Exception] = []

        def ask() -> bool:
            try:
                return bool(sentinel.call("SENTINEL", "FAILOVER", self.name))
            except redispy.ResponseError as e:
                if "NOGOODSLAVE" not in str(e):
                    raise
                last[:] = [e]
                return False

        await wait(ask, timeout, f"{sentinel} to accept SENTINEL FAILOVER",
                   lambda: f"last refusal: {last}\n{self.describe()}")
        return old

    async def lose_master(self, graceful: bool) -> Node:
        """
        C{SENTINEL FAILOVER} (C{graceful}) or SIGKILL of the master (not),
        then the new master once it is promoted (L{promotion}).
        """
        old = await self.failover() if graceful else self.kill_master()
        return await self.promotion(old.address)

    # -- waits --------------------------------------------------------------

    def promoted_from(self, old: Address) -> Optional[Node]:
        """
        The new master, once every live sentinel reports the same master
        other than C{old} and that node says it is a master.
        """
        address = self.agreed_master()
        if address is None or address == old:
            return None
        node = self.node_at(address)
        return node if node.role() == "master" else None

    async def promotion(self, old: Address, timeout: float = 60.0) -> Node:
        """
        Wait for L{promoted_from}.
        """
        node: Node = await wait(lambda: self.promoted_from(old), timeout,
                                f"a master other than {old[0]}:{old[1]}", self.describe)
        return node

    async def demoted(self, node: Node, timeout: float = 90.0) -> Node:
        """
        Wait until C{node} (e.g. a restarted old master) is a replica of
        the current master with its link up; returns that master. The
        sentinels reconfigure a returning old master after seeing it
        claim to be a master for a while (about 8-20 s in Redis 7).
        """
        def check() -> Optional[Node]:
            master = self.agreed_master()
            if master is not None and master != node.address and node.replicates(master):
                return self.node_at(master)
            return None

        master: Node = await wait(check, timeout, f"{node} to become a replica",
                                  self.describe)
        return master


def _pairs(flat: Any) -> dict[bytes, Any]:
    """
    A Sentinel reply of alternating names and values as a dict (redis-py
    returns some already parsed).
    """
    if isinstance(flat, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in flat.items()}
    return dict(zip(flat[::2], flat[1::2]))


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _poll(condition: Callable[[], Optional[T]], errors: list[BaseException]) -> Optional[T]:
    try:
        return condition()
    except redispy.RedisError as e:
        # a node that is down or failing over is "not yet"; the error is
        # kept for the timeout's message
        errors[:] = [e]
        return None


def _timed_out(timeout: float, what: str, describe: Optional[Callable[[], str]],
               errors: list[BaseException]) -> AssertionError:
    details = describe() if describe is not None else ""
    last = f"\nlast error: {errors[0]!r}" if errors else ""
    return AssertionError(f"waited {timeout:g}s for {what}{last}\n{details}")


def wait_blocking(condition: Callable[[], Optional[T]], timeout: float, what: str,
                  describe: Optional[Callable[[], str]] = None,
                  interval: float = 0.05) -> T:
    """
    Poll C{condition} (Redis errors count as not yet) until it returns a
    true value, which is returned; after C{timeout} seconds, raise an
    AssertionError naming C{what} with C{describe()}.
    """
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout
    while True:
        value = _poll(condition, errors)
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, describe, errors)
        time.sleep(interval)


async def wait(condition: Callable[[], Optional[T]], timeout: float, what: str,
               describe: Optional[Callable[[], str]] = None, interval: float = 0.05) -> T:
    """
    L{wait_blocking} for a running reactor: the reactor runs between polls.
    """
    from twisted.internet import reactor, task

    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout
    while True:
        value = _poll(condition, errors)
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, describe, errors)
        await task.deferLater(reactor, interval, lambda: None)


# -- bin/dev sentinel ---------------------------------------------------------

DEV_PORTS = [6380, 6381, 26379, 26380, 26381]


def run_dev_setup(
    command: str,
    argv: list[str],
    dev_ports: list[int],
    make: Callable[[Optional[list[int]]], Any],
    starting: str,
    describe: Callable[[Any], str],
    running: Callable[[Any], bool],
    ended: str,
) -> int:
    """
    What C{bin/dev sentinel} and C{bin/dev cluster} share: take the fixed
    ports (or, with C{--free-ports}, any), start the set-up C{make(ports)}
    in the foreground, print C{describe(setup)}, and stop everything on
    SIGINT, SIGTERM or SIGHUP, or once C{running(setup)} is false.

    @return: the exit status: 0 when stopped, 1 when a process ended or a
        port is in use, 2 for a usage error.
    """
    if argv not in ([], ["--free-ports"]):
        print(f"usage: bin/dev {command} [--free-ports]", file=sys.stderr)
        return 2
    ports = None if argv else dev_ports
    if ports is not None:
        taken = [p for p in ports if not _bindable(p)]
        if taken:
            print(f"bin/dev {command}: port {', '.join(map(str, taken))} in use on {HOST} "
                  "(use --free-ports)", file=sys.stderr)
            return 1

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    setup = make(ports)
    try:
        print(f"bin/dev {command}: starting {starting} (files in {setup.dir})",
              file=sys.stderr, flush=True)
        setup.start()
        print(describe(setup), flush=True)
        while running(setup):
            time.sleep(0.5)
        print(f"bin/dev {command}: {ended}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        setup.cleanup()
        print(f"bin/dev {command}: stopped", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """
    C{bin/dev sentinel [--free-ports]}: run a master, a replica and three
    sentinels in the foreground until SIGINT or SIGTERM, and print the
    variables that point wsproxy at them.
    """

    def describe(setup: SentinelSetup) -> str:
        master = setup.master()
        replica = next(n for n in setup.data if n is not master)
        return (
            f"master  {HOST}:{master.port}\n"
            f"replica {HOST}:{replica.port}\n"
            f"sentinels {setup.addresses()} (monitoring {setup.name!r})\n"
            "\n"
            "Run wsproxy against them (REDIS_URL's host and port are not used):\n"
            "\n"
            f"  REDIS_SENTINELS={setup.addresses()} REDIS_SENTINEL_MASTER={setup.name} "
            "bin/dev run\n"
            "\n"
            "Then fail over, and see where the master went:\n"
            "\n"
            f"  redis-cli -p {setup.sentinels[0].port} SENTINEL FAILOVER {setup.name}"
            "            # graceful\n"
            f"  redis-cli -p {master.port} SHUTDOWN NOSAVE"
            "                        # kill the master (this one at first)\n"
            f"  redis-cli -p {setup.sentinels[0].port} SENTINEL GET-MASTER-ADDR-BY-NAME "
            f"{setup.name}\n"
            "\n"
            "Ctrl-C stops everything."
        )

    return run_dev_setup(
        "sentinel", argv, DEV_PORTS, lambda ports: SentinelSetup(ports=ports),
        "a master, a replica and three sentinels", describe,
        lambda setup: all(s.alive for s in setup.sentinels), "a sentinel exited",
    )


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        # as redis-server binds: a port in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
