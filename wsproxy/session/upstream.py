"""
Durable upstream (C{UPSTREAM=stream}): each client message is appended with
C{XADD} to one of a fixed number of partition streams instead of being
published on C{session:{id}:up}, so that backends read it with consumer
groups and nothing a client sent is lost while no backend runs.

A client may opt in to acknowledgements with C{?ack=1} (beside
C{?resume=}, both may be given). Each of its data frames is then
C{<message id>\\n<message>} and, once Redis has stored the entry, the proxy
answers with a control frame C{!{"type":"ack","id":…,"position":<entry id>}};
if the append fails (a Redis error such as OOM, no connection, no answer in
time, the connection lost before the answer) it answers
C{!{"type":"nack","id":…,"reason":…}} instead. An ack is only ever sent
for an entry id Redis returned. A nack means "not known to be stored": the
client sends the message again with the same id, and backends drop the
duplicates by id.

This module only encodes; L{wsproxy.websocket.protocol.ProxyProtocol} sends the
commands on the command connection (the lean, callback path PUBLISH uses)
and keeps the count of appends in flight per connection.
"""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import txredisapi

from ..names import upstream_partition, upstream_stream
from ..redis.redislink import RedisTimeout, RedisUnavailable
from ..refusal import Refusal

#: the query parameter by which a client opts in to acknowledgements
ACK_PARAM = "ack"

#: a client message id: what a client puts before the first newline
MESSAGE_ID = re.compile(rb"[A-Za-z0-9._~:-]{1,64}\Z")

_TYPE = {False: b"$4\r\ntext\r\n", True: b"$6\r\nbinary\r\n"}


class InvalidEnvelope(ValueError):
    """
    A data frame of an acknowledging client without a valid message id.
    """


def ack_request(uri: str, enabled: bool) -> bool:
    """
    Whether the request asks for acknowledgements (C{?ack=1}).

    @param uri: the request target (path and query).
    @param enabled: whether the proxy runs with C{UPSTREAM=stream}.
    @raise Refusal: 400 if acknowledgements are asked of a Pub/Sub proxy,
        or the value is not C{1}.
    """
    if ACK_PARAM not in uri:
        return False  # the plain path pays one substring test
    values = parse_qs(urlsplit(uri).query, keep_blank_values=True).get(ACK_PARAM)
    if values is None:
        return False
    if not enabled:
        raise Refusal(400, "Acknowledgements need UPSTREAM=stream")
    if values != ["1"]:
        raise Refusal(400, "Invalid ack parameter")
    return True


def split_envelope(frame: bytes) -> tuple[bytes, bytes]:
    """
    C{<message id>\\n<message>} → (message id, message).

    @raise InvalidEnvelope: no newline, or an id that is not 1 to 64 of
        C{[A-Za-z0-9._~:-]}.
    """
    message_id, newline, message = frame.partition(b"\n")
    if not newline or MESSAGE_ID.match(message_id) is None:
        raise InvalidEnvelope("a message must start with <id>\\n, id 1-64 of [A-Za-z0-9._~:-]")
    return message_id, message


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


class Appender:
    """
    The C{XADD} of one connection's messages, its constant part encoded
    once:

        XADD wsproxy:up:{p<n>} MAXLEN ~ <max> * session <sid> agent <agent>
             conn <connection id> type text|binary data <message> [id <message id>]
    """

    __slots__ = ("key", "_head", "_head_with_id")

    def __init__(
        self, session_id: str, agent_id: str, connection_id: str, partitions: int,
        max_length: int,
    ) -> None:
        self.key = upstream_stream(upstream_partition(session_id, partitions))
        args = (
            b"XADD", self.key.encode(), b"MAXLEN", b"~", b"%d" % max_length, b"*",
            b"session", session_id.encode(), b"agent", agent_id.encode(),
            b"conn", connection_id.encode(), b"type",
        )
        body = b"".join(_bulk(a) for a in args)
        self._head = b"*%d\r\n" % (len(args) + 3) + body
        self._head_with_id = b"*%d\r\n" % (len(args) + 5) + body

    def command(self, message: bytes, binary: bool, message_id: bytes = b"") -> bytes:
        """
        The whole command, in RESP, for one message.
        """
        if message_id:
            return b"%b%b$4\r\ndata\r\n$%d\r\n%b\r\n$2\r\nid\r\n$%d\r\n%b\r\n" % (
                self._head_with_id, _TYPE[binary], len(message), message,
                len(message_id), message_id,
            )
        return b"%b%b$4\r\ndata\r\n$%d\r\n%b\r\n" % (
            self._head, _TYPE[binary], len(message), message,
        )


def ack_frame(message_id: bytes, entry_id: bytes) -> bytes:
    """
    The ack control frame, built without a JSON encoder: a message id
    (L{MESSAGE_ID}) and an entry id (digits and a dash) need no escaping.
    """
    return b'!{"type":"ack","id":"%b","position":"%b"}' % (message_id, entry_id)


def nack(message_id: bytes, reason: str) -> dict[str, object]:
    return {"type": "nack", "id": message_id.decode(), "reason": reason}


def failure_reason(reply: Any) -> str:
    """
    Why an append failed, for the client and the log: short, and with
    nothing but what Redis or the link said (no secret is ever in it).
    """
    if isinstance(reply, RedisTimeout):
        return "redis timeout"
    if isinstance(reply, RedisUnavailable):
        return "redis unavailable"
    if isinstance(reply, txredisapi.ResponseError):
        return str(reply)[:200]
    return "append failed"


def entry_id(reply: Any) -> Optional[bytes]:
    """
    The entry id of a successful C{XADD}, else C{None}.
    """
    return reply if reply.__class__ is bytes else None
