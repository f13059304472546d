"""
The client worker processes of the topics benchmark: each holds a slice of
the sockets on one asyncio loop (the load-test tool's raw RFC 6455 client)
and checks what arrives against what a phase expects.

A message's body is C{<index>:<publish time, ns>:} padded to the run's size;
the index says which publish of the phase it is (C{0 .. expected-1}). A
socket with a query string (C{?resume=&labels=1}) reads the labelled wire
format: C{<header>\\n<message>} data frames and C{!}+JSON control frames,
which are skipped. Per phase a worker keeps, per socket, which indices
arrived (a bitmap: nothing lost, nothing twice), per index the latest
receipt (the parent takes the publish's time to its LAST socket from it)
and every delivery's latency.
"""

from __future__ import annotations

import asyncio
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Union

from bench.children import ChildFailed, Counters, Exit, child_main, commands
from bench.loadtest.wsclient import OP_TEXT, UpgradeRequest, WebSocketClient, error_name
from bench.resume.client import QueryUpgrade

# a worker's counters (Counters), in this order
DELIVERED, OPEN = range(2)
COUNTERS_PER_WORKER = 2


@dataclass(frozen=True)
class SocketSpec:
    """One socket: its session (one socket per session), token and query string."""

    session_id: str
    token: str
    query: str  # "" (plain) or e.g. "resume=&labels=1"


@dataclass(frozen=True)
class WorkerConfig:
    host: str
    port: int
    agent: str
    concurrency: int  # handshakes in flight per worker
    connect_timeout: float


# -- commands


@dataclass(frozen=True)
class Connect:
    """Open every socket of the worker."""


@dataclass(frozen=True)
class Expect:
    """A new phase: every socket is to receive indices 0 .. count-1, once each."""

    count: int


@dataclass(frozen=True)
class Collect:
    """Report what arrived in this phase."""


WorkerCommand = Union[Connect, Expect, Collect, Exit]


# -- replies


@dataclass(frozen=True)
class Connected:
    opened: int
    failures: dict[str, int]


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class WorkerReport:
    sockets: int
    open: int  # sockets still open
    delivered: int  # distinct (socket, index) receipts
    missing: int  # expected but never received
    duplicates: int
    corrupt: int  # unreadable or out-of-range messages
    last_receipt: dict[int, int]  # index -> latest receipt (ns since the epoch)
    sent: dict[int, int]  # index -> its publish time, from the message
    latencies: array[int]  # ns, publish to receipt, every delivery


WorkerReply = Union[Connected, Ready, WorkerReport, ChildFailed]


class TopicClient(WebSocketClient):
    """One socket; C{slot} is its number within the worker."""

    __slots__ = ("slot", "framed", "_worker")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: UpgradeRequest,
                 spec: SocketSpec, slot: int, worker: Worker) -> None:
        super().__init__(loop, request, spec.session_id, spec.token)
        self.slot = slot
        self.framed = bool(spec.query)
        self._worker = worker

    def on_open(self) -> None:
        self._worker.opened(1)

    def on_lost(self, dropped: bool) -> None:
        self._worker.opened(-1)

    def on_message(self, opcode: int, payload: bytes, now: int) -> bool:
        if self.framed:
            if opcode == OP_TEXT and payload[:1] == b"!":
                return False  # a control frame (recovery)
            payload = payload.partition(b"\n")[2]
        return self._worker.record(self.slot, payload, now)

    def on_delivered(self, count: int, now: int) -> None:
        self._worker.delivered(count)


class Worker:
    def __init__(self, worker_id: int, specs: list[SocketSpec], config: WorkerConfig,
                 conn: Connection[Any, Any], counters: Counters,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.worker_id = worker_id
        self.specs = specs
        self.config = config
        self.loop = loop
        self.counters = counters
        self._conn = conn
        self.clients: list[TopicClient] = []
        self._open = 0
        self._delivered = 0
        self._expected = 0
        self._got = bytearray()
        self._duplicates = 0
        self._corrupt = 0
        self._last: dict[int, int] = {}
        self._sent: dict[int, int] = {}
        self._latencies: array[int] = array("q")

    # -- what the clients say

    def opened(self, change: int) -> None:
        self._open += change
        self.counters.set_worker(self.worker_id, OPEN, self._open)

    def delivered(self, count: int) -> None:
        self._delivered += count
        self.counters.set_worker(self.worker_id, DELIVERED, self._delivered)

    def record(self, slot: int, body: bytes, now: int) -> bool:
        """Whether C{body} is a message of this phase, new to socket C{slot}."""
        try:
            index_text, sent_text, _ = body.split(b":", 2)
            index, sent = int(index_text), int(sent_text)
        except ValueError:
            self._corrupt += 1
            return False
        expected = self._expected
        if not 0 <= index < expected:
            self._corrupt += 1
            return False
        bit = slot * expected + index
        if self._got[bit]:
            self._duplicates += 1
            return False
        self._got[bit] = 1
        if now > self._last.get(index, 0):
            self._last[index] = now
            self._sent[index] = sent
        self._latencies.append(now - sent)
        return True

    # -- commands

    async def serve(self) -> None:
        async for command in commands(self.loop, self._conn):
            if isinstance(command, Exit):
                for client in self.clients:
                    client.abort()
                return
            if isinstance(command, Connect):
                self._conn.send(await self.connect_all())
            elif isinstance(command, Expect):
                self.expect(command.count)
                self._conn.send(Ready())
            elif isinstance(command, Collect):
                self._conn.send(self.report())
            else:
                self._conn.send(ChildFailed(f"unknown command {command!r}"))

    async def connect_all(self) -> Connected:
        config = self.config
        host = f"{config.host}:{config.port}".encode()
        requests: dict[str, UpgradeRequest] = {}
        pending = iter(enumerate(self.specs))
        opened = 0
        failures: Counter[str] = Counter()

        async def connect_in_turn() -> None:
            nonlocal opened
            for slot, spec in pending:
                request = requests.get(spec.query)
                if request is None:
                    request = requests[spec.query] = QueryUpgrade(host, "", config.agent, False,
                                                                  spec.query)
                client = TopicClient(self.loop, request, spec, slot, self)
                self.clients.append(client)
                try:
                    await asyncio.wait_for(self._open_connection(client), config.connect_timeout)
                    opened += 1
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    client.abort()
                    failures[error_name(e)] += 1

        in_flight = max(1, min(config.concurrency, len(self.specs)))
        await asyncio.gather(*(connect_in_turn() for _ in range(in_flight)))
        return Connected(opened, dict(failures))

    async def _open_connection(self, client: TopicClient) -> None:
        await self.loop.create_connection(lambda: client, self.config.host, self.config.port)
        await client.handshake

    def expect(self, count: int) -> None:
        self._expected = count
        self._got = bytearray(len(self.specs) * count)
        self._duplicates = 0
        self._corrupt = 0
        self._last = {}
        self._sent = {}
        self._latencies = array("q")

    def report(self) -> WorkerReport:
        delivered = sum(self._got)
        return WorkerReport(
            sockets=len(self.specs), open=self._open, delivered=delivered,
            missing=len(self._got) - delivered, duplicates=self._duplicates,
            corrupt=self._corrupt, last_receipt=dict(self._last), sent=dict(self._sent),
            latencies=self._latencies)


def worker_main(worker_id: int, specs: list[SocketSpec], config: WorkerConfig,
                conn: Connection[WorkerReply, WorkerCommand], counters: Counters) -> None:
    """The worker process: serves until told to exit; a crash is reported to the parent."""

    async def serve() -> None:
        await Worker(worker_id, specs, config, conn, counters,
                     asyncio.get_running_loop()).serve()

    child_main(conn, lambda: asyncio.run(serve()))
