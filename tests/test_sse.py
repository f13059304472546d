"""
Server-Sent Events (issue 28, the GET stream) against a real redis-server
and the proxy in the test's reactor: raw HTTP clients over loopback read
the event stream (tests/support/sse.py).
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from typing import Any, Optional

from twisted.internet import reactor, task

from wsproxy.backend import Backend

from .support import http_get, wait_for
from .support.proxy import ProxyTestCase, RunningProxy, start_proxy
from .support.daemon import EnvTestCase
from .support.redis import RedisTestCase
from .support.sse import EventStream, open_stream, sse_request

ORIGIN = "https://app.example"


def publish(r: Any, session: str, message: bytes | str, kind: str = "auto") -> str:
    """
    One recoverable message, as a backend sends it (wsproxy_publish); its
    position.
    """
    position = r.fcall(
        "wsproxy_publish", 2, f"session:{session}:history", f"session:{session}:meta",
        message, kind,
    )
    return position.decode() if isinstance(position, bytes) else str(position)


class SseTestCase(ProxyTestCase):
    settings: dict[str, Any] = {"allowed_origins": (ORIGIN,)}

    async def stream(self, session: str = "s1", query: str = "?access_token=tok",
                     headers: Optional[dict[str, str]] = None, agent: str = "a",
                     method: str = "GET", proxy: Optional[RunningProxy] = None) -> EventStream:
        proxy = proxy or self.proxy
        return await open_stream(proxy.port, f"/{agent}/sse/{session}{query}", headers,
                                 method, test=self)

    async def opened(self, session: str = "s1", **kwargs: Any) -> EventStream:
        """
        An open stream of C{session}: its head and its retry line read.
        """
        s = await self.stream(session, **kwargs)
        self.assertEqual(s.status, 200, s.body)
        await wait_for(lambda: s.retry is not None)
        return s


class RefusalTests(SseTestCase):
    async def refused(self, code: int, body: str, **kwargs: Any) -> EventStream:
        s = await self.stream(**kwargs)
        await wait_for(lambda: s.status is not None and s.body.endswith(b"\n"))
        self.assertEqual((s.status, s.body), (code, body.encode() + b"\n"))
        self.assertEqual(s.header("content-type"), "text/plain; charset=utf-8")
        self.assertIsNone(s.header("server"))
        return s

    async def test_refusals(self) -> None:
        """
        Each refusal of the admission: its status and plain-text body; the
        CORS headers with an allowed Origin, none with another.
        """
        self.authorize("s1")
        cors = {"Origin": ORIGIN}
        s = await self.refused(401, "Missing bearer token", query="", headers=cors)
        self.assertEqual(s.header("access-control-allow-origin"), ORIGIN)
        self.assertEqual(s.header("vary"), "Origin")
        s = await self.refused(403, "Invalid or expired token", query="?access_token=nope",
                               headers=cors)
        self.assertEqual(s.header("access-control-allow-origin"), ORIGIN)
        s = await self.refused(403, "Origin not allowed",
                               headers={"Origin": "https://evil.example"})
        self.assertIsNone(s.header("access-control-allow-origin"))
        await self.refused(404, "Not Found", agent="a/b")
        await self.refused(400, "Invalid session id", session="bad%20id")
        s = await self.refused(406, "Not Acceptable", headers={"Accept": "text/html", **cors})
        self.assertEqual(s.header("access-control-allow-origin"), ORIGIN)
        await self.refused(405, "Method Not Allowed", method="POST")
        await self.refused(400, "Resumable sessions are not enabled",
                           query="?access_token=tok&resume=")
        await self.refused(400, "Resumable sessions are not enabled",
                           headers={"Last-Event-ID": "x"})
        await self.refused(400, "Token presented more than once",
                           query="?access_token=tok", headers={"Authorization": "Bearer tok"})
        await self.refused(400, "Topics are not enabled", query="?access_token=tok&labels=1")
        self.proxy.proxy.draining = True
        s = await self.refused(503, "Server shutting down")
        self.assertEqual(s.header("retry-after"), "1")
        self.proxy.proxy.draining = False
        self.assertIn("refused 406 Not Acceptable: session=s1 agent=a", self.log_text())
        self.assertEqual(self.proxy.proxy.stats.outcomes["406"], 1)
        self.assertEqual(len(self.proxy.proxy.connections), 0)

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def setUp(self) -> Any:
        from twisted.logger import globalLogPublisher, formatEvent

        self.lines: list[str] = []

        def observe(e: Any) -> None:
            self.lines.append(formatEvent(e))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return super().setUp()

    async def test_accept(self) -> None:
        """
        Accept absent, naming text/event-stream or */*: a stream.
        """
        self.authorize("s1")
        for accept in (None, "text/event-stream", "text/html, */*;q=0.1"):
            s = await self.opened(headers={} if accept is None else {"Accept": accept})
            s.close()

    async def test_max_connections_counts_both(self) -> None:
        """
        MAX_CONNECTIONS counts WebSocket connections and SSE streams
        together.
        """
        await self.proxy.stop()
        await self.start(max_connections=2)
        self.authorize("s1")
        await self.client("s1")
        await self.opened()
        s = await self.stream()
        await wait_for(lambda: s.body.endswith(b"\n"))
        self.assertEqual((s.status, s.body), (503, b"Too many connections\n"))

    async def test_preflight(self) -> None:
        """
        OPTIONS from an allowed Origin (a cross-origin fetch with its token
        in Authorization): 204 and what the stream's request may carry;
        from any other origin, 405.
        """
        s = await self.stream(method="OPTIONS", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        self.assertEqual(s.status, 204)
        self.assertEqual(s.header("access-control-allow-origin"), ORIGIN)
        self.assertEqual(s.header("access-control-allow-methods"), "GET")
        self.assertIn("Authorization", s.header("access-control-allow-headers") or "")
        self.assertIn("Last-Event-ID", s.header("access-control-allow-headers") or "")
        s = await self.stream(method="OPTIONS", headers={"Origin": "https://evil.example"})
        await wait_for(lambda: s.body.endswith(b"\n"))
        self.assertEqual(s.status, 405)
        self.assertEqual(len(self.proxy.proxy.connections), 0)

    async def test_header_token_and_ticket(self) -> None:
        """
        Authorization: Bearer (fetch-based clients), and a connect ticket.
        """
        self.authorize("s1")
        await self.opened(query="", headers={"Authorization": "Bearer tok"})
        ticket = Backend(self.r).issue_ticket("s1")
        await self.opened(query=f"?ticket={ticket}")
        # single-use
        s = await self.stream(query=f"?ticket={ticket}")
        await wait_for(lambda: s.body.endswith(b"\n"))
        self.assertEqual(s.status, 403)


class StreamTests(SseTestCase):
    async def test_head(self) -> None:
        """
        200, the stream's content type and caching headers, chunked, CORS
        for an allowed Origin, and the retry line first.
        """
        self.authorize("s1")
        s = await self.opened(headers={"Origin": ORIGIN})
        self.assertEqual(s.header("content-type"), "text/event-stream; charset=utf-8")
        self.assertEqual(s.header("cache-control"), "no-cache, no-transform")
        self.assertEqual(s.header("x-accel-buffering"), "no")
        self.assertEqual(s.header("transfer-encoding"), "chunked")
        self.assertIsNone(s.header("content-length"))
        self.assertEqual(s.header("access-control-allow-origin"), ORIGIN)
        self.assertEqual(s.header("vary"), "Origin")
        self.assertEqual(s.retry, 2000)
        self.assertTrue(s.body.startswith(b"retry: 2000\n\n"), s.body)

    async def test_messages(self) -> None:
        """
        Text with newlines arrives exact (data lines joined with LF);
        binary as base64 (event: binary); text with CR as base64 (event:
        text-base64); empty text as one empty data line.
        """
        self.authorize("s1")
        s = await self.opened()
        sent = [b"hello", b"two\nlines\n\nand more", b"\x00\xff\x80", b"cr\r\nlf", b"",
                " é ".encode()]
        for m in sent:
            self.r.publish("session:s1:down", m)
        events = await s.wait_events(len(sent))
        self.assertEqual([e.event for e in events],
                         ["message", "message", "binary", "text-base64", "message", "message"])
        self.assertEqual([e.payload() for e in events], sent)
        self.assertEqual(events[1].data, "two\nlines\n\nand more")
        self.assertIn(b"data: two\ndata: lines\ndata: \ndata: and more\n\n", s.body)
        self.assertEqual(events[2].data, base64.b64encode(b"\x00\xff\x80").decode())
        self.assertTrue(all(e.id is None for e in events))
        stats = self.proxy.proxy.stats
        self.assertEqual((stats.sse_messages_down, stats.messages_down), (6, 6))

    async def test_both_transports(self) -> None:
        """
        A session's WebSocket client and SSE stream both get its messages;
        the open count and the metrics see both.
        """
        self.authorize("s1")
        c = await self.client("s1")
        s = await self.opened()
        self.r.publish("session:s1:down", "to both")
        await c.wait_messages(1)
        await s.wait_events(1)
        self.assertEqual(s.events[0].data, "to both")
        stats = self.proxy.proxy.stats
        self.assertEqual((stats.open_connections, stats.sse_connections_open), (2, 1))
        s.close()
        await wait_for(lambda: stats.sse_connections_open == 0)
        self.assertEqual(stats.open_connections, 1)
        self.assertEqual(len(self.proxy.proxy.connections), 1)
        self.assertEqual(len(self.proxy.proxy.sessions["s1"]), 1)

    async def test_heartbeat(self) -> None:
        """
        WS_PING_INTERVAL_SECS: a comment line every interval.
        """
        await self.proxy.stop()
        await self.start(ping_interval=0.2, allowed_origins=(ORIGIN,))
        self.authorize("s1")
        s = await self.opened()
        await wait_for(lambda: len(s.comments) >= 2, timeout=3)
        self.assertEqual(s.comments[:2], ["ping", "ping"])
        self.assertIn(b": ping\n\n", s.body)

    async def test_retry_setting(self) -> None:
        """
        SSE_RETRY_MS is the stream's first line.
        """
        await self.proxy.stop()
        await self.start(sse_retry_ms=500)
        self.authorize("s1")
        s = await self.opened()
        self.assertTrue(s.body.startswith(b"retry: 500\n\n"))

    async def test_server_close(self) -> None:
        """
        A backend's close (wsproxy:control): a close event with its code
        and reason, then the response ends; a WebSocket client of the
        session is closed too.
        """
        self.authorize("s1")
        s = await self.opened()
        self.r.publish("wsproxy:control", json.dumps({"close": "s1", "code": 4000,
                                                      "reason": "done"}))
        await s.done
        self.assertTrue(s.complete)
        self.assertEqual([e.json() for e in s.named("close")],
                         [{"code": 4000, "reason": "done"}])
        self.assertEqual(self.proxy.proxy.stats.open_connections, 0)

    async def test_events(self) -> None:
        """
        Lifecycle events say "transport": "sse".
        """
        await self.proxy.stop()
        await self.start(events=("session",))
        self.authorize("s1")
        sub = self.r.pubsub()
        sub.subscribe("session:s1:events")
        await wait_for(lambda: sub.get_message(timeout=0) is not None)
        s = await self.opened()
        s.close()
        got: list[dict[str, Any]] = []

        def read() -> bool:
            m = sub.get_message(timeout=0)
            if m is not None and m["type"] == "message":
                got.append(json.loads(m["data"]))
            return len(got) >= 2

        await wait_for(read)
        sub.close()
        self.assertEqual([(e["event"], e["transport"]) for e in got],
                         [("open", "sse"), ("close", "sse")])
        self.assertEqual(got[1]["closed_by"], "client")


class LeavingTests(SseTestCase):
    async def test_client_leaves_during_admission(self) -> None:
        """
        A client that leaves while its stream is being admitted (Redis
        paused) leaves nothing behind: no connection, no session, no
        subscription; and one that leaves an open stream the same.
        """
        self.authorize("s1")
        hub = self.proxy.proxy.hub
        self.r.execute_command("CLIENT", "PAUSE", "300")
        s = await self.stream()
        await wait_for(lambda: len(self.proxy.proxy.connections) == 1)
        s.close()
        await wait_for(lambda: not self.proxy.proxy.connections, timeout=3)
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(hub.holds(b"session:s1:down"))
        self.assertEqual(self.proxy.proxy.stats.open_connections, 0)
        opened = await self.opened()
        self.assertTrue(hub.holds(b"session:s1:down"))
        opened.transport.loseConnection()
        await wait_for(lambda: not hub.holds(b"session:s1:down"), timeout=3)
        self.assertEqual(self.proxy.proxy.sessions, {})
        self.assertEqual(self.proxy.proxy.stats.sse_connections_open, 0)


class SlowConsumerTests(SseTestCase):
    settings: dict[str, Any] = {"max_send_buffer": 200_000}

    async def test_slow_consumer_dropped(self) -> None:
        """
        A stream whose client stops reading is dropped once more than
        WS_MAX_SEND_BUFFER_BYTES wait for it; another stream of the session
        keeps receiving.
        """
        self.authorize("s1")
        good = await self.opened()
        stalled = socket.create_connection(("127.0.0.1", self.proxy.port))
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(sse_request("/a/sse/s1?access_token=tok"))
        await wait_for(lambda: self.proxy.proxy.stats.sse_connections_open == 2)
        payload = "x" * 20_000
        for i in range(5000):
            self.r.publish("session:s1:down", payload)
            await task.deferLater(reactor, 0.002, lambda: None)
            if self.proxy.proxy.stats.slow_consumer_closes:
                break
        self.assertEqual(self.proxy.proxy.stats.slow_consumer_closes, 1)
        await wait_for(lambda: self.proxy.proxy.stats.sse_connections_open == 1)
        self.assertFalse(good.ended)
        self.r.publish("session:s1:down", "after")
        await wait_for(lambda: good.events and good.events[-1].data == "after", timeout=10)


class ShutdownTests(RedisTestCase):
    timeout = 30

    async def test_sigterm_closes_with_1001(self) -> None:
        """
        Shutdown: an open stream gets a close event 1001 and its response
        ends, within the grace period.
        """
        proxy = start_proxy(self, self.redis.url)
        await proxy.ready()
        self.r.set("session:s1:auth", "tok", ex=60)
        s = await open_stream(proxy.port, "/a/sse/s1?access_token=tok", test=self)
        await wait_for(lambda: s.retry is not None)
        started = time.monotonic()
        await proxy.stop()
        await wait_for(lambda: s.ended)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual([e.json() for e in s.named("close")],
                         [{"code": 1001, "reason": "server shutting down"}])


class ResumeTests(RedisTestCase):
    timeout = 60

    async def ready(self, proxy: RunningProxy) -> None:
        await proxy.ready()
        await wait_for(lambda: b"wsproxy" in str(self.r.function_list()).encode())

    async def test_resume_across_restart(self) -> None:
        """
        A resuming stream (?resume=) gets the recovery event, then each
        message enveloped (its position first) with an id; after a proxy
        restart, Last-Event-ID (as EventSource sends it) resumes after the
        last event received: the messages published meanwhile, exactly.
        """
        proxy = start_proxy(self, self.redis.url, resume=True)
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        s = await open_stream(proxy.port, "/a/sse/s1?access_token=tok&resume=", test=self)
        await wait_for(lambda: s.named("recovery"))
        self.assertEqual(s.named("recovery")[0].json()["recovered"], True)
        positions = [publish(self.r, "s1", "one"), publish(self.r, "s1", "two\nlines"),
                     publish(self.r, "s1", b"\xffbin", "binary")]
        self.r.publish("session:s1:down", "plain")
        await wait_for(lambda: len(s.messages()) == 4)
        got = s.messages()
        self.assertEqual([e.data for e in got[:2]],
                         [f"{positions[0]}\none", f"{positions[1]}\ntwo\nlines"])
        # (a message without a position leaves the id as it was)
        self.assertEqual([e.id for e in got], [*positions, None])
        self.assertEqual(s.last_id, positions[2])
        self.assertEqual((got[2].event, got[2].payload()), ("binary", b"\xffbin"))
        self.assertEqual(got[2].data.split("\n")[0], positions[2])
        self.assertEqual(got[3].data, "\nplain")
        await proxy.stop()
        await wait_for(lambda: s.ended)
        later = [publish(self.r, "s1", m) for m in ("three", "four")]
        proxy = start_proxy(self, self.redis.url, resume=True)
        await self.ready(proxy)
        again = await open_stream(proxy.port, "/a/sse/s1?access_token=tok",
                                  {"Last-Event-ID": s.last_id or ""}, test=self)
        await wait_for(lambda: len(again.messages()) == 2)
        self.assertEqual([e.data for e in again.messages()],
                         [f"{later[0]}\nthree", f"{later[1]}\nfour"])
        self.assertEqual(again.named("recovery")[0].json()["recovered"], True)
        # ?last_event_id= as well
        third = await open_stream(
            proxy.port, f"/a/sse/s1?access_token=tok&last_event_id={later[0]}", test=self)
        await wait_for(lambda: len(third.messages()) == 1)
        self.assertEqual(third.messages()[0].data, f"{later[1]}\nfour")


class LimitTests(SseTestCase):
    async def restart(self, **settings: Any) -> None:
        await self.proxy.stop()
        await self.start(**{"allowed_origins": (ORIGIN,), **settings})

    async def refused(self, **kwargs: Any) -> EventStream:
        s = await self.stream(**kwargs)
        await wait_for(lambda: s.status is not None and s.body.endswith(b"\n"))
        return s

    async def test_auth_fail_limit(self) -> None:
        """
        Refused credentials count towards AUTH_FAIL_LIMIT as on WebSocket:
        past it, 429 with Retry-After, before any token is looked at.
        """
        await self.restart(auth_fail_limit=2)
        self.authorize("s1")
        for _ in range(2):
            s = await self.refused(query="?access_token=wrong")
            self.assertEqual(s.status, 403)
        s = await self.refused()
        self.assertEqual((s.status, s.body), (429, b"Too many failed authorizations\n"))
        self.assertIsNotNone(s.header("retry-after"))

    async def test_require_origin(self) -> None:
        """
        REQUIRE_ORIGIN: a stream without Origin is refused 403.
        """
        await self.restart(require_origin=True)
        self.authorize("s1")
        s = await self.refused()
        self.assertEqual((s.status, s.body), (403, b"Origin required\n"))
        await self.opened(headers={"Origin": ORIGIN})


class ExpiryTests(RedisTestCase):
    timeout = 30

    async def test_token_expiry_closes_3000(self) -> None:
        """
        JWT_EXPIRE_CONNECTIONS: at the token's exp the stream gets a close
        event 3000 "token expired" and ends.
        """
        from .support.jwts import SECRET, token

        proxy = start_proxy(self, self.redis.url, auth_mode=("jwt",), jwt_secret=SECRET,
                            jwt_expire_connections=True)
        await proxy.ready()
        jwt = token({"exp": int(time.time()) + 2})
        s = await open_stream(proxy.port, "/a/sse/s1", {"Authorization": f"Bearer {jwt}"},
                              test=self)
        self.assertEqual(s.status, 200, s.body)
        await wait_for(lambda: s.ended, timeout=10)
        self.assertEqual([e.json() for e in s.named("close")],
                         [{"code": 3000, "reason": "token expired"}])
        self.assertEqual(proxy.proxy.stats.outcomes["token_expired"], 1)


def topic_publish(r: Any, topic: str, message: str | bytes) -> str:
    """
    One recoverable topic message, as a backend sends it; its position.
    """
    position = r.fcall("wsproxy_publish", 2, f"topic:{topic}:history", f"topic:{topic}:meta",
                       message)
    return position.decode() if isinstance(position, bytes) else str(position)


class TopicTests(SseTestCase):
    settings: dict[str, Any] = {"topics": True, "resume": True}

    async def ready(self) -> None:
        await wait_for(lambda: b"wsproxy" in str(self.r.function_list()).encode())

    async def test_plain_and_labelled(self) -> None:
        """
        A stream is in its session's topics: a plain one gets a topic's
        messages as session messages come; with ?labels=1 each event's
        first data line says where it came from (#<topic>, or empty for
        the session); a WebSocket client in the same topic gets its own
        framing of the same message.
        """
        self.authorize("s1")
        self.authorize("s2")
        self.r.sadd("session:s1:topics", "news")
        self.r.sadd("session:s2:topics", "news")
        plain = await self.opened("s1")
        labelled = await self.opened("s2", query="?access_token=tok&labels=1")
        c = await self.client("s1")
        self.r.publish("topic:news:down", "hot\nnews")
        self.r.publish("topic:news:down", b"\xff\x00")
        self.r.publish("session:s2:down", "yours")
        await plain.wait_events(2)
        await labelled.wait_events(3)
        await c.wait_messages(2)
        self.assertEqual([(e.event, e.data) for e in plain.events],
                         [("message", "hot\nnews"), ("binary", "/wA=")])
        self.assertEqual([(e.event, e.data) for e in labelled.events],
                         [("message", "#news\nhot\nnews"), ("binary", "#news\n/wA="),
                          ("message", "\nyours")])
        self.assertEqual(labelled.events[1].payload(), b"\xff\x00")

    async def test_topic_joined_later(self) -> None:
        """
        A backend's subscribe (wsproxy:control) makes an open stream join a
        topic.
        """
        self.authorize("s1")
        s = await self.opened("s1", query="?access_token=tok&labels=1")
        self.r.publish("wsproxy:control", json.dumps({"subscribe": "s1", "topic": "late"}))
        await wait_for(lambda: "late" in (self.proxy.proxy.topics.feeds
                                          if self.proxy.proxy.topics else {}))
        self.r.publish("topic:late:down", "joined")
        await s.wait_events(1)
        self.assertEqual(s.events[0].data, "#late\njoined")

    async def test_resume_topics_with_last_event_id(self) -> None:
        """
        A resuming labelled stream: a recovery event per topic, each
        recoverable topic message as #<topic> <position>, and every id the
        whole cursor (session position, <topic>@<position>); reconnecting
        with the last id after a restart resumes the session and the
        topic: what was published meanwhile, once.
        """
        await self.ready()
        self.authorize("s1")
        self.r.sadd("session:s1:topics", "news")
        query = "?access_token=tok&labels=1&resume="
        s = await self.opened("s1", query=query)
        await wait_for(lambda: len(s.named("recovery")) == 2)
        self.assertEqual(sorted(e.json().get("topic", "") for e in s.named("recovery")),
                         ["", "news"])
        session_at = publish(self.r, "s1", "mine")
        news_at = topic_publish(self.r, "news", "first")
        await wait_for(lambda: len(s.messages()) == 2)
        self.assertEqual([e.data for e in s.messages()],
                         [f"{session_at}\nmine", f"#news {news_at}\nfirst"])
        self.assertEqual(s.messages()[1].id, f"{session_at} news@{news_at}")
        await self.proxy.stop()
        await wait_for(lambda: s.ended)
        later = topic_publish(self.r, "news", "missed")
        mine = publish(self.r, "s1", "mine too")
        await self.start(topics=True, resume=True)
        again = await self.opened("s1", query=query, headers={"Last-Event-ID": s.last_id or ""})
        await wait_for(lambda: len(again.messages()) == 2)
        self.assertEqual(sorted(e.data for e in again.messages()),
                         sorted([f"#news {later}\nmissed", f"{mine}\nmine too"]))
        self.assertEqual(again.last_id, f"{mine} news@{later}")


class MetricsTests(SseTestCase):
    async def test_metrics(self) -> None:
        """
        /metrics: the SSE gauge and counter; the open streams also count in
        wsproxy_connections_open.
        """
        self.authorize("s1")
        s = await self.opened()
        self.r.publish("session:s1:down", "one")
        await s.wait_events(1)
        status, body = await http_get(self.proxy.port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"\nwsproxy_sse_connections_open 1.0\n", body)
        self.assertIn(b"\nwsproxy_sse_messages_down_total 1.0\n", body)
        self.assertIn(b"\nwsproxy_connections_open 1.0\n", body)


class DaemonShutdownTests(EnvTestCase):
    timeout = 60

    async def test_sigterm(self) -> None:
        """
        The daemon at SIGTERM: an open stream gets its close event 1001
        and ends at once (not at the grace period's end); the process exits 0.
        """
        await self.start(SHUTDOWN_GRACE_PERIOD_SECS="5", SHUTDOWN_DRAIN_SECS="0")
        self.r.set("session:s1:auth", "tok", ex=60)
        s = await open_stream(self.port, "/a/sse/s1?access_token=tok", test=self)
        await wait_for(lambda: s.retry is not None)
        signalled = time.monotonic()
        self.daemon.signal(signal.SIGTERM)
        await wait_for(lambda: s.ended, timeout=5)
        self.assertLess(time.monotonic() - signalled, 3)
        self.assertEqual([e.json() for e in s.named("close")],
                         [{"code": 1001, "reason": "server shutting down"}])
        self.assertTrue(s.complete)
        self.assertEqual(await self.daemon.out.ended, 0)
