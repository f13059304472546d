"""
The scripts in examples/,
run as a backend developer would run them: each with --help, and the README's
session by hand walked through with real processes: a redis-server, the
daemon, and the scripts, driven through their stdin and read from their
stdout and stderr. The scripts get the Redis address from C{REDIS_URL},
as they would from the developer's environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Optional

from twisted.internet import defer, protocol, reactor

from .support import ROOT, Daemon, RedisTestCase, daemon_env, start_daemon, wait_for

EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = ["auth_token_setter.py", "redis_subscriber.py", "ws_client.py", "redis_publisher.py",
           "echo_backend.py", "session_backend.py", "durable_worker.py", "jwt_token.py",
           "topic_publisher.py"]


class Script(protocol.ProcessProtocol):
    """
    One example script as a child process: its stdout and stderr, apart,
    and its stdin to write to.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.status: Optional[int] = None
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value.exitCode
        self.ended.callback(self.status)

    def type(self, line: str) -> None:
        self.transport.write(line.encode() + b"\n")

    def end_input(self) -> None:
        self.transport.closeStdin()

    async def stop(self) -> None:
        if self.status is None:
            self.transport.signalProcess("KILL")
            await self.ended


class ExampleTestCase(RedisTestCase):
    timeout = 60

    def script(self, name: str, *args: str) -> Script:
        """
        Start examples/C{name} with C{args}, with REDIS_URL pointing at this
        test's redis-server.
        """
        env = dict(os.environ, REDIS_URL=self.redis.url, PYTHONUNBUFFERED="1")
        script = Script()
        reactor.spawnProcess(script, sys.executable,
                             [sys.executable, os.path.join(EXAMPLES, name), *args], env=env)
        self.addCleanup(script.stop)
        return script

    def node_script(self, name: str, *args: str) -> Script:
        """
        Start examples/C{name} with Node (with C{--experimental-websocket}
        before Node 22, which has a global WebSocket without it).
        """
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("no node: bin/dev system-setup installs Debian's nodejs")
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
        major = int(version.strip().lstrip("v").split(".")[0])
        flags = ["--experimental-websocket"] if major < 22 else []
        script = Script()
        reactor.spawnProcess(script, node, [node, *flags, os.path.join(EXAMPLES, name), *args],
                             env=dict(os.environ))
        self.addCleanup(script.stop)
        return script

    async def finished(self, name: str, *args: str) -> Script:
        """
        Run examples/C{name} to its end.
        """
        script = self.script(name, *args)
        await wait_for(lambda: script.status is not None, timeout=20)
        return script

    async def proxy(self, **env: str) -> tuple[Daemon, int]:
        daemon = start_daemon(self, daemon_env(self.redis.url, SHUTDOWN_GRACE_PERIOD_SECS="5",
                                               **env))
        return daemon, await daemon.ready()


class HelpTests(ExampleTestCase):
    async def test_every_script_has_help(self) -> None:
        """
        Each script answers --help with exit status 0, a usage line and its
        docstring's example command lines kept as written.
        """
        self.assertEqual(
            sorted(SCRIPTS),
            sorted(f for f in os.listdir(EXAMPLES)
                   if f.endswith(".py") and not f.startswith("_")),
        )
        for name in SCRIPTS:
            script = await self.finished(name, "--help")
            self.assertEqual(script.status, 0, (name, script.err))
            text = script.out.decode()
            self.assertTrue(text.startswith(f"usage: {name} "), text)
            self.assertIn(f"\n    python examples/{name} ", text)


class SessionTests(ExampleTestCase):
    async def test_readme_session(self) -> None:
        """
        The README's session by hand: auth_token_setter authorizes "demo"
        with token s3cret; redis_subscriber listens to what the client
        sends; ws_client connects with the token; a message from
        redis_publisher is printed by the client, a line typed into the
        client is printed by the subscriber; Ctrl-D closes the client
        (1000). A wrong token is refused with the HTTP status.
        """
        daemon, port = await self.proxy()
        url = f"ws://127.0.0.1:{port}/app/ws/demo"

        setter = await self.finished("auth_token_setter.py", "demo", "--token", "s3cret")
        self.assertEqual((setter.status, setter.out), (0, b"s3cret\n"))
        self.assertEqual(self.r.get("session:demo:auth"), b"s3cret")
        self.assertGreater(self.r.ttl("session:demo:auth"), 250)

        subscriber = self.script("redis_subscriber.py", "demo")
        await wait_for(lambda: b"listening on session:demo:up\n" in subscriber.out)

        client = self.script("ws_client.py", url, "s3cret")
        await wait_for(lambda: b"connected" in client.err or client.status is not None)
        self.assertIsNone(client.status, client.err)

        publisher = await self.finished("redis_publisher.py", "demo", '{"hello":"client"}')
        self.assertEqual((publisher.status, publisher.out), (0, b"1\n"))
        await wait_for(lambda: b'< {"hello":"client"}\n' in client.out)
        publisher = await self.finished("redis_publisher.py", "demo", "--hex", "00ff10")
        await wait_for(lambda: b"< b'\\x00\\xff\\x10'\n" in client.out)

        client.type("hello")
        await wait_for(lambda: b"session:demo:up: hello\n" in subscriber.out)

        client.end_input()
        self.assertEqual(await client.ended, 0)
        self.assertIn(b"closed: code=1000", client.err)
        await wait_for(lambda: b"closed: session=demo" in daemon.out.output)

        wrong = await self.finished("ws_client.py", url, "wrong")
        self.assertEqual(wrong.status, 1)
        self.assertIn(b"refused: HTTP 403 Invalid or expired token", wrong.err)

    async def test_jwt_session(self) -> None:
        """
        With AUTH_MODE=jwt: jwt_token.py signs a token that ws_client
        connects with (nothing stored in Redis); a token signed with another
        secret is refused with its reason; --ticket issues a ticket that
        admits one connection.
        """
        secret = "example-secret-of-at-least-32-bytes"
        daemon, port = await self.proxy(AUTH_MODE="jwt", JWT_SECRET=secret)
        url = f"ws://127.0.0.1:{port}/app/ws/demo"
        signer = await self.finished("jwt_token.py", "demo", "--secret", secret,
                                     "--expires-in", "300", "--agent", "app")
        self.assertEqual(signer.status, 0, signer.err)
        token = signer.out.decode().strip()
        self.assertEqual(token.count("."), 2)
        self.assertEqual(self.r.keys("session:*"), [])
        client = self.script("ws_client.py", url, token)
        await wait_for(lambda: b"connected" in client.err or client.status is not None)
        self.assertIsNone(client.status, client.err)
        client.end_input()
        self.assertEqual(await client.ended, 0)
        other = await self.finished("jwt_token.py", "demo", "--secret", "x" * 40)
        wrong = await self.finished("ws_client.py", url, other.out.decode().strip())
        self.assertIn(b"refused: HTTP 403 Invalid token signature", wrong.err)
        issued = await self.finished("jwt_token.py", "demo", "--ticket")
        ticket = issued.out.decode().strip()
        self.assertEqual(self.r.exists(f"session:demo:ticket:{ticket}"), 1)


    async def test_topics(self) -> None:
        """
        With TOPICS=true: auth_token_setter --topic puts the session in
        topics (the set beside the token, with its TTL); ws_client --labels
        prints a message topic_publisher sends to one of them as
        "[#topic] message" and the session's own as "< message"; a topic
        the backend joins the session to while it is connected
        (Backend.join_topics) delivers at once; one it left does not.
        """
        from wsproxy.backend import Backend

        _, port = await self.proxy(TOPICS="true")
        setter = await self.finished("auth_token_setter.py", "demo", "--token", "s3cret",
                                     "--topic", "news", "--topic", "room-7")
        self.assertEqual((setter.status, setter.out), (0, b"s3cret\n"), setter.err)
        self.assertEqual(self.r.smembers("session:demo:topics"), {b"news", b"room-7"})
        self.assertGreater(self.r.ttl("session:demo:topics"), 250)
        client = self.script("ws_client.py", f"ws://127.0.0.1:{port}/app/ws/demo", "s3cret",
                             "--labels")
        await wait_for(lambda: b"connected" in client.err or client.status is not None)
        self.assertIsNone(client.status, client.err)

        publisher = await self.finished("topic_publisher.py", "news", "hello, news")
        self.assertEqual((publisher.status, publisher.out), (0, b"1\n"), publisher.err)
        await wait_for(lambda: b"[#news] hello, news\n" in client.out)
        await self.finished("topic_publisher.py", "room-7", "--hex", "00ff")
        await wait_for(lambda: b"[#room-7] b'\\x00\\xff'\n" in client.out)
        await self.finished("redis_publisher.py", "demo", "to the session")
        await wait_for(lambda: b"< to the session\n" in client.out)
        nobody = await self.finished("topic_publisher.py", "elsewhere", "unheard")
        self.assertEqual(nobody.out, b"0\n")

        backend = Backend(self.redis.client())
        self.addCleanup(backend.redis.close)
        self.assertEqual(backend.join_topics("demo", "late"), 1)
        await wait_for(lambda: self.r.pubsub_numsub("topic:late:down")[0][1] == 1)
        await self.finished("topic_publisher.py", "late", "joined while connected")
        await wait_for(lambda: b"[#late] joined while connected\n" in client.out)
        self.assertEqual(backend.leave_topics("demo", "news"), 1)
        await wait_for(lambda: self.r.pubsub_numsub("topic:news:down")[0][1] == 0)
        await self.finished("topic_publisher.py", "news", "after leaving")
        await self.finished("redis_publisher.py", "demo", "last")
        await wait_for(lambda: b"< last\n" in client.out)
        self.assertNotIn(b"after leaving", client.out)
        self.assertEqual(self.r.smembers("session:demo:topics"), {b"room-7", b"late"})

    async def test_node_client(self) -> None:
        """
        node_client.mjs (the browser client module under Node's WebSocket,
        labels and resume on) against a proxy with TOPICS=true and
        RESUME=true: a topic's plain and recoverable messages are printed
        as "[#topic] message", the session's own as "< message", each
        topic's recovery report on stderr; SIGINT closes normally.
        """
        _, port = await self.proxy(TOPICS="true", RESUME="true")
        await self.finished("auth_token_setter.py", "demo", "--token", "s3cret",
                            "--topic", "news")
        client = self.node_script("node_client.mjs", f"ws://127.0.0.1:{port}", "demo", "s3cret")
        await wait_for(lambda: b"recovery #news: 0 replayed" in client.err
                       or client.status is not None, timeout=20)
        self.assertIsNone(client.status, client.err)
        self.assertIn(b"state: open", client.err)
        await self.finished("topic_publisher.py", "news", "plain news")
        await wait_for(lambda: b"[#news] plain news\n" in client.out)
        kept = await self.finished("topic_publisher.py", "news", "kept news", "--recoverable")
        self.assertRegex(kept.out.decode(), r"^[0-9a-f]+:\d+-1\n$")
        await wait_for(lambda: b"[#news] kept news\n" in client.out)
        await self.finished("redis_publisher.py", "demo", "to the session")
        await wait_for(lambda: b"< to the session\n" in client.out)
        client.transport.signalProcess("INT")
        self.assertEqual(await client.ended, 0, client.err)
        self.assertIn(b"state: closed (1000", client.err)

    async def test_echo_backend(self) -> None:
        """
        With echo_backend running, what the client types comes straight
        back to it.
        """
        _, port = await self.proxy()
        await self.finished("auth_token_setter.py", "demo", "--token", "s3cret")
        backend = self.script("echo_backend.py")
        await wait_for(lambda: b"echo backend ready\n" in backend.out)
        client = self.script("ws_client.py", f"ws://127.0.0.1:{port}/app/ws/demo", "s3cret",
                             "--token-in", "subprotocol")
        await wait_for(lambda: b"connected" in client.err or client.status is not None)
        client.type("ping-echo")
        await wait_for(lambda: b"< ping-echo\n" in client.out)

    async def test_session_backend(self) -> None:
        """
        session_backend (EVENTS=all): the client is greeted when it opens,
        receives the stream, and typing "bye" makes the backend close the
        session (4000) and revoke its token; the backend logs the open and
        the server-side close.
        """
        _, port = await self.proxy(EVENTS="all")
        await self.finished("auth_token_setter.py", "demo", "--token", "s3cret")
        backend = self.script("session_backend.py", "--interval", "0.2", "--count", "50")
        await wait_for(lambda: b"session backend ready\n" in backend.out)
        await wait_for(lambda: self.r.pubsub_numsub("wsproxy:events")[0][1] >= 1)
        client = self.script("ws_client.py", f"ws://127.0.0.1:{port}/app/ws/demo", "s3cret")
        await wait_for(lambda: b'< {"hello": "demo"}\n' in client.out)
        await wait_for(lambda: b'< {"n": 2}\n' in client.out)
        client.type("bye")
        await wait_for(lambda: client.status is not None, timeout=15)
        self.assertIn(b"closed: code=4000 reason='bye'", client.err)
        await wait_for(lambda: b"close demo 4000 by server" in backend.out)
        self.assertIn(b"open  demo", backend.out)
        self.assertEqual(self.r.exists("session:demo:auth"), 0)

    async def test_client_exits_when_server_closes(self) -> None:
        """
        When the proxy shuts down, ws_client prints the close (1001) and
        exits by itself, without waiting for another line of input.
        """
        daemon, port = await self.proxy()
        await self.finished("auth_token_setter.py", "demo", "--token", "s3cret")
        client = self.script("ws_client.py", f"ws://127.0.0.1:{port}/app/ws/demo", "s3cret",
                             "--token-in", "query")
        await wait_for(lambda: b"connected" in client.err or client.status is not None)
        daemon.signal(signal.SIGTERM)
        await wait_for(lambda: client.status is not None, timeout=15)
        self.assertEqual(client.status, 0)
        self.assertIn(b"closed: code=1001 reason='server shutting down'", client.err)
