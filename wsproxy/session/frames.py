"""
How WebSocket messages map to Redis Pub/Sub payloads (C{FRAME_MODE}).

C{auto} (the default)
    Client messages, text or binary, are published on C{:up} unchanged.
    A C{:down} payload that is valid UTF-8 is sent as a text frame,
    anything else as a binary frame. JSON backends need nothing else.

C{tagged} (frame-exact)
    Every payload on C{:up} and C{:down} starts with one tag byte: C{t} for a
    text message, C{b} for a binary message; the message bytes follow. Frame
    types round-trip exactly, whatever the bytes. A C{:down} payload with any
    other first byte, or a C{t} payload that is not valid UTF-8, is not sent
    (browsers would close the connection with 1007) and is logged.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from ..config import FRAME_MODES, FrameMode

__all__ = ["FRAME_MODES", "FrameMode"]

TEXT_TAG = b"t"
BINARY_TAG = b"b"

#: (message bytes, isBinary), or None if the payload cannot be sent
Outgoing = Optional[Tuple[bytes, bool]]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def kind_binary(message: bytes, kind: bytes) -> Optional[bool]:
    """
    A recoverable message's frame type from its kind (C{wsproxy_publish}'s
    C{t}, C{b}, C{a}): binary for C{b}, by UTF-8 validity for C{a}, text
    for C{t}; C{None} for one declared text that is not UTF-8 (browsers
    would fail the connection: it is dropped).
    """
    if kind == b"b":
        return True
    if kind == b"a":
        return not is_utf8(message)
    return False if is_utf8(message) else None


def down_auto(payload: bytes) -> Outgoing:
    # is_utf8, inline: once per backend message; ASCII (most JSON) is
    # UTF-8 and is told without decoding
    if payload.isascii():
        return payload, False
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload, True
    return payload, False


def down_tagged(payload: bytes) -> Outgoing:
    tag = payload[:1]
    if tag == BINARY_TAG:
        return payload[1:], True
    if tag == TEXT_TAG:
        message = payload[1:]
        if is_utf8(message):
            return message, False
    return None


def up_auto(message: bytes, is_binary: bool) -> bytes:
    return message


def up_tagged(message: bytes, is_binary: bool) -> bytes:
    return (BINARY_TAG if is_binary else TEXT_TAG) + message


#: the two header bytes of an unfragmented, unmasked text or binary frame
#: of each length that fits in them
_SHORT_HEADS = {
    binary: [bytes((0x82 if binary else 0x81, n)) for n in range(126)]
    for binary in (False, True)
}


def frame(message: bytes, binary: bool) -> bytes:
    """
    C{message} as one unfragmented, unmasked frame (RFC 6455 section 5.2),
    as Autobahn's C{prepareMessage} builds it at a fifth of the cost: built
    once per backend message for every socket that sends it.
    """
    n = len(message)
    if n < 126:
        return _SHORT_HEADS[binary][n] + message
    first = 0x82 if binary else 0x81
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + message
    return bytes((first, 127)) + n.to_bytes(8, "big") + message


def codec(
    mode: FrameMode,
) -> tuple[Callable[[bytes], Outgoing], Callable[[bytes, bool], bytes]]:
    """
    The (down, up) conversion functions of a frame mode.
    """
    if mode == "tagged":
        return down_tagged, up_tagged
    if mode == "auto":
        return down_auto, up_auto
    raise ValueError(f"unknown frame mode {mode!r}")
