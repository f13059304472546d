"""
Client worker processes: each holds a slice of the sessions on one asyncio
loop. A session whose connection drops reconnects after a random delay to a
random proxy (trying another after a failure), resuming from the last
position it received. The parent's commands come over a pipe, one reply
each.
"""

from __future__ import annotations

import asyncio
import random
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Coroutine, Union

from bench.children import ChildFailed, Counters, Exit, child_main, commands
from bench.loadtest.wsclient import OP_CLOSE, client_frame, error_name

from .client import QueryUpgrade, Session, StreamClient, resume_query

# a client worker's counters (L{Counters}), in this order
OPEN, DELIVERED, RECONNECTS, CONNECT_FAILURES, INCOMPLETE = range(5)
COUNTERS_PER_WORKER = 5

# sessions of a worker whose missing numbers are listed in its report
GAP_EXAMPLES = 5
# the longest wait between two failed attempts (retries back off exponentially)
RETRY_CAP_SECS = 8.0


@dataclass(frozen=True)
class SessionSpec:
    index: int
    session_id: str
    token: str


@dataclass(frozen=True)
class WorkerConfig:
    host: str
    ports: tuple[int, ...]
    agent: str
    resuming: bool
    connect_timeout: float
    concurrency: int  # handshakes in flight while connecting every session
    reconnect_max: float  # a dropped session waits U(0, this) seconds, then reconnects
    # after the n-th failed attempt in a row, U(0, this * 2**(n-1)) seconds
    # (at most RETRY_CAP_SECS) until the next, as clients back off
    retry_max: float
    seed: int


# -- commands


@dataclass(frozen=True)
class Connect:
    """Open every session's first connection, session i to ports[i % len(ports)]."""


@dataclass(frozen=True)
class Collect:
    """Report what arrived; C{sent[i]} messages were published to session i."""

    sent: tuple[int, ...]


@dataclass(frozen=True)
class CloseAll:
    """Stop reconnecting and close every connection, waiting at most C{timeout} seconds."""

    timeout: float


WorkerCommand = Union[Connect, Collect, CloseAll, Exit]


# -- replies


@dataclass(frozen=True)
class Connected:
    opened: int
    failures: dict[str, int]


@dataclass(frozen=True)
class WorkerReport:
    sessions: int
    open: int  # sessions with an open connection now
    delivered: int  # distinct numbers received
    missing: int  # numbers published but never received
    gap_sessions: int
    gap_examples: list[tuple[int, list[int]]]  # (session index, its first missing numbers)
    duplicates: int
    reordered: int
    unexpected: int
    misrouted: int
    corrupt: int
    position_mismatches: int
    epoch_changes: int
    recoveries: int  # recovery control frames
    incomplete: int  # ... of which recovered:false
    incomplete_reasons: dict[str, int]
    replayed: int
    drops: int
    reconnects: int
    connect_failures: dict[str, int]
    latencies: array[int]  # ns, from publish to first receipt, every delivery
    live_latencies: array[int]  # ... of the messages that were not replayed


@dataclass(frozen=True)
class Closed:
    closed: int


WorkerReply = Union[Connected, WorkerReport, Closed, ChildFailed]


class Worker:
    def __init__(self, worker_id: int, specs: list[SessionSpec], config: WorkerConfig,
                 conn: Connection[Any, Any], counters: Counters,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.sessions = [self.new_session(s) for s in specs]
        self.config = config
        self.loop = loop
        self.stopping = False
        self.worker_id = worker_id
        self._conn = conn
        self.counters = counters
        self._random = random.Random(config.seed * 1000 + worker_id)
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = 0
        self._all_closed: asyncio.Event | None = None
        self._delivered = 0
        self._latencies: array[int] = array("q")
        self._live_latencies: array[int] = array("q")
        self._recoveries = 0
        self._incomplete = 0
        self._incomplete_reasons: Counter[str] = Counter()
        self._replayed = 0
        self._drops = 0
        self._reconnects = 0
        self._connect_failures: Counter[str] = Counter()

    # -- what a subclass (bench.rolling's worker) changes

    def new_session(self, spec: SessionSpec) -> Session:
        return Session(spec.index, spec.session_id, spec.token)

    def new_client(self, session: Session, port: int) -> StreamClient:
        """The next connection of C{session}, to C{port}, not opened yet."""
        config = self.config
        request = QueryUpgrade(f"{config.host}:{port}".encode(), "", config.agent, False,
                               resume_query(session.position) if config.resuming else "")
        return StreamClient(self.loop, request, session, self, config.resuming)

    async def answer(self, command: object) -> bool:
        """
        Replies to one of the parent's commands; False for one this worker
        does not know.
        """
        if isinstance(command, Connect):
            self._conn.send(await self.connect_all())
        elif isinstance(command, Collect):
            self._conn.send(self.report(command.sent))
        elif isinstance(command, CloseAll):
            self._conn.send(await self.close_all(command.timeout))
        else:
            return False
        return True

    async def serve(self) -> None:
        """Answers the parent's commands until told to exit or the pipe closes."""
        async for command in commands(self.loop, self._conn):
            if isinstance(command, Exit):
                self.stopping = True
                for session in self.sessions:
                    if session.client is not None:
                        session.client.abort()
                return
            if not await self.answer(command):
                self._conn.send(ChildFailed(f"unknown command {command!r}"))

    # -- connections

    async def connect_all(self) -> Connected:
        remaining = iter(self.sessions)
        ports = self.config.ports
        opened = 0
        failures: Counter[str] = Counter()

        async def connect_in_turn() -> None:
            nonlocal opened
            for session in remaining:
                failure = await self._connect(session, ports[session.index % len(ports)])
                if failure is None:
                    opened += 1
                else:
                    failures[failure] += 1

        in_flight = max(1, min(self.config.concurrency, len(self.sessions)))
        await asyncio.gather(*(connect_in_turn() for _ in range(in_flight)))
        return Connected(opened, dict(failures))

    async def _connect(self, session: Session, port: int) -> str | None:
        """Opens a connection for C{session}: None once it is open, else why it failed."""
        client = self.new_client(session, port)
        session.client = client
        try:
            await asyncio.wait_for(self._open_connection(client, port),
                                   self.config.connect_timeout)
        except Exception as e:  # noqa: BLE001 - every failure is counted
            if session.client is client:
                session.client = None
            client.abort()
            return error_name(e)
        return None

    async def _open_connection(self, client: StreamClient, port: int) -> None:
        await self.loop.create_connection(lambda: client, self.config.host, port)
        await client.handshake

    async def _reconnect(self, session: Session, delay: float) -> None:
        await asyncio.sleep(delay)
        config = self.config
        failed = 0
        while not self.stopping:
            failure = await self._connect(session, self._random.choice(config.ports))
            if failure is None:
                session.reconnects += 1
                self._reconnects += 1
                self.counters.set_worker(self.worker_id, RECONNECTS, self._reconnects)
                return
            self._connect_failures[failure] += 1
            self.counters.set_worker(self.worker_id, CONNECT_FAILURES,
                                      sum(self._connect_failures.values()))
            backoff = min(config.retry_max * 2 ** failed, RETRY_CAP_SECS)
            failed += 1
            await asyncio.sleep(self._random.uniform(0, backoff))

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(self, timeout: float) -> Closed:
        """Stops reconnecting, closes every open connection (code 1000) and waits."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        self._all_closed = asyncio.Event()
        close_frame = client_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
        closing = [s.client for s in self.sessions
                   if s.client is not None and s.client.is_open and not s.client.closing]
        for client in closing:
            client.begin_close(close_frame)
        if self._open > 0:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for session in self.sessions:
            if session.client is not None and not session.client.lost:
                session.client.abort()
        await asyncio.sleep(0)
        return Closed(len(closing))

    # -- what the clients say (the Sink of bench.resume.client)

    def opened(self, client: StreamClient) -> None:
        self._open += 1
        self.counters.set_worker(self.worker_id, OPEN, self._open)

    def lost(self, client: StreamClient) -> None:
        self._open -= 1
        self.counters.set_worker(self.worker_id, OPEN, self._open)
        if self._open == 0 and self._all_closed is not None:
            self._all_closed.set()
        session = client.session
        if session.client is not client:
            return
        session.client = None
        if self.stopping:
            return
        self._drops += 1
        self._spawn(self._reconnect(session, self._random.uniform(0, self.config.reconnect_max)))

    def received(self, latency_ns: int, replayed: bool) -> None:
        self._latencies.append(latency_ns)
        if not replayed:
            self._live_latencies.append(latency_ns)

    def delivered(self, count: int) -> None:
        self._delivered += count
        self.counters.set_worker(self.worker_id, DELIVERED, self._delivered)

    def recovery(self, recovered: bool, replayed: int, reason: str) -> None:
        self._recoveries += 1
        self._replayed += replayed
        if not recovered:
            self._incomplete += 1
            self._incomplete_reasons[reason] += 1
            self.counters.set_worker(self.worker_id, INCOMPLETE, self._incomplete)

    # -- the report

    def report(self, sent: tuple[int, ...]) -> WorkerReport:
        missing = 0
        gap_sessions = 0
        examples: list[tuple[int, list[int]]] = []
        unexpected = 0
        for session in self.sessions:
            published = sent[session.index]
            lost = session.ledger.missing(published)
            if lost:
                missing += len(lost)
                gap_sessions += 1
                if len(examples) < GAP_EXAMPLES:
                    examples.append((session.index, lost[:10]))
            unexpected += session.ledger.unexpected(published)
        sessions = self.sessions
        return WorkerReport(
            sessions=len(sessions),
            open=sum(1 for s in sessions if s.client is not None and s.client.is_open),
            delivered=sum(len(s.ledger.seen) for s in sessions),
            missing=missing,
            gap_sessions=gap_sessions,
            gap_examples=examples,
            duplicates=sum(s.ledger.duplicates for s in sessions),
            reordered=sum(s.ledger.reordered for s in sessions),
            unexpected=unexpected,
            misrouted=sum(s.misrouted for s in sessions),
            corrupt=sum(s.corrupt for s in sessions),
            position_mismatches=sum(s.position_mismatches for s in sessions),
            epoch_changes=sum(s.epoch_changes for s in sessions),
            recoveries=self._recoveries,
            incomplete=self._incomplete,
            incomplete_reasons=dict(self._incomplete_reasons),
            replayed=self._replayed,
            drops=self._drops,
            reconnects=self._reconnects,
            connect_failures=dict(self._connect_failures),
            latencies=self._latencies,
            live_latencies=self._live_latencies,
        )


def worker_main(worker_id: int, specs: list[SessionSpec], config: WorkerConfig,
                conn: Connection[WorkerReply, WorkerCommand], counters: Counters) -> None:
    """The worker process: serves until told to exit; a crash is reported to the parent."""

    async def serve() -> None:
        await Worker(worker_id, specs, config, conn, counters, asyncio.get_running_loop()).serve()

    child_main(conn, lambda: asyncio.run(serve()))
