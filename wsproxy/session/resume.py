"""
Resumable sessions: a per-session history in a Redis Stream, offsets on the
wire, and the bookkeeping that lets a client that reconnects with the last
position it saw receive every message after it exactly once, in order.

The Redis side is a function library (L{library}) that wsproxy loads with
C{FUNCTION LOAD REPLACE} when C{RESUME=true}:

C{FCALL wsproxy_publish 2 session:S:history session:S:meta <message> [text|binary|auto]}
    appends the message to the session's stream and publishes it on
    C{session:S:live}, in one atomic step (so concurrent publishers cannot
    interleave history and live order); replies with the message's
    position C{<epoch>:<ms>-<seq>}.

C{FCALL_RO wsproxy_history 2 session:S:history session:S:meta <after> <count>}
    the history's epoch, last sequence number and entries after the stream
    id C{<after>} (read by the proxy when a client resumes or a live gap
    shows).

A position is C{<epoch>:<ms>-<seq>}: the epoch names one incarnation of the
history (a new one starts when the history was lost or expired: offsets of
an older one mean nothing in it), C{<ms>-<seq>} is the entry's stream id,
C{seq} counting the session's recoverable messages 1, 2, 3, ... with no gap.
Contiguous sequence numbers are what make a hole visible, at the seam
between history and live messages as well as later (a subscriber that was
rebuilt).

Nothing here touches a socket: L{Cursor} decides, for each entry, whether
to deliver it, drop it as a duplicate, or fill a gap first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Optional, Sequence

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ..metrics import Stats

#: the client's opt-in: C{?resume=} (fresh) or C{?resume=<position>}
RESUME_PARAM = "resume"

_POSITION = re.compile(r"\A([0-9a-f]{1,32}):([0-9]{1,19})-([0-9]{1,19})\Z")

#: kinds of message: text, binary, or decided by UTF-8 validity
KINDS = {b"t": b"t", b"b": b"b", b"a": b"a"}


#: the epoch of the position given to a client while a session has no
#: history yet: "before the first message of whatever history comes"
NO_HISTORY = "0"


class InvalidPosition(ValueError):
    """
    A resume position that is not of the form C{<epoch>:<ms>-<seq>}.
    """


@dataclass(frozen=True)
class Position:
    """
    Where a client is in a session's history.
    """

    epoch: str
    ms: int
    seq: int

    @property
    def stream_id(self) -> str:
        return f"{self.ms}-{self.seq}"

    def __str__(self) -> str:
        return f"{self.epoch}:{self.ms}-{self.seq}"


def parse_position(text: str) -> Optional[Position]:
    """
    C{""} means "from now on" (a client that has seen nothing yet).

    @raise InvalidPosition: for anything else that is not a position.
    """
    if text == "":
        return None
    match = _POSITION.match(text)
    if match is None:
        raise InvalidPosition(text)
    return Position(match.group(1), int(match.group(2)), int(match.group(3)))


@dataclass(slots=True)
class Entry:
    """
    One recoverable message, from the history or the live channel.

    @ivar wire: its position as sent to clients (C{<epoch>:<ms>-<seq>}),
        if already at hand (taken from the live message: no formatting per
        message on the live path).
    """

    epoch: str
    ms: int
    seq: int
    kind: bytes
    message: bytes
    wire: bytes = field(default=b"", compare=False)

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.ms, self.seq)

    def wire_position(self) -> bytes:
        return self.wire or f"{self.epoch}:{self.ms}-{self.seq}".encode()


def parse_live(payload: bytes) -> Optional[Entry]:
    """
    A message from C{session:S:live}: C{<epoch> <ms>-<seq> <kind><message>}.

    @return: C{None} if malformed (not from wsproxy_publish).
    """
    try:
        epoch, stream_id, rest = payload.split(b" ", 2)
        ms, seq = stream_id.split(b"-")
        kind = rest[:1]
        if kind not in KINDS:
            return None
        return Entry(epoch.decode("ascii"), int(ms), int(seq), kind, rest[1:],
                     epoch + b":" + stream_id)
    except ValueError:
        return None


@dataclass(frozen=True)
class History:
    """
    What C{wsproxy_history} answered: the epoch (C{None}: no history), the
    last sequence number given out, and entries after the asked position.
    """

    epoch: Optional[str]
    last_ms: int
    last_seq: int
    entries: Sequence[Entry]

    @property
    def end(self) -> Position:
        if self.epoch is None:
            return Position(NO_HISTORY, 0, 0)
        return Position(self.epoch, self.last_ms, self.last_seq)


def parse_history(reply: object) -> History:
    """
    Decode C{wsproxy_history}'s reply: C{[epoch, last_ms, last_seq,
    [[id, [field, value, ...]], ...]]}.

    @raise ValueError: if it has another shape.
    """
    if not isinstance(reply, list) or len(reply) != 4:
        raise ValueError(f"unexpected history reply: {reply!r:.100}")
    raw_epoch, last_ms, last_seq, raw_entries = reply
    if not raw_epoch:
        return History(None, 0, 0, ())
    epoch = raw_epoch.decode("ascii") if isinstance(raw_epoch, bytes) else str(raw_epoch)
    entries = []
    for stream_id, fields in raw_entries or ():
        ms, seq = (int(part) for part in bytes(stream_id).split(b"-"))
        values = dict(zip(fields[::2], fields[1::2]))
        entries.append(Entry(epoch, ms, seq, values.get(b"k", b"a"), values.get(b"d", b"")))
    return History(epoch, int(last_ms), int(last_seq), tuple(entries))


Verdict = Literal["deliver", "duplicate", "gap"]


class Cursor:
    """
    The last recoverable message a connection delivered, and the rule for
    the next one: the next sequence number of the same epoch is delivered;
    an older one is a duplicate (it came through the history and live, or
    twice); a newer one means messages are missing in between (a gap, to
    be filled from the history first); another epoch means the history
    started over (whatever the client had is gone: it must be told).
    """

    __slots__ = ("epoch", "ms", "seq")

    def __init__(self, position: Optional[Position]) -> None:
        if position is None:
            self.epoch, self.ms, self.seq = NO_HISTORY, 0, 0
        else:
            self.epoch, self.ms, self.seq = position.epoch, position.ms, position.seq

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.ms, self.seq)

    def verdict(self, entry: Entry) -> Verdict | Literal["new_epoch"]:
        if self.epoch == NO_HISTORY:
            return "deliver" if entry.seq == 1 else "gap"
        if entry.epoch != self.epoch:
            return "new_epoch"
        seq = self.seq
        if entry.seq == seq + 1:
            return "deliver"
        if entry.seq <= seq:
            return "duplicate"
        return "gap"

    def advance(self, entry: Entry) -> None:
        self.epoch, self.ms, self.seq = entry.epoch, entry.ms, entry.seq


@dataclass(frozen=True)
class Recovery:
    """
    The outcome of a client's resume request: the entries to replay (in
    order), whether everything after its position could be replayed, and
    where the connection stands afterwards.
    """

    recovered: bool
    replay: Sequence[Entry]
    position: Optional[Position]
    reason: str = ""


def plan_recovery(presented: Optional[Position], history: History) -> Recovery:
    """
    Decide what a resuming client gets, from what it presented and the
    history read after it. (Entries past the retention age that trimming
    has not removed yet are still replayed: retention is what is promised
    at least.)
    """
    end = history.end
    if presented is None:
        # a fresh client: nothing to recover, live from the end (which is
        # NO_HISTORY if there is none yet: resuming from it later replays
        # the history from its first message)
        return Recovery(True, (), end)
    if presented.epoch == NO_HISTORY:
        if history.epoch is None:
            return Recovery(True, (), end)
        presented = Position(history.epoch, 0, 0)
    elif history.epoch is None:
        return Recovery(False, (), end, "no history (expired or never written)")
    if history.epoch != presented.epoch:
        return Recovery(False, (), end, "the history started over (new epoch)")
    if presented.seq > history.last_seq:
        return Recovery(False, (), end, "position beyond the end of the history")
    entries = list(history.entries)
    if presented.seq == history.last_seq:
        return Recovery(True, (), end)
    if not entries or entries[0].seq != presented.seq + 1:
        return Recovery(False, (), end, "messages after the position are no longer retained")
    for previous, entry in zip(entries, entries[1:]):
        if entry.seq != previous.seq + 1:
            return Recovery(False, (), end, "the history has a hole")
    if entries[-1].seq != history.last_seq:
        # recovered means everything up to the end that was read
        return Recovery(False, (), end, "the history could not be read to its end")
    return Recovery(True, tuple(entries), entries[-1].position)


def library(max_length: int, max_age_ms: int, sharded: bool = False,
            topic_max_length: Optional[int] = None, topic_max_age_ms: Optional[int] = None) -> str:
    """
    The Redis function library, with the retention settings written in.

    Retention: C{XADD ... MAXLEN ~ max_length}; every 64th message the
    entries older than C{max_age_ms} are trimmed (the proxy also ignores
    older entries when it replays); both keys expire C{max_age_ms} after the
    last message, so an idle session's history disappears by itself. A
    topic's history (its key starts with C{topic:}) is kept by
    C{topic_max_length} and C{topic_max_age_ms} instead (by default the
    session's).

    @param sharded: on a Redis Cluster the live message goes out with
        C{SPUBLISH} (the proxy listens with C{SSUBSCRIBE}); the live
        channel is in the history's slot when the names carry hash tags.
    """
    if topic_max_length is None:
        topic_max_length = max_length
    if topic_max_age_ms is None:
        topic_max_age_ms = max_age_ms
    code = (_LIBRARY.replace("TOPIC_MAX_LENGTH", str(int(topic_max_length)))
            .replace("TOPIC_MAX_AGE_MS", str(int(topic_max_age_ms)))
            .replace("MAX_LENGTH", str(int(max_length)))
            .replace("MAX_AGE_MS", str(int(max_age_ms))))
    if sharded:
        code = code.replace("redis.call('PUBLISH', live", "redis.call('SPUBLISH', live")
    return code


_LIBRARY = r"""#!lua name=wsproxy

local KIND = {text = 't', binary = 'b', auto = 'a', t = 't', b = 'b', a = 'a'}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- FCALL wsproxy_publish 2 <history> <meta> <message> [text|binary|auto]
local function publish(keys, args)
  local history, meta = keys[1], keys[2]
  local message = args[1]
  if message == nil then
    return redis.error_reply('ERR wsproxy_publish: missing message')
  end
  local kind = KIND[args[2] or 'auto']
  if kind == nil then
    return redis.error_reply('ERR wsproxy_publish: kind must be text, binary or auto')
  end
  local live, n = string.gsub(history, ':history$', ':live')
  if n ~= 1 then
    return redis.error_reply('ERR wsproxy_publish: the first key must end in :history')
  end
  local max_length, max_age = MAX_LENGTH, MAX_AGE_MS
  if string.sub(history, 1, 6) == 'topic:' then
    max_length, max_age = TOPIC_MAX_LENGTH, TOPIC_MAX_AGE_MS
  end
  local state = redis.call('HMGET', meta, 'epoch', 'seq', 'ms')
  local epoch, seq, last = state[1], tonumber(state[2]), tonumber(state[3])
  local now = now_ms()
  if not epoch or not seq then
    -- a new history: whatever an older one left behind is not part of it
    local t = redis.call('TIME')
    epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
    seq, last = 0, 0
    redis.call('DEL', history)
    redis.call('HSET', meta, 'epoch', epoch)
  end
  seq = seq + 1
  if now < last then now = last end
  local id = now .. '-' .. seq
  redis.call('XADD', history, 'MAXLEN', '~', max_length, id, 'k', kind, 'd', message)
  if seq % 64 == 0 then
    redis.call('XTRIM', history, 'MINID', '~', now - max_age)
  end
  redis.call('HSET', meta, 'seq', seq, 'ms', now)
  redis.call('PEXPIRE', history, max_age)
  redis.call('PEXPIRE', meta, max_age)
  redis.call('PUBLISH', live, epoch .. ' ' .. id .. ' ' .. kind .. message)
  return epoch .. ':' .. id
end

-- FCALL_RO wsproxy_history 2 <history> <meta> <after stream id> <count>
local function history(keys, args)
  local state = redis.call('HMGET', keys[2], 'epoch', 'seq', 'ms')
  if not state[1] then
    return {false, 0, 0, {}}
  end
  local count = tonumber(args[2]) or 0
  local entries = {}
  if count > 0 then
    entries = redis.call('XRANGE', keys[1], '(' .. args[1], '+', 'COUNT', count)
  end
  return {state[1], tonumber(state[3]) or 0, tonumber(state[2]) or 0, entries}
end

redis.register_function('wsproxy_publish', publish)
redis.register_function{
  function_name = 'wsproxy_history', callback = history, flags = {'no-writes'}
}
"""


class Resumer:
    """
    The recoverable side of one resuming connection: everything it sends
    goes through here, so that each recoverable message is sent exactly
    once and in order, whether it came from the history or live.

    Until L{start} (the socket is open and the recovery plan is known) and
    while a gap is being filled from the history, messages are held, in
    arrival order.

    @param send: sends one data frame: C{send(position, message, kind)};
        C{position} is C{b""} for a plain C{:down} message.
    @param control: sends one control frame (a dict, sent as C{!} + JSON).
    @param read_history: reads the entries after a stream id (C{"0-0"}:
        from the start); fires with a L{History}.
    @param topic: the topic whose messages these are (its control frames
        name it), or C{None} for the session's own.
    """

    def __init__(
        self,
        send: Callable[[bytes, bytes, bytes], None],
        control: Callable[[dict[str, object]], None],
        read_history: Callable[[str], "Deferred[History]"],
        stats: Stats,
        topic: Optional[str] = None,
    ) -> None:
        self._topic = topic
        self._send = send
        self._control = control
        self._read_history = read_history
        self._stats = stats
        self.cursor = Cursor(None)
        self._holding = True
        #: entries, and (message, kind) of plain messages
        self._held: list[Entry | tuple[bytes, bytes]] = []
        self.closed = False

    # -- what arrives ------------------------------------------------------

    def plain(self, message: bytes, kind: bytes) -> None:
        """
        A message from the plain C{:down} channel: live only, no position.
        """
        if self._holding:
            self._held.append((message, kind))
        else:
            self._send(b"", message, kind)

    def live(self, payload: bytes) -> None:
        """
        A message from C{:live}; malformed ones are dropped (not ours).
        """
        entry = parse_live(payload)
        if entry is not None:
            self.live_entry(entry)

    def live_entry(self, entry: Entry) -> None:
        """
        A live message already parsed (a topic's: once for every socket).
        """
        if self._holding:
            self._held.append(entry)
        else:
            self._entry(entry)

    # -- recovery ------------------------------------------------------------

    def start(self, recovery: Recovery) -> None:
        """
        The socket is open: say how recovery went, replay, then go live.
        """
        self.cursor = Cursor(recovery.position)
        stats = self._stats
        if recovery.recovered:
            stats.resume_recovered += 1
        else:
            stats.resume_incomplete += 1
        stats.resume_replayed += len(recovery.replay)
        self._report(recovery.recovered, len(recovery.replay), recovery.reason)
        for entry in recovery.replay:
            self._deliver(entry)
        self._release()

    def _report(self, recovered: bool, replayed: int, reason: str) -> None:
        if self._topic is not None:
            self._control({
                "type": "recovery",
                "topic": self._topic,
                "recovered": recovered,
                "replayed": replayed,
                "position": str(self.cursor.position),
                "reason": reason,
            })
            return
        self._control({
            "type": "recovery",
            "recovered": recovered,
            "replayed": replayed,
            "position": str(self.cursor.position),
            "reason": reason,
        })

    def _deliver(self, entry: Entry) -> None:
        self.cursor.advance(entry)
        self._send(entry.wire_position(), entry.message, entry.kind)

    def _release(self) -> None:
        self._holding = False
        while self._held and not self._holding and not self.closed:
            item = self._held.pop(0)
            if isinstance(item, Entry):
                self._entry(item)
            else:
                self._send(b"", *item)

    def _entry(self, entry: Entry) -> None:
        verdict = self.cursor.verdict(entry)
        if verdict == "deliver":
            self._deliver(entry)
        elif verdict == "new_epoch":
            # the history started over: what the client had is gone
            self._stats.resume_incomplete += 1
            self.cursor = Cursor(Position(entry.epoch, 0, 0))
            self._report(False, 0, "the history started over (new epoch)")
            self._entry(entry)
        elif verdict == "gap":
            self._fill(entry)
        # a duplicate is dropped

    def _fill(self, entry: Entry) -> None:
        """
        Messages are missing before C{entry}: hold everything, read them
        from the history, deliver them, then what was held.
        """
        self._holding = True
        self._held.insert(0, entry)
        position = self.cursor.position
        after = position.stream_id
        next_seq = position.seq + 1

        def filled(history: History) -> None:
            if self.closed:
                return
            missing = [e for e in history.entries if e.seq >= next_seq and e.seq < entry.seq]
            if history.epoch != entry.epoch or len(missing) != entry.seq - next_seq:
                self._lost(entry, f"messages {next_seq} to {entry.seq - 1} are no longer retained")
            else:
                self._stats.resume_gaps_filled += 1
                for e in missing:
                    self._deliver(e)
            self._release()

        def failed(reason: object) -> None:
            if not self.closed:
                self._lost(entry, "the history could not be read")
                self._release()

        self._read_history(after).addCallbacks(filled, failed)

    def _lost(self, entry: Entry, reason: str) -> None:
        """
        The messages before C{entry} cannot be recovered: say so, and go on
        from C{entry}.
        """
        self._stats.resume_incomplete += 1
        self.cursor = Cursor(Position(entry.epoch, entry.ms, entry.seq - 1))
        self._report(False, 0, reason)
