"""
Many acknowledging clients (C{UPSTREAM=stream}, C{?ack=1}) each sending
numbered messages continuously, for the planned-failover tests and their
bench (L{bench.switch}): what each sent, what was acked, nacked, and
whether any was closed; and what a stream holds, checked against that.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable, Optional

from twisted.internet import reactor, task

from .clients import connect


class Sender:
    """
    One client sending C{<session>-<n>\\n<n>} every C{interval} seconds.

    @ivar sent: the ids sent, in order.
    @ivar acked: ids acked, nacked: id to reason.
    @ivar gaps: the longest time between two acks while sending (a client
        held or paused sees its acks stop).
    """

    def __init__(self, session: str, client: Any, interval: float) -> None:
        self.session = session
        self.client = client
        self.interval = interval
        self.sent: list[str] = []
        self.acked: list[str] = []
        self.nacked: dict[str, str] = {}
        self.longest_gap = 0.0
        self._last_ack: Optional[float] = None
        self._seen = 0
        self._loop = task.LoopingCall(self._send)

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _send(self) -> None:
        if self.client.state != self.client.STATE_OPEN:
            self.stop()
            return
        message_id = f"{self.session}-{len(self.sent)}"
        self.sent.append(message_id)
        self.client.sendMessage(f"{message_id}\n{len(self.sent)}".encode(), False)
        self.read()

    def read(self) -> None:
        """
        Take the acks and nacks received since the last call.
        """
        messages = self.client.messages
        for payload, binary in messages[self._seen:]:
            if binary or not payload.startswith(b"!"):
                continue
            control = json.loads(payload[1:])
            if control.get("type") == "ack":
                self.acked.append(control["id"])
                now = time.monotonic()
                if self._last_ack is not None and self._loop.running:
                    self.longest_gap = max(self.longest_gap, now - self._last_ack)
                self._last_ack = now
            elif control.get("type") == "nack":
                self.nacked[control["id"]] = control["reason"]
        self._seen = len(messages)

    @property
    def answered(self) -> int:
        self.read()
        return len(self.acked) + len(self.nacked)

    @property
    def closed(self) -> Optional[int]:
        """
        The close code, if the client was closed.
        """
        if self.client.state == self.client.STATE_OPEN:
            return None
        return getattr(self.client, "close_code", -1)


class Senders:
    """
    C{n} L{Sender}s, sessions C{<prefix><i>}, authorized by C{authorize}
    (session, token) before they connect to C{url(session)}.
    """

    def __init__(self, senders: list[Sender]) -> None:
        self.senders = senders

    @classmethod
    async def open(
        cls,
        test: Any,
        n: int,
        url: Callable[[str], str],
        authorize: Callable[[str], Any],
        interval: float = 0.05,
        prefix: str = "s",
    ) -> "Senders":
        senders = []
        for i in range(n):
            session = f"{prefix}{i}"
            authorize(session)
            client = await connect(url(session), token="tok")
            test.addCleanup(client.close_and_wait)
            senders.append(Sender(session, client, interval))
        return cls(senders)

    def start(self) -> None:
        for sender in self.senders:
            sender.start()

    def stop(self) -> None:
        for sender in self.senders:
            sender.stop()

    async def acked_more(self, n: int = 10, timeout: float = 30.0,
                         what: str = "more acks") -> None:
        """
        Every client is acked C{n} more messages than it has sent so far
        (the proxy has carried on after a change), then all stop and every
        message is answered.
        """
        from .sentinel import wait

        counts = [len(s.sent) for s in self.senders]
        await wait(lambda: all(len(s.acked) >= count + n
                               for s, count in zip(self.senders, counts)),
                   timeout, what)
        self.stop()
        await self.settled()

    async def settled(self, timeout: float = 30.0) -> None:
        """
        Every message sent is acked or nacked (or its client closed).
        """
        deadline = time.monotonic() + timeout
        while not all(s.answered == len(s.sent) or s.closed is not None
                      for s in self.senders):
            if time.monotonic() > deadline:
                raise AssertionError(
                    "not every message answered: " + ", ".join(
                        f"{s.session} {s.answered}/{len(s.sent)}" for s in self.senders
                        if s.answered != len(s.sent))
                )
            await task.deferLater(reactor, 0.05, lambda: None)

    @property
    def sent(self) -> int:
        return sum(len(s.sent) for s in self.senders)

    @property
    def closed(self) -> dict[str, int]:
        return {s.session: code for s in self.senders
                if (code := s.closed) is not None}

    @property
    def nacked(self) -> dict[str, str]:
        return {i: r for s in self.senders for i, r in s.nacked.items()}

    @property
    def longest_gap(self) -> float:
        return max((s.longest_gap for s in self.senders), default=0.0)


def stored_ids(entries: Iterable[tuple[Any, dict[bytes, bytes]]]) -> list[str]:
    """
    The message ids of stream entries (XRANGE), in stream order.
    """
    return [fields[b"id"].decode() for _, fields in entries if b"id" in fields]


def missing(senders: Senders, stored: list[str]) -> dict[str, list[int]]:
    """
    Per session, the numbers of the acked messages that C{stored} lacks;
    also checks that each session's stored messages are in the order sent
    (raises AssertionError otherwise).
    """
    by_session: dict[str, list[int]] = {}
    for message_id in stored:
        session, _, n = message_id.rpartition("-")
        by_session.setdefault(session, []).append(int(n))
    lost: dict[str, list[int]] = {}
    for sender in senders.senders:
        numbers = by_session.get(sender.session, [])
        if numbers != sorted(numbers):
            raise AssertionError(f"{sender.session}: stored out of order: {numbers}")
        have = set(numbers)
        gone = [int(i.rpartition("-")[2]) for i in sender.acked
                if int(i.rpartition("-")[2]) not in have]
        if gone:
            lost[sender.session] = gone
    return lost
