"""
The JavaScript client package (clients/js, C{@wsproxy/client}) under Node's
own test runner, against real processes: a redis-server and the daemon with
the settings each test file needs. Each test here starts them, a small
control server (C{POST /restart}: the daemon again on the same port;
C{POST /jwt}: a JWT signed with L{wsproxy.backend.sign_token}), then runs
C{node --test clients/js/test/<file>} with their addresses in its
environment (clients/js/test/helpers.js says which), and fails with
node's output unless every node test passed (none skipped). The node
tests do their Redis work themselves, with a minimal RESP client.

A missing node fails these tests (bin/dev system-setup installs Debian's
nodejs); so does a missing TypeScript compiler for the type declarations'
check (bin/dev system-setup: npm ci from clients/js/package-lock.json into
.cache/js-client).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.web import resource, server

from wsproxy.backend import sign_token

from .support import ROOT, ProcessOutput, start_daemon, wait_for
from .support.daemon import PYTHON_M_WSPROXY, Daemon, EnvTestCase, daemon_env

PACKAGE = os.path.join(ROOT, "clients", "js")
NODE_TESTS = os.path.join(PACKAGE, "test")
#: where bin/dev system-setup installs clients/js/package-lock.json (TypeScript)
MODULES = os.environ.get("JS_CLIENT_MODULES") or os.path.join(ROOT, ".cache", "js-client")
TSC = os.path.join(MODULES, "node_modules", ".bin", "tsc")
SECRET = "js-client-test-secret-of-at-least-32-bytes"
#: the node test files, each run by one test below
FILES = {"auth.test.js", "refresh.test.js", "resume.test.js", "ack.test.js", "topics.test.js",
         "transports.test.js"}


def node_command() -> list[str]:
    """
    node, with C{--experimental-websocket} before Node 22 (which has a
    global WebSocket without it).

    @raise RuntimeError: no node (the test fails, it never skips).
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("no node: bin/dev system-setup installs Debian's nodejs "
                           "(apt-get install -y nodejs npm)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    major = int(version.strip().lstrip("v").split(".")[0])
    if major < 20:
        raise RuntimeError(f"node {version.strip()}: the client package needs Node 20 or later")
    return [node, "--experimental-websocket"] if major < 22 else [node]


class Control(resource.Resource):
    """
    What a node test asks of this side: C{POST /restart} stops the daemon
    (SIGTERM) and starts it again on the same port with the same settings,
    answering once it is healthy; C{POST /jwt?session=S&expires_in=N} a JWT
    for session S (agent "a") signed with L{SECRET}.
    """

    isLeaf = True

    def __init__(self, test: "JsClientTests") -> None:
        super().__init__()
        self.test = test

    def render_POST(self, request: Any) -> Any:
        path = request.path.decode()
        if path == "/jwt":
            session = request.args[b"session"][0].decode()
            expires_in = int(request.args.get(b"expires_in", [b"300"])[0])
            return sign_token(SECRET, session, agent_id="a", expires_in=expires_in).encode()
        if path == "/restart":
            def done(_: Any) -> None:
                request.write(b"restarted")
                request.finish()

            def failed(failure: Any) -> None:
                request.setResponseCode(500)
                request.write(str(failure.value).encode())
                request.finish()

            defer.ensureDeferred(self.test.restart()).addCallbacks(done, failed)
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"unknown"


class JsClientTests(EnvTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.env: dict[str, str] = {}
        site = server.Site(Control(self))
        site.noisy = False
        self.control = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.control.stopListening)

    async def restart(self) -> Daemon:
        """
        The daemon stopped (SIGTERM: its clients get 1001) and started
        again on the same port with the same settings.
        """
        old = self.daemon
        old.signal(15)
        status = await old.out.ended
        if status != 0:
            raise AssertionError(f"the daemon exited with {status}: {old.log}")
        full = daemon_env(self.redis.url, PORT=str(self.port), SHUTDOWN_GRACE_PERIOD_SECS="2")
        full.update(self.env)
        self.daemon = start_daemon(self, full, PYTHON_M_WSPROXY)
        await self.daemon.healthy(self.port, self.host)
        return self.daemon

    async def node_tests(self, name: str, **env: str) -> str:
        """
        Start the daemon with C{env}, run clients/js/test/C{name} with Node's
        test runner against it, and fail with node's output unless every
        test in it passed and none was skipped. Node's output.
        """
        command = node_command()
        self.env = dict(env)
        await self.start(**env)
        return await self.run_node(command + ["--test", "--test-reporter=tap",
                                              os.path.join(NODE_TESTS, name)], {
            "WSPROXY_URL": f"ws://{self.host}:{self.port}",
            "WSPROXY_REDIS_PORT": str(self.redis.port),
            "WSPROXY_CONTROL": f"http://127.0.0.1:{self.control.getHost().port}",
        })

    async def run_node(self, argv: list[str], env: Optional[dict[str, str]] = None) -> str:
        out = ProcessOutput()
        process = reactor.spawnProcess(out, argv[0], argv, env={**os.environ, **(env or {})},
                                       path=PACKAGE)

        def kill() -> None:
            if not out.ended.called:
                process.signalProcess("KILL")
        self.addCleanup(kill)
        status = await out.ended
        text = out.output.decode(errors="replace")
        self.assertEqual(status, 0, f"node exited with {status}:\n{text}")
        counts = {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail|skipped|cancelled|todo) (\d+)$",
                                                     text, re.M)}
        self.assertGreater(counts.get("pass", 0), 0, text)
        self.assertEqual((counts.get("fail"), counts.get("skipped"), counts.get("cancelled")),
                         (0, 0, 0), text)
        return text

    def test_every_file_is_run(self) -> None:
        """
        Every node test file in clients/js/test has its test here.
        """
        self.assertEqual({f for f in os.listdir(NODE_TESTS) if f.endswith(".test.js")}, FILES)

    async def test_auth(self) -> None:
        """
        auth.test.js (AUTH_MODE=redis): a token as the bearer subprotocol
        and as ?access_token=, messages both ways, a refused token giving
        up, tickets from getTicket (a fresh one per attempt, each consumed).
        """
        await self.node_tests("auth.test.js")

    async def test_token_refresh(self) -> None:
        """
        refresh.test.js (AUTH_MODE=jwt, JWT_EXPIRE_CONNECTIONS=true): a JWT
        from getToken that expires makes the proxy close with 3000; the
        client asks getToken again and reconnects at once (delay 0), and
        messages flow again; a token the proxy refuses ends as failed.
        """
        await self.node_tests("refresh.test.js", AUTH_MODE="jwt", JWT_SECRET=SECRET,
                              JWT_EXPIRE_CONNECTIONS="true")

    async def test_resume_across_restart(self) -> None:
        """
        resume.test.js (RESUME=true): 150 numbered recoverable messages,
        one every 20 ms, with the daemon restarted in the middle: every
        number once, in order, every recovery report recovered.
        """
        await self.node_tests("resume.test.js", RESUME="true")

    async def test_acknowledged_upstream(self) -> None:
        """
        ack.test.js (UPSTREAM=stream, one partition): 200 messages with
        ids, text and binary, the daemon restarted in the middle: none left
        unacknowledged, every id in the stream, each ack naming its entry.
        """
        await self.node_tests("ack.test.js", UPSTREAM="stream", UPSTREAM_PARTITIONS="1")

    async def test_topics(self) -> None:
        """
        topics.test.js (TOPICS=true, RESUME=true): labelled messages (topic,
        position, binary), positions per topic, a topic joined while
        connected, a missed recoverable topic message replayed once after a
        reconnect through resume_topic; without labels, a topic's message
        as the session's own.
        """
        await self.node_tests("topics.test.js", TOPICS="true", RESUME="true")

    async def test_transports(self) -> None:
        """
        transports.test.js (no proxy needed; run beside one all the same):
        scripted transports, the way SSE will plug in: an attempt that never
        opened moves to the next transport, the one that opened stays,
        framing and acks the same over any; the WebSocket transport with a
        class given as an option; options checked.
        """
        await self.node_tests("transports.test.js")

    async def test_type_declarations(self) -> None:
        """
        index.d.ts declares the whole public API: test/types/usage.ts (every
        option, callback, event and method, and what must not compile,
        marked @ts-expect-error) passes C{tsc --noEmit --strict}, importing
        the package by its name (its own exports and types).
        """
        node = node_command()
        if not os.access(TSC, os.X_OK):
            raise RuntimeError(f"no TypeScript compiler at {TSC}: run bin/dev system-setup "
                               "(npm ci from clients/js/package-lock.json into .cache/js-client)")
        out = ProcessOutput()
        argv = [node[0], os.path.realpath(TSC), "-p", os.path.join("test", "types", "tsconfig.json")]
        reactor.spawnProcess(out, argv[0], argv, env=dict(os.environ), path=PACKAGE)
        status = await out.ended
        self.assertEqual(status, 0, out.output.decode(errors="replace"))
