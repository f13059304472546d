"""
The whole proxy over loopback against a real redis-server, with real
WebSocket clients (Autobahn) and raw HTTP.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .support import ProxyTestCase, connect, status_of, upgrade_request, wait_for


class ConnectTests(ProxyTestCase):
    async def test_bearer_header(self) -> None:
        """
        A client with Authorization: Bearer <token> is connected.
        """
        self.authorize("s1")
        c = await self.client("s1")
        self.assertEqual(c.state, c.STATE_OPEN)

    async def test_query_parameter(self) -> None:
        """
        A browser-style client with ?access_token=<token> is connected.
        """
        self.authorize("s1", "q-tok")
        c = await connect(self.proxy.url("s1", query="?access_token=q-tok"))
        self.addCleanup(c.close_and_wait)
        self.assertEqual(c.state, c.STATE_OPEN)

    async def test_subprotocol(self) -> None:
        """
        A client offering subprotocols "bearer", <token> is connected and the
        server answers with the "bearer" subprotocol.
        """
        self.authorize("s1", "sp-tok")
        c = await connect(self.proxy.url("s1"), protocols=["bearer", "sp-tok"])
        self.addCleanup(c.close_and_wait)
        self.assertEqual(c.websocket_protocol_in_use, "bearer")

    async def test_ttl_reset_and_reconnect(self) -> None:
        """
        A successful connect sets the token's TTL to the grace period, so the
        same token works again after its initial TTL would have run out; a
        failed attempt leaves key and TTL alone.
        """
        await self.proxy.stop()
        await self.start(auth_grace_period=120)
        self.authorize("s1", ttl=2)
        started = time.monotonic()
        c = await self.client("s1")
        ttl = self.r.ttl("session:s1:auth")
        self.assertTrue(115 <= ttl <= 120, ttl)
        await c.close_and_wait()
        await wait_for(lambda: time.monotonic() - started > 2.5)
        c2 = await self.client("s1")
        self.assertEqual(c2.state, c2.STATE_OPEN)

        self.r.set("session:s1:auth", "tok", ex=100)
        response = await self.request(upgrade_request("/a/ws/s1", {"Authorization": "Bearer no"}))
        self.assertEqual(status_of(response), 403)
        self.assertEqual(self.r.get("session:s1:auth"), b"tok")
        self.assertTrue(95 <= self.r.ttl("session:s1:auth") <= 100)


    async def test_one_round_trip_and_flushed_script_cache(self) -> None:
        """
        The token check is one Redis command (EVALSHA, whose script does
        the GET and the EXPIRE) that also resets the TTL; with the script cache flushed (as on a
        newly promoted master) the next check runs it with EVAL, and every
        token form still connects. The token itself never reaches Redis
        (only its digest).
        """
        self.authorize("s1", ttl=50)
        self.r.config_resetstat()
        self.r.script_flush()
        for query, protocols in (("", None), ("?access_token=tok", None), ("", ["bearer", "tok"])):
            c = await connect(self.proxy.url("s1", query=query),
                              token=None if query or protocols else "tok",
                              **({"protocols": protocols} if protocols else {}))
            self.addCleanup(c.close_and_wait)
            self.assertEqual(c.state, c.STATE_OPEN)
        calls = {name[len("cmdstat_"):]: v["calls"]
                 for name, v in self.r.info("commandstats").items()}
        # EVALSHA answered NOSCRIPT, EVAL, then EVALSHA twice: three runs
        # of the script, whose GET and EXPIRE Redis counts as well
        self.assertEqual((calls.get("evalsha"), calls.get("eval")), (3, 1))
        self.assertEqual((calls.get("get"), calls.get("expire")), (3, 3))
        self.assertGreater(self.r.ttl("session:s1:auth"), 50)


class RefusalTests(ProxyTestCase):
    async def refused(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        return await self.request(upgrade_request(path, headers))

    async def test_missing_token_401(self) -> None:
        """
        No token: 401 with WWW-Authenticate and a plain-text reason.
        """
        self.authorize("s1")
        response = await self.refused("/a/ws/s1")
        self.assertEqual(status_of(response), 401)
        self.assertIn(b'WWW-Authenticate: Bearer realm="wsproxy"', response)
        self.assertIn(b"Content-Type: text/plain", response)
        self.assertTrue(response.endswith(b"Missing bearer token\n"))

    async def test_wrong_and_unknown_token_403(self) -> None:
        """
        A wrong token, or a token for a session nobody authorized: 403.
        """
        self.authorize("s1")
        for path in ("/a/ws/s1", "/a/ws/nobody"):
            response = await self.refused(path, {"Authorization": "Bearer wrong"})
            self.assertEqual(status_of(response), 403, path)

    async def test_invalid_session_400_404_426(self) -> None:
        """
        Invalid session ids are 400 (before Redis is asked), other paths 404,
        a plain GET on a WebSocket path 426.
        """
        for bad in ("a%3Ab", "a*", "a%5Bb%5D", "a%3F", "x" * 129):
            response = await self.refused(f"/a/ws/{bad}", {"Authorization": "Bearer t"})
            self.assertEqual(status_of(response), 400, bad)
        self.assertEqual(status_of(await self.refused("/a/nope/s1")), 404)
        self.assertEqual(status_of(await self.refused("/")), 404)
        plain = await self.request(b"GET /a/ws/s1 HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(plain), 426)
        self.assertIn(b"Upgrade: websocket", plain)

    async def test_redis_down_503(self) -> None:
        """
        With Redis unreachable a new connection gets 503 at once.
        """
        self.authorize("s1")
        self.redis.stop()
        await wait_for(lambda: self.proxy.proxy.commands.ready is None)
        started = time.monotonic()
        response = await self.refused("/a/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual(status_of(response), 503)
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_redis_paused_504(self) -> None:
        """
        When Redis does not answer within AUTH_TIMEOUT_SECS: 504.
        """
        self.authorize("s1")
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        response = await self.refused("/a/ws/s1", {"Authorization": "Bearer tok"})
        self.assertEqual(status_of(response), 504)


class BridgeTests(ProxyTestCase):
    async def test_publish_right_after_connect(self) -> None:
        """
        A message published the moment the client is connected arrives: the
        subscription is confirmed before the 101.
        """
        self.authorize("s1")
        c = await self.client("s1")
        self.r.publish("session:s1:down", "first")
        await c.wait_messages(1)
        self.assertEqual(c.messages, [(b"first", False)])

    async def test_down_text_and_binary(self) -> None:
        """
        UTF-8 payloads arrive as text frames, others as binary frames.
        """
        self.authorize("s1")
        c = await self.client("s1")
        self.r.publish("session:s1:down", "héllo")
        self.r.publish("session:s1:down", b"\xff\xfe\x00")
        await c.wait_messages(2)
        self.assertEqual(c.messages, [("héllo".encode(), False), (b"\xff\xfe\x00", True)])

    async def test_upstream_byte_exact(self) -> None:
        """
        Client text and binary messages are published on :up unchanged, in
        order.
        """
        self.authorize("s1")
        received = self.up_listener("s1")
        c = await self.client("s1")
        c.sendMessage("ünïcode ✓".encode(), isBinary=False)
        c.sendMessage(b"\x00\xff\x10", isBinary=True)
        c.sendMessage(b"", isBinary=False)
        await wait_for(lambda: len(received()) >= 3)
        self.assertEqual(received(), ["ünïcode ✓".encode(), b"\x00\xff\x10", b""])

    async def test_2000_messages_in_order(self) -> None:
        """
        2,000 downstream messages arrive complete and in publish order.
        """
        self.authorize("s1")
        c = await self.client("s1")
        pipe = self.r.pipeline(transaction=False)
        for i in range(2000):
            pipe.publish("session:s1:down", str(i))
        pipe.execute()
        await c.wait_messages(2000)
        self.assertEqual([int(m) for m, _ in c.messages], list(range(2000)))

    async def test_two_sockets_one_session(self) -> None:
        """
        Every socket of a session receives each message; one subscription
        serves both, and it is dropped after the last socket closes.
        """
        self.authorize("s1")
        a = await self.client("s1")
        b = await self.client("s1")
        self.assertEqual(self.r.pubsub_numsub("session:s1:down"), [(b"session:s1:down", 1)])
        self.r.publish("session:s1:down", "both")
        await a.wait_messages(1)
        await b.wait_messages(1)
        await a.close_and_wait()
        self.r.publish("session:s1:down", "still")
        await b.wait_messages(2)
        await b.close_and_wait()
        await wait_for(
            lambda: self.r.pubsub_numsub("session:s1:down") == [(b"session:s1:down", 0)]
        )

    async def test_oversized_message_1009(self) -> None:
        """
        A client message above MAX_MESSAGE_SIZE_BYTES closes with 1009.
        """
        await self.proxy.stop()
        await self.start(max_message_size=1000)
        self.authorize("s1")
        received = self.up_listener("s1")
        c = await connect(self.proxy.url("s1"), token="tok")
        c.sendMessage(b"x" * 1001, isBinary=True)
        code, _ = await c.factory.closed
        self.assertEqual(code, 1009)
        self.assertEqual(received(), [])

    async def test_backend_messages_of_any_size(self) -> None:
        """
        MAX_MESSAGE_SIZE_BYTES does not limit what the backend sends.
        """
        await self.proxy.stop()
        await self.start(max_message_size=1000)
        self.authorize("s1")
        c = await self.client("s1")
        self.r.publish("session:s1:down", b"y" * 100_000)
        await c.wait_messages(1)
        self.assertEqual(len(c.messages[0][0]), 100_000)

    async def test_publish_failure_closes_1011(self) -> None:
        """
        A client message that cannot be published (Redis gone) closes the
        socket with 1011 instead of being dropped silently.
        """
        self.authorize("s1")
        c = await connect(self.proxy.url("s1"), token="tok")
        self.redis.stop()
        await wait_for(lambda: self.proxy.proxy.commands.ready is None)
        c.sendMessage(b"lost?")
        code, _ = await c.factory.closed
        self.assertEqual(code, 1011)

    async def test_require_json(self) -> None:
        """
        With REQUIRE_JSON, a text message that is not JSON is answered with
        {"error":"Invalid JSON format"} and not published; JSON and binary
        messages pass.
        """
        await self.proxy.stop()
        await self.start(require_json=True)
        self.authorize("s1")
        received = self.up_listener("s1")
        c = await self.client("s1")
        c.sendMessage(b"not json")
        c.sendMessage(b'{"ok":1}')
        c.sendMessage(b"\x01", isBinary=True)
        await c.wait_messages(1)
        await wait_for(lambda: len(received()) >= 2)
        self.assertEqual(c.messages, [(b'{"error":"Invalid JSON format"}', False)])
        self.assertEqual(received(), [b'{"ok":1}', b"\x01"])


class HeartbeatTests(ProxyTestCase):
    settings = {"ping_interval": 1.0, "ping_timeout": 3.0}

    async def test_missing_pong_closes(self) -> None:
        """
        A client that answers no pings is disconnected after the ping
        timeout, and its subscription is released.
        """
        self.authorize("s1")
        c = await connect(self.proxy.url("s1"), token="tok", auto_ping=False)
        await c.factory.closed
        await wait_for(
            lambda: self.r.pubsub_numsub("session:s1:down") == [(b"session:s1:down", 0)]
        )

    async def test_answering_client_stays(self) -> None:
        """
        A client that answers pings is still connected after several ping
        intervals.
        """
        self.authorize("s1")
        c = await self.client("s1")
        started = time.monotonic()
        await wait_for(lambda: time.monotonic() - started > 5, timeout=8)
        self.assertEqual(c.state, c.STATE_OPEN)


class HttpEndpointTests(ProxyTestCase):
    async def get(self, path: str) -> tuple[int, bytes, bytes]:
        response = await self.request(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        head, _, body = response.partition(b"\r\n\r\n")
        return status_of(response), head, body

    async def test_health(self) -> None:
        """
        /health is 200 JSON while Redis answers, 503 once it is gone; both
        name the answering process.
        """
        self.authorize("s1")
        await self.client("s1")
        code, head, body = await self.get("/health")
        self.assertEqual(code, 200)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertEqual(
            json.loads(body),
            {"status": "healthy", "redis": "connected", "active_connections": 1,
             "pid": os.getpid()},
        )
        self.redis.stop()
        code, _, body = await self.get("/health")
        self.assertEqual(code, 503)
        self.assertEqual(
            json.loads(body),
            {"status": "unhealthy", "redis": "disconnected", "active_connections": 1,
             "pid": os.getpid()},
        )

    async def test_ready_and_no_server_version(self) -> None:
        """
        /ready is 200 {"status":"ready"}; responses carry no Server header.
        """
        code, head, body = await self.get("/ready")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))
        self.assertNotIn(b"Server:", head)
        self.proxy.proxy.draining = True
        code, _, body = await self.get("/ready")
        self.assertEqual((code, json.loads(body)), (503, {"status": "draining"}))

    async def test_metrics(self) -> None:
        """
        /metrics exposes Prometheus counters, including refusals by status.
        """
        self.authorize("s1")
        await self.request(upgrade_request("/a/ws/s1", {"Authorization": "Bearer bad"}))
        c = await self.client("s1")
        self.r.publish("session:s1:down", "m")
        await c.wait_messages(1)
        code, _, body = await self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'wsproxy_connections_total{outcome="403"} 1.0', body)
        self.assertIn(b'wsproxy_connections_total{outcome="accepted"} 1.0', body)
        self.assertIn(b"wsproxy_messages_down_total 1.0", body)
        self.assertIn(b"wsproxy_connections_open 1.0", body)


    async def test_bytes_down_are_payload_bytes(self) -> None:
        """
        wsproxy_bytes_down_total and the close log line's out= count payload
        bytes, like the up direction: no frame headers (2, 4 and 10 bytes
        for these sizes), and the same in tagged mode (no tag byte).
        """
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sizes = (10, 200, 70_000)
        for mode, tag in (("auto", b""), ("tagged", b"t")):
            await self.proxy.stop()
            await self.start(frame_mode=mode)
            self.authorize("s1")
            c = await self.client("s1")
            for size in sizes:
                self.r.publish("session:s1:down", tag + b"x" * size)
            await c.wait_messages(3)
            c.sendMessage(b"12345")
            await c.close_and_wait()
            code, _, body = await self.get("/metrics")
            self.assertIn(b"wsproxy_bytes_down_total 70210.0", body, mode)
            self.assertIn(b"wsproxy_bytes_up_total 5.0", body, mode)
            await wait_for(lambda: any("closed: session=s1" in formatEvent(e) for e in events))
            closed = [formatEvent(e) for e in events if "closed: session=s1" in formatEvent(e)]
            self.assertIn("in=1/5B out=3/70210B", closed[-1], mode)
            del events[:]


    async def test_unheard_client_messages_counted(self) -> None:
        """
        A client message published while no backend listens on :up (PUBLISH
        answered 0) is counted in wsproxy_messages_up_unheard_total and said
        in one warning (not one per message); heard ones are not counted.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.authorize("s1")
        c = await self.client("s1")
        for i in range(3):
            c.sendMessage(b"nobody hears %d" % i)
        await wait_for(lambda: self.proxy.proxy.stats.messages_up_unheard == 3)
        received = self.up_listener("s1")
        c.sendMessage(b"heard")
        await wait_for(lambda: received() == [b"heard"])
        self.assertEqual(self.proxy.proxy.stats.messages_up_unheard, 3)
        lines = [formatEvent(e) for e in events if "no backend subscribed" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        code, _, body = await self.get("/metrics")
        self.assertIn(b"wsproxy_messages_up_unheard_total 3.0", body)


class CompressionTests(ProxyTestCase):
    async def offer_deflate(self) -> Any:
        from autobahn.websocket.compress import PerMessageDeflateOffer

        self.authorize("s1")
        c = await connect(self.proxy.url("s1"), token="tok",
                          compression_offers=[PerMessageDeflateOffer()])
        self.addCleanup(c.close_and_wait)
        self.r.publish("session:s1:down", "x" * 1000)
        await c.wait_messages(1)
        self.assertEqual(c.messages, [(b"x" * 1000, False)])
        return c

    async def test_offer_declined_by_default(self) -> None:
        """
        A client offering permessage-deflate (every browser does) connects
        uncompressed when WS_COMPRESSION is off.
        """
        c = await self.offer_deflate()
        self.assertEqual(c.websocket_extensions_in_use, [])

    async def test_offer_accepted(self) -> None:
        """
        With WS_COMPRESSION=true the offer is accepted and messages flow
        compressed both ways.
        """
        await self.proxy.stop()
        await self.start(compression=True)
        received = self.up_listener("s1")
        c = await self.offer_deflate()
        self.assertEqual([e.EXTENSION_NAME for e in c.websocket_extensions_in_use],
                         ["permessage-deflate"])
        c.sendMessage(b"y" * 5000)
        await wait_for(lambda: received() == [b"y" * 5000])

    async def test_inflated_size_limited(self) -> None:
        """
        MAX_MESSAGE_SIZE_BYTES applies after inflation: a small compressed
        frame that inflates past it closes with 1009 and is not published.
        """
        await self.proxy.stop()
        await self.start(compression=True, max_message_size=10_000)
        received = self.up_listener("s1")
        c = await self.offer_deflate()
        c.sendMessage(b"z" * 1_000_000)
        code, _ = await c.factory.closed
        self.assertEqual(code, 1009)
        self.assertEqual(received(), [])


class TaggedModeTests(ProxyTestCase):
    settings = {"frame_mode": "tagged"}

    async def test_frame_types_round_trip(self) -> None:
        """
        FRAME_MODE=tagged: client messages are published with a t/b tag;
        backend payloads choose the frame type by their tag, even binary
        payloads that are valid UTF-8; untagged payloads are dropped and
        counted, the connection stays open.
        """
        self.authorize("s1")
        received = self.up_listener("s1")
        c = await self.client("s1")
        c.sendMessage(b"hello", isBinary=False)
        c.sendMessage(b"ascii-but-binary", isBinary=True)
        await wait_for(lambda: len(received()) >= 2)
        self.assertEqual(received(), [b"thello", b"bascii-but-binary"])
        for payload in (b"bplain ascii", b"t{\"a\":1}", b"no tag", b"t\xff", b"b\xff\x00"):
            self.r.publish("session:s1:down", payload)
        await c.wait_messages(3)
        await wait_for(lambda: self.proxy.proxy.stats.dropped_down == 2)
        self.assertEqual(
            c.messages, [(b"plain ascii", True), (b'{"a":1}', False), (b"\xff\x00", True)]
        )
        self.assertEqual(c.state, c.STATE_OPEN)
