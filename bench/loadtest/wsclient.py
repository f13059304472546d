"""
A minimal RFC 6455 client on asyncio, lean enough for two processes to hold
10,000 connections and take 100,000 messages a second: the opening handshake
(token as ``Authorization: Bearer`` or ``?access_token=``), masked frames out,
unmasked frames in (fragments reassembled), pings answered, and the close
handshake from either side. What a message means is up to a subclass.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MAX_RESPONSE_HEAD = 65536
# after answering a server's close frame, how long the server has to close the TCP connection
CLOSE_WAIT_SECS = 5.0

_random_bits = random.getrandbits


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client-to-server frame, FIN set."""
    length = len(payload)
    key = _random_bits(32).to_bytes(4, "big")
    if length:
        mask = (key * ((length + 3) >> 2))[:length]
        masked = (int.from_bytes(payload, "big")
                  ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
    else:
        masked = b""
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + length.to_bytes(8, "big")
    return head + key + masked


class HandshakeError(Exception):
    """The server did not complete the opening handshake."""


def error_name(exc: BaseException) -> str:
    """A short name for why a connection failed, to count failures by."""
    if isinstance(exc, HandshakeError):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__


def accept_value(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer to Sec-WebSocket-Key ``key``."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


@dataclass(frozen=True)
class UpgradeRequest:
    """What every client's opening handshake has in common."""

    host_header: bytes
    path_prefix: str
    agent: str
    token_in_query: bool  # ?access_token= instead of Authorization: Bearer

    def encode(self, session_id: str, token: str, key: bytes) -> bytes:
        path = f"{self.path_prefix}/{self.agent}/ws/{session_id}"
        authorization = b""
        if self.token_in_query:
            path += "?access_token=" + quote(token, safe="")
        else:
            authorization = b"Authorization: Bearer " + token.encode() + b"\r\n"
        return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + self.host_header
                + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
                + key + b"\r\nSec-WebSocket-Version: 13\r\n" + authorization + b"\r\n")


class WebSocketClient(asyncio.Protocol):
    """
    One client connection. C{handshake} resolves once the connection is open
    (or fails with L{HandshakeError}); then complete data messages go to
    L{on_message}. Subclasses override the C{on_*} hooks.
    """

    __slots__ = ("session_id", "token", "transport", "handshake", "is_open", "closing",
                 "close_code", "lost", "_loop", "_request", "_key", "_buffer",
                 "_fragment_opcode", "_fragments")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: UpgradeRequest,
                 session_id: str, token: str) -> None:
        self.session_id = session_id
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.is_open = False
        # this side has sent a close frame (its own, or the answer to the server's)
        self.closing = False
        # the code of the close frame received, if any
        self.close_code: int | None = None
        # the TCP connection has ended
        self.lost = False
        self._loop = loop
        self._request = request
        self._key = b""
        self._buffer = b""
        self._fragment_opcode = 0
        self._fragments: list[bytes] | None = None

    # -- hooks

    def on_open(self) -> None:
        """The opening handshake succeeded."""

    def on_lost(self, dropped: bool) -> None:
        """
        The TCP connection of an open client ended; C{dropped} if this side
        had not started closing it.
        """

    def on_server_close(self, code: int) -> None:
        """The server started the close handshake (this side answers it)."""

    def on_message(self, opcode: int, payload: bytes, now: int) -> bool:
        """
        A complete data message, received at C{now} (ns since the epoch).
        Returns whether it counts as delivered.
        """
        return False

    def on_delivered(self, count: int, now: int) -> None:
        """C{count} messages of one read counted as delivered."""

    def on_protocol_error(self) -> None:
        """The server broke RFC 6455 (a masked frame, a stray continuation)."""

    # -- commands

    def can_send(self) -> bool:
        return (self.is_open and not self.closing and self.transport is not None
                and not self.transport.is_closing())

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def begin_close(self, close_frame: bytes) -> None:
        """Starts the close handshake with an already built close frame."""
        self.closing = True
        self.write(close_frame)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection() always gives a stream transport
        self.transport = cast(asyncio.Transport, transport)
        self._key = base64.b64encode(os.urandom(16))
        self.transport.write(self._request.encode(self.session_id, self.token, self._key))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(
                "closed during handshake" if exc is None else error_name(exc)))
        if self.is_open:
            self.is_open = False
            self.on_lost(dropped=not self.closing)

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if not self.is_open:
            if self.handshake.done():
                return
            rest = self._read_handshake_response(data)
            if not rest:
                return
            data = rest
        self._read_frames(data)

    # -- the opening handshake

    def _read_handshake_response(self, data: bytes) -> bytes | None:
        """
        Reads the server's answer to the upgrade. Returns the bytes after it
        once the connection is open; None while incomplete (buffered) or if
        the handshake failed.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_RESPONSE_HEAD:
                self._fail("oversized handshake response")
            else:
                self._buffer = data
            return None
        head = data[:end].split(b"\r\n")
        status_line = head[0].split(b" ", 2)
        try:
            status = int(status_line[1])
        except (IndexError, ValueError):
            self._fail("bad status line")
            return None
        if status != 101:
            self._fail(f"http {status}")
            return None
        expected = accept_value(self._key)
        accepted = False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-accept":
                accepted = value.strip() == expected
        if not accepted:
            self._fail("bad Sec-WebSocket-Accept")
            return None
        self.is_open = True
        self.on_open()
        self.handshake.set_result(None)
        return data[end + 4:]

    def _fail(self, reason: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(reason))
        self.abort()

    # -- frames

    def _read_frames(self, data: bytes) -> None:
        """Handles every complete frame in C{data} and keeps the rest for the next read."""
        now = time.time_ns()
        size = len(data)
        pos = 0
        delivered = 0
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1]
            start = pos + 2
            if length & 0x80:  # servers must not mask
                self.on_protocol_error()
                self.abort()
                return
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            pos = end
            opcode = first & 0x0F
            if opcode >= OP_CLOSE:
                self._on_control_frame(opcode, data[start:end])
                continue
            message = self._assemble(opcode, bool(first & 0x80), data[start:end])
            if message is not None and self.on_message(message[0], message[1], now):
                delivered += 1
        if pos < size:
            self._buffer = data[pos:]
        if delivered:
            self.on_delivered(delivered, now)

    def _assemble(self, opcode: int, fin: bool, payload: bytes) -> tuple[int, bytes] | None:
        """A complete data message (opcode, payload), or None while fragments are pending."""
        if opcode == OP_TEXT or opcode == OP_BINARY:
            if fin:
                return opcode, payload
            self._fragment_opcode = opcode
            self._fragments = [payload]
            return None
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                self.on_protocol_error()
                return None
            self._fragments.append(payload)
            if not fin:
                return None
            message = b"".join(self._fragments)
            self._fragments = None
            return self._fragment_opcode, message
        return None  # reserved

    def _on_control_frame(self, opcode: int, body: bytes) -> None:
        if opcode == OP_PING:
            if not self.closing:
                self.write(client_frame(OP_PONG, body))
        elif opcode == OP_CLOSE:
            self._on_close_frame(body)
        # pongs and reserved control opcodes are ignored

    def _on_close_frame(self, body: bytes) -> None:
        if self.close_code is not None:
            return
        self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
        if not self.closing:
            # the server started closing: answer it; the server then closes the
            # TCP connection (RFC 6455 7.1.1), abort if it doesn't
            self.closing = True
            self.on_server_close(self.close_code)
            self.write(client_frame(OP_CLOSE, body[:2]))
            self._loop.call_later(CLOSE_WAIT_SECS, self.abort)
