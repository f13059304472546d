"""
Session control for backends, through Redis alone: lifecycle events
(a socket opened or closed), server-side close of a session's sockets on
every proxy instance, and the instance heartbeat that tells a backend a
proxy process is gone.

Nothing here is on the message path. Events are published fire-and-forget
on the command connection's lean path: a Redis outage drops them (counted,
logged at most once a minute), it never delays or fails an open or close.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable, Iterable, Literal, Optional, Protocol

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import EventTarget
from ..metrics import Stats
from ..names import (
    ALL_EVENTS_CHANNEL,
    EVENTS_STREAM,
    events_channel,
    instance_key,
    valid_session_id,
    valid_topic,
)
from ..redis.redislink import Commands

#: who ended a connection, as close events say
ClosedBy = Literal[
    "client", "server", "timeout", "slow_consumer", "shutdown", "error", "protocol_error",
    "token_expired",
]

#: close codes a backend may ask for: normal, going away, policy violation,
#: and the application's own range
ALLOWED_CODES = frozenset({1000, 1001, 1008}) | frozenset(range(4000, 5000))

#: a WebSocket close reason must fit a control frame (125 bytes - 2 for the code)
MAX_REASON_BYTES = 123

#: heartbeat period and the TTL of the instance key (3 missed beats)
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TTL = 15


class Closable(Protocol):
    """
    What a server-side close needs of a connection.
    """

    def server_close(self, code: int, reason: str) -> None: ...


class Events:
    """
    Publishes lifecycle events where C{EVENTS} says: the session's channel,
    the channel of all sessions, a bounded stream.
    """

    _log = Logger()

    def __init__(
        self,
        link: Commands,
        targets: Iterable[EventTarget],
        stream_max_length: int,
        stats: Stats,
        clock: IReactorTime,
    ) -> None:
        self._link = link
        self._targets = tuple(targets)
        self._stream_max_length = str(stream_max_length).encode()
        self._stats = stats
        self._clock = clock
        self._last_drop_log = -1e9
        self._drops_since_log = 0

    @property
    def enabled(self) -> bool:
        return bool(self._targets)

    def publish(self, session_id: str, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        for target in self._targets:
            if target == "session":
                self._link.publish(events_channel(session_id).encode(), data, self._replied)
            elif target == "all":
                self._link.publish(ALL_EVENTS_CHANNEL.encode(), data, self._replied)
            else:
                self._link.send(
                    self._replied, b"XADD", EVENTS_STREAM.encode(),
                    b"MAXLEN", b"~", self._stream_max_length, b"*", b"event", data,
                )

    def _replied(self, reply: Any) -> None:
        if not isinstance(reply, Exception):
            self._stats.events_published += 1
            return
        self._stats.events_dropped += 1
        self._drops_since_log += 1
        now = self._clock.seconds()
        if now - self._last_drop_log >= 60:
            self._log.warn(
                "lifecycle events dropped: {n} since the last report ({why})",
                n=self._drops_since_log, why=str(reply),
            )
            self._last_drop_log = now
            self._drops_since_log = 0


class Heartbeat:
    """
    C{SET wsproxy:instance:<id> <json> EX 15} every 5 s while the process
    runs, deleted on a clean shutdown: a backend that sees the key gone
    knows that instance's sockets are gone too, close events or not.
    """

    def __init__(self, link: Commands, instance: str, clock: IReactorTime) -> None:
        self._link = link
        self._key = instance_key(instance).encode()
        self._value = json.dumps({
            "instance": instance, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.time(),
        }).encode()
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(HEARTBEAT_INTERVAL, now=True)

    def beat(self) -> None:
        self._link.send(
            lambda reply: None, b"SET", self._key, self._value, b"EX", b"%d" % HEARTBEAT_TTL
        )

    def beat_now(self) -> None:
        """
        The command connection is (again) usable: renew at once.
        """
        if self._loop.running:
            self.beat()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._link.send(lambda reply: None, b"DEL", self._key)


#: what a backend asks of a session's sockets besides closing them
TopicChange = Literal["subscribe", "unsubscribe"]

#: topics one control message may name
MAX_TOPICS_PER_MESSAGE = 1024


class Control:
    """
    The listener of C{wsproxy:control}: closes the local sockets of the
    session a backend names, or (C{TOPICS=true}) makes them join or leave
    topics.

    A control message is JSON: C{{"close": "<session id>", "code": 4001,
    "reason": "banned"}} (code and reason optional: 1000, "");
    C{{"subscribe": "<session id>", "topic": "<name>"}} or
    C{{"unsubscribe": "<session id>", "topics": ["<name>", ...]}}. Anything
    else is ignored with a log line (at most one a minute for the same
    kind of problem): it never closes another session's socket, nor the
    process.
    """

    _log = Logger()

    def __init__(
        self,
        sockets_of: Callable[[str], Iterable[Closable]],
        stats: Stats,
        clock: IReactorTime,
        topics: Optional[Callable[[str, TopicChange, list[str]], None]] = None,
    ) -> None:
        self._sockets_of = sockets_of
        self._stats = stats
        self._clock = clock
        self._logged: dict[str, float] = {}
        #: TOPICS: applies a topic change to the session's local sockets
        self._topics = topics

    def deliver(self, payload: bytes) -> None:
        try:
            order = self._parse(payload)
        except ValueError as e:
            self._stats.control_ignored += 1
            self._complain(str(e))
            return
        if isinstance(order, TopicOrder):
            if self._topics is None:
                self._stats.control_ignored += 1
                self._complain("a topic change on a proxy without TOPICS=true")
                return
            self._stats.topic_changes += 1
            self._topics(order.session_id, order.change, order.topics)
            return
        session_id, code, reason = order
        closed = 0
        for connection in list(self._sockets_of(session_id)):
            connection.server_close(code, reason)
            closed += 1
        self._stats.server_closes += closed
        if closed:
            self._log.info(
                "closing {n} sockets of session {session_id} on request: {code} {reason}",
                n=closed, session_id=session_id, code=code, reason=reason,
            )

    @staticmethod
    def _parse(payload: bytes) -> "tuple[str, int, str] | TopicOrder":
        if len(payload) > 256 * 1024:
            raise ValueError("control message over 256 KiB")
        try:
            message = json.loads(payload)
        except ValueError:
            raise ValueError("control message is not JSON") from None
        if not isinstance(message, dict):
            raise ValueError("control message is not a JSON object")
        if "subscribe" in message:
            return TopicOrder.parse("subscribe", message)
        if "unsubscribe" in message:
            return TopicOrder.parse("unsubscribe", message)
        if len(payload) > 4096:
            raise ValueError("control message over 4 KiB")
        session_id = message.get("close")
        if not isinstance(session_id, str) or not valid_session_id(session_id):
            raise ValueError("control message without a valid session id in \"close\"")
        code = message.get("code", 1000)
        if not isinstance(code, int) or isinstance(code, bool) or code not in ALLOWED_CODES:
            raise ValueError("close code must be 1000, 1001, 1008 or 4000-4999")
        reason = message.get("reason", "")
        if not isinstance(reason, str) or len(reason.encode("utf-8")) > MAX_REASON_BYTES:
            raise ValueError(f"close reason must be a string of at most {MAX_REASON_BYTES} bytes")
        return session_id, code, reason

    def _complain(self, problem: str) -> None:
        now = self._clock.seconds()
        if now - self._logged.get(problem, -1e9) < 60:
            return
        if len(self._logged) > 64:
            self._logged.clear()
        self._logged[problem] = now
        self._log.warn("ignored a message on wsproxy:control: {problem}", problem=problem)


class TopicOrder:
    """
    A backend's C{subscribe} or C{unsubscribe} of a session to topics.
    """

    __slots__ = ("change", "session_id", "topics")

    def __init__(self, change: TopicChange, session_id: str, topics: list[str]) -> None:
        self.change = change
        self.session_id = session_id
        self.topics = topics

    @classmethod
    def parse(cls, change: TopicChange, message: dict[str, Any]) -> "TopicOrder":
        session_id = message.get(change)
        if not isinstance(session_id, str) or not valid_session_id(session_id):
            raise ValueError(f"control message without a valid session id in \"{change}\"")
        if "topic" in message and "topics" in message:
            raise ValueError("control message with both \"topic\" and \"topics\"")
        topics = message["topics"] if "topics" in message else [message.get("topic")]
        if (not isinstance(topics, list) or not topics or len(topics) > MAX_TOPICS_PER_MESSAGE
                or not all(isinstance(t, str) and valid_topic(t) for t in topics)):
            raise ValueError(
                "a topic change needs \"topic\" (a topic name) or \"topics\" (a list of 1 to "
                f"{MAX_TOPICS_PER_MESSAGE} of them): 1-128 of [A-Za-z0-9._~-]"
            )
        return cls(change, session_id, list(dict.fromkeys(topics)))


def connection_event(
    kind: Literal["open", "close", "join", "leave"],
    session_id: str,
    agent_id: Optional[str],
    connection_id: str,
    instance: str,
    peer: Optional[str],
    opened_at: float,
    **close: Any,
) -> dict[str, Any]:
    """
    One event's JSON object (docs/reference/protocol.md documents each field).
    """
    event: dict[str, Any] = {
        "event": kind,
        "session_id": session_id,
        "agent_id": agent_id,
        "connection_id": connection_id,
        "instance": instance,
        "peer": peer,
        "time": round(time.time(), 6),
        "opened_at": round(opened_at, 6),
    }
    event.update(close)
    return event
