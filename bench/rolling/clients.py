"""
The rolling-deploy benchmark's clients: L{bench.resume}'s resuming sessions
(a numbered stream down, checked against each session's ledger), which
also send a numbered stream up with C{?ack=1}, as
docs/guide/durable-upstream.md tells a client to: every message is
C{<id>\\n<message>}, kept until its C{ack}; after a C{nack} it is sent
again, and after a reconnect every message not acknowledged yet is sent
again, in order, before anything new.

Messages up are produced on schedule whether or not the session is
connected at that moment (an application does not stop producing while its
socket reconnects): they wait in the session's outbox. Each worker also
times every reconnect, from the moment the connection was lost to the next
successful open, and counts the close codes its connections ended with.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Union

from bench.children import ChildFailed, Counters, child_main
from bench.loadtest.wsclient import OP_TEXT, client_frame
from bench.resume.client import QueryUpgrade, Session, StreamClient, resume_query
from bench.resume.stream import message
from bench.resume.workers import (COUNTERS_PER_WORKER, Collect, SessionSpec, Worker,
                                  WorkerConfig, WorkerReport)

# this worker's counters, after bench.resume's
UP_PRODUCED, UP_ACKED = COUNTERS_PER_WORKER, COUNTERS_PER_WORKER + 1
ROLLING_COUNTERS = COUNTERS_PER_WORKER + 2

#: the close code counted for a connection that ended without a close frame
ABNORMAL = 1006


@dataclass(frozen=True)
class RollingConfig(WorkerConfig):
    up_rate: float = 1.0  # messages up per second per session
    size: int = 100  # bytes of a message up (after the id line)


# -- commands and replies (besides bench.resume's)


@dataclass(frozen=True)
class StartUp:
    """Produce messages up for C{duration} seconds."""

    duration: float


@dataclass(frozen=True)
class UpStarted:
    pass


@dataclass(frozen=True)
class RollingReport:
    down: WorkerReport
    produced: tuple[int, ...]  # per session index of this worker's sessions: last number
    indexes: tuple[int, ...]
    unacked: int  # messages up still waiting for their ack at the end
    acks: int
    nacks: dict[str, int]  # by reason
    resent: int  # messages up sent again after a reconnect or a nack
    acks_unknown: int  # acks naming an id that was not waiting
    acks_out_of_order: int  # acks on one connection not in the order sent
    close_codes: dict[str, int]  # of every connection lost while running
    reconnect_ms: array[float]  # lost -> next open, every reconnect
    after_jitter_ms: array[float]  # ... less the client's random wait before its first attempt
    sessions_reconnected: int  # sessions that lost a connection and opened another


RollingReply = Union[UpStarted, RollingReport, ChildFailed]


class AckingSession(Session):
    """A resuming session that also sends numbered messages up."""

    __slots__ = ("produced", "outbox", "written", "lost_at", "jitter", "reconnected")

    def __init__(self, index: int, session_id: str, token: str) -> None:
        super().__init__(index, session_id, token)
        self.produced = 0  # the last number produced
        self.outbox: dict[int, bytes] = {}  # not acknowledged yet, by number, in order
        self.written = 0  # the highest number ever written to a connection
        self.lost_at: int | None = None  # ns, when the last connection was lost
        self.jitter = 0.0  # s, the random wait before the reconnect's first attempt
        self.reconnected = False


def message_id(number: int) -> bytes:
    return b"u%d" % number


class AckingClient(StreamClient):
    """One connection of an L{AckingSession}: reads acks and nacks besides the stream."""

    __slots__ = ("last_acked",)

    session: AckingSession
    _sink: RollingWorker

    def __init__(self, loop: asyncio.AbstractEventLoop, request: QueryUpgrade,
                 session: AckingSession, sink: RollingWorker) -> None:
        super().__init__(loop, request, session, sink, True)
        self.last_acked = 0

    def send_up(self, number: int, body: bytes) -> None:
        self.write(client_frame(OP_TEXT, message_id(number) + b"\n" + body))
        session = self.session
        if number <= session.written:
            self._sink.resent += 1
        else:
            session.written = number

    def _control(self, body: bytes) -> None:
        if not body.startswith(b'{"type":"ack"') and not body.startswith(b'{"type":"nack"'):
            super()._control(body)
            return
        try:
            event = json.loads(body)
            number = int(str(event["id"])[1:])
        except (ValueError, KeyError, TypeError):
            self.session.corrupt += 1
            return
        if event.get("type") == "ack":
            self._sink.acked(self, number)
        else:
            self._sink.nacked(self, number, str(event.get("reason", "")))


class RollingWorker(Worker):
    """bench.resume's worker, with messages up and reconnect times."""

    sessions: list[AckingSession]  # type: ignore[assignment]
    config: RollingConfig

    def __init__(self, worker_id: int, specs: list[SessionSpec], config: RollingConfig,
                 conn: Connection[Any, Any], counters: Counters,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(worker_id, specs, config, conn, counters, loop)
        self.resent = 0
        self._acks = 0
        self._nacks: Counter[str] = Counter()
        self._acks_unknown = 0
        self._acks_out_of_order = 0
        self._close_codes: Counter[str] = Counter()
        self._reconnect_ms: array[float] = array("d")
        self._after_jitter_ms: array[float] = array("d")
        self._produced = 0

    def new_session(self, spec: SessionSpec) -> Session:
        return AckingSession(spec.index, spec.session_id, spec.token)

    def new_client(self, session: Session, port: int) -> StreamClient:
        assert isinstance(session, AckingSession)
        config = self.config
        request = QueryUpgrade(f"{config.host}:{port}".encode(), "", config.agent, False,
                               resume_query(session.position) + "&ack=1")
        return AckingClient(self.loop, request, session, self)

    async def answer(self, command: object) -> bool:
        if isinstance(command, StartUp):
            self._spawn(self._produce(command.duration))
            self._conn.send(UpStarted())
            return True
        if isinstance(command, Collect):
            self._conn.send(self.rolling_report(command.sent))
            return True
        return await super().answer(command)

    # -- messages up

    async def _produce(self, duration: float) -> None:
        """
        Every session produces C{up_rate} messages a second: the sessions
        take turns in ten slices, one slice every 1 / (10 * up_rate) s.
        """
        slices = 10
        period = 1.0 / (slices * self.config.up_rate)
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < duration and not self.stopping:
            for session in self.sessions[tick % slices::slices]:
                self._produce_one(session)
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * period - time.monotonic()))

    def _produce_one(self, session: AckingSession) -> None:
        number = session.produced + 1
        session.produced = number
        body = message(session.index, number, self.config.size)
        session.outbox[number] = body
        self._produced += 1
        self.counters.set_worker(self.worker_id, UP_PRODUCED, self._produced)
        client = session.client
        if isinstance(client, AckingClient) and client.can_send():
            client.send_up(number, body)

    def acked(self, client: AckingClient, number: int) -> None:
        self._acks += 1
        if number <= client.last_acked:
            self._acks_out_of_order += 1
        client.last_acked = number
        if client.session.outbox.pop(number, None) is None:
            self._acks_unknown += 1
        self.counters.set_worker(self.worker_id, UP_ACKED, self._acks - self._acks_unknown)

    def nacked(self, client: AckingClient, number: int, reason: str) -> None:
        """Sent again at once, with the same id (it goes after those sent meanwhile)."""
        self._nacks[reason] += 1
        body = client.session.outbox.get(number)
        if body is not None and client.can_send():
            client.send_up(number, body)

    # -- connections (the Sink of bench.resume.client)

    def opened(self, client: StreamClient) -> None:
        super().opened(client)
        session = client.session
        assert isinstance(session, AckingSession) and isinstance(client, AckingClient)
        if session.lost_at is not None:
            took_ms = (time.time_ns() - session.lost_at) / 1e6
            self._reconnect_ms.append(took_ms)
            self._after_jitter_ms.append(took_ms - session.jitter * 1000)
            session.lost_at = None
            session.reconnected = True
        # everything not acknowledged, in order: what the last connection
        # took without an answer, then what was produced while disconnected
        for number, body in list(session.outbox.items()):
            client.send_up(number, body)

    def lost(self, client: StreamClient) -> None:
        session = client.session
        assert isinstance(session, AckingSession)
        if session.client is client and not self.stopping:
            session.lost_at = time.time_ns()
            code = client.close_code
            self._close_codes[str(ABNORMAL if code is None else code)] += 1
        super().lost(client)

    async def _reconnect(self, session: Session, delay: float) -> None:
        if isinstance(session, AckingSession):
            session.jitter = delay
        await super()._reconnect(session, delay)

    # -- the report

    def rolling_report(self, sent: tuple[int, ...]) -> RollingReport:
        sessions = self.sessions
        return RollingReport(
            down=self.report(sent),
            produced=tuple(s.produced for s in sessions),
            indexes=tuple(s.index for s in sessions),
            unacked=sum(len(s.outbox) for s in sessions),
            acks=self._acks,
            nacks=dict(self._nacks),
            resent=self.resent,
            acks_unknown=self._acks_unknown,
            acks_out_of_order=self._acks_out_of_order,
            close_codes=dict(self._close_codes),
            reconnect_ms=self._reconnect_ms,
            after_jitter_ms=self._after_jitter_ms,
            sessions_reconnected=sum(1 for s in sessions if s.reconnected),
        )


def rolling_worker_main(worker_id: int, specs: list[SessionSpec], config: RollingConfig,
                        conn: Connection[Any, Any], counters: Counters) -> None:
    """The worker process (L{bench.resume.children.Children}'s C{target})."""

    async def serve() -> None:
        await RollingWorker(worker_id, specs, config, conn, counters,
                            asyncio.get_running_loop()).serve()

    child_main(conn, lambda: asyncio.run(serve()))
