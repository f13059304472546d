"""
compose.yaml, validated and brought up for real: the default services
(Redis, wsproxy, the example backend) pass the README's walkthrough run
from the host, and the sentinel and cluster profiles each bring up a
wsproxy that carries a session. The images are the ones C{bin/dev image}
builds (Redis from Debian's packages: Docker Hub is out of reach here).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import time

import yaml
from twisted.internet import reactor, task
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.trial.unittest import TestCase

from .support import ROOT, ProcessOutput, connect, free_port, raw_exchange, status_of, wait_for
from .support.container import EXAMPLES_IMAGE, IMAGE, REDIS_IMAGE, compose, require_image

DEFAULT_SERVICES = ["redis", "wsproxy", "backend"]
SENTINEL_SERVICES = ["redis-master", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
                     "wsproxy-sentinel"]
CLUSTER_SERVICES = [*(f"redis-node-{n}" for n in range(1, 7)), "redis-cluster-init",
                    "wsproxy-cluster"]


class ComposeTestCase(TestCase):
    timeout = 300

    def setUp(self) -> None:
        for image in (IMAGE, EXAMPLES_IMAGE, REDIS_IMAGE):
            require_image(image)
        self.env = {
            "WSPROXY_IMAGE": IMAGE, "WSPROXY_EXAMPLES_IMAGE": EXAMPLES_IMAGE,
            "REDIS_IMAGE": REDIS_IMAGE,
            "WSPROXY_PORT": str(free_port()), "REDIS_PORT": str(free_port()),
            "WSPROXY_SENTINEL_PORT": str(free_port()), "WSPROXY_CLUSTER_PORT": str(free_port()),
            "COMPOSE_PROJECT_NAME": f"wsproxy-test-{os.getpid()}-{id(self) % 100000}",
        }

    def compose(self, *args: str, timeout: float = 60.0) -> str:
        result = compose(*args, env=self.env, timeout=timeout)
        self.assertEqual(result.returncode, 0, f"compose {' '.join(args)}: {result.stderr}")
        return result.stdout

    def up(self, *profiles: str) -> None:
        flags = [f for p in profiles for f in ("--profile", p)]
        self.addCleanup(self.compose, *flags, "down", "-v", "-t", "5", timeout=120)
        # returns once every depends_on condition (health, completion) held
        self.compose(*flags, "up", "-d", timeout=240)

    def script(self, name: str, *args: str) -> tuple[ProcessOutput, Any]:
        """
        examples/C{name} on the host, as the README runs it, with REDIS_URL
        pointing at the Compose Redis.
        """
        out = ProcessOutput()
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   REDIS_URL=f"redis://127.0.0.1:{self.env['REDIS_PORT']}")
        process = reactor.spawnProcess(
            out, sys.executable, [sys.executable, os.path.join(ROOT, "examples", name), *args],
            env=env)

        def stop() -> None:
            if not out.ended.called:
                process.signalProcess("KILL")

        self.addCleanup(lambda: (stop(), out.ended)[1])
        return out, process


class ComposeConfigTests(ComposeTestCase):
    def test_services_per_profile(self) -> None:
        """
        compose.yaml is valid with each profile, and each profile adds
        exactly its services.
        """
        for profiles, expected in [
            ((), DEFAULT_SERVICES),
            (("sentinel",), DEFAULT_SERVICES + SENTINEL_SERVICES),
            (("cluster",), DEFAULT_SERVICES + CLUSTER_SERVICES),
        ]:
            flags = [f for p in profiles for f in ("--profile", p)]
            self.compose(*flags, "config", "-q")
            # what Compose resolved (v1 lists every service with its
            # profiles, v2 only the active ones): those the profiles start
            services = yaml.safe_load(self.compose(*flags, "config"))["services"]
            active = [name for name, service in services.items()
                      if not service.get("profiles") or set(service["profiles"]) & set(profiles)]
            self.assertEqual(sorted(active), sorted(expected), profiles)


class ComposeWalkthroughTests(ComposeTestCase):
    async def test_readme_walkthrough(self) -> None:
        """
        After `docker compose up`, the README's session by hand works from
        the host: authorize, listen to :up, connect the client (greeted and
        streamed to by the example backend), publish to it, type to the
        subscriber, and "bye" has the backend end the session (4000).
        """
        self.up()
        url = f"ws://127.0.0.1:{self.env['WSPROXY_PORT']}/app/ws/demo"
        setter, _ = self.script("auth_token_setter.py", "demo", "--token", "s3cret")
        self.assertEqual(await setter.ended, 0, setter.output)
        subscriber, _ = self.script("redis_subscriber.py", "demo")
        await wait_for(lambda: b"listening on session:demo:up\n" in subscriber.output)

        client, typing = self.script("ws_client.py", url, "s3cret")
        await wait_for(lambda: b'< {"hello": "demo"}\n' in client.output, timeout=30)
        await wait_for(lambda: b'< {"n": 1}\n' in client.output, timeout=30)
        publisher, _ = self.script("redis_publisher.py", "demo", '{"hello":"client"}')
        self.assertEqual(await publisher.ended, 0, publisher.output)
        await wait_for(lambda: b'< {"hello":"client"}\n' in client.output)

        typing.write(b"hello\n")
        await wait_for(lambda: b"session:demo:up: hello\n" in subscriber.output)
        typing.write(b"bye\n")
        await wait_for(lambda: client.ended.called, timeout=30)
        self.assertIn(b"closed: code=4000 reason='bye'", client.output)


class ComposeProfileTests(ComposeTestCase):
    async def healthy(self, port: int) -> None:
        """
        Wait until the wsproxy published on C{port} answers /health 200.
        """
        async def answers() -> bool:
            try:
                response = await raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
            except (ConnectionRefusedError, ConnectionLost):
                return False
            return bool(response) and status_of(response) == 200

        deadline = time.monotonic() + 60
        while not await answers():
            self.assertLess(time.monotonic(), deadline, f"no healthy wsproxy on {port}")
            await task.deferLater(reactor, 0.2, lambda: None)

    async def session(self, port: str, cli: list[str], publish: str) -> None:
        """
        A session through the wsproxy on C{port}: its token stored and a
        message published with C{cli} (a redis-cli inside the set-up).
        """
        await self.healthy(int(port))
        self.compose("exec", "-T", *cli, "SETEX", "session:p1:auth", "300", "tok")
        client = await connect(f"ws://127.0.0.1:{port}/app/ws/p1", token="tok")
        self.addCleanup(client.close_and_wait)
        self.compose("exec", "-T", *cli, publish, "session:p1:down", "through")
        await client.wait_messages(1)
        self.assertEqual(client.messages, [(b"through", False)])

    async def test_sentinel_and_cluster(self) -> None:
        """
        The sentinel profile's wsproxy finds the master through the
        sentinels, the cluster profile's one routes by slot and uses
        sharded Pub/Sub: each carries a session.
        """
        self.up("sentinel", "cluster")
        await self.session(self.env["WSPROXY_SENTINEL_PORT"],
                           ["redis-master", "redis-cli"], "PUBLISH")
        await self.session(self.env["WSPROXY_CLUSTER_PORT"],
                           ["redis-node-1", "redis-cli", "-c"], "SPUBLISH")
