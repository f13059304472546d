"""
How a proxy is put together: the composition root. L{build_proxy} makes
the real Redis links (or a Cluster's) for a L{Settings} and hands them to a
L{Proxy}, which decides and never builds; tests build a L{Proxy} on fakes
instead.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from ..config import Settings
from ..redis.cluster import Cluster
from ..redis.redislink import build_links, process_token
from ..session.proxy import Proxy


def build_proxy(reactor: IReactorTime, settings: Settings) -> Proxy:
    """
    A L{Proxy} with real Redis links for C{settings}.
    """
    if settings.redis_cluster:
        cluster = Cluster(reactor, settings, process_token())
        return Proxy(settings, reactor, cluster.commands, cluster.subscribers, cluster=cluster)
    commands, subscriber = build_links(reactor, settings)
    return Proxy(settings, reactor, commands, subscriber)
