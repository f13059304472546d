"""
Topics (C{TOPICS=true}): group channels that many sessions' sockets
receive, chosen by the backend, never by the client.

Which topics a connection is in: the set C{session:{id}:topics} read at
its admission (C{SMEMBERS}, sent beside the token check), with a JWT's
C{topics} claim added; then, while it is connected, whatever a backend
adds or removes through C{wsproxy:control} (L{wsproxy.session.control}):
every socket of that session, on every instance, follows. At most
C{TOPICS_MAX_PER_CONNECTION}; a name that breaks the session id's rule is
skipped (both with a warning a minute).

Publishing: one C{PUBLISH topic:<name>:down} (C{SPUBLISH} on a Redis
Cluster, routed by the topic's slot), or a recoverable one with
C{FCALL wsproxy_publish 2 topic:<name>:history topic:<name>:meta ...}
(published live on C{topic:<name>:live}). A process subscribes each
topic channel once, however many of its sockets are in the topic (the
hub's reference counting), and a L{TopicFeed} builds each message's
frame once per framing in use; each socket then writes the same bytes, so
the per-socket rules (backpressure, the slow-consumer close) are unchanged
and a slow socket never delays the others.

Framings (how a socket shows where a message came from):

  - C{RAW}: a plain client that did not opt in: the message, as a
    session message would come;
  - C{ENVELOPED}: a C{?resume=} or C{?ack=1} client that did not opt in:
    C{\\n<message>}, as a plain C{:down} message comes to it;
  - C{LABELLED}: a client with C{?labels=1}: C{#<topic>\\n<message>}, and
    for a resuming client a recoverable one as
    C{#<topic> <position>\\n<message>}.

and the same three for Server-Sent Events streams (L{wsproxy.edge.sse}),
each message one event (L{sse_event}): C{SSE_RAW} (the message alone),
C{SSE_ENVELOPED} (an empty first data line), C{SSE_LABELLED} (C{#<topic>}
or C{#<topic> <position>} as the first data line). An SSE framing's
L{Framed} carries the event as its frame and the envelope's header as its
data (what a resuming stream reads its cursor from); a resuming stream adds
its own C{id:} line.

Nothing here touches a socket: the per-socket listeners are
L{wsproxy.websocket.fanout}'s.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional
from urllib.parse import parse_qsl, urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..names import valid_topic
from ..refusal import Refusal
from . import frames
from .resume import Entry, InvalidPosition, Position, parse_live, parse_position

if TYPE_CHECKING:
    from ..metrics import Stats

#: the client's opt-in to frames that say their topic
LABELS_PARAM = "labels"
#: a resuming client's position in one topic: C{resume_topic=<topic>@<position>}
TOPIC_RESUME_PARAM = "resume_topic"

RAW, ENVELOPED, LABELLED = 0, 1, 2
#: the same framings as Server-Sent Events (3, 4, 5): a framing plus this
SSE = 3
SSE_RAW, SSE_ENVELOPED, SSE_LABELLED = RAW + SSE, ENVELOPED + SSE, LABELLED + SSE
#: how many framings there are
FRAMINGS = 6

NOT_ENABLED = Refusal(400, "Topics are not enabled")
INVALID_LABELS = Refusal(400, "Invalid labels parameter")
INVALID_POSITION = Refusal(400, "Invalid resume position")

#: (the data sent, whether binary, its frame, the message's size): what
#: L{wsproxy.websocket.protocol.ProxyProtocol._send_message} takes
Framed = tuple[bytes, bool, bytes, int]


def sse_event(message: bytes, binary: bool, header: Optional[bytes] = None) -> bytes:
    """
    One message as one Server-Sent Events event: C{data:} lines for text
    without a CR (EventSource joins them with C{\\n}: exact); binary, and
    text with a CR (which SSE cannot carry), as C{event: binary} or C{event:
    text-base64} with the base64 of the bytes. C{header}, on an enveloped
    stream, is the data's first line.
    """
    if binary or b"\r" in message:
        lines = [b"event: binary\n" if binary else b"event: text-base64\n"]
        body = [base64.b64encode(message)]
    else:
        lines = []
        body = message.split(b"\n")
    if header is not None:
        body.insert(0, header)
    lines += [b"data: " + line + b"\n" for line in body]
    lines.append(b"\n")
    return b"".join(lines)


def labels_request(uri: str, enabled: bool) -> bool:
    """
    Whether a client asked for labelled frames (C{?labels=1}).

    @raise Refusal: 400 if topics are not enabled, or for any value but one
        C{labels=1}.
    """
    if LABELS_PARAM not in uri:
        return False  # the plain path pays one substring test
    values = [v for k, v in parse_qsl(urlsplit(uri).query, keep_blank_values=True)
              if k == LABELS_PARAM]
    if not values:
        return False
    if not enabled:
        raise NOT_ENABLED
    if values != ["1"]:
        raise INVALID_LABELS
    return True


def topic_positions(uri: str, resuming: bool, labels: bool) -> dict[str, Optional[Position]]:
    """
    The positions a resuming client presents for its topics
    (C{resume_topic=<topic>@<position>}, one per topic).

    @raise Refusal: 400 C{Invalid resume position} for a malformed one, a
        topic named twice, or positions without C{?resume=} and
        C{?labels=1}.
    """
    if TOPIC_RESUME_PARAM not in uri:
        return {}
    given = [v for k, v in parse_qsl(urlsplit(uri).query, keep_blank_values=True)
             if k == TOPIC_RESUME_PARAM]
    if not given:
        return {}
    if not (resuming and labels):
        raise INVALID_POSITION
    positions: dict[str, Optional[Position]] = {}
    for value in given:
        topic, at, position = value.partition("@")
        if not at or not valid_topic(topic) or topic in positions:
            raise INVALID_POSITION
        try:
            positions[topic] = parse_position(position)
        except InvalidPosition:
            raise INVALID_POSITION from None
    return positions


def _text(member: object) -> Optional[str]:
    if isinstance(member, bytes):
        try:
            return member.decode("ascii")
        except UnicodeDecodeError:
            return None
    return member if isinstance(member, str) else None


class Chooser:
    """
    Which of the topics a backend named a connection joins: valid names
    only, at most C{limit} (in sorted order, so every socket of a session
    chooses the same ones); what is left out is logged, at most once a
    minute per kind of problem, with the session.
    """

    _log = Logger()

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self._clock = clock
        self._logged: dict[str, float] = {}

    def choose(self, session_id: str, named: Iterable[object],
               joined: Iterable[str] = ()) -> list[str]:
        """
        The topics of C{named} to join, besides those already C{joined}.
        """
        already = set(joined)
        valid: set[str] = set()
        invalid = 0
        for member in named:
            topic = _text(member)
            if topic is None or not valid_topic(topic):
                invalid += 1
            elif topic not in already:
                valid.add(topic)
        if invalid:
            self._complain("invalid", "session {session_id}: {n} topic names skipped "
                           "(a topic name is 1-128 of [A-Za-z0-9._~-])",
                           session_id=session_id, n=invalid)
        room = self.limit - len(already)
        chosen = sorted(valid)
        if len(chosen) > room:
            self._complain("limit", "session {session_id}: {n} topics not joined "
                           "(TOPICS_MAX_PER_CONNECTION={limit})",
                           session_id=session_id, n=len(chosen) - max(room, 0),
                           limit=self.limit)
            chosen = chosen[:max(room, 0)]
        return chosen

    def _complain(self, kind: str, fmt: str, **fields: Any) -> None:
        now = self._clock.seconds()
        if now - self._logged.get(kind, -1e9) < 60:
            return
        self._logged[kind] = now
        self._log.warn(fmt, **fields)


class TopicFeed:
    """
    One topic's messages in this process: each message's frames built once
    per framing (the cache holds the last message, which is what a read
    delivers to every socket in turn), for every socket of the topic.
    """

    __slots__ = ("topic", "members", "_down", "stats", "_label", "_payload", "_outgoing",
                 "_frames", "_live", "_entry", "_live_frames", "_position", "_positioned")

    def __init__(self, topic: str, down: Callable[[bytes], frames.Outgoing],
                 stats: Stats) -> None:
        self.topic = topic
        #: sockets of this process in the topic
        self.members = 0
        self._down = down
        self.stats = stats
        self._label = b"#" + topic.encode("ascii")
        self._payload: Optional[bytes] = None
        self._outgoing: frames.Outgoing = None
        self._frames: list[Optional[Framed]] = [None] * FRAMINGS
        self._live: Optional[bytes] = None
        self._entry: Optional[Entry] = None
        self._live_frames: list[Optional[Framed]] = [None] * FRAMINGS
        self._position: Optional[bytes] = None
        self._positioned: list[Optional[Framed]] = [None] * FRAMINGS

    def _build(self, message: bytes, binary: bool, framing: int) -> Framed:
        if framing >= SSE:
            self.stats.topic_frames_built += 1
            header = (None if framing == SSE_RAW else b"" if framing == SSE_ENVELOPED
                      else self._label)
            return header or b"", binary, sse_event(message, binary, header), len(message)
        if framing == RAW:
            data = message
        elif framing == ENVELOPED:
            data = b"\n" + message
        else:
            data = self._label + b"\n" + message
        self.stats.topic_frames_built += 1
        return data, binary, frames.frame(data, binary), len(message)

    def frames(self, payload: bytes) -> list[Optional[Framed]]:
        """
        The frames of C{payload} built so far, by framing (L{down} builds
        the missing ones).
        """
        if payload is not self._payload:
            self._take(payload)
        return self._frames

    def _take(self, payload: bytes) -> None:
        self._payload = payload
        self._outgoing = self._down(payload)
        self._frames = [None] * FRAMINGS
        self.stats.topic_messages += 1

    def down(self, payload: bytes, framing: int) -> Optional[Framed]:
        """
        A plain message's frame for a socket of this framing (C{None}: the
        payload cannot be sent, as L{frames.codec} decides).
        """
        if payload is not self._payload:
            self._take(payload)
        made = self._frames[framing]
        if made is None:
            outgoing = self._outgoing
            if outgoing is None:
                return None
            made = self._frames[framing] = self._build(outgoing[0], outgoing[1], framing)
        return made

    def entry(self, payload: bytes) -> Optional[Entry]:
        """
        A live recoverable message, parsed once for every socket.
        """
        if payload is not self._live:
            self._live = payload
            self._entry = parse_live(payload)
            self._live_frames = [None] * FRAMINGS
            self.stats.topic_messages += 1
        return self._entry

    def live(self, entry: Entry, framing: int) -> Optional[Framed]:
        """
        A recoverable message's frame for a socket that does not resume it
        (no position).
        """
        if entry is not self._entry:
            # not the cached one (cannot happen on the live path): built alone
            binary = frames.kind_binary(entry.message, entry.kind)
            return None if binary is None else self._build(entry.message, binary, framing)
        made = self._live_frames[framing]
        if made is None:
            binary = frames.kind_binary(entry.message, entry.kind)
            if binary is None:
                return None
            made = self._live_frames[framing] = self._build(entry.message, binary, framing)
        return made

    def positioned(self, position: bytes, message: bytes, kind: bytes,
                   framing: int = LABELLED) -> Optional[Framed]:
        """
        A recoverable message's frame for a resuming socket:
        C{#<topic> <position>\\n<message>} (C{SSE_LABELLED}: the event, its
        first data line C{#<topic> <position>}), built once per live message
        and framing (replayed history entries are not shared: built for
        each).
        """
        if position is not self._position:
            self._position = position
            self._positioned = [None] * FRAMINGS
        made = self._positioned[framing]
        if made is not None:
            return made
        binary = frames.kind_binary(message, kind)
        if binary is None:
            return None
        header = self._label + b" " + position
        self.stats.topic_frames_built += 1
        if framing >= SSE:
            made = (header, binary, sse_event(message, binary, header), len(message))
        else:
            data = header + b"\n" + message
            made = (data, binary, frames.frame(data, binary), len(message))
        self._positioned[framing] = made
        return made


class Topics:
    """
    The topics this process's sockets are in: a L{TopicFeed} per topic,
    from the first socket's join to the last one's leave.
    """

    def __init__(self, down: Callable[[bytes], frames.Outgoing], stats: Stats) -> None:
        self._down = down
        self._stats = stats
        self.feeds: dict[str, TopicFeed] = {}
        stats.topics = self.feeds.__len__

    def joined(self, topic: str) -> TopicFeed:
        feed = self.feeds.get(topic)
        if feed is None:
            feed = self.feeds[topic] = TopicFeed(topic, self._down, self._stats)
        feed.members += 1
        return feed

    def left(self, feed: TopicFeed) -> None:
        feed.members -= 1
        if feed.members <= 0 and self.feeds.get(feed.topic) is feed:
            del self.feeds[feed.topic]
