"""
The format of every message the tool sends, downstream through Redis and
upstream through the proxy: a fixed ASCII header, so that whoever receives a
message can tell its phase, when it was sent, which session it was meant for
and its place in that session's order, then padding up to ``--size`` bytes.

    tag (1) | send time, ns since the epoch (19 digits) | session index (8) | sequence number (8)
"""

from __future__ import annotations

import time

HEADER_LEN = 36
MIN_SIZE = HEADER_LEN

# the header's fields, for slicing a received payload
SENT_AT = slice(1, 20)
SESSION_INDEX = slice(20, 28)
SEQUENCE = slice(28, 36)

# the first byte of each phase's messages: a late message from an earlier
# phase is recognised as such instead of being counted twice
PHASE_TAGS = {"down": ord("B"), "paced": ord("P"), "up": ord("U"), "uppaced": ord("Q")}


def header(tag: int, session_index: int, sequence: int) -> bytes:
    """The header of a message sent now."""
    return b"%c%019d%08d%08d" % (tag, time.time_ns(), session_index, sequence)


def padding(size: int, binary: bool) -> bytes:
    """
    What follows the header in a message of ``size`` bytes. 0xff never
    appears in valid UTF-8, so a binary payload cannot be taken for text.
    """
    return (b"\xff" if binary else b".") * (size - HEADER_LEN)
