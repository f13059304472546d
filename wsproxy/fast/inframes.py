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
"""

from __future__ import annotations

from typing import Optional, Tuple

from autobahn.nvx._xormasker import XorMaskerShifted1

#: payloads up to this size are unmasked with Python integers (a fraction
#: of a microsecond for 100 bytes); larger ones with Autobahn's SIMD masker
#: (whose set-up costs a few microseconds)
_SMALL = 2048


def unmask(masked: bytes, mask: bytes) -> bytes:
    n = len(masked)
    if n > _SMALL:
        return bytes(XorMaskerShifted1(mask).process(masked))
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
