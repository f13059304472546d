"""
Client worker processes. Each holds a slice of the run's WebSocket clients
(every ``--procs``-th session) on one asyncio loop and obeys the parent's
commands over a pipe, one reply per command: open all connections, start a
phase (reset the counters and say which clients are open), report what
arrived, send upstream messages, close all connections.

Each downstream message is checked on arrival: latency from the send time in
its header, the session it was meant for, its order within the session, its
frame type and size.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Union

from bench.children import ChildFailed, Counters, Exit, child_main, commands
from bench.pipeline import Schedule

from .messages import HEADER_LEN, SEQUENCE, SENT_AT, SESSION_INDEX, header, padding
from .wsclient import (OP_BINARY, OP_CLOSE, OP_TEXT, UpgradeRequest, WebSocketClient,
                       client_frame, error_name)

# a client worker's counters (L{Counters}), in this order
OPENED, FAILED, DELIVERED, DROPPED = range(4)
COUNTERS_PER_WORKER = 4


@dataclass(frozen=True)
class ClientSpec:
    index: int  # the session's index in the run, carried in each message's header
    session_id: str
    token: str


@dataclass(frozen=True)
class WorkerConfig:
    host: str
    port: int
    request: UpgradeRequest
    size: int
    binary: bool
    connect_timeout: float
    concurrency: int  # handshakes in flight in this worker
    source_addresses: tuple[str, ...] = ()  # bound round-robin by client index


# -- commands


@dataclass(frozen=True)
class Connect:
    """Open every client's connection."""


@dataclass(frozen=True)
class StartPhase:
    """Reset the delivery counters for a phase whose messages carry ``tag``."""

    tag: int


@dataclass(frozen=True)
class Collect:
    """Report what arrived in the current phase."""


@dataclass(frozen=True)
class SendUpstream:
    """Send ``count`` messages of ``size`` bytes from every open client."""

    count: int
    size: int
    tag: int
    binary: bool


@dataclass(frozen=True)
class SendPaced:
    """
    Send ``rate`` messages a second in all, round-robin over the open
    clients, for ``duration`` seconds: each message its own write, so that
    the server reads about one message per socket per turn.
    """

    rate: float
    duration: float
    size: int
    tag: int
    binary: bool


@dataclass(frozen=True)
class CloseAll:
    """Close every open connection, waiting at most ``timeout`` seconds."""

    timeout: float


WorkerCommand = Union[Connect, StartPhase, Collect, SendUpstream, SendPaced, CloseAll, Exit]


# -- replies


@dataclass(frozen=True)
class ConnectResult:
    opened: int
    failed: int
    failures: dict[str, int]  # reason -> connections
    examples: dict[str, str]  # reason -> a session id that failed so
    latencies: array[int]  # handshake times, ns


@dataclass(frozen=True)
class PhaseStarted:
    open_clients: list[int]  # session indexes, sorted


@dataclass(frozen=True)
class Deliveries:
    delivered: int
    per_session: dict[int, int]  # session index -> messages received
    latencies: array[int]  # ns
    first_ns: int
    last_ns: int
    stray: int  # from another phase, or not from this tool
    misrouted: int
    out_of_order: int
    wrong_opcode: int
    bad_size: int
    corrupt: int
    protocol_errors: int

    def anomalies(self) -> dict[str, int]:
        """Messages that arrived but are not what was sent, by kind (stray: from elsewhere)."""
        return {"stray": self.stray, "misrouted": self.misrouted,
                "out_of_order": self.out_of_order, "wrong_opcode": self.wrong_opcode,
                "bad_size": self.bad_size, "corrupt": self.corrupt,
                "protocol_errors": self.protocol_errors}


@dataclass(frozen=True)
class UpstreamSent:
    sent: int
    started_ns: int
    ended_ns: int
    per_session: dict[int, int]  # session index -> messages sent
    max_lag_ms: float = 0.0  # how far a paced sender fell behind its schedule


@dataclass(frozen=True)
class CloseResult:
    closed: int
    clean: int
    no_close_frame: int
    timed_out: int
    dropped: int  # before the close began
    server_close_codes: dict[int, int]


WorkerReply = Union[ConnectResult, PhaseStarted, Deliveries, UpstreamSent, CloseResult,
                    ChildFailed]


# -- the worker process


@dataclass
class PhaseStats:
    """What one worker's clients received in the current phase."""

    tag: int
    expected_opcode: int
    expected_size: int
    latencies: array[int] = field(default_factory=lambda: array("q"))
    delivered: int = 0
    first_ns: int = 0
    last_ns: int = 0
    stray: int = 0
    misrouted: int = 0
    out_of_order: int = 0
    wrong_opcode: int = 0
    bad_size: int = 0
    corrupt: int = 0
    protocol_errors: int = 0


class SessionClient(WebSocketClient):
    """A client of one session, checking each message against that session."""

    __slots__ = ("index", "received", "last_sequence", "_worker")

    def __init__(self, worker: Worker, spec: ClientSpec) -> None:
        super().__init__(worker.loop, worker.config.request, spec.session_id, spec.token)
        self.index = spec.index
        self.received = 0
        self.last_sequence = -1
        self._worker = worker

    def on_open(self) -> None:
        self._worker.open_count += 1

    def on_lost(self, dropped: bool) -> None:
        self._worker.client_lost(dropped)

    def on_server_close(self, code: int) -> None:
        self._worker.server_closed(code)

    def on_protocol_error(self) -> None:
        self._worker.stats.protocol_errors += 1

    def on_message(self, opcode: int, payload: bytes, now: int) -> bool:
        stats = self._worker.stats
        if len(payload) < HEADER_LEN or payload[0] != stats.tag:
            stats.stray += 1
            return False
        try:
            sent_at = int(payload[SENT_AT])
            index = int(payload[SESSION_INDEX])
            sequence = int(payload[SEQUENCE])
        except ValueError:
            stats.corrupt += 1
            return False
        stats.latencies.append(now - sent_at)
        self.received += 1
        if index != self.index:
            stats.misrouted += 1
        if sequence <= self.last_sequence:
            stats.out_of_order += 1
        self.last_sequence = sequence
        if opcode != stats.expected_opcode:
            stats.wrong_opcode += 1
        if len(payload) != stats.expected_size:
            stats.bad_size += 1
        return True

    def on_delivered(self, count: int, now: int) -> None:
        self._worker.messages_delivered(count, now)


class Worker:
    def __init__(self, worker_id: int, specs: list[ClientSpec], config: WorkerConfig,
                 conn: Connection[WorkerReply, WorkerCommand], counters: Counters,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.open_count = 0
        self.stats = PhaseStats(0, self._expected_opcode(), config.size)
        self._id = worker_id
        self._specs = specs
        self._conn = conn
        self._counters = counters
        self._clients: dict[int, SessionClient] = {}
        self._dropped = 0
        self._all_closed: asyncio.Event | None = None
        self._server_close_codes: Counter[int] = Counter()

    def _expected_opcode(self) -> int:
        return OP_BINARY if self.config.binary else OP_TEXT

    # -- the command loop

    async def serve(self) -> None:
        """Answers the parent's commands until told to exit or the pipe closes."""
        async for command in commands(self.loop, self._conn):
            if isinstance(command, Connect):
                self._conn.send(await self.connect_all())
            elif isinstance(command, StartPhase):
                self._conn.send(self.start_phase(command.tag))
            elif isinstance(command, Collect):
                self._conn.send(self.collect())
            elif isinstance(command, SendUpstream):
                self._conn.send(self.send_upstream(command))
            elif isinstance(command, SendPaced):
                self._conn.send(await self.send_paced(command))
            elif isinstance(command, CloseAll):
                self._conn.send(await self.close_all(command.timeout))
            elif isinstance(command, Exit):
                for client in self._clients.values():
                    client.abort()
                return

    # -- connect

    async def connect_all(self) -> ConnectResult:
        """Opens every client, at most ``concurrency`` handshakes at a time."""
        latencies: array[int] = array("q")
        failures: Counter[str] = Counter()
        examples: dict[str, str] = {}
        remaining = iter(self._specs)
        opened = 0
        failed = 0

        async def connect_in_turn() -> None:
            nonlocal opened, failed
            for spec in remaining:
                failure = await self._connect(spec, latencies)
                if failure is None:
                    opened += 1
                    self._counters.set_worker(self._id, OPENED, opened)
                else:
                    failed += 1
                    failures[failure] += 1
                    examples.setdefault(failure, spec.session_id)
                    self._counters.set_worker(self._id, FAILED, failed)

        in_flight = max(1, min(self.config.concurrency, len(self._specs)))
        await asyncio.gather(*(connect_in_turn() for _ in range(in_flight)))
        return ConnectResult(opened, failed, dict(failures), examples, latencies)

    async def _connect(self, spec: ClientSpec, latencies: array[int]) -> str | None:
        """Opens one client: None once it is open, else why it failed."""
        client = SessionClient(self, spec)
        started = time.perf_counter_ns()
        try:
            await asyncio.wait_for(self._open(client), self.config.connect_timeout)
        except Exception as e:  # noqa: BLE001 - every failure is counted
            client.abort()
            return error_name(e)
        latencies.append(time.perf_counter_ns() - started)
        self._clients[spec.index] = client
        return None

    async def _open(self, client: SessionClient) -> None:
        sources = self.config.source_addresses
        local = (sources[client.index % len(sources)], 0) if sources else None
        await self.loop.create_connection(lambda: client, self.config.host, self.config.port,
                                          local_addr=local)
        await client.handshake

    # -- phases

    def start_phase(self, tag: int) -> PhaseStarted:
        self.stats = PhaseStats(tag, self._expected_opcode(), self.config.size)
        for client in self._clients.values():
            client.received = 0
            client.last_sequence = -1
        self._counters.set_worker(self._id, DELIVERED, 0)
        return PhaseStarted(sorted(index for index, client in self._clients.items()
                                   if client.is_open and not client.closing))

    def collect(self) -> Deliveries:
        stats = self.stats
        return Deliveries(
            delivered=stats.delivered,
            per_session={index: client.received for index, client in self._clients.items()},
            latencies=stats.latencies, first_ns=stats.first_ns, last_ns=stats.last_ns,
            stray=stats.stray, misrouted=stats.misrouted, out_of_order=stats.out_of_order,
            wrong_opcode=stats.wrong_opcode, bad_size=stats.bad_size, corrupt=stats.corrupt,
            protocol_errors=stats.protocol_errors)

    def send_upstream(self, command: SendUpstream) -> UpstreamSent:
        opcode = OP_BINARY if command.binary else OP_TEXT
        pad = padding(command.size, command.binary)
        started = time.time_ns()
        per_session: dict[int, int] = {}
        for index, client in self._clients.items():
            if not client.can_send():
                continue
            client.write(b"".join(client_frame(opcode, header(command.tag, index, sequence) + pad)
                                  for sequence in range(command.count)))
            per_session[index] = command.count
        return UpstreamSent(sum(per_session.values()), started, time.time_ns(), per_session)

    async def send_paced(self, command: SendPaced) -> UpstreamSent:
        """
        Sends on schedule, one write per message, round-robin over the
        clients open at the start; yields to the loop between ticks so that
        the clients keep reading (pings) meanwhile.
        """
        opcode = OP_BINARY if command.binary else OP_TEXT
        pad = padding(command.size, command.binary)
        clients = [client for client in self._clients.values() if client.can_send()]
        per_session = {client.index: 0 for client in clients}
        due_count = 0  # messages whose time has come, sent or skipped (client gone)
        turn = 0
        started = time.time_ns()
        schedule = Schedule(command.rate, int(command.rate * command.duration) if clients else 0,
                            command.duration)
        while due_count < schedule.total:
            due = schedule.due(due_count)
            if due is None:
                break
            while due_count < due:
                client = clients[turn]
                turn = (turn + 1) % len(clients)
                due_count += 1
                if client.can_send():
                    sequence = per_session[client.index]
                    client.write(client_frame(
                        opcode, header(command.tag, client.index, sequence) + pad))
                    per_session[client.index] = sequence + 1
            await asyncio.sleep(schedule.wait(due_count))
        return UpstreamSent(sum(per_session.values()), started, time.time_ns(), per_session,
                            schedule.max_lag_ms)

    async def close_all(self, timeout: float) -> CloseResult:
        """Closes every open client (code 1000) and waits for the server's side."""
        self._all_closed = asyncio.Event()
        dropped_before = self._dropped
        close_frame = client_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
        closing = [c for c in self._clients.values() if c.is_open and not c.closing]
        for client in closing:
            client.begin_close(close_frame)
        if self.open_count > 0:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        clean = sum(1 for c in closing if c.lost and c.close_code is not None)
        no_close_frame = sum(1 for c in closing if c.lost and c.close_code is None)
        timed_out = 0
        for client in closing:
            if not client.lost:
                timed_out += 1
                client.abort()
        await asyncio.sleep(0)
        return CloseResult(len(closing), clean, no_close_frame, timed_out, dropped_before,
                           dict(self._server_close_codes))

    # -- what the clients report

    def client_lost(self, dropped: bool) -> None:
        self.open_count -= 1
        if dropped:
            self._count_drop()
        if self.open_count == 0 and self._all_closed is not None:
            self._all_closed.set()

    def server_closed(self, code: int) -> None:
        self._server_close_codes[code] += 1
        self._count_drop()

    def _count_drop(self) -> None:
        self._dropped += 1
        self._counters.set_worker(self._id, DROPPED, self._dropped)

    def messages_delivered(self, count: int, now: int) -> None:
        stats = self.stats
        stats.delivered += count
        self._counters.set_worker(self._id, DELIVERED, stats.delivered)
        if not stats.first_ns:
            stats.first_ns = now
        stats.last_ns = now


def worker_main(worker_id: int, specs: list[ClientSpec], config: WorkerConfig,
                conn: Connection[WorkerReply, WorkerCommand], counters: Counters) -> None:
    """The worker process: serves until told to exit; a crash is reported to the parent."""

    async def serve() -> None:
        await Worker(worker_id, specs, config, conn, counters, asyncio.get_running_loop()).serve()

    child_main(conn, lambda: asyncio.run(serve()))
