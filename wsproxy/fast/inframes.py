"""
Client frames read without Autobahn on the common path.

Almost every frame a client sends is one whole message: unfragmented, text
or binary, masked, small, complete in one read. Autobahn handles each one
through a dozen method calls (frame header object, masker object, UTF-8
validator, message begin / frame begin / data / end events), a third of
the proxy's cost per upstream message. L{simple_frame} reads exactly such
a frame and nothing else; for anything else (control frames, fragments,
reserved bits, a 64-bit length, a frame over the size limit, one not yet
complete, text that is not UTF-8) it returns C{None} and the connection
hands the bytes from that frame on to Autobahn, which applies RFC 6455 in
full (closing with 1002, 1007 or 1009 where it must).

Whether a connection may read a frame here at all is told from Autobahn's
own state of it (C{state}, C{current_frame}, C{data}, C{inside_message},
C{autoPingTimeoutCall}, C{_perMessageCompress}: no frame or message in
progress, no pong awaited); L{ENABLED} is cleared by the start-up check
(L{wsproxy.fast.borrowed}) if those no longer mean what they meant, and
every read then goes to Autobahn's own C{dataReceived}.

Large payloads are unmasked with Autobahn's native (NVX) masker when
Autobahn itself uses NVX (C{autobahn.websocket.USES_NVX}: built, and not
switched off with C{AUTOBAHN_USE_NVX=0}), else in pure Python like small
ones; the start-up check also falls back to pure Python if the native
masker fails on a known vector.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

#: cleared by the start-up check if Autobahn's connection state can no
#: longer tell that a read may be taken here (see the module docstring)
ENABLED = True

#: payloads up to this size are unmasked with Python integers (a fraction
#: of a microsecond for 100 bytes); larger ones with Autobahn's SIMD masker
#: (whose set-up costs a few microseconds) when it is in use
_SMALL = 2048


def unmask_pure(masked: bytes, mask: bytes) -> bytes:
    """
    C{masked} XORed with the 4-byte C{mask} repeated, with Python integers.
    """
    n = len(masked)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(masked, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )


@functools.cache
def native_masker() -> Optional[Callable[[bytes, bytes], bytes]]:
    """
    Autobahn's native masker as C{unmask(masked, mask)}, if Autobahn uses
    NVX; else C{None}. (The same function at every call.)
    """
    try:
        from autobahn.websocket import USES_NVX

        if not USES_NVX:
            return None
        from autobahn.nvx._xormasker import XorMaskerShifted1
    except ImportError:
        return None

    def unmask_native(masked: bytes, mask: bytes) -> bytes:
        return bytes(XorMaskerShifted1(mask).process(masked))

    return unmask_native


#: how payloads over _SMALL bytes are unmasked (L{use_masker})
_unmask_large: Callable[[bytes, bytes], bytes] = native_masker() or unmask_pure


def use_masker(unmask_large: Callable[[bytes, bytes], bytes]) -> None:
    """
    Unmask payloads over C{_SMALL} bytes with C{unmask_large} from now on
    (the start-up check's fallback: L{unmask_pure}).
    """
    global _unmask_large
    _unmask_large = unmask_large


def large_masker() -> Callable[[bytes, bytes], bytes]:
    """
    What payloads over C{_SMALL} bytes are unmasked with.
    """
    return _unmask_large


def unmask(masked: bytes, mask: bytes) -> bytes:
    n = len(masked)
    if n > _SMALL:
        return _unmask_large(masked, mask)
    # unmask_pure, inline: once per client frame
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(masked, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )


def simple_frame(data: bytes, at: int, limit: int) -> Optional[Tuple[bytes, bool, int]]:
    """
    The client frame that starts at C{data[at]}, if it is a whole message
    that needs nothing of Autobahn: FIN set, no reserved bit, opcode text
    or binary, masked, a 7- or 16-bit length (minimally encoded) of at
    most C{limit} bytes (0: no limit), complete in C{data}, and if text,
    valid UTF-8.

    @return: (payload, is binary, offset after the frame), or C{None}.
    """
    end = len(data)
    if end - at < 6:
        return None
    b0 = data[at]
    b1 = data[at + 1]
    if (b0 != 0x81 and b0 != 0x82) or b1 < 0x80:
        return None
    n = b1 & 0x7F
    start = at + 6
    if n >= 126:
        if n == 127 or end - at < 8:
            return None
        n = (data[at + 2] << 8) | data[at + 3]
        if n < 126:
            return None
        start = at + 8
    stop = start + n
    if stop > end or (limit and n > limit):
        return None
    payload = unmask(data[start:stop], data[start - 4:start]) if n else b""
    if b0 == 0x81:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return payload, False, stop
    return payload, True, stop
