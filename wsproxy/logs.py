"""
Log output: C{LOG_LEVEL} filtering and C{LOG_FORMAT} (text, or one JSON
object per line for log shippers), and a budget of lines per client address
for what Autobahn logs about a connection (a hostile client must not be able
to fill the log).

Third-party namespaces never log below C{info}: Autobahn's debug output
prints whole HTTP requests, Authorization header included. twisted.web's
access log (which prints query strings, C{access_token} included) is turned
off in L{wsproxy.edge.site}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Optional, cast

import txaio
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import provider

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

#: event keys that are worth a field of their own in JSON output
_SCALARS = (str, int, float, bool, type(None))


def json_observer(out: IO[str]) -> ILogObserver:
    """
    One JSON object per line: time, level, namespace, message, and the
    event's own scalar fields (session_id, agent_id, code, ...).
    """

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(
                event.get("log_time") or 0, timezone.utc
            ).isoformat(timespec="milliseconds"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _SCALARS):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        out.write(json.dumps(record, default=str) + "\n")
        out.flush()

    return cast(ILogObserver, observe)


def make_observer(level: str, fmt: str, out: IO[str] | None = None) -> ILogObserver:
    """
    The observer for C{LOG_LEVEL}/C{LOG_FORMAT}, writing to C{out}
    (standard output by default).
    """
    out = out if out is not None else sys.stdout
    base = json_observer(out) if fmt == "json" else textFileLogObserver(out)
    wanted = LEVELS[level]
    third_party = max(wanted, LogLevel.info)
    predicate = LogLevelFilterPredicate(defaultLogLevel=third_party)
    predicate.setLogLevelForNamespace("wsproxy", wanted)
    # ClientService announces every reconnection attempt ("Scheduling retry
    # 1 to connect <...Endpoint object at 0x...>"), saying neither where nor
    # why; wsproxy.redis.redislink logs the failure itself, rate-limited
    predicate.setLogLevelForNamespace(
        "twisted.application._client_service", max(wanted, LogLevel.warn)
    )
    # Autobahn checks its own (txaio) level before it even builds an event,
    # which also keeps its debug formatting off the hot path
    txaio.set_global_log_level(third_party.name)  # type: ignore[attr-defined]
    return FilteringLogObserver(base, [predicate])


class LogBudget:
    """
    How many lines one client address may cause in a window: C{lines} per
    C{interval} seconds, then silence until the window has passed; the
    next line allowed says how many were suppressed. The table of addresses
    is bounded (C{max_peers}): an attacker with many addresses only makes it
    start over.
    """

    def __init__(
        self, clock: IReactorTime, lines: int = 4, interval: float = 60.0, max_peers: int = 4096
    ) -> None:
        self._clock = clock
        self.lines = lines
        self.interval = interval
        self.max_peers = max_peers
        #: address -> [window start, lines logged in it, lines suppressed]
        self._peers: dict[str, list[float]] = {}

    def take(self, peer: str) -> Optional[int]:
        """
        @return: C{None} if this line must be suppressed, else the number of
            lines suppressed before it (to be mentioned).
        """
        now = self._clock.seconds()
        entry = self._peers.get(peer)
        if entry is None or now - entry[0] >= self.interval:
            if entry is None and len(self._peers) >= self.max_peers:
                self._peers.clear()
            suppressed = 0 if entry is None else int(entry[2])
            self._peers[peer] = [now, 1, 0]
            return suppressed
        if entry[1] < self.lines:
            entry[1] += 1
            return 0
        entry[2] += 1
        return None


class BudgetedLog:
    """
    Stands in for Autobahn's logger on one connection: warnings and errors
    count against the client address's L{LogBudget}; debug and trace are
    the logger's own methods (Autobahn calls C{log.debug} for every frame it
    sends: that call must cost what it did).
    """

    __slots__ = ("_log", "_budget", "_peer", "debug", "trace")

    def __init__(self, log: Any, budget: LogBudget, peer: str) -> None:
        self._log = log
        self._budget = budget
        self._peer = peer
        self.debug = log.debug
        self.trace = log.trace

    def _limited(self, emit: Any, fmt: str, **kwargs: Any) -> None:
        peer = self._peer
        suppressed = self._budget.take(peer)
        if suppressed is None:
            return
        if suppressed:
            fmt += " ({suppressed_lines} similar lines from {client} suppressed)"
            kwargs.update(suppressed_lines=suppressed, client=peer)
        emit(fmt, **kwargs)

    def warn(self, fmt: str, **kwargs: Any) -> None:
        self._limited(self._log.warn, fmt, **kwargs)

    def error(self, fmt: str, **kwargs: Any) -> None:
        self._limited(self._log.error, fmt, **kwargs)

    def critical(self, fmt: str, **kwargs: Any) -> None:
        self._limited(self._log.critical, fmt, **kwargs)

    def info(self, fmt: str, **kwargs: Any) -> None:
        self._limited(self._log.info, fmt, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)
