"""
The proxy in the test's own reactor, listening on loopback: L{settings_for}
(settings with test-sized timeouts), L{RunningProxy} and L{ProxyTestCase}
(a fresh redis-server and proxy for each test).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString

from wsproxy.config import Settings, parse_redis_url
from wsproxy.edge.site import ProxySite
from wsproxy.process.build import build_proxy
from wsproxy.process.daemon import ProxyService

from .base import wait_for
from .clients import connect, up_listener
from .http import raw_exchange
from .redis import RedisTestCase


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    """
    Settings for a proxy on a random loopback port, with timeouts short
    enough for tests.
    """
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        port=0,
        listen="tcp:0:interface=127.0.0.1",
        redis=parse_redis_url(redis_url),
        auth_timeout=2.0,
        ping_interval=0.0,
        shutdown_grace_period=3.0,
        shutdown_drain=0.0,
        handshake_timeout=5.0,
    )
    values.update(overrides)
    return Settings(**values)


class RunningProxy:
    """
    The proxy in this process's reactor, listening on loopback;
    C{service_options} go to its L{ProxyService} (C{manage_heap=True,
    lean_poll=True}: as twistd builds it).
    """

    def __init__(self, settings: Settings, **service_options: Any) -> None:
        self.proxy = build_proxy(reactor, settings)
        self.site = ProxySite(self.proxy)
        self.service = ProxyService(
            self.proxy, self.site, serverFromString(reactor, settings.listen), reactor,
            **service_options,
        )
        self.service.startService()
        self.port = self.service.port.getHost().port

    def url(self, session_id: str, agent: str = "agent", query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/{agent}/ws/{session_id}{query}"

    def ready(self) -> defer.Deferred:
        """
        Fires once both Redis connections are usable and the canary channel
        is subscribed.
        """
        return wait_for(lambda: self.proxy.hub.healthy and self.proxy.commands.ready is not None)

    def stop(self) -> defer.Deferred:
        return self.service.stopService()


def start_proxy(test: Any, redis_url: str, **settings: Any) -> RunningProxy:
    """
    The proxy (L{settings_for} C{redis_url} and C{settings}) started for
    C{test}, and stopped at its clean-up.
    """
    proxy = RunningProxy(settings_for(redis_url, **settings))
    test.addCleanup(proxy.stop)
    return proxy


class ProxyTestCase(RedisTestCase):
    """
    A fresh redis-server and proxy for each test.
    """

    timeout = 60
    settings: dict[str, Any] = {}

    async def start(self, **settings: Any) -> None:
        await self.start_at(self.redis.url, **settings)

    async def start_at(self, redis_url: str, **settings: Any) -> None:
        self.proxy = RunningProxy(settings_for(redis_url, **settings))
        await self.proxy.ready()

    def setUp(self) -> defer.Deferred:
        super().setUp()
        d = defer.ensureDeferred(self.start(**self.settings))
        d.addCallback(lambda _: self.addCleanup(lambda: self.proxy.stop()))
        return d

    def authorize(self, session: str, token: str = "tok", ttl: int = 300) -> None:
        self.r.set(f"session:{session}:auth", token, ex=ttl)

    async def client(self, session: str, token: str = "tok", **kwargs: Any) -> Any:
        c = await connect(self.proxy.url(session), token=token, **kwargs)
        self.addCleanup(c.close_and_wait)
        return c

    async def request(self, raw: bytes) -> bytes:
        return await raw_exchange(self.proxy.port, raw)

    def up_listener(self, session: str) -> Any:
        return up_listener(self.r, session, self)
