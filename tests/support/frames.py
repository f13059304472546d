"""
WebSocket frames on the wire, for clients that speak raw bytes: L{frame}
builds a client frame whose every field can be set to something invalid
(L{client_frame}: a plain masked one), L{parse_frames} splits what a server
sent, L{close_of} finds the close code.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: Optional[int] = None,
    key: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """
    One WebSocket frame as a client would send it (masked), or not quite:
    every field can be set to something invalid. C{length} declares a
    payload length other than the real one; C{rsv} is the 3-bit RSV field.
    """
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    n = len(payload) if length is None else length
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 1 << 16:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def close_frame(code: int, reason: bytes = b"", **kwargs: Any) -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason, **kwargs)


def parse_frames(data: bytes) -> tuple[list[tuple[bool, int, int, bytes]], bytes]:
    """
    Split C{data} into complete frames (fin, rsv, opcode, payload) and the
    incomplete rest.
    """
    frames = []
    at = 0
    while True:
        if len(data) - at < 2:
            break
        b0, b1 = data[at], data[at + 1]
        n = b1 & 0x7F
        pos = at + 2
        if n == 126:
            if len(data) - pos < 2:
                break
            (n,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif n == 127:
            if len(data) - pos < 8:
                break
            (n,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        key = b""
        if b1 & 0x80:
            if len(data) - pos < 4:
                break
            key = data[pos : pos + 4]
            pos += 4
        if len(data) - pos < n:
            break
        payload = data[pos : pos + n]
        if key:
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        frames.append((bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF, payload))
        at = pos + n
    return frames, data[at:]


def close_of(frames: list[tuple[bool, int, int, bytes]]) -> Optional[tuple[int, bytes]]:
    """
    (code, reason) of the first close frame, if any (code 1005 if empty).
    """
    for _, _, opcode, payload in frames:
        if opcode == OP_CLOSE:
            if len(payload) < 2:
                return 1005, b""
            return struct.unpack("!H", payload[:2])[0], payload[2:]
    return None


def client_frame(payload: bytes, opcode: int = OP_TEXT, fin: bool = True,
                 mask: bytes = b"\x5a\x0f\xc3\x81") -> bytes:
    """
    One masked frame, as a client must send it (RFC 6455 section 5.2).
    """
    return frame(opcode, payload, fin=fin, key=mask)
