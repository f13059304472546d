"""
The benchmark's messages, and the ledger each session's deliveries are
checked against.

A message is C{<session index:8> <number:10> <publish time, ns:19> } then
padding up to C{--size} bytes: whoever receives it can tell which session it
was meant for, its place in that session's stream (1, 2, 3, ...; 0 is the
priming message, never delivered) and how long it took to arrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

HEADER_LEN = 40
MIN_SIZE = HEADER_LEN


def message(index: int, number: int, size: int) -> bytes:
    """Message C{number} of session C{index}, published now."""
    head = b"%08d %010d %019d " % (index, number, time.time_ns())
    return head + b"." * (size - HEADER_LEN)


@dataclass(frozen=True)
class Numbered:
    index: int
    number: int
    sent_ns: int


def parse(payload: bytes) -> Numbered | None:
    """The header of a received message, or None if it is not one of ours."""
    if len(payload) < HEADER_LEN or payload[8:9] != b" " or payload[19:20] != b" ":
        return None
    try:
        return Numbered(int(payload[0:8]), int(payload[9:19]), int(payload[20:39]))
    except ValueError:
        return None


class Ledger:
    """
    The numbers one session received, over all of its connections: each
    number should arrive once (else a duplicate), never after a higher one
    (else reordered), and every number published should arrive at last
    (else missing: a gap).
    """

    __slots__ = ("seen", "highest", "duplicates", "reordered")

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = 0
        self.duplicates = 0
        self.reordered = 0

    def record(self, number: int) -> bool:
        """Whether C{number} arrived for the first time (a delivery)."""
        if number in self.seen:
            self.duplicates += 1
            return False
        if number < self.highest:
            self.reordered += 1
        else:
            self.highest = number
        self.seen.add(number)
        return True

    def missing(self, sent: int) -> list[int]:
        """The numbers 1..C{sent} that never arrived."""
        seen = self.seen
        return [n for n in range(1, sent + 1) if n not in seen]

    def unexpected(self, sent: int) -> int:
        """Numbers that arrived but were never published as part of the stream."""
        return sum(1 for n in self.seen if n < 1 or n > sent)
