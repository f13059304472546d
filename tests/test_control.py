"""
Session control against a real redis-server, real clients and real
daemons: lifecycle events for each way a socket opens and closes,
server-side close across proxy processes, revocation, the events stream
for a consumer that was down, Redis down during a close, and malformed
control messages.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from wsproxy.backend import Backend

from .support import (
    Daemon,
    EventLog,
    RedisTestCase,
    RunningProxy,
    connect,
    daemon_env,
    raw_exchange,
    raw_upgrade,
    start_daemon,
    start_proxy,
    status_of,
    upgrade_request,
    wait_for,
)


class ControlTestCase(RedisTestCase):
    timeout = 60

    def start_proxy(self, **settings: Any) -> RunningProxy:
        values: dict[str, Any] = {"events": ("all", "session")}
        values.update(settings)
        return start_proxy(self, self.redis.url, **values)

    async def client(self, proxy: RunningProxy, session: str = "s1", **kwargs: Any) -> Any:
        self.r.set(f"session:{session}:auth", "tok", ex=300)
        c = await connect(proxy.url(session), token="tok", **kwargs)
        self.addCleanup(c.close_and_wait)
        return c


class EventTests(ControlTestCase):
    async def test_open_and_client_close(self) -> None:
        """
        An open event, then on the client's close a close event with code,
        reason, who closed, duration and counts both ways; the same events
        on the session's own channel.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        log = EventLog(self.r, self)
        session_log = self.r.pubsub(ignore_subscribe_messages=True)
        session_log.subscribe("session:s1:events")
        session_log.get_message(timeout=1)
        self.addCleanup(session_log.close)
        c = await self.client(proxy)
        await wait_for(lambda: log.of("open"))
        opened = log.of("open")[0]
        self.assertEqual(
            {k: opened[k] for k in ("session_id", "agent_id", "instance", "peer")},
            {"session_id": "s1", "agent_id": "agent", "instance": proxy.proxy.instance,
             "peer": "127.0.0.1"},
        )
        self.assertTrue(opened["connection_id"].startswith(proxy.proxy.instance + "."))
        self.r.publish("session:s1:down", "12345")
        await c.wait_messages(1)
        c.sendMessage(b"abc")
        await wait_for(lambda: proxy.proxy.stats.messages_up == 1)
        c.sendClose(4100, "bye")
        await c.factory.closed
        await wait_for(lambda: log.of("close"))
        closed = log.of("close")[0]
        self.assertEqual(closed["connection_id"], opened["connection_id"])
        self.assertEqual(
            {k: closed[k] for k in ("code", "reason", "closed_by", "messages_in", "bytes_in",
                                    "messages_out", "bytes_out")},
            {"code": 4100, "reason": "bye", "closed_by": "client", "messages_in": 1,
             "bytes_in": 3, "messages_out": 1, "bytes_out": 5},
        )
        self.assertGreaterEqual(closed["duration"], 0)
        self.assertLessEqual(closed["opened_at"], closed["time"])
        seen = []
        while (m := session_log.get_message(timeout=1)) is not None:
            seen.append(json.loads(m["data"])["event"])
        self.assertEqual(seen, ["open", "close"])
        await wait_for(lambda: proxy.proxy.stats.events_published == 4)

    async def test_closed_by_ping_timeout_and_slow_consumer(self) -> None:
        """
        A client that stops answering pings closes as "timeout"; one that
        stops reading as "slow_consumer" (code 1008).
        """
        proxy = self.start_proxy(ping_interval=0.5, ping_timeout=0.5,
                                 max_send_buffer=64 * 1024)
        await proxy.ready()
        log = EventLog(self.r, self)
        await self.client(proxy, "deaf", auto_ping=False)
        await wait_for(lambda: [e for e in log.of("close") if e["session_id"] == "deaf"],
                       timeout=15)
        deaf = [e for e in log.of("close") if e["session_id"] == "deaf"][0]
        self.assertEqual(deaf["closed_by"], "timeout")

        # (a raw client answers no pings: a proxy without them for this one)
        proxy = self.start_proxy(max_send_buffer=64 * 1024)
        await proxy.ready()
        self.r.set("session:slow:auth", "tok", ex=300)
        c = await raw_upgrade(proxy.port, "/a/ws/slow", {"Authorization": "Bearer tok"})
        self.addCleanup(c.abort)
        c.transport.pauseProducing()
        big = b"x" * 60000
        for _ in range(400):
            self.r.publish("session:slow:down", big)
            if [e for e in log.of("close") if e["session_id"] == "slow"]:
                break
        await wait_for(lambda: [e for e in log.of("close") if e["session_id"] == "slow"])
        slow = [e for e in log.of("close") if e["session_id"] == "slow"][0]
        self.assertEqual(slow["closed_by"], "slow_consumer")

    async def test_redis_down_during_close_drops_the_event(self) -> None:
        """
        Redis is gone when a client closes: the socket closes all the
        same, the event is counted as dropped.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy)
        self.redis.stop()
        await wait_for(lambda: proxy.proxy.commands.ready is None)
        await c.close_and_wait()
        await wait_for(lambda: proxy.proxy.stats.events_dropped >= 1)
        self.assertEqual(proxy.proxy.stats.open_connections, 0)
        self.assertIn(b"wsproxy_events_dropped_total", proxy.proxy.stats.render())

    async def test_stream_keeps_events_for_a_consumer_that_was_down(self) -> None:
        """
        EVENTS=stream: events published while no backend reads are all read
        afterwards by a consumer group, pending ones again after a restart
        until acknowledged.
        """
        proxy = self.start_proxy(events=("stream",))
        await proxy.ready()
        for i in range(3):
            c = await self.client(proxy, f"s{i}")
            await c.close_and_wait()
        await wait_for(lambda: self.r.xlen("wsproxy:events:stream") == 6)
        backend = Backend(self.redis.client())
        first = backend.read_events("workers", "w1", count=4, block_ms=100)
        self.assertEqual([e["event"] for _, e in first], ["open", "close"] * 2)
        # w1 "crashes" before acknowledging: the same entries come back
        again = backend.read_events("workers", "w1", count=10, block_ms=100)
        self.assertEqual([i for i, _ in again], [i for i, _ in first])
        backend.ack_events("workers", *[i for i, _ in first])
        rest = backend.read_events("workers", "w1", count=10, block_ms=100)
        self.assertEqual([(e["event"], e["session_id"]) for _, e in rest],
                         [("open", "s2"), ("close", "s2")])

    async def test_events_off_by_default(self) -> None:
        """
        Without EVENTS nothing is published and no heartbeat key is kept.
        """
        proxy = self.start_proxy(events=())
        await proxy.ready()
        log = EventLog(self.r, self)
        c = await self.client(proxy)
        await c.close_and_wait()
        self.assertEqual(log(), [])
        self.assertEqual(self.r.keys("wsproxy:instance:*"), [])


class ServerCloseTests(ControlTestCase):
    async def test_close_with_code_and_reason(self) -> None:
        """
        PUBLISH wsproxy:control {"close": ...}: every socket of that
        session gets the close frame with the backend's code and reason,
        other sessions are untouched; the close event says "server".
        """
        proxy = self.start_proxy()
        await proxy.ready()
        log = EventLog(self.r, self)
        a1 = await self.client(proxy, "s1")
        a2 = await self.client(proxy, "s1")
        other = await self.client(proxy, "s2")
        receivers = Backend(self.redis.client()).close("s1", 4001, "banned")
        self.assertEqual(receivers, 1)
        for c in (a1, a2):
            self.assertEqual(await c.factory.closed, (4001, "banned"))
        self.assertEqual(other.state, other.STATE_OPEN)
        await wait_for(lambda: len(log.of("close")) == 2)
        self.assertEqual({e["closed_by"] for e in log.of("close")}, {"server"}, log.of("close"))
        self.assertEqual({e["code"] for e in log.of("close")}, {4001})
        self.assertEqual(proxy.proxy.stats.server_closes, 2)

    async def test_revoke_prevents_reconnection(self) -> None:
        """
        close(..., revoke=True) deletes the token in the same transaction:
        the client is closed and its reconnection refused 403.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy)
        Backend(self.redis.client()).close("s1", 1008, "token revoked", revoke=True)
        self.assertEqual(await c.factory.closed, (1008, "token revoked"))
        response = await raw_exchange(proxy.port, upgrade_request(
            "/a/ws/s1", {"Authorization": "Bearer tok"}))
        self.assertEqual(status_of(response), 403)

    async def test_malformed_control_messages_ignored(self) -> None:
        """
        Bad JSON, no or an invalid session id, a code out of range, a huge
        reason: ignored with a log line, no socket closed, the process and
        its sessions unaffected; a valid one afterwards still works.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        c = await self.client(proxy, "s1")
        bad = [
            b"not json", b"[1,2]", b'{"close": 5}', b'{"close": "s1:x"}', b'{"close": "*"}',
            b'{"close": "s1", "code": 1006}', b'{"close": "s1", "code": 3000}',
            b'{"close": "s1", "code": "4000"}', b'{"close": "s1", "code": true}',
            json.dumps({"close": "s1", "reason": "x" * 200}).encode(),
            b"x" * 100_000, b'{"close": "nobody-here"}',
        ]
        for payload in bad:
            self.r.publish("wsproxy:control", payload)
        self.r.publish("session:s1:down", "still here")
        await c.wait_messages(1)
        self.assertEqual(c.state, c.STATE_OPEN)
        await wait_for(lambda: proxy.proxy.stats.control_ignored == len(bad) - 1)
        Backend(self.redis.client()).close("s1", 4000, "done")
        self.assertEqual(await c.factory.closed, (4000, "done"))

    async def test_who_is_connected(self) -> None:
        """
        is_connected (PUBSUB NUMSUB of the session's channels) follows the
        sockets: true while one is open anywhere, false after.
        """
        proxy = self.start_proxy()
        await proxy.ready()
        backend = Backend(self.redis.client())
        self.assertFalse(backend.is_connected("s1"))
        c = await self.client(proxy)
        self.assertTrue(backend.is_connected("s1"))
        await c.close_and_wait()
        await wait_for(lambda: not backend.is_connected("s1"))


class DaemonControlTests(RedisTestCase):
    """
    Real daemons: a server-side close reaches the session's sockets on two
    processes; a clean shutdown sends every close event and deletes the
    heartbeat key; a killed process leaves its key to expire.
    """

    timeout = 90

    def start(self, **env: str) -> Daemon:
        return start_daemon(self, daemon_env(self.redis.url, SHUTDOWN_GRACE_PERIOD_SECS="5",
                                             EVENTS="all", **env))

    async def test_close_on_two_processes(self) -> None:
        """
        The session's sockets on both processes are closed with the code,
        another session's are not.
        """
        first, second = self.start(), self.start()
        ports = [await first.ready(), await second.ready()]
        self.r.set("session:s1:auth", "tok", ex=300)
        self.r.set("session:s2:auth", "tok", ex=300)
        mine = [await connect(f"ws://127.0.0.1:{p}/a/ws/s1", token="tok") for p in ports]
        others = [await connect(f"ws://127.0.0.1:{p}/a/ws/s2", token="tok") for p in ports]
        for c in others:
            self.addCleanup(c.close_and_wait)
        self.assertEqual(Backend(self.redis.client()).close("s1", 4321, "moved"), 2)
        for c in mine:
            self.assertEqual(await c.factory.closed, (4321, "moved"))
        self.r.publish("session:s2:down", "alive")
        for c in others:
            await c.wait_messages(1)

    async def test_shutdown_events_and_heartbeat(self) -> None:
        """
        SIGTERM: every open socket gets its close event ("shutdown", 1001),
        then the instance's heartbeat key is deleted. SIGKILL: no close
        event; the key stays until its TTL runs out (the backend's way to
        find out).
        """
        log = EventLog(self.r, self)
        daemon = self.start()
        port = await daemon.ready()
        await wait_for(lambda: self.r.keys("wsproxy:instance:*"))
        key = self.r.keys("wsproxy:instance:*")[0].decode()
        instance = key.split(":", 2)[2]
        self.assertEqual(json.loads(self.r.get(key))["instance"], instance)
        self.assertTrue(Backend(self.redis.client()).instance_alive(instance))
        self.r.set("session:s1:auth", "tok", ex=300)
        clients = [await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")
                   for _ in range(3)]
        await wait_for(lambda: len(log.of("open")) == 3)
        self.assertEqual({e["instance"] for e in log.of("open")}, {instance})
        daemon.signal(signal.SIGTERM)
        for c in clients:
            self.assertEqual((await c.factory.closed)[0], 1001)
        self.assertEqual(await daemon.out.ended, 0)
        await wait_for(lambda: len(log.of("close")) == 3)
        self.assertEqual({e["closed_by"] for e in log.of("close")}, {"shutdown"})
        self.assertEqual(self.r.exists(key), 0)

        killed = self.start()
        port = await killed.ready()
        await wait_for(lambda: len(self.r.keys("wsproxy:instance:*")) == 1)
        key = self.r.keys("wsproxy:instance:*")[0].decode()
        c = await connect(f"ws://127.0.0.1:{port}/a/ws/s1", token="tok")
        await wait_for(lambda: len(log.of("open")) == 4)
        killed.signal(signal.SIGKILL)
        await c.factory.closed
        self.assertEqual(len(log.of("close")), 3)
        ttl = self.r.ttl(key)
        self.assertGreater(ttl, 0)
        self.assertLessEqual(ttl, 15)
