"""
Resumable sessions against a real redis-server and real WebSocket clients:
the proxy runs with RESUME=true, backends publish with the wsproxy_publish
function, clients reconnect with the last position they received.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

import redis as redispy
from .support import (
    ROOT,
    RedisTestCase,
    RunningProxy,
    connect,
    raw_exchange,
    start_proxy,
    status_of,
    upgrade_request,
    wait_for,
)
from .support.clients import Received


def publish(r: redispy.Redis, session: str, message: bytes | str, kind: str = "auto") -> str:
    """
    One recoverable message, as a backend sends it; its position.
    """
    position = r.fcall(
        "wsproxy_publish", 2, f"session:{session}:history", f"session:{session}:meta",
        message, kind,
    )
    return position.decode() if isinstance(position, bytes) else str(position)


class ResumeTestCase(RedisTestCase):
    timeout = 60

    def start_proxy(self, redis_url: Optional[str] = None, **settings: Any) -> RunningProxy:
        values: dict[str, Any] = {"resume": True}
        values.update(settings)
        return start_proxy(self, redis_url or self.redis.url, **values)

    async def ready(self, proxy: RunningProxy, r: Optional[redispy.Redis] = None) -> None:
        await proxy.ready()
        r = r or self.r
        await wait_for(lambda: b"wsproxy" in str(r.function_list()).encode())

    async def client(self, proxy: RunningProxy, session: str, position: str = "") -> Any:
        c = await connect(proxy.url(session, query=f"?resume={position}"), token="tok")
        self.addCleanup(c.close_and_wait)
        return c


class ResumeTests(ResumeTestCase):
    async def test_resume_after_client_drop(self) -> None:
        """
        A client that drops mid-stream and comes back with the last position
        it received gets every message after it exactly once, in order,
        with its frame type (text, binary, auto), then live messages.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        c = await self.client(proxy, "s1")
        got = Received(c)
        await wait_for(lambda: got.controls())
        self.assertEqual(got.controls()[0]["recovered"], True)
        sent: list[tuple[bytes, bool]] = []
        for i in range(20):
            if i % 3 == 0:
                message, kind, binary = b"\x00\xff%d" % i, "binary", True
            elif i % 3 == 1:
                message, kind, binary = ("t%d é" % i).encode(), "text", False
            else:
                message, kind, binary = b"a%d" % i, "auto", False
            publish(self.r, "s1", message, kind)
            sent.append((message, binary))
        await wait_for(lambda: len(got.data()) == 20)
        # the client drops after 12 of them (it saw only those)
        seen = got.data()[:12]
        c.transport.abortConnection()
        await c.factory.closed
        for i in range(20, 30):
            publish(self.r, "s1", b"late%d" % i, "text")
            sent.append((b"late%d" % i, False))
        c2 = await self.client(proxy, "s1", seen[-1][0])
        got2 = Received(c2)
        await wait_for(lambda: len(got2.data()) == 18)
        control = got2.controls()[0]
        self.assertEqual((control["recovered"], control["replayed"]), (True, 18))
        self.assertEqual([(m, b) for _, m, b in seen + got2.data()], sent)
        seqs = [int(p.rsplit("-", 1)[1]) for p, _, _ in seen + got2.data()]
        self.assertEqual(seqs, list(range(1, 31)))
        publish(self.r, "s1", b"live", "text")
        await wait_for(lambda: len(got2.data()) == 19)
        self.assertEqual(got2.messages()[-1], b"live")

    async def test_client_that_saw_nothing_before_any_history(self) -> None:
        """
        A client connects before the session has any history (its
        position: 0:0-0, "before the first message"), drops before the
        first message, and resumes from that position: it gets every
        message from the first, recovered.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        c = await self.client(proxy, "s1")
        got = Received(c)
        await wait_for(lambda: got.controls())
        self.assertEqual(got.controls()[0]["position"], "0:0-0")
        c.transport.abortConnection()
        await c.factory.closed
        for i in range(3):
            publish(self.r, "s1", f"m{i}")
        c2 = await self.client(proxy, "s1", got.last_position())
        got2 = Received(c2)
        await wait_for(lambda: len(got2.data()) == 3)
        self.assertEqual(got2.messages(), [b"m0", b"m1", b"m2"])
        self.assertEqual(got2.controls()[0]["recovered"], True)

    async def test_plain_messages_reach_resuming_clients_without_position(self) -> None:
        """
        A plain PUBLISH on :down still reaches a resuming client, with an
        empty position (it is not recoverable); plain clients see no
        recoverable messages and no wire format change.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        resuming = await self.client(proxy, "s1")
        plain = await connect(proxy.url("s1"), token="tok")
        self.addCleanup(plain.close_and_wait)
        got = Received(resuming)
        await wait_for(lambda: got.controls())
        self.r.publish("session:s1:down", "plain")
        publish(self.r, "s1", "recoverable")
        await wait_for(lambda: len(got.data()) == 2 and len(plain.messages) == 1)
        self.assertEqual(got.data()[0], ("", b"plain", False))
        self.assertEqual(got.data()[1][1], b"recoverable")
        self.assertEqual(plain.messages, [(b"plain", False)])

    async def test_resume_across_proxy_processes(self) -> None:
        """
        The client's instance goes away (a deploy); messages published
        meanwhile are delivered by another instance it reconnects to.
        """
        first = self.start_proxy()
        second = self.start_proxy()
        await self.ready(first)
        await self.ready(second)
        self.r.set("session:s1:auth", "tok", ex=300)
        c = await self.client(first, "s1")
        got = Received(c)
        await wait_for(lambda: got.controls())
        for i in range(5):
            publish(self.r, "s1", f"m{i}")
        await wait_for(lambda: len(got.data()) == 5)
        await first.stop()
        await c.factory.closed
        for i in range(5, 9):
            publish(self.r, "s1", f"m{i}")
        c2 = await self.client(second, "s1", got.last_position())
        got2 = Received(c2)
        await wait_for(lambda: len(got2.data()) == 4)
        self.assertEqual(got.messages() + got2.messages(), [b"m%d" % i for i in range(9)])
        self.assertTrue(got2.controls()[0]["recovered"])

    async def test_older_than_retention_is_incomplete(self) -> None:
        """
        A position older than what the history still holds: the client is
        told recovery was incomplete (nothing replayed), then gets live
        messages.
        """
        proxy = self.start_proxy(history_max_length=10)
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        first = publish(self.r, "s1", "first")
        for i in range(600):
            publish(self.r, "s1", f"m{i}")
        self.assertLess(self.r.xlen("session:s1:history"), 300)
        c = await self.client(proxy, "s1", first)
        got = Received(c)
        await wait_for(lambda: got.controls())
        control = got.controls()[0]
        self.assertEqual((control["recovered"], control["replayed"]), (False, 0))
        self.assertIn("no longer retained", control["reason"])
        self.assertTrue(control["position"].endswith("-601"))
        self.assertEqual(got.data(), [])
        publish(self.r, "s1", "after")
        await wait_for(lambda: got.messages() == [b"after"])
        self.assertIn(b"wsproxy_resume_incomplete_total 1.0", proxy.proxy.stats.render())

    async def test_history_longer_than_the_maximum_is_read_whole(self) -> None:
        """
        Approximate trimming keeps more than HISTORY_MAX_LENGTH entries;
        a client behind by more than that maximum but within what is kept
        gets all of it (the history is read in chunks), and live messages
        after it without a false "incomplete".
        """
        proxy = self.start_proxy(history_max_length=10)
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        positions = [publish(self.r, "s1", f"m{i}") for i in range(50)]
        self.assertEqual(self.r.xlen("session:s1:history"), 50)
        c = await self.client(proxy, "s1", positions[4])
        got = Received(c)
        await wait_for(lambda: len(got.data()) == 45)
        self.assertEqual(got.controls()[0]["recovered"], True)
        publish(self.r, "s1", "live")
        await wait_for(lambda: len(got.data()) == 46)
        self.assertEqual(got.messages(), [b"m%d" % i for i in range(5, 50)] + [b"live"])
        self.assertEqual(len(got.controls()), 1)

    async def test_position_from_another_epoch_is_incomplete(self) -> None:
        """
        The history was lost and started over (new epoch): a position from
        the old one is answered "incomplete", never taken for an offset in
        the new one.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        for i in range(3):
            old = publish(self.r, "s1", f"old{i}")
        self.r.delete("session:s1:history", "session:s1:meta")
        for i in range(5):
            publish(self.r, "s1", f"new{i}")
        c = await self.client(proxy, "s1", old)
        got = Received(c)
        await wait_for(lambda: got.controls())
        control = got.controls()[0]
        self.assertEqual(control["recovered"], False)
        self.assertIn("epoch", control["reason"])
        self.assertEqual(got.data(), [])

    async def test_invalid_positions_refused(self) -> None:
        """
        A malformed or hostile position is refused with 400 before Redis is
        asked; a well-formed one for a session with no history is answered
        "incomplete", never an error.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        for bad in ("x", "abc:1", "abc:1-", "ABC:1-2", "abc:-1-2", "abc:1-2%0d%0a",
                    "abc:1-2:3", "g:1-2", "abc:99999999999999999999-1", "a" * 40 + ":1-1",
                    "session:s2:1-1", "*"):
            response = await raw_exchange(proxy.port, upgrade_request(
                f"/a/ws/s1?resume={bad}", {"Authorization": "Bearer tok"}))
            self.assertEqual(status_of(response), 400, bad)
            self.assertTrue(response.endswith(b"Invalid resume position\n"), response)
        c = await self.client(proxy, "s1", "abc:1-5")
        got = Received(c)
        await wait_for(lambda: got.controls())
        self.assertEqual(got.controls()[0]["recovered"], False)

    async def test_not_enabled_refused(self) -> None:
        """
        Without RESUME=true, a client asking for a resumable session gets
        400 (it would misread plain frames otherwise).
        """
        proxy = self.start_proxy(resume=False)
        await proxy.ready()
        self.r.set("session:s1:auth", "tok", ex=300)
        response = await raw_exchange(proxy.port, upgrade_request(
            "/a/ws/s1?resume=", {"Authorization": "Bearer tok"}))
        self.assertEqual(status_of(response), 400)
        self.assertTrue(response.endswith(b"Resumable sessions are not enabled\n"))

    async def test_concurrent_publishers_one_order(self) -> None:
        """
        Two backends publishing at once: every client sees one order, the
        order of the sequence numbers, with no gap; a client that resumes
        from the start of it sees the same order from the history.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        a = await self.client(proxy, "s1")
        b = await self.client(proxy, "s1")
        got_a, got_b = Received(a), Received(b)
        await wait_for(lambda: got_a.controls() and got_b.controls())
        other = self.redis.client()
        self.addCleanup(other.close)
        pipe_a, pipe_b = self.r.pipeline(transaction=False), other.pipeline(transaction=False)
        for i in range(200):
            pipe_a.fcall("wsproxy_publish", 2, "session:s1:history", "session:s1:meta", f"a{i}")
            pipe_b.fcall("wsproxy_publish", 2, "session:s1:history", "session:s1:meta", f"b{i}")
        from threading import Thread

        threads = [Thread(target=pipe_a.execute), Thread(target=pipe_b.execute)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await wait_for(lambda: len(got_a.data()) == 400 and len(got_b.data()) == 400)
        self.assertEqual(got_a.data(), got_b.data())
        seqs = [int(p.rsplit("-", 1)[1]) for p, _, _ in got_a.data()]
        self.assertEqual(seqs, list(range(1, 401)))
        for name in "ab":
            mine = [m for m in got_a.messages() if m.startswith(name.encode())]
            self.assertEqual(mine, [f"{name}{i}".encode() for i in range(200)])
        first = got_a.data()[0][0]
        c = await self.client(proxy, "s1", first)
        got_c = Received(c)
        await wait_for(lambda: len(got_c.data()) == 399)
        self.assertEqual(got_c.data(), got_a.data()[1:])

    async def test_live_gap_filled_after_subscriber_rebuilt(self) -> None:
        """
        The shared subscriber connection is killed while a backend
        publishes: the messages published while it reconnected are missing
        live, and are filled from the history before anything newer.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        c = await self.client(proxy, "s1")
        got = Received(c)
        await wait_for(lambda: got.controls())
        publish(self.r, "s1", "before")
        await wait_for(lambda: len(got.data()) == 1)
        self.r.client_kill_filter(_type="pubsub")
        for i in range(10):
            publish(self.r, "s1", f"during{i}")
        await wait_for(lambda: proxy.proxy.hub.healthy and proxy.proxy.subscriber.reconnects >= 1)
        await wait_for(lambda: self.r.pubsub_numsub("session:s1:live")[0][1] >= 1)
        publish(self.r, "s1", "after")
        await wait_for(lambda: got.messages()[-1:] == [b"after"])
        self.assertEqual(
            got.messages(), [b"before"] + [b"during%d" % i for i in range(10)] + [b"after"]
        )
        self.assertEqual([c["recovered"] for c in got.controls()], [True])
        self.assertIn(b"wsproxy_resume_gaps_filled_total 1.0", proxy.proxy.stats.render())


class RedisRestartTests(ResumeTestCase):
    # a redis-server with append-only persistence, restartable in place
    redis_args = ("--appendonly", "yes", "--appendfsync", "always")

    async def test_resume_across_redis_restart(self) -> None:
        """
        Redis restarts (with append-only persistence): a client that lost
        its connection meanwhile resumes from its position with nothing
        lost or repeated, and the backend keeps publishing in the same
        history.
        """
        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        c = await self.client(proxy, "s1")
        got = Received(c)
        await wait_for(lambda: got.controls())
        for i in range(5):
            publish(self.r, "s1", f"m{i}")
        await wait_for(lambda: len(got.data()) == 5)
        c.transport.abortConnection()
        await c.factory.closed
        for i in range(5, 8):
            publish(self.r, "s1", f"m{i}")
        self.r.close()
        assert self.redis.process is not None
        self.redis.process.send_signal(signal.SIGTERM)
        self.redis.process.wait()
        self.redis.start()
        self.r = self.redis.client()
        self.addCleanup(self.r.close)
        await wait_for(lambda: proxy.proxy.commands.reconnects >= 1, timeout=15)
        await self.ready(proxy)
        for i in range(8, 10):
            publish(self.r, "s1", f"m{i}")
        c2 = await self.client(proxy, "s1", got.last_position())
        got2 = Received(c2)
        await wait_for(lambda: len(got2.data()) == 5)
        self.assertTrue(got2.controls()[0]["recovered"])
        self.assertEqual(got.messages() + got2.messages(), [b"m%d" % i for i in range(10)])



class BackendHelperTests(ResumeTestCase):
    async def test_backend_helper_end_to_end(self) -> None:
        """
        wsproxy.backend drives the whole contract against a real proxy:
        authorize, plain and recoverable publishes, reading :up, revoke.
        """
        from threading import Thread

        from wsproxy.backend import Backend

        proxy = self.start_proxy()
        await self.ready(proxy)
        backend = Backend(self.redis.client())
        token = backend.authorize("s1")
        c = await connect(proxy.url("s1", query="?resume="), token=token)
        self.addCleanup(c.close_and_wait)
        got = Received(c)
        await wait_for(lambda: got.controls())
        self.assertEqual(backend.publish("s1", "plain"), 1)
        position = backend.publish_recoverable("s1", b"\x00\x01", "binary")
        await wait_for(lambda: len(got.data()) == 2)
        self.assertEqual(got.data(), [("", b"plain", False), (position, b"\x00\x01", True)])
        up: list[tuple[str, bytes]] = []
        listener = Backend(self.redis.client())

        def listen() -> None:
            for item in listener.listen_up("s1", timeout=0.1):
                up.append(item)
                return

        thread = Thread(target=listen)
        thread.start()
        await wait_for(lambda: self.r.pubsub_numsub("session:s1:up")[0][1] >= 1)
        c.sendMessage(b"from client")
        await wait_for(lambda: not thread.is_alive())
        self.assertEqual(up, [("s1", b"from client")])
        backend.revoke("s1")
        self.assertEqual(self.r.exists("session:s1:auth"), 0)
        with self.assertRaises(ValueError):
            backend.publish("bad:id", "x")

    async def test_example_publisher_recoverable(self) -> None:
        """
        examples/redis_publisher.py --recoverable publishes through the
        function and prints the position the client then receives.
        """
        import subprocess
        import sys

        proxy = self.start_proxy()
        await self.ready(proxy)
        self.r.set("session:s1:auth", "tok", ex=300)
        c = await self.client(proxy, "s1")
        got = Received(c)
        await wait_for(lambda: got.controls())
        done = subprocess.run(
            [sys.executable, "examples/redis_publisher.py", "s1", "via example",
             "--recoverable", "--kind", "text", "--redis-url", self.redis.url],
            cwd=ROOT, capture_output=True, timeout=30, check=True,
        )
        await wait_for(lambda: got.data())
        self.assertEqual(got.data(), [(done.stdout.decode().strip(), b"via example", False)])
