"""
The benchmark's WebSocket clients, on the load-test tool's raw RFC 6455
client (L{bench.loadtest.wsclient}): a L{Session} outlives its connections;
each connection is a L{StreamClient} that checks what arrives against the
session's L{Ledger}.

A resuming client asks for C{?resume=<last position>} (C{?resume=} the first
time) and reads the resumable wire format: C{<position>\\n<message>} data
frames and C{!}+JSON control frames. Its position is the one of the last
data frame it processed, or the one a recovery frame names when nothing is
replayed after it (a fresh start, or an incomplete recovery: where the
stream goes on).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from bench.loadtest.wsclient import OP_TEXT, UpgradeRequest, WebSocketClient

from .stream import Ledger, Numbered, parse


@dataclass(frozen=True)
class QueryUpgrade(UpgradeRequest):
    """The load-test tool's upgrade request with a query string on the path."""

    query: str = ""

    def encode(self, session_id: str, token: str, key: bytes) -> bytes:
        request = super().encode(session_id, token, key)
        if not self.query:
            return request
        line_end = request.index(b" HTTP/1.1\r\n")
        separator = b"&" if b"?" in request[:line_end] else b"?"
        return request[:line_end] + separator + self.query.encode() + request[line_end:]


def resume_query(position: str) -> str:
    return "resume=" + quote(position, safe=":-")


class Session:
    """One session, across all of its connections."""

    __slots__ = ("index", "session_id", "token", "ledger", "position", "client", "epoch",
                 "offset", "reconnects", "position_mismatches", "epoch_changes", "misrouted",
                 "corrupt")

    def __init__(self, index: int, session_id: str, token: str) -> None:
        self.index = index
        self.session_id = session_id
        self.token = token
        self.ledger = Ledger()
        # the last position received ("": none yet)
        self.position = ""
        # the connection that is open or being opened, if any
        self.client: StreamClient | None = None
        # the history's epoch, and what its sequence numbers add to ours
        self.epoch = b""
        self.offset: int | None = None
        self.reconnects = 0
        self.position_mismatches = 0
        self.epoch_changes = 0
        self.misrouted = 0
        self.corrupt = 0


class Sink(Protocol):
    """What a worker is told by its clients."""

    def opened(self, client: StreamClient) -> None: ...

    def lost(self, client: StreamClient) -> None: ...

    def received(self, latency_ns: int, replayed: bool) -> None: ...

    def delivered(self, count: int) -> None: ...

    def recovery(self, recovered: bool, replayed: int, reason: str) -> None: ...


class StreamClient(WebSocketClient):
    """One connection of a session."""

    __slots__ = ("session", "resuming", "_sink", "_replaying")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: UpgradeRequest,
                 session: Session, sink: Sink, resuming: bool) -> None:
        super().__init__(loop, request, session.session_id, session.token)
        self.session = session
        self.resuming = resuming
        self._sink = sink
        # data frames still to come from the replay announced at open
        self._replaying = 0

    def on_open(self) -> None:
        self._sink.opened(self)

    def on_lost(self, dropped: bool) -> None:
        self._sink.lost(self)

    def on_message(self, opcode: int, payload: bytes, now: int) -> bool:
        if not self.resuming:
            return self._deliver(self._numbered(payload), now, False)
        if opcode == OP_TEXT and payload[:1] == b"!":
            self._control(payload[1:])
            return False
        session = self.session
        position, separator, body = payload.partition(b"\n")
        if not separator:
            session.corrupt += 1
            return False
        replayed = self._replaying > 0
        if replayed:
            self._replaying -= 1
        numbered = self._numbered(body)
        if numbered is not None and position:
            self._check_position(position, numbered.number)
            session.position = position.decode("ascii", "replace")
        return self._deliver(numbered, now, replayed)

    def on_delivered(self, count: int, now: int) -> None:
        self._sink.delivered(count)

    def _numbered(self, body: bytes) -> Numbered | None:
        """The message's header, if it is one of this session's messages."""
        session = self.session
        numbered = parse(body)
        if numbered is None:
            session.corrupt += 1
            return None
        if numbered.index != session.index:
            session.misrouted += 1
            return None
        return numbered

    def _deliver(self, numbered: Numbered | None, now: int, replayed: bool) -> bool:
        if numbered is None or not self.session.ledger.record(numbered.number):
            return False
        self._sink.received(now - numbered.sent_ns, replayed)
        return True

    def _check_position(self, position: bytes, number: int) -> None:
        """
        Within one epoch, a position's sequence number and the message's
        number differ by a constant (the messages the session's history
        held before the stream began).
        """
        session = self.session
        epoch, _, stream_id = position.partition(b":")
        try:
            seq = int(stream_id.rpartition(b"-")[2])
        except ValueError:
            session.position_mismatches += 1
            return
        if epoch != session.epoch:
            if session.epoch:
                session.epoch_changes += 1
            session.epoch = epoch
            session.offset = seq - number
        elif seq - number != session.offset:
            session.position_mismatches += 1

    def _control(self, body: bytes) -> None:
        try:
            event = json.loads(body)
        except ValueError:
            self.session.corrupt += 1
            return
        if not isinstance(event, dict) or event.get("type") != "recovery":
            return
        recovered = event.get("recovered") is True
        replayed = event.get("replayed")
        replayed = replayed if isinstance(replayed, int) else 0
        self._replaying += replayed
        position = event.get("position")
        if replayed == 0 and isinstance(position, str):
            self.session.position = position
        reason = event.get("reason")
        self._sink.recovery(recovered, replayed, reason if isinstance(reason, str) else "")
