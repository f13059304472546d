"""
The Python client (clients/python, C{wsproxy_client}) against the real
daemon and a real redis-server: messages both ways, resume across a daemon
restart, acknowledged messages across a restart, labelled topics (and their
positions across a restart), and a fresh token from C{get_token} after a
close 3000.

The client runs in asyncio, on an event loop in a thread of its own
(L{AsyncioThread}); the test drives the daemon and Redis from trial's
reactor and waits for what the client saw (plain lists, appended to by the
loop's thread) with L{wait_for} and generous deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
from collections.abc import Coroutine
from typing import Any, Optional, TypeVar

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from wsproxy.backend import Backend, sign_token
from wsproxy_client import Message, Recovery, State, StateChange, WsProxyClient

from .support import wait_for
from .support.daemon import EnvTestCase

T = TypeVar("T")
SECRET = "python-client-secret-of-at-least-32-bytes"


class AsyncioThread:
    """
    An asyncio event loop running in a daemon thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> defer.Deferred[T]:
        """
        Run C{coro} on the loop; a Deferred (fired in the reactor's thread)
        with its result.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        d: defer.Deferred[T] = defer.Deferred()

        def done(f: concurrent.futures.Future[T]) -> None:
            def fire() -> None:
                error = f.exception()
                if error is not None:
                    d.errback(error)
                else:
                    d.callback(f.result())
            reactor.callFromThread(fire)

        future.add_done_callback(done)
        return d

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Seen:
    """
    What a client reported, appended to from the loop's thread.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.states: list[StateChange] = []
        self.recoveries: list[Recovery] = []
        self.acked: list[str] = []

    def texts(self, topic: Optional[str] = None) -> list[str]:
        return [m.data for m in list(self.messages)
                if isinstance(m.data, str) and m.topic == topic]

    def opens(self) -> int:
        return sum(1 for s in list(self.states) if s.state is State.OPEN)


class PythonClientTestCase(EnvTestCase):
    timeout = 120

    def setUp(self) -> Any:
        result = super().setUp()
        self.aio = AsyncioThread()
        self.addCleanup(self.aio.stop)
        return result

    def make(self, session: str = "s1", token: Optional[str] = "tok",
             **options: Any) -> tuple[WsProxyClient, Seen]:
        """
        A client of C{session} (its token stored first, unless a callback
        gives credentials), recording what it reports; started by
        L{connect}, closed at clean-up.
        """
        seen = Seen()
        if token is not None and "get_token" not in options:
            self.r.set(f"session:{session}:auth", token, ex=300)
            options["token"] = token
        options.setdefault("backoff", 0.1)
        options.setdefault("max_backoff", 1.0)
        options.setdefault("max_failures", 1000)  # outlasts any restart here
        client = WsProxyClient(f"ws://{self.host}:{self.port}", session, agent="a",
                               on_state=seen.states.append,
                               on_recovery=seen.recoveries.append,
                               on_ack=lambda a: seen.acked.append(a.id), **options)
        return client, seen

    async def connect(self, client: WsProxyClient, seen: Seen) -> None:
        """
        Open C{client} and collect its messages until clean-up closes it.
        """
        async def run() -> None:
            await client.connect()

            async def collect() -> None:
                async for message in client:
                    seen.messages.append(message)

            asyncio.get_running_loop().create_task(collect())

        await self.aio.run(run())
        self.addCleanup(lambda: self.aio.run(client.close()))

    async def restart(self, **env: str) -> None:
        """
        SIGTERM the daemon (its clients see 1001), wait for its end, start
        another on the same port with C{env}.
        """
        old = self.daemon
        old.signal(signal.SIGTERM)
        await wait_for(lambda: old.out.ended.called, timeout=30)
        await self.start(PORT=str(self.port), **env)

    async def functions_loaded(self) -> None:
        await wait_for(lambda: b"wsproxy" in str(self.r.function_list()).encode(), timeout=30)


class MessagesTests(PythonClientTestCase):
    async def test_both_ways(self) -> None:
        """
        A message published to the session arrives (text as str, binary as
        bytes); what the client sends is published on C{:up}.
        """
        await self.start()
        client, seen = self.make(token_in="query")
        up = self.r.pubsub()
        up.subscribe("session:s1:up")
        self.addCleanup(up.close)
        await self.connect(client, seen)
        self.assertEqual(client.state, State.OPEN)
        self.assertNotIn("tok", client.socket_url.replace("access_token=tok", ""))
        self.r.publish("session:s1:down", "hello")
        self.r.publish("session:s1:down", b"\x00\xff")
        await wait_for(lambda: len(seen.messages) == 2, timeout=30)
        self.assertEqual([(m.data, m.binary, m.topic) for m in seen.messages],
                         [("hello", False, None), (b"\x00\xff", True, None)])
        await self.aio.run(client.send("from the client"))
        await self.aio.run(client.send(b"\x01\x02"))
        got: list[bytes] = []

        def read() -> bool:
            message = up.get_message(timeout=0)
            if message and message["type"] == "message":
                got.append(message["data"])
            return len(got) == 2

        await wait_for(read, timeout=30)
        self.assertEqual(got, [b"from the client", b"\x01\x02"])

    async def test_every_token_form(self) -> None:
        """
        The token as a header (the default), a subprotocol (the server
        answers "bearer") and a query parameter all admit; a wrong token is
        refused, and with reconnect=False the client fails at once with the
        HTTP status.
        """
        await self.start()
        for token_in in ("header", "subprotocol", "query"):
            client, seen = self.make(token_in=token_in)
            await self.connect(client, seen)
            self.assertEqual(client.state, State.OPEN, token_in)
            if token_in == "subprotocol":
                self.assertEqual(client.protocol, "bearer")
            await self.aio.run(client.close())
            self.assertEqual(client.state, State.CLOSED)
            self.assertEqual(client.close_code, 1000)
        wrong = WsProxyClient(f"ws://{self.host}:{self.port}", "s1", agent="a", token="wrong",
                              reconnect=False)
        from wsproxy_client import ConnectionFailed
        error = await self.assertFailure(self.aio.run(wrong.connect()), ConnectionFailed)
        self.assertEqual((error.status, error.status_reason), (403, "Invalid or expired token"))
        self.assertEqual(wrong.state, State.FAILED)

    async def test_shutdown_reconnects(self) -> None:
        """
        A 1001 (the daemon shut down) is followed by reconnection to the
        next daemon; a 1000 from the server (a backend's close request)
        ends the client.
        """
        await self.start()
        client, seen = self.make()
        await self.connect(client, seen)
        await self.restart()
        await wait_for(lambda: seen.opens() == 2, timeout=60)
        self.assertIn(1001, [s.code for s in seen.states if s.state is State.RECONNECTING])
        self.assertEqual(client.reconnects, 1)
        await wait_for(lambda: self.r.pubsub_numsub("session:s1:down")[0][1] == 1, timeout=30)
        self.r.publish("session:s1:down", "after the restart")
        await wait_for(lambda: seen.texts() == ["after the restart"], timeout=30)
        Backend(self.r).close("s1", 1000, "done")
        await wait_for(lambda: client.state is State.CLOSED, timeout=30)
        self.assertEqual((client.close_code, client.close_reason), (1000, "done"))


class ResumeTests(PythonClientTestCase):
    async def test_numbered_stream_across_restart(self) -> None:
        """
        RESUME=true: the backend publishes 1..150 recoverable messages, one
        every 10 ms, and the daemon is restarted in the middle: the client
        gets every number once, in order; its first recovery report says
        nothing was lost, and so does the one after the restart.
        """
        await self.start(RESUME="true")
        await self.functions_loaded()
        client, seen = self.make(resume=True)
        await self.connect(client, seen)
        await wait_for(lambda: len(seen.recoveries) == 1, timeout=30)
        count = 150
        published = 0

        def publish() -> None:
            nonlocal published
            published += 1
            self.r.fcall("wsproxy_publish", 2, "session:s1:history", "session:s1:meta",
                         str(published), "t")
            if published == count:
                loop.stop()

        loop = task.LoopingCall(publish)
        done = loop.start(0.01)
        await wait_for(lambda: published >= 40, timeout=30)
        await self.restart(RESUME="true")
        await done
        await wait_for(lambda: len(seen.messages) >= count, timeout=60)
        self.assertEqual(seen.texts(), [str(n) for n in range(1, count + 1)])
        self.assertTrue(client.position.endswith(f"-{count}"), client.position)
        self.assertGreaterEqual(seen.opens(), 2)
        self.assertTrue(all(r.recovered for r in seen.recoveries), seen.recoveries)
        self.assertGreaterEqual(len(seen.recoveries), 2)


class AckTests(PythonClientTestCase):
    async def test_acked_across_restart(self) -> None:
        """
        UPSTREAM=stream: 100 messages sent with ack=True, one every 10 ms,
        the daemon restarted in the middle: every one is acknowledged, and
        the partition streams hold each id (once, after dropping the copies
        by id as the durable-upstream recipe does), in the order sent.
        """
        await self.start(UPSTREAM="stream")
        client, seen = self.make(ack=True)
        await self.connect(client, seen)
        count = 100
        sent: list[str] = []

        async def send_all() -> None:
            for n in range(count):
                sent.append(await client.send(f"m{n}") or "")
                await asyncio.sleep(0.01)

        sending = self.aio.run(send_all())
        await wait_for(lambda: len(seen.acked) >= 30, timeout=30)
        await self.restart(UPSTREAM="stream")
        await sending
        await self.aio.run(client.flush(90))
        self.assertEqual(client.unacked, [])
        self.assertEqual(sorted(set(seen.acked)), sorted(sent))
        first: dict[str, str] = {}
        for key in self.r.scan_iter("wsproxy:up:*"):
            for _, fields in self.r.xrange(key):
                if fields[b"session"] == b"s1":
                    first.setdefault(fields[b"id"].decode(), fields[b"data"].decode())
        self.assertEqual(sorted(first), sorted(sent))
        self.assertEqual([first[i] for i in sent], [f"m{n}" for n in range(count)])
        self.assertGreaterEqual(seen.opens(), 2)


class TopicTests(PythonClientTestCase):
    async def test_labels(self) -> None:
        """
        TOPICS=true with labels=True: a message on topic T arrives with
        topic "T", the session's own with topic None.
        """
        await self.start(TOPICS="true")
        self.r.sadd("session:s1:topics", "T")
        client, seen = self.make(labels=True)
        await self.connect(client, seen)
        await wait_for(lambda: self.r.pubsub_numsub("topic:T:down")[0][1] == 1, timeout=30)
        self.r.publish("topic:T:down", "on T")
        self.r.publish("session:s1:down", "to the session")
        await wait_for(lambda: len(seen.messages) == 2, timeout=30)
        self.assertEqual([(m.data, m.topic, m.position) for m in seen.messages],
                         [("on T", "T", None), ("to the session", None, None)])

    async def test_topic_positions_across_restart(self) -> None:
        """
        TOPICS=true and RESUME=true, labels and resume: recoverable topic
        messages carry their position, the client keeps it per topic, and
        what the topic got while the daemon was down is replayed once
        (resume_topic=T@position), with a recovery report for T.
        """
        await self.start(TOPICS="true", RESUME="true")
        await self.functions_loaded()
        self.r.sadd("session:s1:topics", "T")
        backend = Backend(self.r)
        client, seen = self.make(labels=True, resume=True)
        await self.connect(client, seen)
        await wait_for(lambda: any(r.topic == "T" for r in seen.recoveries), timeout=30)
        for n in range(1, 4):
            backend.publish_topic_recoverable("T", f"t{n}")
        await wait_for(lambda: len(seen.texts("T")) == 3, timeout=30)
        self.assertTrue(client.topic_positions["T"].endswith("-3"), client.topic_positions)
        old = self.daemon
        old.signal(signal.SIGTERM)
        await wait_for(lambda: old.out.ended.called, timeout=30)
        for n in range(4, 7):
            backend.publish_topic_recoverable("T", f"t{n}")
        await self.start(PORT=str(self.port), TOPICS="true", RESUME="true")
        await wait_for(lambda: len(seen.texts("T")) >= 6, timeout=60)
        self.assertEqual(seen.texts("T"), [f"t{n}" for n in range(1, 7)])
        replays = [r for r in seen.recoveries if r.topic == "T" and r.replayed]
        self.assertEqual([(r.recovered, r.replayed) for r in replays], [(True, 3)])
        self.assertTrue(all(m.position for m in seen.messages if m.topic == "T"))


class TokenTests(PythonClientTestCase):
    async def test_fresh_token_on_expiry(self) -> None:
        """
        AUTH_MODE=jwt, JWT_EXPIRE_CONNECTIONS=true: the first token expires
        within seconds, the connection is closed with 3000, and the client
        asks get_token again (told the code) and reconnects at once with
        the new token, which keeps working.
        """
        await self.start(AUTH_MODE="jwt", JWT_SECRET=SECRET, JWT_EXPIRE_CONNECTIONS="true")
        calls: list[tuple[int, Optional[int]]] = []

        async def get_token(attempt: int, code: Optional[int]) -> str:
            calls.append((attempt, code))
            if len(calls) == 1:
                return sign_token(SECRET, "s1", expires_in=3)
            return sign_token(SECRET, "s1", expires_in=600)

        client, seen = self.make(token=None, get_token=get_token, token_in="subprotocol")
        await self.connect(client, seen)
        await wait_for(lambda: seen.opens() == 2, timeout=60)
        [expired] = [s for s in seen.states if s.state is State.RECONNECTING]
        self.assertEqual((expired.code, expired.reason, expired.expired, expired.delay),
                         (3000, "token expired", True, 0.0))
        self.assertEqual(calls, [(1, None), (2, 3000)])
        await wait_for(lambda: self.r.pubsub_numsub("session:s1:down")[0][1] == 1, timeout=30)
        self.r.publish("session:s1:down", "still here")
        await wait_for(lambda: seen.texts() == ["still here"], timeout=30)
        # nothing of the tokens in what the client shows
        self.assertNotIn("eyJ", client.socket_url + repr(seen.states))


class ScriptedServerTests(TestCase):
    """
    The client's bookkeeping against a scripted WebSocket server (websockets'
    own, in the client's loop): no daemon, no Redis.
    """

    timeout = 60

    def setUp(self) -> None:
        self.aio = AsyncioThread()
        self.addCleanup(self.aio.stop)

    async def test_nack_duplicates_and_resume_query(self) -> None:
        """
        A nacked message is sent again (same id) nack_retry later and
        leaves unacked at its ack; a recoverable message repeated (session
        or topic, same epoch) is dropped; positions follow what was
        delivered, per topic; the reconnect after a 1001 asks for both
        (resume=, resume_topic=) with ack=1 and labels=1.
        """
        from websockets.asyncio.server import ServerConnection, serve

        paths: list[str] = []
        received: list[str] = []

        async def handler(ws: ServerConnection) -> None:
            assert ws.request is not None
            paths.append(ws.request.path)
            if len(paths) > 1:
                await ws.wait_closed()
                return
            await ws.send('!{"type":"recovery","recovered":true,"replayed":0,'
                          '"position":"a:1-0","reason":""}')
            for frame in ("a:1-1\none", "a:1-1\none again", "a:1-2\ntwo", "#T a:5-1\nt1",
                          "#T a:5-1\nt1 again", "#T\nplain t", "\nplain s"):
                await ws.send(frame)
            async for frame in ws:
                assert isinstance(frame, str)
                received.append(frame)
                id = frame.split("\n", 1)[0]
                kind = "nack" if received.count(frame) == 1 else "ack"
                await ws.send("!" + json.dumps({"type": kind, "id": id, "position": "1-0",
                                                "reason": "redis timeout"}))
                if kind == "ack":
                    await ws.close(1001, "server shutting down")

        seen = Seen()
        nacks: list[str] = []

        async def scenario() -> WsProxyClient:
            server = await serve(handler, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            client = WsProxyClient(f"ws://127.0.0.1:{port}", "s", token="t", resume=True,
                                   ack=True, labels=True, nack_retry=0.2, backoff=0.05,
                                   on_state=seen.states.append,
                                   on_ack=lambda a: seen.acked.append(a.id),
                                   on_nack=lambda n: nacks.append(n.id))
            await client.connect()
            id = await client.send("hello", id="m-1")
            assert id == "m-1" and client.unacked == ["m-1"]
            await client.flush(30)
            for _ in range(5):
                seen.messages.append(await client.receive())
            while len(paths) < 2:
                await asyncio.sleep(0.01)
            await client.close()
            server.close()
            await server.wait_closed()
            return client

        client = await self.aio.run(scenario())
        self.assertEqual(received, ["m-1\nhello", "m-1\nhello"])
        self.assertEqual((nacks, seen.acked, client.unacked), (["m-1"], ["m-1"], []))
        self.assertEqual([(m.data, m.topic, m.position) for m in seen.messages],
                         [("one", None, "a:1-1"), ("two", None, "a:1-2"), ("t1", "T", "a:5-1"),
                          ("plain t", "T", None), ("plain s", None, None)])
        self.assertEqual((client.position, client.topic_positions), ("a:1-2", {"T": "a:5-1"}))
        self.assertEqual(paths[1], "/app/ws/s?resume=a%3A1-2&labels=1"
                                   "&resume_topic=T%40a%3A5-1&ack=1")
        self.assertIn(1001, [s.code for s in seen.states if s.state is State.RECONNECTING])
        self.assertEqual(client.state, State.CLOSED)
