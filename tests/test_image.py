"""
The container image (C{Dockerfile}, built by C{bin/dev image}): the same
contract checks run against the plain daemon (C{python -m wsproxy}) and
against the image, run as restricted as the Kubernetes manifests run it
(read-only root filesystem, no capabilities, no privilege gain, uid 10001);
then what only the image has: C{docker stop}'s drain, C{WORKERS} inside
it, its HEALTHCHECK, a mounted C{.env}, its user and contents.

A real redis-server on the host; containers share the host's network.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from typing import Any

import jwt as pyjwt
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError

from .support import (
    RedisTestCase,
    connect,
    daemon_env,
    exchange_messages,
    free_port,
    raw_exchange,
    start_daemon,
    status_of,
    wait_for,
)
from .support.container import (
    IMAGE,
    RESTRICTED,
    Container,
    docker,
    image_config,
    require_image,
    start_container,
)

TOKEN = "s3cret-token-value"


class ContractChecks:
    """
    The checks both the plain daemon and the image must pass; a subclass
    says how to start one (L{launch}) and how an operator stops it
    (L{terminate}).
    """

    timeout = 120
    r: Any
    redis: Any

    async def launch(self, **env: str) -> Any:
        raise NotImplementedError

    async def terminate(self, daemon: Any) -> int:
        raise NotImplementedError

    async def start_proxy(self, **env: str) -> Any:
        self.port = free_port()
        full = daemon_env(self.redis.url, PORT=str(self.port), **env)
        full["HOST"] = "127.0.0.1"
        daemon = await self.launch(**full)
        await daemon.healthy(self.port, timeout=60)
        return daemon

    async def get(self, path: str) -> bytes:
        response: bytes = await raw_exchange(self.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return response

    async def upgrade(self, path: str, token: str | None) -> bytes:
        """
        An upgrade request for C{path} with C{token} (if any); the response.
        """
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        request = (f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   f"Sec-WebSocket-Version: 13\r\n{auth}\r\n")
        response: bytes = await raw_exchange(self.port, request.encode(), close_after=5)
        return response

    def url(self, session: str) -> str:
        return f"ws://127.0.0.1:{self.port}/app/ws/{session}"

    async def test_session_both_ways(self) -> None:
        """
        An authorized session is admitted with its Bearer token, the auth
        key's TTL is reset to the grace period, and messages cross both
        ways.
        """
        await self.start_proxy(AUTH_GRACE_PERIOD_SECS="120")
        self.r.setex("session:s1:auth", 3600, TOKEN)
        await exchange_messages(self, self.r, self.url("s1"), "s1", token=TOKEN)
        self.assertLessEqual(self.r.ttl("session:s1:auth"), 120)  # type: ignore[attr-defined]

    async def test_refusals(self) -> None:
        """
        No token: 401; a wrong one: 403; another path: 404; the token never
        appears in the log.
        """
        daemon = await self.start_proxy()
        self.r.setex("session:s1:auth", 3600, TOKEN)
        for path, token, status in [
            ("/app/ws/s1", None, 401),
            ("/app/ws/s1", "wrong-token-value", 403),
            ("/app/nowhere/s1", TOKEN, 404),
        ]:
            response = await self.upgrade(path, token)
            self.assertEqual(status_of(response), status, response)  # type: ignore[attr-defined]
        await wait_for(lambda: "refused" in daemon.log)
        self.assertNotIn(TOKEN, daemon.log)  # type: ignore[attr-defined]
        self.assertNotIn("wrong-token-value", daemon.log)  # type: ignore[attr-defined]

    async def test_endpoints(self) -> None:
        """
        /health, /ready and /metrics answer.
        """
        await self.start_proxy()
        health = await self.get("/health")
        self.assertEqual(status_of(health), 200)  # type: ignore[attr-defined]
        self.assertIn(b'"redis":"connected"', health)  # type: ignore[attr-defined]
        self.assertEqual(status_of(await self.get("/ready")), 200)  # type: ignore[attr-defined]
        metrics = await self.get("/metrics")
        self.assertIn(b"\nwsproxy_connections_open ", metrics)  # type: ignore[attr-defined]

    async def test_jwt(self) -> None:
        """
        AUTH_MODE=jwt admits a token signed with ES256 (the image's
        cryptography works) and refuses a forged one.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        directory = tempfile.mkdtemp(prefix="wsproxy-image-jwt-")
        os.chmod(directory, 0o755)
        self.addCleanup(shutil.rmtree, directory)  # type: ignore[attr-defined]
        pem = os.path.join(directory, "key.pem")
        with open(pem, "wb") as f:
            f.write(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        os.chmod(pem, 0o644)
        await self.start_proxy(AUTH_MODE="jwt", JWT_PUBLIC_KEY_FILE=pem)
        token = pyjwt.encode({"session_id": "s2", "exp": int(time.time()) + 300}, key,
                             algorithm="ES256")
        await exchange_messages(self, self.r, self.url("s2"), "s2", token=token)
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        response = await self.upgrade("/app/ws/s2", forged)
        self.assertEqual(status_of(response), 403, response)  # type: ignore[attr-defined]

    async def test_terminate_drains(self) -> None:
        """
        Stopped the way its operator stops it: open clients get 1001,
        /ready answers 503 while it drains, and it exits 0 having logged
        "shutdown complete".
        """
        daemon = await self.start_proxy(SHUTDOWN_DRAIN_SECS="5", SHUTDOWN_GRACE_PERIOD_SECS="10")
        self.r.setex("session:s1:auth", 3600, TOKEN)
        client = await connect(self.url("s1"), token=TOKEN)
        stopped = defer.ensureDeferred(self.terminate(daemon))
        closed = client.factory.closed
        await wait_for(lambda: closed.called, timeout=20)
        self.assertEqual((await closed)[0], 1001)  # type: ignore[attr-defined]
        # still listening, saying why not to send anyone here
        self.assertEqual(status_of(await self.get("/ready")), 503)  # type: ignore[attr-defined]
        status = await stopped
        self.assertEqual(status, 0, daemon.log)  # type: ignore[attr-defined]
        self.assertIn("shutdown complete", daemon.log)  # type: ignore[attr-defined]
        with self.assertRaises(ConnectionRefusedError):  # type: ignore[attr-defined]
            await self.get("/ready")


class PlainDaemonContractTests(ContractChecks, RedisTestCase):
    """
    The contract checks against C{python -m wsproxy}.
    """

    async def launch(self, **env: str) -> Any:
        return start_daemon(self, env)

    async def terminate(self, daemon: Any) -> int:
        daemon.signal("TERM")
        status: int = await daemon.out.ended
        return status


class ImageContractTests(ContractChecks, RedisTestCase):
    """
    The same checks against the image, stopped with C{docker stop}.
    """

    async def launch(self, **env: str) -> Any:
        for value in env.values():
            # files the settings name are mounted read-only where they are
            if value.startswith("/tmp/") and os.path.exists(value):
                self.mounts = getattr(self, "mounts", ()) + (
                    "-v", f"{os.path.dirname(value)}:{os.path.dirname(value)}:ro")
        return start_container(self, env, RESTRICTED + getattr(self, "mounts", ()))

    async def terminate(self, daemon: Any) -> int:
        status: int = await daemon.docker_stop(timeout=30)
        return status


class ImageTests(RedisTestCase):
    """
    What only the image has.
    """

    timeout = 120

    async def healthy_container(self, options: tuple[str, ...] = RESTRICTED,
                                **env: str) -> Container:
        self.port = free_port()
        full = daemon_env(self.redis.url, PORT=str(self.port), **env)
        container = start_container(self, full, options)
        await container.healthy(self.port, timeout=60)
        return container

    def test_image_configuration(self) -> None:
        """
        An unprivileged user, wsproxy itself as the entry point (exec form:
        no shell between docker and the proxy), SIGTERM as the stop
        signal, a HEALTHCHECK, port 8080.
        """
        require_image()
        config = image_config()
        self.assertEqual(config["User"], "10001:10001")
        self.assertEqual(config["Entrypoint"], ["/opt/wsproxy/bin/wsproxy"])
        self.assertIn(config.get("StopSignal"), (None, "SIGTERM"))
        self.assertIn("/opt/wsproxy/healthcheck.py", " ".join(config["Healthcheck"]["Test"]))
        self.assertIn("8080/tcp", config["ExposedPorts"])

    def test_runtime_contents(self) -> None:
        """
        The runtime image has no compiler, no pip, and runs as uid 10001;
        the fast path's self-check passes on what was installed.
        """
        require_image()
        result = docker("run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
                        "id -u; for c in gcc cc g++ make pip pip3; do command -v $c; done;"
                        " ls /opt/wsproxy/bin | grep -c '^pip' || true;"
                        " python -m wsproxy.fast >/dev/null && echo self-check ok")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), ["10001", "0", "self-check", "ok"], result.stdout)

    async def test_workers(self) -> None:
        """
        WORKERS=2 inside the image: two worker processes answer on one
        port, /metrics counts both, docker stop ends them all with 0.
        """
        container = await self.healthy_container(WORKERS="2")
        pids = set()
        for _ in range(200):
            response = await raw_exchange(self.port, b"GET /health HTTP/1.0\r\n\r\n")
            if status_of(response) == 200:
                match = re.search(rb'"pid":(\d+)', response)
                assert match is not None
                pids.add(int(match.group(1)))
            if len(pids) == 2:
                break
        self.assertEqual(len(pids), 2, pids)
        metrics = await raw_exchange(self.port, b"GET /metrics HTTP/1.0\r\n\r\n")
        self.assertIn(b"\nwsproxy_workers 2.0\n", metrics)
        self.r.setex("session:w:auth", 3600, TOKEN)
        await exchange_messages(self, self.r, f"ws://127.0.0.1:{self.port}/app/ws/w", "w",
                                token=TOKEN)
        self.assertEqual(await container.docker_stop(timeout=30), 0, container.log)

    async def test_healthcheck(self) -> None:
        """
        The HEALTHCHECK says healthy while /health is 200, and unhealthy
        once Redis is gone.
        """
        container = await self.healthy_container(
            RESTRICTED + ("--health-interval", "1s", "--health-retries", "1",
                          "--health-start-period", "0s", "--health-timeout", "3s"))

        def health() -> str:
            status: str = container.inspect()["State"]["Health"]["Status"]
            return status

        await wait_for(lambda: health() == "healthy", timeout=30)
        self.redis.stop()
        await wait_for(lambda: health() == "unhealthy", timeout=30)

    async def test_dotenv(self) -> None:
        """
        A .env mounted at /srv/wsproxy/.env is read (by the HEALTHCHECK
        too, which finds the port there); environment variables win over
        it.
        """
        directory = tempfile.mkdtemp(prefix="wsproxy-image-env-")
        os.chmod(directory, 0o755)
        self.addCleanup(shutil.rmtree, directory)
        port = free_port()
        with open(os.path.join(directory, ".env"), "w") as f:
            f.write(f"PORT={port}\nREDIS_URL={self.redis.url}\nSHUTDOWN_DRAIN_SECS=0\n"
                    "AUTH_GRACE_PERIOD_SECS=77\n")
        os.chmod(os.path.join(directory, ".env"), 0o644)
        container = start_container(
            self, {"AUTH_GRACE_PERIOD_SECS": "55", "HOST": "127.0.0.1"},
            RESTRICTED + ("-v", f"{directory}/.env:/srv/wsproxy/.env:ro",
                          "--health-interval", "1s", "--health-start-period", "0s"))
        await container.healthy(port, timeout=60)
        await wait_for(lambda: container.inspect()["State"]["Health"]["Status"] == "healthy",
                       timeout=30)
        self.r.setex("session:e:auth", 3600, TOKEN)
        self.port = port
        await exchange_messages(self, self.r, f"ws://127.0.0.1:{port}/app/ws/e", "e",
                                token=TOKEN)
        self.assertLessEqual(self.r.ttl("session:e:auth"), 55)

    async def test_invalid_setting(self) -> None:
        """
        An invalid setting stops the container at once with exit status 2
        and a line naming the variable.
        """
        container = start_container(self, {"PORT": "eighty", "REDIS_URL": self.redis.url})
        status = await container.out.ended
        self.assertEqual(status, 2, container.log)
        self.assertIn("PORT", container.log)
