"""
Log output: C{LOG_LEVEL} filtering and C{LOG_FORMAT} (text, or one JSON
object per line for log shippers).

Third-party namespaces never log below C{info}: Autobahn's debug output
prints whole HTTP requests, Authorization header included. twisted.web's
access log (which prints query strings, C{access_token} included) is turned
off in L{wsproxy.site}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

import txaio
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

    return observe


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
    # why; wsproxy.redislink logs the failure itself, rate-limited
    predicate.setLogLevelForNamespace(
        "twisted.application._client_service", max(wanted, LogLevel.warn)
    )
    # Autobahn checks its own (txaio) level before it even builds an event,
    # which also keeps its debug formatting off the hot path
    txaio.set_global_log_level(third_party.name)
    return FilteringLogObserver(base, [predicate])
