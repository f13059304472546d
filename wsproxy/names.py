"""
The names a session lives under: the WebSocket path it is reached by, and
its Redis key and channels; and those of the topics sessions can be in.
Everything that spells C{session:{id}:...} or C{topic:{name}:...} is here,
so a change of layout is made in one place: C{KEY_HASH_TAGS=true} spells
them C{session:{<id>}:...} and C{topic:{<name>}:...} (one Redis Cluster
slot per session, and per topic).
"""

from __future__ import annotations

import re
import zlib
from typing import Optional
from urllib.parse import unquote

SESSION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}\Z")


def parse_ws_path(path: str) -> Optional[tuple[str, str]]:
    """
    Split C{/{agent_id}/ws/{session_id}} into (agent_id, session_id).

    @return: C{None} if the path does not have that shape (404); the parts
        otherwise, percent-decoded. The session id still has to be checked
        with L{valid_session_id} (400).
    """
    parts = path.split("?", 1)[0].split("/")
    if len(parts) != 4 or parts[0] != "" or parts[2] != "ws" or not parts[1] or not parts[3]:
        return None
    return unquote(parts[1]), unquote(parts[3])


def parse_sse_path(path: str) -> Optional[tuple[str, str]]:
    """
    Split C{/{agent_id}/sse/{session_id}} (a Server-Sent Events stream)
    into (agent_id, session_id), as L{parse_ws_path} does its own.
    """
    parts = path.split("?", 1)[0].split("/")
    if len(parts) != 4 or parts[0] != "" or parts[2] != "sse" or not parts[1] or not parts[3]:
        return None
    return unquote(parts[1]), unquote(parts[3])


def valid_session_id(session_id: str) -> bool:
    """
    1 to 128 of C{[A-Za-z0-9._~-]}: nothing that could reach another
    session's key or channel, or a pattern.
    """
    return SESSION_ID.match(session_id) is not None


#: KEY_HASH_TAGS: a session's names are C{session:{<id>}:...}, so that
#: they all hash to one Redis Cluster slot (set once per process, by
#: L{use_hash_tags}; the backend helper passes C{tagged} instead)
_hash_tags = False


def use_hash_tags(on: bool) -> None:
    """
    Choose the layout of every session name this process spells.
    """
    global _hash_tags
    _hash_tags = on


def _session(session_id: str, what: str, tagged: Optional[bool]) -> str:
    if _hash_tags if tagged is None else tagged:
        return f"session:{{{session_id}}}:{what}"
    return f"session:{session_id}:{what}"


def _topic(topic: str, what: str, tagged: Optional[bool]) -> str:
    if _hash_tags if tagged is None else tagged:
        return f"topic:{{{topic}}}:{what}"
    return f"topic:{topic}:{what}"


def auth_key(session_id: str, tagged: Optional[bool] = None) -> str:
    return _session(session_id, "auth", tagged)


def down_channel(session_id: str, tagged: Optional[bool] = None) -> str:
    return _session(session_id, "down", tagged)


def up_channel(session_id: str, tagged: Optional[bool] = None) -> bytes:
    return _session(session_id, "up", tagged).encode()


def history_key(session_id: str, tagged: Optional[bool] = None) -> str:
    """
    The Redis Stream of a session's recoverable messages (resumable sessions).
    """
    return _session(session_id, "history", tagged)


def meta_key(session_id: str, tagged: Optional[bool] = None) -> str:
    """
    The hash beside the history: its epoch and last sequence number.
    """
    return _session(session_id, "meta", tagged)


def live_channel(session_id: str, tagged: Optional[bool] = None) -> str:
    """
    Where recoverable messages are published live, with their positions
    (the Lua library derives it from the history key: C{:history} ->
    C{:live}).
    """
    return _session(session_id, "live", tagged)


def events_channel(session_id: str, tagged: Optional[bool] = None) -> str:
    """
    Where a session's lifecycle events are published (EVENTS=session).
    """
    return _session(session_id, "events", tagged)


def ticket_key(session_id: str, ticket: str, tagged: Optional[bool] = None) -> str:
    """
    A single-use connect ticket for the session (C{?ticket=}): the proxy
    consumes it with C{GETDEL}.
    """
    return _session(session_id, "ticket:" + ticket, tagged)


def revoked_key(session_id: str, tagged: Optional[bool] = None) -> str:
    """
    While it exists, no new JWT connection of the session is admitted
    (C{JWT_DENYLIST=session}).
    """
    return _session(session_id, "revoked", tagged)


def revoked_jti_key(jti: str) -> str:
    """
    While it exists, the JWT with this C{jti} admits no new connection
    (C{JWT_DENYLIST=jti}).
    """
    return "jwt:revoked:" + jti


def topics_key(session_id: str, tagged: Optional[bool] = None) -> str:
    """
    The set of topics a session is in (C{TOPICS=true}), written by the
    backend beside the token and read at each connection's admission.
    """
    return _session(session_id, "topics", tagged)


def valid_topic(topic: str) -> bool:
    """
    A topic name follows the session id's rule (L{valid_session_id}): 1 to
    128 of C{[A-Za-z0-9._~-]}.
    """
    return SESSION_ID.match(topic) is not None


def topic_channel(topic: str, tagged: Optional[bool] = None) -> str:
    """
    Where a topic's plain messages are published (C{PUBLISH}; C{SPUBLISH}
    on a Redis Cluster): every socket of every session in the topic gets
    each of them.
    """
    return _topic(topic, "down", tagged)


def topic_history_key(topic: str, tagged: Optional[bool] = None) -> str:
    """
    The Redis Stream of a topic's recoverable messages (C{wsproxy_publish}).
    """
    return _topic(topic, "history", tagged)


def topic_meta_key(topic: str, tagged: Optional[bool] = None) -> str:
    """
    The hash beside a topic's history: its epoch and last sequence number.
    """
    return _topic(topic, "meta", tagged)


def topic_live_channel(topic: str, tagged: Optional[bool] = None) -> str:
    """
    Where a topic's recoverable messages are published live, with their
    positions (C{:history} -> C{:live}, as for sessions).
    """
    return _topic(topic, "live", tagged)


#: a ticket: 16 to 128 characters of the base64url alphabet
TICKET_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")


#: every session's lifecycle events (EVENTS=all), and the stream (EVENTS=stream)
ALL_EVENTS_CHANNEL = "wsproxy:events"
EVENTS_STREAM = "wsproxy:events:stream"

#: the one channel every proxy process listens on for server-side closes
CONTROL_CHANNEL = "wsproxy:control"


def instance_key(instance: str) -> str:
    """
    An instance's heartbeat: present (with a short TTL, renewed) while the
    proxy process named in events is alive.
    """
    return f"wsproxy:instance:{instance}"


def canary_channel(instance: str, tag: str = "") -> str:
    """
    The subscriber canary's channel, private to one proxy process. On a
    Redis Cluster each shard has its own, whose hash tag C{tag} puts it in a
    slot that shard owns.
    """
    if tag:
        return f"wsproxy:canary:{{{tag}}}:{instance}"
    return f"wsproxy:canary:{instance}"


def upstream_partition(session_id: str, partitions: int) -> int:
    """
    The partition a session's client messages are appended to with
    C{UPSTREAM=stream}: the CRC-32 (IEEE 802.3, as zlib, Java's
    C{java.util.zip.CRC32}, Go's C{hash/crc32.ChecksumIEEE}) of the session
    id's UTF-8 bytes, modulo the number of partitions. Stable across
    processes, versions and languages, so a session always lands in the
    same stream and its messages keep their order.
    """
    return zlib.crc32(session_id.encode()) % partitions


def upstream_stream(partition: int) -> str:
    """
    One partition stream of client messages (C{UPSTREAM=stream}). The
    braces are a Redis Cluster hash tag: a partition is one slot, and the
    partitions spread over the cluster.
    """
    return f"wsproxy:up:{{p{partition}}}"


def upstream_seen_key(session_id: str, message_id: str, tagged: Optional[bool] = None) -> str:
    """
    A backend's record that it handled a client message id (duplicates of
    a message a client sent again are dropped by it; see wsproxy.backend);
    in the session's slot with the hash-tag layout, so that a backend can
    write it in one transaction with the session's own keys.
    """
    return _session(session_id, f"seen:{message_id}", tagged)
