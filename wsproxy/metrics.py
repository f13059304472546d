"""
Counters and their Prometheus exposition.

The hot path only increments plain integer attributes of L{Stats}; the
Prometheus registry reads them when C{/metrics} is scraped, through a custom
collector. No locks, labels or objects are touched per message.

With several worker processes (L{wsproxy.process.workers}) each worker's registry is
read into a L{Snapshot} at scrape time, and the supervisor adds the
snapshots up (L{merge}) and renders the sum (L{render}): a scrape describes
the whole instance, whichever worker answers it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Stats:
    """
    Process-wide counters, incremented directly by the code that counts.
    """

    def __init__(self) -> None:
        self.open_connections = 0
        #: Server-Sent Events streams open (counted in open_connections too),
        #: and the messages sent on them (in messages_down too)
        self.sse_connections_open = 0
        self.sse_messages_down = 0
        self.outcomes: Counter[str] = Counter()
        self.messages_down = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.bytes_up = 0
        self.dropped_down = 0
        self.publish_failures = 0
        self.slow_consumer_closes = 0
        self.resume_recovered = 0
        self.resume_incomplete = 0
        self.resume_replayed = 0
        self.resume_gaps_filled = 0
        self.messages_up_unheard = 0
        self.upstream_appended = 0
        self.upstream_append_failures = 0
        self.upstream_acks = 0
        self.upstream_nacks = 0
        self.upstream_in_flight = 0
        self.events_published = 0
        self.events_dropped = 0
        self.server_closes = 0
        self.control_ignored = 0
        #: TOPICS: messages received on topic channels, frames built for them
        #: (once per message and framing in use), frames sent from them to
        #: sockets, membership changes asked on wsproxy:control; the topics
        #: this process's sockets are in
        self.topic_messages = 0
        self.topic_frames_built = 0
        self.topic_deliveries = 0
        self.topic_changes = 0
        self.topics: Callable[[], int] = lambda: 0
        self.redis_reconnects: Callable[[], int] = lambda: 0
        #: connections replaced with commands held meanwhile, commands held,
        #: commands that failed past a hold's bounds (wsproxy.redis.hold)
        self.redis_holds: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        self.redis_connect_failures: Callable[[], Counter[str]] = Counter
        self.canary_rtt: Callable[[], float | None] = lambda: None
        self.subscribed_channels: Callable[[], int] = lambda: 0
        #: REDIS_CLUSTER: (shard, up, session channels) per master (and per failed
        #: former master, never up); redirections by kind
        self.cluster_shards: Callable[[], list[tuple[str, bool, int]]] = list
        self.cluster_redirects: Callable[[], Counter[str]] = Counter
        self.auth_failures: Callable[[], int] = lambda: 0
        self.auth_limited: Callable[[], int] = lambda: 0
        self.auth_limit_addresses: Callable[[], int] = lambda: 0
        #: AUTH_MODE=jwt: JWTs accepted and refused; key reloads (SIGHUP) and
        #: JWKS URL fetches by result; the keys in use
        self.jwt_checks: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.jwt_key_updates: Callable[[], Counter[str]] = Counter
        self.jwt_keys: Callable[[], Optional[int]] = lambda: None
        self.refusal_lines_suppressed = 0
        self.handshakes_waiting: Callable[[], int] = lambda: 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.auth_latency = Histogram(
            "wsproxy_auth_check_seconds",
            "Time from upgrade request to the token check's answer",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        #: every garbage collection's pause, by generation (observed by
        #: the daemon's wsproxy.fast.heap.CollectorPolicy)
        self.gc_pause = Histogram(
            "wsproxy_gc_pause_seconds",
            "Time the process stood still in each garbage collection",
            ["generation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> Snapshot:
        """
        Every metric's current samples, as plain JSON-able data.
        """
        return snapshot_of(self.registry.collect())


#: C{[{"name", "help", "type", "samples": [[sample name, labels, value], ...]}, ...]}
Snapshot = list[dict[str, Any]]

#: gauges whose sum means nothing: the instance's value is the largest one
MAX_GAUGES = frozenset({"wsproxy_canary_rtt_seconds"})

#: metric types whose values only grow (and so must outlive a worker)
_MONOTONIC = frozenset({"counter", "histogram", "summary"})


def snapshot_of(families: Iterable[Metric]) -> Snapshot:
    """
    C{families}' samples, as plain JSON-able data.
    """
    return [
        {
            "name": family.name,
            "help": family.documentation,
            "type": family.type,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in families
    ]


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """
    The instance's metrics from its workers' snapshots: counters, histogram
    buckets and gauges are summed (open connections of all workers), except
    the gauges in L{MAX_GAUGES}, which take the largest value, and
    C{_created} timestamps, which take the earliest.
    """
    families: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snapshot in snapshots:
        for family in snapshot:
            name = family["name"]
            if name not in families:
                families[name] = {k: family[k] for k in ("name", "help", "type")}
                values[name] = {}
            pick = max if name in MAX_GAUGES and family["type"] == "gauge" else None
            into = values[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in into:
                    into[key] = value
                elif sample_name.endswith("_created"):
                    into[key] = min(into[key], value)
                elif pick is not None:
                    into[key] = pick(into[key], value)
                else:
                    into[key] += value
    return [
        dict(families[name], samples=[
            [sample_name, dict(labels), value]
            for (sample_name, labels), value in values[name].items()
        ])
        for name in families
    ]


def monotonic_part(snapshot: Snapshot) -> Snapshot:
    """
    The counters and histograms of C{snapshot}: what a worker that has
    exited keeps contributing, so that the instance's counters never go
    backwards. (Its gauges ended with it.)
    """
    return [family for family in snapshot if family["type"] in _MONOTONIC]


def render(snapshot: Snapshot) -> bytes:
    """
    C{snapshot} in the Prometheus text format.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Replay(snapshot))
    return generate_latest(registry)


class _Replay:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self._snapshot:
            metric = Metric(family["name"], family["help"], family["type"])
            for sample_name, labels, value in family["samples"]:
                metric.add_sample(sample_name, labels, value)
            yield metric


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
        yield GaugeMetricFamily(
            "wsproxy_sse_connections_open", "Open Server-Sent Events streams (also counted "
            "in wsproxy_connections_open)", value=s.sse_connections_open,
        )
        outcomes = CounterMetricFamily(
            "wsproxy_connections",
            "WebSocket upgrade requests by outcome (accepted or the HTTP status of the refusal)",
            labels=["outcome"],
        )
        for outcome in sorted(s.outcomes):
            outcomes.add_metric([outcome], s.outcomes[outcome])
        yield outcomes
        holds, held, hold_failures = s.redis_holds()
        for name, doc, value in (
            ("wsproxy_messages_down", "Messages sent to clients", s.messages_down),
            ("wsproxy_bytes_down", "Payload bytes sent to clients", s.bytes_down),
            ("wsproxy_sse_messages_down", "Messages sent on Server-Sent Events streams "
             "(also counted in wsproxy_messages_down)", s.sse_messages_down),
            ("wsproxy_messages_up", "Client messages published to Redis", s.messages_up),
            ("wsproxy_bytes_up", "Client payload bytes published to Redis", s.bytes_up),
            ("wsproxy_messages_up_unheard", "Client messages published while no backend was "
             "subscribed to their :up channel (lost)", s.messages_up_unheard),
            ("wsproxy_upstream_appended", "Client messages appended to the upstream "
             "streams (UPSTREAM=stream)", s.upstream_appended),
            ("wsproxy_upstream_append_failures", "Client messages Redis did not store "
             "(error, timeout or connection lost; UPSTREAM=stream)",
             s.upstream_append_failures),
            ("wsproxy_upstream_acks", "Acknowledgements sent to clients (?ack=1)",
             s.upstream_acks),
            ("wsproxy_upstream_nacks", "Negative acknowledgements sent to clients (?ack=1)",
             s.upstream_nacks),
            ("wsproxy_messages_dropped_down",
             "Backend payloads that could not be sent (tagged mode: bad tag or UTF-8)",
             s.dropped_down),
            ("wsproxy_publish_failures", "Client messages that could not be published",
             s.publish_failures),
            ("wsproxy_slow_consumer_closes", "Connections closed for not reading",
             s.slow_consumer_closes),
            ("wsproxy_redis_reconnects", "Redis connections re-established", s.redis_reconnects()),
            ("wsproxy_redis_holds", "Redis command connections replaced for a known reason "
             "(a failover the sentinels announced, a master new to the cluster's slot map) "
             "with client messages held meanwhile", holds),
            ("wsproxy_redis_held_commands", "Client messages (and other commands) held "
             "while a command connection was replaced, then sent in order", held),
            ("wsproxy_redis_hold_failures", "Commands that failed past a hold's bounds "
             "(5 s, 8 MiB): their clients were closed with 1011 or sent a nack",
             hold_failures),
            ("wsproxy_resume_recovered", "Resuming connections that got everything after "
             "their position", s.resume_recovered),
            ("wsproxy_resume_incomplete", "Recoveries that could not be complete (history "
             "trimmed, expired or started over), at open or later", s.resume_incomplete),
            ("wsproxy_resume_replayed_messages", "Messages replayed from history at open",
             s.resume_replayed),
            ("wsproxy_resume_gaps_filled", "Live gaps filled from history (e.g. after the "
             "subscriber was rebuilt)", s.resume_gaps_filled),
            ("wsproxy_topic_messages", "Messages received from Redis on topic channels "
             "(TOPICS)", s.topic_messages),
            ("wsproxy_topic_frames_built", "Frames built for topic messages: once per message "
             "and framing in use (raw, enveloped, labelled; per position for resuming "
             "sockets), however many sockets send it", s.topic_frames_built),
            ("wsproxy_topic_deliveries", "Topic messages sent to sockets (fan-out deliveries)",
             s.topic_deliveries),
            ("wsproxy_topic_changes", "Topic joins and leaves asked for on wsproxy:control "
             "(per message, whatever the sockets here)", s.topic_changes),
            ("wsproxy_events_published", "Lifecycle events published (one per destination)",
             s.events_published),
            ("wsproxy_events_dropped", "Lifecycle events that could not be published "
             "(Redis unavailable or refusing)", s.events_dropped),
            ("wsproxy_server_closes", "Sockets closed on a backend's request (wsproxy:control)",
             s.server_closes),
            ("wsproxy_control_ignored", "Malformed messages on wsproxy:control, ignored",
             s.control_ignored),
            ("wsproxy_auth_failures", "Failed token checks (401/403) counted towards "
             "AUTH_FAIL_LIMIT", s.auth_failures()),
            ("wsproxy_auth_limited", "Upgrades refused with 429 because their client address "
             "had too many failed token checks", s.auth_limited()),
            ("wsproxy_refusal_log_lines_suppressed", "Refusal log lines left out by the "
             "per-address budget", s.refusal_lines_suppressed),
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
            "wsproxy_upstream_in_flight",
            "Client messages sent to Redis with XADD and not answered yet (UPSTREAM=stream)",
            value=s.upstream_in_flight,
        )
        yield GaugeMetricFamily(
            "wsproxy_subscribed_channels", "Session and topic channels subscribed",
            value=s.subscribed_channels(),
        )
        yield GaugeMetricFamily(
            "wsproxy_topics", "Topics this process's sockets are in (TOPICS)",
            value=s.topics(),
        )
        shards = s.cluster_shards()
        if shards:
            up = GaugeMetricFamily(
                "wsproxy_cluster_shard_up",
                "Redis Cluster master reachable and its subscriber delivering (canary), by "
                "shard (the master's address); a master that failed and was replaced keeps "
                "reading 0 while the cluster lists it as failed",
                labels=["shard"],
            )
            channels = GaugeMetricFamily(
                "wsproxy_cluster_shard_channels",
                "Session channels subscribed on a Redis Cluster master, by shard (not "
                "counting the shard's canary channel nor wsproxy:control)",
                labels=["shard"],
            )
            for name, is_up, count in sorted(shards):
                up.add_metric([name], 1 if is_up else 0)
                channels.add_metric([name], count)
            yield up
            yield channels
            redirects = CounterMetricFamily(
                "wsproxy_cluster_redirects",
                "Redis Cluster redirections followed (moved, ask) and subscriptions moved "
                "(subscribe: refused with a redirection, sunsubscribe: dropped by Redis)",
                labels=["kind"],
            )
            counted = s.cluster_redirects()
            for kind in ("moved", "ask", "subscribe", "sunsubscribe"):
                redirects.add_metric([kind], counted[kind])
            yield redirects
        keys = s.jwt_keys()
        if keys is not None:
            checks = CounterMetricFamily(
                "wsproxy_jwt_checks", "JWTs checked (AUTH_MODE=jwt), by result",
                labels=["result"],
            )
            accepted, refused = s.jwt_checks()
            checks.add_metric(["accepted"], accepted)
            checks.add_metric(["refused"], refused)
            yield checks
            updates = CounterMetricFamily(
                "wsproxy_jwt_key_updates",
                "JWT key updates: file reloads (SIGHUP) and JWKS URL fetches, by result "
                "(reload, reload_failed, fetch, fetch_failed)",
                labels=["result"],
            )
            counted = s.jwt_key_updates()
            for result in ("reload", "reload_failed", "fetch", "fetch_failed"):
                updates.add_metric([result], counted[result])
            yield updates
            yield GaugeMetricFamily("wsproxy_jwt_keys", "JWT verification keys in use",
                                    value=keys)
        yield GaugeMetricFamily(
            "wsproxy_auth_limit_addresses",
            "Client addresses with recent failed token checks (bounded by AUTH_FAIL_TABLE_SIZE)",
            value=s.auth_limit_addresses(),
        )
        yield GaugeMetricFamily(
            "wsproxy_handshakes_waiting",
            "New connections waiting for a turn to have their request read "
            "(HANDSHAKES_PER_TURN)",
            value=s.handshakes_waiting(),
        )
        rtt = s.canary_rtt()
        if rtt is not None:
            yield GaugeMetricFamily(
                "wsproxy_canary_rtt_seconds",
                "Round trip of the last subscriber canary (publish to delivery)",
                value=rtt,
            )
