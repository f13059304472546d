"""
Server-Sent Events over a raw loopback connection: L{EventStream} (an
HTTP/1.1 GET that reads the response head, de-chunks the body and parses
it as an event stream the way EventSource does), L{open_stream} and
L{sse_request}.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from .base import wait_for


@dataclass
class Event:
    """
    One dispatched event, as EventSource sees it (C{data}: its data lines
    joined with C{\\n}).
    """

    data: str
    event: str = "message"
    id: Optional[str] = None

    def payload(self) -> bytes:
        """
        The message's bytes: base64-decoded for C{binary} and
        C{text-base64} events (their last data line), else the data.
        """
        if self.event in ("binary", "text-base64"):
            return base64.b64decode(self.data.split("\n")[-1])
        return self.data.encode()

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class _Pending:
    data: list[str] = field(default_factory=list)
    event: str = ""
    id: Optional[str] = None


def sse_request(path: str, headers: Optional[dict[str, str]] = None,
                method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class EventStream(protocol.Protocol):
    """
    A client of one request: its response's status and headers, and then
    its body, parsed as an event stream (L{events}, L{comments},
    L{retry}), or kept as bytes (L{body}) if it is not a 200.
    """

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.status: Optional[int] = None
        self.headers: dict[str, list[str]] = {}
        self.body = b""
        self.raw = b""
        self.events: list[Event] = []
        self.comments: list[str] = []
        self.retry: Optional[int] = None
        self.last_id: Optional[str] = None
        self._chunked = False
        self._text = b""
        self._pending = _Pending()
        self.head: defer.Deferred[Any] = defer.Deferred()
        self.done: defer.Deferred[Any] = defer.Deferred()
        self.ended = False
        #: the body's last chunk (0) came: the response is complete
        self.complete = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._buffer += data
        if self.status is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4:]
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ")[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers.setdefault(name.strip().lower(), []).append(value.strip())
            self._chunked = self.header("transfer-encoding") == "chunked"
            self.head.callback(self)
        self._body()

    def _body(self) -> None:
        if not self._chunked:
            data, self._buffer = self._buffer, b""
            self._content(data)
            return
        # (a chunk is taken whole, with its CRLF)
        while not self.complete:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                return
            size = int(self._buffer[:end].split(b";")[0], 16)
            if size == 0:
                self.complete = True
                self._buffer = b""
                return
            if len(self._buffer) < end + 2 + size + 2:
                return
            chunk = self._buffer[end + 2:end + 2 + size]
            self._buffer = self._buffer[end + 2 + size + 2:]
            self._content(chunk)

    def _content(self, data: bytes) -> None:
        self.body += data
        if self.status != 200:
            return
        self._text += data
        while True:
            end = self._text.find(b"\n")
            if end < 0:
                return
            line, self._text = self._text[:end].decode("utf-8"), self._text[end + 1:]
            self._line(line)

    def _line(self, line: str) -> None:
        pending = self._pending
        if line == "":
            if pending.data:
                self.events.append(Event("\n".join(pending.data), pending.event or "message",
                                         pending.id))
            self._pending = _Pending()
            return
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            pending.data.append(value)
        elif name == "event":
            pending.event = value
        elif name == "id":
            pending.id = self.last_id = value
        elif name == "retry":
            self.retry = int(value)

    def connectionLost(self, reason: Any = None) -> None:
        self.ended = True
        if not self.head.called:
            self.head.callback(self)
        self.done.callback(self)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.event == name]

    def messages(self) -> list[Event]:
        return [e for e in self.events if e.event not in ("recovery", "close")]

    async def wait_events(self, count: int, timeout: float = 5.0) -> list[Event]:
        await wait_for(lambda: len(self.events) >= count, timeout=timeout)
        return self.events

    def close(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.abortConnection()


async def open_stream(port: int, path: str, headers: Optional[dict[str, str]] = None,
                      method: str = "GET", test: Any = None) -> EventStream:
    """
    Send a request for C{path} on a fresh loopback connection; fires with
    the L{EventStream} once its response head arrived (or the connection
    ended). With C{test}, the connection is closed at its clean-up.
    """
    stream = EventStream(sse_request(path, headers, method))
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(protocol.Factory.forProtocol(lambda: stream))
    if test is not None:
        test.addCleanup(lambda: (stream.close(), stream.done)[1])
    await stream.head
    return stream
