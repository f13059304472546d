"""
C{WORKERS}: how the supervisor sums its workers' metrics (unit tests), and
the real thing, C{python -m wsproxy} with C{WORKERS=2} against a real
redis-server: connections spread over both workers, one scrape shows the
totals, a killed worker is replaced by one that serves, and no worker
outlives its supervisor.

Which worker holds a connection is read from C{/proc} (Linux): the worker
whose file descriptors include the server side of that TCP connection.
"""

from __future__ import annotations

import json
import os
import tempfile
import signal
import socket
import struct
import time
from collections import Counter
from typing import Any, Optional

import jwt as pyjwt
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from wsproxy.config import Settings
from wsproxy.metrics import Stats, merge, monotonic_part, render
from wsproxy.edge.site import Root
from wsproxy.process.workers import Supervisor, SupervisorLink, _Worker, _WorkerLink

from .support import (
    RawClient,
    RedisTestCase,
    attempt,
    connect,
    daemon_env,
    start_daemon,
    status_of,
    upgrade_request,
    wait_for,
)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a Prometheus text exposition, by name and labels.
    """
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(text: bytes, name: str, **labels: str) -> Optional[float]:
    return samples(text).get((name, tuple(sorted(labels.items()))))


class MergeTests(SynchronousTestCase):
    def stats(self, open_connections: int, down: int, rtt: float, auth: float) -> Stats:
        stats = Stats()
        stats.open_connections = open_connections
        stats.messages_down = down
        stats.outcomes["accepted"] = open_connections
        stats.canary_rtt = lambda: rtt
        stats.auth_latency.observe(auth)
        return stats

    def test_sum(self) -> None:
        """
        Counters, histogram buckets and gauges add up over workers; the
        canary round trip is the worst worker's; labels missing from one
        worker are kept; a JSON round trip (the channel) changes nothing.
        """
        a = self.stats(2, 5, 0.1, 0.002)
        b = self.stats(3, 7, 0.4, 0.3)
        b.outcomes["403"] = 1
        text = render(merge([json.loads(json.dumps(a.snapshot())), b.snapshot()]))
        self.assertEqual(value(text, "wsproxy_connections_open"), 5)
        self.assertEqual(value(text, "wsproxy_messages_down_total"), 12)
        self.assertEqual(value(text, "wsproxy_connections_total", outcome="accepted"), 5)
        self.assertEqual(value(text, "wsproxy_connections_total", outcome="403"), 1)
        self.assertEqual(value(text, "wsproxy_canary_rtt_seconds"), 0.4)
        self.assertEqual(value(text, "wsproxy_auth_check_seconds_count"), 2)
        self.assertEqual(value(text, "wsproxy_auth_check_seconds_bucket", le="0.0025"), 1)
        self.assertEqual(value(text, "wsproxy_auth_check_seconds_bucket", le="0.5"), 2)
        self.assertAlmostEqual(value(text, "wsproxy_auth_check_seconds_sum"), 0.302)

    def test_one_worker_renders_as_itself(self) -> None:
        """
        The sum of one snapshot is byte for byte what that process serves.
        """
        stats = self.stats(2, 5, 0.1, 0.002)
        self.assertEqual(render(merge([stats.snapshot()])), stats.render())

    def test_monotonic_part(self) -> None:
        """
        What an exited worker leaves behind: its counters and histograms,
        not its gauges.
        """
        kept = render(merge([monotonic_part(self.stats(2, 5, 0.1, 0.002).snapshot())]))
        self.assertEqual(value(kept, "wsproxy_messages_down_total"), 5)
        self.assertEqual(value(kept, "wsproxy_auth_check_seconds_count"), 1)
        self.assertIsNone(value(kept, "wsproxy_connections_open"))
        self.assertIsNone(value(kept, "wsproxy_canary_rtt_seconds"))


class FakeLink:
    def refresh(self) -> defer.Deferred:
        return defer.succeed(None)


class FakeWorker:
    def __init__(self, index: int, stats: Stats) -> None:
        self.index = index
        self.link = FakeLink()
        self.snapshot = stats.snapshot()
        self.ended: defer.Deferred = defer.Deferred()


class SupervisorMetricsTests(SynchronousTestCase):
    def test_counters_survive_a_worker(self) -> None:
        """
        When a worker exits, its counters (as of its last snapshot) stay in
        the sum, so no counter goes backwards; its open connections leave
        the gauge; the restart is counted.
        """
        supervisor = Supervisor(Settings(workers=2), Clock(), [])
        stats = [Stats(), Stats()]
        for i, s in enumerate(stats):
            s.open_connections = 2
            s.messages_down = 10 * (i + 1)
            supervisor.workers[i] = (FakeWorker(i, s), None)  # type: ignore[assignment]
        before = self.successResultOf(defer.ensureDeferred(supervisor.metrics()))
        self.assertEqual(value(before, "wsproxy_messages_down_total"), 30)
        self.assertEqual(value(before, "wsproxy_connections_open"), 4)
        self.assertEqual(value(before, "wsproxy_workers"), 2)

        dead = supervisor.workers[1][0]
        supervisor._ended(dead, "killed")  # type: ignore[arg-type]
        after = self.successResultOf(defer.ensureDeferred(supervisor.metrics()))
        self.assertEqual(value(after, "wsproxy_messages_down_total"), 30)
        self.assertEqual(value(after, "wsproxy_connections_open"), 2)
        self.assertEqual(value(after, "wsproxy_workers"), 1)
        self.assertEqual(value(after, "wsproxy_worker_restarts_total"), 1)

        # its replacement starts from zero and adds to the total
        fresh = Stats()
        fresh.messages_down = 1
        supervisor.workers[1] = (FakeWorker(1, fresh), None)  # type: ignore[assignment]
        later = self.successResultOf(defer.ensureDeferred(supervisor.metrics()))
        self.assertEqual(value(later, "wsproxy_messages_down_total"), 31)


def frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack("!I", len(data)) + data


def sent(transport: StringTransport) -> list[dict[str, Any]]:
    """
    The messages written to C{transport} so far (and clear it).
    """
    data, messages = transport.value(), []
    transport.clear()
    while data:
        (length,) = struct.unpack("!I", data[:4])
        messages.append(json.loads(data[4:4 + length]))
        data = data[4 + length:]
    return messages


class FakeService:
    stopping = False

    def __init__(self) -> None:
        self.stopped = 0

    def stop_without_drain(self) -> None:
        self.stopped += 1


class SupervisorLinkTests(SynchronousTestCase):
    """
    The worker's end of the channel, over an in-memory transport.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = Stats()
        self.stats.messages_down = 4
        self.link = SupervisorLink(self.stats.snapshot, self.clock)
        self.service = FakeService()
        self.link.service = self.service  # type: ignore[assignment]
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)

    def test_answers_snapshot_requests(self) -> None:
        """
        The supervisor's request for counters is answered at once with this
        worker's snapshot.
        """
        self.link.dataReceived(frame({"op": "snapshot", "id": 7}))
        self.assertEqual(
            sent(self.transport),
            [{"op": "snapshot", "id": 7, "metrics": self.stats.snapshot()}],
        )

    def test_scrape_serves_the_supervisors_sum(self) -> None:
        """
        A scrape asks the supervisor and fires with the text it sends back.
        """
        d = self.link.scrape()
        self.assertEqual(sent(self.transport), [{"op": "scrape", "id": 0}])
        self.assertNoResult(d)
        self.link.dataReceived(frame({"op": "metrics", "id": 0, "text": "total 9\n"}))
        self.assertEqual(self.successResultOf(d), b"total 9\n")

    def test_failures_reported_once_per_turn(self) -> None:
        """
        Failed token checks are reported to the supervisor in one message
        per reactor turn, counted per address; a "limit" from the supervisor
        limits the address in this worker's table.
        """
        from wsproxy.session.limits import FailedAuthLimit

        table = FailedAuthLimit(self.clock, 5, 60, 100)
        self.link.auth_limit = table
        for address in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.1"):
            self.link.auth_failed(address)
        self.assertEqual(sent(self.transport), [])
        self.clock.advance(0)
        self.assertEqual(sent(self.transport), [
            {"op": "failed", "addresses": {"192.0.2.1": 3, "192.0.2.2": 1}}])
        self.link.dataReceived(frame({"op": "limit", "address": "192.0.2.7", "left": 30.0}))
        self.assertEqual(table.retry_after("192.0.2.7"), 30)

    def test_scrape_times_out(self) -> None:
        """
        A supervisor that does not answer within scrape_timeout fails the
        scrape (the worker answers 503) rather than letting it hang.
        """
        d = self.link.scrape()
        self.clock.advance(self.link.scrape_timeout)
        self.failureResultOf(d, defer.TimeoutError)

    def test_supervisor_gone(self) -> None:
        """
        The channel's end: pending and later scrapes fail, and the worker
        is stopped without drain window, with a warning.
        """
        d = self.link.scrape()
        with capturedLogs() as events:
            self.link.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(d, error.ConnectionLost)
        self.failureResultOf(self.link.scrape(), error.ConnectionLost)
        self.assertEqual(self.service.stopped, 1)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])

    def test_own_shutdown_is_not_news(self) -> None:
        """
        When the worker is already shutting down (its reactor closes the
        channel at the end), nothing is logged.
        """
        self.service.stopping = True
        with capturedLogs() as events:
            self.link.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(events, [])


class SupervisorChannelTests(SynchronousTestCase):
    """
    The supervisor's end of the channel: a scrape from one worker collects
    fresh counters from every worker.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.supervisor = Supervisor(Settings(workers=2), self.clock, [])
        self.transports = []
        for index in range(2):
            worker = _Worker(self.supervisor, index)
            worker.link = _WorkerLink(self.supervisor, worker)
            transport = StringTransport()
            worker.link.makeConnection(transport)
            self.transports.append(transport)
            self.supervisor.workers[index] = (worker, None)

    def link(self, index: int) -> _WorkerLink:
        link = self.supervisor.workers[index][0].link
        assert link is not None
        return link

    def snapshot(self, down: int) -> Any:
        stats = Stats()
        stats.messages_down = down
        return stats.snapshot()

    def test_scrape_collects_every_worker(self) -> None:
        """
        Worker 1 asks for the metrics: both workers are asked for their
        counters, and once both have answered worker 1 gets the sum.
        """
        self.link(1).dataReceived(frame({"op": "scrape", "id": 5}))
        requests = [sent(t) for t in self.transports]
        self.assertEqual([[m["op"] for m in r] for r in requests], [["snapshot"], ["snapshot"]])
        self.link(0).dataReceived(frame(
            {"op": "snapshot", "id": requests[0][0]["id"], "metrics": self.snapshot(3)}))
        self.assertEqual(sent(self.transports[1]), [])
        self.link(1).dataReceived(frame(
            {"op": "snapshot", "id": requests[1][0]["id"], "metrics": self.snapshot(4)}))
        (answer,) = sent(self.transports[1])
        self.assertEqual((answer["op"], answer["id"]), ("metrics", 5))
        self.assertEqual(value(answer["text"].encode(), "wsproxy_messages_down_total"), 7)

    def test_failures_counted_over_workers(self) -> None:
        """
        AUTH_FAIL_LIMIT=5: an address with 3 failures in worker 0 and 2 in
        worker 1 is limited in both workers, once; an address under the
        limit is not.
        """
        self.supervisor.auth_limit.limit = 5
        self.link(0).dataReceived(frame(
            {"op": "failed", "addresses": {"192.0.2.1": 3, "192.0.2.2": 1}}))
        self.assertEqual([sent(t) for t in self.transports], [[], []])
        self.clock.advance(7)
        self.link(1).dataReceived(frame({"op": "failed", "addresses": {"192.0.2.1": 2}}))
        limit = {"op": "limit", "address": "192.0.2.1", "left": 53.0}
        self.assertEqual([sent(t) for t in self.transports], [[limit], [limit]])
        self.link(1).dataReceived(frame({"op": "failed", "addresses": {"192.0.2.1": 1}}))
        self.assertEqual([sent(t) for t in self.transports], [[], []])

    def test_silent_worker_contributes_its_previous_counters(self) -> None:
        """
        A worker that does not answer within refresh_timeout does not hold
        the scrape up: its previous snapshot is used, with a warning.
        """
        self.supervisor.workers[0][0].snapshot = self.snapshot(10)
        d = defer.ensureDeferred(self.supervisor.metrics())
        request = sent(self.transports[1])[0]
        self.link(1).dataReceived(frame(
            {"op": "snapshot", "id": request["id"], "metrics": self.snapshot(1)}))
        self.assertNoResult(d)
        with capturedLogs() as events:
            self.clock.advance(_WorkerLink.refresh_timeout)
        self.assertEqual(value(self.successResultOf(d), "wsproxy_messages_down_total"), 11)
        self.assertEqual([e["index"] for e in events if e["log_level"] is LogLevel.warn], [0])


class MetricsUnavailableTests(SynchronousTestCase):
    def test_503(self) -> None:
        """
        When the metrics cannot be had (the supervisor did not answer),
        /metrics answers 503 rather than one worker's partial numbers.
        """
        root = Root(None, object(), lambda: defer.fail(defer.TimeoutError()))  # type: ignore[arg-type]
        request = DummyRequest([b"metrics"])
        request.path = b"/metrics"
        with capturedLogs():
            self.assertEqual(root.render(request), NOT_DONE_YET)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(b"".join(request.written), b"Metrics unavailable\n")


# -- processes ---------------------------------------------------------------


def start_time(pid: int) -> Optional[int]:
    """
    When process C{pid} started (clock ticks since boot), or None if it
    does not exist or has exited (a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    # fields[0] is the state (field 3 of proc(5)), fields[19] the start time
    return None if fields[0] in ("Z", "X") else int(fields[19])


def children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(child) for child in f.read().split()}
    except FileNotFoundError:
        return set()


def _server_socket_inode(server_port: int, client_port: int) -> Optional[str]:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (int(local.rsplit(":", 1)[1], 16) == server_port
                        and int(remote.rsplit(":", 1)[1], 16) == client_port):
                    return inode
    return None


def owner(server_port: int, client_port: int, pids: set[int]) -> Optional[int]:
    """
    Which of C{pids} holds the server side of the TCP connection from
    C{client_port} (None while no process has accepted it).
    """
    inode = _server_socket_inode(server_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except FileNotFoundError:
                pass
    return None


class WorkerDaemon:
    """
    C{python -m wsproxy} with C{WORKERS=2}, and every worker process seen
    under it (by pid and start time, so that cleanup never signals a pid
    the system has reused).
    """

    def __init__(self, test: RedisTestCase, **env: str) -> None:
        base = daemon_env(test.redis.url, WORKERS="2", SHUTDOWN_GRACE_PERIOD_SECS="5")
        base.update(env)
        self.daemon = start_daemon(test, base)
        self.pid = int(self.daemon.process.pid)
        self.seen: set[tuple[int, int]] = set()
        self.port = 0
        test.addCleanup(self.cleanup)

    def workers(self) -> set[int]:
        """
        The supervisor's worker processes now (remembered for cleanup).
        """
        pids = {pid for pid in children(self.pid) if start_time(pid) is not None}
        for pid in pids:
            started = start_time(pid)
            if started is not None:
                self.seen.add((pid, started))
        return pids

    async def start(self) -> int:
        """
        Fires with the port once both workers listen and have Redis.
        """
        self.port = await self.daemon.port()
        await wait_for(lambda: self.daemon.out.output.count(b"subscriber connection ready") >= 2,
                       timeout=20)
        await wait_for(lambda: len(self.workers()) == 2)
        return self.port

    async def owner_of(self, client_port: int) -> int:
        """
        The worker that accepted the connection from C{client_port}.
        """
        return int(await wait_for(lambda: owner(self.port, client_port, self.workers())))

    async def get(self, path: str) -> tuple[int, bytes, int]:
        """
        GET C{path} over a fresh connection: the status, the body and the
        worker that answered.
        """
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        client = await endpoint.connect(protocol.Factory.forProtocol(RawClient))
        pid = await self.owner_of(client.transport.getHost().port)
        client.send(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        await client.lost
        response = client.data
        return status_of(response), response.partition(b"\r\n\r\n")[2], pid

    async def upgrade(self, token: str, source: str = "127.0.0.1") -> tuple[int, int]:
        """
        The status of one upgrade of session s1 with C{token} from the
        address C{source}, and the worker that answered it.
        """
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
        client: RawClient = await endpoint.connect(protocol.Factory.forProtocol(RawClient))
        pid = await self.owner_of(client.transport.getHost().port)
        client.send(upgrade_request("/a/ws/s1", {"Authorization": f"Bearer {token}"}))
        await wait_for(lambda: b"\r\n\r\n" in client.data or client.lost_at is not None, 20)
        client.transport.abortConnection()
        return status_of(client.data), pid

    async def clients_on_every_worker(self, r: Any, per_worker: int,
                                      prefix: str = "s") -> dict[Any, int]:
        """
        Open clients (each on its own session, token "tok") until every
        worker holds at least C{per_worker}; fires with {client: worker}.
        """
        owners: dict[Any, int] = {}
        for n in range(100):
            counts = Counter(owners.values())
            workers = self.workers()
            if len(counts) == len(workers) and min(counts.values()) >= per_worker:
                return owners
            session = f"{prefix}{n}"
            r.set(f"session:{session}:auth", "tok", ex=60)
            client = await connect(f"ws://127.0.0.1:{self.port}/a/ws/{session}", token="tok")
            client.session = session
            owners[client] = await self.owner_of(client.transport.getHost().port)
        raise AssertionError(f"100 connections did not reach every worker: {owners.values()}")

    async def cleanup(self) -> None:
        """
        Kill the supervisor and every worker seen, and wait until all are
        gone.
        """
        if not self.daemon.out.ended.called:
            self.workers()
        self.daemon.kill()
        for pid, started in self.seen:
            if start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: all(start_time(pid) != started for pid, started in self.seen))
        await self.daemon.stop()


class WorkerProcessTests(RedisTestCase):
    timeout = 120

    async def test_workers_share_port_restart_and_stop(self) -> None:
        """
        WORKERS=2: two worker processes serve one port; a worker that dies
        is restarted; SIGTERM on the parent gives every client 1001 and the
        parent exits 0.
        """
        daemon = WorkerDaemon(self)
        port = await daemon.start()
        workers = daemon.workers()
        r = self.r
        r.set("session:w:auth", "tok", ex=60)
        clients = [await connect(f"ws://127.0.0.1:{port}/a/ws/w", token="tok") for _ in range(6)]
        r.publish("session:w:down", "to all")
        for c in clients:
            await c.wait_messages(1)

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: victim not in daemon.workers() and len(daemon.workers()) == 2,
                       timeout=20)
        await wait_for(lambda: b"worker 0 exited" in daemon.daemon.out.output
                       or b"worker 1 exited" in daemon.daemon.out.output)
        survivors = [c for c in clients if c.state == c.STATE_OPEN]
        fresh = [await connect(f"ws://127.0.0.1:{port}/a/ws/w", token="tok") for _ in range(4)]
        open_clients = [c for c in survivors + fresh if c.state == c.STATE_OPEN]
        self.assertGreaterEqual(len(fresh), 4)

        daemon.daemon.signal(signal.SIGTERM)
        codes = [(await c.factory.closed)[0] for c in open_clients]
        self.assertEqual(set(codes), {1001})
        self.assertEqual(await daemon.daemon.out.ended, 0)
        self.assertIn(b"all workers stopped", daemon.daemon.out.output)

    async def test_failed_authorization_counted_over_workers(self) -> None:
        """
        AUTH_FAIL_LIMIT=6 with two workers: six failures from 127.0.0.2,
        however the kernel spread them over the workers (neither need have
        seen six), limit the address in both: each then answers 429, even to
        a valid token. (Counting per worker, a valid token would be admitted
        by any worker that saw fewer than six.)
        """
        daemon = WorkerDaemon(self, AUTH_FAIL_LIMIT="6")
        port = await daemon.start()
        self.r.set("session:s1:auth", "tok", ex=300)

        async def answer(token: str) -> tuple[int, int]:
            """The status of one upgrade from 127.0.0.2, and its worker."""
            return await daemon.upgrade(token, "127.0.0.2")

        failures: Counter[int] = Counter()
        for _ in range(6):
            status, pid = await answer("wrong")
            self.assertEqual(status, 403)
            failures[pid] += 1
        # every worker answers 429 (once the supervisor's word has arrived)
        last: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while (len(last) < 2 or set(last.values()) != {429}) and time.monotonic() < deadline:
            status, pid = await answer("tok")
            last[pid] = status
        self.assertEqual(last, {pid: 429 for pid in daemon.workers()},
                         f"failures per worker {dict(failures)}")
        self.assertEqual((await attempt(port, "127.0.0.3", "tok"))[0], 101)

    async def test_sighup_reloads_keys_in_every_worker(self) -> None:
        """
        AUTH_MODE=jwt with WORKERS=2: SIGHUP to the supervisor reaches both
        workers, and each admits tokens signed with the secret added to
        JWT_SECRET_FILE (whichever worker a connection lands on).
        """
        path = os.path.join(tempfile.mkdtemp(), "secrets")
        with open(path, "w") as f:
            f.write("old-secret-of-at-least-32-bytes!!!\n")
        daemon = WorkerDaemon(self, AUTH_MODE="jwt", JWT_SECRET_FILE=path)
        await daemon.start()
        fresh = pyjwt.encode({"session_id": "s1", "iat": int(time.time())},
                             "new-secret-of-at-least-32-bytes!!!", algorithm="HS256")

        self.assertEqual((await daemon.upgrade(fresh))[0], 403)
        with open(path, "w") as f:
            f.write("new-secret-of-at-least-32-bytes!!!\n")
        os.kill(daemon.pid, signal.SIGHUP)
        await wait_for(lambda: daemon.daemon.out.output.count(b"keys reloaded") >= 2, timeout=20)
        statuses: dict[int, set[int]] = {}
        deadline = time.monotonic() + 30
        while len(statuses) < 2 and time.monotonic() < deadline:
            status, pid = await daemon.upgrade(fresh)
            statuses.setdefault(pid, set()).add(status)
        self.assertEqual(statuses, {pid: {101} for pid in daemon.workers()})

    async def test_connections_wait_for_a_restarting_worker(self) -> None:
        """
        Each worker has its own listening socket, kept by the supervisor:
        connections the kernel queues on a killed worker's socket before
        its replacement runs wait for the replacement, which takes them once
        its Redis connections are ready: all twenty clients, connecting at
        once right after the kill, are admitted (101), some by the new
        worker.
        """
        daemon = WorkerDaemon(self)
        port = await daemon.start()
        old = daemon.workers()
        os.kill(sorted(old)[0], signal.SIGKILL)
        sessions = [f"q{n}" for n in range(20)]
        for session in sessions:
            self.r.set(f"session:{session}:auth", "tok", ex=60)
        clients = await defer.gatherResults([
            connect(f"ws://127.0.0.1:{port}/a/ws/{session}", token="tok") for session in sessions
        ])
        for client in clients:
            self.addCleanup(client.close_and_wait)
        owners = {await daemon.owner_of(c.transport.getHost().port) for c in clients}
        self.assertTrue(owners - old, f"no client reached the replacement: {owners}, {old}")

    async def test_one_scrape_shows_every_worker(self) -> None:
        """
        With clients on both workers and messages through both, every
        /metrics scrape, whichever worker answers it, shows the instance's
        totals: open connections of all clients, every message delivered
        and published, both workers running.
        """
        daemon = WorkerDaemon(self)
        await daemon.start()
        r = self.r
        owners = await daemon.clients_on_every_worker(r, per_worker=2)
        clients = list(owners)
        self.assertEqual(len(set(owners.values())), 2)
        up = r.pubsub(ignore_subscribe_messages=True)
        self.addCleanup(up.close)
        up.psubscribe("session:*:up")
        up.get_message(timeout=1)

        for c in clients:
            for i in range(3):
                r.publish(f"session:{c.session}:down", f"down-{i}")
        for c in clients:
            await c.wait_messages(3)
            c.sendMessage(b"up-1")
            c.sendMessage(b"up-22")
        published: list[Any] = []

        def all_published() -> bool:
            while (message := up.get_message(timeout=0)) is not None:
                published.append(message)
            return len(published) == 2 * len(clients)

        await wait_for(all_published)

        n = len(clients)
        answered: Counter[int] = Counter()
        deadline = time.monotonic() + 30
        while len(answered) < 2 or min(answered.values()) < 3:
            self.assertLess(time.monotonic(), deadline, f"scrapes answered by {answered}")
            status, body, pid = await daemon.get("/metrics")
            answered[pid] += 1
            self.assertEqual(status, 200)
            self.assertEqual(value(body, "wsproxy_connections_open"), n)
            self.assertEqual(value(body, "wsproxy_connections_total", outcome="accepted"), n)
            self.assertEqual(value(body, "wsproxy_messages_down_total"), 3 * n)
            self.assertEqual(value(body, "wsproxy_bytes_down_total"), 3 * 6 * n)
            self.assertEqual(value(body, "wsproxy_messages_up_total"), 2 * n)
            self.assertEqual(value(body, "wsproxy_bytes_up_total"), 9 * n)
            self.assertEqual(value(body, "wsproxy_auth_check_seconds_count"), n)
            self.assertEqual(value(body, "wsproxy_workers"), 2)
            self.assertEqual(value(body, "wsproxy_worker_restarts_total"), 0)
        self.assertEqual(set(answered), set(owners.values()))

        for c in clients:
            await c.close_and_wait()

    async def test_killed_worker_is_replaced_by_one_that_serves(self) -> None:
        """
        After SIGKILL on a worker, /health soon answers from a new pid, a
        WebSocket session on that new worker carries messages both ways,
        and the metrics' counters have not gone backwards: the dead
        worker's deliveries are still counted, its connections are not.
        """
        daemon = WorkerDaemon(self)
        await daemon.start()
        r = self.r
        owners = await daemon.clients_on_every_worker(r, per_worker=1)
        for c in owners:
            r.publish(f"session:{c.session}:down", "hello")
        for c in owners:
            await c.wait_messages(1)
        _, before, _ = await daemon.get("/metrics")
        delivered = value(before, "wsproxy_messages_down_total")
        self.assertEqual(delivered, len(owners))

        old = daemon.workers()
        victim = next(iter(owners.values()))
        os.kill(victim, signal.SIGKILL)
        new = await wait_for(lambda: (daemon.workers() - old) and len(daemon.workers()) == 2
                             and daemon.workers() - old, timeout=20)
        (replacement,) = new

        deadline = time.monotonic() + 20
        while True:
            self.assertLess(time.monotonic(), deadline, "the new worker never answered /health")
            status, body, _ = await daemon.get("/health")
            if status == 200 and json.loads(body)["pid"] == replacement:
                break

        for n in range(100):
            session = f"new{n}"
            r.set(f"session:{session}:auth", "tok", ex=60)
            client = await connect(f"ws://127.0.0.1:{daemon.port}/a/ws/{session}", token="tok")
            self.addCleanup(client.close_and_wait)
            if await daemon.owner_of(client.transport.getHost().port) == replacement:
                break
        else:
            self.fail("100 connections never reached the new worker")
        up = r.pubsub(ignore_subscribe_messages=True)
        self.addCleanup(up.close)
        up.subscribe(f"session:{session}:up")
        up.get_message(timeout=1)
        r.publish(f"session:{session}:down", "to the new worker")
        await client.wait_messages(1)
        self.assertEqual(client.messages, [(b"to the new worker", False)])
        client.sendMessage(b"from the new worker")
        message = await wait_for(lambda: up.get_message(timeout=0))
        self.assertEqual(message["data"], b"from the new worker")

        _, after, _ = await daemon.get("/metrics")
        survivors = [c for c, pid in owners.items() if pid != victim]
        opened_since = n + 1
        self.assertEqual(value(after, "wsproxy_messages_down_total"), delivered + 1)
        self.assertEqual(value(after, "wsproxy_connections_open"), len(survivors) + opened_since)
        self.assertEqual(value(after, "wsproxy_worker_restarts_total"), 1)
        self.assertEqual(value(after, "wsproxy_workers"), 2)

    async def test_workers_exit_with_their_supervisor(self) -> None:
        """
        SIGKILL on the supervisor: every worker closes its clients with
        1001 and exits within seconds, and the port is free for the next
        supervisor.
        """
        daemon = WorkerDaemon(self)
        port = await daemon.start()
        owners = await daemon.clients_on_every_worker(self.r, per_worker=1)
        workers = {(pid, start_time(pid)) for pid in daemon.workers()}
        self.assertEqual(len(workers), 2)

        os.kill(daemon.pid, signal.SIGKILL)
        await wait_for(lambda: all(c.factory.closed.called for c in owners), timeout=10)
        self.assertEqual({c.close_code for c in owners}, {1001})
        await wait_for(lambda: all(start_time(pid) != started for pid, started in workers),
                       timeout=10)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
