"""
Counters and their Prometheus exposition.

The hot path only increments plain integer attributes of L{Stats}; the
Prometheus registry reads them when C{/metrics} is scraped, through a custom
collector. No locks, labels or objects are touched per message.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Stats:
    """
    Process-wide counters, incremented directly by the code that counts.
    """

    def __init__(self) -> None:
        self.open_connections = 0
        self.outcomes: Counter[str] = Counter()
        self.messages_down = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.bytes_up = 0
        self.dropped_down = 0
        self.publish_failures = 0
        self.slow_consumer_closes = 0
        self.redis_reconnects: Callable[[], int] = lambda: 0
        self.redis_connect_failures: Callable[[], Counter[str]] = Counter
        self.canary_rtt: Callable[[], float | None] = lambda: None
        self.subscribed_channels: Callable[[], int] = lambda: 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.auth_latency = Histogram(
            "wsproxy_auth_check_seconds",
            "Time from upgrade request to the token check's answer",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        s = self._stats
        yield GaugeMetricFamily(
            "wsproxy_connections_open", "Open WebSocket connections", value=s.open_connections
        )
        outcomes = CounterMetricFamily(
            "wsproxy_connections",
            "WebSocket upgrade requests by outcome (accepted or the HTTP status of the refusal)",
            labels=["outcome"],
        )
        for outcome in sorted(s.outcomes):
            outcomes.add_metric([outcome], s.outcomes[outcome])
        yield outcomes
        for name, doc, value in (
            ("wsproxy_messages_down", "Messages sent to clients", s.messages_down),
            ("wsproxy_bytes_down", "Payload bytes sent to clients", s.bytes_down),
            ("wsproxy_messages_up", "Client messages published to Redis", s.messages_up),
            ("wsproxy_bytes_up", "Client payload bytes published to Redis", s.bytes_up),
            ("wsproxy_messages_dropped_down",
             "Backend payloads that could not be sent (tagged mode: bad tag or UTF-8)",
             s.dropped_down),
            ("wsproxy_publish_failures", "Client messages that could not be published",
             s.publish_failures),
            ("wsproxy_slow_consumer_closes", "Connections closed for not reading",
             s.slow_consumer_closes),
            ("wsproxy_redis_reconnects", "Redis connections re-established", s.redis_reconnects()),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        failures = CounterMetricFamily(
            "wsproxy_redis_connect_failures",
            "Failed attempts to get a usable Redis connection, by reason "
            "(refused, timeout, dns, tls_verify, tls_hostname, tls, auth, select, closed, ...)",
            labels=["reason"],
        )
        counts = s.redis_connect_failures()
        for reason in sorted(counts):
            failures.add_metric([reason], counts[reason])
        yield failures
        yield GaugeMetricFamily(
            "wsproxy_subscribed_channels", "Session channels subscribed",
            value=s.subscribed_channels(),
        )
        rtt = s.canary_rtt()
        if rtt is not None:
            yield GaugeMetricFamily(
                "wsproxy_canary_rtt_seconds",
                "Round trip of the last subscriber canary (publish to delivery)",
                value=rtt,
            )
